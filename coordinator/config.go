package coordinator

import (
	"cmp"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/quant"
)

// Defaults of Config. A zero field means its default.
const (
	// DefaultListenAddr is where the client and admin gRPC server listens: loopback only, so that a
	// coordinator started without thought is not reachable from the network.
	DefaultListenAddr = "127.0.0.1:7070"
	// DefaultHTTPAddr is where the tpfleet serve and coordinator commands put the OpenAI-compatible HTTP
	// gateway: vLLM's port, on loopback. A Config's zero HTTPAddr runs no gateway.
	DefaultHTTPAddr = "127.0.0.1:8000"
	// DefaultTP is the tensor-parallel size of a group.
	DefaultTP = 1
	// DefaultPlan is the tp_plan: HF's base_model_tp_plan with a vocab-parallel embedding.
	DefaultPlan = "tp"
	// DefaultMaxQueue bounds the requests waiting for a place in a batch; one more is refused with
	// RESOURCE_EXHAUSTED.
	DefaultMaxQueue = 256
	// DefaultMaxBatch is the most sequences one step of a group runs.
	DefaultMaxBatch = 32
	// DefaultTokenBudget is the most tokens one step of a group feeds: one per decoding sequence plus
	// the prompt pieces of sequences in prefill.
	DefaultTokenBudget = 512
	// DefaultLeaderTTL is the lease of the coordinator election: a standby takes over about this long
	// after the leader dies.
	DefaultLeaderTTL = 5 * time.Second
	// DefaultSettle is how long the member list must stay unchanged before the leader plans, so that
	// workers starting together land in one epoch instead of one epoch each.
	DefaultSettle = 250 * time.Millisecond
	// DefaultResumeTimeout is how long a request handed back by a group that stopped or failed may wait
	// for another group before it fails with ErrNotPlaced.
	DefaultResumeTimeout = 30 * time.Second
	// DefaultExpertsImbalance is Config.ExpertsImbalance's default: act when the busiest rank of a layer
	// carries a quarter more tokens than the mean.
	DefaultExpertsImbalance = 1.25
	// DefaultStepTimeout is the deadline of a step of one token: a rank that does not answer within it
	// (plus DefaultStepTokenTimeout for every token of the step) fails the group, and its requests resume
	// elsewhere. It covers a collective with a hung peer; raise it for models whose step takes longer.
	DefaultStepTimeout = 10 * time.Second
	// DefaultStepTokenTimeout is what each token of a step adds to its deadline (prefill pieces).
	DefaultStepTokenTimeout = 20 * time.Millisecond
	// DefaultShutdownGrace bounds Close's graceful stop of the gRPC server and the HTTP gateway (streams
	// in flight finish) before it cuts them.
	DefaultShutdownGrace = 5 * time.Second
)

