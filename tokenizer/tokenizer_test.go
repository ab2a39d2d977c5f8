package tokenizer

import (
	"encoding/json"
	"errors"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/tpfleet/tpfleet/tokenizer/internal/tinybpe"
)

// roundTripCases are the texts of the HF comparison cases in go-deps §4.
var roundTripCases = []struct{ name, text string }{
	{"ascii", "Hello world! The quick brown fox jumps over the lazy dog."},
	{"contractions", "I'M here, you're there. DON'T STOP! It's fine; we'll see. They'VE gone, I'd say."},
	{"whitespace runs", "a  b   c    d\n\n\n   e \t f    "},
	{"crlf tab", "line one\r\nline two\r\n\tindented\r\n\r\n"},
	{"cjk", "你好，世界。我们的世界很大。日本語のテキスト。한국어"},
	{"arabic", "مرحبا بالعالم. العالم كبير."},
	{"emoji zwj", "family 👨‍👩‍👧‍👦, wave 👋🏽, flag 🏳️‍🌈, heart ❤️"},
	{"specials inline", "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi there<|eot|><|header_start|>assistant<|header_end|>\n\n"},
	{"repeated 300", strings.Repeat("a", 300)},
	{"repeated 300 multibyte", strings.Repeat("é", 300)},
	{"repeated 300 spaces", strings.Repeat(" ", 300) + "x"},
	{"digits", "1234567890 3.14159 2024-11-27"},
	{"code", "func main() {\n\tfmt.Println(\"hello, world\")\n}\n"},
	{"empty", ""},
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	for _, tk := range []struct {
		name string
		t    *Tokenizer
	}{{"tiny", loadTiny(t)}, {"llama4-ids", loadLlama4Layout(t)}} {
		bos, _ := tk.t.BOS()
		for _, c := range roundTripCases {
			t.Run(tk.name+"/"+c.name, func(t *testing.T) {
				ids := tk.t.Encode(c.text, false)
				for _, id := range ids {
					if id < 0 || id >= tk.t.VocabSize() {
						t.Fatalf("Encode(%q) has id %d outside [0, %d)", c.text, id, tk.t.VocabSize())
					}
				}
				got, err := tk.t.Decode(ids, false)
				if err != nil || got != c.text {
					t.Errorf("Decode(Encode(%q)) = %q, %v, want the text", c.text, got, err)
				}
				withBOS := tk.t.Encode(c.text, true)
				if len(withBOS) != len(ids)+1 || withBOS[0] != bos || !slices.Equal(withBOS[1:], ids) {
					t.Errorf("Encode(%q, true) = %v, want %d then %v", c.text, withBOS, bos, ids)
				}
				got, err = tk.t.Decode(withBOS, false)
				if err != nil || got != "<|begin_of_text|>"+c.text {
					t.Errorf("Decode(Encode(%q, true), false) = %q, %v", c.text, got, err)
				}
				skipped, err := tk.t.Decode(withBOS, true)
				want := c.text
				for _, s := range tinybpe.TinySpecials {
					want = strings.ReplaceAll(want, s, "")
				}
				if err != nil || skipped != want {
					t.Errorf("Decode(Encode(%q, true), true) = %q, %v, want %q", c.text, skipped, err, want)
				}
			})
		}
	}
}

func TestEncodeKnownIDs(t *testing.T) {
	tk := loadTiny(t)
	id := func(s string) int {
		t.Helper()
		v, ok := tk.TokenID(s)
		if !ok {
			t.Fatalf("TokenID(%q) not found", s)
		}
		return v
	}
	tests := []struct {
		text string
		want []int
	}{
		{"Hello world", []int{id("Hello"), id("Ġworld")}},
		{"Hello world<|eot|>", []int{id("Hello"), id("Ġworld"), id("<|eot|>")}},
		{"<|header_start|>", []int{id("<|header_start|>")}},
		{"123456", []int{id("123"), id("456")}},
		{"\n", []int{id("Ċ")}},
		{"", []int{}},
	}
	for _, tt := range tests {
		if got := tk.Encode(tt.text, false); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q, false) = %v, want %v", tt.text, got, tt.want)
		}
	}
	// Half a special token is ordinary text.
	if got := tk.Encode("<|header_start", false); slices.Contains(got, id("<|header_start|>")) || len(got) < 3 {
		t.Errorf("Encode(%q) = %v, want ordinary tokens", "<|header_start", got)
	}
	if got, want := tk.Encode("", true), []int{id("<|begin_of_text|>")}; !slices.Equal(got, want) {
		t.Errorf("Encode(\"\", true) = %v, want %v", got, want)
	}
}

