package coordinator

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/gateway/gatewaytest"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// startGateway starts a coordinator with its HTTP gateway on a free port; it returns the coordinator,
// a gRPC client of it and the gateway's base URL.
func startGateway(t *testing.T, cfg Config) (*Coordinator, *testClient, string) {
	t.Helper()
	cfg.HTTPAddr = "127.0.0.1:0"
	c, cli := startCoordinator(t, cfg)
	if c.HTTPAddr() == "" {
		t.Fatal("HTTPAddr() is empty after Start with an HTTP address")
	}
	return c, cli, "http://" + c.HTTPAddr()
}

// call sends a request to the gateway and returns its status, headers and body.
func call(t *testing.T, ctx context.Context, method, url, body string) (int, http.Header, []byte) {
	t.Helper()
	return gatewaytest.Call(t, ctx, method, url, body)
}

// post sends a JSON body to the gateway and returns its status and body.
func post(t *testing.T, base, path, body string) (int, []byte) {
	t.Helper()
	code, _, data := call(t, testCtx(t), http.MethodPost, base+path, body)
	return code, data
}

func decode[T any](t *testing.T, data []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("decoding %s: %v", data, err)
	}
	return v
}

// greedyIDs runs a greedy request through gRPC, the reference the gateway's answers must equal.
func greedyIDs(t *testing.T, cli *testClient, req client.GenerateRequest) client.GenerateResult {
	t.Helper()
	req.Sampling = greedy()
	res, err := cli.Generate(testCtx(t), req, nil)
	if err != nil {
		t.Fatalf("Generate(%+v): %v", req, err)
	}
	return res
}

// grpcMessage returns the status message that Generate fails in with.
func grpcMessage(t *testing.T, cli *testClient, in *pb.GenerateRequest) string {
	t.Helper()
	stream, err := cli.gen.Generate(testCtx(t), in)
	if err == nil {
		_, err = stream.Recv()
	}
	if err == nil {
		t.Fatalf("Generate(%v) succeeded, want an error", in)
	}
	return status.Convert(err).Message()
}

