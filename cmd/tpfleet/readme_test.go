package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readmeBlocks returns the fenced code blocks of README.md in the given language, in order.
func readmeBlocks(t *testing.T, lang string) []string {
	t.Helper()
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []string
	var cur *strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		switch {
		case cur == nil && line == "```"+lang:
			cur = &strings.Builder{}
		case cur != nil && line == "```":
			blocks = append(blocks, cur.String())
			cur = nil
		case cur != nil:
			cur.WriteString(line + "\n")
		}
	}
	return blocks
}

// shellWords splits a command line of words and single-quoted strings, as the README's commands are
// written (backslash-newline continues a line).
func shellWords(line string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for _, r := range line {
		switch {
		case quoted && r == '\'':
			quoted = false
		case quoted:
			w.WriteRune(r)
		case r == '\'':
			quoted, inWord = true, true
		case r == ' ' || r == '\t' || r == '\n':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote in %q", line)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words, nil
}

// curl runs a README curl command (curl -s URL [-H 'K: V'] [-d BODY]) with net/http: it returns the
// status and body.
func curl(t *testing.T, words []string) (int, []byte) {
	t.Helper()
	var url, body string
	hdr := http.Header{}
	for i := 1; i < len(words); i++ {
		switch words[i] {
		case "-s":
		case "-H":
			i++
			k, v, _ := strings.Cut(words[i], ":")
			hdr.Set(k, strings.TrimSpace(v))
		case "-d":
			i++
			body = words[i]
		default:
			if url != "" {
				t.Fatalf("curl %v: two URLs", words)
			}
			url = "http://" + strings.TrimPrefix(words[i], "http://")
		}
	}
	method := http.MethodGet
	if body != "" {
		method = http.MethodPost
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = hdr
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, data
}

// TestREADMEExamples runs the README's examples against `tpfleet serve` of the chat fixture, on free
// ports in place of the README's: each curl answers 200 with JSON, each tpfleet command exits 0, and the
// openai client example (when the client is installed: see TestOpenAINodeClient) prints text.
func TestREADMEExamples(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var listen, etcd string
	addr, port, code, stderr := startServeOnFreePort(t, ctx, func(port string) []string {
		listen, etcd = freePort(t), freePort(t)
		return []string{chatFixture, "--tensor-parallel-size", "2", "--host", "127.0.0.1", "--port", port,
			"--listen", listen, "--etcd-listen", etcd, "--log-level", "warn"}
	})
	waitCoordinator(t, addr)
	local := strings.NewReplacer("127.0.0.1:8000", "127.0.0.1:"+port, "127.0.0.1:7070", listen, "127.0.0.1:2379", etcd)

	blocks := readmeBlocks(t, "sh")
	if len(blocks) < 2 {
		t.Fatalf("README has %d sh blocks, want the run and the client examples", len(blocks))
	}
	commands := strings.Split(strings.ReplaceAll(blocks[1], "\\\n", " "), "\n")
	ran := map[string]int{}
	for _, line := range commands {
		line = strings.TrimSpace(local.Replace(line))
		if line == "" {
			continue
		}
		words, err := shellWords(line)
		if err != nil {
			t.Fatal(err)
		}
		switch words[0] {
		case "curl":
			status, data := curl(t, words)
			if status != http.StatusOK || !json.Valid(data) || bytes.Contains(data, []byte(`"error"`)) {
				t.Errorf("%s = %d %s, want 200 and a JSON answer", line, status, data)
			}
		case "bin/tpfleet":
			if exit, stdout, errOut := tpfleet(t, words[1:]...); exit != 0 || stdout == "" {
				t.Errorf("%s = exit %d, %q %q; want 0 and output", line, exit, stdout, errOut)
			}
		default:
			t.Errorf("README example %q: no way to run %s", line, words[0])
		}
		ran[words[0]]++
	}
	if ran["curl"] < 2 || ran["bin/tpfleet"] < 1 {
		t.Errorf("ran %v from the README's second sh block, want the curl chat and completion examples and tpfleet", ran)
	}

	js := readmeBlocks(t, "js")
	if len(js) != 1 {
		t.Fatalf("README has %d js blocks, want the openai client example", len(js))
	}
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat(filepath.Join(openAIClientDir, "node_modules", "openai", "package.json"))
	}
	switch {
	case err != nil && os.Getenv("TPFLEET_OPENAI_CLIENT") == "1":
		t.Errorf("the openai npm client is not installed (%v): run make openai-client", err)
	case err != nil:
		t.Logf("the README's openai client example not run: %v (make openai-client installs the client)", err)
	default:
		// In the client's directory, so that import 'openai' resolves; removed at the end.
		f, err := os.CreateTemp(openAIClientDir, "readme-*.mjs")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(f.Name()) })
		if _, err := f.WriteString(local.Replace(js[0])); err != nil {
			t.Fatal(err)
		}
		f.Close()
		nctx, ncancel := context.WithTimeout(ctx, time.Minute)
		defer ncancel()
		out, err := exec.CommandContext(nctx, node, f.Name()).CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) == 0 {
			t.Errorf("node README's openai example: %v\n%s", err, out)
		}
	}
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Error("serve did not stop within 30s")
	}
}