// Config configures a Coordinator. Fields are read once, by New.
type Config struct {
	// ListenAddr is the host:port of the gRPC server with the Generation and Admin services, health
	// and reflection. Port 0 picks a free port (see Coordinator.Addr). Empty means DefaultListenAddr.
	ListenAddr string `json:"listen"`
	// AdvertiseAddr is the host:port at which other coordinators reach this one's gRPC server (a
	// standby watches the leader's process there, see the package doc). Empty means the bound address,
	// with the host name for an unspecified host (0.0.0.0).
	AdvertiseAddr string `json:"advertise"`
	// HTTPAddr is the host:port of the OpenAI-compatible HTTP gateway: GET /v1/models, POST
	// /v1/completions, POST /v1/chat/completions and GET /health (see Coordinator.HTTPAddr).
	// Every coordinator listens; a standby answers generation requests with 503. Port 0 picks a free port
	// (see Coordinator.HTTPAddr). Empty means no gateway; the tpfleet commands default to
	// DefaultHTTPAddr.
	HTTPAddr string `json:"http-listen"`
	// HTTPAllowedOrigins are the origins the gateway's CORS headers allow ("*": any); empty: none.
	HTTPAllowedOrigins []string `json:"allowed-origins"`
	// HTTPMedia says which image URLs the gateway's chat requests may name: data URLs always, http(s)
	// URLs only from its AllowedDomains (none by default), bounded in bytes, time and redirects.
	HTTPMedia gateway.MediaConfig `json:"media"`
	// APIKeys, when not empty, are the bearer tokens that the Generation API and the gateway's /v1
	// routes accept, one of which a client must send (vLLM's --api-key, which may be given several
	// times); /health stays open. They never appear in logs or Status.
	APIKeys []string `json:"-"`
	// AdminKeys are the bearer tokens that open the Admin API to a caller without the admin role in its
	// certificate (--admin-key, several allowed). Without TLS and without AdminKeys the Admin API is
	// open (a loopback listener, or --insecure).
	AdminKeys []string `json:"-"`
	// TLS, when set, is the coordinator's certificate (roles coordinator, for the workers, and a
	// server certificate for clients): the gRPC server then requires client certificates of the CA
	// (Generation: role client or admin; Admin: role admin or an admin key), the gateway serves HTTPS,
	// the coordinator dials workers with it (they must have the worker role) and the etcd client
	// presents it. Nil means plaintext everywhere, which Validate refuses on a non-loopback address
	// unless Insecure.
	TLS *security.TLS `json:"-"`
	// Insecure allows plaintext listeners on non-loopback addresses; every start then logs a warning.
	Insecure bool `json:"insecure"`
	// ServedModelName is the model's name in the APIs; empty means the checkpoint directory's base name.
	ServedModelName string `json:"served-model-name"`
	// MaxModelLen bounds a request's prompt and new tokens; 0 means the model's max_position_embeddings,
	// and more than that is refused.
	MaxModelLen int `json:"max-model-len"`
	// LoadFormat is the workers' --load-format: "dummy" means Model holds only config.json (the workers
	// generate their weights), so the coordinator checks splits against the declared tensors instead of a
	// checkpoint. Empty or "auto": a checkpoint.
	LoadFormat string `json:"load-format"`
	// GenerationConfig chooses the default sampling of requests that leave it out, as vLLM's
	// --generation-config: "auto" (or empty) the checkpoint's generation_config.json; "vllm" vLLM's
	// defaults (sampling at temperature 1, top-p 1, no top-k; the eos ids stay the checkpoint's);
	// anything else a directory whose generation_config.json replaces the checkpoint's.
	GenerationConfig string `json:"generation-config"`
	// ID names this coordinator in the leader election; it must be unique among the coordinators of a
	// cluster. Empty means "coordinator-<host>-<pid>".
	ID string `json:"id"`
	// Etcd is how to reach the cluster's etcd and which cluster's keys to use.
	Etcd cluster.Config `json:"etcd"`
	// Model is the checkpoint directory (config.json, generation_config.json, *.safetensors). The
	// coordinator reads its configs; the workers read its weights, so it must be the same path on every
	// host. It is stored absolute in the plan. Required. The served model's name is the directory's
	// base name.
	Model string `json:"model"`
	// TP is the tensor-parallel size: the ranks (workers) of one group. Workers beyond a multiple of
	// TP stay idle. Zero means DefaultTP.
	TP int `json:"tp"`
	// Plan is the tp_plan: "tp", "ep" or the path of a plan file in HF's format (readable by every
	// worker). Empty means DefaultPlan.
	Plan string `json:"plan"`
	// Quantization is how the workers hold the quantisable weights of a bf16 checkpoint, quantised at load
	// from each rank's own slices: "" (as stored), "fp8" (rowwise, FbgemmFp8 semantics) or "int4"
	// (group-wise, QuantizationGroup input columns a scale); "none" and "bf16" mean "". It is written into
	// the plan (cluster.Plan.Quantization), so every rank of a group holds the same format. Pre-quantised
	// (FP8) checkpoints need none.
	Quantization string `json:"quantization"`
	// QuantizationGroup is int4's input columns per scale. Zero means quant.DefaultGroupSize.
	QuantizationGroup int `json:"quantization-group"`
	// MaxQueue bounds the requests waiting to join a batch (requests already in a batch do not count).
	// Zero means DefaultMaxQueue.
	MaxQueue int `json:"max-queue"`
	// MaxBatch is the most sequences in one step of a group. Zero means DefaultMaxBatch.
	MaxBatch int `json:"max-batch"`
	// TokenBudget is the most tokens fed in one step of a group: each decoding sequence takes one, and
	// prompts are fed in pieces that fit what is left. It must be at least MaxBatch. Zero means
	// DefaultTokenBudget.
	TokenBudget int `json:"token-budget"`
	// PrefillChunk caps the prompt piece one sequence is fed in one step (chunked prefill): a long prompt
	// runs over several steps, each also decoding every other sequence of the batch, so it does not stall
	// them for one long step. Zero means no cap beyond the token budget.
	PrefillChunk int `json:"prefill-chunk"`
	// LeaderTTL is the lease of the leader election key (whole seconds; etcd's minimum applies). Zero
	// means DefaultLeaderTTL.
	LeaderTTL time.Duration `json:"leader-ttl"`
	// Settle is how long the member list must stay unchanged before the leader plans. Zero means
	// DefaultSettle.
	Settle time.Duration `json:"settle"`
	// ResumeTimeout is how long a request that a group handed back (the plan changed, a worker was lost,
	// a step failed or timed out) may wait for a place in another group before it fails with
	// ErrNotPlaced (UNAVAILABLE), counted from the hand-back after its last token. Zero means
	// DefaultResumeTimeout.
	ResumeTimeout time.Duration `json:"resume-timeout"`
	// LoadBandwidth is the read rate, in bytes a second, that rebalance's time estimates assume of a worker
	// loading the tensors it lacks. Zero means DefaultLoadBandwidth.
	LoadBandwidth float64 `json:"load-bandwidth"`
	// ExpertsEvery is how often the leader looks at the expert load under the ep plan and, when the
	// busiest rank of a layer carries more than ExpertsImbalance times the mean and a new placement
	// lowers that, rebalances the experts (rebalance --experts with its default replica slots: the
	// plan's, one a rank at first). Zero means never: the automatic mode is off by default.
	ExpertsEvery time.Duration `json:"experts-every"`
	// ExpertsImbalance is the busiest rank's load over the mean that ExpertsEvery acts on. Zero means
	// DefaultExpertsImbalance.
	ExpertsImbalance float64 `json:"experts-imbalance"`
	// StepTimeout is the deadline of a one-token step: every rank must answer within StepTimeout plus
	// StepTokenTimeout per token of the step, or the group fails (ErrStepTimeout) and its requests resume
	// in another group. Zero means DefaultStepTimeout.
	StepTimeout time.Duration `json:"step-timeout"`
	// StepTokenTimeout is what each token of a step adds to its deadline. Zero means
	// DefaultStepTokenTimeout.
	StepTokenTimeout time.Duration `json:"step-token-timeout"`
	// ShutdownGrace bounds the graceful part of Close, for the gRPC server and the HTTP gateway together.
	// Zero means DefaultShutdownGrace.
	ShutdownGrace time.Duration `json:"shutdown-grace"`
	// Gossip configures the coordinator's gossip node (memberlist), named "coordinator/<ID>". The leader
	// joins the gossip nodes that workers register (cluster.Member.Gossip) and, when gossip declares
	// one dead, places the cluster without it at once instead of waiting for its etcd lease to expire
	// (see the package doc, Failure detection). An empty BindAddr means the host of ListenAddr when that
	// is an IP address (loopback for the default), else cluster.DefaultGossipBindAddr; port 0 picks a
	// free port. Flags: --gossip-bind-addr, --gossip-bind-port, --gossip-advertise-addr, ...
	Gossip cluster.GossipConfig `json:"gossip"`
	// NoGossip runs no gossip node: a dead worker is noticed when its lease expires (or when its Step
	// stream breaks, for its group's requests).
	NoGossip bool `json:"no-gossip"`
	// Logger receives the coordinator's logs. Nil means zap.NewNop().
	Logger *zap.Logger `json:"-"`
}