// TestOpenAICompletions: /v1/models, /health, and /v1/completions whole and streamed give the ids of
// Generate for the same greedy request; max_tokens left out runs to the end of the context.
func TestOpenAICompletions(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	c, cli, base := startGateway(t, testConfig(t))
	waitReady(t, c)
	ctx := testCtx(t)

	code, _, data := call(t, ctx, http.MethodGet, base+"/v1/models", "")
	models := decode[gateway.ModelList](t, data)
	if code != http.StatusOK || models.Object != "list" || len(models.Data) != 1 ||
		models.Data[0].ID != "moe-top1" || models.Data[0].Object != "model" || models.Data[0].MaxModelLen != 256 {
		t.Errorf("GET /v1/models = %d %s, want 200, a list of moe-top1 with max_model_len 256", code, data)
	}
	if code, _, data := call(t, ctx, http.MethodGet, base+"/v1/models/moe-top1", ""); code != http.StatusOK || decode[gateway.ModelCard](t, data).ID != "moe-top1" {
		t.Errorf("GET /v1/models/moe-top1 = %d %s, want 200 and the model", code, data)
	}
	if code, _, data := call(t, ctx, http.MethodGet, base+"/health", ""); code != http.StatusOK {
		t.Errorf("GET /health = %d %s, want 200", code, data)
	}

	want := greedyIDs(t, cli, client.GenerateRequest{PromptIDs: []int{10, 11}, MaxTokens: 6, IgnoreEOS: true})
	wantIDs := want.IDs
	code, data = post(t, base, "/v1/completions",
		`{"model":"moe-top1","prompt":[10,11],"max_tokens":6,"temperature":0,"ignore_eos":true,"return_token_ids":true}`)
	res := decode[gateway.CompletionResponse](t, data)
	if code != http.StatusOK || res.Object != "text_completion" || !strings.HasPrefix(res.ID, "cmpl-") || res.Model != "moe-top1" || len(res.Choices) != 1 {
		t.Fatalf("POST /v1/completions = %d %s, want 200 and one text_completion choice", code, data)
	}
	ch := res.Choices[0]
	if !slices.Equal(ch.TokenIDs, wantIDs) || ch.FinishReason == nil || *ch.FinishReason != FinishLength ||
		!slices.Equal(ch.PromptTokenIDs, []int{10, 11}) || *res.Usage != (gateway.Usage{PromptTokens: 2, CompletionTokens: 6, TotalTokens: 8}) {
		t.Errorf("POST /v1/completions = %s; want token_ids %v, finish length, prompt_token_ids [10 11], usage 2+6", data, wantIDs)
	}
	// Without return_token_ids, no ids (and no text: the fixture has no tokenizer).
	_, data = post(t, base, "/v1/completions", `{"prompt":[10,11],"max_tokens":2,"temperature":0}`)
	if strings.Contains(string(data), "token_ids") || !strings.Contains(string(data), `"text":""`) {
		t.Errorf("POST /v1/completions without return_token_ids = %s, want no token_ids and empty text", data)
	}

	// Streamed: the same ids, the finish on the last choice chunk, then the usage chunk.
	code, hdr, data := call(t, ctx, http.MethodPost, base+"/v1/completions",
		`{"prompt":[10,11],"max_tokens":6,"temperature":0,"ignore_eos":true,"return_token_ids":true,"stream":true,"stream_options":{"include_usage":true}}`)
	if code != http.StatusOK || hdr.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("POST /v1/completions (stream) = %d %s %s, want 200 text/event-stream", code, hdr.Get("Content-Type"), data)
	}
	evs := gatewaytest.Events(t, data)
	if len(evs) < 2 {
		t.Fatalf("stream events %q, want chunks and a usage chunk", evs)
	}
	var ids []int
	for i, ev := range evs[:len(evs)-1] {
		chunk := decode[gateway.CompletionResponse](t, []byte(ev))
		if chunk.Object != "text_completion" || chunk.ID != decode[gateway.CompletionResponse](t, []byte(evs[0])).ID || len(chunk.Choices) != 1 || chunk.Usage != nil {
			t.Fatalf("stream chunk %d = %s, want one text_completion choice of the stream's id, no usage", i, ev)
		}
		ids = append(ids, chunk.Choices[0].TokenIDs...)
		last := i == len(evs)-2
		if fin := chunk.Choices[0].FinishReason; (fin != nil) != last || (last && *fin != FinishLength) {
			t.Errorf("stream chunk %d = %s, want finish_reason %s on the last chunk only", i, ev, FinishLength)
		}
		if got := chunk.Choices[0].PromptTokenIDs; (i == 0) != (got != nil) {
			t.Errorf("stream chunk %d = %s, want prompt_token_ids on the first chunk only", i, ev)
		}
	}
	if !slices.Equal(ids, wantIDs) {
		t.Errorf("streamed token_ids = %v, want %v", ids, wantIDs)
	}
	if u := decode[gateway.CompletionResponse](t, []byte(evs[len(evs)-1])); len(u.Choices) != 0 || u.Usage == nil || *u.Usage != (gateway.Usage{PromptTokens: 2, CompletionTokens: 6, TotalTokens: 8}) {
		t.Errorf("last stream event = %s, want no choices and usage 2+6", evs[len(evs)-1])
	}

	for _, tc := range []struct {
		name   string
		body   string
		ids    []int
		finish string
		usage  gateway.Usage
	}{
		// A prompt ending in 1 generates 2, an eos id of the fixture.
		{"eos", `{"prompt":[1],"max_tokens":5,"temperature":0}`, []int{2}, FinishStop, gateway.Usage{PromptTokens: 1, CompletionTokens: 1, TotalTokens: 2}},
		{"stop_token_ids", `{"prompt":[10],"max_tokens":5,"stop_token_ids":[13]}`, []int{11, 12, 13}, FinishStop, gateway.Usage{PromptTokens: 1, CompletionTokens: 3, TotalTokens: 4}},
		{"one-element batch", `{"prompt":[[20]],"max_tokens":2,"ignore_eos":true}`, []int{21, 22}, FinishLength, gateway.Usage{PromptTokens: 1, CompletionTokens: 2, TotalTokens: 3}},
		// max_tokens left out: the rest of the context of 256.
		{"max_tokens left out", `{"prompt":[5,6],"ignore_eos":true,"top_k":-1,"seed":-7}`, nil, FinishLength, gateway.Usage{PromptTokens: 2, CompletionTokens: 254, TotalTokens: 256}},
	} {
		code, data := post(t, base, "/v1/completions", strings.Replace(tc.body, "{", `{"return_token_ids":true,`, 1))
		res := decode[gateway.CompletionResponse](t, data)
		if code != http.StatusOK || len(res.Choices) != 1 || res.Choices[0].FinishReason == nil {
			t.Errorf("%s: POST /v1/completions = %d %s, want 200", tc.name, code, data)
			continue
		}
		ch := res.Choices[0]
		if (tc.ids != nil && !slices.Equal(ch.TokenIDs, tc.ids)) || *ch.FinishReason != tc.finish || *res.Usage != tc.usage || len(ch.TokenIDs) != tc.usage.CompletionTokens {
			t.Errorf("%s: POST /v1/completions = ids %v, finish %s, usage %+v; want %v, %s, %+v", tc.name, ch.TokenIDs, *ch.FinishReason, *res.Usage, tc.ids, tc.finish, tc.usage)
		}
	}
}

