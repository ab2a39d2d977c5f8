package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"hash/crc32"
	"image"
	"image/png"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/sample"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// visionServeDir is a copy of the dense-moe-mm fixture (a Llama4ForConditionalGeneration with a random
// vision tower: 28-pixel tiles, one <|patch|> slot a tile) with the test tokenizer and its image token
// ids in config.json, so that it serves images with a chat template.
func visionServeDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vision-mm")
	if err := os.CopyFS(dir, os.DirFS(filepath.Join(fixtures, "dense-moe-mm"))); err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
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
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{tokenizer.TokenizerFile, tokenizer.ConfigFile} {
		data, err := os.ReadFile(filepath.Join("../../testdata/tokenizer", name))
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, name), data, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// gradientPNG encodes a w×h image with content in every channel.
func gradientPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			i := img.PixOffset(x, y)
			img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = uint8(x*255/w), uint8(y*255/h), uint8((x/3+y/5)%2*255), 255
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// pngOfSize is a PNG signature and an IHDR chunk announcing w×h pixels, without pixel data.
func pngOfSize(w, h uint32) []byte {
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 2
	chunk := append([]byte("IHDR"), ihdr...)
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	_ = binary.Write(&b, binary.BigEndian, uint32(len(ihdr)))
	b.Write(chunk)
	_ = binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(chunk))
	return b.Bytes()
}

// localImageIDs runs `tpfleet generate --image` (the local path: no coordinator, no workers) greedily.
func localImageIDs(t *testing.T, dir string, n int, image string, prompt ...string) []int {
	t.Helper()
	args := append([]string{"generate", "--model", dir, "--image", image, "--max-tokens", strconv.Itoa(n),
		"--temperature", "0", "--ignore-eos", "--json"}, prompt...)
	code, stdout, stderr := tpfleet(t, args...)
	if code != 0 {
		t.Fatalf("tpfleet %v: exit %d: %s", args, code, stderr)
	}
	var got generateJSON
	if err := json.Unmarshal([]byte(stdout), &got); err != nil || len(got.IDs) != n {
		t.Fatalf("generate --json output %q: %v", stdout, err)
	}
	return got.IDs
}

// imageQuestion is the text of the image chats: one user message of an image part and this text part.
const imageQuestion = "What is in this picture?"

// imageChatWant returns the ids and text that the local `generate --image` decodes greedily for the
// chat of one user message [image, imageQuestion] rendered by dir's chat template (the image's
// placeholder where its part was).
func imageChatWant(t *testing.T, dir, image string, n int) ([]int, string) {
	t.Helper()
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	chatIDs, err := tok.EncodeChat([]tokenizer.Message{{Role: "user", Content: "<|image|>" + imageQuestion}}, true)
	if err != nil {
		t.Fatal(err)
	}
	list := make([]string, len(chatIDs))
	for i, id := range chatIDs {
		list[i] = strconv.Itoa(id)
	}
	ids := localImageIDs(t, dir, n, image, "--ids", strings.Join(list, ","))
	text, err := tok.Decode(ids, true)
	if err != nil {
		t.Fatal(err)
	}
	return ids, text
}

