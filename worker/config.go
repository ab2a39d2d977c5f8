package worker

import (
	"cmp"
	"flag"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
)

// Defaults of Config. A zero field of a Config means its default.
const (
	// DefaultListenAddr is where the gRPC server listens: loopback, any free port.
	DefaultListenAddr = "127.0.0.1:0"
	// DefaultDevice is the device the worker runs on.
	DefaultDevice = DeviceCPU
	// DefaultRingHost is the host the TCP ring listener binds for CPU collectives.
	DefaultRingHost = "127.0.0.1"
	// DefaultLeaseTTL is the TTL of the member's etcd lease: a worker that dies disappears from the
	// member list within it.
	DefaultLeaseTTL = 10 * time.Second
	// DefaultOpTimeout bounds one collective whose peers do not answer.
	DefaultOpTimeout = comm.DefaultOpTimeout
	// DefaultRendezvousTimeout bounds the wait for a TP group's peers to publish their ring addresses
	// (they publish once their weights are loaded) and the ring's connection.
	DefaultRendezvousTimeout = 10 * time.Minute
	// DefaultGracefulStopTimeout bounds Close's graceful stop of the gRPC server.
	DefaultGracefulStopTimeout = 5 * time.Second
	// DefaultKeepAliveTime is how long a connection may be silent before the server pings the client.
	DefaultKeepAliveTime = 30 * time.Second
	// DefaultKeepAliveTimeout is how long the server waits for a ping's answer before it closes the
	// connection.
	DefaultKeepAliveTimeout = 10 * time.Second
	// DefaultMaxRecvMsgSize bounds a message the server receives: 64 MiB, room for StepRequests of
	// about 10 million token ids.
	DefaultMaxRecvMsgSize = 64 << 20
	// DefaultKeepAliveMinTime is the shortest interval between a client's pings that the server
	// tolerates.
	DefaultKeepAliveMinTime = 5 * time.Second
)

// DefaultMaxStepTokens is Config.MaxStepTokens's default: the coordinator's default token budget.
const DefaultMaxStepTokens = 512

// DeviceCPU is the pure-Go backend's name, the default device. Any name registered with package backend
// (backend.Names: "cuda" where the binary links the cuda backend) is a device too.
const DeviceCPU = "cpu"

