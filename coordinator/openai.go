package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"reflect"
	"strings"
	"time"

	"go.uber.org/zap"

	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// Limits of the HTTP gateway.
const (
	// maxRequestBytes bounds a request body: a prompt of a few million token ids.
	maxRequestBytes = 64 << 20
	// bodyReadTimeout bounds the read of a request body; the response (a stream that may last as long
	// as the generation) has no deadline.
	bodyReadTimeout = 30 * time.Second
	// headerReadTimeout bounds the read of a request's headers.
	headerReadTimeout = 10 * time.Second
	// idleTimeout closes a keep-alive connection that carries no request for this long.
	idleTimeout = 2 * time.Minute
)

// OpenAI error types, the "type" of an error body.
const (
	errTypeInvalid     = "invalid_request_error" // 4xx but 429: the request will not succeed as sent
	errTypeRateLimit   = "rate_limit_error"      // 429: try again later
	errTypeServer      = "server_error"          // 5xx
	errTypeUnavailable = "service_unavailable"   // 503: this coordinator does not serve now
)

// httpTable maps errors to HTTP status codes, OpenAI error types and codes; the first entry that
// errors.Is matches wins, so more specific errors come first. It follows statusTable: the codes are its
// ErrorInfo reasons in lower case. Errors that match nothing are 500 internal_error.
var httpTable = []struct {
	err    error
	status int
	typ    string
	code   string
}{
	{ErrNoTokenizer, http.StatusBadRequest, errTypeInvalid, "no_tokenizer"},
	{ErrInvalidRequest, http.StatusBadRequest, errTypeInvalid, "invalid_request"},
	{ErrQueueFull, http.StatusTooManyRequests, errTypeRateLimit, "queue_full"},
	{ErrNotLeader, http.StatusServiceUnavailable, errTypeUnavailable, "not_leader"},
	{ErrNoPlan, http.StatusServiceUnavailable, errTypeUnavailable, "no_plan"},
	{ErrWorkerLost, http.StatusServiceUnavailable, errTypeUnavailable, "worker_lost"},
	{ErrClosed, http.StatusServiceUnavailable, errTypeUnavailable, "closed"},
	{ErrStepFailed, http.StatusInternalServerError, errTypeServer, "step_failed"},
}

// httpError is an error answered with a status and code that httpTable cannot tell from its sentinel:
// an unknown model (404), an unknown route, a body too large.
type httpError struct {
	status int
	code   string
	err    error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

// errorBody is OpenAI's error response: {"error": {"message", "type", "param", "code"}}.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"` // always null: messages name the field
	Code    string  `json:"code"`
}

// toHTTP returns the status and body that err is answered with. The message is err's text, the same
// as the gRPC status message of the same error.
func toHTTP(err error) (int, errorBody) {
	status, typ, code := http.StatusInternalServerError, errTypeServer, "internal_error"
	var he *httpError
	if errors.As(err, &he) {
		status, code = he.status, he.code
		typ = errTypeInvalid
		if status >= 500 {
			typ = errTypeServer
		}
	} else {
		for _, e := range httpTable {
			if errors.Is(err, e.err) {
				status, typ, code = e.status, e.typ, e.code
				break
			}
		}
	}
	return status, errorBody{errorDetail{Message: err.Error(), Type: typ, Code: code}}
}

// gateway is the OpenAI-compatible HTTP API of a coordinator (vLLM's routes and extensions): the
// requests take the same checks, queue and batches as Generate's.
type gateway struct {
	c       *Coordinator
	created int64 // unix seconds: when the gateway started, the model object's "created"
}