// chatStream posts a streamed chat and returns the token ids and text of its chunks (vLLM's
// return_token_ids), and the HTTP status with the body of a refused request.
func chatStream(t *testing.T, base string, body map[string]any) ([]int, string, int, string) {
	t.Helper()
	data, _ := json.Marshal(body)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		return nil, "", resp.StatusCode, b.String()
	}
	var ids []int
	var text strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content string `json:"content"`
				} `json:"delta"`
				TokenIDs []int `json:"token_ids"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(line), &chunk); err != nil {
			t.Fatalf("chunk %q: %v", line, err)
		}
		for _, c := range chunk.Choices {
			ids = append(ids, c.TokenIDs...)
			text.WriteString(c.Delta.Content)
		}
	}
	return ids, text.String(), http.StatusOK, ""
}

// TestServeImages: `tpfleet serve` at TP=2 of a checkpoint with a vision tower, prompts fed in pieces
// of 5 tokens, answers a gRPC Generate with image bytes and a streamed OpenAI chat with an image_url data URL with the ids that the local
// `generate --image` decodes for the same prompt; corrupt bytes, a zero-size image, a 20000×20000 image,
// too many images and bad data URLs are 400s (INVALID_ARGUMENT over gRPC) naming the problem, and the
// server keeps serving.
func TestServeImages(t *testing.T) {
	dir := visionServeDir(t)
	img := gradientPNG(t, 56, 28) // two tiles side by side and the global one
	imgFile := filepath.Join(t.TempDir(), "wide.png")
	if err := os.WriteFile(imgFile, img, 0o644); err != nil {
		t.Fatal(err)
	}
	const n = 6
	const question = imageQuestion
	want := localImageIDs(t, dir, n, imgFile, "--prompt", "<|image|>"+question)
	wantChat, wantText := imageChatWant(t, dir, imgFile, n)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, port, code, stderr := startServeOnFreePort(t, ctx, func(port string) []string {
		return []string{dir, "--tensor-parallel-size", "2", "--host", "127.0.0.1", "--port", port,
			"--listen", "127.0.0.1:0", "--log-level", "warn",
			// Prompt pieces of 5 tokens: an image's slots span several steps, whose features the workers
			// keep from the sequence's start.
			"--token-budget", "5", "--max-batch", "4"}
	})
	cli := waitCoordinator(t, addr)
	base := "http://127.0.0.1:" + port

	// gRPC: image bytes.
	greedy := &sample.Params{TopP: 1}
	res, err := cli.Generate(ctx, client.GenerateRequest{Prompt: "<|image|>" + question, Images: [][]byte{img}, MaxTokens: n,
		Sampling: greedy, IgnoreEOS: true}, nil)
	if err != nil || !slices.Equal(res.IDs, want) {
		t.Errorf("gRPC Generate with an image = %v, %v; want the local generate --image ids %v", res.IDs, err, want)
	}
	t.Logf("gRPC with an image: %d prompt tokens, ids %v (local generate --image: %v)", res.PromptTokens, res.IDs, want)
	if res.PromptTokens < 10 {
		t.Errorf("gRPC Generate: %d prompt tokens, want the image layout's and the text's", res.PromptTokens)
	}

	// The same through `tpfleet generate --addr --image`.
	code2, stdout, stderr2 := tpfleet(t, "generate", "--addr", addr, "--prompt", "<|image|>"+question, "--image", imgFile,
		"--max-tokens", strconv.Itoa(n), "--temperature", "0", "--ignore-eos", "--json")
	var remote generateJSON
	if err := json.Unmarshal([]byte(stdout), &remote); code2 != 0 || err != nil || !slices.Equal(remote.IDs, want) {
		t.Errorf("generate --addr --image = exit %d, %q (%s); want the ids %v", code2, stdout, stderr2, want)
	}

	// OpenAI chat: an image_url data URL, streamed.
	dataURL := "data:image/png;base64," + base64.StdEncoding.EncodeToString(img)
	chat := func(parts ...any) map[string]any {
		return map[string]any{"model": "vision-mm", "stream": true, "return_token_ids": true, "temperature": 0, "max_tokens": n,
			"ignore_eos": true, "messages": []any{map[string]any{"role": "user", "content": parts}}}
	}
	imagePart := func(u string) any {
		return map[string]any{"type": "image_url", "image_url": map[string]any{"url": u, "detail": "auto"}}
	}
	textPart := map[string]any{"type": "text", "text": question}
	ids, text, status, body := chatStream(t, base, chat(imagePart(dataURL), textPart))
	if status != http.StatusOK || !slices.Equal(ids, wantChat) {
		t.Errorf("streamed image chat = %d %s, ids %v; want 200 with the local generate --image ids %v", status, body, ids, wantChat)
	}
	t.Logf("streamed image chat: ids %v text %q (local generate --image: %v)", ids, text, wantChat)
	if text != wantText {
		t.Errorf("streamed image chat text %q, want %q", text, wantText)
	}

	b64 := func(data []byte) string { return "data:image/png;base64," + base64.StdEncoding.EncodeToString(data) }
	tooMany := []any{textPart}
	for range 11 {
		tooMany = append(tooMany, imagePart(dataURL))
	}
	for _, tc := range []struct {
		name  string
		parts []any
		msg   string
	}{
		{"corrupt bytes", []any{imagePart(b64([]byte("this is not an image"))), textPart}, "image 0: imageproc: invalid image"},
		{"truncated", []any{imagePart(b64(img[:len(img)/2])), textPart}, "image 0: imageproc: invalid image"},
		{"zero bytes", []any{imagePart("data:image/png;base64,"), textPart}, "data URL holds no bytes"},
		{"zero pixels", []any{imagePart(b64(pngOfSize(0, 7))), textPart}, "image 0: imageproc: invalid image"},
		{"20000×20000", []any{imagePart(b64(pngOfSize(20000, 20000))), textPart}, "image too large: png of 20000×20000"},
		{"too many images", tooMany, "11 images, at most 10 per request"},
		{"bad base64", []any{imagePart("data:image/png;base64,!!!"), textPart}, "bad base64"},
		{"http URL", []any{imagePart("http://127.0.0.1:1/cat.png"), textPart}, "start it with --allowed-media-domains"},
	} {
		if _, _, status, body := chatStream(t, base, chat(tc.parts...)); status != http.StatusBadRequest || !strings.Contains(body, tc.msg) {
			t.Errorf("%s: chat = %d %s, want 400 with %q", tc.name, status, body, tc.msg)
		}
	}
	for _, tc := range []struct {
		name   string
		images [][]byte
		msg    string
	}{
		{"corrupt", [][]byte{[]byte("junk")}, "image 0: imageproc: invalid image"},
		{"20000×20000", [][]byte{pngOfSize(20000, 20000)}, "image too large"},
		{"two for one placeholder", [][]byte{img, img}, "the prompt has 1 <|image|> placeholders for 2 images"},
	} {
		_, err := cli.Generate(ctx, client.GenerateRequest{Prompt: "<|image|>" + question, Images: tc.images, MaxTokens: n, Sampling: greedy}, nil)
		if grpcstatus.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("gRPC Generate with %s images = %v, want INVALID_ARGUMENT with %q", tc.name, err, tc.msg)
		}
	}

	// Still serving, and the same answer.
	if ids, _, status, body := chatStream(t, base, chat(imagePart(dataURL), textPart)); status != http.StatusOK || !slices.Equal(ids, wantChat) {
		t.Errorf("image chat after the refused ones = %d %s, ids %v; want %v", status, body, ids, wantChat)
	}
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d, want 0:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s")
	}
	// Errors other than gossip's (memberlist's pings time out on a loaded test machine) would be the
	// refused images' or the workers'.
	for _, line := range strings.Split(stderr.String(), "\n") {
		if strings.Contains(line, "panic") || strings.Contains(line, "ERROR") && !strings.Contains(line, "gossip.memberlist") {
			t.Errorf("serve logged an error: %s", line)
		}
	}
}

// TestREADMEImageExample runs the README's image chat (its sh block with an image_url, under bash with
// curl and base64) against `tpfleet serve` of a checkpoint with a vision tower.
func TestREADMEImageExample(t *testing.T) {
	var block string
	for _, b := range readmeBlocks(t, "sh") {
		if strings.Contains(b, "image_url") {
			block = b
		}
	}
	if block == "" {
		t.Fatal("README has no sh block with an image chat")
	}
	for _, tool := range []string{"bash", "curl", "base64"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed: %v", tool, err)
		}
	}
	base := serveModel(t, visionServeDir(t))
	work := t.TempDir()
	if err := os.WriteFile(filepath.Join(work, "cat.png"), gradientPNG(t, 40, 30), 0o644); err != nil {
		t.Fatal(err)
	}
	script := strings.ReplaceAll(block, "http://127.0.0.1:8000", base)
	script = strings.ReplaceAll(script, "127.0.0.1:8000", strings.TrimPrefix(base, "http://"))
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", script)
	cmd.Dir = work
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("README image example: %v\n%s", err, out)
	}
	var resp struct {
		Choices []struct {
			Message struct {
				Content *string `json:"content"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal(out, &resp); err != nil || len(resp.Choices) != 1 || resp.Choices[0].Message.Content == nil || resp.Usage.PromptTokens < 10 {
		t.Fatalf("README image example answered %s (%v), want a chat completion with the image's tokens in the prompt", out, err)
	}
}

