package worker

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/memplan"
	"github.com/tpfleet/tpfleet/model/run"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/tpgroup"
)

// State is what a worker is doing in its current plan epoch.
type State string

// The states of a worker. Health (grpc.health.v1) follows them: the whole server ("") is SERVING while
// idle or serving and NOT_SERVING while loading or failed; the service "tpfleet.v1.Worker" is SERVING only
// while serving, i.e. while Step can run. Both are NOT_SERVING once Close has begun.
const (
	// StateIdle: no plan yet, or this member has no assignment in the plan's epoch. The worker holds no
	// weights and answers steps with ErrNotServing.
	StateIdle State = "idle"
	// StateLoading: the worker moves to a new epoch: it loads (or reuses) its weights and then builds
	// the TP group's communicator, or, when unassigned, frees its weights.
	StateLoading State = "loading"
	// StateServing: weights and communicator are ready; Step runs.
	StateServing State = "serving"
	// StateFailed: loading, the communicator or a step failed in this epoch. Weights that loaded are
	// kept, to be reused by the next epoch, which the coordinator is expected to write.
	StateFailed State = "failed"
)

// Status is a snapshot of a worker.
type Status struct {
	MemberID string
	// Addr is the gRPC address registered in etcd.
	Addr  string
	State State
	// Epoch is the plan epoch the worker is on (0: none seen yet).
	Epoch int64
	// Group and Rank are the worker's place in the epoch, -1 when unassigned; TP is the group's size, 0
	// when unassigned.
	Group, Rank, TP int
	// Model is the checkpoint directory of the loaded weights, empty when none are loaded.
	Model string
	// WeightBytes is the size of the loaded weights as read from the checkpoint.
	WeightBytes int64
	// Sequences is the number of sequences (KV caches) held.
	Sequences int
	// Device is where the model runs, e.g. "cpu".
	Device string
	// StepStreams is the number of Step streams open (one per coordinator driving the worker).
	StepStreams int
	// Loads counts the times weights were read from the checkpoint; epochs that reuse the loaded weights
	// do not count.
	Loads int
	// ReadBytes is the tensor bytes read since Start (from the checkpoint or a peer); a tensor kept across
	// a plan change is not read again. KeptTensors and KeptBytes are what the last load took over from
	// the weights held before it.
	ReadBytes   int64
	KeptTensors int
	KeptBytes   int64
	// StreamedBytes is the part of ReadBytes received from a peer (the worker's model directory held no
	// checkpoint).
	StreamedBytes int64
	// ExpertLoad is, per decoder layer, the tokens routed to each expert (in the checkpoint's numbering)
	// since the served weights were loaded (nil for a dense layer); nil when the model or backend does not
	// count them. SlotLoad is the same per slot of the group's expert tensors (the plan's expert order,
	// replicas included; slots rank by rank): it says how a replicated expert's tokens split and what
	// each rank computed.
	ExpertLoad, SlotLoad [][]int64
	// Memory is the served weights' memory plan, nil without one; KVBlocksReserved what the sequences
	// held reserve of it.
	Memory           *memplan.Plan
	KVBlocksReserved int
	// Err is why the worker failed, in StateFailed.
	Err error
	// Phases are the start-up phases, in order of their start (the last load's, the last communicator's).
	Phases []phase.Phase
	// ProcessStart is when the process started: the origin of the phases' starts.
	ProcessStart time.Time
}

// gossipLeaveTimeout bounds the wait for the gossip node's leave message to reach a peer at Close.
const gossipLeaveTimeout = time.Second

// phases of applying a plan epoch.
const (
	phaseWeights = iota // loading (or reusing) weights
	phaseComm           // building the communicator
)

// applyJob is the plan epoch being applied. Its fields are guarded by Worker.mu.
type applyJob struct {
	key      weightsKey
	assigned bool
	phase    int
	cancel   context.CancelFunc
}

