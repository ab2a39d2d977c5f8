package coordinator

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"image"
	"image/png"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tpfleet/tpfleet/gateway"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// visionModelDir is a model directory whose config.json declares a vision tower (the dense-moe-mm
// fixture's: 28-pixel tiles of 14-pixel patches, one <|patch|> slot a tile) with the test tokenizer's
// image token ids: a copy of that fixture with the tokenizer added.
func visionModelDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vision")
	if err := os.CopyFS(dir, os.DirFS("../testdata/fixtures/dense-moe-mm")); err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	data, err := os.ReadFile("../testdata/fixtures/dense-moe-mm/config.json")
	if err == nil {
		err = json.Unmarshal(data, &cfg)
	}
	if err != nil {
		t.Fatal(err)
	}
	cfg["boi_token_index"], cfg["eoi_token_index"], cfg["image_token_index"] = 505, 506, 510
	if data, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"config.json": data}
	for _, name := range []string{tokenizer.TokenizerFile, tokenizer.ConfigFile} {
		if files[name], err = os.ReadFile(filepath.Join(testTokenizer, name)); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// testPNG encodes a w×h gradient.
func testPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := range img.Pix {
		img.Pix[i] = uint8(i * 7)
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// pngHeader is a PNG signature and IHDR chunk announcing w×h RGB pixels, and no pixel data.
func pngHeader(w, h uint32) []byte {
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 2 // 8-bit RGB
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	_ = binary.Write(&b, binary.BigEndian, uint32(len(ihdr)))
	chunk := append([]byte("IHDR"), ihdr...)
	b.Write(chunk)
	_ = binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(chunk))
	return b.Bytes()
}

// TestRequestImages: a GenerateRequest's images expand the prompt's <|image|> placeholders (one is added
// after BOS when the prompt has none) with each image's tile layout, and stay with the request for its
// sequence's start; bad images are INVALID_ARGUMENT errors naming the image and the problem, found
// before any pixel is decoded where the header tells.
func TestRequestImages(t *testing.T) {
	m, err := loadModelInfo(visionModelDir(t))
	if err != nil {
		t.Fatal(err)
	}
	if m.images == nil {
		t.Fatalf("loadModelInfo(vision model): no image prompter: %v", m.noImages)
	}
	const bos, start, end, tileX, tileY, placeholder, slot = 490, 505, 506, 507, 508, 509, 510
	wide := testPNG(t, 56, 28) // two 28-pixel tiles side by side, and the global one
	square := testPNG(t, 20, 20)
	layoutWide := []int32{start, slot, tileX, slot, tileY, placeholder, slot, end}
	layoutSquare := []int32{start, placeholder, slot, end}
	for _, tc := range []struct {
		name   string
		in     *pb.GenerateRequest
		prefix []int32 // the expanded prompt starts with it
	}{
		{"placeholder in the text", &pb.GenerateRequest{Prompt: "<|image|>hi", Images: [][]byte{wide}}, append([]int32{bos}, layoutWide...)},
		{"no placeholder", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{square, wide}}, append(append([]int32{bos}, layoutSquare...), layoutWide...)},
		{"ids", &pb.GenerateRequest{PromptIds: []int32{7, placeholder, 8}, Images: [][]byte{square}}, append(append([]int32{7}, layoutSquare...), 8)},
	} {
		tc.in.MaxTokens = 4
		r, err := m.newRequest(tc.in)
		if err != nil {
			t.Errorf("%s: newRequest = %v", tc.name, err)
			continue
		}
		if !slices.Equal(r.prompt[:min(len(tc.prefix), len(r.prompt))], tc.prefix) || len(r.images) != len(tc.in.Images) {
			t.Errorf("%s: prompt %v with %d images, want it to start with %v, %d images", tc.name, r.prompt, len(r.images), tc.prefix, len(tc.in.Images))
		}
	}

	eleven := slices.Repeat([][]byte{square}, 11)
	for _, tc := range []struct {
		name string
		in   *pb.GenerateRequest
		msg  string
	}{
		{"corrupt bytes", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{[]byte("not an image at all")}}, "image 0: imageproc: invalid image"},
		{"truncated", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{square, wide[:len(wide)/2]}}, "image 1: imageproc: invalid image"},
		{"zero bytes", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{{}}}, "image 0: zero bytes"},
		{"zero pixels", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{pngHeader(0, 5)}}, "image 0: imageproc: invalid image"},
		{"20000×20000", &pb.GenerateRequest{Prompt: "hi", Images: [][]byte{pngHeader(20000, 20000)}}, "image 0: imageproc: image too large: png of 20000×20000"},
		{"too many", &pb.GenerateRequest{Prompt: "hi", Images: eleven}, "11 images: at most 10 per prompt"},
		{"placeholders", &pb.GenerateRequest{Prompt: "<|image|><|image|>", Images: [][]byte{square}}, "the prompt has 2 <|image|> placeholders for 1 images"},
	} {
		tc.in.MaxTokens = 4
		_, err := m.newRequest(tc.in)
		if !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: newRequest = %v, want ErrInvalidRequest with %q", tc.name, err, tc.msg)
		}
	}

	// A checkpoint without a vision tower refuses images, naming why.
	dir, _ := modelWithTokenizer(t)
	text, err := loadModelInfo(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = text.newRequest(&pb.GenerateRequest{Prompt: "hi", MaxTokens: 4, Images: [][]byte{square}})
	if !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "the checkpoint takes no images") {
		t.Errorf("newRequest(image, text-only model) = %v, want ErrInvalidRequest: takes no images", err)
	}
	if gm, _ := text.gatewayModel(""); gm.ImagePlaceholder != "" || gm.NoImages == "" {
		t.Errorf("gatewayModel(text-only) = %+v, want no placeholder and a reason", gm)
	}
	if gm, _ := m.gatewayModel(""); gm.ImagePlaceholder != "<|image|>" || gm.MaxImages != 10 {
		t.Errorf("gatewayModel(vision) = %+v, want placeholder <|image|>, 10 images", gm)
	}
}

