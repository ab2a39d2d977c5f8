package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/samplingpb"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// Finish reasons, as GenerateResult.FinishReason carries them.
const (
	FinishStop   = "stop"   // an eos or stop id was chosen (it is the last id)
	FinishLength = "length" // max_tokens ids were chosen
)

// Client calls a coordinator's Generation and Admin services, for programs that should not depend on
// the generated protobuf code (cmd/tpfleet). Errors are gRPC status errors (status.Code reads them), or
// the caller's context error. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	gen    pb.GenerationClient
	admin  pb.AdminClient
	health healthpb.HealthClient
}

// Option configures Dial.
type Option func(*dialOptions)

type dialOptions struct {
	tls   *tls.Config
	token string
}

// WithTLS makes Dial connect over TLS with cfg: tpfleet's coordinators require a client certificate of
// the cluster's CA with the client or admin role (package internal/security's ClientConfig makes such
// a configuration from --tls-cert, --tls-key and --tls-ca). A nil cfg means plaintext.
func WithTLS(cfg *tls.Config) Option { return func(o *dialOptions) { o.tls = cfg } }

// WithToken makes every call send token as a bearer token (authorization: Bearer TOKEN): one of the
// coordinator's --api-key for Generate, or an --admin-key for the Admin calls. Empty means none.
func WithToken(token string) Option { return func(o *dialOptions) { o.token = token } }

// Dial makes a Client of the coordinator at addr (host:port), over plaintext unless WithTLS. It
// connects lazily: the first call reports an unreachable address, or a refused certificate, as
// UNAVAILABLE.
func Dial(addr string, opts ...Option) (*Client, error) {
	var o dialOptions
	for _, f := range opts {
		f(&o)
	}
	creds := insecure.NewCredentials()
	if o.tls != nil {
		creds = credentials.NewTLS(o.tls)
	}
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if o.token != "" {
		dopts = append(dopts, grpc.WithPerRPCCredentials(grpcauth.Bearer(o.token)))
	}
	conn, err := grpc.NewClient(addr, dopts...)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", addr, err)
	}
	return &Client{
		conn:   conn,
		gen:    pb.NewGenerationClient(conn),
		admin:  pb.NewAdminClient(conn),
		health: healthpb.NewHealthClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// GenerateRequest is one generation: a prompt of token ids or text, and when to stop.
type GenerateRequest struct {
	// Model names the served model; empty means the only one.
	Model string
	// PromptIDs is the prompt as token ids. Exactly one of PromptIDs and Prompt must be set.
	PromptIDs []int
	// Prompt is the prompt as text, which the coordinator encodes with the model's tokenizer, BOS
	// added (HF's tokenizer(text)); a model without a tokenizer refuses it (FAILED_PRECONDITION).
	Prompt string
	// MaxTokens bounds the new tokens; it must be positive and fit the model's context.
	MaxTokens int
	// Sampling chooses the tokens (with its penalties, bias, min tokens and logprobs); nil means the
	// checkpoint's generation_config.json.
	Sampling *sample.Params
	// IgnoreEOS keeps generating past the checkpoint's eos ids.
	IgnoreEOS bool
	// StopIDs end the generation too, besides the eos ids.
	StopIDs []int
	// Stop strings end the generation too, matched on the decoded text as vLLM does: the text ends
	// before the stop string, or after it with IncludeStopStr. They need the model's tokenizer.
	Stop           []string
	IncludeStopStr bool
	// PromptLogprobs, when not nil, asks for the prompt tokens' log-probabilities (vLLM's
	// prompt_logprobs) with this many (at most 20) most likely tokens each.
	PromptLogprobs *int
	// Images are encoded images (PNG, JPEG, GIF, WebP) for a model with a vision tower, in the order of
	// the prompt's image placeholders (<|image|> for Llama 4); a prompt without any gets one per image
	// after its BOS. A model without a vision tower refuses them (INVALID_ARGUMENT).
	Images [][]byte
}

// GenerateResult is a finished generation.
type GenerateResult struct {
	// IDs are the new tokens; after FinishStop the last one is the eos or stop id.
	IDs []int
	// Text is the text of IDs, special tokens left out, when the model has a tokenizer; else empty.
	Text string
	// FinishReason is FinishStop or FinishLength.
	FinishReason string
	// StopReason is the stop string that ended the generation, if one did.
	StopReason string
	// PromptTokens is the length of the prompt.
	PromptTokens int
	// Logprobs has one entry per id of IDs when Sampling.Logprobs was set: the id, its log-probability
	// and the Sampling.TopLogprobs most likely ids'.
	Logprobs []sample.Choice
	// PromptLogprobs, when asked for, has one entry per prompt token after the first: its
	// log-probability given the tokens before it, its rank and the most likely tokens there. ID is the
	// prompt token's when the request gave PromptIDs (0 for a text prompt).
	PromptLogprobs []sample.Choice
}

// Generate runs one generation. emit, when not nil, receives the new ids as the coordinator streams
// them (usually one at a time) with the text they complete (only whole characters: a character split
// across tokens comes with its last token; "" without a tokenizer), from the calling goroutine; an
// error from emit cancels the generation and is returned. The last text, what is left of an incomplete
// character at the end, may come with no ids.
func (c *Client) Generate(ctx context.Context, req GenerateRequest, emit func(ids []int, text string) error) (GenerateResult, error) {
	in := &pb.GenerateRequest{
		Model:     req.Model,
		PromptIds: toInt32(req.PromptIDs),
		Prompt:    req.Prompt,
		MaxTokens: int32(req.MaxTokens),
		IgnoreEos: req.IgnoreEOS,
		StopIds:   toInt32(req.StopIDs),
		Stop:      req.Stop,

		IncludeStopStrInOutput: req.IncludeStopStr,
		Images:                 req.Images,
	}
	if p := req.Sampling; p != nil {
		in.Sampling = samplingpb.ToProto(*p)
	}
	if n := req.PromptLogprobs; n != nil {
		v := int32(*n)
		in.PromptLogprobs = &v
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.gen.Generate(ctx, in)
	if err != nil {
		return GenerateResult{}, err
	}
	res := GenerateResult{PromptTokens: len(req.PromptIDs)}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			if res.FinishReason == "" {
				return res, fmt.Errorf("client: generate: the stream ended without a finish reason")
			}
			return res, nil
		}
		if err != nil {
			return res, err
		}
		ids := make([]int, len(msg.GetIds()))
		for i, id := range msg.GetIds() {
			ids[i] = int(id)
		}
		res.IDs = append(res.IDs, ids...)
		res.Text += msg.GetText()
		for i, lp := range msg.GetLogprobs() {
			c := sample.Choice{Logprob: lp.GetLogprob()}
			if i < len(ids) {
				c.ID = ids[i]
			}
			for _, t := range lp.GetTop() {
				c.Top = append(c.Top, sample.TokenLogprob{ID: int(t.GetId()), Logprob: t.GetLogprob()})
			}
			res.Logprobs = append(res.Logprobs, c)
		}
		for i, lp := range msg.GetPromptLogprobs() {
			c := sample.Choice{Logprob: lp.GetLogprob(), Rank: int(lp.GetRank())}
			if i+1 < len(req.PromptIDs) {
				c.ID = req.PromptIDs[i+1]
			}
			for _, t := range lp.GetTop() {
				c.Top = append(c.Top, sample.TokenLogprob{ID: int(t.GetId()), Logprob: t.GetLogprob()})
			}
			res.PromptLogprobs = append(res.PromptLogprobs, c)
		}
		if msg.GetPromptTokens() > 0 {
			res.PromptTokens = int(msg.GetPromptTokens())
		}
		if msg.GetFinishReason() != "" {
			res.FinishReason, res.StopReason = msg.GetFinishReason(), msg.GetStopReason()
		}
		if emit != nil && (len(ids) > 0 || msg.GetText() != "") {
			if err := emit(ids, msg.GetText()); err != nil {
				return res, err
			}
		}
	}
}