// Worker is one worker process's device: it registers in etcd, follows the plan, loads its slices and
// serves the Worker gRPC service. Make one with New, then Start it; Close stops it. Its methods are
// safe for concurrent use.
type Worker struct {
	cfg           Config
	lg            *zap.Logger
	ops           backend.Ops // Config.Device's backend, opened by Start
	progressEvery time.Duration
	// phases times the start-up: the process, the device, each load, the communicator, the first step.
	phases *phase.Recorder
	// stepped and decoded are set after the first step and the first decode-only step.
	stepped, decoded atomic.Bool

	// ctx is the lifetime of steps: Close cancels it once the graceful stop is over (or forced). bgCtx
	// is the lifetime of the background work (plan watch, loading, rendezvous, registration): Close
	// cancels it first.
	ctx      context.Context
	cancel   context.CancelFunc
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bg       sync.WaitGroup // plan watch, plan apply, registration keeper
	serveWG  sync.WaitGroup // the gRPC server's Serve
	streams  sync.WaitGroup // Step streams' receive goroutines
	closing  chan struct{}  // closed when Close begins
	ready    chan struct{}
	errc     chan error // buffered to its one sender, the gRPC server's Serve
	wake     chan struct{}

	closeOnce sync.Once
	closeErr  error

	addr      string
	startedAt time.Time // registered as the member's start time; set by Start
	srv       *grpc.Server
	health    *health.Server
	cli       *cluster.Client

	// metrics are served on metricsLis by metricsSrv when Config.MetricsAddr is set (metrics.go).
	metrics    *metrics
	metricsLis net.Listener
	metricsSrv *http.Server

	// runMu is held while a step runs and while the weights or the sequences change.
	runMu     sync.Mutex
	wts       *weights
	mem       *memory      // wts's memory plan; nil: none
	staged    *weights     // loaded by Prepare for a plan about to be written; nil: none
	seedState              // the checkpoint served to peers (remote.go)
	streamed  atomic.Int64 // tensor bytes received from peers, for the loads that completed
	prepareMu sync.Mutex   // serialises Prepare
	seqs      map[uint64]*sequence
	streamIDs atomic.Uint64 // numbers the Step streams from 1 (see sequence.stream)
	openSteps atomic.Int32  // Step streams open now
	leaderRev atomic.Int64  // the highest StepRequest.leader_rev seen; written under runMu

	mu         sync.Mutex
	started    bool
	closed     bool
	reg        *cluster.Registration
	gossip     *cluster.Gossip // nil with Config.NoGossip, or before Start
	gossipAddr string          // the gossip node's address, registered as Member.Gossip
	state      State
	epoch      int64
	group      int
	rank       int
	tp         int
	comm       comm.Comm // the epoch's communicator, while serving
	failure    error
	weightDir  string
	weightSize int64
	nseqs      int
	nreserved  int     // KV blocks the sequences reserve (reservedLocked), as of the last step
	memPlan    *memory // the served weights' memory plan, for Status; nil: none
	loads      int
	// readBytes counts the tensor bytes read since Start; keptTensors and keptBytes are what the last load
	// took over from the weights held before it.
	readBytes   int64
	keptTensors int
	keptBytes   int64
	expertLoad  run.ExpertLoader // the served model's expert counts; nil: none
	latest      cluster.Plan     // the newest plan seen
	applying    *applyJob
	readyEpoch  int64         // Ready closes once the worker settles on this epoch (or a later one)
	changed     chan struct{} // closed and replaced whenever state, epoch or latest change
}

// New checks cfg and returns a Worker that has not started: it opens nothing until Start.
func New(cfg Config) (*Worker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	bgCtx, bgCancel := context.WithCancel(ctx)
	w := &Worker{
		cfg:           cfg,
		lg:            cfg.Logger.With(zap.String("member-id", cfg.ID)),
		progressEvery: 2 * time.Second,
		phases:        phase.NewRecorder(phase.ProcessStart()),
		ctx:           ctx,
		cancel:        cancel,
		bgCtx:         bgCtx,
		bgCancel:      bgCancel,
		closing:       make(chan struct{}),
		ready:         make(chan struct{}),
		errc:          make(chan error, 1),
		wake:          make(chan struct{}, 1),
		seqs:          make(map[uint64]*sequence),
		state:         StateIdle,
		group:         -1,
		rank:          -1,
		changed:       make(chan struct{}),
	}
	w.metrics = newMetrics(w.Status)
	return w, nil
}