// Config configures a Worker. The json tags are the flag names of AddFlags.
type Config struct {
	// Quantization is a check, not a choice: the plan says how the ranks hold the quantisable weights of a
	// bf16 checkpoint (cluster.Plan.Quantization, from the coordinator's --quantization), so that every rank
	// of a group agrees. Empty (the default) takes the plan's; "none", "fp8" or "int4" (with
	// QuantizationGroup, 0: quant.DefaultGroupSize) makes the worker refuse, with ErrInvalidConfig, to load
	// a plan whose quantisation differs.
	Quantization      string `json:"quantization"`
	QuantizationGroup int    `json:"quantization-group"`
	// Load configures the weight-load pipeline: reader goroutines, read size, O_DIRECT (run.LoadConfig;
	// zero values are its defaults).
	Load run.LoadConfig `json:"load"`
	// LoadFormat is where the weights come from: "auto" (or empty, the default) reads the checkpoint;
	// "dummy" generates them (package model/dummy) from the model directory's config.json alone, each rank
	// its own slices, in the plan's format: full-size configurations run with no checkpoint.
	LoadFormat string `json:"load-format"`
	// GPUMemoryUtilization is the share of the device's memory the worker may use for weights, the largest
	// step's activations and the KV cache (package memplan), in (0, 1]; the CPU backend's device is the
	// host's memory. Zero means memplan.DefaultUtilization.
	GPUMemoryUtilization float64 `json:"gpu-memory-utilization"`
	// KVCacheTokens, when positive, sizes the KV cache for this many tokens in every layer instead of from
	// memory (a fixed budget: tests, CPU hosts shared with others). Zero: from memory.
	KVCacheTokens int `json:"kv-cache-tokens"`
	// MaxStepTokens is the most tokens a step feeds (the coordinator's --token-budget), for which the
	// planner keeps activation memory. Zero means DefaultMaxStepTokens.
	MaxStepTokens int `json:"max-step-tokens"`
	// OffloadExperts keeps the routed experts in pinned host memory and copies the ones each step
	// chooses to the GPU (run.OffloadWeights; a backend that cannot, such as cpu, fails the load).
	OffloadExperts bool `json:"offload-experts"`
	// ID names the member in etcd; it must be unique in the cluster. Letters, digits and ". _ : @ -",
	// starting with a letter or digit. Empty means "<host>-<pid>".
	ID string `json:"id"`
	// ListenAddr is the host:port of the gRPC server (Worker, health, reflection); port 0 picks a free
	// port. Empty means DefaultListenAddr.
	ListenAddr string `json:"listen"`
	// AdvertiseAddr is the host:port registered in etcd for the coordinator to dial. Empty means the
	// bound address (with the host name in place of an unspecified host such as 0.0.0.0).
	AdvertiseAddr string `json:"advertise"`
	// Model is the checkpoint directory (config.json and *.safetensors) this worker loads its slices
	// from. Empty means the plan's Model, read as a directory on this host. When set, the plan's Model is
	// only a name: a plan with another name still loads this directory, but does not reuse weights
	// loaded under the old name.
	Model string `json:"model"`
	// Seed is the gRPC address of a worker (or any process serving the Worker service's CheckpointInfo and
	// ReadTensor) that streams the checkpoint's slices to this worker when its model directory holds no
	// checkpoint. Empty means the registered workers are asked in turn; the seed is asked first otherwise.
	Seed string `json:"seed"`
	// Device is the name of the backend the model runs on, as registered with package backend: "cpu"
	// (the pure-Go backend, always there; collectives over a TCP ring) or, where the binary imports it,
	// "cuda" (GPU DeviceIndex; a device backend's collectives go through NCCL, whose unique id rank 0 of
	// each TP group publishes in etcd). Empty means DefaultDevice.
	Device string `json:"device"`
	// DeviceIndex is the ordinal of the device among the host's devices of its kind (torchrun's
	// LOCAL_RANK): with a device backend ("cuda") the device the worker opens (as CUDA numbers them, after
	// CUDA_VISIBLE_DEVICES); for the CPU it is informational. It is registered with the member.
	DeviceIndex int `json:"device-index"`
	// BlockSize is the number of positions of one KV cache block (the paged cache's unit: sequences take
	// blocks from the model's pool as they grow, chunked-attention layers give back the blocks of past
	// chunks). Zero means model.DefaultKVBlockSize.
	BlockSize int `json:"block-size"`
	// Threads is the number of goroutines of the CPU backend's matrix products (unused by device backends).
	// Zero means GOMAXPROCS. Several workers on one host should share the cores: Threads = cores /
	// workers.
	Threads int `json:"threads"`
	// RingHost is the host the TCP ring listener binds for CPU collectives (unused by device backends: NCCL
	// finds its own interfaces, see NCCL_SOCKET_IFNAME), on a free port; its address
	// is published to the group's peers through etcd, so it must be reachable from them. An unspecified
	// host (0.0.0.0) binds every interface and publishes the advertised address's host. Empty means
	// DefaultRingHost, which only works for groups within one host.
	RingHost string `json:"ring-host"`
	// Etcd is the cluster's etcd (endpoints, cluster name, dial timeout). Endpoints are required.
	Etcd cluster.Config `json:"etcd"`
	// LeaseTTL is the TTL of the member's lease: shorter detects a dead worker sooner and costs more
	// keep-alive traffic (one renewal every TTL/3). Zero means DefaultLeaseTTL.
	LeaseTTL time.Duration `json:"lease-ttl"`
	// OpTimeout bounds one collective (of the TCP ring, or an NCCL collective pending on the GPU): a rank
	// that waits longer for its peers fails the step and the worker. Set it above the longest gap
	// between ranks reaching the same collective. Zero means DefaultOpTimeout.
	OpTimeout time.Duration `json:"op-timeout"`
	// RendezvousTimeout bounds the wait for the group's peers when the communicator of an epoch is
	// built: peers publish once their weights are loaded, so it must cover the slowest peer's load. A
	// new plan epoch ends the wait sooner. On GPU it also bounds the wait for rank 0's NCCL unique id
	// and for NCCL's initialisation, and is the TTL of the id's lease in etcd. Zero means
	// DefaultRendezvousTimeout.
	RendezvousTimeout time.Duration `json:"rendezvous-timeout"`
	// GracefulStopTimeout bounds Close's graceful stop of the gRPC server (in-flight steps finish,
	// Step streams end with UNAVAILABLE); then it stops the server forcibly. Zero means
	// DefaultGracefulStopTimeout.
	GracefulStopTimeout time.Duration `json:"graceful-stop-timeout"`
	// KeepAliveTime is how long a client connection may be silent before the server pings it, and
	// KeepAliveTimeout how long it waits for the answer before closing the connection: together they
	// detect a dead coordinator under an idle Step stream. Zero means DefaultKeepAliveTime and
	// DefaultKeepAliveTimeout. Connections have no maximum age: Step streams live as long as the
	// coordinator.
	KeepAliveTime    time.Duration `json:"keepalive-time"`
	KeepAliveTimeout time.Duration `json:"keepalive-timeout"`
	// KeepAliveMinTime is the shortest interval between client pings the server accepts (also without
	// active streams); a client that pings more often is disconnected. Zero means
	// DefaultKeepAliveMinTime.
	KeepAliveMinTime time.Duration `json:"keepalive-min-time"`
	// MaxRecvMsgSize bounds, in bytes, a message the gRPC server accepts; a StepRequest takes about 5
	// bytes per token id. Zero means DefaultMaxRecvMsgSize.
	MaxRecvMsgSize int `json:"max-recv-msg-size"`
	// Gossip configures the worker's gossip node (memberlist), through which the coordinator learns of
	// the worker's death within about a second instead of when its lease expires (LeaseTTL). The worker
	// names the node after its member ID, gives it its start time as meta (cluster.Member.GossipMeta)
	// and registers its address as cluster.Member.Gossip; the coordinator joins it. An empty BindAddr
	// means the host of ListenAddr when that is an IP address (loopback for the default ListenAddr),
	// else cluster.DefaultGossipBindAddr; port 0 picks a free port. On several hosts the other nodes
	// must reach the advertised address: set AdvertiseAddr when the host's first private address is
	// not the right one. Flags: --gossip-bind-addr, --gossip-bind-port, --gossip-advertise-addr, ...
	Gossip cluster.GossipConfig `json:"gossip"`
	// NoGossip runs no gossip node: the coordinator then learns of the worker's death only when its
	// lease expires.
	NoGossip bool `json:"no-gossip"`
	// TLS, when set, is the worker's certificate (role worker of the cluster): the gRPC server then
	// requires client certificates of the CA and takes Step and LoadPlan only from a coordinator of the
	// cluster (Status also from an admin), the TCP ring admits only workers of the cluster, and the
	// etcd client presents it. Nil means plaintext, which Validate refuses on a non-loopback address
	// unless Insecure.
	TLS *security.TLS `json:"-"`
	// Insecure allows plaintext listeners on non-loopback addresses; every start then logs a warning.
	Insecure bool `json:"insecure"`
	// MetricsAddr is the host:port of an HTTP listener serving the worker's Prometheus metrics at
	// MetricsPath (state, epoch, weight-load progress, steps, KV cache); port 0 picks a free port (see
	// Worker.MetricsAddr). Empty means no metrics listener.
	MetricsAddr string `json:"metrics-listen"`
	// Labels are registered with the member, e.g. torchrun's RANK, LOCAL_RANK and WORLD_SIZE.
	Labels map[string]string `json:"labels,omitempty"`
	// Logger receives the worker's logs. Nil means zap.NewNop().
	Logger *zap.Logger `json:"-"`
}

