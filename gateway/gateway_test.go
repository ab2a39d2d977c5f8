package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
)

// fakeGen is a Generator whose model counts: after a prompt ending in id k it generates k+1, k+2, …,
// each with the text "<k+1>". Its tokenizer (when tok is set) encodes a text as its bytes after a BOS
// of 1, and a chat as the bytes of "role: content\n" for each message.
type fakeGen struct {
	tok     bool
	serving error
	genErr  error // Generate's error
	failAt  int   // when > 0: Next fails after this many tokens
	failErr error
	texts   []string // when set: the chunks' texts, the last one finishing with "stop"
	images  int      // when > 0: the model takes this many images a request, placeholder "<|image|>"

	onGenerate func(Request) // when set: called with each request

	mu     sync.Mutex
	last   Request
	closed int
}

var _ Generator = (*fakeGen)(nil)

func (f *fakeGen) Model(name string) (Model, error) {
	if name != "" && name != "fake" {
		return Model{}, &Error{Kind: ErrNotFound, Code: "model_not_found", Err: fmt.Errorf("fake: unknown model %q", name)}
	}
	m := Model{Name: "fake", MaxModelLen: 64}
	if f.images > 0 {
		m.ImagePlaceholder, m.MaxImages = "<|image|>", f.images
	}
	return m, nil
}

func (f *fakeGen) Tokenizer() (Tokenizer, error) {
	if !f.tok {
		return nil, &Error{Kind: ErrInvalidRequest, Code: "no_tokenizer", Err: errors.New("fake: no tokenizer")}
	}
	return fakeTok{}, nil
}

func (f *fakeGen) Serving() error { return f.serving }

func (f *fakeGen) Generate(_ context.Context, req Request) (Stream, error) {
	f.mu.Lock()
	f.last = req
	f.mu.Unlock()
	if f.onGenerate != nil {
		f.onGenerate(req)
	}
	if f.genErr != nil {
		return nil, f.genErr
	}
	prompt := req.PromptIDs
	if req.Prompt != "" {
		prompt = fakeTok{}.Encode(req.Prompt, true)
	}
	if len(prompt) == 0 || req.MaxTokens <= 0 {
		return nil, fmt.Errorf("fake: %w: empty prompt or max_tokens %d", ErrInvalidRequest, req.MaxTokens)
	}
	return &fakeStream{f: f, prompt: prompt, next: prompt[len(prompt)-1] + 1, left: req.MaxTokens, lp: req.Logprobs, top: req.TopLogprobs,
		promptLps: req.PromptLogprobs}, nil
}

type fakeStream struct {
	f          *fakeGen
	prompt     []int
	next, left int
	sent       int
	lp         bool // logprobs: the chosen id k has -k/100; the top ones are k+1, k+2, … with -0.5, -1, …
	top        int
	// promptLps (prompt logprobs asked for): the first chunk has them; prompt token i (i >= 1) has
	// -i/10, its top ones are its id+1, id+2, … with -0.25, -0.5, …
	promptLps *int
}

func (s *fakeStream) PromptIDs() []int { return s.prompt }

func (s *fakeStream) Next(ctx context.Context) (Chunk, error) {
	if err := ctx.Err(); err != nil {
		return Chunk{}, err
	}
	if s.f.failAt > 0 && s.sent == s.f.failAt {
		return Chunk{}, s.f.failErr
	}
	ch := Chunk{IDs: []int{s.next}, Text: fmt.Sprintf("<%d>", s.next)}
	last := false
	if texts := s.f.texts; len(texts) > 0 {
		ch.Text, last = texts[s.sent], s.sent == len(texts)-1
	}
	if s.lp {
		t := TokenLogprobs{Logprob: -float32(s.next) / 100}
		for i := range s.top {
			t.Top = append(t.Top, TokenLogprob{ID: s.next + i + 1, Logprob: -float32(i+1) / 2})
		}
		ch.Logprobs = []TokenLogprobs{t}
	}
	if s.promptLps != nil && s.sent == 0 {
		ch.PromptLogprobs = []TokenLogprobs{}
		for i, id := range s.prompt[1:] {
			t := TokenLogprobs{Logprob: -float32(i+1) / 10, Rank: i + 1}
			for k := range *s.promptLps {
				t.Top = append(t.Top, TokenLogprob{ID: id + k + 1, Logprob: -float32(k+1) / 4})
			}
			ch.PromptLogprobs = append(ch.PromptLogprobs, t)
		}
	}
	s.next++
	s.sent++
	if s.left--; s.left == 0 {
		ch.Finish = FinishLength
	}
	if last {
		ch.Finish = FinishStop
	}
	return ch, nil
}

