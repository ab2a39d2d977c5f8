package gateway

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"strings"
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
		req, err := b.request(g)
		if err != nil {
			g.fail(w, err)
			return
		}
		g.generate(w, r, req, g.newOutput(k, req.Model, b.sampling()))
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
}

func (g *Gateway) newOutput(k kind, model string, s *samplingFields) output {
	prefix := "cmpl-"
	if k == kindChat {
		prefix = "chatcmpl-"
	}
	if m, err := g.gen.Model(model); err == nil {
		model = m.Name
	}
	return output{
		kind:      k,
		id:        prefix + rand.Text(),
		created:   time.Now().Unix(),
		model:     model,
		stream:    s.Stream,
		usage:     s.Stream && s.StreamOptions != nil && s.StreamOptions.IncludeUsage,
		returnIDs: s.ReturnTokenIDs,
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
	Index          int       `json:"index"`
	Text           string    `json:"text"`
	Logprobs       *struct{} `json:"logprobs"` // always null
	FinishReason   *string   `json:"finish_reason"`
	StopReason     string    `json:"stop_reason,omitempty"` // vLLM: the stop string that ended the choice
	PromptTokenIDs []int     `json:"prompt_token_ids,omitempty"`
	TokenIDs       []int     `json:"token_ids,omitempty"`
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

// ChatContent is a chat response's message, or a chunk's delta (whose fields may be absent).
type ChatContent struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

// ChatChoice is a choice of a chat.completion response or chunk.
type ChatChoice struct {
	Index        int          `json:"index"`
	Message      *ChatContent `json:"message,omitempty"`
	Delta        *ChatContent `json:"delta,omitempty"`
	Logprobs     *struct{}    `json:"logprobs"` // always null
	FinishReason *string      `json:"finish_reason"`
	StopReason   string       `json:"stop_reason,omitempty"` // vLLM: the stop string that ended the choice
	TokenIDs     []int        `json:"token_ids,omitempty"`
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
}

// response is the whole (non-streamed) response of a generation.
func (o output) response(text string, ids, prompt []int, finish, stopReason string) any {
	u := newUsage(len(prompt), len(ids))
	if !o.returnIDs {
		ids, prompt = nil, nil
	}
	if o.kind == kindChat {
		return ChatResponse{ID: o.id, Object: "chat.completion", Created: o.created, Model: o.model, Usage: u, PromptTokenIDs: prompt,
			Choices: []ChatChoice{{Message: &ChatContent{Role: "assistant", Content: &text}, FinishReason: &finish, StopReason: stopReason, TokenIDs: ids}}}
	}
	return CompletionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model, Usage: u,
		Choices: []CompletionChoice{{Text: text, FinishReason: &finish, StopReason: stopReason, PromptTokenIDs: prompt, TokenIDs: ids}}}
}

// chunk is a streamed event with new text and ids; finish is "" until the last one, and prompt is set
// on the first one only.
func (o output) chunk(text string, ids, prompt []int, finish, stopReason string) any {
	var fin *string
	if finish != "" {
		fin = &finish
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
			Choices: []ChatChoice{{Delta: delta, FinishReason: fin, StopReason: stopReason, TokenIDs: ids}}}
	}
	return CompletionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model,
		Choices: []CompletionChoice{{Text: text, FinishReason: fin, StopReason: stopReason, PromptTokenIDs: prompt, TokenIDs: ids}}}
}

// roleChunk is a chat stream's first event: the assistant's role and empty content, as OpenAI sends it.
func (o output) roleChunk(prompt []int) any {
	empty := ""
	if !o.returnIDs {
		prompt = nil
	}
	return ChatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model, PromptTokenIDs: prompt,
		Choices: []ChatChoice{{Delta: &ChatContent{Role: "assistant", Content: &empty}}}}
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

// generate starts req and writes its response: whole, or streamed as events as the ids come. When the
// client goes away (the request's context ends), the stream is closed, which ends the generation.
func (g *Gateway) generate(w http.ResponseWriter, hr *http.Request, req Request, o output) {
	start := time.Now()
	ctx := hr.Context()
	st, err := g.gen.Generate(ctx, req)
	if err != nil {
		g.fail(w, err)
		return
	}
	defer st.Close()
	prompt := st.PromptIDs()
	var sse *sseWriter
	if o.stream {
		if sse, err = startSSE(w); err == nil && o.kind == kindChat {
			err = sse.event(o.roleChunk(prompt))
		}
		if err != nil {
			g.log.Debug("http stream: client gone", zap.Error(err))
			return
		}
	}
	var ids []int
	var all strings.Builder
	first := true
	for {
		ch, err := st.Next(ctx)
		if ctx.Err() != nil {
			g.log.Debug("http request cancelled by its client", zap.Int("prompt-tokens", len(prompt)), zap.Int("sent", len(ids)))
			return
		}
		ids = append(ids, ch.IDs...)
		done := ch.Finish != "" && err == nil
		if done {
			g.log.Debug("http request done", zap.Int("prompt-tokens", len(prompt)), zap.Int("new-tokens", len(ids)),
				zap.String("finish", ch.Finish), zap.Duration("took", time.Since(start)))
		}
		if !o.stream {
			all.WriteString(ch.Text)
			switch {
			case err != nil:
				g.fail(w, err)
				return
			case done:
				writeJSON(w, http.StatusOK, o.response(all.String(), ids, prompt, ch.Finish, ch.StopReason))
				return
			}
			continue
		}
		// Skipped: a token that ends inside a character, unless its id was asked for.
		if ch.Text != "" || done || (o.returnIDs && len(ch.IDs) > 0) {
			var p []int
			if first && o.kind == kindCompletion {
				p = prompt
			}
			if werr := sse.event(o.chunk(ch.Text, ch.IDs, p, ch.Finish, ch.StopReason)); werr != nil {
				g.log.Debug("http stream: client gone", zap.Error(werr))
				return
			}
			first = false
		}
		if err != nil {
			// The status is sent already: the error comes as an event, then the end (as vLLM does).
			_, body := toHTTP(err)
			g.log.Debug("http stream failed", zap.Error(err))
			_ = sse.event(body)
			_ = sse.done()
			return
		}
		if done {
			if o.usage {
				if werr := sse.event(o.usageChunk(len(prompt), len(ids))); werr != nil {
					return
				}
			}
			_ = sse.done()
			return
		}
	}
}
