package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// maxLogprobs bounds the top logprobs a request may ask for, as vLLM's default max_logprobs does.
const maxLogprobs = 20

// logprobs is how a response writes its tokens' logprobs: off, or on with the number of top ones.
type logprobs struct {
	on  bool
	top int
	tok Tokenizer // nil: tokens are written "token_id:N", as vLLM's return_tokens_as_token_ids
}

// text is a token as the logprobs write it: decode([id]) with special tokens kept, as vLLM writes it.
func (l logprobs) text(id int) string {
	if l.tok == nil {
		return "token_id:" + strconv.Itoa(id)
	}
	text, err := l.tok.DecodeSpecial([]int{id})
	if err != nil {
		return ""
	}
	return text
}

// CompletionLogprobs is a text_completion choice's logprobs: per token its text, its offset in the
// choice's text (in characters of the tokens' texts, from the start of the echoed prompt with echo, else
// of the generated text), its log-probability and the top ones (the chosen token and the N most likely,
// as vLLM gives them). With echo the prompt's tokens come first; the first has null for both.
type CompletionLogprobs struct {
	TextOffset    []int           `json:"text_offset"`
	TokenLogprobs []*float32      `json:"token_logprobs"`
	Tokens        []string        `json:"tokens"`
	TopLogprobs   []TopLogprobMap `json:"top_logprobs"`
}

// TopLogprobMap is a JSON object of token texts to log-probabilities, written in its order.
type TopLogprobMap []TopLogprob

// TopLogprob is one entry of a TopLogprobMap.
type TopLogprob struct {
	Token   string
	Logprob float32
}

