package cluster

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Defaults of GossipConfig. They start from memberlist's DefaultLocalConfig and probe faster, so that a
// killed process on a LAN or on loopback is reported within about a second.
const (
	// DefaultGossipBindAddr is the address gossip listens on when GossipConfig.BindAddr is empty.
	DefaultGossipBindAddr = "0.0.0.0"
	// DefaultGossipProbeInterval is how often each node probes one random peer (memberlist's local
	// profile: 1 s). Shorter finds failures sooner and costs a small UDP packet per node per interval.
	DefaultGossipProbeInterval = 250 * time.Millisecond
	// DefaultGossipProbeTimeout is how long a probe waits for its ack before asking other nodes to
	// probe indirectly (local profile: 200 ms). It must exceed the network's round trip.
	DefaultGossipProbeTimeout = 100 * time.Millisecond
	// DefaultGossipSuspicionMult scales how long a suspected node has to refute before it is declared
	// dead: SuspicionMult × max(1, log10(N)) × ProbeInterval, up to 6 times that while other nodes have
	// not confirmed the suspicion. With the defaults and fewer than 10 nodes: 750 ms once confirmed.
	DefaultGossipSuspicionMult = 3
)

// GossipConfig configures a gossip node (hashicorp/memberlist) for fast failure detection among the
// cluster's processes. etcd stays the source of truth: gossip only tells sooner that a process died.
type GossipConfig struct {
	// Name is the node's name, unique among the nodes: use the member ID. Required.
	Name string `json:"-"`
	// BindAddr is the address to listen on (UDP and TCP). Empty means DefaultGossipBindAddr.
	BindAddr string `json:"gossip-bind-addr"`
	// BindPort is the port to listen on; 0 picks a free one (see Addr).
	BindPort int `json:"gossip-bind-port"`
	// AdvertiseAddr is the address other nodes reach this one at. Empty means BindAddr when that is a
	// specific address, else the first private address of the host.
	AdvertiseAddr string `json:"gossip-advertise-addr"`
	// Join lists host:port addresses of nodes to join at start. Empty starts a new gossip cluster.
	// StartGossip fails if none of them answers.
	Join []string `json:"gossip-join"`
	// Meta is sent to the other nodes with this node's membership, at most memberlist.MetaMaxSize
	// (512) bytes; e.g. the worker's gRPC address.
	Meta []byte `json:"-"`
	// Logger receives memberlist's logs. Nil means zap.NewNop().
	Logger *zap.Logger `json:"-"`
	// OnJoin and OnLeave, when set, are called with a node's name and a copy of its meta when the node
	// joins (this node included, at start) and when it leaves or is declared dead. They are called in
	// order from one goroutine, never concurrently, and never from memberlist's receive loop: a slow
	// callback delays later callbacks only. Events still queued at Close are dropped.
	OnJoin  func(name string, meta []byte) `json:"-"`
	OnLeave func(name string, meta []byte) `json:"-"`
	// ProbeInterval, ProbeTimeout and SuspicionMult tune failure detection; zero means
	// DefaultGossipProbeInterval, DefaultGossipProbeTimeout and DefaultGossipSuspicionMult.
	ProbeInterval time.Duration `json:"gossip-probe-interval"`
	ProbeTimeout  time.Duration `json:"gossip-probe-timeout"`
	SuspicionMult int           `json:"gossip-suspicion-mult"`
	// KeyFile, when set, encrypts and authenticates gossip with the cluster's keys (memberlist's
	// keyring, AES-GCM; ReadGossipKeys gives the format): every node needs the same file. The node
	// reloads it every KeyReloadInterval, so keys rotate without a restart: add the new key as a second
	// line everywhere, then move it first everywhere, then remove the old one. Empty means plaintext
	// gossip.
	KeyFile string `json:"gossip-key-file"`
	// KeyReloadInterval is how often the node looks at KeyFile. Zero means DefaultGossipKeyReload.
	KeyReloadInterval time.Duration `json:"gossip-key-reload-interval"`
}

