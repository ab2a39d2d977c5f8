package coordinator

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/wait"
	"github.com/tpfleet/tpfleet/model/dummy"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// errLeadershipLost ends a term of leadership that etcd took away.
var errLeadershipLost = errors.New("coordinator: leadership lost")

// Coordinator places the model's shards on the cluster's workers and serves clients. It campaigns for
// leadership of the cluster's coordinators; the leader plans (epochs in etcd), runs one step loop per TP
// group and serves Generate; a standby answers Generate with UNAVAILABLE until it leads. Make one with
// New, then Start it; Close stops it. Its methods are safe for concurrent use.
type Coordinator struct {
	cfg    Config
	log    *zap.Logger
	model  modelInfo
	queue  *queue
	kvCaps capacities // the serving groups' KV budgets, for admission (admission.go)
	dial   dialFunc
	// advertised is the gRPC address published in this coordinator's gossip meta; set by Start.
	advertised string
	// metrics are served at MetricsPath on the HTTP gateway (metrics.go).
	metrics *metrics

	seqIDs atomic.Uint64

	lis    net.Listener
	srv    *grpc.Server
	health *health.Server
	cl     *cluster.Client
	gossip *cluster.Gossip // nil with Config.NoGossip

	// The OpenAI-compatible HTTP gateway (package gateway, gateway.go); nil without Config.HTTPAddr.
	httpLis net.Listener
	httpSrv *http.Server

	// gossipDown holds the gossip nodes that left or were declared dead and have not come back;
	// gossipChanged (buffer 1: a pending wake-up is enough) wakes the leader when it changes.
	gossipMu      sync.Mutex
	gossipDown    map[gossipNode]struct{}
	gossipChanged chan struct{}
	// coordAddrs are the gRPC addresses of the coordinators whose gossip nodes are alive, from their
	// nodes' meta (see watchLeader); under gossipMu.
	coordAddrs map[string]string
	// procGone holds when watchLeader found a coordinator's process gone; under gossipMu.
	procGone map[string]time.Time
	// coordDown receives the IDs of other coordinators whose gossip node died (buffer 8; see gossipEvent
	// for the drop policy); the deposer reads it.
	coordDown chan string
	// coordChanged wakes a standby waiting for its turn (see standbyGate) when another coordinator's
	// gossip node joins or leaves (buffer 1: a pending wake-up covers later ones).
	coordChanged chan struct{}

	// ctx is the coordinator's lifetime: Close cancels it, which ends the leadership loop and the
	// groups; wg waits for them.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	ready     chan struct{}
	readyOnce sync.Once
	errc      chan error // buffer 1: the first fatal error

	rebalanceReqs chan rebalanceReq

	mu       sync.Mutex
	etcdLost bool // leading on a lapsed lease while etcd is unreachable (leader.ride)
	started  bool
	draining bool
	leader   bool
	plan     cluster.Plan // the plan in force while leading; Epoch 0 when none
	tp       int          // the TP size new plans use
	// What new plans use besides (see rebalance.go): the tp_plan's name and, from an operator's file, its
	// rules; the most groups (0: no cap); the drained members.
	planName    string
	planRules   []byte
	replicas    int
	drained     []string
	order       string       // the expert order (cluster.Plan.Order as JSON); "": the checkpoint's
	readyGroups map[int]bool // groups of plan.Epoch that serve

	closeOnce sync.Once
	closeErr  error
}