func (s *fakeStream) Close() {
	s.f.mu.Lock()
	s.f.closed++
	s.f.mu.Unlock()
}

type fakeTok struct{}

func (fakeTok) Encode(text string, addSpecial bool) []int {
	var ids []int
	if addSpecial {
		ids = append(ids, 1)
	}
	for _, b := range []byte(text) {
		ids = append(ids, int(b))
	}
	return ids
}

func (fakeTok) Decode(ids []int) (string, error) {
	var b []byte
	for _, id := range ids {
		if id > 1 {
			b = append(b, byte(id))
		}
	}
	return string(b), nil
}

// DecodeSpecial writes each id k as "<k>".
func (fakeTok) DecodeSpecial(ids []int) (string, error) {
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "<%d>", id)
	}
	return b.String(), nil
}

// Token is the id's byte, quoted.
func (fakeTok) Token(id int) (string, bool) {
	return strconv.Quote(string(rune(id))), id >= 0 && id < 256
}

// EncodeChat writes "tools: [...]\n" when there are tools, then "role: content\n" per message (and
// "call name args\n" per tool call); it refuses role tool (a template error).
func (fakeTok) EncodeChat(msgs []Message, tools []json.RawMessage, addGenerationPrompt bool) ([]int, error) {
	var b strings.Builder
	if tools != nil {
		t, _ := json.Marshal(tools)
		fmt.Fprintf(&b, "tools: %s\n", t)
	}
	for _, m := range msgs {
		if m.Role == "tool" {
			return nil, errors.New("role tool is not in the template")
		}
		fmt.Fprintf(&b, "%s: %s\n", m.Role, m.Content)
		for _, c := range m.ToolCalls {
			fmt.Fprintf(&b, "call %s %s\n", c.Name, c.Arguments)
		}
	}
	if addGenerationPrompt {
		b.WriteString("assistant: ")
	}
	return fakeTok{}.Encode(b.String(), false), nil
}

// serve starts a gateway of f on a test server and returns its base URL.
func serve(t *testing.T, f *fakeGen) string {
	t.Helper()
	g, err := New(Config{Generator: f})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	return srv.URL
}

// call sends a request and returns its status, headers and body.
func call(t *testing.T, method, url, body string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return gatewaytest.Call(t, ctx, method, url, body)
}

func decode[T any](t *testing.T, data []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("decoding %s: %v", data, err)
	}
	return v
}

// TestRequest: the JSON fields become the Generator's Request: max_tokens (or the rest of the context),
// sampling fields only when set, vLLM's top_k -1 as 0, stop ids, text prompts, chat prompts.
func TestRequest(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	temp, topP, k0, k5, seed := 0.5, 0.9, 0, 5, uint64(1<<64-7)
	for _, tc := range []struct {
		path, body string
		want       Request
	}{
		{"/v1/completions", `{"prompt":[10,11],"max_tokens":3}`, Request{PromptIDs: []int{10, 11}, MaxTokens: 3}},
		{"/v1/completions", `{"model":"fake","prompt":[[7]],"ignore_eos":true,"stop_token_ids":[9,8]}`,
			Request{Model: "fake", PromptIDs: []int{7}, MaxTokens: 63, IgnoreEOS: true, StopIDs: []int{9, 8}}},
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"temperature":0.5,"top_p":0.9,"top_k":-1,"seed":-7}`,
			Request{PromptIDs: []int{1}, MaxTokens: 2, Sampling: Sampling{Temperature: &temp, TopP: &topP, TopK: &k0, Seed: &seed}}},
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"top_k":5}`, Request{PromptIDs: []int{1}, MaxTokens: 2, Sampling: Sampling{TopK: &k5}}},
		// stop: a string, a list, "" as none; include_stop_str_in_output is vLLM's.
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"stop":"\n"}`, Request{PromptIDs: []int{1}, MaxTokens: 2, Stop: []string{"\n"}}},
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"stop":""}`, Request{PromptIDs: []int{1}, MaxTokens: 2}},
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"stop":["a","bc"],"include_stop_str_in_output":true}`,
			Request{PromptIDs: []int{1}, MaxTokens: 2, Stop: []string{"a", "bc"}, IncludeStopStr: true}},
		{"/v1/completions", `{"prompt":[1],"max_tokens":2,"response_format":{"type":"text"}}`, Request{PromptIDs: []int{1}, MaxTokens: 2}},
		// A text prompt: the rest of the context after its encoding (BOS + 2 bytes).
		{"/v1/completions", `{"prompt":"hi"}`, Request{Prompt: "hi", MaxTokens: 61}},
		{"/v1/completions", `{"prompt":["hi"],"max_tokens":2}`, Request{Prompt: "hi", MaxTokens: 2}},
		{"/v1/chat/completions", `{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_tokens":9,"max_completion_tokens":2}`,
			Request{PromptIDs: fakeTok{}.Encode("user: a\nb\nassistant: ", false), MaxTokens: 2}},
		{"/v1/chat/completions", `{"messages":[{"role":"user","content":null}],"add_generation_prompt":false}`,
			Request{PromptIDs: fakeTok{}.Encode("user: \n", false), MaxTokens: 64 - 7}},
	} {
		code, _, data := call(t, http.MethodPost, base+tc.path, tc.body)
		f.mu.Lock()
		got := f.last
		f.mu.Unlock()
		gs, ws := got, tc.want
		gs.Sampling, ws.Sampling = Sampling{}, Sampling{}
		if code != http.StatusOK || !reflect.DeepEqual(gs, ws) || !sameSampling(got.Sampling, tc.want.Sampling) {
			t.Errorf("POST %s %s = %d %s, Request %+v; want 200, Request %+v", tc.path, tc.body, code, data, got, tc.want)
		}
	}
}