// TestIDsComeFromFile loads the same vocabulary with special tokens at 490.. and at Llama 4's 200000..
// and checks every special id follows the file.
func TestIDsComeFromFile(t *testing.T) {
	tests := []struct {
		name                   string
		t                      *Tokenizer
		bos, eot, patch, vocab int
		last                   string
		lastID                 int
	}{
		{"tiny", loadTiny(t), 490, 498, 510, 512, "<|vision_reserved_special_token_0|>", 511},
		{"llama4-ids", loadLlama4Layout(t), 200000, 200008, 200092, 201134, "<|vision_reserved_special_token_1047|>", 201133},
	}
	for _, tt := range tests {
		if got, ok := tt.t.BOS(); got != tt.bos || !ok {
			t.Errorf("%s: BOS() = %d, %v, want %d, true", tt.name, got, ok, tt.bos)
		}
		if got := tt.t.EOS(); !slices.Equal(got, []int{tt.eot}) {
			t.Errorf("%s: EOS() = %v, want [%d]", tt.name, got, tt.eot)
		}
		if got, ok := tt.t.TokenID("<|patch|>"); got != tt.patch || !ok {
			t.Errorf("%s: TokenID(<|patch|>) = %d, %v, want %d", tt.name, got, ok, tt.patch)
		}
		if got, ok := tt.t.TokenID(tt.last); got != tt.lastID || !ok {
			t.Errorf("%s: TokenID(%s) = %d, %v, want %d", tt.name, tt.last, got, ok, tt.lastID)
		}
		if got := tt.t.VocabSize(); got != tt.vocab {
			t.Errorf("%s: VocabSize() = %d, want %d", tt.name, got, tt.vocab)
		}
		if got := tt.t.Encode("hi<|eot|>", true); got[0] != tt.bos || got[len(got)-1] != tt.eot {
			t.Errorf("%s: Encode(hi<|eot|>, true) = %v, want %d … %d", tt.name, got, tt.bos, tt.eot)
		}
		if s, ok := tt.t.Token(tt.eot); s != "<|eot|>" || !ok {
			t.Errorf("%s: Token(%d) = %q, %v, want <|eot|>", tt.name, tt.eot, s, ok)
		}
	}
	// Ids between the vocabulary and the special tokens name nothing.
	big := tests[1].t
	if _, err := big.Decode([]int{1000}, false); !errors.Is(err, ErrInvalidID) {
		t.Errorf("Decode([1000]) error = %v, want ErrInvalidID", err)
	}
	if _, ok := big.TokenID("<|vision_reserved_special_token_1048|>"); ok {
		t.Errorf("TokenID(<|vision_reserved_special_token_1048|>) found a token")
	}
}

// TestPreTokenizerSplits checks the o200k-style Split regex from the file against splits reasoned out
// from the pattern by hand.
func TestPreTokenizerSplits(t *testing.T) {
	tk := loadTiny(t)
	if len(tk.splits) != 1 {
		t.Fatalf("tiny tokenizer has %d Split steps, want 1", len(tk.splits))
	}
	tests := []struct {
		text string
		want []string
	}{
		{"Hello world", []string{"Hello", " world"}},
		{"I'M here", []string{"I'M", " here"}},
		{"I'll go", []string{"I'll", " go"}},
		{"don't", []string{"don't"}},
		{"DON'T stop", []string{"DON'T", " stop"}},
		{"WE'RE it's", []string{"WE'RE", " it's"}},
		{"he's'", []string{"he's", "'"}},
		{"HelloWorld", []string{"Hello", "World"}},
		{"CamelCASE", []string{"Camel", "CASE"}},
		{"  x", []string{" ", " x"}},
		{"a  b", []string{"a", " ", " b"}},
		{"   ", []string{"   "}},
		{"123456", []string{"123", "456"}},
		{"1234567", []string{"123", "456", "7"}},
		{"x=1+2;", []string{"x", "=", "1", "+", "2", ";"}},
		{"hello\n\nworld", []string{"hello", "\n\n", "world"}},
		{"x\r\n\ty", []string{"x", "\r\n", "\ty"}},
		{"abc  \n  def", []string{"abc", "  \n", " ", " def"}},
		{"...\n", []string{"...\n"}},
		{"path/to/file", []string{"path", "/to", "/file"}},
		{"你好世界", []string{"你好世界"}},
		{"مرحبا بالعالم", []string{"مرحبا", " بالعالم"}},
		{"👨‍👩‍👧", []string{"👨‍👩‍👧"}},
		{"Hello 👋 world", []string{"Hello", " 👋", " world"}},
		{"café naïve", []string{"café", " naïve"}},
		{"", nil},
	}
	for _, tt := range tests {
		var got []string
		splitIsolated(tk.splits[0], tt.text, func(p string) { got = append(got, p) })
		if !slices.Equal(got, tt.want) {
			t.Errorf("split(%q) = %q, want %q", tt.text, got, tt.want)
		}
	}
}