// New checks cfg and the model's configs; it starts nothing.
func New(cfg Config) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	m, err := loadModelInfo(cfg.Model)
	if err != nil {
		return nil, err
	}
	if err := m.serveAs(cfg.ServedModelName, cfg.MaxModelLen); err != nil {
		return nil, err
	}
	m.dummy = cfg.LoadFormat == dummy.LoadFormat
	if err := checkTP(m, cfg.Plan, nil, cfg.TP); err != nil {
		return nil, err
	}
	if m.gen, err = generationConfig(cfg.GenerationConfig, m); err != nil {
		return nil, err
	}
	if cfg.Quantization != "" && m.config.Info().Quantization != "" {
		return nil, fmt.Errorf("%w: --quantization %s: %s is pre-quantised (config.json has a quantization_config); leave --quantization empty", ErrInvalidConfig, cfg.Quantization, m.dir)
	}
	if cfg.Etcd.Logger == nil {
		cfg.Etcd.Logger = cfg.Logger
	}
	c := &Coordinator{
		cfg:           cfg,
		log:           cfg.Logger.With(zap.String("coordinator-id", cfg.ID)),
		model:         m,
		queue:         newQueueTimeout(cfg.MaxQueue, cfg.ResumeTimeout),
		dial:          workerDialer(cfg.TLS),
		ready:         make(chan struct{}),
		errc:          make(chan error, 1),
		rebalanceReqs: make(chan rebalanceReq),
		tp:            cfg.TP,
		planName:      cfg.Plan,
		readyGroups:   make(map[int]bool),
		gossipDown:    make(map[gossipNode]struct{}),
		gossipChanged: make(chan struct{}, 1),
		coordDown:     make(chan string, 8),
		coordAddrs:    make(map[string]string),
		procGone:      make(map[string]time.Time),
		coordChanged:  make(chan struct{}, 1),
	}
	c.metrics = newMetrics(c.queue.len, c.metricsState, c.metricsExperts)
	// Sequence ids of different coordinator lives differ, so a worker never confuses them.
	c.seqIDs.Store(uint64(time.Now().UnixNano()))
	return c, nil
}

// workerDialer returns the function that opens a connection to a worker: with t, mTLS that presents
// the coordinator's certificate and accepts only a worker's of the same cluster; without, plaintext. No
// keepalive pings: a dead worker breaks its Step stream (the connection resets) or loses its etcd lease,
// and both end its group's steps.
func workerDialer(t *security.TLS) dialFunc {
	creds := grpcauth.DialCredentials(t, security.RoleWorker)
	return func(addr string) (*grpc.ClientConn, error) {
		return grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	}
}

// authorizer is who may call the coordinator's gRPC services: health and reflection anyone; Generation
// a client or admin certificate (with TLS) and one of APIKeys (when set); Admin an admin certificate or
// one of AdminKeys. See package grpcauth for the codes of refusals.
func (c *Coordinator) authorizer() *grpcauth.Authorizer {
	api, admin := security.NewTokens(c.cfg.APIKeys...), security.NewTokens(c.cfg.AdminKeys...)
	return &grpcauth.Authorizer{TLS: c.cfg.TLS, Rules: []grpcauth.Rule{
		{Prefix: "/grpc.health.v1.Health/", Open: true},
		{Prefix: "/grpc.reflection.", Open: true},
		{Prefix: "/tpfleet.v1.Generation/", Roles: []security.Role{security.RoleClient, security.RoleAdmin}, Tokens: api},
		{Prefix: "/tpfleet.v1.Admin/", Roles: []security.Role{security.RoleAdmin}, Tokens: admin, TokenOrRole: true, Known: api},
	}}
}

// checkTP reports a TP size the model cannot be split into under the tp_plan (rules parsed when given, see
// shard.PlanOf), as the workers would.
func checkTP(m modelInfo, planName string, rules []byte, tp int) error {
	if tp < 1 {
		return fmt.Errorf("%w: TP %d, want >= 1", ErrInvalidConfig, tp)
	}
	plan, err := shard.PlanOf(m.config, planName, rules)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	var cat shard.Catalog
	if m.dummy {
		if cat, err = dummy.NewSource(m.config, 0); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	} else {
		ckpt, err := safetensors.OpenCheckpoint(m.dir)
		if err != nil {
			return fmt.Errorf("%w: %w (with --load-format dummy, config.json is enough)", ErrInvalidConfig, err)
		}
		defer ckpt.Close()
		cat = ckpt
	}
	if _, err := shard.NewManifest(m.config, cat, plan, tp, 0); err != nil {
		return fmt.Errorf("%w: model %s at TP %d under plan %q: %w", ErrInvalidConfig, m.name, tp, planName, err)
	}
	return nil
}

