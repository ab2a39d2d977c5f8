package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/model"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/tpgroup"
	"github.com/tpfleet/tpfleet/worker"
)

type serveFlags struct {
	model       string
	tp          int
	workers     int
	device      string
	threads     int
	plan        string
	quant       quantFlags
	load        modelrun.LoadConfig // the workers' weight-load pipeline
	offload     bool                // --offload-experts, passed to the workers
	listen      string
	httpListen  string
	dataDir     string
	etcdListen  string
	maxQueue    int
	maxBatch    int
	tokenBudget int
	// prefillChunk caps a prompt's piece per step; blockSize is the workers' KV block size.
	prefillChunk, blockSize int
	logLevel                string
	mem                     memFlags
	// vLLM's serve flags.
	host, servedName, origins string
	media                     gateway.MediaConfig
	port, maxModelLen         int
	genConfig                 string
	apiKeys, adminKeys        []string
	tls                       tlsFlags
}

// runServe is the one-machine deployment: an embedded etcd, a coordinator and --workers local workers,
// until SIGINT or SIGTERM. It prints the coordinator's gRPC address on stdout; the OpenAI-compatible HTTP
// gateway listens on --http-listen. On the CPU (default: --tp workers, one TP group) the workers run in
// this process. With --device cuda it starts one worker process per GPU (`tpfleet worker --device cuda
// --gpu i`, as tpfleet launch starts its children, i = the local rank), by default as many as the GPUs
// it sees, rounded down to a multiple of --tp; their TP groups build NCCL communicators through the
// embedded etcd.
//
// As vllm serve, the model may come first as an argument, and --tensor-parallel-size, --host, --port,
// --api-key, --served-model-name, --max-model-len, --generation-config and --allowed-origins work as
// vLLM's.
//
//	tpfleet serve MODEL [--tensor-parallel-size N] [--host H] [--port P] [--device cpu|cuda] [--listen ADDR] [--workers N]
//	tpfleet serve --model DIR [--tp N] [--http-listen ADDR] ...
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f serveFlags
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: tpfleet serve MODEL [flags]   (or --model MODEL)\n\n"+
			"Serves MODEL on this machine as vllm serve does: an embedded etcd, a coordinator with the OpenAI API\n"+
			"on --host:--port (default 127.0.0.1:8000) and gRPC on --listen, and --workers local workers.\n\nflags:")
		fs.PrintDefaults()
	}
	fs.StringVar(&f.model, "model", "", "checkpoint directory (config.json and *.safetensors)")
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel size: workers per group")
	fs.IntVar(&f.tp, "tensor-parallel-size", 1, "same as --tp (vLLM's name)")
	fs.StringVar(&f.host, "host", "", "host of the HTTP gateway, replacing --http-listen's (vLLM's flag)")
	fs.IntVar(&f.port, "port", 0, "port of the HTTP gateway, replacing --http-listen's (vLLM's flag; 0: keep it)")
	keysFlag(fs, &f.apiKeys, "api-key", "bearer token the Generation API and the HTTP gateway's /v1 routes require; repeat for several (vLLM's flag; none: no token)")
	keysFlag(fs, &f.adminKeys, "admin-key", "bearer token that opens the Admin API to a caller without the admin role in its certificate; repeat for several")
	f.tls.add(fs)
	f.tls.addGossipKey(fs)
	fs.StringVar(&f.servedName, "served-model-name", "", "the model's name in the APIs (empty: the checkpoint directory's name)")
	fs.IntVar(&f.maxModelLen, "max-model-len", 0, "context of a request, prompt and new tokens (0: max_position_embeddings)")
	fs.StringVar(&f.genConfig, "generation-config", "auto", `default sampling of requests that leave it out: "auto" (the checkpoint's generation_config.json), "vllm" (vLLM's defaults: temperature 1) or a directory with a generation_config.json`)
	fs.StringVar(&f.origins, "allowed-origins", "", `comma-separated origins the HTTP gateway's CORS allows ("*": any; empty: no CORS)`)
	f.media.AddFlags(fs)
	fs.IntVar(&f.workers, "workers", 0, "local workers; a multiple of --tp gives several replicas (0: --tp on cpu; on cuda the visible GPUs, rounded down to a multiple of --tp)")
	fs.IntVar(&f.workers, "nproc-per-node", 0, "same as --workers (torchrun's name: one worker per GPU)")
	fs.StringVar(&f.device, "device", worker.DeviceCPU, "where the workers run: "+deviceChoices()+" (cpu: in this process; a GPU backend: one worker process per GPU)")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads of each worker's matrix products (0: cores / workers)")
	fs.StringVar(&f.plan, "plan", coordinator.DefaultPlan, `tp_plan: "tp", "ep" or a plan file in HF's format`)
	f.quant.addFlags(fs, "")
	f.load.AddFlags(fs)
	fs.BoolVar(&f.offload, "offload-experts", false, "the workers keep the routed experts in pinned host memory and copy the ones each step chooses to the GPU (cuda; such steps run without CUDA graphs)")
	fs.StringVar(&f.listen, "listen", coordinator.DefaultListenAddr, "host:port of the coordinator's gRPC server (port 0: any)")
	fs.StringVar(&f.httpListen, "http-listen", coordinator.DefaultHTTPAddr, "host:port of the OpenAI-compatible HTTP gateway (port 0: any; empty: no gateway)")
	fs.StringVar(&f.dataDir, "data-dir", "", "etcd's data directory, kept across runs (empty: a temporary one, removed at exit)")
	fs.StringVar(&f.etcdListen, "etcd-listen", "127.0.0.1:0", "host:port of the embedded etcd's clients (port 0: any)")
	fs.IntVar(&f.maxQueue, "max-queue", 0, "requests that may wait for a batch (0: 256)")
	fs.IntVar(&f.maxBatch, "max-batch", 0, "sequences per step (0: 32)")
	fs.IntVar(&f.tokenBudget, "token-budget", 0, "tokens per step: decodes plus prompt pieces (0: 512)")
	fs.IntVar(&f.prefillChunk, "prefill-chunk", 0, "most prompt tokens of one sequence per step (chunked prefill, interleaved with decodes; 0: the token budget)")
	fs.IntVar(&f.blockSize, "block-size", 0, fmt.Sprintf("positions per KV cache block of the workers (0: %d)", model.DefaultKVBlockSize))
	fs.StringVar(&f.logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	f.mem.addFlags(fs)
	if err := parseInterspersed(fs, args, &f.model); err != nil {
		return err
	}
	if f.host != "" || f.port != 0 {
		host, port, err := net.SplitHostPort(f.httpListen)
		if err != nil {
			return usagef("--http-listen %q: %v", f.httpListen, err)
		}
		if f.host != "" {
			host = f.host
		}
		if f.port != 0 {
			port = strconv.Itoa(f.port)
		}
		f.httpListen = net.JoinHostPort(host, port)
	}
	switch {
	case f.model == "":
		return usagef("--model is required")
	case f.tp < 1:
		return usagef("--tp %d must be >= 1", f.tp)
	case f.workers < 0:
		return usagef("--workers %d must be >= 0", f.workers)
	case f.threads < 0:
		return usagef("--threads %d must be >= 0", f.threads)
	}
	if err := checkDevice(f.device); err != nil {
		return err
	}
	if backend.HasDevices(f.device) {
		if err := serveGPUs(&f); err != nil {
			return err
		}
	}
	if f.workers == 0 {
		f.workers = f.tp
	}
	if f.workers < f.tp {
		return usagef("--workers %d is fewer than --tp %d: no group could form", f.workers, f.tp)
	}
	if f.threads == 0 {
		f.threads = max(1, runtime.NumCPU()/f.workers)
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr
	tl, stopTLS, err := f.tls.start(ctx, log)
	if err != nil {
		return err
	}
	defer stopTLS()
	if warn, err := security.CheckListen("--etcd-listen", f.etcdListen, tl != nil, f.tls.cfg.Insecure); err != nil {
		return usagef("%v", err)
	} else if warn {
		log.Warn(security.InsecureWarning, zap.String("etcd-listen", f.etcdListen))
	}

	dir := f.dataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "tpfleet-serve-etcd-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: dir, ClientAddr: f.etcdListen, PeerAddr: "127.0.0.1:0", Logger: log.Named("etcd"),
		TLS: f.tls.embedTLS(tl, defaultEtcdUsers)})
	if err != nil {
		return err
	}
	defer e.Close()
	etcd := cluster.Config{Endpoints: e.Endpoints()}

	c, err := coordinator.New(coordinator.Config{
		ListenAddr: f.listen, HTTPAddr: f.httpListen, Model: f.model, TP: f.tp, Plan: f.plan,
		APIKeys: f.apiKeys, AdminKeys: f.adminKeys, TLS: tl, Insecure: f.tls.cfg.Insecure,
		Gossip:             cluster.GossipConfig{KeyFile: f.tls.gossipKey},
		HTTPAllowedOrigins: splitList(f.origins), HTTPMedia: f.media, ServedModelName: f.servedName, MaxModelLen: f.maxModelLen,
		GenerationConfig: f.genConfig, LoadFormat: f.mem.loadFormat,
		Quantization: f.quant.name, QuantizationGroup: f.quant.group,
		MaxQueue: f.maxQueue, MaxBatch: f.maxBatch, TokenBudget: f.tokenBudget, PrefillChunk: f.prefillChunk,
		Etcd: etcd, Logger: log.Named("coordinator"),
	})
	if err != nil {
		return err
	}
	if err := c.Start(ctx); err != nil {
		return err
	}
	defer c.Close()

	var workers []*worker.Worker
	defer func() {
		for _, w := range workers {
			_ = w.Close()
		}
	}()
	werrs := make(chan error, f.workers)
	// With --device cuda: one worker process per GPU, stopped after the coordinator.
	procs := startServeProcs(f, e.Endpoints()[0], stderr, log)
	defer procs.stop()
	inProcess := f.workers // on the CPU
	if procs != nil {
		inProcess = 0
	}
	for i := range inProcess {
		wcfg := worker.DefaultConfig()
		wcfg.ID = fmt.Sprintf("serve-%d-w%03d", os.Getpid(), i)
		wcfg.Device = f.device
		wcfg.DeviceIndex = i
		wcfg.Threads = f.threads
		wcfg.Load = f.load
		wcfg.OffloadExperts = f.offload
		wcfg.BlockSize = f.blockSize
		wcfg.Etcd = etcd
		wcfg.TLS, wcfg.Insecure = tl, f.tls.cfg.Insecure
		wcfg.Gossip.KeyFile = f.tls.gossipKey
		wcfg.Logger = log.Named(fmt.Sprintf("worker%d", i))
		f.mem.apply(&wcfg, f.tokenBudget)
		w, err := worker.New(wcfg)
		if err != nil {
			return err
		}
		if err := w.Start(ctx); err != nil {
			_ = w.Close()
			return err
		}
		workers = append(workers, w)
		go func() {
			if err, ok := <-w.Err(); ok && err != nil {
				werrs <- fmt.Errorf("worker %d: %w", i, err)
			}
		}()
	}
	log.Info("serve started", zap.String("addr", c.Addr()), zap.String("http-addr", c.HTTPAddr()), zap.Strings("etcd-endpoints", e.Endpoints()),
		zap.String("device", f.device), zap.Int("workers", f.workers), zap.Int("tp", f.tp), zap.Int("replicas", f.workers/f.tp), zap.Int("threads", f.threads))
	if _, err := fmt.Fprintln(stdout, c.Addr()); err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		select {
		case err := <-c.Err():
			errc <- err
		case err := <-werrs:
			errc <- err
		case <-procs.exited():
			errc <- procs.err()
		case <-ctx.Done():
		}
	}()
	err = waitServing(ctx, log, c.Addr(), c.Ready(), errc)
	log.Info("shutting down")
	start := time.Now()
	cerr := c.Close()
	for _, w := range workers {
		cerr = errors.Join(cerr, w.Close())
	}
	workers = nil
	procs.stop()
	log.Info("stopped", zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return errors.Join(err, cerr)
}