func sameSampling(a, b Sampling) bool {
	eq := func(x, y any) bool { return fmt.Sprint(x) == fmt.Sprint(y) }
	deref := func(p any) any {
		switch v := p.(type) {
		case *float64:
			if v != nil {
				return *v
			}
		case *int:
			if v != nil {
				return *v
			}
		case *uint64:
			if v != nil {
				return *v
			}
		}
		return nil
	}
	return eq(deref(a.Temperature), deref(b.Temperature)) && eq(deref(a.TopP), deref(b.TopP)) &&
		eq(deref(a.TopK), deref(b.TopK)) && eq(deref(a.Seed), deref(b.Seed))
}

// TestResponses: whole and streamed responses of both endpoints, in OpenAI's formats.
func TestResponses(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)

	code, _, data := call(t, http.MethodGet, base+"/v1/models", "")
	if ms := decode[ModelList](t, data); code != http.StatusOK || ms.Object != "list" || len(ms.Data) != 1 || ms.Data[0].ID != "fake" ||
		ms.Data[0].Object != "model" || ms.Data[0].OwnedBy != "tpfleet" || ms.Data[0].MaxModelLen != 64 {
		t.Errorf("GET /v1/models = %d %s, want 200, a list of fake with max_model_len 64", code, data)
	}
	if code, _, data := call(t, http.MethodGet, base+"/v1/models/fake", ""); code != http.StatusOK || decode[ModelCard](t, data).ID != "fake" {
		t.Errorf("GET /v1/models/fake = %d %s, want 200 and the model", code, data)
	}
	if code, _, data := call(t, http.MethodGet, base+"/health", ""); code != http.StatusOK || len(data) != 0 {
		t.Errorf("GET /health = %d %q, want 200 and no body", code, data)
	}

	code, _, data = call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[10,11],"max_tokens":3,"return_token_ids":true}`)
	res := decode[CompletionResponse](t, data)
	if code != http.StatusOK || res.Object != "text_completion" || !strings.HasPrefix(res.ID, "cmpl-") || res.Model != "fake" || len(res.Choices) != 1 ||
		res.Choices[0].Text != "<12><13><14>" || !slices.Equal(res.Choices[0].TokenIDs, []int{12, 13, 14}) || !slices.Equal(res.Choices[0].PromptTokenIDs, []int{10, 11}) ||
		res.Choices[0].FinishReason == nil || *res.Choices[0].FinishReason != FinishLength || res.Usage == nil || *res.Usage != (Usage{PromptTokens: 2, CompletionTokens: 3, TotalTokens: 5}) {
		t.Errorf("POST /v1/completions = %d %s; want text <12><13><14>, ids, prompt ids, finish length, usage 2+3", code, data)
	}
	if _, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[10],"max_tokens":1}`); strings.Contains(string(data), "token_ids") {
		t.Errorf("POST /v1/completions without return_token_ids = %s, want no token_ids", data)
	}

	code, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", `{"messages":[{"role":"user","content":"x"}],"max_tokens":2}`)
	chat := decode[ChatResponse](t, data)
	if code != http.StatusOK || chat.Object != "chat.completion" || !strings.HasPrefix(chat.ID, "chatcmpl-") || len(chat.Choices) != 1 || chat.Choices[0].Message == nil ||
		chat.Choices[0].Message.Role != "assistant" || *chat.Choices[0].Message.Content != "<33><34>" || *chat.Choices[0].FinishReason != FinishLength || chat.Usage.CompletionTokens != 2 {
		t.Errorf("POST /v1/chat/completions = %d %s; want the assistant's <33><34>, finish length", code, data)
	}

	// Streamed completion: a chunk per token, prompt ids on the first, finish on the last, then usage.
	code, hdr, data := call(t, http.MethodPost, base+"/v1/completions",
		`{"prompt":[10],"max_tokens":3,"return_token_ids":true,"stream":true,"stream_options":{"include_usage":true}}`)
	if code != http.StatusOK || hdr.Get("Content-Type") != "text/event-stream" || hdr.Get("Cache-Control") != "no-cache" {
		t.Fatalf("POST /v1/completions (stream) = %d %v %s, want 200 text/event-stream", code, hdr, data)
	}
	evs := gatewaytest.Events(t, data)
	if len(evs) != 4 {
		t.Fatalf("stream events %q, want 3 chunks and a usage chunk", evs)
	}
	for i, ev := range evs[:3] {
		ch := decode[CompletionResponse](t, []byte(ev))
		c := ch.Choices[0]
		if ch.ID != decode[CompletionResponse](t, []byte(evs[0])).ID || ch.Usage != nil || !slices.Equal(c.TokenIDs, []int{11 + i}) ||
			c.Text != fmt.Sprintf("<%d>", 11+i) || (c.PromptTokenIDs != nil) != (i == 0) || (c.FinishReason != nil) != (i == 2) {
			t.Errorf("stream chunk %d = %s; want id %d, prompt ids on the first, finish on the last", i, ev, 11+i)
		}
	}
	if u := decode[CompletionResponse](t, []byte(evs[3])); len(u.Choices) != 0 || u.Usage == nil || *u.Usage != (Usage{PromptTokens: 1, CompletionTokens: 3, TotalTokens: 4}) {
		t.Errorf("last stream event = %s, want no choices and usage 1+3", evs[3])
	}

	// Streamed chat: the role first, then deltas.
	_, _, data = call(t, http.MethodPost, base+"/v1/chat/completions", `{"messages":[{"role":"user","content":"x"}],"max_tokens":2,"stream":true}`)
	evs = gatewaytest.Events(t, data)
	if len(evs) != 3 {
		t.Fatalf("chat stream events %q, want the role and 2 deltas", evs)
	}
	var text strings.Builder
	for i, ev := range evs {
		ch := decode[ChatResponse](t, []byte(ev))
		if ch.Object != "chat.completion.chunk" || len(ch.Choices) != 1 || ch.Choices[0].Delta == nil || (ch.Choices[0].Delta.Role == "assistant") != (i == 0) ||
			(ch.Choices[0].FinishReason != nil) != (i == 2) {
			t.Errorf("chat stream event %d = %s; want the role first, finish last", i, ev)
		}
		if c := ch.Choices[0].Delta.Content; c != nil {
			text.WriteString(*c)
		}
	}
	if text.String() != "<33><34>" {
		t.Errorf("streamed chat content = %q, want <33><34>", text.String())
	}
	eventually(t, "all 5 streams closed", func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.closed == 5
	})
}

