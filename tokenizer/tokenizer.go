package tokenizer

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/ardanlabs/jinja"
	"github.com/dlclark/regexp2"
)

// Tokenizer turns text into token ids and back. It is immutable after [Load] and safe for concurrent
// use.
type Tokenizer struct {
	tokens   []token        // by id; gaps (ids no token uses) have valid == false
	vocab    map[string]int // model vocabulary: byte-level string → id
	rawVocab map[string]int // the same tokens by the bytes they stand for (for ignore_merges)
	addedIDs map[string]int // added tokens: content → id
	addedRE  *regexp.Regexp // alternation of all added tokens, longest first; nil without any
	merges   map[uint64]merge
	byteIDs  [256]int32 // id of each single-byte token

	ignoreMerges bool
	splits       []*regexp2.Regexp // pre-tokenizer Split steps, in order

	prefix, suffix []int // ids the post-processor puts around the text

	bos                          int // -1: none
	eos                          []int
	bosToken, eosToken, padToken string

	template *jinja.Template // nil: Llama 4's format, written in Go

	cache pieceCache
}

// token is one vocabulary entry or added token.
type token struct {
	text  string // as in tokenizer.json (byte-level for vocabulary tokens)
	bytes []byte // what Decode writes for it
	valid bool

	added, special             bool
	lstrip, rstrip, singleWord bool
}