// Start listens on cfg.ListenAddr, connects to etcd and starts campaigning; it returns once the gRPC
// server accepts connections. ctx bounds the start only (the connection to etcd); the coordinator runs
// until Close. Ready tells when it serves.
func (c *Coordinator) Start(ctx context.Context) error {
	c.mu.Lock()
	if c.started {
		c.mu.Unlock()
		return fmt.Errorf("coordinator: started twice")
	}
	c.started = true
	c.mu.Unlock()

	c.log.Info("starting coordinator",
		zap.String("listen", c.cfg.ListenAddr),
		zap.String("http-listen", c.cfg.HTTPAddr),
		zap.String("model", c.model.dir),
		zap.String("model-name", c.model.name),
		zap.Bool("tokenizer", c.model.tok != nil),
		zap.Int("tp", c.cfg.TP),
		zap.String("plan", c.cfg.Plan),
		zap.String("quantization", c.cfg.Quantization),
		zap.Int("quantization-group", c.cfg.QuantizationGroup),
		zap.Int("max-queue", c.cfg.MaxQueue),
		zap.Int("max-batch", c.cfg.MaxBatch),
		zap.Int("token-budget", c.cfg.TokenBudget),
		zap.Int("prefill-chunk", c.cfg.PrefillChunk),
		zap.Duration("leader-ttl", c.cfg.LeaderTTL),
		zap.Duration("settle", c.cfg.Settle),
		zap.Bool("no-gossip", c.cfg.NoGossip),
		zap.Float64("load-bandwidth", c.cfg.LoadBandwidth),
		zap.Duration("experts-every", c.cfg.ExpertsEvery),
		zap.Strings("etcd-endpoints", c.cfg.Etcd.Endpoints),
		zap.String("cluster", c.cfg.Etcd.Cluster),
		zap.Bool("tls", c.cfg.TLS != nil),
		zap.Int("api-keys", len(c.cfg.APIKeys)),
		zap.Int("admin-keys", len(c.cfg.AdminKeys)),
		zap.Bool("gossip-encrypted", c.cfg.Gossip.KeyFile != ""))
	if open, _ := c.cfg.insecureListeners(); len(open) > 0 {
		c.log.Warn(security.InsecureWarning, zap.Strings("addrs", open))
	}
	if c.cfg.TLS != nil {
		name := cmp.Or(c.cfg.Etcd.Cluster, cluster.DefaultCluster)
		if id := c.cfg.TLS.Identity(); !id.Has(security.RoleCoordinator) || id.Cluster != name {
			return fmt.Errorf("%w: the certificate %q has roles %v of cluster %q; a coordinator of cluster %q needs the coordinator role of its cluster",
				ErrInvalidConfig, id.Name, id.Roles, id.Cluster, name)
		}
	}

	cl, err := cluster.New(ctx, c.cfg.Etcd)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", c.cfg.ListenAddr)
	if err != nil {
		_ = cl.Close()
		return fmt.Errorf("coordinator: listen: %w", err)
	}
	httpLis, err := c.listenHTTP()
	if err != nil {
		_ = lis.Close()
		_ = cl.Close()
		return err
	}
	c.cl, c.lis, c.httpLis = cl, lis, httpLis
	c.advertised = cluster.Advertised(c.cfg.AdvertiseAddr, lis.Addr())
	if !c.cfg.NoGossip {
		if err := c.startGossip(ctx); err != nil {
			_ = lis.Close()
			if httpLis != nil {
				_ = httpLis.Close()
			}
			_ = cl.Close()
			return err
		}
	}
	c.srv = grpc.NewServer(append(c.authorizer().ServerOptions(),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             10 * time.Second, // clients may ping every 10 s, e.g. during a long generation
			PermitWithoutStream: true,             // and while idle
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    30 * time.Second, // ping an idle client after 30 s, so a vanished client's streams end
			Timeout: 10 * time.Second, // and close the connection when the ping is not answered in 10 s
			// MaxConnectionAge stays unset: Generate streams may be long.
		}),
		grpc.MaxRecvMsgSize(maxRecvMsgSize), // a Generate with images
	)...)
	pb.RegisterGenerationServer(c.srv, &generationServer{c: c})
	pb.RegisterAdminServer(c.srv, &adminServer{c: c})
	c.health = health.NewServer()
	c.setHealth(false)
	healthpb.RegisterHealthServer(c.srv, c.health)
	reflection.Register(c.srv)

	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(2)
	if c.gossip != nil {
		c.wg.Go(c.depose)
	}
	if c.cfg.ExpertsEvery > 0 {
		c.wg.Go(c.autoExperts)
	}
	go func() {
		defer c.wg.Done()
		if err := c.srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			c.fail(fmt.Errorf("coordinator: serve gRPC: %w", err))
		}
	}()
	go func() {
		defer c.wg.Done()
		c.campaign()
	}()
	c.serveHTTP()
	c.log.Info("coordinator listening", zap.String("addr", c.Addr()), zap.String("http-addr", c.HTTPAddr()))
	return nil
}