// TestSplitKeepsInvalidBytes checks that invalid UTF-8 is split on the original bytes.
func TestSplitKeepsInvalidBytes(t *testing.T) {
	tk := loadTiny(t)
	text := "ab\xffcd \xe2\x82 é"
	var got []string
	splitIsolated(tk.splits[0], text, func(p string) { got = append(got, p) })
	if strings.Join(got, "") != text {
		t.Errorf("split(%q) = %q, which does not add up to the text", text, got)
	}
}

func TestByteLevelAlphabet(t *testing.T) {
	tests := []struct {
		b    byte
		want rune
	}{{' ', 'Ġ'}, {'\n', 'Ċ'}, {'\t', 'ĉ'}, {'\r', 'č'}, {0, 'Ā'}, {'!', '!'}, {'~', '~'}, {0x7F, 'ġ'}, {0xAD, 'Ń'}, {0xFF, 'ÿ'}}
	for _, tt := range tests {
		if got := byteToRune[tt.b]; got != tt.want {
			t.Errorf("byteToRune[%#x] = %q, want %q", tt.b, got, tt.want)
		}
	}
	if want := tinybpe.ByteLevel(); byteToRune != want {
		t.Errorf("byteToRune differs from tinybpe.ByteLevel")
	}
}

// minimalFile returns the smallest tokenizer.json in Llama 4's layout: the 256 byte tokens, then extra
// tokens from id 256, the given merges, and <|begin_of_text|> as an added special token prepended by
// the post-processor.
func minimalFile(extra []string, merges [][2]string, ignoreMerges bool) map[string]any {
	vocab := map[string]any{}
	for b := range 256 {
		vocab[string(byteToRune[b])] = b
	}
	for i, s := range extra {
		vocab[s] = 256 + i
	}
	bosID := 256 + len(extra)
	return map[string]any{
		"version": "1.0", "truncation": nil, "padding": nil,
		"added_tokens": []any{
			map[string]any{"id": bosID, "content": "<|begin_of_text|>", "special": true},
		},
		"normalizer": nil,
		"pre_tokenizer": map[string]any{"type": "Sequence", "pretokenizers": []any{
			map[string]any{"type": "Split", "pattern": map[string]any{"Regex": tinybpe.Llama4Pattern}, "behavior": "Isolated", "invert": false},
			map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
		}},
		"post_processor": map[string]any{"type": "TemplateProcessing",
			"single": []any{
				map[string]any{"SpecialToken": map[string]any{"id": "<|begin_of_text|>", "type_id": 0}},
				map[string]any{"Sequence": map[string]any{"id": "A", "type_id": 0}},
			},
			"special_tokens": map[string]any{"<|begin_of_text|>": map[string]any{"id": "<|begin_of_text|>", "ids": []int{bosID}, "tokens": []string{"<|begin_of_text|>"}}},
		},
		"decoder": map[string]any{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
		"model": map[string]any{"type": "BPE", "dropout": nil, "unk_token": nil, "continuing_subword_prefix": nil,
			"end_of_word_suffix": nil, "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignoreMerges,
			"vocab": vocab, "merges": merges},
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestIgnoreMerges(t *testing.T) {
	// "abc" is in the vocabulary, but no merge makes it: "b c" (rank 0) wins over "a b", and nothing
	// merges "a" with "bc".
	extra := []string{"ab", "bc", "abc"}
	merges := [][2]string{{"b", "c"}, {"a", "b"}}
	tests := []struct {
		ignore bool
		text   string
		want   []int
	}{
		{true, "abc", []int{258}},
		{false, "abc", []int{'a', 257}},
		{true, "abcabc", []int{'a', 257, 'a', 257}}, // one piece, not in the vocabulary: merges apply
		{true, "ab", []int{256}},
		{false, "ab", []int{256}},
		{true, "xab abc", []int{'x', 256, ' ', 'a', 257}}, // neither "xab" nor " abc" is in the vocabulary
	}
	for _, tt := range tests {
		tk := loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, minimalFile(extra, merges, tt.ignore))})
		if got := tk.Encode(tt.text, false); !slices.Equal(got, tt.want) {
			t.Errorf("ignore_merges=%v: Encode(%q) = %v, want %v", tt.ignore, tt.text, got, tt.want)
		}
	}
}