// newHTTPServer returns the gateway's server. It has no write timeout, as a streamed response lasts as
// long as its generation, and no server-wide read timeout, which would cancel the requests of streams
// that outlast it; the body's read is bounded per request instead.
func (c *Coordinator) newHTTPServer() *http.Server {
	g := &gateway{c: c, created: time.Now().Unix()}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/models", allow(g.models, http.MethodGet, http.MethodHead))
	mux.HandleFunc("/v1/models/{model...}", allow(g.model, http.MethodGet, http.MethodHead))
	mux.HandleFunc("/v1/completions", allow(g.completions, http.MethodPost))
	mux.HandleFunc("/v1/chat/completions", allow(g.chatCompletions, http.MethodPost))
	mux.HandleFunc("/health", allow(g.health, http.MethodGet, http.MethodHead))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		g.fail(w, &httpError{http.StatusNotFound, "not_found", fmt.Errorf(
			"no route %s %s: the gateway serves /v1/models, /v1/completions, /v1/chat/completions and /health", r.Method, r.URL.Path)})
	})
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: headerReadTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          zap.NewStdLog(c.log.Named("http")),
	}
}

// HTTPAddr returns the address the OpenAI-compatible HTTP gateway listens on (with the port it got for
// port 0), or "" before Start and when Config.HTTPAddr is empty.
//
// The gateway speaks OpenAI's API as vLLM serves it:
//
//   - GET /v1/models lists the served model; its id is the model name of the gRPC API.
//   - POST /v1/completions takes a prompt (a string, encoded with BOS as Generate encodes it, or an
//     array of token ids) and POST /v1/chat/completions takes messages, rendered with the tokenizer's
//     chat template and a generation prompt (tokenizer.Tokenizer.EncodeChat). Both take max_tokens (left
//     out: the rest of the context), temperature, top_p, seed and vLLM's top_k, stop_token_ids,
//     ignore_eos and return_token_ids; fields left out take generation_config.json's values, as a
//     Generate without sampling does. With stream they answer Server-Sent Events in OpenAI's chunk
//     format, one event per group of ids the scheduler hands over (usually one), flushed at once, then
//     "data: [DONE]".
//   - GET /health answers 200 while this coordinator leads and a TP group serves, else 503.
//
// Requests take Generate's checks (same messages), queue and batches. Errors are OpenAI error bodies:
// 400 for an invalid request, 404 for an unknown model or route, 429 when the queue is full, 503 from a
// standby, without a plan or while shutting down, 500 when a worker failed a step. A client that goes
// away cancels its request: it leaves the queue or its sequence is released at the next step.
func (c *Coordinator) HTTPAddr() string {
	if c.httpLis == nil {
		return ""
	}
	return c.httpLis.Addr().String()
}

// listenHTTP opens the gateway's listener when Config.HTTPAddr is set; nil otherwise.
func (c *Coordinator) listenHTTP() (net.Listener, error) {
	if c.cfg.HTTPAddr == "" {
		return nil, nil
	}
	lis, err := net.Listen("tcp", c.cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("coordinator: listen (http): %w", err)
	}
	return lis, nil
}

// serveHTTP serves the gateway on c.httpLis, if any, in a goroutine of c.wg.
func (c *Coordinator) serveHTTP() {
	if c.httpLis == nil {
		return
	}
	c.httpSrv = c.newHTTPServer()
	c.wg.Go(func() {
		if err := c.httpSrv.Serve(c.httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.fail(fmt.Errorf("coordinator: serve HTTP: %w", err))
		}
	})
}

// shutdownHTTP starts the graceful stop of the gateway: it stops listening, closes idle connections
// and waits for the requests in flight until ctx ends. The channel is closed when that is over (at
// once without a gateway); closeHTTP then cuts what is left.
func (c *Coordinator) shutdownHTTP(ctx context.Context) <-chan struct{} {
	done := make(chan struct{})
	if c.httpSrv == nil {
		close(done)
		return done
	}
	go func() {
		defer close(done)
		_ = c.httpSrv.Shutdown(ctx) // ctx's error when requests were still running
	}()
	return done
}

// closeHTTP closes the gateway's connections, which cancels the requests still running.
func (c *Coordinator) closeHTTP() {
	if c.httpSrv != nil {
		_ = c.httpSrv.Close()
	}
}