type merge struct {
	rank, id int32
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// VocabSize is one more than the largest token id: the number of embedding rows the ids need.
func (t *Tokenizer) VocabSize() int { return len(t.tokens) }

// TokenID returns the id of a token: an added token by its content ("<|eot|>") or a vocabulary token
// by its byte-level string ("Ġworld" for " world").
func (t *Tokenizer) TokenID(s string) (int, bool) {
	if id, ok := t.addedIDs[s]; ok {
		return id, true
	}
	id, ok := t.vocab[s]
	return id, ok
}

// Token returns the string of a token id, in the form [Tokenizer.TokenID] takes.
func (t *Tokenizer) Token(id int) (string, bool) {
	if !t.validID(id) {
		return "", false
	}
	return t.tokens[id].text, true
}

// BOS returns the id of the beginning-of-text token: tokenizer_config.json's bos_token, else the first
// token the post-processor prepends. ok is false when there is neither.
func (t *Tokenizer) BOS() (id int, ok bool) { return t.bos, t.bos >= 0 }

// EOS returns the ids of tokenizer_config.json's eos_token (none when it is absent). The model's
// generation_config.json may name more stop ids; it, not this, decides when generation ends.
func (t *Tokenizer) EOS() []int { return append([]int(nil), t.eos...) }

func (t *Tokenizer) validID(id int) bool { return id >= 0 && id < len(t.tokens) && t.tokens[id].valid }

// Encode returns the token ids of text. Added tokens that appear in text, special or not, become their
// own ids (HF's split_special_tokens=false); the rest is split by the pre-tokenizer regex and each piece
// is encoded by byte-level BPE. With addSpecial, the post-processor's tokens are added (for Llama 4,
// <|begin_of_text|> in front). Invalid UTF-8 in text is encoded byte for byte, so Decode returns
// it with U+FFFD in place of the invalid bytes.
func (t *Tokenizer) Encode(text string, addSpecial bool) []int {
	ids := make([]int, 0, len(text)/3+len(t.prefix)+len(t.suffix)+1)
	if addSpecial {
		ids = append(ids, t.prefix...)
	}
	start := 0
	for _, m := range t.findAdded(text) {
		ids = t.encodeOrdinary(text[start:m.start], ids)
		ids = append(ids, m.id)
		start = m.end
	}
	ids = t.encodeOrdinary(text[start:], ids)
	if addSpecial {
		ids = append(ids, t.suffix...)
	}
	return ids
}

// addedMatch is an added token found in the text; [start, end) includes whitespace its lstrip or
// rstrip flags absorb.
type addedMatch struct {
	id, start, end int
}

// findAdded finds the added tokens in text, honouring single_word, lstrip and rstrip as HF's
// AddedVocabulary does.
func (t *Tokenizer) findAdded(text string) []addedMatch {
	if t.addedRE == nil {
		return nil
	}
	locs := t.addedRE.FindAllStringIndex(text, -1)
	if len(locs) == 0 {
		return nil
	}
	out := make([]addedMatch, 0, len(locs))
	done := 0 // end of the previous match
	for _, loc := range locs {
		start, end := loc[0], loc[1]
		if start < done {
			continue // swallowed by the previous token's rstrip
		}
		id := t.addedIDs[text[start:end]]
		tok := &t.tokens[id]
		if tok.singleWord {
			before, _ := utf8.DecodeLastRuneInString(text[:start])
			after, _ := utf8.DecodeRuneInString(text[end:])
			if start > 0 && isWordChar(before) || end < len(text) && isWordChar(after) {
				continue
			}
		}
		if tok.lstrip {
			for start > done {
				r, n := utf8.DecodeLastRuneInString(text[:start])
				if !unicode.IsSpace(r) {
					break
				}
				start -= n
			}
		}
		if tok.rstrip {
			for end < len(text) {
				r, n := utf8.DecodeRuneInString(text[end:])
				if !unicode.IsSpace(r) {
					break
				}
				end += n
			}
		}
		out = append(out, addedMatch{id: id, start: start, end: end})
		done = end
	}
	return out
}

func isWordChar(r rune) bool { return unicode.IsLetter(r) || unicode.IsNumber(r) || r == '_' }

// encodeOrdinary appends the ids of text that holds no added token.
func (t *Tokenizer) encodeOrdinary(text string, ids []int) []int {
	if text == "" {
		return ids
	}
	t.pretokenize(text, 0, func(piece string) { ids = t.encodePiece(piece, ids) })
	return ids
}

// pretokenize runs the Split steps from step on, calling yield for each final piece.
func (t *Tokenizer) pretokenize(text string, step int, yield func(string)) {
	if step == len(t.splits) {
		yield(text)
		return
	}
	splitIsolated(t.splits[step], text, func(piece string) { t.pretokenize(piece, step+1, yield) })
}

// splitIsolated calls yield for each match of re in text and for each non-empty gap between matches,
// in order (HF's Split with behaviour Isolated).
func splitIsolated(re *regexp2.Regexp, text string, yield func(string)) {
	runes := []rune(text)
	// regexp2 reports rune positions; offs maps them to byte offsets. Invalid UTF-8 bytes are one
	// rune (U+FFFD) each, in []rune and in range alike, so the original bytes are kept.
	var offs []int
	if len(runes) != len(text) {
		offs = make([]int, 0, len(runes)+1)
		for i := range text {
			offs = append(offs, i)
		}
		offs = append(offs, len(text))
	}
	at := func(r int) int {
		if offs == nil {
			return r
		}
		return offs[r]
	}
	last := 0
	m, err := re.FindRunesMatch(runes)
	for ; err == nil && m != nil; m, err = re.FindNextMatch(m) {
		if m.Length == 0 {
			continue
		}
		start, end := at(m.Index), at(m.Index+m.Length)
		if start > last {
			yield(text[last:start])
		}
		yield(text[start:end])
		last = end
	}
	// err can only be a match timeout, and none is set; the rest is then one piece.
	if last < len(text) {
		yield(text[last:])
	}
}

// encodePiece appends the ids of one pre-tokenized piece.
func (t *Tokenizer) encodePiece(piece string, ids []int) []int {
	if len(piece) == 1 {
		return append(ids, int(t.byteIDs[piece[0]]))
	}
	if t.ignoreMerges {
		if id, ok := t.rawVocab[piece]; ok {
			return append(ids, id)
		}
	}
	if got, ok := t.cache.get(piece); ok {
		return append(ids, got...)
	}
	n := len(ids)
	ids = t.bpe(piece, ids)
	t.cache.put(piece, ids[n:])
	return ids
}

// symbol is one part of a piece during BPE: a token id in a doubly linked list.
type symbol struct {
	id         int32
	prev, next int32 // -1 at the ends
	gone       bool  // merged into its left neighbour
}

// candidate is a possible merge of the symbol at pos with its right neighbour.
type candidate struct {
	rank, pos, id int32
}

// bpe appends the ids of piece after applying merges lowest rank first (leftmost among equal ranks),
// exactly as HF's Word::merge_all.
func (t *Tokenizer) bpe(piece string, ids []int) []int {
	n := len(piece)
	syms := make([]symbol, n)
	for i := range n {
		syms[i] = symbol{id: t.byteIDs[piece[i]], prev: int32(i - 1), next: int32(i + 1)}
	}
	syms[n-1].next = -1
	var h candHeap
	for i := 0; i+1 < n; i++ {
		if m, ok := t.merges[pairKey(syms[i].id, syms[i+1].id)]; ok {
			h.push(candidate{m.rank, int32(i), m.id})
		}
	}
	for len(h) > 0 {
		c := h.pop()
		s := &syms[c.pos]
		if s.gone || s.next < 0 {
			continue
		}
		right := &syms[s.next]
		// The pair may have changed since c was queued; HF checks only that it still merges into c.id.
		if m, ok := t.merges[pairKey(s.id, right.id)]; !ok || m.id != c.id {
			continue
		}
		s.id = c.id
		right.gone = true
		s.next = right.next
		if s.next >= 0 {
			syms[s.next].prev = c.pos
		}
		if s.prev >= 0 {
			if m, ok := t.merges[pairKey(syms[s.prev].id, s.id)]; ok {
				h.push(candidate{m.rank, s.prev, m.id})
			}
		}
		if s.next >= 0 {
			if m, ok := t.merges[pairKey(s.id, syms[s.next].id)]; ok {
				h.push(candidate{m.rank, c.pos, m.id})
			}
		}
	}
	for i := int32(0); i >= 0; i = syms[i].next {
		ids = append(ids, int(syms[i].id))
	}
	return ids
}

// candHeap is a min-heap of candidates by (rank, pos).
type candHeap []candidate

func (h candHeap) less(i, j int) bool {
	if h[i].rank != h[j].rank {
		return h[i].rank < h[j].rank
	}
	return h[i].pos < h[j].pos
}

func (h *candHeap) push(c candidate) {
	*h = append(*h, c)
	s := *h
	for i := len(s) - 1; i > 0; {
		p := (i - 1) / 2
		if !s.less(i, p) {
			break
		}
		s[i], s[p] = s[p], s[i]
		i = p
	}
}

func (h *candHeap) pop() candidate {
	s := *h
	top := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s = s[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(s) && s.less(l, m) {
			m = l
		}
		if r < len(s) && s.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		s[i], s[m] = s[m], s[i]
		i = m
	}
	*h = s
	return top
}

// pieceCache remembers the ids of short pieces. It is bounded: when full it starts over.
type pieceCache struct {
	mu sync.RWMutex
	m  map[string][]int
}

const (
	cacheMaxEntries  = 1 << 16
	cacheMaxPieceLen = 64
)

func (c *pieceCache) get(piece string) ([]int, bool) {
	if len(piece) > cacheMaxPieceLen {
		return nil, false
	}
	c.mu.RLock()
	ids, ok := c.m[piece]
	c.mu.RUnlock()
	return ids, ok
}

func (c *pieceCache) put(piece string, ids []int) {
	if len(piece) > cacheMaxPieceLen {
		return
	}
	cp := append([]int(nil), ids...)
	c.mu.Lock()
	if len(c.m) >= cacheMaxEntries {
		clear(c.m)
	}
	c.m[strings.Clone(piece)] = cp // piece may point into a long text
	c.mu.Unlock()
}

// Decode returns the text of ids, leaving out special tokens when skipSpecial is set. Bytes that do
// not form valid UTF-8 become U+FFFD, one per maximal invalid sequence (as HF does). An id that names
// no token is an error wrapping [ErrInvalidID].
func (t *Tokenizer) Decode(ids []int, skipSpecial bool) (string, error) {
	var raw []byte
	for i, id := range ids {
		if !t.validID(id) {
			return "", fmt.Errorf("%w: %d at index %d (ids lie in [0, %d))", ErrInvalidID, id, i, len(t.tokens))
		}
		tok := &t.tokens[id]
		if skipSpecial && tok.special {
			continue
		}
		raw = append(raw, tok.bytes...)
	}
	out, _ := appendLossy(make([]byte, 0, len(raw)), raw, true)
	return string(out), nil
}

// Decoder turns a stream of token ids into text for streaming responses. It returns only complete
// UTF-8: a character whose bytes are split across tokens comes out once its last token arrives. The
// pieces it returns, followed by [Decoder.Flush], add up to [Tokenizer.Decode] of all the ids. A
// Decoder is not safe for concurrent use; use one per stream.
type Decoder struct {
	t           *Tokenizer
	skipSpecial bool
	pending     []byte // bytes of an incomplete character
	buf         []byte
}

// NewDecoder returns a streaming decoder. With skipSpecial, special tokens produce no text.
func (t *Tokenizer) NewDecoder(skipSpecial bool) *Decoder {
	return &Decoder{t: t, skipSpecial: skipSpecial}
}

// Add takes the next id and returns the text it completes, possibly "". An invalid id is an error
// wrapping [ErrInvalidID] and leaves the decoder as it was.
func (d *Decoder) Add(id int) (string, error) {
	if !d.t.validID(id) {
		return "", fmt.Errorf("%w: %d (ids lie in [0, %d))", ErrInvalidID, id, len(d.t.tokens))
	}
	tok := &d.t.tokens[id]
	if d.skipSpecial && tok.special {
		return "", nil
	}
	d.pending = append(d.pending, tok.bytes...)
	var n int
	d.buf, n = appendLossy(d.buf[:0], d.pending, false)
	d.pending = d.pending[:copy(d.pending, d.pending[n:])]
	return string(d.buf), nil
}

// Flush returns what is left at the end of the stream, an incomplete character as U+FFFD, and resets
// the decoder for a new stream.
func (d *Decoder) Flush() string {
	out, _ := appendLossy(nil, d.pending, true)
	d.pending = d.pending[:0]
	return string(out)
}