// TestOpenAIErrors: every refusal is an OpenAI error body with the right status and code, and the
// message of Generate's error for the same request.
func TestOpenAIErrors(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	c, cli, base := startGateway(t, testConfig(t))
	waitReady(t, c)
	ones := strings.Repeat("1,", 255) + "1" // 256 ids: the whole context

	for _, tc := range []struct {
		name   string
		method string // POST when empty
		path   string
		body   string
		status int
		code   string
		grpc   *pb.GenerateRequest // when set, the message must equal Generate's for it
		msg    string              // else the message must contain this
	}{
		{"malformed JSON", "", "/v1/completions", `{"prompt": [1,`, 400, "invalid_request", nil, "malformed JSON body: unexpected end"},
		{"bad JSON syntax", "", "/v1/completions", `{"prompt": [1,]}`, 400, "invalid_request", nil, "malformed JSON body: invalid character ']'"},
		{"wrong type", "", "/v1/completions", `{"prompt":[1],"max_tokens":"5"}`, 400, "invalid_request", nil, "field max_tokens: want an integer, got string"},
		{"not an object", "", "/v1/completions", `[1,2]`, 400, "invalid_request", nil, "want an object, got array"},
		{"data after the object", "", "/v1/completions", `{"prompt":[1]} {}`, 400, "invalid_request", nil, "data after the JSON object"},
		{"empty body", "", "/v1/completions", ``, 400, "invalid_request", nil, "empty request body"},
		{"no prompt", "", "/v1/completions", `{"max_tokens":4}`, 400, "invalid_request", &pb.GenerateRequest{MaxTokens: 4}, ""},
		{"id outside the vocabulary", "", "/v1/completions", `{"prompt":[1,512],"max_tokens":4}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1, 512}, MaxTokens: 4}, ""},
		{"id outside int32", "", "/v1/completions", `{"prompt":[1,4294967297],"max_tokens":4}`, 400, "invalid_request", nil,
			"prompt id 4294967297 at index 1 is outside the vocabulary [0, 512)"},
		{"max_tokens 0", "", "/v1/completions", `{"prompt":[1],"max_tokens":0}`, 400, "invalid_request", &pb.GenerateRequest{PromptIds: []int32{1}}, ""},
		{"past the context", "", "/v1/completions", `{"prompt":[1,2],"max_tokens":255}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1, 2}, MaxTokens: 255}, ""},
		{"prompt fills the context", "", "/v1/completions", `{"prompt":[` + ones + `]}`, 400, "invalid_request", nil,
			"256 prompt tokens leave no room for new tokens in the model's context of 256"},
		{"negative temperature", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"temperature":-1}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{Temperature: -1}}, ""},
		{"top_p above 1", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"top_p":1.5}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{TopP: 1.5}}, ""},
		{"stop id outside the vocabulary", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"stop_token_ids":[600]}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, StopIds: []int32{600}}, ""},
		{"unknown model", "", "/v1/completions", `{"model":"gpt-2","prompt":[1],"max_tokens":4}`, 404, "model_not_found",
			&pb.GenerateRequest{Model: "gpt-2", PromptIds: []int32{1}, MaxTokens: 4}, ""},
		{"unknown model (chat)", "", "/v1/chat/completions", `{"model":"gpt-2","messages":[{"role":"user","content":"hi"}]}`, 404, "model_not_found",
			&pb.GenerateRequest{Model: "gpt-2", PromptIds: []int32{1}, MaxTokens: 4}, ""},
		{"unknown model (GET)", http.MethodGet, "/v1/models/gpt-2", "", 404, "model_not_found",
			&pb.GenerateRequest{Model: "gpt-2", PromptIds: []int32{1}, MaxTokens: 4}, ""},
		{"text without a tokenizer", "", "/v1/completions", `{"prompt":"hello","max_tokens":4}`, 400, "no_tokenizer",
			&pb.GenerateRequest{Prompt: "hello", MaxTokens: 4}, ""},
		{"text without a tokenizer, max_tokens left out", "", "/v1/completions", `{"prompt":"hello"}`, 400, "no_tokenizer",
			&pb.GenerateRequest{Prompt: "hello", MaxTokens: 4}, ""},
		{"chat without a tokenizer", "", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, 400, "no_tokenizer", nil, "moe-top1 has no tokenizer"},
		{"n 0", "", "/v1/completions", `{"prompt":[1],"n":0}`, 400, "invalid_request", nil, "n 0 must be in [1, 128]"},
		{"stop strings without a tokenizer", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"stop":["\n"]}`, 400, "no_tokenizer",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Stop: []string{"\n"}}, ""},
		{"response_format", "", "/v1/completions", `{"prompt":[1],"response_format":{"type":"json_object"}}`, 400, "invalid_request", nil, `response_format {"type":"json_object"} is not supported`},
		{"logit_bias id outside the vocabulary", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"logit_bias":{"512":1}}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{LogitBias: map[int32]float64{512: 1}}}, ""},
		{"min_tokens above max_tokens", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"min_tokens":5}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{MinTokens: 5}}, ""},
		{"frequency_penalty out of range", "", "/v1/completions", `{"prompt":[1],"max_tokens":4,"frequency_penalty":3}`, 400, "invalid_request",
			&pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{FrequencyPenalty: 3}}, ""},
		{"echo of ids without a tokenizer", "", "/v1/completions", `{"prompt":[1],"echo":true}`, 400, "no_tokenizer", nil, "echo of a prompt of token ids: coordinator: no tokenizer"},
		{"batch", "", "/v1/completions", `{"prompt":["a","b"]}`, 400, "invalid_request", nil, "a batch of 2 prompts is not supported"},
		{"prompt object", "", "/v1/completions", `{"prompt":{"text":"a"}}`, 400, "invalid_request", nil, "prompt must be a string or an array of token ids"},
		{"fractional id", "", "/v1/completions", `{"prompt":[1.5]}`, 400, "invalid_request", nil, "prompt must be a string or an array of token ids"},
		{"unknown route", http.MethodGet, "/v1/embeddings", "", 404, "not_found", nil, "no route GET /v1/embeddings"},
		{"wrong method", http.MethodGet, "/v1/completions", "", 405, "method_not_allowed", nil, "method GET not allowed on /v1/completions: use POST"},
	} {
		method := tc.method
		if method == "" {
			method = http.MethodPost
		}
		code, hdr, data := call(t, testCtx(t), method, base+tc.path, tc.body)
		body := decode[gateway.ErrorBody](t, data)
		want := tc.msg
		if tc.grpc != nil {
			want = grpcMessage(t, cli, tc.grpc)
		}
		typ := "invalid_request_error"
		if (tc.grpc != nil && body.Error.Message != want) || (tc.grpc == nil && !strings.Contains(body.Error.Message, want)) ||
			code != tc.status || body.Error.Code != tc.code || body.Error.Type != typ || hdr.Get("Content-Type") != "application/json" {
			t.Errorf("%s: %s %s = %d %s; want %d, type %s, code %s, message %q", tc.name, method, tc.path, code, data, tc.status, typ, tc.code, want)
		}
	}
	// The coordinator still serves.
	if code, data := post(t, base, "/v1/completions", `{"prompt":[40],"max_tokens":3,"ignore_eos":true,"return_token_ids":true}`); code != http.StatusOK ||
		!slices.Equal(decode[gateway.CompletionResponse](t, data).Choices[0].TokenIDs, []int{41, 42, 43}) {
		t.Errorf("POST /v1/completions after the errors = %d %s, want 200 and [41 42 43]", code, data)
	}
}

// successor is a fake worker's "model" that writes "Hi✓ " over and over: ids are bytes in the test
// tokenizer, and ✓ takes three of them.
func successor(seq []int32) int32 {
	switch seq[len(seq)-1] {
	case 72:
		return 105 // i
	case 105:
		return 226 // ✓, first byte
	case 226:
		return 156
	case 156:
		return 147
	case 147:
		return 32 // space
	default:
		return 72 // H
	}
}

// TestOpenAIChat: with a tokenizer, chat messages are rendered with the chat template and a
// generation prompt; the reply (whole or streamed) is Generate's for those ids; text prompts of
// /v1/completions are encoded as Generate encodes them.
func TestOpenAIChat(t *testing.T) {
	dir, tok := modelWithTokenizer(t)
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	ws[0].setNext(successor)
	cfg := testConfig(t)
	cfg.Model = dir
	c, cli, base := startGateway(t, cfg)
	waitReady(t, c)

	conv := []tokenizer.Message{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "hello\nthere"}}
	messages := `[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"text","text":"there"}]}]`
	prompt, err := tok.EncodeChat(conv, true)
	if err != nil {
		t.Fatal(err)
	}
	want := greedyIDs(t, cli, client.GenerateRequest{PromptIDs: prompt, MaxTokens: 6})
	if want.Text != "Hi✓ " {
		t.Fatalf("Generate(chat prompt) text = %q, want %q", want.Text, "Hi✓ ")
	}

	code, data := post(t, base, "/v1/chat/completions", `{"model":"moe-top1","messages":`+messages+`,"max_tokens":6,"temperature":0,"return_token_ids":true}`)
	res := decode[gateway.ChatResponse](t, data)
	if code != http.StatusOK || res.Object != "chat.completion" || !strings.HasPrefix(res.ID, "chatcmpl-") || len(res.Choices) != 1 || res.Choices[0].Message == nil {
		t.Fatalf("POST /v1/chat/completions = %d %s, want 200 and one chat.completion choice", code, data)
	}
	ch := res.Choices[0]
	if ch.Message.Role != "assistant" || ch.Message.Content == nil || *ch.Message.Content != want.Text || !slices.Equal(ch.TokenIDs, want.IDs) ||
		*ch.FinishReason != FinishLength || !slices.Equal(res.PromptTokenIDs, prompt) || *res.Usage != (gateway.Usage{PromptTokens: len(prompt), CompletionTokens: 6, TotalTokens: len(prompt) + 6}) {
		t.Errorf("POST /v1/chat/completions = %s; want assistant %q, ids %v, finish length, the chat prompt %v, usage %d+6", data, want.Text, want.IDs, prompt, len(prompt))
	}

	// max_completion_tokens wins over max_tokens; add_generation_prompt false renders no assistant header.
	noGen, err := tok.EncodeChat(conv, false)
	if err != nil {
		t.Fatal(err)
	}
	_, data = post(t, base, "/v1/chat/completions", `{"messages":`+messages+`,"max_tokens":6,"max_completion_tokens":2,"add_generation_prompt":false,"return_token_ids":true}`)
	if res := decode[gateway.ChatResponse](t, data); !slices.Equal(res.PromptTokenIDs, noGen) || res.Usage == nil || res.Usage.CompletionTokens != 2 {
		t.Errorf("POST /v1/chat/completions (max_completion_tokens 2, no generation prompt) = %s; want prompt %v, 2 tokens", data, noGen)
	}

	// Streamed: the role first, then deltas of whole characters that add up to the text.
	code, hdr, body := call(t, testCtx(t), http.MethodPost, base+"/v1/chat/completions", `{"messages":`+messages+`,"max_tokens":6,"stream":true}`)
	if code != http.StatusOK || hdr.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("POST /v1/chat/completions (stream) = %d %s", code, body)
	}
	evs := gatewaytest.Events(t, body)
	var text strings.Builder
	for i, ev := range evs {
		chunk := decode[gateway.ChatResponse](t, []byte(ev))
		if chunk.Object != "chat.completion.chunk" || len(chunk.Choices) != 1 || chunk.Choices[0].Delta == nil {
			t.Fatalf("chat stream event %d = %s, want a chat.completion.chunk with a delta", i, ev)
		}
		d := chunk.Choices[0].Delta
		if (i == 0) != (d.Role == "assistant") {
			t.Errorf("chat stream event %d = %s, want the role in the first event only", i, ev)
		}
		if d.Content != nil {
			if !utf8.ValidString(*d.Content) {
				t.Errorf("chat stream event %d: content %q is not valid UTF-8", i, *d.Content)
			}
			text.WriteString(*d.Content)
		}
		last := i == len(evs)-1
		if fin := chunk.Choices[0].FinishReason; (fin != nil) != last || (last && *fin != FinishLength) {
			t.Errorf("chat stream event %d = %s, want finish_reason length on the last event only", i, ev)
		}
	}
	if text.String() != want.Text {
		t.Errorf("streamed chat content = %q, want %q", text.String(), want.Text)
	}

	// A text prompt of /v1/completions: encoded with BOS, as Generate encodes it.
	wantText := greedyIDs(t, cli, client.GenerateRequest{Prompt: "hello", MaxTokens: 5})
	_, data = post(t, base, "/v1/completions", `{"prompt":"hello","max_tokens":5,"temperature":0,"return_token_ids":true}`)
	if res := decode[gateway.CompletionResponse](t, data); len(res.Choices) != 1 || res.Choices[0].Text != wantText.Text ||
		!slices.Equal(res.Choices[0].TokenIDs, wantText.IDs) || !slices.Equal(res.Choices[0].PromptTokenIDs, []int{490, 394}) {
		t.Errorf("POST /v1/completions (text) = %s; want text %q, ids %v, prompt [490 394]", data, wantText.Text, wantText.IDs)
	}
	// The text of a streamed completion adds up too; ✓ comes whole.
	_, _, body = call(t, testCtx(t), http.MethodPost, base+"/v1/completions", `{"prompt":["hello"],"max_tokens":5,"stream":true}`)
	text.Reset()
	for _, ev := range gatewaytest.Events(t, body) {
		ch := decode[gateway.CompletionResponse](t, []byte(ev)).Choices[0]
		if (ch.Text == "" && ch.FinishReason == nil) || !utf8.ValidString(ch.Text) {
			t.Errorf("completion stream event %s: want whole characters, and no empty events but the last", ev)
		}
		text.WriteString(ch.Text)
	}
	if text.String() != wantText.Text {
		t.Errorf("streamed completion text = %q, want %q", text.String(), wantText.Text)
	}

	for _, tc := range []struct {
		name, body, msg string
	}{
		{"no messages", `{"messages":[]}`, "messages: empty"},
		{"no role", `{"messages":[{"content":"hi"}]}`, "messages[0]: no role"},
		{"image part", `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}`, "1 images: model moe-top1: model: the checkpoint takes no images: its config.json has no vision_config"},
		{"content object", `{"messages":[{"role":"user","content":{"text":"hi"}}]}`, "messages[0].content: want a string or an array of content parts"},
		{"tool without a name", `{"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}`, `tools[0]: want {"type": "function"`},
		{"bad message type", `{"messages":"hi"}`, "field messages: want an array, got string"},
	} {
		code, data := post(t, base, "/v1/chat/completions", tc.body)
		if body := decode[gateway.ErrorBody](t, data); code != http.StatusBadRequest || body.Error.Code != "invalid_request" || !strings.Contains(body.Error.Message, tc.msg) {
			t.Errorf("%s: POST /v1/chat/completions = %d %s, want 400 invalid_request with %q", tc.name, code, data, tc.msg)
		}
	}
}

