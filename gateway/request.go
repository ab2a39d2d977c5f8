package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// samplingFields are the generation fields that /v1/completions and /v1/chat/completions share: OpenAI's
// and vLLM's extensions (top_k, stop_token_ids, ignore_eos, return_token_ids). A field left out takes
// the model's default (the Generator's); max_tokens left out is the rest of the context.
type samplingFields struct {
	MaxTokens    *int64   `json:"max_tokens"`
	Temperature  *float64 `json:"temperature"`
	TopP         *float64 `json:"top_p"`
	TopK         *int64   `json:"top_k"` // vLLM: -1 or 0 is off
	Seed         *int64   `json:"seed"`
	StopTokenIDs []int64  `json:"stop_token_ids"`
	// Stop is a string or an array of up to maxStops strings; include_stop_str_in_output is vLLM's.
	Stop           json.RawMessage `json:"stop"`
	IncludeStopStr bool            `json:"include_stop_str_in_output"`
	ResponseFormat json.RawMessage `json:"response_format"`
	IgnoreEOS      bool            `json:"ignore_eos"`
	ReturnTokenIDs bool            `json:"return_token_ids"` // vLLM: token_ids (and prompt_token_ids) in the response
	Stream         bool            `json:"stream"`
	StreamOptions  *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`

	N                 *int64             `json:"n"`
	Logprobs          json.RawMessage    `json:"logprobs"` // completions: an integer (top count); chat: true or false
	PresencePenalty   *float64           `json:"presence_penalty"`
	FrequencyPenalty  *float64           `json:"frequency_penalty"`
	RepetitionPenalty *float64           `json:"repetition_penalty"` // vLLM
	MinTokens         *int64             `json:"min_tokens"`         // vLLM
	LogitBias         map[string]float64 `json:"logit_bias"`         // token id (as a string) to a bias, clamped to [-100, 100]
	PromptLogprobs    *int64             `json:"prompt_logprobs"`    // vLLM: the prompt tokens' logprobs, with this many top ones
}

// unsupported reports an OpenAI field set to what the gateway cannot do.
func (s *samplingFields) unsupported() error {
	switch {
	case s.N != nil && (*s.N < 1 || *s.N > maxChoices):
		return invalid("n %d must be in [1, %d]", *s.N, maxChoices)
	case !isEmptyJSON(s.ResponseFormat, `{"type":"text"}`) && !isTextFormat(s.ResponseFormat):
		return invalid("response_format %s is not supported: only {\"type\": \"text\"} (no constrained decoding yet)", bytes.TrimSpace(s.ResponseFormat))
	case s.MinTokens != nil && *s.MinTokens < 0:
		return invalid("min_tokens %d must be >= 0", *s.MinTokens)
	}
	return nil
}

// maxChoices bounds n, the choices of one request.
const maxChoices = 128

// maxStops is how many stop strings a request may give, as OpenAI allows.
const maxStops = 4

// stops reads the stop field: absent, null, a string ("" is none) or an array of up to maxStops
// non-empty strings.
func (s *samplingFields) stops() ([]string, error) {
	raw := bytes.TrimSpace(s.Stop)
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		if one == "" {
			return nil, nil
		}
		return []string{one}, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, invalid("stop must be a string or an array of strings")
	}
	if len(list) > maxStops {
		return nil, invalid("stop: %d strings; at most %d are allowed", len(list), maxStops)
	}
	for i, str := range list {
		if str == "" {
			return nil, invalid("stop[%d] is empty", i)
		}
	}
	return list, nil
}

// isTextFormat reports whether raw is response_format {"type": "text"}, however spaced.
func isTextFormat(raw json.RawMessage) bool {
	var f map[string]json.RawMessage
	if json.Unmarshal(raw, &f) != nil || len(f) != 1 {
		return false
	}
	return string(bytes.TrimSpace(f["type"])) == `"text"`
}

// isEmptyJSON reports whether raw is absent, null or one of the given empty values.
func isEmptyJSON(raw json.RawMessage, empty ...string) bool {
	s := string(bytes.TrimSpace(raw))
	if s == "" || s == "null" {
		return true
	}
	for _, e := range empty {
		if s == e {
			return true
		}
	}
	return false
}

// fill sets req's max_tokens, sampling and stop ids from s, for a prompt of n tokens of model m.
func (s *samplingFields) fill(req *Request, m Model, maxTokens *int64, n int) error {
	if maxTokens == nil {
		left := m.MaxModelLen - n
		if left <= 0 {
			return invalid("%d prompt tokens leave no room for new tokens in the model's context of %d", n, m.MaxModelLen)
		}
		req.MaxTokens = left
	} else {
		req.MaxTokens = int(*maxTokens)
	}
	req.Sampling = Sampling{Temperature: s.Temperature, TopP: s.TopP}
	if s.TopK != nil {
		k := int(*s.TopK)
		if k == -1 {
			k = 0
		}
		req.Sampling.TopK = &k
	}
	if s.Seed != nil {
		seed := uint64(*s.Seed)
		req.Sampling.Seed = &seed
	}
	if s.MinTokens != nil {
		req.Sampling.MinTokens = int(min(*s.MinTokens, math.MaxInt32))
	}
	if s.PresencePenalty != nil {
		req.Sampling.PresencePenalty = *s.PresencePenalty
	}
	if s.FrequencyPenalty != nil {
		req.Sampling.FrequencyPenalty = *s.FrequencyPenalty
	}
	if s.RepetitionPenalty != nil {
		if *s.RepetitionPenalty <= 0 {
			return invalid("repetition_penalty %g must be > 0", *s.RepetitionPenalty)
		}
		req.Sampling.RepetitionPenalty = *s.RepetitionPenalty
	}
	if len(s.LogitBias) > 0 {
		req.Sampling.LogitBias = make(map[int]float64, len(s.LogitBias))
		for k, b := range s.LogitBias {
			id, err := strconv.Atoi(k)
			if err != nil {
				return invalid("logit_bias: key %q is not a token id", k)
			}
			req.Sampling.LogitBias[id] = max(-100, min(100, b)) // as vLLM clamps it
		}
	}
	req.IgnoreEOS = s.IgnoreEOS
	req.StopIDs = ints(s.StopTokenIDs)
	var err error
	if req.Stop, err = s.stops(); err != nil {
		return err
	}
	req.IncludeStopStr = s.IncludeStopStr
	if p := s.PromptLogprobs; p != nil {
		if *p < 0 || *p > maxLogprobs {
			return invalid("prompt_logprobs %d must be in [0, %d]", *p, maxLogprobs)
		}
		if s.Stream { // as vLLM: a stream does not write them, so it may not ask for top ones
			if *p > 0 {
				return invalid("prompt_logprobs %d: prompt logprobs are not available when stream is true", *p)
			}
			return nil
		}
		n := int(*p)
		if req.PromptLogprobs != nil { // echo with logprobs asked for some too
			n = max(n, *req.PromptLogprobs)
		}
		req.PromptLogprobs = &n
	}
	return nil
}

// ints converts JSON ids to ints; the Generator checks their range.
func ints(ids []int64) []int {
	if ids == nil {
		return nil
	}
	out := make([]int, len(ids))
	for i, id := range ids {
		out[i] = int(id)
	}
	return out
}

// body is a generation endpoint's request body.
type body interface {
	// request checks the body and turns it into a Request for g's Generator.
	request(ctx context.Context, g *Gateway) (Request, error)
	sampling() *samplingFields
}

// completionRequest is the body of POST /v1/completions.
type completionRequest struct {
	Model  string          `json:"model"`
	Prompt json.RawMessage `json:"prompt"` // a string or an array of token ids (or a one-element array of either)
	Echo   bool            `json:"echo"`
	BestOf *int64          `json:"best_of"`
	Suffix *string         `json:"suffix"`
	samplingFields
}

// chatRequest is the body of POST /v1/chat/completions.
type chatRequest struct {
	Model               string            `json:"model"`
	Messages            []chatMessage     `json:"messages"`
	MaxCompletionTokens *int64            `json:"max_completion_tokens"` // OpenAI's newer max_tokens; wins over it
	AddGenerationPrompt *bool             `json:"add_generation_prompt"` // vLLM; default true
	Tools               []json.RawMessage `json:"tools"`
	ToolChoice          json.RawMessage   `json:"tool_choice"`
	ParallelToolCalls   *bool             `json:"parallel_tool_calls"` // accepted; the model decides
	TopLogprobs         *int64            `json:"top_logprobs"`
	samplingFields

	tools toolChoice // set by request
}

// chatMessage is one turn: content is a string, or an array of {"type": "text", "text"} and
// {"type": "image_url", "image_url": {"url"}} parts; an
// assistant's may have tool_calls, a tool's a tool_call_id.
type chatMessage struct {
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content"`
	ToolCalls  []chatToolCall  `json:"tool_calls"`
	ToolCallID string          `json:"tool_call_id"`
}

