package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/internal/wait"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// ProxyConfig configures a Proxy.
type ProxyConfig struct {
	// Coordinators are the gRPC addresses of the cluster's coordinators (leader and standbys); at
	// least one.
	Coordinators []string
	// Model is the checkpoint directory the coordinators serve; the proxy reads its config.json,
	// generation_config.json and tokenizer (not its weights), as a coordinator does.
	Model string
	// ServedModelName and MaxModelLen are the coordinators' (Config.ServedModelName, MaxModelLen).
	ServedModelName string
	MaxModelLen     int
	// Dial opens a connection to a coordinator; nil means plaintext.
	Dial func(addr string) (*grpc.ClientConn, error)
	// Logger logs the coordinators the proxy turns to; nil means none.
	Logger *zap.Logger
}

const (
	// proxyHealthTimeout bounds a health check of one coordinator.
	proxyHealthTimeout = time.Second
	// proxyTakeoverWait is how long a request waits for some coordinator to lead (a take-over) before
	// it is refused; proxyRetry is the pause between rounds of the coordinators.
	proxyTakeoverWait = 5 * time.Second
	proxyRetry        = 100 * time.Millisecond
)

// Proxy is the HTTP gateway's Generator over the coordinators' gRPC API, for a gateway in a process of
// its own (tpfleet gateway). It sends each request to the coordinator that served the last one, and
// turns to the next when that one is a standby (NOT_LEADER), is closing, or cannot be reached before
// the first token; when none leads (a take-over) it tries them again for up to 5 s. A stream cut by its coordinator's death after tokens were sent ends with an error
// the gateway sends as an SSE error event (unavailable, code coordinator_lost), which a coordinator
// serving HTTP itself cannot send once it is dead. Text is encoded here with the model's tokenizer, so
// prompts are sent as ids.
type Proxy struct {
	model modelInfo
	addrs []string
	conns []*grpc.ClientConn
	gens  []pb.GenerationClient
	hcs   []healthpb.HealthClient
	log   *zap.Logger

	mu   sync.Mutex
	last int // the coordinator that served the last request
}

var _ gateway.Generator = (*Proxy)(nil)

// NewProxy reads the model's configs and makes the connections (lazily: nothing is dialled yet).
func NewProxy(cfg ProxyConfig) (*Proxy, error) {
	if len(cfg.Coordinators) == 0 {
		return nil, fmt.Errorf("%w: proxy: no coordinator address", ErrInvalidConfig)
	}
	m, err := loadModelInfo(cfg.Model)
	if err != nil {
		return nil, err
	}
	if err := m.serveAs(cfg.ServedModelName, cfg.MaxModelLen); err != nil {
		return nil, err
	}
	dial := cfg.Dial
	if dial == nil {
		dial = func(addr string) (*grpc.ClientConn, error) {
			return grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		}
	}
	p := &Proxy{model: m, addrs: cfg.Coordinators, log: cfg.Logger}
	if p.log == nil {
		p.log = zap.NewNop()
	}
	for _, a := range cfg.Coordinators {
		conn, err := dial(a)
		if err != nil {
			_ = p.Close()
			return nil, fmt.Errorf("%w: proxy: coordinator %s: %w", ErrInvalidConfig, a, err)
		}
		p.conns = append(p.conns, conn)
		p.gens = append(p.gens, pb.NewGenerationClient(conn))
		p.hcs = append(p.hcs, healthpb.NewHealthClient(conn))
	}
	return p, nil
}