// holdSteps makes w hold every step from the nth one on (counting from now) until release is called;
// release also runs when the test ends.
func holdSteps(t *testing.T, w *fakeWorker, n int64) (entered <-chan struct{}, release func()) {
	var steps atomic.Int64
	gate := make(chan struct{})
	in := make(chan struct{}, 1)
	w.setHook(func(*pb.StepRequest) string {
		if steps.Add(1) >= n {
			select {
			case in <- struct{}{}:
			default:
			}
			<-gate
		}
		return ""
	})
	release = sync.OnceFunc(func() { close(gate) })
	t.Cleanup(release)
	return in, release
}

// TestOpenAIQueueFull: with one sequence per step and one place in the queue, a third request while
// the first runs is refused with 429; the others complete.
func TestOpenAIQueueFull(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	entered, release := holdSteps(t, ws[0], 1)
	cfg := testConfig(t)
	cfg.MaxQueue, cfg.MaxBatch, cfg.TokenBudget = 1, 1, 4
	c, _, base := startGateway(t, cfg)
	waitReady(t, c)

	var wg sync.WaitGroup
	codes := make([]int, 2)
	for i := range 2 {
		wg.Go(func() {
			resp, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(`{"prompt":[100],"max_tokens":2}`))
			if err != nil {
				t.Errorf("request %d: %v", i, err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			codes[i] = resp.StatusCode
		})
		if i == 0 {
			<-entered // the first request is in the batch, its first step held
		}
	}
	eventually(t, "a queued request", func() bool { return c.queue.len() == 1 })
	code, data := post(t, base, "/v1/completions", `{"prompt":[1],"max_tokens":2}`)
	if body := decode[gateway.ErrorBody](t, data); code != http.StatusTooManyRequests || body.Error.Code != "queue_full" || body.Error.Type != "rate_limit_error" ||
		body.Error.Message != "coordinator: queue full: 1 requests are waiting" {
		t.Errorf("POST /v1/completions with a full queue = %d %s, want 429 queue_full", code, data)
	}
	release()
	wg.Wait()
	if codes[0] != http.StatusOK || codes[1] != http.StatusOK {
		t.Errorf("the admitted requests answered %v, want 200 200", codes)
	}
}

// TestOpenAIUnavailable: without a plan (one worker at TP 2) the leader answers 503 no_plan, a standby
// 503 not_leader; /health says the same; /v1/models answers on both.
func TestOpenAIUnavailable(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 1)
	a, _, baseA := startGateway(t, testConfig(t))
	eventually(t, "leadership", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.leader
	})
	_, _, baseB := startGateway(t, testConfig(t))
	for _, tc := range []struct {
		name, base, code string
	}{
		{"leader without a plan", baseA, "no_plan"},
		{"standby", baseB, "not_leader"},
	} {
		for _, path := range []string{"/v1/completions", "/health"} {
			method, body := http.MethodPost, `{"prompt":[1],"max_tokens":2}`
			if path == "/health" {
				method, body = http.MethodGet, ""
			}
			code, _, data := call(t, testCtx(t), method, tc.base+path, body)
			if e := decode[gateway.ErrorBody](t, data); code != http.StatusServiceUnavailable || e.Error.Code != tc.code || e.Error.Type != "service_unavailable" {
				t.Errorf("%s: %s %s = %d %s, want 503 %s", tc.name, method, path, code, data, tc.code)
			}
		}
		if code, _, data := call(t, testCtx(t), http.MethodGet, tc.base+"/v1/models", ""); code != http.StatusOK {
			t.Errorf("%s: GET /v1/models = %d %s, want 200", tc.name, code, data)
		}
	}
}

