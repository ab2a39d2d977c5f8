package coordinator

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"

	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/internal/samplingpb"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// HTTPAddr returns the address the OpenAI-compatible HTTP gateway listens on (with the port it got for
// port 0), or "" before Start and when Config.HTTPAddr is empty.
//
// The gateway (package gateway) serves GET /v1/models, POST /v1/completions, POST
// /v1/chat/completions and GET /health over the coordinator: its requests take Generate's checks (same
// messages), queue and batches; /health answers 200 while this coordinator leads and a TP group
// serves, else 503. Errors are OpenAI error bodies: 400 for an invalid request, 404 for an unknown
// model or route, 429 when the queue is full, 503 from a standby, without a plan or while shutting
// down, 500 when a worker failed a step. A client that goes away cancels its request: it leaves the
// queue or its sequence is released at the next step.
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
	if c.cfg.TLS != nil {
		// HTTPS; a client certificate is verified when one is sent, but the API keys are what let a
		// request in: curl and the OpenAI clients send a token, not a certificate.
		lis = tls.NewListener(lis, c.cfg.TLS.ServerConfig(false))
	}
	return lis, nil
}

// serveHTTP serves the gateway on c.httpLis, if any, in a goroutine of c.wg.
func (c *Coordinator) serveHTTP() {
	if c.httpLis == nil {
		return
	}
	g, err := gateway.New(gateway.Config{Generator: generator{c}, Logger: c.log,
		AllowedOrigins: c.cfg.HTTPAllowedOrigins, APIKeys: c.cfg.APIKeys, Media: c.cfg.HTTPMedia})
	if err != nil { // a Config that cannot fail Validate
		c.fail(fmt.Errorf("coordinator: serve HTTP: %w", err))
		return
	}
	c.httpSrv = g.NewServer()
	// The metrics share the gateway's port, outside its API key (as vLLM's /metrics).
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, c.metrics.handler())
	mux.Handle("/", c.httpSrv.Handler)
	c.httpSrv.Handler = mux
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
		c.metrics.rejected()
		return nil, err
	}
	return r, nil
}

// generator is the coordinator as the gateway's Generator: its requests take Generate's checks,
// queue and batches.
type generator struct{ c *Coordinator }

var _ gateway.Generator = generator{}

// gatewayKinds tells the gateway how to answer the coordinator's errors: the kind picks the HTTP
// status, the code is statusTable's reason in lower case. The first entry that errors.Is matches wins;
// other errors are 500 internal_error.
var gatewayKinds = []struct {
	err  error
	kind error // nil: 500
	code string
}{
	{ErrNoTokenizer, gateway.ErrInvalidRequest, "no_tokenizer"},
	{ErrInvalidRequest, gateway.ErrInvalidRequest, "invalid_request"},
	{ErrQueueFull, gateway.ErrOverloaded, "queue_full"},
	{ErrKVCapacity, gateway.ErrInvalidRequest, "kv_capacity"},
	{ErrNotLeader, gateway.ErrUnavailable, "not_leader"},
	{ErrNoPlan, gateway.ErrUnavailable, "no_plan"},
	{ErrNotPlaced, gateway.ErrUnavailable, "not_placed"}, // before the cause it wraps
	{ErrStepTimeout, gateway.ErrUnavailable, "step_timeout"},
	{ErrWorkerLost, gateway.ErrUnavailable, "worker_lost"},
	{ErrClosed, gateway.ErrUnavailable, "closed"},
	{ErrStepFailed, nil, "step_failed"},
}

// toGateway classifies err for the gateway (see gatewayKinds); its text stays the same.
func toGateway(err error) error {
	for _, e := range gatewayKinds {
		if errors.Is(err, e.err) {
			return &gateway.Error{Kind: e.kind, Code: e.code, Err: err}
		}
	}
	return err
}

// Model describes the served model; another name is 404 model_not_found, with Generate's message.
// The context it reports is bounded by the longest sequence a serving group's KV cache holds, so that a
// request without max_tokens (which defaults to the rest of the context) is not refused for KV blocks.
func (g generator) Model(name string) (gateway.Model, error) {
	m, err := g.c.model.gatewayModel(name)
	if l := g.c.kvCaps.longest(); err == nil && l > 0 && l < m.MaxModelLen {
		m.MaxModelLen = l
	}
	return m, err
}