// Close closes the connections.
func (p *Proxy) Close() error {
	var errs []error
	for _, c := range p.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Model describes the served model; another name is 404 model_not_found.
func (p *Proxy) Model(name string) (gateway.Model, error) { return p.model.gatewayModel(name) }

// Tokenizer returns the model's tokenizer, or the error of a text request without one.
func (p *Proxy) Tokenizer() (gateway.Tokenizer, error) { return p.model.gatewayTokenizer() }

// Serving reports nil when some coordinator serves (it leads and a TP group serves), else what each
// one said.
func (p *Proxy) Serving() error {
	var why []string
	for i, hc := range p.hcs {
		ctx, cancel := context.WithTimeout(context.Background(), proxyHealthTimeout)
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		switch {
		case err != nil:
			why = append(why, fmt.Sprintf("%s: %s", p.addrs[i], status.Convert(err).Message()))
		case resp.GetStatus() == healthpb.HealthCheckResponse_SERVING:
			return nil
		default:
			why = append(why, fmt.Sprintf("%s: %s", p.addrs[i], resp.GetStatus()))
		}
	}
	return &gateway.Error{Kind: gateway.ErrUnavailable, Code: "no_coordinator",
		Err: fmt.Errorf("no coordinator serves: %s", strings.Join(why, "; "))}
}

// Generate checks req as a coordinator does, sends it to a coordinator and waits for its first message,
// so that a refusal is answered with its HTTP status rather than inside a stream. ctx bounds that wait.
func (p *Proxy) Generate(ctx context.Context, req gateway.Request) (gateway.Stream, error) {
	in, err := p.model.fromGateway(req)
	if err != nil {
		return nil, toGateway(err)
	}
	if in.GetPrompt() != "" {
		if in.PromptIds, err = p.model.encode(in.GetPrompt()); err != nil {
			return nil, toGateway(err)
		}
		in.Prompt = ""
	}
	ids := in.GetPromptIds()
	if len(in.GetImages()) > 0 { // checked here too, and the prompt as the coordinator expands it
		if ids, err = p.model.withImages(ids, in.GetImages()); err != nil {
			return nil, toGateway(err)
		}
	}
	prompt := make([]int, len(ids))
	for i, id := range ids {
		prompt[i] = int(id)
	}
	deadline := time.Now().Add(proxyTakeoverWait)
	for {
		p.mu.Lock()
		first := p.last
		p.mu.Unlock()
		var last error
		for k := range p.addrs {
			i := (first + k) % len(p.addrs)
			s, err := p.start(ctx, i, in)
			if err == nil {
				p.mu.Lock()
				p.last = i
				p.mu.Unlock()
				s.prompt = prompt
				return s, nil
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if !turnAway(err) {
				return nil, fromStatus(err)
			}
			p.log.Debug("coordinator does not take requests; trying the next", zap.String("addr", p.addrs[i]), zap.Error(err))
			last = err
		}
		// No coordinator leads now: during a take-over the standby leads within a second.
		if time.Now().After(deadline) || !wait.Sleep(ctx, proxyRetry) {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fromStatus(last)
		}
	}
}

// start opens a Generate stream on coordinator i and reads its first message.
func (p *Proxy) start(ctx context.Context, i int, in *pb.GenerateRequest) (*proxyStream, error) {
	sctx, cancel := context.WithCancel(context.Background()) // the generation outlives ctx
	stop := context.AfterFunc(ctx, cancel)
	defer stop()
	st, err := p.gens[i].Generate(sctx, in)
	var msg *pb.GenerateResponse
	if err == nil {
		msg, err = st.Recv()
	}
	if err != nil {
		cancel()
		if errors.Is(err, io.EOF) {
			err = status.Errorf(codes.Internal, "coordinator %s ended the stream without a message", p.addrs[i])
		}
		return nil, err
	}
	return &proxyStream{addr: p.addrs[i], st: st, cancel: cancel, first: msg}, nil
}

// turnAway reports whether a coordinator's refusal sends the request to the next one: a standby, a
// coordinator shutting down, or one that could not be reached (UNAVAILABLE without a reason).
func turnAway(err error) bool {
	if status.Code(err) != codes.Unavailable {
		return false
	}
	switch Reason(err) {
	case "", "NOT_LEADER", "CLOSED":
		return true
	}
	return false
}

// fromStatus classifies a coordinator's status error for the gateway: the reason (QUEUE_FULL, ...)
// becomes the code in lower case; the message stays. UNAVAILABLE without a reason is a coordinator
// that could not be reached or died: code coordinator_lost.
func fromStatus(err error) error {
	st := status.Convert(err)
	code := strings.ToLower(Reason(err))
	var kind error
	switch st.Code() {
	case codes.InvalidArgument, codes.FailedPrecondition:
		kind = gateway.ErrInvalidRequest
	case codes.NotFound:
		kind = gateway.ErrNotFound
	case codes.ResourceExhausted:
		kind = gateway.ErrOverloaded
	case codes.Unavailable:
		kind = gateway.ErrUnavailable
		if code == "" {
			code = "coordinator_lost"
		}
	case codes.Canceled:
		return context.Canceled
	case codes.DeadlineExceeded:
		return context.DeadlineExceeded
	}
	return &gateway.Error{Kind: kind, Code: code, Err: errors.New(st.Message())}
}

// proxyStream is a coordinator's Generate stream as a gateway.Stream.
type proxyStream struct {
	addr   string
	prompt []int
	st     grpc.ServerStreamingClient[pb.GenerateResponse]
	cancel context.CancelFunc
	first  *pb.GenerateResponse // read by Generate, not yet returned
	// promptLps are the prompt's logprobs of a message without ids or text, for the next chunk.
	promptLps []gateway.TokenLogprobs
}

func (s *proxyStream) PromptIDs() []int { return s.prompt }

// Next returns the next message's ids and text, or the end.
func (s *proxyStream) Next(ctx context.Context) (gateway.Chunk, error) {
	for {
		msg := s.first
		s.first = nil
		if msg == nil {
			stop := context.AfterFunc(ctx, s.cancel)
			var err error
			msg, err = s.st.Recv()
			stop()
			switch {
			case ctx.Err() != nil:
				return gateway.Chunk{}, ctx.Err()
			case errors.Is(err, io.EOF):
				return gateway.Chunk{}, &gateway.Error{Kind: gateway.ErrUnavailable, Code: "coordinator_lost",
					Err: fmt.Errorf("coordinator %s ended the stream without a finish reason", s.addr)}
			case err != nil:
				if status.Code(err) == codes.Unavailable && Reason(err) == "" {
					return gateway.Chunk{}, &gateway.Error{Kind: gateway.ErrUnavailable, Code: "coordinator_lost",
						Err: fmt.Errorf("coordinator %s was lost during the generation (retry it): %s", s.addr, status.Convert(err).Message())}
				}
				return gateway.Chunk{}, fromStatus(err)
			}
		}
		ch := gateway.Chunk{IDs: make([]int, len(msg.GetIds())), Text: msg.GetText(), Finish: msg.GetFinishReason(), StopReason: msg.GetStopReason(),
			Logprobs: gatewayLogprobs(msg.GetLogprobs())}
		for i, id := range msg.GetIds() {
			ch.IDs[i] = int(id)
		}
		s.promptLps = append(s.promptLps, gatewayLogprobs(msg.GetPromptLogprobs())...)
		if len(ch.IDs) > 0 || ch.Text != "" || ch.Finish != "" {
			ch.PromptLogprobs, s.promptLps = s.promptLps, nil
			return ch, nil
		}
	}
}

// Close ends the generation on the coordinator (cancelling its stream) and releases the stream.
func (s *proxyStream) Close() { s.cancel() }