// TestOpenAIStepFailed: a worker's step error is 500 step_failed, or an error event at the end of a
// stream that has begun.
func TestOpenAIStepFailed(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	// Feeding id 99 fails the step: a prompt ending in 95 streams 96..99, then fails.
	ws[1].setHook(func(req *pb.StepRequest) string {
		for _, s := range req.GetSeqs() {
			if slices.Contains(s.GetIds(), 99) {
				return "cuda: illegal memory access"
			}
		}
		return ""
	})
	c, _, base := startGateway(t, testConfig(t))
	waitReady(t, c)

	code, data := post(t, base, "/v1/completions", `{"prompt":[98],"max_tokens":4}`)
	if e := decode[gateway.ErrorBody](t, data); code != http.StatusInternalServerError || e.Error.Code != "step_failed" || e.Error.Type != "server_error" ||
		!strings.Contains(e.Error.Message, "illegal memory access") {
		t.Errorf("POST /v1/completions on a failing step = %d %s, want 500 step_failed with the worker's error", code, data)
	}

	// The group reconnects; meanwhile the request waits in the queue.
	code, _, body := call(t, testCtx(t), http.MethodPost, base+"/v1/completions", `{"prompt":[95],"max_tokens":10,"return_token_ids":true,"stream":true}`)
	evs := gatewaytest.Events(t, body)
	if code != http.StatusOK || len(evs) < 2 {
		t.Fatalf("POST /v1/completions (stream) on a failing step = %d %s, want 200, chunks and an error event", code, body)
	}
	var ids []int
	for _, ev := range evs[:len(evs)-1] {
		ids = append(ids, decode[gateway.CompletionResponse](t, []byte(ev)).Choices[0].TokenIDs...)
	}
	if e := decode[gateway.ErrorBody](t, []byte(evs[len(evs)-1])); !slices.Equal(ids, []int{96, 97, 98, 99}) || e.Error.Code != "step_failed" {
		t.Errorf("stream on a failing step = ids %v, last event %s; want [96 97 98 99], then a step_failed error", ids, evs[len(evs)-1])
	}
}