// DefaultConfig returns a Config with every defaulted field set to its default, as AddFlags shows them.
// ID stays empty ("<host>-<pid>" at New) and Etcd has no endpoints.
func DefaultConfig() Config {
	return Config{
		ListenAddr:          DefaultListenAddr,
		Device:              DefaultDevice,
		RingHost:            DefaultRingHost,
		LeaseTTL:            DefaultLeaseTTL,
		OpTimeout:           DefaultOpTimeout,
		RendezvousTimeout:   DefaultRendezvousTimeout,
		GracefulStopTimeout: DefaultGracefulStopTimeout,
		KeepAliveTime:       DefaultKeepAliveTime,
		KeepAliveTimeout:    DefaultKeepAliveTimeout,
		KeepAliveMinTime:    DefaultKeepAliveMinTime,
		MaxRecvMsgSize:      DefaultMaxRecvMsgSize,
	}
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults, the gossip node's flags
// (--gossip-bind-addr, --gossip-bind-port, ...) to c.Gossip and the etcd client's flags
// (--etcd-endpoints, --cluster, --etcd-dial-timeout) to c.Etcd.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Quantization, "quantization", c.Quantization, "check only: refuse a plan whose quantization (the coordinator's --quantization) is not this: none, fp8 or int4 (empty: take the plan's)")
	fs.IntVar(&c.QuantizationGroup, "quantization-group", c.QuantizationGroup, "with --quantization int4: the input columns per scale the plan must have (0: 128)")
	fs.StringVar(&c.LoadFormat, "load-format", c.LoadFormat, "where the weights come from: auto (the checkpoint) or dummy (generated from config.json, each rank its own slices)")
	fs.Float64Var(&c.GPUMemoryUtilization, "gpu-memory-utilization", c.GPUMemoryUtilization, "share of the device's memory (host memory on cpu) for weights, activations and the KV cache (0: 0.9)")
	fs.IntVar(&c.KVCacheTokens, "kv-cache-tokens", c.KVCacheTokens, "size the KV cache for this many tokens in every layer instead of from memory (0: from memory)")
	fs.IntVar(&c.MaxStepTokens, "max-step-tokens", c.MaxStepTokens, "most tokens one step feeds, the coordinator's --token-budget: the planner keeps activation memory for it (0: 512)")
	fs.BoolVar(&c.OffloadExperts, "offload-experts", c.OffloadExperts, "keep the routed experts in pinned host memory and copy the ones each step chooses to the GPU (cuda; such steps run without CUDA graphs)")
	fs.StringVar(&c.ID, "id", c.ID, "member ID, unique in the cluster (empty: <host>-<pid>)")
	fs.StringVar(&c.ListenAddr, "listen", c.ListenAddr, "host:port of the worker's gRPC server (port 0: any free port)")
	fs.StringVar(&c.MetricsAddr, "metrics-listen", c.MetricsAddr, "host:port of an HTTP listener serving Prometheus metrics at "+MetricsPath+" (port 0: any; empty: none)")
	fs.StringVar(&c.AdvertiseAddr, "advertise", c.AdvertiseAddr, "host:port the coordinator dials (empty: the bound address)")
	fs.StringVar(&c.Model, "model", c.Model, "checkpoint directory (empty: the plan's model, as a path on this host); without a checkpoint in it, the slices are streamed from a peer")
	fs.StringVar(&c.Seed, "seed", c.Seed, "host:port of a worker that streams the checkpoint when the model directory holds none (empty: ask the registered workers)")
	fs.StringVar(&c.Device, "device", c.Device, "the backend to run on: "+strings.Join(backend.Names(), " or ")+" (cpu: TCP ring collectives; a GPU backend: one GPU, NCCL collectives)")
	fs.IntVar(&c.DeviceIndex, "device-index", c.DeviceIndex, "device ordinal on this host: the GPU with --device cuda (default: torchrun's LOCAL_RANK, else 0)")
	fs.IntVar(&c.DeviceIndex, "gpu", c.DeviceIndex, "same as --device-index")
	fs.IntVar(&c.BlockSize, "block-size", c.BlockSize, fmt.Sprintf("positions per KV cache block (0: %d)", model.DefaultKVBlockSize))
	fs.IntVar(&c.Threads, "threads", c.Threads, "CPU threads for matrix products (0: all cores)")
	fs.StringVar(&c.RingHost, "ring-host", c.RingHost, "host the TCP ring listener binds; must be reachable from the group's peers")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", c.LeaseTTL, "TTL of the member's etcd lease")
	fs.DurationVar(&c.OpTimeout, "op-timeout", c.OpTimeout, "deadline of one collective; a dead peer fails the step within it")
	fs.DurationVar(&c.RendezvousTimeout, "rendezvous-timeout", c.RendezvousTimeout, "how long to wait for the TP group's peers to load and meet")
	fs.DurationVar(&c.GracefulStopTimeout, "graceful-stop-timeout", c.GracefulStopTimeout, "how long Close lets in-flight steps finish before it stops forcibly")
	fs.DurationVar(&c.KeepAliveTime, "keepalive-time", c.KeepAliveTime, "ping a client connection silent for this long")
	fs.DurationVar(&c.KeepAliveTimeout, "keepalive-timeout", c.KeepAliveTimeout, "close a connection whose ping is not answered within this")
	fs.DurationVar(&c.KeepAliveMinTime, "keepalive-min-time", c.KeepAliveMinTime, "shortest client ping interval tolerated")
	fs.IntVar(&c.MaxRecvMsgSize, "max-recv-msg-size", c.MaxRecvMsgSize, "largest gRPC message accepted, in bytes")
	fs.BoolVar(&c.NoGossip, "no-gossip", c.NoGossip, "run no gossip node: the coordinator notices this worker's death only when its lease expires")
	c.Load.AddFlags(fs)
	c.Gossip.AddFlags(fs)
	fs.Lookup("gossip-bind-addr").Usage = "gossip listen address (empty: the host of --listen when it is an IP address, else 0.0.0.0)"
	c.Etcd.AddFlags(fs)
}