// gpuCount is the number of devices of backend device that this process sees (a variable for tests).
var gpuCount = backend.DeviceCount

// serveGPUs checks serve's set-up on a backend with devices (a GPU): that its libraries (and for --tp >
// 1 the device communicator's, when its groups need one) load, and that there are devices for
// --workers; with --workers 0 it takes the visible devices, rounded down to a multiple of --tp.
func serveGPUs(f *serveFlags) error {
	n, err := gpuCount(f.device)
	if err != nil {
		return err
	}
	if d, _ := backend.Lookup(f.device); d.DeviceComm && f.tp > 1 {
		if err := tpgroup.CheckDeviceComm(); err != nil {
			return err
		}
	}
	switch {
	case f.workers == 0 && n < f.tp:
		return fmt.Errorf("--tp %d needs %d GPUs; %d visible", f.tp, f.tp, n)
	case f.workers == 0:
		f.workers = n - n%f.tp
	case f.workers > n:
		return fmt.Errorf("--workers %d: %d GPUs visible (one worker per GPU)", f.workers, n)
	}
	return nil
}

// serveProcs is serve's worker processes on GPUs; nil on the CPU, where the workers run in this
// process. Its methods accept a nil receiver.
type serveProcs struct {
	cancel context.CancelFunc
	done   chan struct{} // closed when the group has stopped
	runErr error         // the group's end, set before done closes
}