// Validate reports a Config that New cannot use. Etcd is checked by cluster.Config.Validate.
func (c Config) Validate() error {
	switch {
	case c.Model == "":
		return fmt.Errorf("%w: config: no model directory", ErrInvalidConfig)
	case c.TP < 0:
		return fmt.Errorf("%w: config: TP %d, want >= 1", ErrInvalidConfig, c.TP)
	case c.LoadFormat != "" && c.LoadFormat != "auto" && c.LoadFormat != dummy.LoadFormat:
		return fmt.Errorf("%w: config: load format %q, want auto or dummy", ErrInvalidConfig, c.LoadFormat)
	case c.QuantizationGroup < 0:
		return fmt.Errorf("%w: config: quantization group %d, want >= 1", ErrInvalidConfig, c.QuantizationGroup)
	case c.MaxQueue < 0:
		return fmt.Errorf("%w: config: max queue %d, want >= 1", ErrInvalidConfig, c.MaxQueue)
	case c.MaxBatch < 0:
		return fmt.Errorf("%w: config: max batch %d, want >= 1", ErrInvalidConfig, c.MaxBatch)
	case c.TokenBudget < 0:
		return fmt.Errorf("%w: config: token budget %d, want >= 1", ErrInvalidConfig, c.TokenBudget)
	case c.PrefillChunk < 0:
		return fmt.Errorf("%w: config: prefill chunk %d, want >= 1 (0: the token budget)", ErrInvalidConfig, c.PrefillChunk)
	case c.ExpertsEvery < 0 || c.ExpertsImbalance < 0 || (c.ExpertsImbalance > 0 && c.ExpertsImbalance < 1):
		return fmt.Errorf("%w: experts every %v, imbalance %g: want durations >= 0 and an imbalance of 0 (default) or >= 1", ErrInvalidConfig, c.ExpertsEvery, c.ExpertsImbalance)
	case c.LoadBandwidth < 0:
		return fmt.Errorf("%w: load bandwidth %g, want >= 0", ErrInvalidConfig, c.LoadBandwidth)
	case c.LeaderTTL < 0 || c.Settle < 0 || c.ShutdownGrace < 0 || c.ResumeTimeout < 0 || c.StepTimeout < 0 || c.StepTokenTimeout < 0:
		return fmt.Errorf("%w: config: negative duration", ErrInvalidConfig)
	}
	d := c.withDefaults()
	if d.TokenBudget < d.MaxBatch {
		return fmt.Errorf("%w: config: token budget %d below max batch %d: every decoding sequence needs a token per step",
			ErrInvalidConfig, d.TokenBudget, d.MaxBatch)
	}
	if _, _, err := net.SplitHostPort(d.ListenAddr); err != nil {
		return fmt.Errorf("%w: config: listen address %q: %v", ErrInvalidConfig, d.ListenAddr, err)
	}
	if c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			return fmt.Errorf("%w: config: http listen address %q: %v", ErrInvalidConfig, c.HTTPAddr, err)
		}
	}
	if !c.NoGossip {
		g := c.Gossip
		g.Name = gossipNodeName(d.ID)
		if err := g.Validate(); err != nil {
			return fmt.Errorf("%w: config: %w", ErrInvalidConfig, err)
		}
	}
	if err := c.Etcd.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if _, err := c.insecureListeners(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if _, err := quant.ParseFormat(c.Quantization, cmp.Or(c.QuantizationGroup, quant.DefaultGroupSize)); err != nil {
		return fmt.Errorf("%w: config: %w", ErrInvalidConfig, err)
	}
	return nil
}

