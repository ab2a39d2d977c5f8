package tokenizer

import (
	"errors"
	"os"
	"testing"
	"unicode/utf8"
)

// FuzzRoundTrip checks that Decode(Encode(s)) gives s back (invalid UTF-8 comes back as U+FFFD), that
// every id is valid, and that streaming decode agrees with Decode. Its seeds run in go test.
func FuzzRoundTrip(f *testing.F) {
	for _, c := range roundTripCases {
		f.Add(c.text)
	}
	for _, s := range []string{"\xff", "a\xe2\x82", "\xed\xa0\x80x", "<|eot", "<|eot|><|eot|>", " \r\n \n\t ", "'S'T'RE'VE", "\u0301\u0301a"} {
		f.Add(s)
	}
	tk := loadTiny(f)
	f.Fuzz(func(t *testing.T, s string) {
		ids := tk.Encode(s, true)
		if bos, _ := tk.BOS(); len(ids) == 0 || ids[0] != bos {
			t.Fatalf("Encode(%q, true) = %v, want BOS first", s, ids)
		}
		for _, id := range ids {
			if !tk.validID(id) {
				t.Fatalf("Encode(%q) has invalid id %d", s, id)
			}
		}
		got, err := tk.Decode(ids[1:], false)
		if err != nil {
			t.Fatalf("Decode: %v", err)
		}
		want := s
		if !utf8.ValidString(s) {
			b, _ := appendLossy(nil, []byte(s), true)
			want = string(b)
		}
		if got != want {
			t.Fatalf("Decode(Encode(%q)) = %q, want %q", s, got, want)
		}
		_, streamed := streamDecode(t, tk, ids[1:], false)
		if streamed != got {
			t.Fatalf("streamed decode of Encode(%q) = %q, Decode = %q", s, streamed, got)
		}
	})
}

// FuzzParse feeds tokenizer.json and tokenizer_config.json files (outside input: any checkpoint
// directory) to the parser: each is parsed or refused with an error wrapping ErrMalformed or
// ErrUnsupported, never a panic; a parsed tokenizer encodes text to valid ids and decodes them. Its
// seeds, run in go test, are the tiny tokenizer and broken variants of it.
func FuzzParse(f *testing.F) {
	tok, err := os.ReadFile("testdata/tiny/" + TokenizerFile)
	if err != nil {
		f.Fatal(err)
	}
	cfg, err := os.ReadFile("testdata/tiny/" + ConfigFile)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(tok, cfg)
	f.Add(tok, []byte(`{}`))
	f.Add(tok, []byte(`{"bos_token": {"content": "<|nope|>"}}`))
	f.Add([]byte(`{}`), []byte(nil))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":["a b"]}}`), []byte(nil))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"added_tokens":[{"id":5,"content":"<x>","special":true}]}`), []byte(nil))
	f.Add([]byte(`{"model":{"type":"WordPiece"}}`), []byte(nil))
	f.Fuzz(func(t *testing.T, tokJSON, cfgJSON []byte) {
		tk, err := parseTokenizer(tokJSON)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("parseTokenizer = %v, want ErrMalformed or ErrUnsupported", err)
			}
			return
		}
		if cfgJSON != nil {
			if _, err := tk.applyConfig(cfgJSON); err != nil {
				if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnsupported) {
					t.Fatalf("applyConfig = %v, want ErrMalformed or ErrUnsupported", err)
				}
				return
			}
		}
		ids := tk.Encode("Hello, world! 123 <|eot|>\n\tüñí", false)
		for _, id := range ids {
			if !tk.validID(id) {
				t.Fatalf("Encode gave invalid id %d", id)
			}
		}
		if _, err := tk.Decode(ids, false); err != nil {
			t.Fatalf("Decode(Encode(...)) = %v", err)
		}
	})
}