// TestOpenAIDisconnect: a client that goes away, streaming or not, cancels its generation: the
// sequence is released on the workers at the next step.
func TestOpenAIDisconnect(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	core, logs := observer.New(zapcore.DebugLevel)
	cfg := testConfig(t)
	cfg.Logger = zap.New(core)
	c, _, base := startGateway(t, cfg)
	waitReady(t, c)

	for _, stream := range []bool{true, false} {
		before := logs.FilterMessage("http request cancelled by its client").Len()
		_, release := holdSteps(t, ws[0], 3) // two tokens, then the group waits
		ctx, cancel := context.WithCancel(testCtx(t))
		body := `{"prompt":[5],"max_tokens":250,"ignore_eos":true,"return_token_ids":true,"stream":` + strconv.FormatBool(stream) + `}`
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		first := make(chan string, 1)
		go func() {
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				done <- err
				return
			}
			defer resp.Body.Close()
			if stream {
				line, err := bufio.NewReader(resp.Body).ReadString('\n')
				if err != nil {
					done <- err
					return
				}
				first <- line
			}
			_, err = io.ReadAll(resp.Body)
			done <- err
		}()
		if stream {
			select {
			case line := <-first:
				if !strings.HasPrefix(line, "data: {") {
					t.Fatalf("first stream line %q, want a chunk", line)
				}
			case err := <-done:
				t.Fatalf("stream ended before its first chunk: %v", err)
			}
		}
		eventually(t, "the sequence on both workers", func() bool { return ws[0].held() == 1 && ws[1].held() == 1 })
		cancel()
		if err := <-done; err == nil {
			t.Errorf("stream %v: the cancelled request ended without an error", stream)
		}
		eventually(t, "the gateway noticing the client went away", func() bool {
			return logs.FilterMessage("http request cancelled by its client").Len() > before
		})
		steps := len(ws[0].recorded())
		release()
		eventually(t, "the release of the cancelled sequence", func() bool { return ws[0].held() == 0 && ws[1].held() == 0 })
		if n := len(ws[0].recorded()) - steps; n > 5 {
			t.Errorf("stream %v: %d steps after the client went away, want the release at the next step", stream, n)
		}
		ws[0].setHook(nil)
	}
}