// Addr returns the address the gRPC server listens on (with the port it got for port 0), or "" before
// Start.
func (c *Coordinator) Addr() string {
	if c.lis == nil {
		return ""
	}
	return c.lis.Addr().String()
}

// Ready returns a channel that is closed once the coordinator leads and at least one TP group serves.
func (c *Coordinator) Ready() <-chan struct{} { return c.ready }

// Err returns a channel that receives the error that stopped the coordinator's gRPC server, if one
// does. The coordinator still needs Close.
func (c *Coordinator) Err() <-chan error { return c.errc }

func (c *Coordinator) fail(err error) {
	c.log.Error("coordinator failed", zap.Error(err))
	select {
	case c.errc <- err:
	default:
	}
}

// Close stops the coordinator: it refuses new requests, lets the requests in flight finish for up to
// ShutdownGrace, then stops the groups (ending what is left with UNAVAILABLE), resigns the leadership so
// a standby takes over at once, and closes the etcd client. It is idempotent.
func (c *Coordinator) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.draining = true
		started := c.started && c.srv != nil
		c.mu.Unlock()
		if !started {
			return
		}
		c.log.Info("stopping coordinator")
		c.health.Shutdown()
		grace, cancelGrace := context.WithTimeout(context.Background(), c.cfg.ShutdownGrace)
		defer cancelGrace()
		stopped := make(chan struct{})
		go func() {
			c.srv.GracefulStop()
			close(stopped)
		}()
		httpStopped := c.shutdownHTTP(grace) // the gRPC and HTTP servers share the deadline
		select {
		case <-stopped:
		case <-grace.Done():
		}
		<-httpStopped
		if grace.Err() != nil {
			c.log.Warn("requests still running at the end of the shutdown grace; cutting them", zap.Duration("grace", c.cfg.ShutdownGrace))
		}
		c.cancel()
		c.srv.Stop()
		c.closeHTTP()
		<-stopped
		c.wg.Wait()
		if c.gossip != nil {
			if err := c.gossip.Leave(gossipLeaveTimeout); err != nil {
				c.log.Debug("gossip leave", zap.Error(err))
			}
			_ = c.gossip.Close()
		}
		c.closeErr = c.cl.Close()
		c.log.Info("coordinator stopped")
	})
	return c.closeErr
}

// setHealth reports the coordinator serving (leading with a group that serves) or not.
func (c *Coordinator) setHealth(serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for _, svc := range []string{"", pb.Generation_ServiceDesc.ServiceName} {
		c.health.SetServingStatus(svc, st)
	}
}

// updateServing recomputes health and readiness; c.mu is held.
func (c *Coordinator) updateServing() {
	serving := c.leader && !c.draining && len(c.readyGroups) > 0
	c.setHealth(serving)
	if serving {
		c.readyOnce.Do(func() { close(c.ready) })
	}
}

// admit queues a checked request, or says why it cannot be served now.
func (c *Coordinator) admit(r *request) error {
	c.mu.Lock()
	draining, leader, groups := c.draining, c.leader, len(c.plan.Groups)
	c.mu.Unlock()
	switch {
	case draining:
		return fmt.Errorf("%w: shutting down", ErrClosed)
	case !leader:
		return fmt.Errorf("%w: this coordinator is a standby", ErrNotLeader)
	case groups == 0:
		return fmt.Errorf("%w: no TP group of %d workers is placed; see the cluster's members", ErrNoPlan, c.currentTP())
	}
	if err := c.kvCaps.check(r); err != nil {
		return err
	}
	c.metrics.admitted(r) // before push: a group may take it at once
	if err := c.queue.push(r); err != nil {
		r.obs = nil // never queued: counted as rejected by the caller
		return err
	}
	return nil
}

// metricsState is what the metrics export of the leadership and the plan, at scrape time.
func (c *Coordinator) metricsState() (leader bool, epoch int64, tp, groups, ready int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.leader {
		return false, 0, c.tp, 0, 0
	}
	return true, c.plan.Epoch, c.plan.TP, len(c.plan.Groups), len(c.readyGroups)
}

// setEtcdLost records whether the leader serves on a lapsed lease, etcd unreachable.
func (c *Coordinator) setEtcdLost(lost bool) {
	c.mu.Lock()
	c.etcdLost = lost
	c.mu.Unlock()
}