// openDevice opens the backend registered as Config.Device on device Config.DeviceIndex (backend.Open).
// It fails with an error wrapping ErrDeviceUnavailable and the backend's error, which names the missing
// library or device (and wraps backend.ErrUnavailable when the backend cannot run on this host).
func (w *Worker) openDevice(ctx context.Context) error {
	start := time.Now()
	b, err := backend.Open(ctx, w.cfg.Device, backend.Options{Device: w.cfg.DeviceIndex, Threads: w.cfg.Threads})
	if err != nil {
		return fmt.Errorf("%w: %s:%d: %w", ErrDeviceUnavailable, w.cfg.Device, w.cfg.DeviceIndex, err)
	}
	w.ops = b
	if sr, ok := b.(backend.StartupReporter); ok {
		w.phases.AddAll(sr.StartupPhases())
	} else {
		w.phases.Since("device", start, b.Name())
	}
	if d, ok := b.(backend.Describer); ok {
		desc := d.Describe()
		w.lg.Info("device opened", zap.String("device", b.Name()), zap.String("name", desc.Name),
			zap.Int64("memory", desc.TotalMemory), zap.Any("details", desc.Details))
	}
	if _, ok := b.(backend.DeviceContext); ok {
		if path, version, err := tpgroup.DeviceCommLibrary(); err != nil {
			// TP 1 needs no NCCL; a larger group's epochs fail with this error.
			w.lg.Warn("NCCL unavailable: TP groups of more than one device will fail", zap.Error(err))
		} else {
			w.lg.Info("NCCL loaded", zap.String("path", path), zap.Int("version", version))
		}
	}
	return nil
}

// deviceDesc describes the worker's device for its member record and logs: its kind is Config.Device;
// name and memory come from the backend's Describer and MemoryReporter, else from the host.
func (w *Worker) deviceDesc() cluster.Device {
	d := cluster.Device{Kind: w.cfg.Device, Index: w.cfg.DeviceIndex}
	if m, ok := w.ops.(backend.MemoryReporter); ok {
		var err error
		if d.MemoryFree, d.MemoryTotal, err = m.DeviceMemory(); err != nil {
			d.MemoryFree, d.MemoryTotal = 0, 0
		}
	} else {
		d.MemoryTotal, d.MemoryFree = memInfo()
	}
	if desc, ok := w.ops.(backend.Describer); ok {
		dd := desc.Describe()
		d.Name = dd.Name
		if d.MemoryTotal == 0 {
			d.MemoryTotal = dd.TotalMemory
		}
	} else {
		d.Name = fmt.Sprintf("%s (%d threads)", w.cfg.Device, w.threads())
	}
	return d
}

// threads is the backend's host thread count (backend.Threader), 0 for a backend without.
func (w *Worker) threads() int {
	if t, ok := w.ops.(backend.Threader); ok {
		return t.Threads()
	}
	return 0
}

// authorizer is who may call the worker's gRPC services: health and reflection anyone; Step, LoadPlan
// and Prepare a coordinator of the cluster, Status also an admin; CheckpointInfo and ReadTensor another
// worker of the cluster (with TLS; without, anyone).
func (w *Worker) authorizer() *grpcauth.Authorizer {
	coord := []security.Role{security.RoleCoordinator}
	return &grpcauth.Authorizer{TLS: w.cfg.TLS, Rules: []grpcauth.Rule{
		{Prefix: "/grpc.health.v1.Health/", Open: true},
		{Prefix: "/grpc.reflection.", Open: true},
		{Prefix: tpfleetv1.Worker_Status_FullMethodName, Roles: []security.Role{security.RoleCoordinator, security.RoleAdmin}},
		{Prefix: tpfleetv1.Worker_Step_FullMethodName, Roles: coord},
		{Prefix: tpfleetv1.Worker_LoadPlan_FullMethodName, Roles: coord},
		{Prefix: tpfleetv1.Worker_Prepare_FullMethodName, Roles: coord},
		// A worker without the checkpoint's files reads its slices from a peer (see dialCheckpoint).
		{Prefix: tpfleetv1.Worker_CheckpointInfo_FullMethodName, Roles: []security.Role{security.RoleWorker}},
		{Prefix: tpfleetv1.Worker_ReadTensor_FullMethodName, Roles: []security.Role{security.RoleWorker}},
	}}
}