// withDefaults returns c with zero fields replaced by their defaults.
func (c Config) withDefaults() Config {
	if c.ListenAddr == "" {
		c.ListenAddr = DefaultListenAddr
	}
	if c.ID == "" {
		host, err := os.Hostname()
		if err != nil || host == "" {
			host = "localhost"
		}
		c.ID = "coordinator-" + host + "-" + strconv.Itoa(os.Getpid())
	}
	if c.TP == 0 {
		c.TP = DefaultTP
	}
	if c.Plan == "" {
		c.Plan = DefaultPlan
	}
	// The plan carries the canonical form: "" for none, the group only for int4 (Validate checked it).
	if f, err := quant.ParseFormat(c.Quantization, cmp.Or(c.QuantizationGroup, quant.DefaultGroupSize)); err == nil {
		c.Quantization, c.QuantizationGroup = string(f.Kind), f.GroupSize
	}
	if c.MaxQueue == 0 {
		c.MaxQueue = DefaultMaxQueue
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = DefaultMaxBatch
	}
	if c.TokenBudget == 0 {
		c.TokenBudget = DefaultTokenBudget
	}
	if c.LeaderTTL == 0 {
		c.LeaderTTL = DefaultLeaderTTL
	}
	if c.Settle == 0 {
		c.Settle = DefaultSettle
	}
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = DefaultShutdownGrace
	}
	if c.ResumeTimeout == 0 {
		c.ResumeTimeout = DefaultResumeTimeout
	}
	if c.StepTimeout == 0 {
		c.StepTimeout = DefaultStepTimeout
	}
	if c.StepTokenTimeout == 0 {
		c.StepTokenTimeout = DefaultStepTokenTimeout
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Gossip.BindAddr == "" {
		c.Gossip.BindAddr = gossipBindAddr(c.ListenAddr)
	}
	c.Gossip.Join = slices.Clone(c.Gossip.Join)
	c.APIKeys, c.AdminKeys = slices.Clone(c.APIKeys), slices.Clone(c.AdminKeys)
	if c.TLS != nil && c.Etcd.TLS == nil {
		c.Etcd.TLS = c.TLS.EtcdClientConfig()
	}
	return c
}

