package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
	"github.com/tpfleet/tpfleet/internal/security"
)

// Defaults of launch, as torchrun's.
const (
	defaultMasterAddr = "127.0.0.1"
	defaultMasterPort = 29500
	defaultEtcdPort   = 2379 // of an --rdzv-endpoint without a port
	// launchStopGrace is how long stopped children get to exit after SIGTERM before SIGKILL.
	launchStopGrace = 15 * time.Second
)

// launchFlags are torchrun's flags (pytorch torch/distributed/run.py) and, for --standalone, the
// coordinator's.
type launchFlags struct {
	nnodes          string
	nprocPerNode    string
	nodeRank        int
	masterAddr      string
	masterPort      int
	rdzvBackend     string
	rdzvEndpoint    string
	rdzvID          string
	maxRestarts     int
	standalone      bool
	monitorInterval time.Duration
	role            string
	logLevel        string
	device          string // the workers' --device; "" leaves it to them (cpu), or cuda with --nproc-per-node gpu

	// --standalone's coordinator.
	model       string
	tp          int
	plan        string
	quant       quantFlags
	listen      string
	httpListen  string // with --standalone: the HTTP gateway (empty: none)
	maxQueue    int
	maxBatch    int
	tokenBudget int
	apiKeys     []string
	adminKeys   []string

	// Every process's certificates: --standalone's etcd and coordinator, and the children's (as
	// TPFLEET_TLS_* variables, which a child's own flags override).
	tls tlsFlags
}

// torchrunFlag registers a flag under its name and its underscore form (torchrun accepts both), with
// its default taken from PET_<NAME> when that is set, as torchrun's argparse_util.env does.
type torchrunFlag struct {
	fs   *flag.FlagSet
	errs []error
}

func (t *torchrunFlag) env(name string) (string, bool) {
	return os.LookupEnv("PET_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_")))
}

func (t *torchrunFlag) names(name string) []string {
	if u := strings.ReplaceAll(name, "-", "_"); u != name {
		return []string{name, u}
	}
	return []string{name}
}

func (t *torchrunFlag) string(p *string, name, def, usage string) {
	if v, ok := t.env(name); ok {
		def = v
	}
	for i, n := range t.names(name) {
		if i > 0 {
			usage = "same as --" + name
		}
		t.fs.StringVar(p, n, def, usage)
	}
}

func (t *torchrunFlag) int(p *int, name string, def int, usage string) {
	if v, ok := t.env(name); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.errs = append(t.errs, usagef("PET_%s=%q is not an integer", strings.ToUpper(strings.ReplaceAll(name, "-", "_")), v))
		}
		def = n
	}
	for i, n := range t.names(name) {
		if i > 0 {
			usage = "same as --" + name
		}
		t.fs.IntVar(p, n, def, usage)
	}
}

func (t *torchrunFlag) bool(p *bool, name, usage string) {
	def := false
	if v, ok := t.env(name); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			t.errs = append(t.errs, usagef("PET_%s=%q is not a boolean", strings.ToUpper(strings.ReplaceAll(name, "-", "_")), v))
		}
		def = b
	}
	for i, n := range t.names(name) {
		if i > 0 {
			usage = "same as --" + name
		}
		t.fs.BoolVar(p, n, def, usage)
	}
}

// seconds is a duration flag that also takes torchrun's plain seconds ("0.1").
type seconds struct{ d *time.Duration }

func (s seconds) String() string {
	if s.d == nil {
		return ""
	}
	return s.d.String()
}

func (s seconds) Set(v string) error {
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		*s.d = time.Duration(f * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("want seconds (0.1) or a duration (100ms)")
	}
	*s.d = d
	return nil
}

func (t *torchrunFlag) seconds(p *time.Duration, name string, def time.Duration, usage string) {
	*p = def
	if v, ok := t.env(name); ok {
		if err := (seconds{p}).Set(v); err != nil {
			t.errs = append(t.errs, usagef("PET_%s=%q: %v", strings.ToUpper(strings.ReplaceAll(name, "-", "_")), v, err))
		}
	}
	for i, n := range t.names(name) {
		if i > 0 {
			usage = "same as --" + name
		}
		t.fs.Var(seconds{p}, n, usage)
	}
}

