package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// kind tells the two generation endpoints' response formats apart.
type kind int

const (
	kindCompletion kind = iota // text_completion
	kindChat                   // chat.completion
)

// generation returns the handler of a generation endpoint: it decodes and checks the body, then
// generates.
func (g *Gateway) generation(k kind) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var b body = &completionRequest{}
		if k == kindChat {
			b = &chatRequest{}
		}
		if err := decodeBody(w, r, b); err != nil {
			g.fail(w, err)
			return
		}
		req, err := b.request(r.Context(), g)
		if err != nil {
			g.fail(w, err)
			return
		}
		o := g.newOutput(k, req.Model, b.sampling())
		if c, ok := b.(*completionRequest); ok {
			o.echo = c.Echo
		}
		if c, ok := b.(*chatRequest); ok {
			o.tools = c.tools == toolsAuto
		}
		o.lp = logprobs{on: req.Logprobs, top: req.TopLogprobs}
		if p := b.sampling().PromptLogprobs; p != nil && !o.stream { // vLLM writes them in whole responses only
			n := int(*p)
			o.promptTop = &n
		} else if o.echo && o.lp.on && !o.stream { // echo with logprobs asked for them: vLLM writes them too
			n := req.TopLogprobs
			o.promptTop = &n
		}
		if tok, err := g.gen.Tokenizer(); err == nil && (o.lp.on || o.promptTop != nil) {
			o.lp.tok = tok
		}
		g.generate(w, r, req, o)
	}
}

// output is how a generation's response is written: its format, id and options.
type output struct {
	kind      kind
	id        string // cmpl-… or chatcmpl-…
	created   int64
	model     string
	stream    bool
	usage     bool // stream_options.include_usage: a last chunk with the usage
	returnIDs bool
	n         int  // choices
	echo      bool // completions: the prompt's text before each choice's
	lp        logprobs
	tools     bool // chat with tools: the output is parsed for tool calls
	promptTop *int // vLLM's prompt_logprobs: written with this many top ones (nil: not asked)
}

func (g *Gateway) newOutput(k kind, model string, s *samplingFields) output {
	prefix := "cmpl-"
	if k == kindChat {
		prefix = "chatcmpl-"
	}
	if m, err := g.gen.Model(model); err == nil {
		model = m.Name
	}
	n := 1
	if s.N != nil {
		n = int(*s.N) // checked by unsupported
	}
	return output{
		kind:      k,
		id:        prefix + rand.Text(),
		created:   time.Now().Unix(),
		model:     model,
		stream:    s.Stream,
		usage:     s.Stream && s.StreamOptions != nil && s.StreamOptions.IncludeUsage,
		returnIDs: s.ReturnTokenIDs,
		n:         n,
	}
}

// Usage is a response's token counts.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func newUsage(prompt, completion int) *Usage {
	return &Usage{PromptTokens: prompt, CompletionTokens: completion, TotalTokens: prompt + completion}
}

// CompletionChoice is a choice of a text_completion response or chunk.
type CompletionChoice struct {
	Index          int                 `json:"index"`
	Text           string              `json:"text"`
	Logprobs       *CompletionLogprobs `json:"logprobs"` // null unless asked for
	FinishReason   *string             `json:"finish_reason"`
	StopReason     string              `json:"stop_reason,omitempty"` // vLLM: the stop string that ended the choice
	PromptTokenIDs []int               `json:"prompt_token_ids,omitempty"`
	TokenIDs       []int               `json:"token_ids,omitempty"`
	// PromptLogprobs are vLLM's prompt_logprobs (the request's prompt_logprobs; whole responses only).
	PromptLogprobs PromptLogprobs `json:"prompt_logprobs,omitempty"`
}

// CompletionResponse is the response of POST /v1/completions, or a chunk of its stream.
type CompletionResponse struct {
	ID      string             `json:"id"`
	Object  string             `json:"object"`
	Created int64              `json:"created"`
	Model   string             `json:"model"`
	Choices []CompletionChoice `json:"choices"`
	Usage   *Usage             `json:"usage,omitempty"`
}

