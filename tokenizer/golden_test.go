package tokenizer_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/tokenizer"
)

// TestHFGolden compares encodings and decodings of testdata/tokenizer with HF tokenizers' own, recorded by
// scripts/fixtures/make_tokenizer_golden.py where the tokenizers library is installed.
func TestHFGolden(t *testing.T) {
	dir := filepath.Join("..", "testdata", "tokenizer")
	data, err := os.ReadFile(filepath.Join(dir, "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var golden struct {
		Tokenizers string `json:"tokenizers"`
		Cases      []struct {
			Text               string `json:"text"`
			IDs                []int  `json:"ids"`
			IDsNoSpecial       []int  `json:"ids_no_special"`
			Decoded            string `json:"decoded"`
			DecodedSkipSpecial string `json:"decoded_skip_special"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(data, &golden); err != nil {
		t.Fatal(err)
	}
	if len(golden.Cases) < 10 {
		t.Fatalf("golden.json has %d cases, want at least 10", len(golden.Cases))
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range golden.Cases {
		if got := tok.Encode(c.Text, true); !slices.Equal(got, c.IDs) {
			t.Errorf("Encode(%q, true) = %v, HF %s gives %v", c.Text, got, golden.Tokenizers, c.IDs)
		}
		if got := tok.Encode(c.Text, false); !slices.Equal(got, c.IDsNoSpecial) {
			t.Errorf("Encode(%q, false) = %v, HF gives %v", c.Text, got, c.IDsNoSpecial)
		}
		if got, err := tok.Decode(c.IDs, false); err != nil || got != c.Decoded {
			t.Errorf("Decode(%v, false) = %q, %v; HF gives %q", c.IDs, got, err, c.Decoded)
		}
		if got, err := tok.Decode(c.IDs, true); err != nil || got != c.DecodedSkipSpecial {
			t.Errorf("Decode(%v, true) = %q, %v; HF gives %q", c.IDs, got, err, c.DecodedSkipSpecial)
		}
	}
}
