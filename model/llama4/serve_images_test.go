package llama4_test

import (
	"context"
	"errors"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/llama4/imageproc"
	"github.com/tpfleet/tpfleet/model/llama4/llama4test"
	"github.com/tpfleet/tpfleet/model/llama4/vision"
	"github.com/tpfleet/tpfleet/safetensors"
)

// servedVisionDir is the dense-moe-mm fixture (a 28-pixel-tile vision tower) with the image token ids.
func servedVisionDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := llama4test.VisionCheckpoint(filepath.Join(fixturesDir, "dense-moe-mm"), dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// testImage encodes a w×h PNG whose pixels depend on seed.
func testImage(_ *testing.T, w, h, seed int) []byte { return llama4test.PNG(w, h, seed) }

// testTokenIDs is the test tokenizer's lookup of the image tokens.
func testTokenIDs(tok string) (int, bool) {
	id, ok := map[string]int{imageproc.TokenImageStart: 505, imageproc.TokenImageEnd: 506, imageproc.TokenTileX: 507,
		imageproc.TokenTileY: 508, imageproc.TokenImage: 509, imageproc.TokenPatch: 510}[tok]
	return id, ok
}

// TestServedImages: the coordinator's ImagePrompter lays out what the workers' ImageEncoder fills: one
// feature row per slot, the features of several prompts encoded in one pass equal to each prompt's alone
// and to the local path's (imageproc.Prepare, then vision.Model.Features), bit for bit; errors wrap
// model.ErrImage and model.ErrNoImages.
func TestServedImages(t *testing.T) {
	ctx := context.Background()
	dir := servedVisionDir(t)
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	p, err := cfg.(model.ImageConfig).ImagePrompter(dir, testTokenIDs)
	if err != nil {
		t.Fatal(err)
	}
	if p.Placeholder() != "<|image|>" || p.PlaceholderID() != 509 || p.MaxImages() != imageproc.DefaultMaxImages {
		t.Errorf("ImagePrompter: %q %d %d, want <|image|> 509 %d", p.Placeholder(), p.PlaceholderID(), p.MaxImages(), imageproc.DefaultMaxImages)
	}
	a, b := testImage(t, 56, 28, 3), testImage(t, 30, 90, 7)
	prompt := []int{1, 509, 9, 509}
	ids, err := p.Expand(prompt, [][]byte{a, b})
	if err != nil {
		t.Fatal(err)
	}
	e, err := cfg.(llama4.Config).OpenImageEncoder(ctx, dir, cpu.New(cpu.Config{}))
	if err != nil {
		t.Fatal(err)
	}
	slots := 0
	for _, id := range ids {
		if id == e.SlotID() {
			slots++
		}
	}
	both, err := e.Encode(ctx, [][][]byte{{a, b}, {b}})
	if err != nil {
		t.Fatal(err)
	}
	if len(both) != 2 || len(both[0]) != slots*e.Width() {
		t.Fatalf("Encode: %d prompts, %d values for the first, want 2 and %d slots × %d", len(both), len(both[0]), slots, e.Width())
	}
	alone, err := e.Encode(ctx, [][][]byte{{b}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(both[1], alone[0]) {
		t.Errorf("the features of a prompt encoded with another differ from its own alone")
	}

	// The local path: the processor's pixels through the vision tower.
	pc := imageproc.Config{TileSize: 28, PatchSize: 14, PixelShuffleRatio: 0.5}
	ip, _ := imageproc.LookupIDs(testTokenIDs)
	req, err := pc.Prepare(prompt, [][]byte{a, b}, ip)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(req.IDs, ids) {
		t.Errorf("Expand = %v, imageproc.Prepare = %v", ids, req.IDs)
	}
	vcfg, err := vision.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	vm, err := vision.Load(ctx, cpu.New(cpu.Config{}), ckpt, vcfg)
	if err != nil {
		t.Fatal(err)
	}
	local, err := vm.Features(ctx, req.Pixels, req.Tiles)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(local, both[0], func(x, y float32) bool { return math.Float32bits(x) == math.Float32bits(y) }) {
		t.Errorf("served features differ from the local path's")
	}

	for _, tc := range []struct {
		name   string
		prompt []int
		images [][]byte
		msg    string
	}{
		{"corrupt", []int{509}, [][]byte{[]byte("junk")}, "image 0: imageproc: invalid image"},
		{"placeholders", []int{509, 509}, [][]byte{a}, "2 <|image|> placeholders for 1 images"},
		{"too many", slices.Repeat([]int{509}, 11), slices.Repeat([][]byte{a}, 11), "11 images, at most 10"},
	} {
		if _, err := p.Expand(tc.prompt, tc.images); !errors.Is(err, model.ErrImage) || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("Expand(%s) = %v, want ErrImage with %q", tc.name, err, tc.msg)
		}
	}
	if _, err := e.Encode(ctx, [][][]byte{{a}, {[]byte("junk")}}); !errors.Is(err, model.ErrImage) || !strings.Contains(err.Error(), "prompt 1: image 0") {
		t.Errorf("Encode(junk) = %v, want ErrImage naming prompt 1, image 0", err)
	}

	// A text-only checkpoint.
	text := filepath.Join(fixturesDir, "moe-top1")
	tcfg, err := model.LoadConfig(text)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tcfg.(model.ImageConfig).ImagePrompter(text, testTokenIDs); !errors.Is(err, model.ErrNoImages) {
		t.Errorf("ImagePrompter(moe-top1) = %v, want ErrNoImages", err)
	}
	if _, err := tcfg.(llama4.Config).OpenImageEncoder(ctx, text, cpu.New(cpu.Config{})); !errors.Is(err, model.ErrNoImages) {
		t.Errorf("OpenImageEncoder(moe-top1) = %v, want ErrNoImages", err)
	}
}