// ChatContent is a chat response's message, or a chunk's delta (whose fields may be absent). A message
// with tool calls has no content.
type ChatContent struct {
	Role      string         `json:"role,omitempty"`
	Content   *string        `json:"content,omitempty"`
	ToolCalls []ChatToolCall `json:"tool_calls,omitempty"`
}

// ChatChoice is a choice of a chat.completion response or chunk.
type ChatChoice struct {
	Index        int           `json:"index"`
	Message      *ChatContent  `json:"message,omitempty"`
	Delta        *ChatContent  `json:"delta,omitempty"`
	Logprobs     *ChatLogprobs `json:"logprobs"` // null unless asked for
	FinishReason *string       `json:"finish_reason"`
	StopReason   string        `json:"stop_reason,omitempty"` // vLLM: the stop string that ended the choice
	TokenIDs     []int         `json:"token_ids,omitempty"`
}

// ChatResponse is the response of POST /v1/chat/completions, or a chunk of its stream.
type ChatResponse struct {
	ID             string       `json:"id"`
	Object         string       `json:"object"`
	Created        int64        `json:"created"`
	Model          string       `json:"model"`
	Choices        []ChatChoice `json:"choices"`
	Usage          *Usage       `json:"usage,omitempty"`
	PromptTokenIDs []int        `json:"prompt_token_ids,omitempty"`
	// PromptLogprobs are vLLM's prompt_logprobs (the request's prompt_logprobs; whole responses only).
	PromptLogprobs PromptLogprobs `json:"prompt_logprobs,omitempty"`
}

// choice is one finished choice of a whole response.
type choice struct {
	text               string
	ids                []int
	lps                []TokenLogprobs
	promptLps          []TokenLogprobs // with echo and logprobs
	finish, stopReason string
}

// response is the whole (non-streamed) response of a generation.
func (o output) response(choices []choice, prompt []int) (any, error) {
	completion := 0
	for _, c := range choices {
		completion += len(c.ids)
	}
	u := newUsage(len(prompt), completion)
	prompt0 := prompt
	if !o.returnIDs {
		prompt = nil
	}
	if o.kind == kindChat {
		r := ChatResponse{ID: o.id, Object: "chat.completion", Created: o.created, Model: o.model, Usage: u, PromptTokenIDs: prompt}
		if o.promptTop != nil && len(choices) > 0 {
			var err error
			if r.PromptLogprobs, err = o.lp.promptLogprobs(prompt0, choices[0].promptLps, *o.promptTop); err != nil {
				return nil, err
			}
		}
		for i, c := range choices {
			ch := ChatChoice{Index: i, Message: &ChatContent{Role: "assistant", Content: &c.text},
				FinishReason: &c.finish, StopReason: c.stopReason, TokenIDs: o.ids(c.ids)}
			if calls, ok := parseToolCalls(c.text); o.tools && ok {
				finish := FinishToolCalls
				ch.Message.Content, ch.Message.ToolCalls, ch.FinishReason = nil, chatToolCalls(calls, false), &finish
			}
			if o.lp.on {
				var err error
				if ch.Logprobs, err = o.lp.chat(c.ids, c.lps); err != nil {
					return nil, err
				}
			}
			r.Choices = append(r.Choices, ch)
		}
		return r, nil
	}
	r := CompletionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model, Usage: u}
	for i, c := range choices {
		ch := CompletionChoice{Index: i, Text: c.text, FinishReason: &c.finish, StopReason: c.stopReason,
			PromptTokenIDs: prompt, TokenIDs: o.ids(c.ids)}
		if o.promptTop != nil {
			var err error
			if ch.PromptLogprobs, err = o.lp.promptLogprobs(prompt0, c.promptLps, *o.promptTop); err != nil {
				return nil, err
			}
		}
		if o.lp.on {
			var err error
			if o.echo { // the prompt's tokens first, offsets from the echoed prompt's start
				ch.Logprobs, _, err = o.lp.echoed(prompt0, c.promptLps, c.ids, c.lps)
			} else {
				ch.Logprobs, _, err = o.lp.completion(c.ids, c.lps, 0)
			}
			if err != nil {
				return nil, err
			}
		}
		r.Choices = append(r.Choices, ch)
	}
	return r, nil
}