// insecureListeners checks the listeners without TLS (security.CheckListen) and returns the ones that
// are not on loopback, which Insecure allows.
func (c Config) insecureListeners() ([]string, error) {
	d := c.withDefaults()
	ls := []security.Listener{{What: "--listen", Addr: d.ListenAddr, Secure: c.TLS != nil}, {What: "--http-listen", Addr: c.HTTPAddr, Secure: c.TLS != nil}}
	if !c.NoGossip {
		ls = append(ls, security.Listener{What: "--gossip-bind-addr (give --gossip-key-file)", Addr: cmp.Or(d.Gossip.BindAddr, cluster.DefaultGossipBindAddr), Secure: c.Gossip.KeyFile != ""})
	}
	return security.CheckListeners(ls, c.Insecure)
}

// gossipBindAddr is the gossip bind address that goes with a gRPC listen address: its host when that is
// an IP address, so that gossip is reachable where the gRPC server is (loopback only, or every
// interface), else "" (cluster.DefaultGossipBindAddr).
func gossipBindAddr(listen string) string {
	host, _, err := net.SplitHostPort(listen)
	if err != nil || net.ParseIP(host) == nil {
		return ""
	}
	return host
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults, the gossip node's flags
// (cluster.GossipConfig.AddFlags) and the etcd client's flags (cluster.Config.AddFlags).
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.ListenAddr, "listen", c.ListenAddr, "host:port of the client and admin gRPC server (port 0: any; empty: "+DefaultListenAddr+")")
	fs.StringVar(&c.AdvertiseAddr, "advertise", c.AdvertiseAddr, "host:port at which other coordinators reach this one's gRPC server (empty: the bound address)")
	fs.StringVar(&c.HTTPAddr, "http-listen", c.HTTPAddr, "host:port of the OpenAI-compatible HTTP gateway (port 0: any; empty: no gateway)")
	fs.StringVar(&c.ID, "id", c.ID, "coordinator id in the leader election (empty: coordinator-<host>-<pid>)")
	fs.StringVar(&c.Model, "model", c.Model, "checkpoint directory, the same path on every worker's host")
	fs.StringVar(&c.LoadFormat, "load-format", c.LoadFormat, "the workers' --load-format: auto (a checkpoint) or dummy (the model directory needs only config.json)")
	fs.IntVar(&c.MaxModelLen, "max-model-len", c.MaxModelLen, "context of a request, prompt and new tokens (0: max_position_embeddings); requests are also bounded by the KV cache the workers' memory plans hold")
	fs.IntVar(&c.TP, "tp", c.TP, "tensor-parallel size: workers per group (0: 1)")
	fs.StringVar(&c.GenerationConfig, "generation-config", c.GenerationConfig, `default sampling: "auto" (the checkpoint's generation_config.json), "vllm" (vLLM's: temperature 1) or a directory with a generation_config.json (empty: auto)`)
	fs.StringVar(&c.Plan, "plan", c.Plan, `tp_plan: "tp", "ep" or a plan file in HF's format (empty: tp)`)
	fs.StringVar(&c.Quantization, "quantization", c.Quantization, "quantise the checkpoint's linear and expert weights at load on every worker (written into the plan): none, fp8 (rowwise, dynamic per-token activations) or int4 (weight-only, group-wise); lm_head and the routing weights stay bf16")
	fs.IntVar(&c.QuantizationGroup, "quantization-group", c.QuantizationGroup, "int4: input columns per scale (0: 128)")
	fs.IntVar(&c.MaxQueue, "max-queue", c.MaxQueue, "requests that may wait for a place in a batch; more are refused (0: 256)")
	fs.IntVar(&c.MaxBatch, "max-batch", c.MaxBatch, "sequences per step of a group (0: 32)")
	fs.IntVar(&c.TokenBudget, "token-budget", c.TokenBudget, "tokens per step of a group: decodes plus prompt pieces (0: 512)")
	fs.IntVar(&c.PrefillChunk, "prefill-chunk", c.PrefillChunk, "most prompt tokens of one sequence per step (chunked prefill, interleaved with decodes; 0: the token budget)")
	fs.DurationVar(&c.LeaderTTL, "leader-ttl", c.LeaderTTL, "lease of the leader election; a standby takes over this long after the leader dies, sooner when gossip declares it dead (0: 5s)")
	fs.DurationVar(&c.Settle, "settle", c.Settle, "how long the member list must stay unchanged before a new plan (0: 250ms)")
	fs.DurationVar(&c.ExpertsEvery, "experts-every", c.ExpertsEvery, "under the ep plan, look at the expert load this often and rebalance the experts when a rank is too busy (0: never)")
	fs.Float64Var(&c.ExpertsImbalance, "experts-imbalance", c.ExpertsImbalance, "the busiest rank's expert load over the mean that --experts-every acts on (0: 1.25)")
	fs.Float64Var(&c.LoadBandwidth, "load-bandwidth", c.LoadBandwidth, "bytes a second a worker reads, for rebalance's time estimates (0: 1 GiB/s)")
	fs.DurationVar(&c.ResumeTimeout, "resume-timeout", c.ResumeTimeout, "how long a request handed back by a stopped or failed group may wait for another before it fails (0: 30s)")
	fs.DurationVar(&c.StepTimeout, "step-timeout", c.StepTimeout, "deadline of a one-token step; a group that misses it fails and its requests resume elsewhere (0: 10s)")
	fs.DurationVar(&c.StepTokenTimeout, "step-token-timeout", c.StepTokenTimeout, "what each token of a step adds to its deadline (0: 20ms)")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", c.ShutdownGrace, "how long a shutdown lets streams finish before cutting them (0: 5s)")
	fs.BoolVar(&c.NoGossip, "no-gossip", c.NoGossip, "run no gossip node: a dead worker is noticed when its etcd lease expires")
	fs.Var((*keysFlag)(&c.APIKeys), "api-key", "bearer token the Generation API and the HTTP gateway's /v1 routes require; repeat for several (empty: none)")
	fs.Var((*keysFlag)(&c.AdminKeys), "admin-key", "bearer token that opens the Admin API to a caller without the admin role in its certificate; repeat for several")
	c.HTTPMedia.AddFlags(fs)
	c.Gossip.AddFlags(fs)
	fs.Lookup("gossip-bind-addr").Usage = "gossip listen address (empty: the host of --listen when it is an IP address, else 0.0.0.0)"
	c.Etcd.AddFlags(fs)
}

// keysFlag is a flag that may be repeated, each value adding a key (also comma-separated). Its
// String shows how many keys it holds, never the keys: flag's usage output prints defaults.
type keysFlag []string

func (k *keysFlag) String() string {
	if k == nil || len(*k) == 0 {
		return ""
	}
	return strconv.Itoa(len(*k)) + " key(s)"
}

func (k *keysFlag) Set(s string) error {
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			*k = append(*k, e)
		}
	}
	return nil
}
