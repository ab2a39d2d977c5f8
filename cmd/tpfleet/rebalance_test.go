package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// TestRebalance: on `tpfleet serve` (TLS, an API key and an admin key) with two TP=1 replicas, `tpfleet
// rebalance` is refused to a client certificate with no token or the API key (PERMISSION_DENIED) and a
// wrong token (UNAUTHENTICATED); with the admin key, `tpfleet rebalance --tp 2` writes the next epoch
// with one TP=2 group, and requests still return the fixture's greedy ids.
func TestRebalance(t *testing.T) {
	g := readGolden(t, "moe-top1")
	certs := withTLS(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ := startServe(t, ctx, append([]string{"--model", filepath.Join(fixtures, "moe-top1"), "--tp", "1", "--workers", "2",
		"--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--log-level", "warn", "--api-key", testAPIKey, "--admin-key", "adm-test-2b7c"},
		certs.Args("node")...)...)
	cli := waitCoordinator(t, addr)
	before, err := cli.Shards(ctx)
	if err != nil || before.TP != 1 || len(before.Assignments) != 2 {
		t.Fatalf("Shards before = %+v, %v; want tp 1 with two workers", before, err)
	}
	// A client's certificate: the admin key opens the Admin API, nothing else does.
	for _, kv := range certs.Env("client") {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	for _, tc := range []struct{ token, want string }{{"", "PermissionDenied"}, {testAPIKey, "PermissionDenied"}, {"adm-wrong", "Unauthenticated"}} {
		if exit, _, errOut := tpfleet(t, "rebalance", "--addr", addr, "--tp", "2", "--token", tc.token); exit != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("rebalance with a client certificate and token %q = exit %d, %q; want 1 and %s", tc.token, exit, errOut, tc.want)
		}
	}
	exit, stdout, errOut := tpfleet(t, "rebalance", "--addr", addr, "--tp", "2", "--json", "--token", "adm-test-2b7c")
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

	if exit, _, errOut := tpfleet(t, "rebalance", "--addr", addr, "--tp", "3", "--token", "adm-test-2b7c"); exit != 1 || !strings.Contains(errOut, "3") {
		t.Errorf("rebalance --tp 3 with two workers = exit %d, %q; want a one-line failure", exit, errOut)
	}
	if exit, _, errOut := tpfleet(t, "rebalance", "--tp", "-1"); exit != 2 || !strings.Contains(errOut, "--tp -1") {
		t.Errorf("rebalance --tp -1 = exit %d, %q; want a usage error", exit, errOut)
	}
	cancel()
	<-code
}