// ids returns ids when the request asked for them (return_token_ids), else nil.
func (o output) ids(ids []int) []int {
	if !o.returnIDs {
		return nil
	}
	return ids
}

// chunk is a streamed event with new text and ids (and their logprobs, the first at offset characters
// of the choice's text); finish is "" until the last one, and prompt is set on the first one only. It
// returns the offset after the chunk's tokens.
//
// echoed, on the first chunk of an echoed completion with logprobs, is the prompt's ids: their
// logprobs (promptLps) come first, from offset 0.
func (o output) chunk(index int, text string, ids []int, lps []TokenLogprobs, offset int, prompt []int, finish, stopReason string,
	echoed []int, promptLps []TokenLogprobs) (any, int, error) {
	var fin *string
	if finish != "" {
		fin = &finish
	}
	var clp *CompletionLogprobs
	var chlp *ChatLogprobs
	var err error
	if o.lp.on && echoed != nil && o.kind == kindCompletion {
		if clp, offset, err = o.lp.echoed(echoed, promptLps, ids, lps); err != nil {
			return nil, offset, err
		}
	} else if o.lp.on && len(ids) > 0 {
		if o.kind == kindChat {
			chlp, err = o.lp.chat(ids, lps)
		} else {
			clp, offset, err = o.lp.completion(ids, lps, offset)
		}
		if err != nil {
			return nil, offset, err
		}
	}
	if !o.returnIDs {
		ids, prompt = nil, nil
	}
	if o.kind == kindChat {
		delta := &ChatContent{}
		if text != "" {
			delta.Content = &text
		}
		return ChatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model,
			Choices: []ChatChoice{{Index: index, Delta: delta, Logprobs: chlp, FinishReason: fin, StopReason: stopReason, TokenIDs: ids}}}, offset, nil
	}
	return CompletionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model,
		Choices: []CompletionChoice{{Index: index, Text: text, Logprobs: clp, FinishReason: fin, StopReason: stopReason, PromptTokenIDs: prompt, TokenIDs: ids}}}, offset, nil
}

// toolHold holds a chat stream's text while it may be a tool call: from its start for as long as it is
// white space or begins with "{".
type toolHold struct {
	text    string
	decided bool // the text is not a tool call: it streams
}

// add takes a chunk's text (last: the choice ends) and returns the text to send now and, at the end,
// the tool calls the held text makes (its text is then not sent).
func (h *toolHold) add(text string, last bool) (string, []ChatToolCall) {
	if h.decided {
		return text, nil
	}
	h.text += text
	if rest := strings.TrimLeft(h.text, " \t\r\n"); rest != "" && rest[0] != '{' {
		h.decided = true
		return h.text, nil
	}
	if !last {
		return "", nil
	}
	if calls, ok := parseToolCalls(h.text); ok {
		return "", chatToolCalls(calls, true)
	}
	return h.text, nil
}

// toolChunk is a chat stream's event with a choice's tool calls.
func (o output) toolChunk(index int, calls []ChatToolCall) any {
	return ChatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model,
		Choices: []ChatChoice{{Index: index, Delta: &ChatContent{ToolCalls: calls}}}}
}

// roleChunk is a chat stream's first event: the assistant's role and empty content, as OpenAI sends it.
func (o output) roleChunk(index int, prompt []int) any {
	empty := ""
	if !o.returnIDs {
		prompt = nil
	}
	return ChatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model, PromptTokenIDs: prompt,
		Choices: []ChatChoice{{Index: index, Delta: &ChatContent{Role: "assistant", Content: &empty}}}}
}

// usageChunk is the last event of a stream with stream_options.include_usage: no choices, the usage.
func (o output) usageChunk(prompt, completion int) any {
	u := newUsage(prompt, completion)
	if o.kind == kindChat {
		return ChatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model, Choices: []ChatChoice{}, Usage: u}
	}
	return CompletionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model, Choices: []CompletionChoice{}, Usage: u}
}

