package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/tokenizer"
)

// fixtureWithTokenizer copies a fixture and adds the test tokenizer (testdata/tokenizer, ids below
// 512) to the copy, in a directory of the fixture's name.
func fixtureWithTokenizer(t *testing.T, name string) (string, *tokenizer.Tokenizer) {
	t.Helper()
	dir := copyFixture(t, name)
	for _, f := range []string{tokenizer.TokenizerFile, tokenizer.ConfigFile} {
		data, err := os.ReadFile(filepath.Join("../../testdata/tokenizer", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, tok
}

// generateJSONOf runs `tpfleet generate args...` and decodes its --json output.
func generateJSONOf(t *testing.T, args ...string) generateOutput {
	t.Helper()
	code, stdout, stderr := tpfleet(t, append([]string{"generate", "--json"}, args...)...)
	var out generateOutput
	if err := json.Unmarshal([]byte(stdout), &out); code != 0 || err != nil {
		t.Fatalf("generate %v = exit %d, %q (%v); stderr:\n%s", args, code, stdout, err, stderr)
	}
	return out
}

// TestGenerateText: with a tokenizer in the model directory, `generate --prompt` encodes the text with
// BOS, prints the generated text (JSON: ids and text), and gives the ids of `--ids` with the text's
// ids; served by `tpfleet serve`, `generate --addr --prompt` gives the same. --ids and --prompt are
// mutually exclusive, and --prompt needs a tokenizer.
func TestGenerateText(t *testing.T) {
	model, tok := fixtureWithTokenizer(t, "moe-top1")
	const text = "Hello, world!"
	promptIDs := tok.Encode(text, true)
	flags := []string{"--max-tokens", "8", "--temperature", "0", "--ignore-eos"}

	local := generateJSONOf(t, append([]string{"--model", model, "--prompt", text}, flags...)...)
	want, err := tok.Decode(local.IDs, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(local.IDs) != 8 || local.PromptTokens != len(promptIDs) || local.Text != want || want == "" {
		t.Fatalf("generate --prompt %q --json = %+v, want 8 ids, %d prompt tokens, text %q", text, local, len(promptIDs), want)
	}
	byIDs := generateJSONOf(t, append([]string{"--model", model, "--ids", joinIDs(promptIDs)}, flags...)...)
	if !slices.Equal(byIDs.IDs, local.IDs) || byIDs.Text != want {
		t.Errorf("generate --ids %v = %+v, want the ids and text of --prompt: %v, %q", promptIDs, byIDs, local.IDs, want)
	}
	code, stdout, stderr := tpfleet(t, append([]string{"generate", "--model", model, "--prompt", text}, flags...)...)
	if code != 0 || stdout != want+"\n" {
		t.Errorf("generate --prompt (plain) = %d, %q (%s), want 0, %q", code, stdout, stderr, want+"\n")
	}

	// The same through a coordinator.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, exit, serveErr := startServe(t, ctx, "--model", model, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--log-level", "warn")
	cli := waitCoordinator(t, addr)
	remote := generateJSONOf(t, append([]string{"--addr", addr, "--prompt", text}, flags...)...)
	if !slices.Equal(remote.IDs, local.IDs) || remote.Text != want || remote.PromptTokens != len(promptIDs) {
		t.Errorf("generate --addr --prompt --json = %+v, want %+v", remote, local)
	}
	remote = generateJSONOf(t, append([]string{"--addr", addr, "--ids", joinIDs(promptIDs)}, flags...)...)
	if !slices.Equal(remote.IDs, local.IDs) || remote.Text != want {
		t.Errorf("generate --addr --ids --json = %+v, want %+v", remote, local)
	}
	code, stdout, stderr = tpfleet(t, append([]string{"generate", "--addr", addr, "--prompt", text}, flags...)...)
	if code != 0 || stdout != want+"\n" {
		t.Errorf("generate --addr --prompt (plain) = %d, %q (%s), want 0, %q", code, stdout, stderr, want+"\n")
	}
	if ids, err := cli.Tokenize(ctx, "", text, true); err != nil || !slices.Equal(ids, promptIDs) {
		t.Errorf("Tokenize(%q) = %v, %v; want %v", text, ids, err, promptIDs)
	}
	cancel()
	select {
	case c := <-exit:
		if c != 0 {
			t.Errorf("serve exited %d, want 0:\n%s", c, serveErr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s of its context ending")
	}

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"generate", "--model", model, "--ids", "1", "--prompt", "x"}, 2, "mutually exclusive"},
		{[]string{"generate", "--addr", "127.0.0.1:1", "--ids", "1", "--prompt", "x"}, 2, "mutually exclusive"},
		{[]string{"generate", "--model", model}, 2, "give the prompt as --ids or --prompt"},
		{[]string{"generate", "--model", model, "--prompt", ""}, 2, "--prompt is empty"},
		{[]string{"generate", "--model", filepath.Join(fixtures, "moe-top1"), "--prompt", "x"}, 1, "--prompt needs the model's tokenizer"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("tpfleet %s = exit %d, %q; want %d and one line with %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}
