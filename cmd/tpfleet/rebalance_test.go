package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// TestRebalance: on `tpfleet serve` with two TP=1 replicas, `tpfleet rebalance --tp 2` writes the next
// epoch with one TP=2 group, and requests still return the fixture's greedy ids.
func TestRebalance(t *testing.T) {
	g := readGolden(t, "moe-top1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ := startServe(t, ctx, "--model", filepath.Join(fixtures, "moe-top1"), "--tp", "1", "--workers", "2",
		"--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--log-level", "warn")
	cli := waitCoordinator(t, addr)
	before, err := cli.Shards(ctx)
	if err != nil || before.TP != 1 || len(before.Assignments) != 2 {
		t.Fatalf("Shards before = %+v, %v; want tp 1 with two workers", before, err)
	}
	exit, stdout, errOut := tpfleet(t, "rebalance", "--addr", addr, "--tp", "2", "--json")
	var out struct {
		Epoch  int64 `json:"epoch"`
		Shards struct {
			TP          int
			Assignments []struct{ Group, Rank int }
		} `json:"shards"`
	}
	if exit != 0 || json.Unmarshal([]byte(stdout), &out) != nil {
		t.Fatalf("rebalance = exit %d, %q, %q", exit, stdout, errOut)
	}
	if out.Epoch != before.Epoch+1 || out.Shards.TP != 2 || len(out.Shards.Assignments) != 2 {
		t.Errorf("rebalance --tp 2 = %+v, want epoch %d with one TP=2 group", out, before.Epoch+1)
	}
	generateConcurrently(t, addr, g, 2)

	if exit, _, errOut := tpfleet(t, "rebalance", "--addr", addr, "--tp", "3"); exit != 1 || !strings.Contains(errOut, "3") {
		t.Errorf("rebalance --tp 3 with two workers = exit %d, %q; want a one-line failure", exit, errOut)
	}
	if exit, _, errOut := tpfleet(t, "rebalance", "--tp", "-1"); exit != 2 || !strings.Contains(errOut, "--tp -1") {
		t.Errorf("rebalance --tp -1 = exit %d, %q; want a usage error", exit, errOut)
	}
	cancel()
	<-code
}
