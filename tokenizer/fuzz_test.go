package tokenizer

import (
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