// Start opens the gRPC listener and serves on it, connects to etcd, registers the member under a lease
// and starts following the plan. It returns once the listener is open and the member registered;
// loading happens in the background (see Ready). ctx bounds the start only. On failure Start undoes
// what it did; the Worker must then only be closed.
func (w *Worker) Start(ctx context.Context) (err error) {
	w.mu.Lock()
	switch {
	case w.closed:
		w.mu.Unlock()
		return ErrClosed
	case w.started:
		w.mu.Unlock()
		return errors.New("worker: already started")
	}
	w.started = true
	w.mu.Unlock()
	defer func() {
		if err != nil {
			_ = w.Close()
		}
	}()

	if w.cfg.TLS != nil {
		name := cmp.Or(w.cfg.Etcd.Cluster, cluster.DefaultCluster)
		if id := w.cfg.TLS.Identity(); !id.Has(security.RoleWorker) || id.Cluster != name {
			return fmt.Errorf("%w: the certificate %q has roles %v of cluster %q; a worker of cluster %q needs the worker role of its cluster",
				ErrInvalidConfig, id.Name, id.Roles, id.Cluster, name)
		}
	}
	if err := w.openDevice(ctx); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", w.cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("worker: listen %s: %w", w.cfg.ListenAddr, err)
	}
	serving := false
	defer func() {
		if !serving {
			_ = lis.Close()
		}
	}()
	w.addr = cluster.Advertised(w.cfg.AdvertiseAddr, lis.Addr())
	w.startedAt = time.Now().UTC()
	w.srv = grpc.NewServer(append(w.authorizer().ServerOptions(),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			// MaxConnectionIdle, MaxConnectionAge and MaxConnectionAgeGrace stay unset (infinite): a
			// Step stream lives as long as its coordinator.
			Time:    w.cfg.KeepAliveTime,
			Timeout: w.cfg.KeepAliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             w.cfg.KeepAliveMinTime,
			PermitWithoutStream: true, // a coordinator keeps its connections alive between streams
		}),
		grpc.MaxRecvMsgSize(w.cfg.MaxRecvMsgSize),
		grpc.WaitForHandlers(true), // Stop returns only once every handler has: Close then owns them all
	)...)
	w.health = health.NewServer()
	tpfleetv1.RegisterWorkerServer(w.srv, &service{w: w})
	healthpb.RegisterHealthServer(w.srv, w.health)
	reflection.Register(w.srv)
	w.mu.Lock()
	w.publishHealthLocked()
	w.mu.Unlock()
	w.lg.Info("starting worker",
		zap.String("listen", lis.Addr().String()), zap.String("advertise", w.addr),
		zap.String("model", w.cfg.Model), zap.String("device", w.cfg.Device), zap.Int("device-index", w.cfg.DeviceIndex),
		zap.String("backend", w.deviceDesc().Name), zap.Int("threads", w.threads()), zap.String("ring-host", w.cfg.RingHost),
		zap.Strings("etcd-endpoints", w.cfg.Etcd.Endpoints), zap.String("cluster", w.cfg.Etcd.Cluster),
		zap.Duration("lease-ttl", w.cfg.LeaseTTL), zap.Duration("op-timeout", w.cfg.OpTimeout),
		zap.Duration("rendezvous-timeout", w.cfg.RendezvousTimeout),
		zap.Duration("graceful-stop-timeout", w.cfg.GracefulStopTimeout),
		zap.Duration("keepalive-time", w.cfg.KeepAliveTime), zap.Duration("keepalive-timeout", w.cfg.KeepAliveTimeout),
		zap.Duration("keepalive-min-time", w.cfg.KeepAliveMinTime), zap.Int("max-recv-msg-size", w.cfg.MaxRecvMsgSize),
		zap.Bool("no-gossip", w.cfg.NoGossip), zap.Any("labels", w.cfg.Labels),
		zap.Bool("tls", w.cfg.TLS != nil), zap.Bool("gossip-encrypted", w.cfg.Gossip.KeyFile != ""))
	if open, _ := w.cfg.insecureListeners(); len(open) > 0 {
		w.lg.Warn(security.InsecureWarning, zap.Strings("addrs", open))
	}

	if err := w.startMetrics(); err != nil {
		return err
	}
	if !w.cfg.NoGossip {
		if err := w.startGossip(ctx); err != nil {
			return err
		}
	}

	ecfg := w.cfg.Etcd
	if ecfg.Logger == nil {
		ecfg.Logger = w.cfg.Logger
	}
	cli, err := cluster.New(ctx, ecfg)
	if err != nil {
		return err
	}
	w.cli = cli
	reg, err := w.register(ctx)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.reg = reg
	w.mu.Unlock()
	// Serve once the handlers have what they use; connections that come earlier wait in the backlog.
	serving = true
	w.serveWG.Go(func() {
		if err := w.srv.Serve(lis); err != nil {
			w.errc <- fmt.Errorf("worker: serve %s: %w", w.addr, err)
		}
	})

	p, ok, err := cli.Plan(ctx)
	if err != nil {
		return err
	}
	w.mu.Lock()
	if ok {
		w.readyEpoch = p.Epoch
	}
	w.mu.Unlock()
	if ok {
		w.offer(p)
	} else {
		w.markReady()
	}
	w.bg.Go(w.watchPlans)
	w.bg.Go(w.applyLoop)
	w.bg.Go(w.keepRegistered)
	return nil
}