// Tokenizer returns the model's tokenizer, or the error of a text request without one.
func (g generator) Tokenizer() (gateway.Tokenizer, error) { return g.c.model.gatewayTokenizer() }

// gatewayModel describes the model to the gateway; another name is 404 model_not_found, with
// Generate's message.
func (m modelInfo) gatewayModel(name string) (gateway.Model, error) {
	if name != "" && name != m.name {
		return gateway.Model{}, &gateway.Error{Kind: gateway.ErrNotFound, Code: "model_not_found",
			Err: invalid("unknown model %q: this cluster serves %q", name, m.name)}
	}
	gm := gateway.Model{Name: m.name, MaxModelLen: m.cfg.MaxPositions}
	if m.images != nil {
		gm.ImagePlaceholder, gm.MaxImages = m.images.Placeholder(), m.images.MaxImages()
	} else if m.noImages != nil {
		gm.NoImages = m.noImages.Error()
	}
	return gm, nil
}

// gatewayTokenizer returns the model's tokenizer as the gateway's, or the error of a text request
// without one.
func (m modelInfo) gatewayTokenizer() (gateway.Tokenizer, error) {
	if m.tok == nil {
		return nil, toGateway(m.noTokenizer())
	}
	return gatewayTokenizer{m.tok}, nil
}

// Serving reports why the coordinator does not serve now, or nil.
func (g generator) Serving() error { return toGateway(g.c.serving()) }

// Generate turns req into a GenerateRequest, checks it as Generate does and queues it. Sampling fields
// left out take generation_config.json's values.
func (g generator) Generate(_ context.Context, req gateway.Request) (gateway.Stream, error) {
	c := g.c
	in, err := c.model.fromGateway(req)
	if err != nil {
		return nil, toGateway(err)
	}
	r, err := c.submit(in)
	if err != nil {
		return nil, toGateway(err)
	}
	s := &stream{c: c, r: r, prompt: make([]int, len(r.prompt)), out: c.newOutput(r)}
	for i, id := range r.prompt {
		s.prompt[i] = int(id)
	}
	return s, nil
}

// fromGateway makes the GenerateRequest of a gateway request. Ids outside int32 are reported with
// Generate's message for an id outside the vocabulary (Generate checks the rest); max_tokens and top_k
// are clamped to int32.
func (m modelInfo) fromGateway(req gateway.Request) (*pb.GenerateRequest, error) {
	in := &pb.GenerateRequest{Model: req.Model, Prompt: req.Prompt, MaxTokens: clamp32(req.MaxTokens), IgnoreEos: req.IgnoreEOS,
		Stop: req.Stop, IncludeStopStrInOutput: req.IncludeStopStr, Images: req.Images}
	var err error
	if in.PromptIds, err = m.tokenIDs(req.PromptIDs, "prompt id"); err != nil {
		return nil, err
	}
	p := m.defaultSampling()
	s := req.Sampling
	if s.Temperature != nil {
		p.Temperature = *s.Temperature
	}
	if s.TopP != nil {
		p.TopP = *s.TopP
	}
	if s.TopK != nil {
		p.TopK = int(clamp32(*s.TopK))
	}
	if s.Seed != nil {
		p.Seed = *s.Seed
	}
	p.MinTokens = int(clamp32(s.MinTokens))
	p.RepetitionPenalty, p.FrequencyPenalty, p.PresencePenalty = s.RepetitionPenalty, s.FrequencyPenalty, s.PresencePenalty
	p.Logprobs, p.TopLogprobs = req.Logprobs, int(clamp32(req.TopLogprobs))
	if len(s.LogitBias) > 0 {
		p.LogitBias = make(map[int]float64, len(s.LogitBias))
		for id, b := range s.LogitBias {
			if id < 0 || id >= m.cfg.VocabSize {
				return nil, invalid("logit_bias id %d is outside the vocabulary [0, %d)", id, m.cfg.VocabSize)
			}
			p.LogitBias[id] = b
		}
	}
	in.Sampling = samplingpb.ToProto(p)
	if n := req.PromptLogprobs; n != nil {
		v := clamp32(*n)
		in.PromptLogprobs = &v
	}
	if in.StopIds, err = m.tokenIDs(req.StopIDs, "stop id"); err != nil {
		return nil, err
	}
	return in, nil
}

// clamp32 limits v to the range of int32.
func clamp32(v int) int32 {
	return int32(max(math.MinInt32, min(math.MaxInt32, v)))
}