// eventually waits until cond holds, failing the test after 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestErrors: the gateway's own checks, and a Generator's errors by kind, as OpenAI error bodies.
func TestErrors(t *testing.T) {
	f := &fakeGen{}
	base := serve(t, f)
	for _, tc := range []struct {
		name, method, path, body string
		status                   int
		typ, code, msg           string
	}{
		{"malformed JSON", "", "/v1/completions", `{"prompt": [1,`, 400, "invalid_request_error", "invalid_request", "gateway: invalid request: malformed JSON body: unexpected end"},
		{"bad JSON syntax", "", "/v1/completions", `{"prompt": [1,]}`, 400, "invalid_request_error", "invalid_request", "malformed JSON body: invalid character ']'"},
		{"wrong type", "", "/v1/completions", `{"prompt":[1],"max_tokens":"5"}`, 400, "invalid_request_error", "invalid_request", "field max_tokens: want an integer, got string"},
		{"not an object", "", "/v1/completions", `[1,2]`, 400, "invalid_request_error", "invalid_request", "want an object, got array"},
		{"data after the object", "", "/v1/completions", `{"prompt":[1]} {}`, 400, "invalid_request_error", "invalid_request", "data after the JSON object"},
		{"empty body", "", "/v1/completions", ``, 400, "invalid_request_error", "invalid_request", "empty request body"},
		{"prompt fills the context", "", "/v1/completions", `{"prompt":[` + strings.Repeat("1,", 63) + `1]}`, 400, "invalid_request_error", "invalid_request",
			"64 prompt tokens leave no room for new tokens in the model's context of 64"},
		{"n 0", "", "/v1/completions", `{"prompt":[1],"n":0}`, 400, "invalid_request_error", "invalid_request", "n 0 must be in [1, 128]"},
		{"n 129", "", "/v1/chat/completions", `{"messages":[],"n":129}`, 400, "invalid_request_error", "invalid_request", "n 129 must be in [1, 128]"},
		{"min_tokens", "", "/v1/completions", `{"prompt":[1],"min_tokens":-3}`, 400, "invalid_request_error", "invalid_request", "min_tokens -3 must be >= 0"},
		{"repetition_penalty", "", "/v1/completions", `{"prompt":[1],"repetition_penalty":0}`, 400, "invalid_request_error", "invalid_request", "repetition_penalty 0 must be > 0"},
		{"logit_bias key", "", "/v1/completions", `{"prompt":[1],"logit_bias":{"a":-100}}`, 400, "invalid_request_error", "invalid_request", `logit_bias: key "a" is not a token id`},
		{"logit_bias value", "", "/v1/completions", `{"prompt":[1],"logit_bias":{"5":"x"}}`, 400, "invalid_request_error", "invalid_request", "field logit_bias"},
		{"logprobs 21", "", "/v1/completions", `{"prompt":[1],"logprobs":21}`, 400, "invalid_request_error", "invalid_request", "logprobs 21 must be an integer in [0, 20]"},
		{"logprobs true (completions)", "", "/v1/completions", `{"prompt":[1],"logprobs":true}`, 400, "invalid_request_error", "invalid_request", "logprobs true must be an integer in [0, 20]"},
		{"logprobs 3 (chat)", "", "/v1/chat/completions", `{"messages":[],"logprobs":3}`, 400, "invalid_request_error", "invalid_request", "logprobs 3 must be true or false"},
		{"top_logprobs without logprobs", "", "/v1/chat/completions", `{"messages":[],"top_logprobs":2}`, 400, "invalid_request_error", "invalid_request", "top_logprobs needs logprobs set to true"},
		{"top_logprobs 21", "", "/v1/chat/completions", `{"messages":[],"logprobs":true,"top_logprobs":21}`, 400, "invalid_request_error", "invalid_request", "top_logprobs 21 must be in [0, 20]"},
		{"response_format json_object", "", "/v1/completions", `{"prompt":[1],"response_format":{"type":"json_object"}}`, 400, "invalid_request_error", "invalid_request", `response_format {"type":"json_object"} is not supported`},
		{"five stop strings", "", "/v1/completions", `{"prompt":[1],"stop":["a","b","c","d","e"]}`, 400, "invalid_request_error", "invalid_request", "stop: 5 strings; at most 4 are allowed"},
		{"empty stop string", "", "/v1/completions", `{"prompt":[1],"stop":["a",""]}`, 400, "invalid_request_error", "invalid_request", "stop[1] is empty"},
		{"stop not strings", "", "/v1/completions", `{"prompt":[1],"stop":[1]}`, 400, "invalid_request_error", "invalid_request", "stop must be a string or an array of strings"},
		{"response_format", "", "/v1/chat/completions", `{"messages":[],"response_format":{"type":"json_schema"}}`, 400, "invalid_request_error", "invalid_request", `response_format {"type":"json_schema"} is not supported`},
		{"echo of ids without a tokenizer", "", "/v1/completions", `{"prompt":[1],"echo":true}`, 400, "invalid_request_error", "no_tokenizer", "echo of a prompt of token ids: fake: no tokenizer"},
		{"best_of", "", "/v1/completions", `{"prompt":[1],"best_of":3}`, 400, "invalid_request_error", "invalid_request", "best_of 3: only one choice"},
		{"suffix", "", "/v1/completions", `{"prompt":[1],"suffix":"x"}`, 400, "invalid_request_error", "invalid_request", "suffix is not supported"},
		{"batch", "", "/v1/completions", `{"prompt":["a","b"]}`, 400, "invalid_request_error", "invalid_request", "a batch of 2 prompts is not supported"},
		{"prompt object", "", "/v1/completions", `{"prompt":{"text":"a"}}`, 400, "invalid_request_error", "invalid_request", "prompt must be a string or an array of token ids"},
		{"fractional id", "", "/v1/completions", `{"prompt":[1.5]}`, 400, "invalid_request_error", "invalid_request", "prompt must be a string or an array of token ids"},
		{"unknown model", "", "/v1/completions", `{"model":"gpt-2","prompt":[1]}`, 404, "invalid_request_error", "model_not_found", `fake: unknown model "gpt-2"`},
		{"unknown model (chat)", "", "/v1/chat/completions", `{"model":"gpt-2","messages":[]}`, 404, "invalid_request_error", "model_not_found", `fake: unknown model "gpt-2"`},
		{"unknown model (GET)", http.MethodGet, "/v1/models/gpt-2", "", 404, "invalid_request_error", "model_not_found", `fake: unknown model "gpt-2"`},
		{"chat without a tokenizer", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, 400, "invalid_request_error", "no_tokenizer", "fake: no tokenizer"},
		{"tool without a name", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}`, 400, "invalid_request_error", "invalid_request", `tools[0]: want {"type": "function"`},
		{"tool_choice required", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required"}`, 400, "invalid_request_error", "invalid_request", `tool_choice "required" needs constrained decoding`},
		{"tool_choice named", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"f"}}}`, 400, "invalid_request_error", "invalid_request", "a named function needs constrained decoding"},
		{"tool_choice unknown", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"tool_choice":"always"}`, 400, "invalid_request_error", "invalid_request", `tool_choice "always"`},
		{"bad message type", "", "/v1/chat/completions", `{"messages":"hi"}`, 400, "invalid_request_error", "invalid_request", "field messages: want an array, got string"},
		{"the Generator's check", "", "/v1/completions", `{"max_tokens":4}`, 400, "invalid_request_error", "invalid_request", "fake: gateway: invalid request: empty prompt or max_tokens 4"},
		{"unknown route", http.MethodGet, "/v1/embeddings", "", 404, "invalid_request_error", "not_found", "no route GET /v1/embeddings"},
		{"wrong method", http.MethodGet, "/v1/completions", "", 405, "invalid_request_error", "method_not_allowed", "method GET not allowed on /v1/completions: use POST"},
		{"wrong method (models)", http.MethodPost, "/v1/models", "", 405, "invalid_request_error", "method_not_allowed", "use GET or HEAD"},
	} {
		method := tc.method
		if method == "" {
			method = http.MethodPost
		}
		code, hdr, data := call(t, method, base+tc.path, tc.body)
		body := decode[ErrorBody](t, data)
		if code != tc.status || body.Error.Type != tc.typ || body.Error.Code != tc.code || !strings.Contains(body.Error.Message, tc.msg) ||
			body.Error.Param != nil || hdr.Get("Content-Type") != "application/json" {
			t.Errorf("%s: %s %s = %d %s; want %d, type %s, code %s, message with %q", tc.name, method, tc.path, code, data, tc.status, tc.typ, tc.code, tc.msg)
		}
	}

	// The chat checks that need a tokenizer.
	f.tok = true
	for _, tc := range []struct{ name, body, msg string }{
		{"no messages", `{"messages":[]}`, "messages: empty"},
		{"no role", `{"messages":[{"content":"hi"}]}`, "messages[0]: no role"},
		{"image part", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, "1 images for model fake, which takes no images"},
		{"audio part", `{"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]}`, `messages[0].content: part 0: type "input_audio" is not supported`},
		{"content object", `{"messages":[{"role":"user","content":{"text":"hi"}}]}`, "messages[0].content: want a string or an array of content parts"},
		{"template error", `{"messages":[{"role":"tool","content":"hi"}]}`, "gateway: invalid request: messages: role tool is not in the template"},
	} {
		code, _, data := call(t, http.MethodPost, base+"/v1/chat/completions", tc.body)
		if body := decode[ErrorBody](t, data); code != http.StatusBadRequest || body.Error.Code != "invalid_request" || !strings.Contains(body.Error.Message, tc.msg) {
			t.Errorf("%s: POST /v1/chat/completions = %d %s, want 400 invalid_request with %q", tc.name, code, data, tc.msg)
		}
	}
}