// spec is what the leader places now: the model, the current TP size, tp_plan, replicas and drained
// members, and the quantisation.
func (c *Coordinator) spec() spec {
	c.mu.Lock()
	defer c.mu.Unlock()
	return spec{model: c.model.dir, tp: c.tp, planName: c.planName, planRules: string(c.planRules),
		quantization: c.cfg.Quantization, group: c.cfg.QuantizationGroup, replicas: c.replicas, drained: joinDrained(c.drained),
		order: c.order}
}

func (c *Coordinator) currentTP() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tp
}

// campaign alternates between campaigning for leadership and leading, until Close.
func (c *Coordinator) campaign() {
	for c.ctx.Err() == nil {
		c.log.Info("campaigning for leadership")
		l, err := c.campaignOnce()
		if err != nil {
			if c.ctx.Err() != nil {
				break
			}
			c.log.Warn("campaign failed; retrying", zap.Error(err))
			wait.Sleep(c.ctx, time.Second)
			continue
		}
		c.mu.Lock()
		c.leader = true
		c.mu.Unlock()
		err = c.lead(l)
		c.stepDown()
		if c.ctx.Err() == nil {
			c.log.Warn("stepped down", zap.Error(err))
		}
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := l.Resign(rctx); err != nil && !errors.Is(err, cluster.ErrClosed) {
			c.log.Debug("resign", zap.Error(err))
		}
		cancel()
	}
	c.stepDown()
}

// campaignOnce campaigns until this coordinator leads; meanwhile its gossip node joins the workers', so
// that it hears of the leader's death (see depose). With gossip, a standby holds no key in the election
// while a leader that gossip reports alive leads (see standbyGate): an etcd outage, which lapses the
// leader's lease, must not hand the lead to a queued standby while the leader still serves.
func (c *Coordinator) campaignOnce() (*cluster.Leadership, error) {
	if c.gossip == nil {
		return c.cl.Campaign(c.ctx, c.cfg.ID, c.cfg.LeaderTTL)
	}
	ctx, cancel := context.WithCancel(c.ctx)
	var standby sync.WaitGroup
	standby.Go(func() { c.standbyGossip(ctx) })
	standby.Go(func() { c.watchLeader(ctx) })
	defer func() {
		cancel()
		standby.Wait()
	}()
	gate := &standbyGate{c: c, grace: 2 * c.cfg.LeaderTTL, made: time.Now()}
	for {
		if err := gate.waitTurn(c.ctx); err != nil {
			return nil, err
		}
		cctx, ccancel := context.WithCancel(c.ctx)
		var withdrew atomic.Bool
		var watch sync.WaitGroup
		watch.Go(func() {
			if gate.waitLiveLeader(cctx) {
				withdrew.Store(true)
				ccancel()
			}
		})
		l, err := c.cl.Campaign(cctx, c.cfg.ID, c.cfg.LeaderTTL)
		ccancel()
		watch.Wait()
		switch {
		case err == nil:
			return l, nil
		case withdrew.Load() && c.ctx.Err() == nil:
			c.log.Info("a leader gossip reports alive holds the lead; withdrew from the election", zap.String("leader-id", gate.last))
		default:
			return nil, err
		}
	}
}

// stepDown ends the leadership: the groups stop and every waiting request ends with UNAVAILABLE.
func (c *Coordinator) stepDown() {
	c.mu.Lock()
	c.leader = false
	c.plan = cluster.Plan{}
	clear(c.readyGroups)
	c.updateServing()
	c.mu.Unlock()
	reason := fmt.Errorf("%w: leadership ended", ErrNotLeader)
	if c.ctx.Err() != nil {
		reason = fmt.Errorf("%w: shutting down", ErrClosed)
	}
	for _, r := range c.queue.drain() {
		r.end("", reason)
	}
}

// leader is one term of leadership: the state of the loop that plans and runs the groups.
type leader struct {
	c       *Coordinator
	l       *cluster.Leadership
	ctx     context.Context
	log     *zap.Logger
	members []cluster.Member // the registered members, as etcd lists them
	dead    map[string]bool  // members gossip reports dead, as last logged (see gossipChanged)
	plan    cluster.Plan     // the stored plan (Epoch 0: none)
	cleaned int64            // rendezvous data before this epoch was deleted

	groupsEpoch int64 // the epoch the running groups serve
	groupsStop  context.CancelFunc
	groupsWG    sync.WaitGroup
	groupReady  chan struct{} // buffer 1: some group became ready
	groupFailed chan int64    // buffer 1: a worker of a group reported this epoch failed

	// A failed epoch is followed by a new one after a back-off that doubles with each failure in a row
	// and resets once every group serves.
	failTimer  *time.Timer
	failEpoch  int64 // the failed epoch the timer will replace; 0: none pending
	failStreak int

	lapsedSince time.Time // since when a planned worker alive in gossip is not registered (see reregistering)
}