// TestServeImagesGolden: `tpfleet serve` at TP=2 of the HF vision fixture (testdata/vision/model: a tiny
// Llama4ForConditionalGeneration with 336-pixel tiles) answers gRPC Generate with the fixture's images
// with HF's greedy ids (prompts "one": a 500×300 image, 3 tiles; "two": two images, 5 tiles), and a
// streamed chat with an image with the ids of the local generate --image for the chat's prompt (it
// fails without the fixture: python3 scripts/fixtures/make_vision_fixtures.py --out testdata/vision).
func TestServeImagesGolden(t *testing.T) {
	gold, err := safetensors.OpenCheckpoint(filepath.Join(visionFixtures, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer gold.Close()
	dir := filepath.Join(visionFixtures, "model")
	readImage := func(name string) []byte {
		data, err := os.ReadFile(filepath.Join(visionFixtures, "images", name+".png"))
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, port, code, stderr := startServeOnFreePort(t, ctx, func(port string) []string {
		return []string{dir, "--tensor-parallel-size", "2", "--host", "127.0.0.1", "--port", port,
			"--listen", "127.0.0.1:0", "--log-level", "warn"}
	})
	cli := waitCoordinator(t, addr)
	for _, tc := range []struct {
		prompt, text string
		images       []string
	}{
		{"one", "<|image|>What is in this picture?", []string{"b_500x300"}},
		{"two", "Compare <|image|> with <|image|> please.", []string{"c_100x80", "d_1000x200"}},
	} {
		want64, _, err := gold.Int64s(tc.prompt + ".greedy_ids")
		if err != nil {
			t.Fatal(err)
		}
		want := make([]int, len(want64))
		for i, id := range want64 {
			want[i] = int(id)
		}
		var images [][]byte
		for _, name := range tc.images {
			images = append(images, readImage(name))
		}
		res, err := cli.Generate(ctx, client.GenerateRequest{Prompt: tc.text, Images: images, MaxTokens: len(want),
			Sampling: &sample.Params{TopP: 1}, IgnoreEOS: true}, nil)
		if err != nil || !slices.Equal(res.IDs, want) {
			t.Errorf("prompt %s: served greedy ids %v, %v; HF %v", tc.prompt, res.IDs, err, want)
		}
		t.Logf("prompt %s: %d prompt tokens, served ids %v, HF %v", tc.prompt, res.PromptTokens, res.IDs, want)
	}

	img := filepath.Join(visionFixtures, "images", "b_500x300.png")
	wantChat, _ := imageChatWant(t, dir, img, 6)
	chat := map[string]any{"stream": true, "return_token_ids": true, "temperature": 0, "max_tokens": 6, "ignore_eos": true,
		"messages": []any{map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "image_url", "image_url": map[string]any{"url": "data:image/png;base64," + base64.StdEncoding.EncodeToString(readImage("b_500x300"))}},
			map[string]any{"type": "text", "text": imageQuestion},
		}}}}
	ids, text, status, body := chatStream(t, "http://127.0.0.1:"+port, chat)
	if status != http.StatusOK || !slices.Equal(ids, wantChat) {
		t.Errorf("streamed image chat = %d %s, ids %v; want the local generate --image ids %v", status, body, ids, wantChat)
	}
	t.Logf("streamed image chat: ids %v text %q", ids, text)
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d, want 0:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s")
	}
}