// TestErrorKinds: a Generator's errors are answered by kind, with an *Error's code, and the message as
// it is; /health answers Serving's error.
func TestErrorKinds(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err       error
		status    int
		typ, code string
	}{
		{"invalid", fmt.Errorf("x: %w: bad", ErrInvalidRequest), 400, "invalid_request_error", "invalid_request"},
		{"not found", &Error{Kind: ErrNotFound, Err: errors.New("x: gone")}, 404, "invalid_request_error", "not_found"},
		{"overloaded", &Error{Kind: ErrOverloaded, Code: "queue_full", Err: errors.New("x: queue full: 1 requests are waiting")}, 429, "rate_limit_error", "queue_full"},
		{"unavailable", &Error{Kind: ErrUnavailable, Code: "not_leader", Err: errors.New("x: standby")}, 503, "service_unavailable", "not_leader"},
		{"server error with a code", &Error{Code: "step_failed", Err: errors.New("x: step failed: cuda")}, 500, "server_error", "step_failed"},
		{"other", errors.New("x: boom"), 500, "server_error", "internal_error"},
	} {
		base := serve(t, &fakeGen{genErr: tc.err, serving: tc.err})
		for _, r := range []struct{ method, path, body string }{
			{http.MethodPost, "/v1/completions", `{"prompt":[1],"max_tokens":2}`},
			{http.MethodGet, "/health", ""},
		} {
			code, _, data := call(t, r.method, base+r.path, r.body)
			if e := decode[ErrorBody](t, data); code != tc.status || e.Error.Type != tc.typ || e.Error.Code != tc.code || e.Error.Message != tc.err.Error() {
				t.Errorf("%s: %s %s = %d %s; want %d %s %s %q", tc.name, r.method, r.path, code, data, tc.status, tc.typ, tc.code, tc.err.Error())
			}
		}
	}
}