// startGossip starts the worker's gossip node, alone: the coordinator joins it through the address
// registered with the member.
func (w *Worker) startGossip(ctx context.Context) error {
	gcfg := w.cfg.Gossip
	gcfg.Name = w.cfg.ID
	gcfg.Meta = cluster.Member{Started: w.startedAt}.GossipMeta()
	if gcfg.Logger == nil {
		gcfg.Logger = w.lg.Named("gossip")
	}
	g, err := cluster.StartGossip(ctx, gcfg)
	if err != nil {
		return fmt.Errorf("worker: %w (--no-gossip runs without gossip)", err)
	}
	w.mu.Lock()
	w.gossip, w.gossipAddr = g, g.Addr()
	w.mu.Unlock()
	return nil
}

// Ready returns a channel that is closed once the worker has settled on the plan it found in etcd at
// Start (serving its assignment, or idle when it has none or there is no plan). It stays open while
// that load fails; a later epoch that settles closes it.
func (w *Worker) Ready() <-chan struct{} { return w.ready }

// Err returns a channel that receives an error that stops the worker from serving (the gRPC server
// failed) and is closed by Close. A failed load or step is not reported here: the worker goes to
// StateFailed and waits for the next plan epoch.
func (w *Worker) Err() <-chan error { return w.errc }

// Addr returns the gRPC address registered in etcd (valid after Start).
func (w *Worker) Addr() string { return w.addr }

// ID returns the member ID.
func (w *Worker) ID() string { return w.cfg.ID }

// Status returns a snapshot of the worker.
func (w *Worker) Status() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	var plan *memplan.Plan
	if w.memPlan != nil {
		p := w.memPlan.plan
		plan = &p
	}
	return Status{
		Memory:           plan,
		MemberID:         w.cfg.ID,
		Addr:             w.addr,
		State:            w.state,
		Epoch:            w.epoch,
		Group:            w.group,
		Rank:             w.rank,
		TP:               w.tp,
		Model:            w.weightDir,
		WeightBytes:      w.weightSize,
		Sequences:        w.nseqs,
		Device:           w.cfg.Device,
		StepStreams:      int(w.openSteps.Load()),
		Loads:            w.loads,
		ReadBytes:        w.readBytes,
		KeptTensors:      w.keptTensors,
		KeptBytes:        w.keptBytes,
		StreamedBytes:    w.streamed.Load(),
		ExpertLoad:       w.expertLoadLocked(run.ExpertLoader.ExpertLoad),
		SlotLoad:         w.expertLoadLocked(run.ExpertLoader.SlotLoad),
		Err:              w.failure,
		KVBlocksReserved: w.nreserved,
		Phases:           w.phases.Phases(),
		ProcessStart:     w.phases.Start(),
	}
}

