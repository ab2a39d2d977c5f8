package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
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
		Epoch       int64 `json:"epoch"`
		TP          int   `json:"tp"`
		Assignments []struct {
			Group int `json:"group"`
			Rank  int `json:"rank"`
		} `json:"assignments"`
	}
	if exit != 0 || json.Unmarshal([]byte(stdout), &out) != nil {
		t.Fatalf("rebalance = exit %d, %q, %q", exit, stdout, errOut)
	}
	if out.Epoch != before.Epoch+1 || out.TP != 2 || len(out.Assignments) != 2 {
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

// updateGolden rewrites the golden files of the tests that have them instead of comparing.
var updateGolden = flag.Bool("update", false, "rewrite testdata/*.golden")

// TestRebalanceDryRunGolden: on `tpfleet serve` with two TP=2 groups of moe-top1, `rebalance --dry-run`
// prints, per worker, the tensors a switch would load, keep and drop (tp → ep keeps the attention and the
// unsplit tensors; a drain moves one rank; one replica idles a group), and changes nothing; bad commands
// fail with one clear line and leave the plan as it is.
func TestRebalanceDryRunGolden(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ := startServe(t, ctx, "--model", filepath.Join(fixtures, "moe-top1"), "--tp", "2", "--workers", "5",
		"--http-listen", "", "--listen", "127.0.0.1:0", "--log-level", "warn")
	cli := waitCoordinator(t, addr)
	waitFor(t, 60*time.Second, "two groups of two", func() bool {
		sh, err := cli.Shards(ctx)
		return err == nil && len(sh.Assignments) == 4
	})
	pid := fmt.Sprintf("serve-%d-", os.Getpid())
	w := func(i int) string { return fmt.Sprintf("%sw%03d", pid, i) }
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"layers.*.self_attn.q_proj": colwise}`), 0o644); err != nil {
		t.Fatal(err)
	}
	var got strings.Builder
	for _, args := range [][]string{
		{"--plan", "ep"},
		{"--drain", w(1)},
		{"--replicas", "1"},
		{"--tp", "1"},
	} {
		exit, stdout, errOut := tpfleet(t, append([]string{"rebalance", "--addr", addr, "--dry-run"}, args...)...)
		if exit != 0 {
			t.Fatalf("rebalance --dry-run %v = exit %d, %q", args, exit, errOut)
		}
		fmt.Fprintf(&got, "$ tpfleet rebalance --dry-run %s\n%s\n", strings.Join(args, " "), stdout)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tp", "3"}, "TP 3"},
		{[]string{"--drain", "nobody"}, "drain nobody: no such worker"},
		{[]string{"--undrain", w(2)}, "not drained"},
		{[]string{"--plan", bad}, "bad.json"},
		{[]string{"--plan", "nosuchplan"}, "nosuchplan"},
	} {
		exit, _, errOut := tpfleet(t, append([]string{"rebalance", "--addr", addr}, tc.args...)...)
		if exit != 1 || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") > 0 {
			t.Errorf("rebalance %v = exit %d, %q; want exit 1 and one line with %q", tc.args, exit, errOut, tc.want)
		}
		fmt.Fprintf(&got, "$ tpfleet rebalance %s\n%s\n", strings.Join(tc.args, " "), errOut)
	}
	// The plan is as it was (its epoch may have moved on under a loaded machine, where a slow step fails
	// an epoch and the coordinator writes the same placement again).
	after, err := cli.Shards(ctx)
	if err != nil || after.TP != 2 || after.Plan != "tp" || len(after.Assignments) != 4 {
		t.Errorf("plan after dry runs and bad commands = %+v, %v; want tp 2, plan tp, two groups (unchanged)", after, err)
	}
	cancel()
	<-code

	// Draining the last worker of a one-worker cluster.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ = startServe(t, ctx, "--model", filepath.Join(fixtures, "moe-top1"), "--tp", "1", "--workers", "1",
		"--http-listen", "", "--listen", "127.0.0.1:0", "--log-level", "warn")
	waitCoordinator(t, addr)
	exit, _, errOut := tpfleet(t, "rebalance", "--addr", addr, "--drain", w(0))
	if exit != 1 || !strings.Contains(errOut, "would place no TP group") {
		t.Errorf("rebalance --drain of the last worker = exit %d, %q; want a failure saying no group would be placed", exit, errOut)
	}
	fmt.Fprintf(&got, "$ tpfleet rebalance --drain %s # the only worker\n%s\n", w(0), errOut)
	cancel()
	<-code

	text := strings.ReplaceAll(got.String(), pid, "serve-PID-")
	text = regexp.MustCompile(`via 127\.0\.0\.1:\d+`).ReplaceAllString(text, "via ADDR")
	text = regexp.MustCompile(`epoch \d+ would be`).ReplaceAllString(text, "epoch N would be")
	text = strings.ReplaceAll(text, bad, "BAD")
	golden := filepath.Join("testdata", "rebalance-dry-run.golden")
	if *updateGolden {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(golden, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (go test -run TestRebalanceDryRunGolden -update writes it)", err)
	}
	// The member IDs carry this process's pid, whose length moves the table's columns: compare the words.
	collapse := func(s string) string {
		lines := strings.Split(s, "\n")
		for i, l := range lines {
			lines[i] = strings.Join(strings.Fields(l), " ")
		}
		return strings.Join(lines, "\n")
	}
	if collapse(text) != collapse(string(want)) {
		t.Errorf("rebalance --dry-run output differs from %s:\n--- got\n%s\n--- want\n%s", golden, text, want)
	}
}