// TestPlanImageBytes: the starts of one step carry at most maxStepImageBytes of images; a start that does
// not fit waits for a later step (and one request's images always go, whatever their size).
func TestPlanImageBytes(t *testing.T) {
	q := newQueue(8)
	big := make([]byte, maxStepImageBytes/2+1)
	for range 3 {
		r := newRequest([]int32{1, 2, 3}, 4, sample.Params{}, nil)
		r.images = [][]byte{big}
		if err := q.push(r); err != nil {
			t.Fatal(err)
		}
	}
	b := &batch{cfg: groupConfig{queue: q, maxBatch: 8, tokenBudget: 64, seqIDs: new(atomic.Uint64)}}
	for step, want := range []int{1, 1, 1} {
		work, _ := b.plan()
		var starts, images int
		for _, w := range work {
			if w.GetStart() {
				starts++
				images += len(w.GetImages())
			}
		}
		if starts != want || images != want {
			t.Errorf("step %d: %d starts with %d images, want %d and %d", step, starts, images, want, want)
		}
	}
	if len(b.active) != 3 {
		t.Errorf("%d sequences in the batch, want 3", len(b.active))
	}
}

// TestOpenAIImages: a chat with an image through the leader's gateway and through a Proxy (the gateway
// process) reaches the group's workers as the image bytes on the sequence's start only, the prompt
// expanded (usage counts the image's tokens); a corrupt image is a 400 from either, before any step.
func TestOpenAIImages(t *testing.T) {
	dir := visionModelDir(t)
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	cfg := testConfig(t)
	cfg.Model, cfg.HTTPAddr = dir, "127.0.0.1:0"
	c, _ := startCoordinator(t, cfg)
	waitReady(t, c)
	p, err := NewProxy(ProxyConfig{Coordinators: []string{c.Addr()}, Model: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	g, err := gateway.New(gateway.Config{Generator: p})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)

	img := testPNG(t, 56, 28)
	url := "data:image/png;base64," + base64.StdEncoding.EncodeToString(img)
	body := `{"max_tokens":3,"temperature":0,"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + url + `"}},{"type":"text","text":"hi"}]}]}`
	text, err := loadModelInfo(dir)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := text.tok.EncodeChat([]tokenizer.Message{{Role: "user", Content: "<|image|>hi"}}, true)
	if err != nil {
		t.Fatal(err)
	}
	const layout = 8 // <|image_start|> slot tileX slot tileY <|image|> slot <|image_end|> in place of <|image|>
	for _, base := range []string{"http://" + c.HTTPAddr(), srv.URL} {
		before := len(ws[0].recorded())
		code, data := post(t, base, "/v1/chat/completions", body)
		res := decode[gateway.ChatResponse](t, data)
		if code != http.StatusOK || res.Usage == nil || res.Usage.PromptTokens != len(plain)-1+layout {
			t.Fatalf("%s: image chat = %d %s, want 200 with %d prompt tokens", base, code, data, len(plain)-1+layout)
		}
		var starts, withImages int
		for _, req := range ws[0].recorded()[before:] {
			for _, w := range req.GetSeqs() {
				if len(w.GetImages()) > 0 {
					withImages++
					if !w.GetStart() || !bytes.Equal(w.GetImages()[0], img) {
						t.Errorf("%s: images on a work that is not a start, or other bytes", base)
					}
				}
				if w.GetStart() {
					starts++
				}
			}
		}
		if starts != 1 || withImages != 1 {
			t.Errorf("%s: %d starts, %d works with images; want the one start with the image", base, starts, withImages)
		}
		bad := strings.Replace(body, url, "data:image/png;base64,"+base64.StdEncoding.EncodeToString([]byte("junk")), 1)
		if code, data := post(t, base, "/v1/chat/completions", bad); code != http.StatusBadRequest || !strings.Contains(string(data), "image 0: imageproc: invalid image") {
			t.Errorf("%s: corrupt image chat = %d %s, want 400 naming the image", base, code, data)
		}
	}
}