// TestStreamFailure: a failure before the end is the error whole, or an error event after the chunks
// already sent, then the stream's end.
func TestStreamFailure(t *testing.T) {
	f := &fakeGen{failAt: 2, failErr: &Error{Code: "step_failed", Err: errors.New("x: step failed: illegal memory access")}}
	base := serve(t, f)
	code, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[5],"max_tokens":4}`)
	if e := decode[ErrorBody](t, data); code != 500 || e.Error.Code != "step_failed" || !strings.Contains(e.Error.Message, "illegal memory access") {
		t.Errorf("POST /v1/completions failing = %d %s, want 500 step_failed", code, data)
	}
	code, _, data = call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[5],"max_tokens":4,"stream":true,"return_token_ids":true}`)
	evs := gatewaytest.Events(t, data)
	if code != http.StatusOK || len(evs) != 3 {
		t.Fatalf("POST /v1/completions (stream) failing = %d %s, want 200, 2 chunks and an error event", code, data)
	}
	var ids []int
	for _, ev := range evs[:2] {
		ids = append(ids, decode[CompletionResponse](t, []byte(ev)).Choices[0].TokenIDs...)
	}
	if e := decode[ErrorBody](t, []byte(evs[2])); !slices.Equal(ids, []int{6, 7}) || e.Error.Code != "step_failed" || e.Error.Type != "server_error" {
		t.Errorf("failing stream = ids %v, last event %s; want [6 7], then a step_failed error", ids, evs[2])
	}
}