// Tokenize encodes text with the served model's tokenizer, adding BOS when addSpecial is set. A model
// without a tokenizer fails with FAILED_PRECONDITION.
func (c *Client) Tokenize(ctx context.Context, model, text string, addSpecial bool) ([]int, error) {
	resp, err := c.gen.Tokenize(ctx, &pb.TokenizeRequest{Model: model, Text: text, AddSpecial: addSpecial})
	if err != nil {
		return nil, err
	}
	ids := make([]int, len(resp.GetIds()))
	for i, id := range resp.GetIds() {
		ids[i] = int(id)
	}
	return ids, nil
}

// WaitReady blocks until the coordinator reports SERVING on the gRPC health service (it leads and a
// TP group serves), polling every interval, or until ctx ends.
func (c *Client) WaitReady(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{})
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("status %s", resp.GetStatus())
			}
			return fmt.Errorf("client: coordinator not serving: %w (last: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// Placement is one rank of a TP group in the plan, as the Admin service's Shards reports it.
type Placement struct {
	Group    int    `json:"group"`
	Rank     int    `json:"rank"`
	MemberID string `json:"member_id"`
	Addr     string `json:"addr"`
}

// Shards is the plan in force.
//
// Its JSON (rebalance --json) is snake_case, as every --json output of the command line.
type Shards struct {
	Epoch       int64       `json:"epoch"`
	Model       string      `json:"model"`
	TP          int         `json:"tp"`
	Plan        string      `json:"plan"`
	Assignments []Placement `json:"assignments"`
	// LeaderID is the coordinator that answered when it leads, empty when it is a standby.
	LeaderID string `json:"leader_id"`
	// EtcdUnreachable is set while the leader serves this plan with etcd unreachable: the plan (read
	// from the leader's memory) cannot change until etcd answers.
	EtcdUnreachable bool `json:"etcd_unreachable"`
}

// Shards reads the plan through the coordinator's Admin service.
func (c *Client) Shards(ctx context.Context) (Shards, error) {
	resp, err := c.admin.Shards(ctx, &pb.ShardsRequest{})
	if err != nil {
		return Shards{}, err
	}
	s := Shards{Epoch: resp.GetEpoch(), Model: resp.GetModel(), TP: int(resp.GetTp()), Plan: resp.GetPlan(),
		LeaderID: resp.GetLeaderId(), EtcdUnreachable: resp.GetEtcdUnreachable()}
	for _, a := range resp.GetAssignments() {
		s.Assignments = append(s.Assignments, Placement{Group: int(a.GetGroup()), Rank: int(a.GetRank()), MemberID: a.GetMemberId(), Addr: a.GetAddr()})
	}
	return s, nil
}

// Rebalance asks the leading coordinator for a new epoch, with TP size tp when tp > 0, and returns it.
func (c *Client) Rebalance(ctx context.Context, tp int) (int64, error) {
	resp, err := c.admin.Rebalance(ctx, &pb.RebalanceRequest{Tp: int32(tp)})
	if err != nil {
		return 0, err
	}
	return resp.GetEpoch(), nil
}

func toInt32(v []int) []int32 {
	if v == nil {
		return nil
	}
	out := make([]int32, len(v))
	for i, x := range v {
		out[i] = int32(x)
	}
	return out
}