// expertLoadLocked returns the served model's expert load, by of, nil when it has none. w.mu is held.
func (w *Worker) expertLoadLocked(of func(run.ExpertLoader) [][]int64) [][]int64 {
	if w.expertLoad == nil {
		return nil
	}
	return of(w.expertLoad)
}

// Close stops the worker, gracefully first: health turns NOT_SERVING, loading and rendezvous stop, the
// gossip node leaves (the coordinator hears of it at once) and the member is deregistered (its key
// leaves etcd at once), Step streams end with UNAVAILABLE after their in-flight step and the gRPC
// server stops gracefully; after Config.GracefulStopTimeout it cancels the steps, closes the
// communicator and stops the server forcibly. Then it frees the model and closes
// the etcd client and Err. It is idempotent and returns the errors of deregistering and of closing
// the etcd client. Call it after Start has returned, or instead of Start.
func (w *Worker) Close() error {
	w.closeOnce.Do(func() {
		w.mu.Lock()
		w.closed = true
		w.mu.Unlock()
		close(w.closing)
		w.bgCancel()
		if w.health != nil {
			w.health.Shutdown()
		}
		w.bg.Wait()
		w.mu.Lock()
		reg := w.reg // read after keepRegistered has stopped: it may have replaced it
		g := w.gossip
		w.mu.Unlock()

		if g != nil {
			if err := g.Leave(gossipLeaveTimeout); err != nil {
				w.lg.Debug("gossip leave", zap.Error(err))
			}
			_ = g.Close()
		}
		var errs []error
		if reg != nil {
			ctx, cancel := context.WithTimeout(context.Background(), w.cfg.GracefulStopTimeout)
			if err := reg.Close(ctx); err != nil {
				errs = append(errs, fmt.Errorf("worker: deregister: %w", err))
			}
			cancel()
		}
		if w.srv != nil {
			w.stopServer()
		}
		w.cancel()
		w.stopMetrics()
		w.serveWG.Wait()
		w.streams.Wait()

		w.mu.Lock()
		comm := w.comm
		w.comm = nil
		w.mu.Unlock()
		if comm != nil {
			_ = comm.Close()
		}
		w.closeSeed()
		w.runMu.Lock()
		w.wts, w.staged, w.mem = nil, nil, nil
		w.clearSeqs()
		if c, ok := w.ops.(io.Closer); ok {
			if err := c.Close(); err != nil {
				w.lg.Warn("close the device", zap.Error(err))
			}
		}
		w.runMu.Unlock()
		if w.cli != nil {
			if err := w.cli.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		close(w.errc)
		w.closeErr = errors.Join(errs...)
		w.lg.Info("worker closed")
	})
	return w.closeErr
}

// stopServer stops the gRPC server gracefully, and forcibly after the graceful stop timeout: it then
// cancels the running steps and closes the communicator so that a step blocked in a collective
// returns at once.
func (w *Worker) stopServer() {
	t := time.AfterFunc(w.cfg.GracefulStopTimeout, func() {
		w.lg.Warn("graceful stop timed out; stopping forcibly", zap.Duration("timeout", w.cfg.GracefulStopTimeout))
		w.cancel()
		w.mu.Lock()
		comm := w.comm
		w.mu.Unlock()
		if comm != nil {
			_ = comm.Close()
		}
		w.srv.Stop()
	})
	w.srv.GracefulStop()
	t.Stop()
	w.srv.Stop() // returns at once after a graceful stop; waits for the forced one otherwise
}

// member is the member this worker registers.
func (w *Worker) member() cluster.Member {
	host, _ := os.Hostname()
	return cluster.Member{
		ID:      w.cfg.ID,
		Addr:    w.addr,
		Host:    host,
		Devices: []cluster.Device{w.deviceDesc()},
		Labels:  w.cfg.Labels,
		Gossip:  w.gossipAddr,
		Started: w.startedAt, // also when registering again: the same process, the same gossip meta
	}
}

// register registers the member. When the ID is taken it retries for one lease TTL (and a second):
// a worker restarted with the same ID finds its predecessor's key until that lease expires.
func (w *Worker) register(ctx context.Context) (*cluster.Registration, error) {
	deadline := time.Now().Add(w.cfg.LeaseTTL + time.Second)
	for {
		reg, err := w.cli.Register(ctx, w.member(), w.cfg.LeaseTTL)
		if !errors.Is(err, cluster.ErrMemberExists) || time.Now().After(deadline) {
			return reg, err
		}
		w.lg.Warn("member ID taken; waiting for the holder's lease to expire", zap.Error(err))
		t := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("worker: register: %w", ctx.Err())
		case <-t.C:
		}
	}
}