// allow wraps h to answer 405 to other methods than the ones given.
func allow(h http.HandlerFunc, methods ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		for _, m := range methods {
			if r.Method == m {
				h(w, r)
				return
			}
		}
		w.Header().Set("Allow", strings.Join(methods, ", "))
		status, body := toHTTP(&httpError{http.StatusMethodNotAllowed, "method_not_allowed",
			fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(methods, " or "))})
		writeJSON(w, status, body)
	}
}

// fail answers err as an OpenAI error.
func (g *gateway) fail(w http.ResponseWriter, err error) {
	status, body := toHTTP(err)
	if status >= 500 && status != http.StatusServiceUnavailable {
		g.c.log.Warn("http request failed", zap.Int("status", status), zap.Error(err))
	} else {
		g.c.log.Debug("http request refused", zap.Int("status", status), zap.Error(err))
	}
	writeJSON(w, status, body)
}

// writeJSON writes v as a JSON response with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v) // a client that went away gets nothing more
}

// modelCard is an OpenAI model object, with vLLM's max_model_len.
type modelCard struct {
	ID          string `json:"id"`
	Object      string `json:"object"`
	Created     int64  `json:"created"`
	OwnedBy     string `json:"owned_by"`
	MaxModelLen int    `json:"max_model_len"`
}

type modelList struct {
	Object string      `json:"object"`
	Data   []modelCard `json:"data"`
}

func (g *gateway) card() modelCard {
	m := g.c.model
	return modelCard{ID: m.name, Object: "model", Created: g.created, OwnedBy: "tpfleet", MaxModelLen: m.cfg.MaxPositions}
}

// models answers GET /v1/models: the served model, whose id is the model name of the gRPC API.
func (g *gateway) models(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, modelList{Object: "list", Data: []modelCard{g.card()}})
}

// model answers GET /v1/models/{model}.
func (g *gateway) model(w http.ResponseWriter, r *http.Request) {
	if err := g.checkModel(r.PathValue("model")); err != nil {
		g.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, g.card())
}

// checkModel reports a model name other than the served one as 404, with Generate's message; empty
// means the served model.
func (g *gateway) checkModel(name string) error {
	if m := g.c.model; name != "" && name != m.name {
		return &httpError{http.StatusNotFound, "model_not_found", invalid("unknown model %q: this cluster serves %q", name, m.name)}
	}
	return nil
}

// health answers GET /health: 200 (empty body) while this coordinator leads and a TP group serves, else
// 503 with the reason, so a load balancer sends requests to the leader only.
func (g *gateway) health(w http.ResponseWriter, r *http.Request) {
	if err := g.c.serving(); err != nil {
		g.fail(w, err)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// serving says why the coordinator does not serve requests now, or nil when it does (the gRPC health
// service's SERVING).
func (c *Coordinator) serving() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.draining:
		return fmt.Errorf("%w: shutting down", ErrClosed)
	case !c.leader:
		return fmt.Errorf("%w: this coordinator is a standby", ErrNotLeader)
	case len(c.readyGroups) == 0:
		return fmt.Errorf("%w: no TP group of %d workers serves yet; see the cluster's members", ErrNoPlan, c.tp)
	}
	return nil
}

// submit checks a request as Generate does and queues it. The caller must remove and cancel it when
// it is done with it.
func (c *Coordinator) submit(in *pb.GenerateRequest) (*request, error) {
	r, err := c.model.newRequest(in)
	if err != nil {
		return nil, err
	}
	if err := c.admit(r); err != nil {
		return nil, err
	}
	return r, nil
}