// runLaunch is torchrun for tpfleet: it starts --nproc-per-node processes of this binary running a
// subcommand (worker by default) with torchrun's environment, restarts the whole local group when one
// fails (up to --max-restarts), and forwards SIGINT and SIGTERM to them. With --standalone it also runs
// an etcd and a coordinator in this process, so that one command serves on one box:
//
//	tpfleet launch --standalone --nproc-per-node 2 --model DIR --tp 2
//	tpfleet launch --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint etcd-host:2379 -- worker --threads 4
func runLaunch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, sub, err := parseLaunch(args, stderr)
	if err != nil {
		return err
	}
	nnodes, nproc, err := f.sizes()
	if err != nil {
		return err
	}
	clusterName := f.rdzvID
	if clusterName == "" {
		clusterName = cluster.DefaultCluster
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr

	// Signals: forwarded to the children as they came; the context ends at the first.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	etcdAddr, err := f.etcdAddr()
	if err != nil {
		return err
	}
	tl, stopTLS, err := f.tls.start(ctx, log)
	if err != nil {
		return err
	}
	defer stopTLS()
	if f.standalone {
		stop, addr, err := startStandalone(ctx, f, nproc, clusterName, tl, log)
		if err != nil {
			return err
		}
		defer stop()
		etcdAddr = addr.etcd
		if _, err := fmt.Fprintln(stdout, addr.coordinator); err != nil {
			return err
		}
	}
	host, port, err := net.SplitHostPort(etcdAddr)
	if err != nil {
		return fmt.Errorf("etcd endpoint %q: %w", etcdAddr, err)
	}
	runID := f.rdzvID
	if runID == "" {
		runID = "none"
	}
	scheme := "http://"
	if tl != nil {
		scheme = "https://"
	}
	g := &localGroup{
		sub:      sub[0],
		args:     sub[1:],
		nproc:    nproc,
		nnodes:   nnodes,
		nodeRank: f.nodeRank,
		role:     f.role,
		master:   [2]string{host, port},
		etcd:     scheme + etcdAddr,
		cluster:  clusterName,
		runID:    runID,
		maxRest:  f.maxRestarts,
		stdout:   &syncWriter{w: stdout},
		stderr:   &syncWriter{w: stderr},
		log:      log,
		device:   f.device,
		extraEnv: f.tls.env(),
	}
	log.Info("launching",
		zap.String("subcommand", g.sub), zap.Strings("args", g.args), zap.Int("nproc-per-node", nproc),
		zap.Int("nnodes", nnodes), zap.Int("node-rank", f.nodeRank), zap.String("etcd", g.etcd),
		zap.String("cluster", clusterName), zap.String("rdzv-backend", f.rdzvBackend), zap.String("run-id", runID),
		zap.Int("max-restarts", f.maxRestarts), zap.Bool("standalone", f.standalone), zap.String("device", f.device))
	return g.run(ctx, sigs)
}