// Validate reports a GossipConfig that StartGossip cannot use.
func (c GossipConfig) Validate() error {
	switch {
	case c.Name == "":
		return fmt.Errorf("%w: gossip: no node name", ErrInvalid)
	case c.BindPort < 0 || c.BindPort > 65535:
		return fmt.Errorf("%w: gossip: bind port %d", ErrInvalid, c.BindPort)
	case len(c.Meta) > memberlist.MetaMaxSize:
		return fmt.Errorf("%w: gossip: meta of %d bytes, at most %d", ErrInvalid, len(c.Meta), memberlist.MetaMaxSize)
	case c.ProbeInterval < 0 || c.ProbeTimeout < 0 || c.SuspicionMult < 0:
		return fmt.Errorf("%w: gossip: negative probe setting", ErrInvalid)
	case c.KeyReloadInterval < 0:
		return fmt.Errorf("%w: gossip: negative key reload interval", ErrInvalid)
	}
	if c.BindAddr != "" && net.ParseIP(c.BindAddr) == nil {
		return fmt.Errorf("%w: gossip: bind address %q is not an IP address", ErrInvalid, c.BindAddr)
	}
	interval, timeout := c.ProbeInterval, c.ProbeTimeout
	if interval == 0 {
		interval = DefaultGossipProbeInterval
	}
	if timeout == 0 {
		timeout = DefaultGossipProbeTimeout
	}
	if timeout >= interval {
		return fmt.Errorf("%w: gossip: probe timeout %v not below probe interval %v", ErrInvalid, timeout, interval)
	}
	for _, j := range c.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			return fmt.Errorf("%w: gossip: join address %q: %v", ErrInvalid, j, err)
		}
	}
	return nil
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults. Name, Meta and the
// callbacks are the program's to set.
func (c *GossipConfig) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.BindAddr, "gossip-bind-addr", c.BindAddr, "gossip listen address (empty: "+DefaultGossipBindAddr+")")
	fs.IntVar(&c.BindPort, "gossip-bind-port", c.BindPort, "gossip listen port, UDP and TCP (0: any)")
	fs.StringVar(&c.AdvertiseAddr, "gossip-advertise-addr", c.AdvertiseAddr, "address other nodes reach this one at (empty: bind address or first private address)")
	fs.Var((*listFlag)(&c.Join), "gossip-join", "host:port of gossip nodes to join, comma-separated")
	fs.DurationVar(&c.ProbeInterval, "gossip-probe-interval", c.ProbeInterval, "gossip failure-detection probe interval (0: 250ms)")
	fs.DurationVar(&c.ProbeTimeout, "gossip-probe-timeout", c.ProbeTimeout, "gossip probe ack timeout (0: 100ms)")
	fs.IntVar(&c.SuspicionMult, "gossip-suspicion-mult", c.SuspicionMult, "gossip suspicion timeout multiplier (0: 3)")
	if c.KeyFile == "" {
		c.KeyFile = os.Getenv(EnvGossipKeyFile)
	}
	fs.StringVar(&c.KeyFile, "gossip-key-file", c.KeyFile, "file of base64 gossip keys, one a line, the first encrypting; reloaded when it changes (env "+EnvGossipKeyFile+"; empty: plaintext gossip)")
}

// EnvGossipKeyFile is the environment variable that gives GossipConfig.AddFlags' default KeyFile.
const EnvGossipKeyFile = "TPFLEET_GOSSIP_KEY_FILE"

// Gossip is a running gossip node. Make one with StartGossip. Its methods are safe for concurrent use.
type Gossip struct {
	ml *memberlist.Memberlist
	lg *zap.Logger

	events *eventQueue
	stop   chan struct{}
	wg     sync.WaitGroup

	mu     sync.Mutex // serialises Leave and Close: memberlist panics on Leave after Shutdown
	closed bool
	quiet  atomic.Bool // set by Close: memberlist's logs stop
}