// samplingFields are the generation fields that /v1/completions and /v1/chat/completions share: OpenAI's
// and vLLM's extensions (top_k, stop_token_ids, ignore_eos, return_token_ids). A field left out takes
// generation_config.json's value (greedy when it does not sample); max_tokens left out is the rest of
// the context.
type samplingFields struct {
	MaxTokens      *int64   `json:"max_tokens"`
	Temperature    *float64 `json:"temperature"`
	TopP           *float64 `json:"top_p"`
	TopK           *int64   `json:"top_k"` // vLLM: -1 or 0 is off
	Seed           *int64   `json:"seed"`
	StopTokenIDs   []int64  `json:"stop_token_ids"`
	IgnoreEOS      bool     `json:"ignore_eos"`
	ReturnTokenIDs bool     `json:"return_token_ids"` // vLLM: token_ids (and prompt_token_ids) in the response
	Stream         bool     `json:"stream"`
	StreamOptions  *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`

	// OpenAI fields this gateway does not implement: refused unless left at their defaults.
	N                *int64          `json:"n"`
	Stop             json.RawMessage `json:"stop"`
	Logprobs         json.RawMessage `json:"logprobs"`
	PresencePenalty  *float64        `json:"presence_penalty"`
	FrequencyPenalty *float64        `json:"frequency_penalty"`
}

// unsupported reports an OpenAI field set to what the gateway cannot do.
func (s *samplingFields) unsupported() error {
	switch {
	case s.N != nil && *s.N != 1:
		return invalid("n %d: only one choice per request is supported", *s.N)
	case !isEmptyJSON(s.Stop, `""`, "[]"):
		return invalid("stop strings are not supported; use stop_token_ids")
	case !isEmptyJSON(s.Logprobs, "false", "0"):
		return invalid("logprobs are not supported")
	case s.PresencePenalty != nil && *s.PresencePenalty != 0:
		return invalid("presence_penalty is not supported")
	case s.FrequencyPenalty != nil && *s.FrequencyPenalty != 0:
		return invalid("frequency_penalty is not supported")
	}
	return nil
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

// fill sets in's max_tokens, sampling and stop ids from s, for a prompt of n tokens.
func (s *samplingFields) fill(in *pb.GenerateRequest, m modelInfo, maxTokens *int64, n int) error {
	if maxTokens == nil {
		left := m.cfg.MaxPositions - n
		if left <= 0 {
			return invalid("%d prompt tokens leave no room for new tokens in the model's context of %d", n, m.cfg.MaxPositions)
		}
		in.MaxTokens = int32(left)
	} else {
		in.MaxTokens = clamp32(*maxTokens)
	}
	p := m.defaultSampling()
	if s.Temperature != nil {
		p.Temperature = *s.Temperature
	}
	if s.TopP != nil {
		p.TopP = *s.TopP
	}
	if s.TopK != nil {
		p.TopK = int(clamp32(*s.TopK))
		if p.TopK == -1 {
			p.TopK = 0
		}
	}
	if s.Seed != nil {
		p.Seed = uint64(*s.Seed)
	}
	in.Sampling = &pb.SamplingParams{Temperature: p.Temperature, TopK: int32(p.TopK), TopP: p.TopP, Seed: p.Seed}
	in.IgnoreEos = s.IgnoreEOS
	ids, err := tokenIDs(s.StopTokenIDs, "stop id", m.cfg.VocabSize)
	if err != nil {
		return err
	}
	in.StopIds = ids
	return nil
}

// clamp32 limits v to the range of int32.
func clamp32(v int64) int32 {
	return int32(max(math.MinInt32, min(math.MaxInt32, v)))
}

// tokenIDs converts ids to int32, reporting one outside int32 with Generate's message for an id outside
// the vocabulary (Generate checks the rest).
func tokenIDs(ids []int64, what string, vocab int) ([]int32, error) {
	if ids == nil {
		return nil, nil
	}
	out := make([]int32, len(ids))
	for i, id := range ids {
		if id < math.MinInt32 || id > math.MaxInt32 {
			return nil, invalid("%s %d at index %d is outside the vocabulary [0, %d)", what, id, i, vocab)
		}
		out[i] = int32(id)
	}
	return out, nil
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
	Model               string          `json:"model"`
	Messages            []chatMessage   `json:"messages"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"` // OpenAI's newer max_tokens; wins over it
	AddGenerationPrompt *bool           `json:"add_generation_prompt"` // vLLM; default true
	Tools               json.RawMessage `json:"tools"`
	TopLogprobs         *int64          `json:"top_logprobs"`
	samplingFields
}