func (s *samplingFields) sampling() *samplingFields { return s }

// start makes the checks both endpoints begin with: the model (an unknown one is the Generator's
// 404), then the OpenAI fields the gateway does not implement.
func (g *Gateway) start(model string, s *samplingFields) (Model, error) {
	m, err := g.gen.Model(model)
	if err != nil {
		return Model{}, err
	}
	return m, s.unsupported()
}

// request turns a completion request into a Request.
func (b *completionRequest) request(_ context.Context, g *Gateway) (Request, error) {
	m, err := g.start(b.Model, &b.samplingFields)
	if err != nil {
		return Request{}, err
	}
	switch {
	case b.BestOf != nil && *b.BestOf != 1:
		return Request{}, invalid("best_of %d: only one choice per request is supported", *b.BestOf)
	case b.Suffix != nil && *b.Suffix != "":
		return Request{}, invalid("suffix is not supported")
	}
	on, top, err := completionLogprobs(b.Logprobs)
	if err != nil {
		return Request{}, err
	}
	text, ids, err := parsePrompt(b.Prompt)
	if err != nil {
		return Request{}, err
	}
	req := Request{Model: b.Model, Prompt: text, PromptIDs: ints(ids), Logprobs: on, TopLogprobs: top}
	if on && b.Echo { // the prompt's tokens are written with theirs, as vLLM does
		req.PromptLogprobs = &top
	}
	n := len(ids)
	if text != "" && b.MaxTokens == nil {
		if tok, err := g.gen.Tokenizer(); err == nil {
			n = len(tok.Encode(text, true)) // the Generator encodes it again; this only sizes the default max_tokens
		}
	}
	return req, b.fill(&req, m, b.MaxTokens, n)
}