// sseWriter writes Server-Sent Events, flushing each.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

// startSSE sends the headers of an event stream.
func startSSE(w http.ResponseWriter) (*sseWriter, error) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	s := &sseWriter{w: w, rc: http.NewResponseController(w)}
	return s, s.rc.Flush()
}

// event writes "data: {json}\n\n" and flushes it.
func (s *sseWriter) event(v any) error {
	var b bytes.Buffer
	b.WriteString("data: ")
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil { // ends the JSON with "\n"
		return err
	}
	b.WriteByte('\n')
	return s.write(b.Bytes())
}

// done writes the stream's end, "data: [DONE]\n\n".
func (s *sseWriter) done() error { return s.write([]byte("data: [DONE]\n\n")) }

func (s *sseWriter) write(b []byte) error {
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return s.rc.Flush()
}

// choiceChunk is a chunk of one choice's stream, or its failure.
type choiceChunk struct {
	index int
	Chunk
	err error
}

// startChoices starts the n generations of a request (n > 1: choice i's seed is the request's + i, as
// vLLM seeds its child requests, or a random one when the request has none). On an error the streams
// started are closed.
func (g *Gateway) startChoices(ctx context.Context, req Request, n int) ([]Stream, error) {
	streams := make([]Stream, 0, n)
	for i := range n {
		r := req
		if n > 1 {
			seed := mrand.Uint64()
			if req.Sampling.Seed != nil {
				seed = *req.Sampling.Seed + uint64(i)
			}
			r.Sampling.Seed = &seed
		}
		st, err := g.gen.Generate(ctx, r)
		if err != nil {
			for _, s := range streams {
				s.Close()
			}
			return nil, err
		}
		streams = append(streams, st)
	}
	return streams, nil
}

// generate starts req's choices and writes its response: whole, or streamed as events as the ids come
// (the choices' events interleaved, each with its index). When the client goes away (the request's
// context ends), the streams are closed, which ends the generations.
func (g *Gateway) generate(w http.ResponseWriter, hr *http.Request, req Request, o output) {
	start := time.Now()
	ctx, cancel := context.WithCancel(hr.Context())
	defer cancel()
	streams, err := g.startChoices(ctx, req, o.n)
	if err != nil {
		g.fail(w, err)
		return
	}
	defer func() {
		for _, st := range streams {
			st.Close()
		}
	}()
	prompt := streams[0].PromptIDs()
	echo := ""
	if o.echo {
		if echo, err = g.echoText(req, prompt); err != nil {
			g.fail(w, err)
			return
		}
	}
	if !o.stream {
		g.whole(ctx, w, streams, prompt, echo, o, start)
		return
	}
	sse, err := startSSE(w)
	for i := range streams {
		if err == nil && o.kind == kindChat {
			err = sse.event(o.roleChunk(i, prompt))
		}
	}
	if err != nil {
		g.log.Debug("http stream: client gone", zap.Error(err))
		return
	}
	// One goroutine per choice reads its stream; this one writes the events. They end when their
	// stream does or ctx does (the deferred cancel, before the wait, ends them on an early return).
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	chunks := make(chan choiceChunk, len(streams))
	for i, st := range streams {
		wg.Go(func() {
			for {
				ch, err := st.Next(ctx)
				select {
				case chunks <- choiceChunk{i, ch, err}:
				case <-ctx.Done():
					return
				}
				if err != nil || ch.Finish != "" {
					return
				}
			}
		})
	}
	completion, left := 0, len(streams)
	offsets := make([]int, len(streams)) // logprobs' text offsets, per choice
	held := make([]toolHold, len(streams))
	first := make([]bool, len(streams))
	promptLps := make([][]TokenLogprobs, len(streams)) // with echo and logprobs, until the first event
	for i := range first {
		first[i] = true
	}
	for left > 0 {
		var c choiceChunk
		select {
		case c = <-chunks:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			g.log.Debug("http request cancelled by its client", zap.Int("prompt-tokens", len(prompt)), zap.Int("sent", completion))
			return
		}
		completion += len(c.IDs)
		promptLps[c.index] = append(promptLps[c.index], c.PromptLogprobs...)
		done := c.Finish != "" && c.err == nil
		text := c.Text
		if first[c.index] && echo != "" {
			text = echo + text
		}
		finish := c.Finish
		if o.tools {
			// Text that may be a tool call is held to the end, then sent as calls or as text.
			var calls []ChatToolCall
			text, calls = held[c.index].add(text, done)
			if len(calls) > 0 {
				if werr := sse.event(o.toolChunk(c.index, calls)); werr != nil {
					g.log.Debug("http stream: client gone", zap.Error(werr))
					return
				}
				finish = FinishToolCalls
			}
		}
		// Skipped: a token that ends inside a character (or held back), unless its id was asked for.
		if text != "" || done || ((o.returnIDs || o.lp.on) && len(c.IDs) > 0) {
			var p, echoed []int
			if first[c.index] && o.kind == kindCompletion {
				p = prompt
				if o.echo {
					echoed = prompt
				}
			}
			ev, off, cerr := o.chunk(c.index, text, c.IDs, c.Logprobs, offsets[c.index], p, finish, c.StopReason, echoed, promptLps[c.index])
			if cerr != nil {
				_, body := toHTTP(cerr)
				_ = sse.event(body)
				_ = sse.done()
				return
			}
			offsets[c.index] = off
			if werr := sse.event(ev); werr != nil {
				g.log.Debug("http stream: client gone", zap.Error(werr))
				return
			}
			first[c.index] = false
		}
		if c.err != nil {
			// The status is sent already: the error comes as an event, then the end (as vLLM does).
			_, body := toHTTP(c.err)
			g.log.Debug("http stream failed", zap.Error(c.err))
			_ = sse.event(body)
			_ = sse.done()
			return
		}
		if done {
			left--
			g.log.Debug("http choice done", zap.Int("index", c.index), zap.Int("prompt-tokens", len(prompt)),
				zap.String("finish", c.Finish), zap.Duration("took", time.Since(start)))
		}
	}
	if o.usage {
		if werr := sse.event(o.usageChunk(len(prompt), completion)); werr != nil {
			return
		}
	}
	_ = sse.done()
}