// StartGossip starts a gossip node and joins cfg.Join. It returns once the node listens and has
// joined (or, with no Join, at once); when ctx ends first, it shuts the node down and fails with ctx's
// error.
func StartGossip(ctx context.Context, cfg GossipConfig) (*Gossip, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	lg := cfg.Logger.With(zap.String("gossip-name", cfg.Name))
	g := &Gossip{lg: lg, events: newEventQueue(), stop: make(chan struct{})}

	mc := memberlist.DefaultLocalConfig()
	mc.Name = cfg.Name
	mc.BindAddr = cmp.Or(cfg.BindAddr, DefaultGossipBindAddr)
	mc.BindPort = cfg.BindPort
	mc.AdvertiseAddr = cfg.AdvertiseAddr
	mc.AdvertisePort = cfg.BindPort
	mc.ProbeInterval = cmp.Or(cfg.ProbeInterval, DefaultGossipProbeInterval)
	mc.ProbeTimeout = cmp.Or(cfg.ProbeTimeout, DefaultGossipProbeTimeout)
	mc.SuspicionMult = cmp.Or(cfg.SuspicionMult, DefaultGossipSuspicionMult)
	// The local profile sends each broadcast 2 × ceil(log10(N+1)) times. Gossip also goes to nodes
	// dead for less than GossipToTheDeadTime, so after a recent death a Leave could be spent on the
	// dead node alone and the live ones would wait for failure detection. The LAN value (4) makes
	// that unlikely, for a few more small packets.
	mc.RetransmitMult = 4
	// Member IDs are unique in etcd, so a node that comes back under a dead node's name at another
	// address is that member's new process (a worker restarted with a fixed ID): it takes the name
	// over at once instead of being refused until the dead node is reaped (GossipToTheDeadTime, 15 s).
	mc.DeadNodeReclaimTime = time.Nanosecond
	// Once Close begins, memberlist's goroutines still running complain about the sockets it closed
	// ("use of closed network connection"): quiet drops those lines.
	mlg := lg.Named("memberlist").WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return quietCore{Core: c, quiet: &g.quiet}
	}))
	mc.Logger = log.New(stdLogWriter{mlg}, "", 0)
	mc.Delegate = metaDelegate{meta: slices.Clone(cfg.Meta)}
	mc.Events = g.events
	var keys *keyFile
	if cfg.KeyFile != "" {
		var err error
		if keys, err = newKeyFile(cfg.KeyFile, lg); err != nil {
			return nil, err
		}
		mc.Keyring = keys.ring
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	lg.Info("starting gossip",
		zap.String("gossip-bind-addr", mc.BindAddr),
		zap.Int("gossip-bind-port", mc.BindPort),
		zap.String("gossip-advertise-addr", mc.AdvertiseAddr),
		zap.Strings("gossip-join", cfg.Join),
		zap.Duration("gossip-probe-interval", mc.ProbeInterval),
		zap.Duration("gossip-probe-timeout", mc.ProbeTimeout),
		zap.Int("gossip-suspicion-mult", mc.SuspicionMult),
		zap.String("gossip-key-file", cfg.KeyFile))

	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.events.run(g.stop, cfg.OnJoin, cfg.OnLeave)
	}()
	ml, err := memberlist.Create(mc)
	if err != nil {
		close(g.stop)
		g.wg.Wait()
		return nil, fmt.Errorf("cluster: start gossip %s on %s:%d: %w", cfg.Name, mc.BindAddr, cfg.BindPort, err)
	}
	g.ml = ml
	if keys != nil {
		g.wg.Go(func() { keys.watch(g.stop, cmp.Or(cfg.KeyReloadInterval, DefaultGossipKeyReload)) })
	}

	if len(cfg.Join) > 0 {
		type result struct {
			n   int
			err error
		}
		joined := make(chan result, 1) // one sender, which never waits
		go func() {
			n, err := ml.Join(cfg.Join)
			joined <- result{n, err}
		}()
		var r result
		select {
		case r = <-joined:
		case <-ctx.Done():
			_ = g.Close()
			<-joined // Join gives up after its TCP timeout once the node is shut down
			return nil, fmt.Errorf("cluster: gossip %s: join %v: %w", cfg.Name, cfg.Join, ctx.Err())
		}
		if r.n == 0 {
			_ = g.Close()
			return nil, fmt.Errorf("cluster: gossip %s: join %v: no node answered: %w", cfg.Name, cfg.Join, r.err)
		}
		if r.err != nil {
			lg.Warn("gossip joined only some nodes", zap.Int("joined", r.n), zap.Error(r.err))
		}
	}
	lg.Info("gossip started", zap.String("gossip-addr", g.Addr()), zap.Int("gossip-members", ml.NumMembers()))
	return g, nil
}

// Addr returns the host:port other nodes give in GossipConfig.Join to join this one.
func (g *Gossip) Addr() string { return g.ml.LocalNode().Address() }

// Members returns the names of the nodes believed alive (suspects included), sorted.
func (g *Gossip) Members() []string {
	nodes := g.ml.Members()
	names := make([]string, len(nodes))
	for i, n := range nodes {
		names[i] = n.Name
	}
	slices.Sort(names)
	return names
}