// parseLaunch parses and checks launch's flags; it returns them and the children's subcommand and
// arguments (default: worker).
func parseLaunch(args []string, stderr io.Writer) (launchFlags, []string, error) {
	var f launchFlags
	fs := flag.NewFlagSet("launch", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tpfleet launch [torchrun flags] [--standalone --model DIR [--tp N]] [--] [subcommand [args...]]\n\n"+
			"Starts --nproc-per-node processes of this binary running the subcommand (default: worker), each with\n"+
			"torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, ...) and --etcd/--cluster of the rendezvous.\n\nflags:")
		fs.PrintDefaults()
	}
	t := &torchrunFlag{fs: fs}
	t.string(&f.nnodes, "nnodes", "1", "number of nodes, or MIN:MAX with MIN == MAX (elastic ranges are not supported)")
	t.string(&f.nprocPerNode, "nproc-per-node", "1", `processes (workers) on this node: a number, "gpu" (the number of GPUs), "cpu" (of CPUs) or "auto" (GPUs with --device cuda, else CPUs)`)
	t.int(&f.nodeRank, "node-rank", 0, "rank of this node among --nnodes")
	t.string(&f.masterAddr, "master-addr", defaultMasterAddr, "host of the cluster's etcd when --rdzv-endpoint is not given")
	t.int(&f.masterPort, "master-port", defaultMasterPort, "port of the cluster's etcd when --rdzv-endpoint is not given")
	t.string(&f.rdzvBackend, "rdzv-backend", "static", "static, c10d, etcd or etcd-v2: all meet in the etcd at the endpoint")
	t.string(&f.rdzvEndpoint, "rdzv-endpoint", "", "host[:port] of the cluster's etcd (port default 2379; empty: --master-addr:--master-port)")
	t.string(&f.rdzvID, "rdzv-id", "", "job id shared by the nodes: the cluster name, keys under /tpfleet/<id>/ (empty: default)")
	t.int(&f.maxRestarts, "max-restarts", 0, "restarts of the local worker group before launch fails")
	t.bool(&f.standalone, "standalone", "one node: run an etcd (on a free port) and a coordinator in this process")
	t.seconds(&f.monitorInterval, "monitor-interval", 100*time.Millisecond, "accepted for torchrun compatibility: launch reacts to a child's exit at once")
	t.string(&f.role, "role", "default", "role name of the workers (ROLE_NAME)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	fs.StringVar(&f.device, "device", "", `the workers' device, passed to each as --device: cpu or cuda (one GPU per worker, --gpu = LOCAL_RANK) (empty: cuda with --nproc-per-node gpu, else the worker's default, cpu)`)
	fs.StringVar(&f.model, "model", "", "with --standalone: the checkpoint directory the coordinator serves")
	fs.IntVar(&f.tp, "tp", 0, "with --standalone: tensor-parallel size (0: --nproc-per-node)")
	fs.StringVar(&f.plan, "plan", coordinator.DefaultPlan, `with --standalone: tp_plan: "tp", "ep" or a plan file`)
	f.quant.addFlags(fs, "with --standalone: ")
	fs.StringVar(&f.listen, "listen", coordinator.DefaultListenAddr, "with --standalone: host:port of the coordinator's gRPC server (port 0: any)")
	fs.IntVar(&f.maxQueue, "max-queue", 0, "with --standalone: requests that may wait for a batch (0: 256)")
	fs.IntVar(&f.maxBatch, "max-batch", 0, "with --standalone: sequences per step (0: 32)")
	fs.IntVar(&f.tokenBudget, "token-budget", 0, "with --standalone: tokens per step (0: 512)")
	fs.StringVar(&f.httpListen, "http-listen", "", "with --standalone: host:port of the coordinator's OpenAI-compatible HTTP gateway, as serve's (port 0: any; empty: no gateway)")
	keysFlag(fs, &f.apiKeys, "api-key", "with --standalone: bearer token the coordinator's Generation API requires; repeat for several")
	keysFlag(fs, &f.adminKeys, "admin-key", "with --standalone: bearer token that opens the coordinator's Admin API; repeat for several")
	f.tls.add(fs)
	f.tls.addGossipKey(fs)
	if err := fs.Parse(args); err != nil {
		return f, nil, err
	}
	if err := errors.Join(t.errs...); err != nil {
		return f, nil, err
	}
	sub := fs.Args()
	if len(sub) == 0 || strings.HasPrefix(sub[0], "-") {
		sub = append([]string{"worker"}, sub...)
	}
	if sub[0] == "launch" {
		return f, nil, usagef("launch cannot launch itself")
	}
	if f.device != "" {
		if err := checkDevice(f.device); err != nil {
			return f, nil, err
		}
	}
	if f.device == "" && f.nprocPerNode == "gpu" {
		f.device = gpuBackend()
	}
	nnodes, _, err := f.sizes()
	if err != nil {
		return f, nil, err
	}
	switch {
	case f.nodeRank < 0 || f.nodeRank >= nnodes:
		return f, nil, usagef("--node-rank %d must be in [0, %d)", f.nodeRank, nnodes)
	case f.maxRestarts < 0:
		return f, nil, usagef("--max-restarts %d must be >= 0", f.maxRestarts)
	case f.standalone && nnodes != 1:
		return f, nil, usagef("--standalone is for one node; --nnodes is %d", nnodes)
	case f.standalone && f.model == "":
		return f, nil, usagef("--standalone needs --model, the checkpoint its coordinator serves")
	case !f.standalone && f.model != "":
		return f, nil, usagef("--model is for --standalone's coordinator; pass a worker's --model after --")
	}
	switch f.rdzvBackend {
	case "static", "c10d", "etcd", "etcd-v2":
	default:
		return f, nil, usagef("--rdzv-backend %q: want static, c10d, etcd or etcd-v2", f.rdzvBackend)
	}
	if f.rdzvID != "" {
		if err := (cluster.Config{Endpoints: []string{"x"}, Cluster: f.rdzvID}).Validate(); err != nil {
			return f, nil, usagef("--rdzv-id %q is not a cluster name: letters, digits and . _ : @ -", f.rdzvID)
		}
	}
	if _, err := f.etcdAddr(); err != nil {
		return f, nil, err
	}
	return f, sub, nil
}