// Back-off of re-plans after failed epochs.
const (
	failFirst = time.Second
	failMax   = 30 * time.Second
)

// lead plans and serves while l holds. It returns when the leadership is lost or the coordinator
// closes, with the groups stopped.
func (c *Coordinator) lead(l *cluster.Leadership) error {
	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	ld := &leader{c: c, l: l, ctx: ctx, log: c.log, groupReady: make(chan struct{}, 1), groupFailed: make(chan int64, 1),
		failTimer: time.NewTimer(time.Hour)}
	ld.failTimer.Stop()
	defer ld.failTimer.Stop()
	defer ld.stopGroups()

	members := c.cl.WatchMembers(ctx)
	plans := c.cl.WatchPlan(ctx)
	var joinLists chan []cluster.Member // to the gossip joiner; nil without gossip
	if c.gossip != nil {
		joinLists = make(chan []cluster.Member, 1) // the latest list only: see offerMembers
		jctx, jcancel := context.WithCancel(ctx)
		var joiner sync.WaitGroup
		joiner.Go(func() { c.joinGossip(jctx, joinLists) })
		defer func() {
			jcancel()
			joiner.Wait()
		}()
	}
	p, ok, err := c.cl.Plan(ctx)
	if err != nil {
		return err
	}
	if ok {
		ld.plan = p
		c.adopt(p)
	}
	c.log.Info("leading", zap.Int64("stored-epoch", ld.plan.Epoch))
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	haveMembers := false
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-l.Done():
			nl, err := ld.ride()
			if err != nil {
				return err
			}
			l, ld.l = nl, nl
		case ms, ok := <-members:
			if !ok {
				return fmt.Errorf("coordinator: member watch ended: %w", ctxErr(ctx, cluster.ErrClosed))
			}
			ld.members, haveMembers = ms, true
			settle.Reset(c.cfg.Settle)
			if joinLists != nil {
				c.forgetGossip(ms)
				ld.gossipChanged()
				offerMembers(joinLists, ms)
			}
		case <-c.gossipChanged:
			// A worker that gossip declares dead is lost now: place the cluster without it at once,
			// without waiting for Settle, let alone for its lease to expire.
			if haveMembers && ld.gossipChanged() {
				settle.Reset(0)
			}
		case p, ok := <-plans:
			if !ok {
				return fmt.Errorf("coordinator: plan watch ended: %w", ctxErr(ctx, cluster.ErrClosed))
			}
			if p.Epoch > ld.plan.Epoch {
				c.log.Warn("plan replaced by another writer", zap.Int64("epoch", p.Epoch))
				ld.plan = p
				ld.apply()
				if haveMembers {
					settle.Reset(c.cfg.Settle)
				}
			}
		case <-settle.C:
			if wait := ld.reregistering(); wait > 0 {
				settle.Reset(wait)
				continue
			}
			if err := ld.reconcile(); err != nil {
				if errors.Is(err, cluster.ErrNotLeader) || ctx.Err() != nil {
					return err
				}
				c.log.Warn("planning failed; retrying", zap.Error(err))
				settle.Reset(time.Second)
			}
		case req := <-c.rebalanceReqs:
			res, err := ld.rebalance(req)
			req.reply <- rebalanceReply{res, err}
			if errors.Is(err, cluster.ErrNotLeader) {
				return err
			}
		case <-ld.groupReady:
			ld.cleanRendezvous()
		case epoch := <-ld.groupFailed:
			if epoch == ld.plan.Epoch && ld.failEpoch == 0 {
				wait := min(failFirst<<min(ld.failStreak, 10), failMax)
				ld.failStreak++
				ld.failEpoch = epoch
				ld.failTimer.Reset(wait)
				c.log.Warn("epoch failed on a worker; writing a new one", zap.Int64("epoch", epoch), zap.Duration("in", wait))
			}
		case <-ld.failTimer.C:
			failed := ld.failEpoch
			ld.failEpoch = 0
			if failed == ld.plan.Epoch {
				if err := ld.replace(); err != nil {
					if errors.Is(err, cluster.ErrNotLeader) || ctx.Err() != nil {
						return err
					}
					c.log.Warn("replacing the failed epoch failed", zap.Error(err))
				}
			}
		}
	}
}

