package cluster_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

// events records a gossip node's callbacks; the callbacks run on the node's goroutine.
type events struct {
	mu     sync.Mutex
	joined map[string][]byte
	left   map[string]time.Time
}

func (e *events) onJoin(name string, meta []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.joined[name] = meta
}

func (e *events) onLeave(name string, _ []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.left[name] = time.Now()
}

func (e *events) hasJoined(name string) ([]byte, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	m, ok := e.joined[name]
	return m, ok
}

func (e *events) leftAt(name string) (time.Time, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	at, ok := e.left[name]
	return at, ok
}

// startNode starts a gossip node on loopback with test probe timings.
func startNode(t *testing.T, name string, join []string, ev *events) *cluster.Gossip {
	t.Helper()
	g, err := cluster.StartGossip(testCtx(t), cluster.GossipConfig{
		Name:          name,
		BindAddr:      "127.0.0.1",
		Join:          join,
		Meta:          []byte("grpc=" + name),
		Logger:        zap.NewNop(),
		OnJoin:        ev.onJoin,
		OnLeave:       ev.onLeave,
		ProbeInterval: 200 * time.Millisecond,
		ProbeTimeout:  100 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("StartGossip(%s): %v", name, err)
	}
	t.Cleanup(func() { _ = g.Close() })
	return g
}

func TestGossip(t *testing.T) {
	t.Parallel()
	names := []string{"node-0", "node-1", "node-2"}
	evs := make([]*events, len(names))
	nodes := make([]*cluster.Gossip, len(names))
	for i, name := range names {
		evs[i] = &events{joined: map[string][]byte{}, left: map[string]time.Time{}}
		var join []string
		if i > 0 {
			join = []string{nodes[0].Addr()}
		}
		nodes[i] = startNode(t, name, join, evs[i])
	}
	eventually(t, 10*time.Second, func() error {
		for i, g := range nodes {
			if got := g.Members(); !slices.Equal(got, names) {
				return fmt.Errorf("%s: Members() = %v, want %v", names[i], got, names)
			}
			for _, other := range names {
				if meta, ok := evs[i].hasJoined(other); !ok || string(meta) != "grpc="+other {
					return fmt.Errorf("%s: OnJoin(%s) = %q, %v, want its meta", names[i], other, meta, ok)
				}
			}
		}
		return nil
	})

	// Kill node-2: shut down without leaving, as a crashed process would.
	killed := time.Now()
	if err := nodes[2].Close(); err != nil {
		t.Fatalf("Close(node-2): %v", err)
	}
	eventually(t, 5*time.Second, func() error {
		for i := range 2 {
			if _, ok := evs[i].leftAt("node-2"); !ok {
				return fmt.Errorf("%s has not reported node-2 gone", names[i])
			}
		}
		return nil
	})
	for i := range 2 {
		at, _ := evs[i].leftAt("node-2")
		t.Logf("%s: OnLeave(node-2) %v after the kill", names[i], at.Sub(killed).Round(time.Millisecond))
		if got := nodes[i].Members(); !slices.Equal(got, names[:2]) {
			t.Errorf("%s: Members() = %v, want %v", names[i], got, names[:2])
		}
	}

	// node-1 leaves gracefully: node-0 hears at once, without failure detection.
	left := time.Now()
	if err := nodes[1].Leave(2 * time.Second); err != nil {
		t.Fatalf("Leave(node-1): %v", err)
	}
	_ = nodes[1].Close()
	eventually(t, 5*time.Second, func() error {
		if _, ok := evs[0].leftAt("node-1"); !ok {
			return errors.New("node-0 has not reported node-1 gone")
		}
		return nil
	})
	at, _ := evs[0].leftAt("node-1")
	t.Logf("node-0: OnLeave(node-1) %v after its Leave", at.Sub(left).Round(time.Millisecond))
}

func TestGossipConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  cluster.GossipConfig
		ok   bool
	}{
		{"minimal", cluster.GossipConfig{Name: "n"}, true},
		{"no name", cluster.GossipConfig{}, false},
		{"bad bind addr", cluster.GossipConfig{Name: "n", BindAddr: "localhost"}, false},
		{"bad port", cluster.GossipConfig{Name: "n", BindPort: 70000}, false},
		{"meta too big", cluster.GossipConfig{Name: "n", Meta: make([]byte, 513)}, false},
		{"timeout above interval", cluster.GossipConfig{Name: "n", ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 200 * time.Millisecond}, false},
		{"bad join", cluster.GossipConfig{Name: "n", Join: []string{"no-port"}}, false},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, cluster.ErrInvalid)) {
			t.Errorf("%s: Validate() = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestGossipJoinFails(t *testing.T) {
	t.Parallel()
	ev := &events{joined: map[string][]byte{}, left: map[string]time.Time{}}
	lone := startNode(t, "lone", nil, ev)
	addr := lone.Addr()
	_ = lone.Close()
	_, err := cluster.StartGossip(testCtx(t), cluster.GossipConfig{Name: "late", BindAddr: "127.0.0.1", Join: []string{addr}, Logger: zap.NewNop()})
	if err == nil {
		t.Fatalf("StartGossip joining a closed node %s = nil error, want failure", addr)
	}
}

// TestGossipJoinReclaim: nodes started apart are merged by Join; a node that dies and comes back
// under its name at another address (a worker restarted with a fixed ID) is reported joined again.
func TestGossipJoinReclaim(t *testing.T) {
	t.Parallel()
	newEvents := func() *events { return &events{joined: map[string][]byte{}, left: map[string]time.Time{}} }
	evA := newEvents()
	a := startNode(t, "a", nil, evA)
	b := startNode(t, "b", nil, newEvents())
	c := startNode(t, "c", nil, newEvents())
	if n, err := a.Join(testCtx(t), []string{b.Addr(), c.Addr()}); n != 2 || err != nil {
		t.Fatalf("Join(b, c) = %d, %v, want 2, nil", n, err)
	}
	want := []string{"a", "b", "c"}
	eventually(t, 10*time.Second, func() error {
		for _, g := range []*cluster.Gossip{a, b, c} {
			if got := g.Members(); !slices.Equal(got, want) {
				return fmt.Errorf("Members() = %v, want %v", got, want)
			}
		}
		return nil
	})

	// c crashes; a new process named c starts elsewhere and is joined.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, func() error {
		if _, ok := evA.leftAt("c"); !ok {
			return errors.New("a has not reported c gone")
		}
		return nil
	})
	evA.mu.Lock()
	delete(evA.joined, "c")
	evA.mu.Unlock()
	c2 := startNode(t, "c", nil, newEvents())
	if n, err := a.Join(testCtx(t), []string{c2.Addr()}); n != 1 || err != nil {
		t.Fatalf("Join(new c at %s) = %d, %v, want 1, nil", c2.Addr(), n, err)
	}
	eventually(t, 5*time.Second, func() error {
		if _, ok := evA.hasJoined("c"); !ok || !slices.Equal(a.Members(), want) {
			return fmt.Errorf("a: new c not joined; Members() = %v", a.Members())
		}
		return nil
	})

	// Errors: an address without a port, a node that does not answer, a closed node.
	if _, err := a.Join(testCtx(t), []string{"127.0.0.1"}); !errors.Is(err, cluster.ErrInvalid) {
		t.Errorf("Join(no port) = %v, want ErrInvalid", err)
	}
	gone := startNode(t, "gone", nil, newEvents())
	addr := gone.Addr()
	_ = gone.Close()
	if n, err := a.Join(testCtx(t), []string{addr, b.Addr()}); n != 1 || err == nil || !strings.Contains(err.Error(), addr) {
		t.Errorf("Join(closed node, b) = %d, %v, want 1 and an error naming %s", n, err, addr)
	}
	_ = b.Close()
	if _, err := b.Join(testCtx(t), []string{a.Addr()}); !errors.Is(err, cluster.ErrClosed) {
		t.Errorf("Join after Close = %v, want ErrClosed", err)
	}
}