// chatMessage is one turn: content is a string, or an array of {"type": "text", "text"} parts.
type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// completions answers POST /v1/completions.
func (g *gateway) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if err := decodeBody(w, r, &req); err != nil {
		g.fail(w, err)
		return
	}
	in, err := g.completionInput(&req)
	if err != nil {
		g.fail(w, err)
		return
	}
	g.generate(w, r, in, g.newOutput(kindCompletion, &req.samplingFields))
}

// completionInput turns a completion request into a GenerateRequest.
func (g *gateway) completionInput(req *completionRequest) (*pb.GenerateRequest, error) {
	m := g.c.model
	if err := g.checkModel(req.Model); err != nil {
		return nil, err
	}
	if err := req.unsupported(); err != nil {
		return nil, err
	}
	switch {
	case req.Echo:
		return nil, invalid("echo is not supported")
	case req.BestOf != nil && *req.BestOf != 1:
		return nil, invalid("best_of %d: only one choice per request is supported", *req.BestOf)
	case req.Suffix != nil && *req.Suffix != "":
		return nil, invalid("suffix is not supported")
	}
	text, ids, err := parsePrompt(req.Prompt)
	if err != nil {
		return nil, err
	}
	in := &pb.GenerateRequest{Model: req.Model, Prompt: text}
	if in.PromptIds, err = tokenIDs(ids, "prompt id", m.cfg.VocabSize); err != nil {
		return nil, err
	}
	n := len(ids)
	if text != "" && req.MaxTokens == nil && m.tok != nil {
		n = len(m.tok.Encode(text, true)) // Generate encodes it again; this only sizes the default max_tokens
	}
	if err := req.fill(in, m, req.MaxTokens, n); err != nil {
		return nil, err
	}
	return in, nil
}

// parsePrompt reads a completion prompt: a string, an array of token ids, or a one-element array of
// either. Absent or null is no prompt (Generate says so).
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

// chatCompletions answers POST /v1/chat/completions.
func (g *gateway) chatCompletions(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if err := decodeBody(w, r, &req); err != nil {
		g.fail(w, err)
		return
	}
	in, err := g.chatInput(&req)
	if err != nil {
		g.fail(w, err)
		return
	}
	g.generate(w, r, in, g.newOutput(kindChat, &req.samplingFields))
}

// chatInput renders a chat request's messages with the model's chat template and a generation prompt,
// and turns the request into a GenerateRequest of the prompt's ids.
func (g *gateway) chatInput(req *chatRequest) (*pb.GenerateRequest, error) {
	m := g.c.model
	if err := g.checkModel(req.Model); err != nil {
		return nil, err
	}
	if err := req.unsupported(); err != nil {
		return nil, err
	}
	switch {
	case !isEmptyJSON(req.Tools, "[]"):
		return nil, invalid("tools are not supported")
	case req.TopLogprobs != nil && *req.TopLogprobs != 0:
		return nil, invalid("top_logprobs is not supported")
	case m.tok == nil:
		return nil, m.noTokenizer()
	case len(req.Messages) == 0:
		return nil, invalid("messages: empty: send at least one message")
	}
	msgs := make([]tokenizer.Message, len(req.Messages))
	for i, msg := range req.Messages {
		if msg.Role == "" {
			return nil, invalid("messages[%d]: no role", i)
		}
		content, err := messageContent(msg.Content)
		if err != nil {
			return nil, invalid("messages[%d].content: %v", i, err)
		}
		msgs[i] = tokenizer.Message{Role: msg.Role, Content: content}
	}
	addGen := req.AddGenerationPrompt == nil || *req.AddGenerationPrompt
	ids, err := m.tok.EncodeChat(msgs, addGen)
	if err != nil {
		return nil, fmt.Errorf("%w: messages: %w", ErrInvalidRequest, err)
	}
	in := &pb.GenerateRequest{Model: req.Model, PromptIds: toInt32(ids)}
	maxTokens := req.MaxTokens
	if req.MaxCompletionTokens != nil {
		maxTokens = req.MaxCompletionTokens
	}
	if err := req.fill(in, m, maxTokens, len(ids)); err != nil {
		return nil, err
	}
	return in, nil
}