// ride keeps the groups serving the current plan after the leadership's lease lapsed, as long as etcd
// does not answer (an etcd outage: nobody can lead or change the plan then), and campaigns again. It
// returns the regained leadership, or errLeadershipLost as soon as etcd answers that another coordinator
// leads (that one's plan and epochs fence this one out).
func (ld *leader) ride() (*cluster.Leadership, error) {
	c := ld.c
	c.setEtcdLost(true)
	defer c.setEtcdLost(false)
	ld.log.Warn("leadership lease lapsed; serving the current plan while etcd is unreachable: the plan cannot change",
		zap.Int64("epoch", ld.plan.Epoch))
	for {
		if err := ld.ctx.Err(); err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ld.ctx, time.Second)
		id, ok, err := c.cl.Leader(cctx)
		cancel()
		if err == nil && ok && id != c.cfg.ID {
			ld.log.Warn("another coordinator leads", zap.String("leader-id", id))
			return nil, errLeadershipLost
		}
		if err == nil {
			cctx, cancel := context.WithTimeout(ld.ctx, 2*c.cfg.LeaderTTL+time.Second)
			nl, err := c.cl.Campaign(cctx, c.cfg.ID, c.cfg.LeaderTTL)
			cancel()
			if err == nil {
				ld.log.Info("leadership regained; etcd answers again", zap.Int64("epoch", ld.plan.Epoch))
				return nl, nil
			}
			ld.log.Debug("campaign while riding out", zap.Error(err))
		}
		wait.Sleep(ld.ctx, 250*time.Millisecond)
	}
}

// reconcile brings the stored plan in line with the members: a plan that still fits them is resumed
// as it is (no new epoch: workers keep their shards), otherwise the next epoch is written.
func (ld *leader) reconcile() error {
	for range 5 {
		s := ld.c.spec()
		var keep *cluster.Plan
		if ld.plan.Epoch > 0 {
			keep = &ld.plan
		}
		want := place(ld.live(), s, keep)
		if ld.plan.Epoch > 0 && samePlacement(ld.plan, want) {
			if ld.groupsEpoch != ld.plan.Epoch {
				ld.log.Info("resuming plan", zap.Int64("epoch", ld.plan.Epoch), zap.Int("groups", len(ld.plan.Groups)))
			}
			ld.apply()
			return nil
		}
		if ld.plan.Epoch == 0 && len(want.Groups) == 0 {
			ld.log.Info("waiting for workers", zap.Int("members", len(ld.live())), zap.Int("tp", s.tp))
			return nil
		}
		err := ld.put(want)
		if errors.Is(err, cluster.ErrConflict) {
			if p, ok, err := ld.c.cl.Plan(ld.ctx); err == nil && ok {
				ld.plan = p
			}
			continue
		}
		return err
	}
	return fmt.Errorf("coordinator: plan: %w five times in a row", cluster.ErrConflict)
}

// replace writes the current placement (the surviving groups, and new ones from free members) as the
// next epoch: workers of a failed epoch start over with it, keeping their weights.
func (ld *leader) replace() error {
	for range 5 {
		s := ld.c.spec()
		var keep *cluster.Plan
		if ld.plan.Epoch > 0 {
			keep = &ld.plan
		}
		err := ld.put(place(ld.live(), s, keep))
		if !errors.Is(err, cluster.ErrConflict) {
			return err
		}
		if p, ok, err := ld.c.cl.Plan(ld.ctx); err == nil && ok {
			ld.plan = p
		}
	}
	return fmt.Errorf("coordinator: plan: %w five times in a row", cluster.ErrConflict)
}

// put writes want as the next epoch, guarded by the leadership, and applies it.
func (ld *leader) put(want cluster.Plan) error {
	want.Epoch = ld.plan.Epoch + 1
	if err := ld.l.PutPlan(ld.ctx, want, ld.plan.Epoch); err != nil {
		return err
	}
	placed := 0
	for _, g := range want.Groups {
		placed += len(g.Ranks)
	}
	live := len(ld.live())
	ld.log.Info("plan written", zap.Int64("epoch", want.Epoch), zap.Int("tp", want.TP), zap.Int("groups", len(want.Groups)),
		zap.Int("members", len(ld.members)), zap.Int("gossip-dead", len(ld.members)-live), zap.Int("idle", live-placed))
	ld.plan = want
	ld.apply()
	return nil
}