// TestMergeOrder checks that merges apply by rank, leftmost first among equal pairs.
func TestMergeOrder(t *testing.T) {
	extra := []string{"aa", "aaa", "aaaa"}
	merges := [][2]string{{"a", "a"}, {"aa", "a"}, {"aa", "aa"}}
	tk := loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, minimalFile(extra, merges, false))})
	tests := []struct {
		text string
		want []int
	}{
		{"aaa", []int{257}},         // a a → aa, then aa a → aaa
		{"aaaa", []int{258}},        // a a at 0 and at 2 (both rank 0), then aa aa
		{"aaaaa", []int{256, 257}},  // aa aa a: "aa a" (rank 1) at 2 beats "aa aa" (rank 2) at 0
		{"aaaaaa", []int{258, 256}}, // aa aa aa: aa aa at 0 (rank 2) only
	}
	for _, tt := range tests {
		if got := tk.Encode(tt.text, false); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.text, got, tt.want)
		}
	}
}

func TestMergesAsStrings(t *testing.T) {
	o := tinybpe.TinyOptions()
	o.MergesAsStrings = true
	tokJSON, cfgJSON, err := tinybpe.Build(o)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tokJSON), `"Ġ t"`) {
		t.Fatalf("merges are not written as strings")
	}
	strs := loadFiles(t, map[string][]byte{TokenizerFile: tokJSON, ConfigFile: cfgJSON})
	pairs := loadTiny(t)
	for _, c := range roundTripCases {
		if got, want := strs.Encode(c.text, true), pairs.Encode(c.text, true); !slices.Equal(got, want) {
			t.Errorf("%s: Encode with string merges = %v, with pair merges %v", c.name, got, want)
		}
	}
}

func TestAddedTokenFlags(t *testing.T) {
	f := minimalFile(nil, nil, true)
	f["added_tokens"] = append(f["added_tokens"].([]any),
		map[string]any{"id": 300, "content": "<mask>", "lstrip": true, "special": true},
		map[string]any{"id": 301, "content": "<sep>", "rstrip": true},
		map[string]any{"id": 302, "content": "cat", "single_word": true},
	)
	tk := loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, f)})
	tests := []struct {
		text string
		want []int
	}{
		{"a <mask>", []int{'a', 300}},
		{"a  \t<mask>b", []int{'a', 300, 'b'}},
		{"<mask>", []int{300}},
		{"<sep>  b", []int{301, 'b'}},
		{"x<sep> <mask>", []int{'x', 301, 300}},
		{"cat dog", []int{302, ' ', 'd', 'o', 'g'}},
		{"a cat.", []int{'a', ' ', 302, '.'}},
		{"concat", []int{'c', 'o', 'n', 'c', 'a', 't'}},
		{"cats", []int{'c', 'a', 't', 's'}},
	}
	for _, tt := range tests {
		if got := tk.Encode(tt.text, false); !slices.Equal(got, tt.want) {
			t.Errorf("Encode(%q) = %v, want %v", tt.text, got, tt.want)
		}
	}
	// Only special tokens are skipped.
	if got, err := tk.Decode([]int{'a', 300, 301, 302}, true); got != "a<sep>cat" || err != nil {
		t.Errorf("Decode(skipSpecial) = %q, %v, want %q", got, err, "a<sep>cat")
	}
}