// gpuBackend is the backend that --nproc-per-node gpu means: the first registered (by name) that has
// devices of its own ("cuda" in this binary), or "" when none is.
func gpuBackend() string {
	for _, n := range backend.Names() {
		if backend.HasDevices(n) {
			return n
		}
	}
	return ""
}

// sizes parses --nnodes and --nproc-per-node.
func (f launchFlags) sizes() (nnodes, nproc int, err error) {
	lo, hi, ranged := strings.Cut(f.nnodes, ":")
	nnodes, err = strconv.Atoi(lo)
	if err == nil && ranged {
		var n int
		if n, err = strconv.Atoi(hi); err == nil && n != nnodes {
			return 0, 0, usagef("--nnodes %s: elastic ranges are not supported; give one count", f.nnodes)
		}
	}
	if err != nil || nnodes < 1 {
		return 0, 0, usagef("--nnodes %q: want a positive count", f.nnodes)
	}
	switch {
	case f.nprocPerNode == "cpu", f.nprocPerNode == "auto" && !backend.HasDevices(f.device):
		nproc = runtime.NumCPU()
	case f.nprocPerNode == "gpu", f.nprocPerNode == "auto":
		device := f.device
		if device == "" {
			device = gpuBackend()
		}
		if nproc, err = gpuCount(device); err != nil {
			return 0, 0, fmt.Errorf("--nproc-per-node %s: %w", f.nprocPerNode, err)
		}
		if nproc < 1 {
			return 0, 0, fmt.Errorf("--nproc-per-node %s: no GPU visible", f.nprocPerNode)
		}
	case f.nprocPerNode == "xpu":
		return 0, 0, usagef("--nproc-per-node xpu: this build has no XPU support; give a number")
	default:
		nproc, err = strconv.Atoi(f.nprocPerNode)
		if err != nil || nproc < 1 {
			return 0, 0, usagef("--nproc-per-node %q: want a positive count, gpu, cpu or auto", f.nprocPerNode)
		}
	}
	return nnodes, nproc, nil
}

// etcdAddr is the host:port of the cluster's etcd: --rdzv-endpoint, else --master-addr:--master-port.
func (f launchFlags) etcdAddr() (string, error) {
	if f.rdzvEndpoint == "" {
		return net.JoinHostPort(f.masterAddr, strconv.Itoa(f.masterPort)), nil
	}
	ep := f.rdzvEndpoint
	if u, err := url.Parse(ep); err == nil && u.Host != "" {
		ep = u.Host
	}
	if _, _, err := net.SplitHostPort(ep); err != nil {
		ep = net.JoinHostPort(ep, strconv.Itoa(defaultEtcdPort))
	}
	if _, _, err := net.SplitHostPort(ep); err != nil {
		return "", usagef("--rdzv-endpoint %q: want host[:port]", f.rdzvEndpoint)
	}
	return ep, nil
}

type standaloneAddrs struct{ etcd, coordinator string }

// startStandalone starts an etcd on a free loopback port and a coordinator of it, as torchrun's
// --standalone starts a c10d store on localhost:0. stop closes both.
func startStandalone(ctx context.Context, f launchFlags, nproc int, clusterName string, tl *security.TLS, log *zap.Logger) (stop func(), _ standaloneAddrs, err error) {
	dir, err := os.MkdirTemp("", "tpfleet-launch-etcd-")
	if err != nil {
		return nil, standaloneAddrs{}, err
	}
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: dir, ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0", Logger: log,
		TLS: f.tls.embedTLS(tl, defaultEtcdUsers)})
	if err != nil {
		os.RemoveAll(dir)
		return nil, standaloneAddrs{}, err
	}
	tp := f.tp
	if tp == 0 {
		tp = nproc
	}
	c, err := coordinator.New(coordinator.Config{
		ListenAddr: f.listen, HTTPAddr: f.httpListen, Model: f.model, TP: tp, Plan: f.plan,
		Quantization: f.quant.name, QuantizationGroup: f.quant.group,
		MaxQueue: f.maxQueue, MaxBatch: f.maxBatch, TokenBudget: f.tokenBudget,
		APIKeys: f.apiKeys, AdminKeys: f.adminKeys, TLS: tl, Insecure: f.tls.cfg.Insecure,
		Gossip: cluster.GossipConfig{KeyFile: f.tls.gossipKey},
		Etcd:   cluster.Config{Endpoints: e.Endpoints(), Cluster: clusterName},
		Logger: log,
	})
	if err == nil {
		err = c.Start(ctx)
	}
	if err != nil {
		e.Close()
		os.RemoveAll(dir)
		return nil, standaloneAddrs{}, err
	}
	u, err := url.Parse(e.Endpoints()[0])
	if err != nil {
		c.Close()
		e.Close()
		os.RemoveAll(dir)
		return nil, standaloneAddrs{}, err
	}
	return func() {
		c.Close()
		e.Close()
		os.RemoveAll(dir)
	}, standaloneAddrs{etcd: u.Host, coordinator: c.Addr()}, nil
}