// Validate reports a Config that New cannot use. Zero fields are valid: they mean their defaults.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, args...))
	}
	if c.ID != "" {
		if err := (cluster.Member{ID: c.ID, Addr: "127.0.0.1:1"}).Validate(); err != nil {
			return bad("ID %q: want letters, digits and . _ : @ -, starting with a letter or digit", c.ID)
		}
	}
	for _, a := range []struct{ name, addr string }{{"listen", c.ListenAddr}, {"advertise", c.AdvertiseAddr}, {"metrics-listen", c.MetricsAddr}} {
		if a.addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			return bad("%s address %q: %v", a.name, a.addr, err)
		}
	}
	if c.BlockSize != 0 {
		if err := model.CheckKVBlockSize(c.BlockSize); err != nil {
			return bad("%v", err)
		}
	}
	if c.Device != "" {
		if _, err := backend.Lookup(c.Device); err != nil {
			return bad("%v", err)
		}
	}
	if c.Quantization != "" {
		if _, err := quant.ParseFormat(c.Quantization, cmp.Or(c.QuantizationGroup, quant.DefaultGroupSize)); err != nil {
			return bad("%v", err)
		}
	}
	if err := c.Load.Validate(); err != nil {
		return bad("%v", err)
	}
	switch c.LoadFormat {
	case "", "auto", dummy.LoadFormat:
	default:
		return bad("load format %q: want auto or dummy", c.LoadFormat)
	}
	switch {
	case c.GPUMemoryUtilization < 0 || c.GPUMemoryUtilization > 1:
		return bad("gpu memory utilization %g, want in (0, 1]", c.GPUMemoryUtilization)
	case c.KVCacheTokens < 0:
		return bad("kv cache tokens %d, want >= 0", c.KVCacheTokens)
	case c.MaxStepTokens < 0:
		return bad("max step tokens %d, want >= 0", c.MaxStepTokens)
	case c.MaxRecvMsgSize < 0:
		return bad("max receive message size %d, want >= 0", c.MaxRecvMsgSize)
	case c.DeviceIndex < 0:
		return bad("device index %d, want >= 0", c.DeviceIndex)
	case c.Threads < 0:
		return bad("threads %d, want >= 0", c.Threads)
	case strings.ContainsAny(c.RingHost, " /"):
		return bad("ring host %q is not a host", c.RingHost)
	case c.LeaseTTL < 0, c.OpTimeout < 0, c.RendezvousTimeout < 0, c.GracefulStopTimeout < 0,
		c.KeepAliveTime < 0, c.KeepAliveTimeout < 0, c.KeepAliveMinTime < 0:
		return bad("negative duration")
	}
	if !c.NoGossip {
		g := c.Gossip
		g.Name = "worker" // the member ID, checked above
		if err := g.Validate(); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	}
	if err := c.Etcd.Validate(); err != nil {
		return fmt.Errorf("%w: etcd: %w", ErrInvalidConfig, err)
	}
	if _, err := c.insecureListeners(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return nil
}

