package cluster_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  cluster.Config
		ok   bool
	}{
		{"minimal", cluster.Config{Endpoints: []string{"http://127.0.0.1:2379"}}, true},
		{"named", cluster.Config{Endpoints: []string{"a:1", "b:2"}, Cluster: "prod-1.eu", DialTimeout: time.Second}, true},
		{"no endpoints", cluster.Config{}, false},
		{"blank endpoint", cluster.Config{Endpoints: []string{" "}}, false},
		{"slash in cluster", cluster.Config{Endpoints: []string{"a:1"}, Cluster: "a/b"}, false},
		{"leading dot", cluster.Config{Endpoints: []string{"a:1"}, Cluster: ".x"}, false},
		{"negative timeout", cluster.Config{Endpoints: []string{"a:1"}, DialTimeout: -1}, false},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, cluster.ErrInvalid)) {
			t.Errorf("%s: Validate(%+v) = %v, want ok=%v", tt.name, tt.cfg, err, tt.ok)
		}
	}
}

func TestMemberValidate(t *testing.T) {
	t.Parallel()
	good := worker("w-1", 7001)
	bad := func(f func(*cluster.Member)) cluster.Member {
		m := worker("w-1", 7001)
		f(&m)
		return m
	}
	tests := []struct {
		name string
		m    cluster.Member
		ok   bool
	}{
		{"good", good, true},
		{"no devices", bad(func(m *cluster.Member) { m.Devices = nil }), true},
		{"empty ID", bad(func(m *cluster.Member) { m.ID = "" }), false},
		{"slash in ID", bad(func(m *cluster.Member) { m.ID = "a/b" }), false},
		{"no port", bad(func(m *cluster.Member) { m.Addr = "127.0.0.1" }), false},
		{"gossip address", bad(func(m *cluster.Member) { m.Gossip = "127.0.0.1:7946" }), true},
		{"gossip without port", bad(func(m *cluster.Member) { m.Gossip = "127.0.0.1" }), false},
		{"another backend's device kind", bad(func(m *cluster.Member) { m.Devices[0].Kind = "rocm" }), true},
		{"empty device kind", bad(func(m *cluster.Member) { m.Devices[0].Kind = "" }), false},
		{"slash in device kind", bad(func(m *cluster.Member) { m.Devices[0].Kind = "a/b" }), false},
		{"device index", bad(func(m *cluster.Member) { m.Devices[0].Index = -1 }), false},
		{"device memory", bad(func(m *cluster.Member) { m.Devices[0].MemoryFree = -1 }), false},
	}
	for _, tt := range tests {
		err := tt.m.Validate()
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, cluster.ErrInvalid)) {
			t.Errorf("%s: Validate() = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestNewUnreachable(t *testing.T) {
	t.Parallel()
	// Nothing listens on port 1 of loopback: the probe read must time out.
	ep := "http://127.0.0.1:1"
	start := time.Now()
	c, err := cluster.New(testCtx(t), cluster.Config{Endpoints: []string{ep}, DialTimeout: 300 * time.Millisecond, Logger: zap.NewNop()})
	if err == nil {
		_ = c.Close()
		t.Fatalf("New(%s) = nil error, want ErrUnavailable", ep)
	}
	if !errors.Is(err, cluster.ErrUnavailable) || !strings.Contains(err.Error(), ep) {
		t.Errorf("New(%s) = %v, want ErrUnavailable naming the endpoint", ep, err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("New(%s) took %v, want about the 300ms dial timeout", ep, d)
	}
}

func TestRegisterMembers(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "reg")
	ctx := testCtx(t)

	watch := c.WatchMembers(ctx)
	recvUntil(t, watch, 10*time.Second, "initial empty list", func(ms []cluster.Member) bool { return len(ms) == 0 })

	w2 := worker("w-2", 7002)
	w2.Gossip = "127.0.0.1:8002"
	r1, err := c.Register(ctx, w2, 5*time.Second)
	if err != nil {
		t.Fatalf("Register(w-2): %v", err)
	}
	r0, err := c.Register(ctx, worker("w-1", 7001), 5*time.Second)
	if err != nil {
		t.Fatalf("Register(w-1): %v", err)
	}
	ms, rev, err := c.Members(ctx)
	if err != nil || rev <= 0 || !slices.Equal(ids(ms), []string{"w-1", "w-2"}) {
		t.Fatalf("Members() = %v, %d, %v, want [w-1 w-2] sorted", ids(ms), rev, err)
	}
	if got := ms[0]; got.Addr != "127.0.0.1:7001" || got.Started.IsZero() || len(got.Devices) != 1 || got.Labels["zone"] != "a" {
		t.Errorf("Members()[0] = %+v, want the registered fields and a start time", got)
	}
	if got := ms[1]; got.Gossip != "127.0.0.1:8002" {
		t.Errorf("Members()[1].Gossip = %q, want 127.0.0.1:8002", got.Gossip)
	}
	recvUntil(t, watch, 10*time.Second, "both members", func(ms []cluster.Member) bool {
		return slices.Equal(ids(ms), []string{"w-1", "w-2"})
	})

	// The same ID again, through another client: refused while the first lease lives.
	c2 := newClient(t, e, "reg")
	if r, err := c2.Register(ctx, worker("w-1", 7999), 5*time.Second); !errors.Is(err, cluster.ErrMemberExists) {
		if r != nil {
			_ = r.Close(ctx)
		}
		t.Fatalf("second Register(w-1) = %v, want ErrMemberExists", err)
	}

	// Update keeps the lease and changes the value.
	m := worker("w-1", 7001)
	m.Devices[0].MemoryFree = 1 << 30
	if err := r0.Update(ctx, m); err != nil {
		t.Fatalf("Update(w-1): %v", err)
	}
	recvUntil(t, watch, 10*time.Second, "updated free memory", func(ms []cluster.Member) bool {
		return len(ms) == 2 && ms[0].Devices[0].MemoryFree == 1<<30
	})
	if err := r0.Update(ctx, worker("w-other", 1)); !errors.Is(err, cluster.ErrInvalid) {
		t.Errorf("Update(other ID) = %v, want ErrInvalid", err)
	}

	// Close deregisters at once; watchers see the removal.
	if err := r1.Close(ctx); err != nil {
		t.Fatalf("Close(w-2): %v", err)
	}
	if err := r1.Close(ctx); err != nil {
		t.Errorf("second Close(w-2) = %v, want nil", err)
	}
	select {
	case <-r1.Done():
	default:
		t.Errorf("Done() of a closed registration is open")
	}
	recvUntil(t, watch, 10*time.Second, "w-2 removed", func(ms []cluster.Member) bool {
		return slices.Equal(ids(ms), []string{"w-1"})
	})
	if err := r1.Update(ctx, worker("w-2", 7002)); !errors.Is(err, cluster.ErrClosed) {
		t.Errorf("Update after Close = %v, want ErrClosed", err)
	}
	// The ID is free again.
	r2, err := c2.Register(ctx, worker("w-2", 7002), 5*time.Second)
	if err != nil {
		t.Fatalf("Register(w-2) after Close: %v", err)
	}
	_ = r2.Close(ctx)
}

// TestDeadWorker registers through a client that then closes without revoking, as a crashed worker
// would: the key must go when the lease expires.
func TestDeadWorker(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "dead")
	ctx := testCtx(t)
	watch := c.WatchMembers(ctx)

	dying := newClient(t, e, "dead")
	const ttl = time.Second
	reg, err := dying.Register(ctx, worker("w-dying", 7003), ttl)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	recvUntil(t, watch, 10*time.Second, "w-dying present", func(ms []cluster.Member) bool {
		return slices.Equal(ids(ms), []string{"w-dying"})
	})
	start := time.Now()
	if err := dying.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-reg.Done():
	default:
		t.Errorf("Registration.Done() open after its client closed")
	}
	const slack = 3 * time.Second // lease checks run every 500 ms; the last renewal may be TTL old
	recvUntil(t, watch, ttl+slack, "w-dying removed by lease expiry", func(ms []cluster.Member) bool { return len(ms) == 0 })
	t.Logf("dead worker's key removed %v after its client closed (TTL %v)", time.Since(start).Round(time.Millisecond), ttl)
	if err := reg.Close(ctx); !errors.Is(err, cluster.ErrClosed) {
		t.Errorf("Registration.Close after client Close = %v, want ErrClosed", err)
	}
}