// MarshalJSON writes the entries as one object in order; a token already written is left out, as a
// Python dict keeps the first.
func (m TopLogprobMap) MarshalJSON() ([]byte, error) {
	if m == nil { // a token without logprobs: the prompt's first
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	seen := make(map[string]bool, len(m))
	for _, e := range m {
		if seen[e.Token] {
			continue
		}
		if len(seen) > 0 {
			b.WriteByte(',')
		}
		seen[e.Token] = true
		k, err := marshalNoEscape(e.Token)
		if err != nil {
			return nil, err
		}
		v, err := json.Marshal(e.Logprob)
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// marshalNoEscape is json.Marshal of v without HTML escaping.
func marshalNoEscape(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// ChatLogprobs is a chat choice's logprobs.
type ChatLogprobs struct {
	Content []ChatTokenLogprob `json:"content"`
}

// ChatTokenLogprob is one token of a chat choice's logprobs.
type ChatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float32          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []ChatTopLogprob `json:"top_logprobs"`
}

// ChatTopLogprob is one of a chat token's top logprobs.
type ChatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float32 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// tokenBytes is a token's text as the list of its UTF-8 bytes.
func tokenBytes(s string) []int {
	out := make([]int, len(s))
	for i := range len(s) {
		out[i] = int(s[i])
	}
	return out
}

// ranked returns the chosen id's entry then the top ones without it, as vLLM orders a token's logprobs.
func ranked(id int, lp TokenLogprobs) []TokenLogprob {
	out := []TokenLogprob{{ID: id, Logprob: lp.Logprob}}
	for _, t := range lp.Top {
		if t.ID != id {
			out = append(out, t)
		}
	}
	return out
}

// completion returns the completions logprobs of ids, whose first token starts offset characters into
// the choice's text; it returns the offset after the last token too.
func (l logprobs) completion(ids []int, lps []TokenLogprobs, offset int) (*CompletionLogprobs, int, error) {
	if len(lps) != len(ids) {
		return nil, offset, fmt.Errorf("gateway: %d logprobs for %d tokens", len(lps), len(ids))
	}
	out := &CompletionLogprobs{TextOffset: []int{}, TokenLogprobs: []*float32{}, Tokens: []string{}, TopLogprobs: []TopLogprobMap{}}
	for i, id := range ids {
		offset = l.add(out, id, &lps[i], offset)
	}
	return out, offset, nil
}

// add appends token id with its logprobs (nil: none, written null) at offset to out and returns the
// offset after it.
func (l logprobs) add(out *CompletionLogprobs, id int, lp *TokenLogprobs, offset int) int {
	text := l.text(id)
	out.Tokens = append(out.Tokens, text)
	out.TextOffset = append(out.TextOffset, offset)
	if lp == nil {
		out.TokenLogprobs = append(out.TokenLogprobs, nil)
		out.TopLogprobs = append(out.TopLogprobs, nil)
		return offset + utf8.RuneCountInString(text)
	}
	v := lp.Logprob
	out.TokenLogprobs = append(out.TokenLogprobs, &v)
	top := TopLogprobMap{}
	for k, t := range ranked(id, *lp) {
		if k > l.top { // the chosen token and l.top more
			break
		}
		top = append(top, TopLogprob{l.text(t.ID), t.Logprob})
	}
	out.TopLogprobs = append(out.TopLogprobs, top)
	return offset + utf8.RuneCountInString(text)
}

// echoed returns the completions logprobs of an echoed prompt, ids, from its logprobs (one per token
// after the first, Chunk.PromptLogprobs) followed by those of a choice's first tokens, gen and genLps,
// as vLLM writes them for echo with logprobs: the first prompt token with null logprobs, offsets from
// the prompt's start. It returns the offset after the last token too.
func (l logprobs) echoed(ids []int, lps []TokenLogprobs, gen []int, genLps []TokenLogprobs) (*CompletionLogprobs, int, error) {
	if len(ids) > 0 && len(lps) != len(ids)-1 {
		return nil, 0, fmt.Errorf("gateway: %d prompt logprobs for a prompt of %d tokens", len(lps), len(ids))
	}
	out := &CompletionLogprobs{TextOffset: []int{}, TokenLogprobs: []*float32{}, Tokens: []string{}, TopLogprobs: []TopLogprobMap{}}
	offset := 0
	for i, id := range ids {
		var lp *TokenLogprobs
		if i > 0 {
			lp = &lps[i-1]
		}
		offset = l.add(out, id, lp, offset)
	}
	if len(genLps) != len(gen) {
		return nil, offset, fmt.Errorf("gateway: %d logprobs for %d tokens", len(genLps), len(gen))
	}
	for i, id := range gen {
		offset = l.add(out, id, &genLps[i], offset)
	}
	return out, offset, nil
}

// chat returns the chat logprobs of ids: each token with the first l.top of its ranked logprobs.
func (l logprobs) chat(ids []int, lps []TokenLogprobs) (*ChatLogprobs, error) {
	if len(lps) != len(ids) {
		return nil, fmt.Errorf("gateway: %d logprobs for %d tokens", len(lps), len(ids))
	}
	out := &ChatLogprobs{Content: []ChatTokenLogprob{}}
	for i, id := range ids {
		text := l.text(id)
		c := ChatTokenLogprob{Token: text, Logprob: lps[i].Logprob, Bytes: tokenBytes(text), TopLogprobs: []ChatTopLogprob{}}
		r := ranked(id, lps[i])
		for k := 0; k < l.top && k < len(r); k++ {
			t := l.text(r[k].ID)
			c.TopLogprobs = append(c.TopLogprobs, ChatTopLogprob{Token: t, Logprob: r[k].Logprob, Bytes: tokenBytes(t)})
		}
		out.Content = append(out.Content, c)
	}
	return out, nil
}

// PromptLogprobs are vLLM's prompt_logprobs: per prompt token null (the first token) or an object of
// token ids (as strings) to their logprob, rank and decoded_token: the prompt token first, then the N
// most likely (a token already written is left out, as a Python dict keeps the first).
type PromptLogprobs []PromptLogprobEntry

// PromptLogprobEntry is one prompt token's entries in order; nil is written null.
type PromptLogprobEntry []PromptLogprob

// PromptLogprob is one token of a PromptLogprobEntry.
type PromptLogprob struct {
	ID           int
	Logprob      float32
	Rank         *int    // nil: not known
	DecodedToken *string // nil: no tokenizer
}

// MarshalJSON writes the entry as one object in order, or null.
func (e PromptLogprobEntry) MarshalJSON() ([]byte, error) {
	if e == nil {
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	seen := make(map[int]bool, len(e))
	for _, t := range e {
		if seen[t.ID] {
			continue
		}
		if len(seen) > 0 {
			b.WriteByte(',')
		}
		seen[t.ID] = true
		v, err := marshalNoEscape(struct {
			Logprob      float32 `json:"logprob"`
			Rank         *int    `json:"rank"`
			DecodedToken *string `json:"decoded_token"`
		}{t.Logprob, t.Rank, t.DecodedToken})
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(&b, "%q:", strconv.Itoa(t.ID))
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// promptLogprobs returns vLLM's prompt_logprobs of a prompt, ids, from its logprobs (one per token after
// the first, Chunk.PromptLogprobs), with the top most likely tokens of each position.
func (l logprobs) promptLogprobs(ids []int, lps []TokenLogprobs, top int) (PromptLogprobs, error) {
	if len(ids) > 0 && len(lps) != len(ids)-1 {
		return nil, fmt.Errorf("gateway: %d prompt logprobs for a prompt of %d tokens", len(lps), len(ids))
	}
	decoded := func(id int) *string {
		if l.tok == nil {
			return nil
		}
		s := l.text(id)
		return &s
	}
	out := make(PromptLogprobs, len(ids))
	for i := 1; i < len(ids); i++ {
		lp := lps[i-1]
		e := PromptLogprobEntry{{ID: ids[i], Logprob: lp.Logprob, DecodedToken: decoded(ids[i])}}
		if lp.Rank > 0 {
			r := lp.Rank
			e[0].Rank = &r
		}
		for k, t := range lp.Top {
			if k >= top {
				break
			}
			r := k + 1
			e = append(e, PromptLogprob{ID: t.ID, Logprob: t.Logprob, Rank: &r, DecodedToken: decoded(t.ID)})
		}
		out[i] = e
	}
	return out, nil
}