// startServeProcs starts serve's --workers worker processes on devices 0..workers-1 of a backend with
// devices, as tpfleet launch starts its children (torchrun's environment; their stdout and stderr go to
// stderr, lines prefixed [worker<i>]): `tpfleet worker --etcd ETCD --device DEVICE --gpu i --id
// serve-<pid>-w<i>`, member IDs that sort by device, so that TP rank r of the first group runs on device
// r. It returns nil on a backend without devices (the CPU), whose workers run in this process.
func startServeProcs(f serveFlags, etcd string, stderr io.Writer, log *zap.Logger) *serveProcs {
	if !backend.HasDevices(f.device) {
		return nil
	}
	host, port := "127.0.0.1", "2379"
	if u, err := url.Parse(etcd); err == nil {
		if h, p, err := net.SplitHostPort(u.Host); err == nil {
			host, port = h, p
		}
	}
	out := &syncWriter{w: stderr}
	pid := os.Getpid()
	args := append([]string{"--log-level", f.logLevel, "--block-size", strconv.Itoa(f.blockSize)}, f.mem.args(f.tokenBudget)...)
	if f.offload {
		args = append(args, "--offload-experts")
	}
	g := &localGroup{
		sub:      "worker",
		args:     append(args, loadArgs(f.load)...),
		device:   f.device,
		nproc:    f.workers,
		nnodes:   1,
		role:     "worker",
		master:   [2]string{host, port},
		etcd:     etcd,
		cluster:  cluster.DefaultCluster,
		runID:    "none",
		stdout:   out,
		stderr:   out,
		log:      log.Named("workers"),
		extraEnv: f.tls.env(),
		perChild: func(lr int) []string {
			return []string{"--gpu", strconv.Itoa(lr), "--id", fmt.Sprintf("serve-%d-w%03d", pid, lr)}
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &serveProcs{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.runErr = g.run(ctx, nil)
	}()
	return p
}

// exited is closed when the worker processes have stopped (nil for no processes: never).
func (p *serveProcs) exited() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.done
}

// err is why the worker processes stopped, once exited is closed.
func (p *serveProcs) err() error {
	if p.runErr != nil {
		return fmt.Errorf("worker processes: %w", p.runErr)
	}
	return errors.New("worker processes: every worker exited")
}

// stop stops the worker processes (SIGTERM, then SIGKILL after a grace period) and waits for them. It
// is idempotent.
func (p *serveProcs) stop() {
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
}

// parseInterspersed parses args with fs, taking one positional argument, wherever it comes (vllm serve
// MODEL --flags), into *pos; a second one, or one beside a set *pos, is a usage error.
func parseInterspersed(fs *flag.FlagSet, args []string, pos *string) error {
	for {
		if err := fs.Parse(args); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			return nil
		}
		if *pos != "" {
			return usagef("unexpected argument %q", fs.Arg(0))
		}
		*pos, args = fs.Arg(0), fs.Args()[1:]
	}
}

// loadArgs are the worker flags of a load pipeline configuration (run.LoadConfig.AddFlags).
func loadArgs(c modelrun.LoadConfig) []string {
	args := []string{"--load-workers", strconv.Itoa(c.Workers), "--load-chunk", strconv.FormatInt(c.Chunk, 10)}
	if c.Direct {
		args = append(args, "--load-direct")
	}
	return args
}
