package coordinator

import (
	"context"
	"fmt"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/cluster"
)

// gossipWorker is a fake worker with its own etcd client and gossip node, as a worker process has, so
// that a test can crash it: its gossip node stops without leaving, its gRPC server stops, and its lease
// is orphaned, so that its member key stays until the lease expires.
type gossipWorker struct {
	*fakeWorker
	cl     *cluster.Client
	gossip *cluster.Gossip
	member cluster.Member
	reg    *cluster.Registration
}

// startGossipWorker starts a gossipWorker that registers with a lease of ttl and follows the plan.
func startGossipWorker(t *testing.T, id string, ttl time.Duration, opts ...grpc.ServerOption) *gossipWorker {
	t.Helper()
	w := &gossipWorker{fakeWorker: startFakeWorker(t, id, opts...)}
	var err error
	if w.cl, err = cluster.New(testCtx(t), etcdConfig(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.cl.Close() })
	m := cluster.Member{ID: id, Addr: w.addr, Host: "test", Started: time.Now().UTC()}
	w.gossip, err = cluster.StartGossip(testCtx(t), cluster.GossipConfig{Name: id, BindAddr: "127.0.0.1", Meta: m.GossipMeta(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.gossip.Close() })
	m.Gossip = w.gossip.Addr()
	w.member = m
	w.reg = w.followAs(t, w.cl, m, ttl)
	return w
}

// crash stops the worker as a killed process stops: no gossip leave, no deregistration.
func (w *gossipWorker) crash(t *testing.T) {
	t.Helper()
	if err := w.gossip.Close(); err != nil {
		t.Fatal(err)
	}
	w.srv.Stop()
	if err := w.cl.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestGossipWorkerLost: at TP 1 three workers make three groups. One crashes; gossip reports it dead
// and the coordinator places the cluster without it within a couple of seconds, while its member key,
// under a 10 s lease, is still in etcd. The two groups left serve.
func TestGossipWorkerLost(t *testing.T) {
	const ttl = 10 * time.Second
	cl := clusterClient(t)
	var ws []*gossipWorker
	for i := range 3 {
		ws = append(ws, startGossipWorker(t, fmt.Sprintf("w%d", i), ttl))
	}
	cfg := testConfig(t)
	cfg.TP = 1
	c, cli := startCoordinator(t, cfg)
	waitReady(t, c)
	eventually(t, "three groups serving, four gossip nodes", func() bool {
		c.mu.Lock()
		groups := len(c.readyGroups)
		c.mu.Unlock()
		return groups == 3 && len(c.gossip.Members()) == 4
	})
	epoch := storedEpoch(t, cl)

	killed := time.Now()
	ws[1].crash(t)
	var replanned time.Duration
	eventually(t, "a plan without w1", func() bool {
		p, _, err := cl.Plan(testCtx(t))
		if err != nil || p.Epoch == epoch {
			return false
		}
		replanned = time.Since(killed)
		var placed []string
		for _, g := range p.Groups {
			for _, a := range g.Ranks {
				placed = append(placed, a.MemberID)
			}
		}
		if !slices.Equal(placed, []string{"w0", "w2"}) {
			t.Fatalf("plan after w1's crash places %v, want [w0 w2]", placed)
		}
		return true
	})
	t.Logf("re-planned %v after the crash (lease TTL %v)", replanned.Round(time.Millisecond), ttl)
	if replanned > ttl/2 {
		t.Errorf("re-planned %v after the crash, want well within the %v lease", replanned, ttl)
	}
	ms, _, err := cl.Members(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(ms, func(m cluster.Member) bool { return m.ID == "w1" }) {
		t.Errorf("w1 left etcd before the re-plan was checked (%v after the crash): the lease, not gossip, may have done it", time.Since(killed))
	}
	eventually(t, "two groups serving", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.plan.Epoch > epoch && len(c.readyGroups) == 2
	})
	for i := range 4 {
		prompt := []int{100 + i}
		res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: prompt, MaxTokens: 3, Sampling: greedy()}, nil)
		if err != nil || !slices.Equal(res.IDs, echo(prompt, 3)) {
			t.Errorf("Generate after the crash = %+v, %v; want %v", res, err, echo(prompt, 3))
		}
	}
}