// tokenIDs converts ids to int32, reporting one outside int32 with Generate's message for an id
// outside the vocabulary.
func (m modelInfo) tokenIDs(ids []int, what string) ([]int32, error) {
	if ids == nil {
		return nil, nil
	}
	out := make([]int32, len(ids))
	for i, id := range ids {
		if id < math.MinInt32 || id > math.MaxInt32 {
			return nil, invalid("%s %d at index %d is outside the vocabulary [0, %d)", what, id, i, m.cfg.VocabSize)
		}
		out[i] = int32(id)
	}
	return out, nil
}

// stream is a queued request as a gateway.Stream.
type stream struct {
	c      *Coordinator
	r      *request
	prompt []int
	out    *output
	// promptSent: the prompt's logprobs went with a chunk (or the request did not ask for them).
	promptSent bool
}

func (s *stream) PromptIDs() []int { return s.prompt }

// Next waits for the request's next ids, or its end.
func (s *stream) Next(ctx context.Context) (gateway.Chunk, error) {
	for {
		select {
		case <-s.r.notify:
		case <-ctx.Done():
			return gateway.Chunk{}, ctx.Err()
		}
		got, lps, done, finish, err := s.r.take()
		got, lps, text, stopped := s.out.add(got, lps, done && err == nil)
		if stopped != "" { // a stop string ends the request here: its sequence is released at the next step
			done, finish, err = true, FinishStop, nil
			s.r.end(FinishStop, nil)
			s.Close()
		}
		ch := gateway.Chunk{IDs: make([]int, len(got)), Text: text, StopReason: stopped}
		for i, id := range got {
			ch.IDs[i] = int(id)
		}
		ch.Logprobs = gatewayLogprobs(lps)
		if s.r.promptLogprobs != nil && !s.promptSent && (err != nil || done || len(got) > 0) {
			ch.PromptLogprobs, s.promptSent = gatewayLogprobs(s.r.takePrompt()), true
		}
		switch {
		case err != nil:
			return ch, toGateway(err)
		case done:
			ch.Finish = finish
			return ch, nil
		case len(got) > 0:
			return ch, nil
		}
	}
}

// gatewayLogprobs converts the logprobs of a GenerateResponse's ids (none, or one per id) for a
// gateway.Chunk.
func gatewayLogprobs(lps []*pb.ChosenLogprobs) []gateway.TokenLogprobs {
	var out []gateway.TokenLogprobs
	for _, lp := range lps {
		t := gateway.TokenLogprobs{Logprob: lp.GetLogprob(), Rank: int(lp.GetRank())}
		for _, top := range lp.GetTop() {
			t.Top = append(t.Top, gateway.TokenLogprob{ID: int(top.GetId()), Logprob: top.GetLogprob()})
		}
		out = append(out, t)
	}
	return out
}

// Close takes the request out of the queue, or has its sequence released at the next step.
func (s *stream) Close() {
	s.c.queue.remove(s.r)
	s.r.cancel()
}

// gatewayTokenizer is the model's tokenizer as the gateway's.
type gatewayTokenizer struct{ tok *tokenizer.Tokenizer }

func (t gatewayTokenizer) Encode(text string, addSpecial bool) []int {
	return t.tok.Encode(text, addSpecial)
}

func (t gatewayTokenizer) Decode(ids []int) (string, error) { return t.tok.Decode(ids, true) }

func (t gatewayTokenizer) DecodeSpecial(ids []int) (string, error) { return t.tok.Decode(ids, false) }

func (t gatewayTokenizer) Token(id int) (string, bool) { return t.tok.Token(id) }

func (t gatewayTokenizer) EncodeChat(msgs []gateway.Message, tools []json.RawMessage, addGenerationPrompt bool) ([]int, error) {
	tm := make([]tokenizer.Message, len(msgs))
	for i, m := range msgs {
		tm[i] = tokenizer.Message{Role: m.Role, Content: m.Content, ToolCallID: m.ToolCallID}
		for _, c := range m.ToolCalls {
			tm[i].ToolCalls = append(tm[i].ToolCalls, tokenizer.ToolCall{ID: c.ID, Name: c.Name, Arguments: c.Arguments})
		}
	}
	return t.tok.EncodeChatTools(tm, tools, addGenerationPrompt)
}