// TestOpenAIGracefulClose: Close stops accepting connections and lets a stream in flight finish; when
// the grace runs out first, it cuts the stream.
func TestOpenAIGracefulClose(t *testing.T) {
	for _, tc := range []struct {
		name   string
		grace  time.Duration
		finish bool // the held step is let go during Close
	}{
		{"finishes", 10 * time.Second, true},
		{"cut", 200 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cl := clusterClient(t)
			ws, _ := startWorkers(t, cl, 2)
			entered, release := holdSteps(t, ws[0], 2)
			cfg := testConfig(t)
			cfg.ShutdownGrace = tc.grace
			c, _, base := startGateway(t, cfg)
			waitReady(t, c)

			req, err := http.NewRequestWithContext(testCtx(t), http.MethodPost, base+"/v1/completions",
				strings.NewReader(`{"prompt":[5],"max_tokens":4,"ignore_eos":true,"stream":true}`))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			<-entered // the stream's second step is held
			closed := make(chan error, 1)
			go func() { closed <- c.Close() }()
			eventually(t, "the gateway refusing connections", func() bool {
				r, err := http.Get(base + "/health")
				if err == nil {
					r.Body.Close()
				}
				return err != nil
			})
			if tc.finish {
				release()
			}
			data, _ := io.ReadAll(resp.Body)
			if err := <-closed; err != nil {
				t.Errorf("Close = %v", err)
			}
			finished := strings.HasSuffix(string(data), "data: [DONE]\n\n") && strings.Contains(string(data), `"finish_reason":"length"`)
			if finished != tc.finish {
				t.Errorf("stream in flight during Close (grace %v) = %q; finished %v, want %v", tc.grace, data, finished, tc.finish)
			}
		})
	}
}

// TestOpenAIConfig: --http-listen binds Config.HTTPAddr; a bad address fails Validate, a taken one
// fails Start, which then leaves nothing open.
func TestOpenAIConfig(t *testing.T) {
	var cfg Config
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	cfg.AddFlags(fs)
	if err := fs.Parse([]string{"--http-listen", "0.0.0.0:8001"}); err != nil || cfg.HTTPAddr != "0.0.0.0:8001" {
		t.Errorf("--http-listen 0.0.0.0:8001 = %q, %v; want HTTPAddr 0.0.0.0:8001", cfg.HTTPAddr, err)
	}
	bad := testConfig(t)
	bad.HTTPAddr = "nowhere"
	if err := bad.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "http listen address") {
		t.Errorf("Validate(HTTPAddr nowhere) = %v, want ErrInvalidConfig naming the http listen address", err)
	}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg = testConfig(t)
	cfg.HTTPAddr = taken.Addr().String()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(testCtx(t)); err == nil || !strings.Contains(err.Error(), "listen (http)") {
		t.Errorf("Start with a taken HTTP port = %v, want a listen (http) error", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after a failed Start = %v", err)
	}
}