func TestRegistrationLeaseRevoked(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "revoked")
	ctx := testCtx(t)
	reg, err := c.Register(ctx, worker("w-1", 7001), 5*time.Second)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	// Someone else revokes the lease (an operator with etcdctl lease revoke).
	if _, err := c.Etcd().Revoke(ctx, reg.Lease()); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	select {
	case <-reg.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("Done() not closed within 10s of the lease's revocation")
	}
	if err := reg.Update(ctx, worker("w-1", 7001)); !errors.Is(err, cluster.ErrLeaseLost) {
		t.Errorf("Update after revocation = %v, want ErrLeaseLost", err)
	}
	if err := reg.Close(ctx); err != nil {
		t.Errorf("Close after revocation = %v, want nil", err)
	}
}

// TestWatchMembersLatest checks the drop policy: a reader that does not read while members change
// still ends on the full list, and the channel closes with its context.
func TestWatchMembersLatest(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "latest")
	ctx := testCtx(t)
	wctx, cancel := context.WithCancel(ctx)
	watch := c.WatchMembers(wctx)
	want := []string{"w-0", "w-1", "w-2", "w-3", "w-4"}
	for i, id := range want {
		if _, err := c.Register(ctx, worker(id, 7000+i), 5*time.Second); err != nil {
			t.Fatalf("Register(%s): %v", id, err)
		}
	}
	recvUntil(t, watch, 10*time.Second, "all five", func(ms []cluster.Member) bool { return slices.Equal(ids(ms), want) })
	cancel()
	for range watch { // drains at most the one buffered list, then sees the close
	}
}

func TestClientClosed(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "closed")
	ctx := testCtx(t)
	watch := c.WatchPlan(ctx)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	if _, ok := <-watch; ok {
		t.Errorf("WatchPlan channel open after Close")
	}
	if _, _, err := c.Members(ctx); !errors.Is(err, cluster.ErrClosed) {
		t.Errorf("Members after Close = %v, want ErrClosed", err)
	}
	if _, err := c.Register(ctx, worker("w-1", 1), time.Second); !errors.Is(err, cluster.ErrClosed) {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
}

// TestGossipMeta: the meta of a member's gossip node survives the member's JSON in etcd, and tells
// two processes of one ID apart.
func TestGossipMeta(t *testing.T) {
	t.Parallel()
	m := worker("w-1", 7001)
	m.Started = time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.FixedZone("CET", 3600))
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var back cluster.Member
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatal(err)
	}
	if got, want := string(back.GossipMeta()), string(m.GossipMeta()); got != want {
		t.Errorf("GossipMeta() after a JSON round trip = %q, want %q", got, want)
	}
	if got, want := string(m.GossipMeta()), "2025-03-01T11:00:00.123456789Z"; got != want {
		t.Errorf("GossipMeta() = %q, want %q", got, want)
	}
	later := m
	later.Started = m.Started.Add(time.Millisecond)
	if string(later.GossipMeta()) == string(m.GossipMeta()) {
		t.Errorf("GossipMeta() of two start times is the same: %q", m.GossipMeta())
	}
}