// Join contacts the gossip nodes at addrs (host:port), one after the other, and merges their gossip
// cluster with this node's: nodes started apart (each worker starts its own) become one. It returns
// how many answered; the error joins the failures of the others, and is nil when all answered. One
// address takes at most memberlist's TCP timeout (1 s); ctx is checked between addresses. It fails with
// ErrInvalid for an address without a port and with ErrClosed after Close.
func (g *Gossip) Join(ctx context.Context, addrs []string) (int, error) {
	for _, a := range addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return 0, fmt.Errorf("%w: gossip join: address %q: %v", ErrInvalid, a, err)
		}
	}
	n := 0
	var errs []error
	for _, a := range addrs {
		if err := ctx.Err(); err != nil {
			return n, errors.Join(append(errs, fmt.Errorf("cluster: gossip join: %w", err))...)
		}
		g.mu.Lock()
		closed := g.closed
		g.mu.Unlock()
		if closed {
			return n, errors.Join(append(errs, fmt.Errorf("cluster: gossip join: %w", ErrClosed))...)
		}
		if _, err := g.ml.Join([]string{a}); err != nil {
			errs = append(errs, fmt.Errorf("cluster: gossip join %s: %w", a, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// Leave tells the other nodes that this one is leaving, waiting at most timeout for the message to
// spread, so that they report OnLeave at once instead of after failure detection. Call Close after.
// It fails with ErrClosed after Close.
func (g *Gossip) Leave(timeout time.Duration) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return fmt.Errorf("cluster: gossip leave: %w", ErrClosed)
	}
	if err := g.ml.Leave(timeout); err != nil {
		return fmt.Errorf("cluster: gossip leave: %w", err)
	}
	return nil
}

// Close stops the node without telling the others (they detect the failure; call Leave first for a
// graceful exit) and stops the callback goroutine. From then on memberlist logs nothing: what it
// says while its sockets close is noise. It is idempotent.
func (g *Gossip) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	g.quiet.Store(true)
	var err error
	if e := g.ml.Shutdown(); e != nil {
		err = fmt.Errorf("cluster: gossip shutdown: %w", e)
	}
	close(g.stop)
	g.wg.Wait()
	g.lg.Info("gossip stopped")
	return err
}

// metaDelegate is a memberlist.Delegate that only publishes the node's meta.
type metaDelegate struct{ meta []byte }

var _ memberlist.Delegate = metaDelegate{}

func (d metaDelegate) NodeMeta(limit int) []byte {
	if len(d.meta) > limit {
		return nil
	}
	return d.meta
}
func (metaDelegate) NotifyMsg([]byte)                           {}
func (metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (metaDelegate) LocalState(join bool) []byte                { return nil }
func (metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

// nodeEvent is a join or leave, with copies of the node's name and meta.
type nodeEvent struct {
	join bool
	name string
	meta []byte
}

// eventQueue is a memberlist.EventDelegate that queues events without blocking memberlist (the queue
// is unbounded; events are few) for run to deliver in order.
type eventQueue struct {
	mu     sync.Mutex
	queue  []nodeEvent
	signal chan struct{} // buffer 1: a pending wake-up; senders never block
}

var _ memberlist.EventDelegate = (*eventQueue)(nil)

func newEventQueue() *eventQueue { return &eventQueue{signal: make(chan struct{}, 1)} }

func (q *eventQueue) push(join bool, n *memberlist.Node) {
	q.mu.Lock()
	q.queue = append(q.queue, nodeEvent{join: join, name: n.Name, meta: slices.Clone(n.Meta)})
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *eventQueue) NotifyJoin(n *memberlist.Node)  { q.push(true, n) }
func (q *eventQueue) NotifyLeave(n *memberlist.Node) { q.push(false, n) }
func (q *eventQueue) NotifyUpdate(*memberlist.Node)  {}

// run delivers queued events to the callbacks until stop is closed.
func (q *eventQueue) run(stop <-chan struct{}, onJoin, onLeave func(string, []byte)) {
	for {
		select {
		case <-stop:
			return
		case <-q.signal:
		}
		q.mu.Lock()
		batch := q.queue
		q.queue = nil
		q.mu.Unlock()
		for _, e := range batch {
			select {
			case <-stop:
				return
			default:
			}
			if e.join && onJoin != nil {
				onJoin(e.name, e.meta)
			} else if !e.join && onLeave != nil {
				onLeave(e.name, e.meta)
			}
		}
	}
}