// parsePrompt reads a completion prompt: a string, an array of token ids, or a one-element array of
// either. Absent or null is no prompt (the Generator says so).
func parsePrompt(raw json.RawMessage) (string, []int64, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil, nil
	}
	var text string
	if json.Unmarshal(raw, &text) == nil {
		return text, nil, nil
	}
	var ids []int64
	if json.Unmarshal(raw, &ids) == nil {
		return "", ids, nil
	}
	var batch []json.RawMessage
	if json.Unmarshal(raw, &batch) == nil && len(batch) > 0 {
		// A batch: strings or arrays of ids.
		if inner := bytes.TrimSpace(batch[0]); len(inner) > 0 && (inner[0] == '"' || inner[0] == '[') {
			if len(batch) > 1 {
				return "", nil, invalid("prompt: a batch of %d prompts is not supported; send one prompt per request", len(batch))
			}
			if json.Unmarshal(inner, &text) == nil {
				return text, nil, nil
			}
			if json.Unmarshal(inner, &ids) == nil {
				return "", ids, nil
			}
		}
	}
	return "", nil, invalid("prompt must be a string or an array of token ids")
}

// request renders a chat request's messages with the model's chat template and a generation prompt,
// and turns the request into a Request of the prompt's ids.
func (b *chatRequest) request(ctx context.Context, g *Gateway) (Request, error) {
	m, err := g.start(b.Model, &b.samplingFields)
	if err != nil {
		return Request{}, err
	}
	tools, mode, err := readTools(b.Tools, b.ToolChoice)
	if err != nil {
		return Request{}, err
	}
	b.tools = mode
	on, top, err := chatLogprobs(b.Logprobs, b.TopLogprobs)
	if err != nil {
		return Request{}, err
	}
	tok, err := g.gen.Tokenizer()
	if err != nil {
		return Request{}, err
	}
	msgs, err := messages(b.Messages)
	if err != nil {
		return Request{}, err
	}
	images, err := g.chatImages(ctx, m, b.Messages, msgs) // media.go
	if err != nil {
		return Request{}, err
	}
	addGen := b.AddGenerationPrompt == nil || *b.AddGenerationPrompt
	ids, err := tok.EncodeChat(msgs, tools, addGen)
	if err != nil {
		return Request{}, fmt.Errorf("%w: messages: %w", ErrInvalidRequest, err)
	}
	req := Request{Model: b.Model, PromptIDs: ids, Logprobs: on, TopLogprobs: top, Images: images}
	maxTokens := b.MaxTokens
	if b.MaxCompletionTokens != nil {
		maxTokens = b.MaxCompletionTokens
	}
	return req, b.fill(&req, m, maxTokens, len(ids))
}

