package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServe: `tpfleet serve --tp 2 --workers 4` runs an etcd, a coordinator and four workers (two
// replicas) in one process; concurrent requests return the fixture's greedy ids; when its context ends
// (SIGINT, SIGTERM) it shuts down cleanly and exits 0.
func TestServe(t *testing.T) {
	start := time.Now()
	g := readGolden(t, "moe-top1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, stderr := startServe(t, ctx, "--model", filepath.Join(fixtures, "moe-top1"), "--tp", "2", "--workers", "4",
		"--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--log-level", "warn")
	cli := waitCoordinator(t, addr)
	t.Logf("serving after %v", time.Since(start).Round(time.Millisecond))
	generateConcurrently(t, addr, g, 8)
	if sh, err := cli.Shards(ctx); err != nil || sh.TP != 2 || len(sh.Assignments) != 4 {
		t.Errorf("Shards = %+v, %v; want tp 2, four workers placed", sh, err)
	}
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d after its context ended, want 0:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s of its context ending")
	}
	if s := stderr.String(); strings.Contains(s, "ERROR") || strings.Contains(s, "panic") {
		t.Errorf("serve logged errors:\n%s", s)
	}
}

// startServe runs `tpfleet serve args...` in this process until ctx ends and returns the address it prints
// first (the coordinator's), its exit status channel and its stderr.
func startServe(t *testing.T, ctx context.Context, args ...string) (string, <-chan int, *lockedBuffer) {
	t.Helper()
	lines, code, stderr := runInProcess(ctx, append([]string{"serve"}, args...)...)
	select {
	case addr := <-lines:
		return addr, code, stderr
	case c := <-code:
		t.Fatalf("serve exited %d before printing its address:\n%s", c, stderr)
	case <-time.After(30 * time.Second):
		t.Fatal("serve printed no address within 30s")
	}
	return "", nil, nil
}

func TestServeFlags(t *testing.T) {
	model := filepath.Join(fixtures, "moe-top1")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"serve"}, 2, "--model is required"},
		{[]string{"serve", "--model", model, "--tp", "2", "--workers", "1"}, 2, "fewer than --tp"},
		{[]string{"serve", "--model", model, "--device", "tpu"}, 2, "want cpu or cuda"},
		{[]string{"serve", "--model", model, "--tp", "3", "--listen", "127.0.0.1:0"}, 1, "TP 3"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("tpfleet %s = exit %d, %q; want %d with %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}
