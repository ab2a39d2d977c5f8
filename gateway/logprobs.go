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
// choice's text (in characters, from the echoed prompt's end), its log-probability and the top ones
// (the chosen token and the N most likely, as vLLM gives them).
type CompletionLogprobs struct {
	TextOffset    []int           `json:"text_offset"`
	TokenLogprobs []float32       `json:"token_logprobs"`
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
	out := &CompletionLogprobs{TextOffset: []int{}, TokenLogprobs: []float32{}, Tokens: []string{}, TopLogprobs: []TopLogprobMap{}}
	for i, id := range ids {
		text := l.text(id)
		out.Tokens = append(out.Tokens, text)
		out.TokenLogprobs = append(out.TokenLogprobs, lps[i].Logprob)
		out.TextOffset = append(out.TextOffset, offset)
		offset += utf8.RuneCountInString(text)
		r := ranked(id, lps[i])
		top := TopLogprobMap{}
		for k, t := range r {
			if k > l.top { // the chosen token and l.top more
				break
			}
			top = append(top, TopLogprob{l.text(t.ID), t.Logprob})
		}
		out.TopLogprobs = append(out.TopLogprobs, top)
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
