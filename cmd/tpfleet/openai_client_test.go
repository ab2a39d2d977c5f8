package main

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// chatFixture is the fixture with a tokenizer and a chat template that `make run` serves.
const chatFixture = "../../testdata/serve/moe-top1-chat"

// openAIClientDir holds the official openai npm client's pinned install and its checks (test.mjs).
const openAIClientDir = "../../scripts/openai-client"

// serveChat runs `tpfleet serve` of the chat fixture at TP=2 with its gateway on a free port until the
// test ends; it returns the gateway's base URL.
func serveChat(t *testing.T, extra ...string) string {
	t.Helper()
	return serveModel(t, chatFixture, extra...)
}

// serveModel runs `tpfleet serve` of model at TP=2 with its gateway on a free port until the test ends;
// it returns the gateway's base URL.
func serveModel(t *testing.T, model string, extra ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addr, port, code, stderr := startServeOnFreePort(t, ctx, func(port string) []string {
		return append([]string{model, "--tensor-parallel-size", "2", "--host", "127.0.0.1", "--port", port,
			"--listen", "127.0.0.1:0", "--log-level", "warn"}, extra...)
	})
	t.Cleanup(func() {
		cancel()
		select {
		case c := <-code:
			if c != 0 {
				t.Errorf("serve exited %d, want 0:\n%s", c, stderr)
			}
		case <-time.After(30 * time.Second):
			t.Error("serve did not stop within 30s")
		}
	})
	waitCoordinator(t, addr)
	return "http://127.0.0.1:" + port
}

// TestOpenAINodeClient runs the official openai npm client (pinned in scripts/openai-client) against
// `tpfleet serve` of the chat fixture: completions and chat, whole and streamed, stop strings, logprobs,
// n = 3, seed reproducibility, a refused field. It needs node and the client installed (`make
// openai-client`); without them it skips, unless TPFLEET_OPENAI_CLIENT=1 (set by `make test`) makes that
// a failure.
func TestOpenAINodeClient(t *testing.T) {
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat(filepath.Join(openAIClientDir, "node_modules", "openai", "package.json"))
	}
	if err != nil {
		if os.Getenv("TPFLEET_OPENAI_CLIENT") == "1" {
			t.Fatalf("the openai npm client is not installed (%v): run make openai-client", err)
		}
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, exec.ErrNotFound) {
			t.Skipf("the openai npm client is not installed (%v): make openai-client installs it", err)
		}
		t.Fatal(err)
	}
	base := serveChat(t)
	// A checkpoint with a vision tower for the image chat, and the ids the local generate --image
	// decodes for it.
	vision := visionServeDir(t)
	imgFile := filepath.Join(t.TempDir(), "wide.png")
	if err := os.WriteFile(imgFile, gradientPNG(t, 56, 28), 0o644); err != nil {
		t.Fatal(err)
	}
	wantIDs, wantText := imageChatWant(t, vision, imgFile, 6)
	imageBase := serveModel(t, vision)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, "test.mjs")
	cmd.Dir = openAIClientDir
	wantJSON, _ := json.Marshal(wantIDs)
	abs, err := filepath.Abs(imgFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), "BASE_URL="+base, "IMAGE_BASE_URL="+imageBase, "IMAGE_FILE="+abs,
		"IMAGE_QUESTION="+imageQuestion, "IMAGE_WANT_IDS="+string(wantJSON), "IMAGE_WANT_TEXT="+wantText)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("node test.mjs against %s: %v\n%s", base, err, out)
	}
	t.Logf("node test.mjs:\n%s", out)
}