// localGroup is the worker group of this node: nproc children of this binary.
type localGroup struct {
	sub      string
	args     []string
	nproc    int
	nnodes   int
	nodeRank int
	role     string
	master   [2]string // MASTER_ADDR, MASTER_PORT
	etcd     string
	cluster  string
	runID    string
	maxRest  int
	stdout   io.Writer
	stderr   io.Writer
	log      *zap.Logger
	// device is the workers' --device ("" leaves it out).
	device string
	// perChild, when set, gives local rank lr's own arguments, after the common ones.
	perChild func(lr int) []string
	// extraEnv is added to every child's environment (the TLS flags' TPFLEET_TLS_* variables).
	extraEnv []string
}

// exit is a child's end.
type exit struct {
	localRank int
	err       error
}

// attempt is one start of the group: its children and what is known of their exits.
type attempt struct {
	procs []*exec.Cmd
	exits chan exit // buffered to the children, one send each
	alive []bool
	left  int
}

// run starts the group, restarts it after a failure up to maxRest times, and stops it on a signal.
func (g *localGroup) run(ctx context.Context, sigs <-chan os.Signal) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("launch: find this binary: %w", err)
	}
	for restart := 0; ; restart++ {
		a, err := g.start(exe, restart)
		if err != nil {
			return err
		}
		failed, sig := g.monitor(ctx, sigs, a)
		if sig != nil || ctx.Err() != nil {
			if sig == nil {
				sig = syscall.SIGTERM
			}
			g.log.Info("stopping the worker group", zap.Stringer("signal", sig))
			g.stop(a, sig)
			return nil
		}
		if failed == nil {
			g.log.Info("every worker exited successfully")
			return nil
		}
		g.stop(a, syscall.SIGTERM)
		if restart >= g.maxRest {
			return fmt.Errorf("launch: local rank %d failed: %w (after %d restart(s), --max-restarts %d)", failed.localRank, failed.err, restart, g.maxRest)
		}
		g.log.Warn("a worker failed; restarting the worker group", zap.Int("local-rank", failed.localRank), zap.Error(failed.err),
			zap.Int("restart", restart+1), zap.Int("max-restarts", g.maxRest))
	}
}

// start starts the nproc children of one attempt.
func (g *localGroup) start(exe string, restart int) (*attempt, error) {
	a := &attempt{exits: make(chan exit, g.nproc)}
	for lr := range g.nproc {
		args := g.childArgs()
		if g.perChild != nil {
			args = append(args, g.perChild(lr)...)
		}
		cmd := exec.Command(exe, args...)
		cmd.Env = g.env(lr, restart)
		cmd.Stdout = g.stdout
		cmd.Stderr = &prefixWriter{w: g.stderr, prefix: fmt.Sprintf("[%s%d] ", g.role, lr)}
		if err := cmd.Start(); err != nil {
			g.stop(a, syscall.SIGTERM)
			return nil, fmt.Errorf("launch: start local rank %d: %w", lr, err)
		}
		a.procs, a.alive = append(a.procs, cmd), append(a.alive, true)
		a.left++
		g.log.Info("started", zap.Int("local-rank", lr), zap.Int("rank", g.nodeRank*g.nproc+lr), zap.Int("pid", cmd.Process.Pid), zap.Int("restart", restart))
		go func() { a.exits <- exit{lr, cmd.Wait()} }()
	}
	return a, nil
}