// insecureListeners checks the listeners without TLS (security.CheckListen) and returns the ones that
// are not on loopback, which Insecure allows.
func (c Config) insecureListeners() ([]string, error) {
	d := c.withDefaults()
	ls := []security.Listener{{What: "--listen", Addr: d.ListenAddr, Secure: c.TLS != nil}, {What: "--ring-host", Addr: d.RingHost, Secure: c.TLS != nil},
		{What: "--metrics-listen", Addr: c.MetricsAddr, Secure: c.TLS != nil}}
	if !c.NoGossip {
		ls = append(ls, security.Listener{What: "--gossip-bind-addr (give --gossip-key-file)", Addr: cmp.Or(d.Gossip.BindAddr, cluster.DefaultGossipBindAddr), Secure: c.Gossip.KeyFile != ""})
	}
	return security.CheckListeners(ls, c.Insecure)
}

// withDefaults returns a copy of c with zero fields replaced by their defaults.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	set := func(v *string, def string) {
		if *v == "" {
			*v = def
		}
	}
	setDur := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	if c.ID == "" {
		c.ID = defaultID()
	}
	set(&c.ListenAddr, d.ListenAddr)
	set(&c.Device, d.Device)
	set(&c.RingHost, d.RingHost)
	setDur(&c.LeaseTTL, d.LeaseTTL)
	setDur(&c.OpTimeout, d.OpTimeout)
	setDur(&c.RendezvousTimeout, d.RendezvousTimeout)
	setDur(&c.GracefulStopTimeout, d.GracefulStopTimeout)
	setDur(&c.KeepAliveTime, d.KeepAliveTime)
	setDur(&c.KeepAliveTimeout, d.KeepAliveTimeout)
	setDur(&c.KeepAliveMinTime, d.KeepAliveMinTime)
	if c.MaxRecvMsgSize == 0 {
		c.MaxRecvMsgSize = d.MaxRecvMsgSize
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Gossip.BindAddr == "" {
		c.Gossip.BindAddr = gossipBindAddr(c.ListenAddr)
	}
	c.Gossip.Join = slices.Clone(c.Gossip.Join)
	c.Labels = maps.Clone(c.Labels)
	c.Etcd.Endpoints = append([]string(nil), c.Etcd.Endpoints...)
	if c.TLS != nil && c.Etcd.TLS == nil {
		c.Etcd.TLS = c.TLS.EtcdClientConfig()
	}
	return c
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

// defaultID is "<host>-<pid>", with characters a member ID cannot hold replaced by "-".
func defaultID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "worker"
	}
	host = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '-'
	}, host)
	host = strings.TrimLeft(host, ".-_")
	if host == "" {
		host = "worker"
	}
	return host + "-" + strconv.Itoa(os.Getpid())
}