// whole reads every choice to its end and writes the whole response.
func (g *Gateway) whole(ctx context.Context, w http.ResponseWriter, streams []Stream, prompt []int, echo string, o output, start time.Time) {
	choices := make([]choice, len(streams))
	for i, st := range streams {
		c := &choices[i]
		var text strings.Builder
		text.WriteString(echo)
		for c.finish == "" {
			ch, err := st.Next(ctx)
			if ctx.Err() != nil {
				g.log.Debug("http request cancelled by its client", zap.Int("prompt-tokens", len(prompt)), zap.Int("sent", len(c.ids)))
				return
			}
			c.ids = append(c.ids, ch.IDs...)
			c.lps = append(c.lps, ch.Logprobs...)
			c.promptLps = append(c.promptLps, ch.PromptLogprobs...)
			text.WriteString(ch.Text)
			if err != nil {
				g.fail(w, err)
				return
			}
			c.finish, c.stopReason = ch.Finish, ch.StopReason
		}
		c.text = text.String()
	}
	g.log.Debug("http request done", zap.Int("prompt-tokens", len(prompt)), zap.Int("choices", len(choices)),
		zap.Duration("took", time.Since(start)))
	resp, err := o.response(choices, prompt)
	if err != nil {
		g.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// echoText is the prompt as text, for echo: the prompt text as sent, or its ids decoded.
func (g *Gateway) echoText(req Request, prompt []int) (string, error) {
	if req.Prompt != "" {
		return req.Prompt, nil
	}
	tok, err := g.gen.Tokenizer()
	if err != nil {
		return "", fmt.Errorf("echo of a prompt of token ids: %w", err)
	}
	text, err := tok.Decode(prompt)
	if err != nil {
		return "", fmt.Errorf("%w: echo: %w", ErrInvalidRequest, err)
	}
	return text, nil
}
