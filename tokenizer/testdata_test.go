package tokenizer

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/tpfleet/tpfleet/tokenizer/internal/tinybpe"
)

var update = flag.Bool("update", false, "rewrite testdata/tiny and ../testdata/tokenizer")

// Directories holding the committed tiny tokenizer.
var tinyDirs = []string{"testdata/tiny", "../testdata/tokenizer"}

// TestTestdataUpToDate checks that the committed tiny tokenizer is what tinybpe builds; with -update it
// writes it.
func TestTestdataUpToDate(t *testing.T) {
	tok, cfg := tinyFiles(t)
	want := map[string][]byte{TokenizerFile: tok, ConfigFile: cfg}
	for _, dir := range tinyDirs {
		for name, data := range want {
			path := filepath.Join(dir, name)
			if *update {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, data, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go generate ./tokenizer)", err)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("%s differs from what tinybpe builds; run go generate ./tokenizer", path)
			}
		}
	}
}

var tiny = struct {
	once     sync.Once
	tok, cfg []byte
	err      error
}{}

// tinyFiles returns the tiny tokenizer's tokenizer.json and tokenizer_config.json.
func tinyFiles(t testing.TB) ([]byte, []byte) {
	t.Helper()
	tiny.once.Do(func() { tiny.tok, tiny.cfg, tiny.err = tinybpe.Build(tinybpe.TinyOptions()) })
	if tiny.err != nil {
		t.Fatal(tiny.err)
	}
	return tiny.tok, tiny.cfg
}

// writeDir writes files into a new temporary directory and returns it.
func writeDir(t testing.TB, files map[string][]byte) string {
	t.Helper()
	dir := t.TempDir()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// loadFiles writes files and loads them.
func loadFiles(t testing.TB, files map[string][]byte) *Tokenizer {
	t.Helper()
	tk, err := Load(writeDir(t, files))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return tk
}

// loadTiny loads the committed tiny tokenizer.
func loadTiny(t testing.TB) *Tokenizer {
	t.Helper()
	tk, err := Load("testdata/tiny")
	if err != nil {
		t.Fatalf("Load(testdata/tiny): %v", err)
	}
	return tk
}

var big = struct {
	once     sync.Once
	tok, cfg []byte
	err      error
}{}

// loadLlama4Layout loads a tokenizer with the tiny vocabulary but all 1134 of Llama 4's special tokens
// at their real ids from 200000.
func loadLlama4Layout(t testing.TB) *Tokenizer {
	t.Helper()
	big.once.Do(func() {
		o := tinybpe.TinyOptions()
		o.SpecialBase, o.Specials = 200000, tinybpe.Llama4Specials()
		big.tok, big.cfg, big.err = tinybpe.Build(o)
	})
	if big.err != nil {
		t.Fatal(big.err)
	}
	return loadFiles(t, map[string][]byte{TokenizerFile: big.tok, ConfigFile: big.cfg})
}