// apply runs the groups of the stored plan: when its epoch differs from the running groups', they stop
// (their requests go back to the queue) and the plan's groups start.
func (ld *leader) apply() {
	c := ld.c
	c.mu.Lock()
	c.plan = ld.plan
	c.mu.Unlock()
	if ld.groupsEpoch == ld.plan.Epoch {
		return
	}
	ld.stopGroups()
	ctx, cancel := context.WithCancel(ld.ctx)
	ld.groupsEpoch, ld.groupsStop = ld.plan.Epoch, cancel
	if len(ld.plan.Groups) == 0 {
		// Nothing will take the waiting requests: fail the new ones rather than let them wait for workers;
		// those handed back by a group wait until their resume deadline, for a plan with a group.
		for _, r := range c.queue.drainNew() {
			r.end("", fmt.Errorf("%w: epoch %d places no TP group of %d workers", ErrNoPlan, ld.plan.Epoch, ld.plan.TP))
		}
	}
	for _, g := range ld.plan.Groups {
		log := c.log.With(zap.Int64("epoch", ld.plan.Epoch), zap.Int("group", g.ID))
		cfg := groupConfig{
			epoch:            ld.plan.Epoch,
			leaderRev:        ld.l.Rev(),
			group:            g,
			queue:            c.queue,
			maxBatch:         c.cfg.MaxBatch,
			tokenBudget:      c.cfg.TokenBudget,
			prefillChunk:     c.cfg.PrefillChunk,
			stepTimeout:      c.cfg.StepTimeout,
			stepTokenTimeout: c.cfg.StepTokenTimeout,
			seqIDs:           &c.seqIDs,
			dial:             c.dial,
			log:              log,
			onReady:          ld.onReady(ld.plan.Epoch, g.ID),
			onFailed:         ld.onFailed(ld.plan.Epoch),
			obs:              c.metrics.group(g.ID),
			kvCaps:           &c.kvCaps,
		}
		ld.groupsWG.Go(func() { runGroup(ctx, cfg) })
	}
}

// onReady returns the callback through which a group of epoch reports that it serves or stopped.
func (ld *leader) onReady(epoch int64, group int) func(bool) {
	return func(ready bool) {
		c := ld.c
		c.mu.Lock()
		if c.plan.Epoch == epoch {
			if ready {
				c.readyGroups[group] = true
			} else {
				delete(c.readyGroups, group)
			}
			c.updateServing()
		}
		c.mu.Unlock()
		if ready {
			select {
			case ld.groupReady <- struct{}{}:
			default: // a signal is pending already
			}
		}
	}
}

// onFailed returns the callback through which a group of epoch reports a worker failed in it.
func (ld *leader) onFailed(epoch int64) func() {
	return func() {
		select {
		case ld.groupFailed <- epoch:
		default: // a report is pending already; the leader handles one failure per epoch
		}
	}
}

// stopGroups stops the running groups and waits for them.
func (ld *leader) stopGroups() {
	if ld.groupsStop != nil {
		ld.groupsStop()
		ld.groupsWG.Wait()
		ld.groupsStop = nil
	}
	ld.groupsEpoch = 0
	c := ld.c
	c.mu.Lock()
	clear(c.readyGroups)
	c.updateServing()
	c.mu.Unlock()
}

// cleanRendezvous deletes the rendezvous data of older epochs once every group of the plan serves.
func (ld *leader) cleanRendezvous() {
	c := ld.c
	c.mu.Lock()
	all := c.plan.Epoch == ld.plan.Epoch && len(c.readyGroups) == len(ld.plan.Groups)
	c.mu.Unlock()
	if !all || ld.cleaned >= ld.plan.Epoch {
		return
	}
	ld.failStreak = 0
	ld.log.Info("every group serves", zap.Int64("epoch", ld.plan.Epoch), zap.Int("groups", len(ld.plan.Groups)))
	ctx, cancel := context.WithTimeout(ld.ctx, 5*time.Second)
	defer cancel()
	if err := c.cl.DeleteRendezvousBefore(ctx, ld.plan.Epoch); err != nil {
		ld.log.Warn("deleting old rendezvous data", zap.Error(err))
		return
	}
	ld.cleaned = ld.plan.Epoch
}