// TestConfig: New refuses a Config without a Generator.
func TestConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil || !strings.Contains(err.Error(), "no Generator") {
		t.Errorf("New(Config{}) = %v, want an error naming the missing Generator", err)
	}
	g, err := New(Config{Generator: &fakeGen{}})
	if err != nil {
		t.Fatal(err)
	}
	if srv := g.NewServer(); srv.Handler != g || srv.WriteTimeout != 0 || srv.ReadTimeout != 0 || srv.ReadHeaderTimeout != headerReadTimeout {
		t.Errorf("NewServer() = %+v, want the gateway's handler, no read or write timeout, a header timeout", srv)
	}
}

// TestChoices: n choices, each with its index and its seed (the request's + index), whole and streamed
// (events interleaved, each with its index; usage sums the choices); echo puts the prompt's text before
// each choice's.
func TestChoices(t *testing.T) {
	f := &fakeGen{tok: true}
	base := serve(t, f)
	var mu sync.Mutex
	var seeds []uint64
	f.onGenerate = func(req Request) {
		mu.Lock()
		defer mu.Unlock()
		if req.Sampling.Seed != nil {
			seeds = append(seeds, *req.Sampling.Seed)
		}
	}
	code, _, data := call(t, http.MethodPost, base+"/v1/completions", `{"prompt":[5],"max_tokens":2,"n":3,"seed":10}`)
	res := decode[CompletionResponse](t, data)
	if code != 200 || len(res.Choices) != 3 || res.Usage.CompletionTokens != 6 {
		t.Fatalf("POST /v1/completions n 3 = %d %s; want 3 choices, 6 completion tokens", code, data)
	}
	for i, c := range res.Choices {
		if c.Index != i || c.Text != "<6><7>" || *c.FinishReason != FinishLength {
			t.Errorf("choice %d = %+v; want index %d, text <6><7>, finish length", i, c, i)
		}
	}
	mu.Lock()
	if !slices.Equal(seeds, []uint64{10, 11, 12}) {
		t.Errorf("seeds of n 3, seed 10 = %v; want [10 11 12]", seeds)
	}
	seeds = nil
	mu.Unlock()

	// Streamed chat: a role chunk per choice, then deltas that add up per index.
	code, _, data = call(t, http.MethodPost, base+"/v1/chat/completions",
		`{"messages":[{"role":"user","content":"a"}],"max_tokens":3,"n":2,"stream":true,"stream_options":{"include_usage":true}}`)
	texts, finishes, roles := map[int]string{}, map[int]string{}, 0
	evs := gatewaytest.Events(t, data)
	for _, ev := range evs[:len(evs)-1] {
		ch := decode[ChatResponse](t, []byte(ev))
		c := ch.Choices[0]
		if c.Delta.Role == "assistant" {
			roles++
		}
		if c.Delta.Content != nil {
			texts[c.Index] += *c.Delta.Content
		}
		if c.FinishReason != nil {
			finishes[c.Index] = *c.FinishReason
		}
	}
	u := decode[ChatResponse](t, []byte(evs[len(evs)-1])).Usage
	if code != 200 || roles != 2 || texts[0] != "<33><34><35>" || texts[1] != texts[0] || finishes[0] != FinishLength || finishes[1] != FinishLength ||
		u == nil || u.CompletionTokens != 6 {
		t.Errorf("POST /v1/chat/completions n 2 stream = %d %s; want 2 roles, texts <33><34><35> at indexes 0 and 1, usage of 6", code, data)
	}
	mu.Lock()
	if len(seeds) != 2 {
		t.Errorf("seeds of n 2 without a seed = %v; want 2 random seeds", seeds)
	}
	mu.Unlock()

	// echo: the prompt's text first, whole and streamed; ids are decoded.
	for _, tc := range []struct{ body, want string }{
		{`{"prompt":"ab","max_tokens":1,"echo":true}`, "ab<99>"},
		{`{"prompt":[1,104,105],"max_tokens":1,"echo":true}`, "hi<106>"},
		{`{"prompt":"ab","max_tokens":2,"echo":true,"stream":true}`, "ab<99><100>"},
	} {
		code, _, data := call(t, http.MethodPost, base+"/v1/completions", tc.body)
		got := ""
		if strings.Contains(tc.body, "stream") {
			for _, ev := range gatewaytest.Events(t, data) {
				got += decode[CompletionResponse](t, []byte(ev)).Choices[0].Text
			}
		} else {
			got = decode[CompletionResponse](t, data).Choices[0].Text
		}
		if code != 200 || got != tc.want {
			t.Errorf("POST /v1/completions %s = %d %s; want text %q", tc.body, code, data, tc.want)
		}
	}
}