// childArgs is the child's command line: the subcommand, the rendezvous's etcd and cluster for the
// commands that join the cluster (and a worker's --device, or its --threads on the CPU) before the
// user's arguments, which win, and the user's arguments.
func (g *localGroup) childArgs() []string {
	args := []string{g.sub}
	switch g.sub {
	case "worker":
		args = append(args, "--etcd", g.etcd, "--cluster", g.cluster)
		if g.device != "" {
			args = append(args, "--device", g.device) // a GPU each: LOCAL_RANK is the worker's --gpu
		}
		if !backend.HasDevices(g.device) { // the workers share the host's cores
			args = append(args, "--threads", strconv.Itoa(max(1, runtime.NumCPU()/g.nproc)))
		}
	case "coordinator":
		args = append(args, "--etcd", g.etcd, "--cluster", g.cluster)
	}
	return append(args, g.args...)
}

// env is torchrun's environment of local rank lr (local_elastic_agent.py _start_workers).
func (g *localGroup) env(lr, restart int) []string {
	rank, world := g.nodeRank*g.nproc+lr, g.nnodes*g.nproc
	vars := map[string]string{
		"RANK":                       strconv.Itoa(rank),
		"LOCAL_RANK":                 strconv.Itoa(lr),
		"WORLD_SIZE":                 strconv.Itoa(world),
		"LOCAL_WORLD_SIZE":           strconv.Itoa(g.nproc),
		"GROUP_RANK":                 strconv.Itoa(g.nodeRank),
		"GROUP_WORLD_SIZE":           strconv.Itoa(g.nnodes),
		"ROLE_RANK":                  strconv.Itoa(rank),
		"ROLE_NAME":                  g.role,
		"ROLE_WORLD_SIZE":            strconv.Itoa(world),
		"MASTER_ADDR":                g.master[0],
		"MASTER_PORT":                g.master[1],
		"TORCHELASTIC_RESTART_COUNT": strconv.Itoa(restart),
		"TORCHELASTIC_MAX_RESTARTS":  strconv.Itoa(g.maxRest),
		"TORCHELASTIC_RUN_ID":        g.runID,
	}
	if _, ok := os.LookupEnv("OMP_NUM_THREADS"); !ok && g.nproc > 1 {
		vars["OMP_NUM_THREADS"] = "1"
	}
	env := append(os.Environ(), g.extraEnv...)
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	return env
}

// monitor waits until every child exited successfully (nil, nil), one failed (its exit), or a signal
// came or ctx ended (the signal, or nil with ctx ended).
func (g *localGroup) monitor(ctx context.Context, sigs <-chan os.Signal, a *attempt) (*exit, os.Signal) {
	for a.left > 0 {
		select {
		case e := <-a.exits:
			a.alive[e.localRank] = false
			a.left--
			if e.err != nil {
				return &e, nil
			}
			g.log.Info("worker exited", zap.Int("local-rank", e.localRank))
		case s := <-sigs:
			return nil, s
		case <-ctx.Done():
			return nil, nil
		}
	}
	return nil, nil
}

// stop sends sig to the children still running and waits for them, killing those still there after
// launchStopGrace.
func (g *localGroup) stop(a *attempt, sig os.Signal) {
	for lr, p := range a.procs {
		if a.alive[lr] {
			_ = p.Process.Signal(sig)
		}
	}
	timer := time.NewTimer(launchStopGrace)
	defer timer.Stop()
	for a.left > 0 {
		select {
		case e := <-a.exits:
			a.alive[e.localRank] = false
			a.left--
		case <-timer.C:
			g.log.Warn("workers still running after the grace period; killing them", zap.Duration("grace", launchStopGrace))
			for lr, p := range a.procs {
				if a.alive[lr] {
					_ = p.Process.Kill()
				}
			}
			timer.Reset(time.Hour)
		}
	}
}

// syncWriter serialises writes of several children to one writer.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// prefixWriter writes whole lines to w, each with a prefix; a partial line waits for its end.
type prefixWriter struct {
	w      io.Writer
	prefix string
	buf    []byte
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			break
		}
		line := append([]byte(p.prefix), p.buf[:i+1]...)
		if _, err := p.w.Write(line); err != nil {
			return 0, err
		}
		p.buf = p.buf[i+1:]
	}
	return len(b), nil
}
