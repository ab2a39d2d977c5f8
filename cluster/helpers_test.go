package cluster_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

// testTimeout bounds every test's context.
const testTimeout = 30 * time.Second

// testCtx returns a context that ends with the test or after testTimeout.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// startEtcd starts an embedded etcd on loopback ports picked by the kernel, with raft timings short
// enough for 1 s leases, and closes it when the test ends.
func startEtcd(t *testing.T) *cluster.Embedded {
	t.Helper()
	e, err := cluster.StartEmbedded(testCtx(t), cluster.EmbedConfig{
		Dir:               t.TempDir(),
		ClientAddr:        "127.0.0.1:0",
		PeerAddr:          "127.0.0.1:0",
		Logger:            zap.NewNop(),
		ReadyTimeout:      20 * time.Second,
		HeartbeatInterval: 50 * time.Millisecond,
		ElectionTimeout:   500 * time.Millisecond,
		UnsafeNoFsync:     true,
	})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// newClient connects to e under the cluster name and closes the client when the test ends.
func newClient(t *testing.T, e *cluster.Embedded, name string) *cluster.Client {
	t.Helper()
	c, err := cluster.New(testCtx(t), cluster.Config{Endpoints: e.Endpoints(), Cluster: name, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("New(%v): %v", e.Endpoints(), err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// eventually calls check until it returns nil, failing the test with check's last error after
// timeout. It polls every 10 ms: a retry loop, not a synchronising sleep.
func eventually(t *testing.T, timeout time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v: %v", timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// recvUntil receives from ch until ok accepts a value, and returns it; it fails the test when ch
// closes or timeout passes first.
func recvUntil[T any](t *testing.T, ch <-chan T, timeout time.Duration, what string, ok func(T) bool) T {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var last T
	for {
		select {
		case v, open := <-ch:
			if !open {
				t.Fatalf("%s: channel closed; last value %+v", what, last)
			}
			if ok(v) {
				return v
			}
			last = v
		case <-timer.C:
			t.Fatalf("%s: not received within %v; last value %+v", what, timeout, last)
		}
	}
}

// ids returns the member IDs of ms.
func ids(ms []cluster.Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// worker returns a valid Member with the given ID.
func worker(id string, port int) cluster.Member {
	return cluster.Member{
		ID:   id,
		Addr: fmt.Sprintf("127.0.0.1:%d", port),
		Host: "test-host",
		Devices: []cluster.Device{
			{Kind: cluster.DeviceCUDA, Index: 0, Name: "NVIDIA H100 80GB HBM3", MemoryTotal: 80 << 30, MemoryFree: 79 << 30},
		},
		Labels: map[string]string{"zone": "a"},
	}
}