// keepRegistered registers the member again when its lease is lost (etcd unreachable past the TTL),
// retrying with backoff until it succeeds or the worker closes.
func (w *Worker) keepRegistered() {
	for {
		w.mu.Lock()
		reg := w.reg
		w.mu.Unlock()
		select {
		case <-w.bgCtx.Done():
			return
		case <-reg.Done():
		}
		if w.bgCtx.Err() != nil {
			return
		}
		w.lg.Warn("member lease lost; registering again")
		for wait := 250 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
			r, err := w.cli.Register(w.bgCtx, w.member(), w.cfg.LeaseTTL)
			if err == nil {
				w.mu.Lock()
				w.reg = r
				w.mu.Unlock()
				break
			}
			if w.bgCtx.Err() != nil {
				return
			}
			w.lg.Warn("registering again failed; retrying", zap.Error(err), zap.Duration("in", wait))
			t := time.NewTimer(wait)
			select {
			case <-w.bgCtx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// setStateLocked sets the state, publishes it to health, closes Ready when the worker has settled and
// wakes LoadPlan waiters. The caller holds w.mu.
func (w *Worker) setStateLocked(s State) {
	if w.state != s {
		w.lg.Debug("state", zap.String("from", string(w.state)), zap.String("to", string(s)), zap.Int64("epoch", w.epoch))
	}
	w.state = s
	w.publishHealthLocked()
	if (s == StateServing || s == StateIdle) && w.epoch >= w.readyEpoch {
		w.markReady()
	}
	w.notifyLocked()
}

// publishHealthLocked sets the health statuses from the state; see State.
func (w *Worker) publishHealthLocked() {
	if w.health == nil || w.closed {
		return
	}
	all, step := healthpb.HealthCheckResponse_NOT_SERVING, healthpb.HealthCheckResponse_NOT_SERVING
	switch w.state {
	case StateServing:
		all, step = healthpb.HealthCheckResponse_SERVING, healthpb.HealthCheckResponse_SERVING
	case StateIdle:
		all = healthpb.HealthCheckResponse_SERVING
	}
	w.health.SetServingStatus("", all)
	w.health.SetServingStatus(tpfleetv1.Worker_ServiceDesc.ServiceName, step)
}

// notifyLocked wakes everyone waiting on w.changed. The caller holds w.mu.
func (w *Worker) notifyLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *Worker) markReady() {
	select {
	case <-w.ready:
	default:
		close(w.ready)
	}
}

// memInfo returns the host's total and available memory in bytes from /proc/meminfo; zeros where it
// cannot be read.
func memInfo() (total, free int64) {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, 0
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) < 2 {
			continue
		}
		kib, err := strconv.ParseInt(string(f[1]), 10, 64)
		if err != nil {
			continue
		}
		switch string(f[0]) {
		case "MemTotal:":
			total = kib << 10
		case "MemAvailable:":
			free = kib << 10
		}
	}
	return total, free
}