// TestAPIKeys: with several API keys, /v1 routes accept each of them (in any case of "Bearer") and
// refuse a missing, wrong or malformed one with 401 and an OpenAI error body; /health stays open.
func TestAPIKeys(t *testing.T) {
	g, err := New(Config{Generator: &fakeGen{}, APIKeys: []string{"sk-first", "sk-second"}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		path, auth string
		code       int
	}{
		{"/health", "", http.StatusOK},
		{"/v1/models", "", http.StatusUnauthorized},
		{"/v1/models", "Bearer sk-third", http.StatusUnauthorized},
		{"/v1/models", "Bearer sk-firs", http.StatusUnauthorized},
		{"/v1/models", "sk-first", http.StatusUnauthorized},
		{"/v1/models", "Basic sk-first", http.StatusUnauthorized},
		{"/v1/models", "Bearer ", http.StatusUnauthorized},
		{"/v1/models", "Bearer sk-first", http.StatusOK},
		{"/v1/models", "bearer sk-second", http.StatusOK},
	} {
		req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, srv.URL+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			Error struct{ Code string } `json:"error"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&body)
		_ = resp.Body.Close()
		if resp.StatusCode != tc.code || (tc.code == http.StatusUnauthorized && body.Error.Code != "unauthorized") {
			t.Errorf("GET %s with %q = %d %+v, want %d", tc.path, tc.auth, resp.StatusCode, body, tc.code)
		}
	}
}