func TestAddedTokenLongestMatch(t *testing.T) {
	f := minimalFile(nil, nil, true)
	f["added_tokens"] = append(f["added_tokens"].([]any),
		map[string]any{"id": 300, "content": "<|a|>", "special": true},
		map[string]any{"id": 301, "content": "<|a|><|b|>", "special": true},
	)
	tk := loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, f)})
	if got, want := tk.Encode("<|a|><|b|><|a|>", false), []int{301, 300}; !slices.Equal(got, want) {
		t.Errorf("Encode = %v, want %v", got, want)
	}
}

func TestDecodeInvalidIDs(t *testing.T) {
	tk := loadTiny(t)
	for _, ids := range [][]int{{-1}, {512}, {1 << 40}, {72, 512}} {
		if got, err := tk.Decode(ids, false); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Decode(%v) = %q, %v, want ErrInvalidID", ids, got, err)
		}
	}
	d := tk.NewDecoder(false)
	if _, err := d.Add(512); !errors.Is(err, ErrInvalidID) {
		t.Errorf("Decoder.Add(512) error = %v, want ErrInvalidID", err)
	}
}

// byteIDs returns the single-byte token ids of s's bytes.
func byteIDs(tk *Tokenizer, s string) []int {
	ids := make([]int, len(s))
	for i := range len(s) {
		ids[i] = int(tk.byteIDs[s[i]])
	}
	return ids
}

func TestDecodeLossy(t *testing.T) {
	tk := loadTiny(t)
	// Expected values are Rust's String::from_utf8_lossy (one U+FFFD per maximal invalid subpart).
	tests := []struct{ in, want string }{
		{"abc", "abc"},
		{"\xe2\x82", "\uFFFD"},
		{"\xe2\x82\xac", "€"},
		{"\xff\xff", "\uFFFD\uFFFD"},
		{"\xf0\x90\x80", "\uFFFD"},
		{"\xf0\x90\x80A", "\uFFFDA"},
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // a surrogate
		{"\xc0\x80", "\uFFFD\uFFFD"},           // overlong
		{"\xf4\x90\x80\x80", "\uFFFD\uFFFD\uFFFD\uFFFD"},
		{"a\x80b", "a\uFFFDb"},
	}
	for _, tt := range tests {
		if got, err := tk.Decode(byteIDs(tk, tt.in), false); got != tt.want || err != nil {
			t.Errorf("Decode(bytes %q) = %q, %v, want %q", tt.in, got, err, tt.want)
		}
	}
}

// streamDecode feeds ids one at a time and checks every piece is valid UTF-8.
func streamDecode(t testing.TB, tk *Tokenizer, ids []int, skipSpecial bool) ([]string, string) {
	t.Helper()
	d := tk.NewDecoder(skipSpecial)
	var pieces []string
	var all strings.Builder
	for _, id := range ids {
		s, err := d.Add(id)
		if err != nil {
			t.Fatalf("Add(%d): %v", id, err)
		}
		if !utf8.ValidString(s) {
			t.Fatalf("Add(%d) = %q, not valid UTF-8", id, s)
		}
		pieces = append(pieces, s)
		all.WriteString(s)
	}
	s := d.Flush()
	pieces = append(pieces, s)
	all.WriteString(s)
	return pieces, all.String()
}

func TestDecoderStreaming(t *testing.T) {
	tk := loadTiny(t)
	// A 4-byte emoji as four single-byte tokens comes out whole with the last one.
	pieces, all := streamDecode(t, tk, byteIDs(tk, "a👋b"), false)
	if want := []string{"a", "", "", "", "👋", "b", ""}; !slices.Equal(pieces, want) {
		t.Errorf("stream(a👋b) = %q, want %q", pieces, want)
	}
	if all != "a👋b" {
		t.Errorf("stream(a👋b) joined = %q", all)
	}
	// An invalid byte is not held back; a truncated character ends as U+FFFD at Flush.
	pieces, _ = streamDecode(t, tk, byteIDs(tk, "\xe2A\xe2\x82"), false)
	if want := []string{"", "\uFFFDA", "", "", "\uFFFD"}; !slices.Equal(pieces, want) {
		t.Errorf("stream(\\xe2A\\xe2\\x82) = %q, want %q", pieces, want)
	}
	// Every round-trip text, streamed, gives what Decode gives, with and without special tokens.
	for _, c := range roundTripCases {
		ids := tk.Encode(c.text, true)
		for _, skip := range []bool{false, true} {
			want, _ := tk.Decode(ids, skip)
			if _, got := streamDecode(t, tk, ids, skip); got != want {
				t.Errorf("%s: stream(skip=%v) = %q, want %q", c.name, skip, got, want)
			}
		}
	}
	// Random byte soup, the hardest case for a streaming UTF-8 decoder.
	rng := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		ids := make([]int, rng.IntN(12))
		for i := range ids {
			ids[i] = rng.IntN(tk.VocabSize())
		}
		want, _ := tk.Decode(ids, false)
		if _, got := streamDecode(t, tk, ids, false); got != want {
			t.Fatalf("stream(%v) = %q, Decode = %q", ids, got, want)
		}
	}
}