// TorchrunVars are the variables torchrun (and tpfleet launch) set for each process it starts, that
// ApplyTorchrunEnv records in Labels.
var TorchrunVars = []string{"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"}

// ApplyTorchrunEnv honours torchrun's environment, read through getenv: it records the TorchrunVars that
// are set in Labels (under their own names) and, unless deviceIndexSet (the --device-index or --gpu flag
// was given), takes LOCAL_RANK as DeviceIndex: one GPU per local rank, as torchrun's workers do. A LOCAL_RANK that is not a non-negative integer is an error.
func (c *Config) ApplyTorchrunEnv(getenv func(string) string, deviceIndexSet bool) error {
	for _, k := range TorchrunVars {
		v := getenv(k)
		if v == "" {
			continue
		}
		if c.Labels == nil {
			c.Labels = make(map[string]string)
		}
		c.Labels[k] = v
	}
	if v := getenv("LOCAL_RANK"); v != "" && !deviceIndexSet {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return fmt.Errorf("%w: LOCAL_RANK=%q is not a device index", ErrInvalidConfig, v)
		}
		c.DeviceIndex = n
	}
	return nil
}

// blockSize is the KV cache block size the worker's model uses.
func (w *Worker) blockSize() int { return cmp.Or(w.cfg.BlockSize, model.DefaultKVBlockSize) }