// TestGossipDead: a member is dead to placement while gossip's last word on its process (member ID and
// start time) is a leave; it comes back when the node rejoins or when it registers again (a new start
// time), and the node is forgotten once the member is no longer registered.
func TestGossipDead(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	w0 := cluster.Member{ID: "w0", Started: t0}
	w1 := cluster.Member{ID: "w1", Started: t0}
	w1again := cluster.Member{ID: "w1", Started: t0.Add(time.Minute)}
	c := &Coordinator{gossipDown: make(map[gossipNode]struct{}), gossipChanged: make(chan struct{}, 1)}
	dead := func(ms ...cluster.Member) []string {
		var ids []string
		for id := range c.gossipDead(ms) {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		return ids
	}
	for _, step := range []struct {
		name    string
		do      func()
		members []cluster.Member
		want    []string
	}{
		{"none", func() {}, []cluster.Member{w0, w1}, nil},
		{"w1 leaves", func() { c.gossipEvent(memberNode(w1), false) }, []cluster.Member{w0, w1}, []string{"w1"}},
		{"another coordinator leaves", func() { c.gossipEvent(gossipNode{"coordinator/b", ""}, false) }, []cluster.Member{w0, w1}, []string{"w1"}},
		{"w1 registers again", func() {}, []cluster.Member{w0, w1again}, nil},
		{"the old w1 comes back", func() { c.gossipEvent(memberNode(w1), true) }, []cluster.Member{w0, w1}, nil},
		{"w1 leaves again", func() { c.gossipEvent(memberNode(w1), false) }, []cluster.Member{w0, w1}, []string{"w1"}},
		{"w1's lease expires", func() { c.forgetGossip([]cluster.Member{w0}) }, []cluster.Member{w0, w1}, nil},
	} {
		step.do()
		if got := dead(step.members...); !slices.Equal(got, step.want) {
			t.Errorf("%s: gossipDead = %v, want %v", step.name, got, step.want)
		}
	}
	select {
	case <-c.gossipChanged:
	default:
		t.Errorf("gossip events did not wake the leader")
	}
}

// electionKeys returns the values of the keys in the test cluster's coordinator election, oldest first.
func electionKeys(t *testing.T) []string {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: testEndpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cli.Close() }()
	resp, err := cli.Get(testCtx(t), cluster.KeyRoot+clusterName(t)+"/leader/", clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, kv := range resp.Kvs {
		ids = append(ids, string(kv.Value))
	}
	return ids
}

// TestStandbyKeepsLiveLeader: with gossip, a standby holds no election key while a leader that gossip
// reports alive leads. When the leader's key and lease go while it lives (as when etcd returns from an
// outage longer than the leader's TTL and revokes the lapsed lease), the leader leads again and keeps
// serving its groups, and the standby does not lead. When the leader dies, the standby leads.
func TestStandbyKeepsLiveLeader(t *testing.T) {
	cl := clusterClient(t)
	for i := range 2 {
		startGossipWorker(t, fmt.Sprintf("w%d", i), 10*time.Second)
	}
	cfgA, cfgB := testConfig(t), testConfig(t)
	cfgA.ID, cfgB.ID = "a", "b"
	a, cliA := startCoordinator(t, cfgA)
	waitReady(t, a)
	b, _ := startCoordinator(t, cfgB)
	eventually(t, "the standby withdrawn from the election, gossip reporting the leader alive", func() bool {
		return slices.Equal(electionKeys(t), []string{"a"}) && slices.Contains(b.gossip.Members(), gossipNodeName("a"))
	})
	epoch := storedEpoch(t, cl)

	// The leader's key and lease go while it lives.
	if ok, err := cl.Depose(testCtx(t), "a"); err != nil || !ok {
		t.Fatalf("Depose(a) = %v, %v; want true, nil", ok, err)
	}
	eventually(t, "the live leader leading again", func() bool { return slices.Equal(electionKeys(t), []string{"a"}) })
	for _, c := range []struct {
		name   string
		c      *Coordinator
		leader bool
	}{{"a", a, true}, {"b", b, false}} {
		c.c.mu.Lock()
		leader, groups := c.c.leader, len(c.c.readyGroups)
		c.c.mu.Unlock()
		if leader != c.leader || (leader && groups != 1) {
			t.Errorf("coordinator %s after the leader's lease went: leader %v, %d groups serving; want leader %v", c.name, leader, groups, c.leader)
		}
	}
	if e := storedEpoch(t, cl); e != epoch {
		t.Errorf("epoch after the leader's lease went = %d, want %d (the plan kept)", e, epoch)
	}
	prompt := []int{7}
	if res, err := cliA.Generate(testCtx(t), client.GenerateRequest{PromptIDs: prompt, MaxTokens: 3, Sampling: greedy()}, nil); err != nil || !slices.Equal(res.IDs, echo(prompt, 3)) {
		t.Errorf("Generate on the leader after its lease went = %+v, %v; want %v", res, err, echo(prompt, 3))
	}

	// The leader dies as a killed process does: its gossip node stops without leaving, and its etcd
	// client closes without resigning. The standby leads.
	died := time.Now()
	if err := a.gossip.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.cl.Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the standby leading", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.leader
	})
	t.Logf("the standby leads %v after the leader's gossip node stopped", time.Since(died).Round(time.Millisecond))
}