func TestConcurrentEncode(t *testing.T) {
	tk := loadTiny(t)
	want := make([][]int, len(roundTripCases))
	for i, c := range roundTripCases {
		want[i] = tk.Encode(c.text, true)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				c := (g + i) % len(roundTripCases)
				if got := tk.Encode(roundTripCases[c].text, true); !slices.Equal(got, want[c]) {
					t.Errorf("concurrent Encode(%q) = %v, want %v", roundTripCases[c].text, got, want[c])
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(f map[string]any)
		raw     string // replaces the file when set
		want    error
		mention string
	}{
		{name: "not json", raw: "{", want: ErrMalformed},
		{name: "no model", mutate: func(f map[string]any) { delete(f, "model") }, want: ErrMalformed, mention: "no model"},
		{name: "model type", mutate: func(f map[string]any) { model(f)["type"] = "WordPiece" }, want: ErrUnsupported, mention: "WordPiece"},
		{name: "unigram", mutate: func(f map[string]any) { model(f)["type"] = "Unigram" }, want: ErrUnsupported, mention: "Unigram"},
		{name: "dropout", mutate: func(f map[string]any) { model(f)["dropout"] = 0.1 }, want: ErrUnsupported, mention: "dropout"},
		{name: "byte fallback", mutate: func(f map[string]any) { model(f)["byte_fallback"] = true }, want: ErrUnsupported, mention: "byte_fallback"},
		{name: "subword prefix", mutate: func(f map[string]any) { model(f)["continuing_subword_prefix"] = "##" }, want: ErrUnsupported, mention: "continuing_subword_prefix"},
		{name: "normalizer", mutate: func(f map[string]any) { f["normalizer"] = map[string]any{"type": "NFC"} }, want: ErrUnsupported, mention: "NFC"},
		{name: "normalizer in sequence", mutate: func(f map[string]any) {
			f["normalizer"] = map[string]any{"type": "Sequence", "normalizers": []any{map[string]any{"type": "Lowercase"}}}
		}, want: ErrUnsupported, mention: "Lowercase"},
		{name: "truncation", mutate: func(f map[string]any) { f["truncation"] = map[string]any{"max_length": 8} }, want: ErrUnsupported, mention: "truncation"},
		{name: "padding", mutate: func(f map[string]any) { f["padding"] = map[string]any{"strategy": "BatchLongest"} }, want: ErrUnsupported, mention: "padding"},
		{name: "no pre-tokenizer", mutate: func(f map[string]any) { f["pre_tokenizer"] = nil }, want: ErrUnsupported, mention: "pre_tokenizer"},
		{name: "metaspace", mutate: func(f map[string]any) { f["pre_tokenizer"] = map[string]any{"type": "Metaspace"} }, want: ErrUnsupported, mention: "Metaspace"},
		{name: "split behaviour", mutate: func(f map[string]any) { split(f)["behavior"] = "Removed" }, want: ErrUnsupported, mention: "Removed"},
		{name: "split invert", mutate: func(f map[string]any) { split(f)["invert"] = true }, want: ErrUnsupported, mention: "invert"},
		{name: "bad regex", mutate: func(f map[string]any) { split(f)["pattern"] = map[string]any{"Regex": "(("} }, want: ErrMalformed, mention: "(("},
		{name: "bytelevel use_regex", mutate: func(f map[string]any) { byteLevelPre(f)["use_regex"] = true }, want: ErrUnsupported, mention: "use_regex"},
		{name: "bytelevel prefix space", mutate: func(f map[string]any) { byteLevelPre(f)["add_prefix_space"] = true }, want: ErrUnsupported, mention: "add_prefix_space"},
		{name: "no bytelevel", mutate: func(f map[string]any) {
			f["pre_tokenizer"] = map[string]any{"type": "Split", "pattern": map[string]any{"Regex": "a"}, "behavior": "Isolated"}
		}, want: ErrUnsupported, mention: "ByteLevel"},
		{name: "no decoder", mutate: func(f map[string]any) { delete(f, "decoder") }, want: ErrUnsupported, mention: "decoder"},
		{name: "decoder type", mutate: func(f map[string]any) { f["decoder"] = map[string]any{"type": "WordPiece"} }, want: ErrUnsupported, mention: "WordPiece"},
		{name: "post-processor type", mutate: func(f map[string]any) { f["post_processor"] = map[string]any{"type": "RobertaProcessing"} }, want: ErrUnsupported, mention: "RobertaProcessing"},
		{name: "template unknown special", mutate: func(f map[string]any) {
			f["post_processor"].(map[string]any)["special_tokens"] = map[string]any{}
		}, want: ErrMalformed, mention: "<|begin_of_text|>"},
		{name: "template id names nothing", mutate: func(f map[string]any) {
			f["post_processor"].(map[string]any)["special_tokens"] = map[string]any{"<|begin_of_text|>": map[string]any{"ids": []int{9999}}}
		}, want: ErrMalformed, mention: "9999"},
		{name: "vocab misses a byte", mutate: func(f map[string]any) { delete(vocab(f), "Ġ") }, want: ErrMalformed, mention: "0x20"},
		{name: "duplicate id", mutate: func(f map[string]any) { vocab(f)["xyz"] = 65 }, want: ErrMalformed, mention: "share id 65"},
		{name: "negative id", mutate: func(f map[string]any) { vocab(f)["xyz"] = -3 }, want: ErrMalformed, mention: "-3"},
		{name: "huge id", mutate: func(f map[string]any) { vocab(f)["xyz"] = 1 << 40 }, want: ErrMalformed, mention: "xyz"},
		{name: "merge of unknown token", mutate: func(f map[string]any) { model(f)["merges"] = []any{[]string{"a", "zz"}} }, want: ErrMalformed, mention: `"zz"`},
		{name: "merge result unknown", mutate: func(f map[string]any) { model(f)["merges"] = []any{"a b"} }, want: ErrMalformed, mention: `"ab"`},
		{name: "merge string", mutate: func(f map[string]any) { model(f)["merges"] = []any{"ab"} }, want: ErrMalformed, mention: "merge 0"},
		{name: "merge triple", mutate: func(f map[string]any) { model(f)["merges"] = []any{[]string{"a", "b", "c"}} }, want: ErrMalformed, mention: "merge 0"},
		{name: "added token id clash", mutate: func(f map[string]any) {
			f["added_tokens"] = append(f["added_tokens"].([]any), map[string]any{"id": 65, "content": "<x>"})
		}, want: ErrMalformed, mention: "<x>"},
		{name: "added token in vocab elsewhere", mutate: func(f map[string]any) {
			f["added_tokens"] = append(f["added_tokens"].([]any), map[string]any{"id": 300, "content": "A"})
		}, want: ErrMalformed, mention: `"A"`},
		{name: "added token without id", mutate: func(f map[string]any) {
			f["added_tokens"] = append(f["added_tokens"].([]any), map[string]any{"content": "<x>"})
		}, want: ErrMalformed, mention: "no id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := []byte(tt.raw)
			if tt.raw == "" {
				f := minimalFile(nil, nil, true)
				tt.mutate(f)
				data = mustJSON(t, f)
			}
			dir := writeDir(t, map[string][]byte{TokenizerFile: data})
			_, err := Load(dir)
			checkLoadError(t, err, filepath.Join(dir, TokenizerFile), tt.want, tt.mention)
		})
	}
}