// messages reads a chat's messages: at least one, each with a role.
func messages(in []chatMessage) ([]Message, error) {
	if len(in) == 0 {
		return nil, invalid("messages: empty: send at least one message")
	}
	msgs := make([]Message, len(in))
	for i, msg := range in {
		if msg.Role == "" {
			return nil, invalid("messages[%d]: no role", i)
		}
		content, err := messageContent(msg.Content)
		if err != nil {
			return nil, invalid("messages[%d].content: %v", i, err)
		}
		calls, err := toolCalls(msg.ToolCalls)
		if err != nil {
			return nil, invalid("messages[%d].%v", i, err)
		}
		msgs[i] = Message{Role: msg.Role, Content: content, ToolCalls: calls, ToolCallID: msg.ToolCallID}
	}
	return msgs, nil
}

// completionLogprobs reads a completion's logprobs: absent, null or false is none; an integer in [0,
// maxLogprobs] asks for the chosen token's and that many top ones.
func completionLogprobs(raw json.RawMessage) (bool, int, error) {
	if isEmptyJSON(raw, "false") {
		return false, 0, nil
	}
	var n int64
	if err := json.Unmarshal(raw, &n); err != nil || n < 0 || n > maxLogprobs {
		return false, 0, invalid("logprobs %s must be an integer in [0, %d]", bytes.TrimSpace(raw), maxLogprobs)
	}
	return true, int(n), nil
}

// chatLogprobs reads a chat request's logprobs (true or false) and top_logprobs ([0, maxLogprobs], which
// needs logprobs true when positive).
func chatLogprobs(raw json.RawMessage, top *int64) (bool, int, error) {
	var on bool
	if !isEmptyJSON(raw) {
		if err := json.Unmarshal(raw, &on); err != nil {
			return false, 0, invalid("logprobs %s must be true or false", bytes.TrimSpace(raw))
		}
	}
	if top == nil {
		return on, 0, nil
	}
	switch {
	case *top < 0 || *top > maxLogprobs:
		return false, 0, invalid("top_logprobs %d must be in [0, %d]", *top, maxLogprobs)
	case *top > 0 && !on:
		return false, 0, invalid("top_logprobs needs logprobs set to true")
	}
	return on, int(*top), nil
}

// messageContent reads a message's content: a string, null (""), or an array of text parts, joined
// with newlines as vLLM does, and image_url parts, left out here (chatImages renders their placeholders).
func messageContent(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string  `json:"type"`
		Text *string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("want a string or an array of content parts")
	}
	texts := make([]string, 0, len(parts))
	for i, p := range parts {
		if p.Type == "image_url" {
			continue
		}
		if p.Type != "text" || p.Text == nil {
			return "", fmt.Errorf("part %d: type %q is not supported: only text and image_url parts", i, p.Type)
		}
		texts = append(texts, *p.Text)
	}
	return strings.Join(texts, "\n"), nil
}

// decodeBody reads a JSON request body into v. It reads the body to its end, which lets the server
// notice when the client goes away (the request's context is cancelled then). Errors are 400 (413 for
// a body too large) and name the problem.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(bodyReadTimeout)) // unsupported on some connections: then unbounded
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBytes))
	_ = rc.SetReadDeadline(time.Time{})
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return &httpError{http.StatusRequestEntityTooLarge, "request_too_large", invalid("request body larger than %d bytes", tooLarge.Limit)}
	case err != nil:
		return invalid("reading the request body: %v", err)
	case len(bytes.TrimSpace(data)) == 0:
		return invalid("empty request body: want a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return invalid("malformed JSON body: %s", jsonProblem(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return invalid("malformed JSON body: data after the JSON object at byte %d", dec.InputOffset())
	}
	return nil
}

// jsonProblem describes a JSON decoding error in the request's terms: the field and the types, not
// Go's.
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("%v (at byte %d)", strings.TrimPrefix(syn.Error(), "json: "), syn.Offset)
	case errors.As(err, &typ):
		what := "the body"
		if typ.Field != "" {
			// The path names the embedded struct of a promoted field; the client knows only the key.
			what = "field " + strings.TrimPrefix(typ.Field, "samplingFields.")
		}
		return fmt.Sprintf("%s: want %s, got %s", what, jsonKind(typ.Type), typ.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected end of the body"
	}
	return strings.TrimPrefix(err.Error(), "json: ")
}

// jsonKind names the JSON value a Go type takes.
func jsonKind(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	case reflect.Slice, reflect.Array:
		return "an array"
	default:
		return "an object"
	}
}
