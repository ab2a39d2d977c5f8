// Package tinybpe builds small Llama-4-style tokenizer.json and tokenizer_config.json files for tests: a
// byte-level BPE vocabulary learned from a tiny built-in corpus by a plain BPE trainer, Llama 4's
// pre-tokenizer pattern and special tokens, and Llama 4's chat template.
//
// It is test support only. It deliberately shares no code with package tokenizer (its byte-to-unicode
// table and pre-tokenizer loop are written again here), so the tokenizer's tests check the tokenizer
// against an independent writer of the format.
package tinybpe

import (
	_ "embed" // the Llama 4 chat template
	"fmt"
	"sort"
	"unicode/utf8"

	"github.com/dlclark/regexp2"
)

// Llama4Pattern is the o200k-style Split regex of Llama 4's tokenizer.json (llama4-spec §5.4).
const Llama4Pattern = `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`

// Llama4ChatTemplate is the chat_template Llama 4 ships (transformers' Llama4Processor default, as in the
// instruct checkpoints' tokenizer_config.json).
//
//go:embed llama4_chat_template.jinja
var Llama4ChatTemplate string

// ByteLevel returns GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the other
// 68 bytes to U+0100 onwards in byte order.
func ByteLevel() [256]rune {
	var t [256]rune
	n := 0
	for b := range 256 {
		switch {
		case b >= '!' && b <= '~', b >= 0xA1 && b <= 0xAC, b >= 0xAE && b <= 0xFF:
			t[b] = rune(b)
		default:
			t[b] = rune(256 + n)
			n++
		}
	}
	return t
}

// Merge is one learned merge: the byte-level strings of its two parts.
type Merge [2]string

// Train learns byte-level BPE merges from corpus, pre-tokenized with pattern, until the vocabulary holds
// vocabSize tokens (the 256 byte tokens first, with id = byte value) or no pair is left. Ties between
// equally frequent pairs go to the pair whose strings sort first, so the result is deterministic.
// It returns the vocabulary in id order and the merges in rank order.
func Train(corpus, pattern string, vocabSize int) ([]string, []Merge, error) {
	if vocabSize < 256 {
		return nil, nil, fmt.Errorf("tinybpe: vocabulary size %d is below the 256 byte tokens", vocabSize)
	}
	re, err := regexp2.Compile(pattern, regexp2.None)
	if err != nil {
		return nil, nil, fmt.Errorf("tinybpe: pattern: %w", err)
	}
	counts := map[string]int{}
	runes := []rune(corpus)
	m, err := re.FindRunesMatch(runes)
	last := 0
	for ; err == nil && m != nil; m, err = re.FindNextMatch(m) {
		if m.Index > last {
			counts[string(runes[last:m.Index])]++
		}
		counts[string(runes[m.Index:m.Index+m.Length])]++
		last = m.Index + m.Length
	}
	if err != nil {
		return nil, nil, fmt.Errorf("tinybpe: split corpus: %w", err)
	}
	if last < len(runes) {
		counts[string(runes[last:])]++
	}

	table := ByteLevel()
	vocab := make([]string, 256, vocabSize)
	ids := map[string]int{}
	for b := range 256 {
		vocab[b] = string(table[b])
		ids[vocab[b]] = b
	}
	type word struct {
		syms []int
		freq int
	}
	pieces := make([]string, 0, len(counts))
	for p := range counts {
		pieces = append(pieces, p)
	}
	sort.Strings(pieces)
	words := make([]word, len(pieces))
	for i, p := range pieces {
		syms := make([]int, len(p))
		for j := range len(p) {
			syms[j] = int(p[j])
		}
		words[i] = word{syms, counts[p]}
	}

	var merges []Merge
	for len(vocab) < vocabSize {
		pairs := map[[2]int]int{}
		for _, w := range words {
			for j := 0; j+1 < len(w.syms); j++ {
				pairs[[2]int{w.syms[j], w.syms[j+1]}] += w.freq
			}
		}
		best, bestN := [2]int{}, 0
		for p, n := range pairs {
			if n > bestN || n == bestN && less(vocab, p, best) {
				best, bestN = p, n
			}
		}
		if bestN == 0 {
			break
		}
		tok := vocab[best[0]] + vocab[best[1]]
		id, ok := ids[tok]
		if !ok {
			id = len(vocab)
			vocab = append(vocab, tok)
			ids[tok] = id
		}
		merges = append(merges, Merge{vocab[best[0]], vocab[best[1]]})
		for i := range words {
			s := words[i].syms
			out := s[:0]
			for j := 0; j < len(s); j++ {
				if j+1 < len(s) && s[j] == best[0] && s[j+1] == best[1] {
					out = append(out, id)
					j++
					continue
				}
				out = append(out, s[j])
			}
			words[i].syms = out
		}
	}
	for _, v := range vocab {
		if !utf8.ValidString(v) {
			return nil, nil, fmt.Errorf("tinybpe: token %q is not valid UTF-8", v)
		}
	}
	return vocab, merges, nil
}

// less orders pairs by their strings.
func less(vocab []string, a, b [2]int) bool {
	if vocab[a[0]] != vocab[b[0]] {
		return vocab[a[0]] < vocab[b[0]]
	}
	return vocab[a[1]] < vocab[b[1]]
}