func TestLoadConfigErrors(t *testing.T) {
	tokJSON, _ := tinyFiles(t)
	tests := []struct {
		name, config string
		want         error
		mention      string
	}{
		{"not json", "[", ErrMalformed, ""},
		{"unknown bos", `{"bos_token": "<s>"}`, ErrMalformed, "<s>"},
		{"unknown eos object", `{"eos_token": {"content": "</s>"}}`, ErrMalformed, "</s>"},
		{"bos not a string", `{"bos_token": 7}`, ErrMalformed, "bos_token"},
		{"clean up spaces", `{"clean_up_tokenization_spaces": true}`, ErrUnsupported, "clean_up_tokenization_spaces"},
		{"added token mismatch", `{"added_tokens_decoder": {"490": {"content": "<s>", "special": true}}}`, ErrMalformed, "<s>"},
		{"added token key", `{"added_tokens_decoder": {"x": {"content": "<s>"}}}`, ErrMalformed, `"x"`},
		{"added token in vocab", `{"added_tokens_decoder": {"300": {"content": "<s>"}}}`, ErrMalformed, "<s>"},
		{"template syntax", `{"chat_template": "{% if %}"}`, ErrChatTemplate, "compile"},
		{"template list without default", `{"chat_template": [{"name": "tool_use", "template": "x"}]}`, ErrUnsupported, "default"},
		{"template wrong type", `{"chat_template": 3}`, ErrMalformed, "chat_template"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := writeDir(t, map[string][]byte{TokenizerFile: tokJSON, ConfigFile: []byte(tt.config)})
			_, err := Load(dir)
			checkLoadError(t, err, filepath.Join(dir, ConfigFile), tt.want, tt.mention)
		})
	}
	_, err := Load(t.TempDir())
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(empty dir) error = %v, want fs.ErrNotExist", err)
	}
}

