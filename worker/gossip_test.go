package worker_test

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

// TestGossip: a worker runs a gossip node named after its member ID, on the host of its gRPC listener,
// and registers its address, with its start time as the node's meta; a node that joins it (as the
// coordinator does) sees it, and hears at once when the worker closes. With NoGossip the member has no
// gossip address.
func TestGossip(t *testing.T) {
	e := startEtcd(t)
	cli := newClient(t, e)
	w := startWorker(t, testConfig(t, e, "w-gossip"))
	cfg := testConfig(t, e, "w-quiet")
	cfg.NoGossip = true
	startWorker(t, cfg)

	ms, _, err := cli.Members(testCtx(t))
	if err != nil || len(ms) != 2 {
		t.Fatalf("Members() = %v, %v; want two", ms, err)
	}
	m, quiet := ms[0], ms[1]
	if !strings.HasPrefix(m.Gossip, "127.0.0.1:") || m.Started.IsZero() {
		t.Fatalf("member %s: gossip %q, started %v; want a loopback gossip address and a start time", m.ID, m.Gossip, m.Started)
	}
	if quiet.Gossip != "" {
		t.Errorf("member %s with NoGossip: gossip %q, want none", quiet.ID, quiet.Gossip)
	}

	var mu sync.Mutex
	joined := map[string]string{}
	left := map[string]bool{}
	g, err := cluster.StartGossip(testCtx(t), cluster.GossipConfig{
		Name:     "test-coordinator",
		BindAddr: "127.0.0.1",
		Join:     []string{m.Gossip},
		Logger:   zap.NewNop(),
		OnJoin: func(name string, meta []byte) {
			mu.Lock()
			defer mu.Unlock()
			joined[name] = string(meta)
		},
		OnLeave: func(name string, _ []byte) {
			mu.Lock()
			defer mu.Unlock()
			left[name] = true
		},
	})
	if err != nil {
		t.Fatalf("StartGossip joining %s: %v", m.Gossip, err)
	}
	t.Cleanup(func() { _ = g.Close() })
	eventually(t, 5*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if got, want := joined["w-gossip"], string(m.GossipMeta()); got != want {
			return errors.New("w-gossip not joined with its start time as meta: " + got + ", want " + want)
		}
		return nil
	})

	start := time.Now()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if !left["w-gossip"] {
			return errors.New("no leave of w-gossip")
		}
		return nil
	})
	t.Logf("gossip leave heard %v after Close began", time.Since(start).Round(time.Millisecond))
}