// messageContent reads a message's content: a string, null (""), or an array of text parts, joined
// with newlines as vLLM does.
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
	texts := make([]string, len(parts))
	for i, p := range parts {
		if p.Type != "text" || p.Text == nil {
			return "", fmt.Errorf("part %d: type %q is not supported: only text parts", i, p.Type)
		}
		texts[i] = *p.Text
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

// kind tells the two generation endpoints' response formats apart.
type kind int

const (
	kindCompletion kind = iota // text_completion
	kindChat                   // chat.completion
)

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

func (g *gateway) newOutput(k kind, s *samplingFields) output {
	prefix := "cmpl-"
	if k == kindChat {
		prefix = "chatcmpl-"
	}
	return output{
		kind:      k,
		id:        prefix + rand.Text(),
		created:   time.Now().Unix(),
		model:     g.c.model.name,
		stream:    s.Stream,
		usage:     s.Stream && s.StreamOptions != nil && s.StreamOptions.IncludeUsage,
		returnIDs: s.ReturnTokenIDs,
	}
}

// usageInfo is a response's token counts.
type usageInfo struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func newUsage(prompt, completion int) *usageInfo {
	return &usageInfo{PromptTokens: prompt, CompletionTokens: completion, TotalTokens: prompt + completion}
}

// completionChoice is a choice of a text_completion response or chunk.
type completionChoice struct {
	Index          int       `json:"index"`
	Text           string    `json:"text"`
	Logprobs       *struct{} `json:"logprobs"` // always null
	FinishReason   *string   `json:"finish_reason"`
	PromptTokenIDs []int32   `json:"prompt_token_ids,omitempty"`
	TokenIDs       []int32   `json:"token_ids,omitempty"`
}

type completionResponse struct {
	ID      string             `json:"id"`
	Object  string             `json:"object"`
	Created int64              `json:"created"`
	Model   string             `json:"model"`
	Choices []completionChoice `json:"choices"`
	Usage   *usageInfo         `json:"usage,omitempty"`
}

// chatContent is a chat response's message, or a chunk's delta (whose fields may be absent).
type chatContent struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

type chatChoice struct {
	Index        int          `json:"index"`
	Message      *chatContent `json:"message,omitempty"`
	Delta        *chatContent `json:"delta,omitempty"`
	Logprobs     *struct{}    `json:"logprobs"` // always null
	FinishReason *string      `json:"finish_reason"`
	TokenIDs     []int32      `json:"token_ids,omitempty"`
}

type chatResponse struct {
	ID             string       `json:"id"`
	Object         string       `json:"object"`
	Created        int64        `json:"created"`
	Model          string       `json:"model"`
	Choices        []chatChoice `json:"choices"`
	Usage          *usageInfo   `json:"usage,omitempty"`
	PromptTokenIDs []int32      `json:"prompt_token_ids,omitempty"`
}

// response is the whole (non-streamed) response of a generation.
func (o output) response(text string, ids, prompt []int32, finish string) any {
	u := newUsage(len(prompt), len(ids))
	if !o.returnIDs {
		ids, prompt = nil, nil
	}
	if o.kind == kindChat {
		return chatResponse{ID: o.id, Object: "chat.completion", Created: o.created, Model: o.model, Usage: u, PromptTokenIDs: prompt,
			Choices: []chatChoice{{Message: &chatContent{Role: "assistant", Content: &text}, FinishReason: &finish, TokenIDs: ids}}}
	}
	return completionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model, Usage: u,
		Choices: []completionChoice{{Text: text, FinishReason: &finish, PromptTokenIDs: prompt, TokenIDs: ids}}}
}

// chunk is a streamed event with new text and ids; finish is "" until the last one, and prompt is set
// on the first one only.
func (o output) chunk(text string, ids, prompt []int32, finish string) any {
	var fin *string
	if finish != "" {
		fin = &finish
	}
	if !o.returnIDs {
		ids, prompt = nil, nil
	}
	if o.kind == kindChat {
		delta := &chatContent{}
		if text != "" {
			delta.Content = &text
		}
		return chatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model,
			Choices: []chatChoice{{Delta: delta, FinishReason: fin, TokenIDs: ids}}}
	}
	return completionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model,
		Choices: []completionChoice{{Text: text, FinishReason: fin, PromptTokenIDs: prompt, TokenIDs: ids}}}
}