// TestLapsedWorkerKept: a planned worker whose member lease is revoked while it lives (as etcd revokes
// leases that lapsed during an outage) and that registers again keeps its place: no new epoch.
func TestLapsedWorkerKept(t *testing.T) {
	cl := clusterClient(t)
	var ws []*gossipWorker
	for i := range 2 {
		ws = append(ws, startGossipWorker(t, fmt.Sprintf("w%d", i), 10*time.Second))
	}
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)
	eventually(t, "three gossip nodes", func() bool { return len(c.gossip.Members()) == 3 })
	epoch := storedEpoch(t, cl)

	etcd, err := clientv3.New(clientv3.Config{Endpoints: testEndpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = etcd.Close() }()
	if _, err := etcd.Revoke(testCtx(t), ws[1].reg.Lease()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "w1 not registered", func() bool {
		ms, _, err := cl.Members(testCtx(t))
		return err == nil && !slices.ContainsFunc(ms, func(m cluster.Member) bool { return m.ID == "w1" })
	})
	// Longer than the coordinator's settle (20 ms) and shorter than reregisterGrace: the worker's
	// keep-alive finds its lease gone and registers again.
	time.Sleep(500 * time.Millisecond)
	reg, err := ws[1].cl.Register(testCtx(t), ws[1].member, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Close(context.Background()) })
	prompt := []int{9}
	if res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: prompt, MaxTokens: 3, Sampling: greedy()}, nil); err != nil || !slices.Equal(res.IDs, echo(prompt, 3)) {
		t.Errorf("Generate after w1 registered again = %+v, %v; want %v", res, err, echo(prompt, 3))
	}
	if e := storedEpoch(t, cl); e != epoch {
		t.Errorf("epoch after w1's lease was revoked and it registered again = %d, want %d (the plan kept)", e, epoch)
	}
}

// TestStandbyDeposesGoneLeader: when the leader's gRPC server is gone (a killed process's sockets close)
// the standby deposes it and leads at once, although gossip still reports the leader's node alive and
// its lease is kept alive: the standby's health Watch stream ended and the address refuses connections.
// With TLS too: the standby dials the leader as a coordinator, not with the workers' dialer.
func TestStandbyDeposesGoneLeader(t *testing.T) {
	for _, withTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "plaintext", true: "tls"}[withTLS], func(t *testing.T) {
			cfgA, cfgB := testConfig(t), testConfig(t)
			var opts []grpc.ServerOption
			if withTLS {
				certs := securitytest.CertsFor(t, cfgA.Etcd.Cluster)
				opts = append(opts, grpc.Creds(credentials.NewTLS(certs.Load(t, "worker").ServerConfig(true))))
				cfgA.TLS, cfgB.TLS = certs.Load(t, "coordinator"), certs.Load(t, "coordinator")
			}
			for i := range 2 {
				startGossipWorker(t, fmt.Sprintf("w%d", i), 10*time.Second, opts...)
			}
			cfgA.ID, cfgB.ID = "a", "b"
			cfgA.LeaderTTL, cfgB.LeaderTTL = 10*time.Second, 10*time.Second
			a, _ := startCoordinator(t, cfgA)
			waitReady(t, a)
			b, _ := startCoordinator(t, cfgB)
			eventually(t, "the standby watching the leader's address", func() bool {
				_, addr := b.leaderAddr(testCtx(t))
				return addr == a.Addr()
			})
			time.Sleep(200 * time.Millisecond) // the watch stream opens
			gone := time.Now()
			a.srv.Stop() // closes the listener and the connections, as the kernel does for a killed process
			eventually(t, "the standby leading", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return b.leader
			})
			took := time.Since(gone)
			t.Logf("the standby leads %v after the leader's gRPC server stopped", took.Round(time.Millisecond))
			if !slices.Contains(b.gossip.Members(), gossipNodeName("a")) {
				t.Errorf("gossip no longer lists the old leader's node: the take-over may be gossip's doing, not the watch's")
			}
			if took > 5*time.Second {
				t.Errorf("the standby led %v after the leader's server stopped, want well within the 10 s lease", took)
			}
		})
	}
}