func TestConfigAddsTokens(t *testing.T) {
	tokJSON, _ := tinyFiles(t)
	cfg := `{"added_tokens_decoder": {"490": {"content": "<|begin_of_text|>", "special": true}, "600": {"content": "<|new|>", "special": true}},
		"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|new|>"}`
	tk := loadFiles(t, map[string][]byte{TokenizerFile: tokJSON, ConfigFile: []byte(cfg)})
	if got, ok := tk.TokenID("<|new|>"); got != 600 || !ok {
		t.Errorf("TokenID(<|new|>) = %d, %v, want 600", got, ok)
	}
	if got := tk.Encode("a<|new|>", false); !slices.Equal(got, []int{'a', 600}) {
		t.Errorf("Encode(a<|new|>) = %v, want [97 600]", got)
	}
	if got := tk.EOS(); !slices.Equal(got, []int{600}) {
		t.Errorf("EOS() = %v, want [600]", got)
	}
	if got := tk.VocabSize(); got != 601 {
		t.Errorf("VocabSize() = %d, want 601", got)
	}
}

func TestNoConfig(t *testing.T) {
	tokJSON, _ := tinyFiles(t)
	tk := loadFiles(t, map[string][]byte{TokenizerFile: tokJSON})
	// BOS falls back to the post-processor's token; EOS is unknown.
	if got, ok := tk.BOS(); got != 490 || !ok {
		t.Errorf("BOS() = %d, %v, want 490, true", got, ok)
	}
	if got := tk.EOS(); len(got) != 0 {
		t.Errorf("EOS() = %v, want none", got)
	}
	f := minimalFile(nil, nil, true)
	f["post_processor"] = nil
	tk = loadFiles(t, map[string][]byte{TokenizerFile: mustJSON(t, f)})
	if got, ok := tk.BOS(); ok {
		t.Errorf("BOS() without post-processor = %d, true, want false", got)
	}
	if got := tk.Encode("a", true); !slices.Equal(got, []int{'a'}) {
		t.Errorf("Encode(a, true) without post-processor = %v, want [97]", got)
	}
}

func checkLoadError(t *testing.T, err error, path string, want error, mention string) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("Load error = %v, want %v", err, want)
	}
	var fe *FileError
	if !errors.As(err, &fe) || fe.Path != path {
		t.Errorf("Load error = %#v, want a *FileError for %s", err, path)
	}
	if !strings.Contains(err.Error(), mention) {
		t.Errorf("Load error %q does not mention %q", err, mention)
	}
}

func model(f map[string]any) map[string]any { return f["model"].(map[string]any) }
func vocab(f map[string]any) map[string]any { return model(f)["vocab"].(map[string]any) }
func split(f map[string]any) map[string]any {
	return f["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[0].(map[string]any)
}
func byteLevelPre(f map[string]any) map[string]any {
	return f["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[1].(map[string]any)
}

func BenchmarkEncode(b *testing.B) {
	tk := loadTiny(b)
	var text strings.Builder
	for _, c := range roundTripCases {
		text.WriteString(c.text)
	}
	s := strings.Repeat(text.String(), 20)
	b.SetBytes(int64(len(s)))
	for b.Loop() {
		tk.Encode(s, true)
	}
}