// roleChunk is a chat stream's first event: the assistant's role and empty content, as OpenAI sends it.
func (o output) roleChunk(prompt []int32) any {
	empty := ""
	if !o.returnIDs {
		prompt = nil
	}
	return chatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model, PromptTokenIDs: prompt,
		Choices: []chatChoice{{Delta: &chatContent{Role: "assistant", Content: &empty}}}}
}

// usageChunk is the last event of a stream with stream_options.include_usage: no choices, the usage.
func (o output) usageChunk(prompt, completion int) any {
	u := newUsage(prompt, completion)
	if o.kind == kindChat {
		return chatResponse{ID: o.id, Object: "chat.completion.chunk", Created: o.created, Model: o.model, Choices: []chatChoice{}, Usage: u}
	}
	return completionResponse{ID: o.id, Object: "text_completion", Created: o.created, Model: o.model, Choices: []completionChoice{}, Usage: u}
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

// generate queues in and writes its response: whole, or streamed as events as the ids come. When the
// client goes away (the request's context ends), the request leaves the queue or its sequence is
// released at the next step, as with Generate.
func (g *gateway) generate(w http.ResponseWriter, hr *http.Request, in *pb.GenerateRequest, o output) {
	c := g.c
	start := time.Now()
	r, err := c.submit(in)
	if err != nil {
		g.fail(w, err)
		return
	}
	defer func() {
		c.queue.remove(r)
		r.cancel()
	}()
	ctx := hr.Context()
	var text *textStream
	if c.model.tok != nil {
		text = &textStream{dec: c.model.tok.NewDecoder(true), log: c.log}
	}
	var sse *sseWriter
	if o.stream {
		if sse, err = startSSE(w); err == nil && o.kind == kindChat {
			err = sse.event(o.roleChunk(r.prompt))
		}
		if err != nil {
			c.log.Debug("http stream: client gone", zap.Error(err))
			return
		}
	}
	var ids []int32
	var all strings.Builder
	first := true
	for {
		select {
		case <-r.notify:
		case <-ctx.Done():
			c.log.Debug("http request cancelled by its client", zap.Int("prompt-tokens", len(r.prompt)), zap.Int("sent", len(ids)))
			return
		}
		got, done, finish, err := r.take()
		ids = append(ids, got...)
		piece := ""
		if text != nil {
			piece = text.add(got, done && err == nil)
		}
		if done && err == nil {
			c.log.Debug("http request done", zap.Int("prompt-tokens", len(r.prompt)), zap.Int("new-tokens", len(ids)),
				zap.String("finish", finish), zap.Duration("took", time.Since(start)))
		}
		if !o.stream {
			all.WriteString(piece)
			switch {
			case err != nil:
				g.fail(w, err)
				return
			case done:
				writeJSON(w, http.StatusOK, o.response(all.String(), ids, r.prompt, finish))
				return
			}
			continue
		}
		// Skipped: a token that ends inside a character, unless its id was asked for.
		if piece != "" || (done && err == nil) || (o.returnIDs && len(got) > 0) {
			var prompt []int32
			if first && o.kind == kindCompletion {
				prompt = r.prompt
			}
			if werr := sse.event(o.chunk(piece, got, prompt, finish)); werr != nil {
				c.log.Debug("http stream: client gone", zap.Error(werr))
				return
			}
			first = false
		}
		if err != nil {
			// The status is sent already: the error comes as an event, then the end (as vLLM does).
			_, body := toHTTP(err)
			c.log.Debug("http stream failed", zap.Error(err))
			_ = sse.event(body)
			_ = sse.done()
			return
		}
		if done {
			if o.usage {
				if werr := sse.event(o.usageChunk(len(r.prompt), len(ids))); werr != nil {
					return
				}
			}
			_ = sse.done()
			return
		}
	}
}
