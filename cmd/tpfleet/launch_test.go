package main

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLaunchStandalone: `tpfleet launch --standalone --nproc-per-node 2 --model DIR --tp 2`, with TLS on
// (the node certificate, passed on to the workers) and an API key, serves on one box (an etcd and a
// coordinator in the launch process, two worker processes): 8 concurrent requests return the fixture's
// greedy ids, and its --http-listen gateway answers the OpenAI API over HTTPS; SIGTERM stops the group
// and launch exits 0.
func TestLaunchStandalone(t *testing.T) {
	start := time.Now()
	g := readGolden(t, "moe-top1")
	certs := withTLS(t)
	httpAddr := freePort(t)
	p := startProc(t, "launch", append(append([]string{"launch", "--standalone", "--nproc-per-node", "2", "--model", filepath.Join(fixtures, "moe-top1"),
		"--tp", "2", "--listen", "127.0.0.1:0", "--http-listen", httpAddr, "--api-key", testAPIKey}, certs.Args("node")...), "--", "worker", "--op-timeout", "20s")...)
	addr := p.line(t)
	waitCoordinator(t, addr)
	t.Logf("serving after %v", time.Since(start).Round(time.Millisecond))
	generateConcurrently(t, addr, g, 8)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: certs.Load(t, "client").ClientConfig()}, Timeout: 30 * time.Second}
	req, err := http.NewRequest(http.MethodPost, "https://"+httpAddr+"/v1/completions", strings.NewReader(`{"prompt":[1,2,3],"max_tokens":2,"return_token_ids":true}`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("POST /v1/completions to launch's gateway: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"token_ids"`) {
		t.Errorf("POST /v1/completions to launch's gateway = %d %s, want 200 with token_ids", resp.StatusCode, body)
	}
	stderr := p.stderr.String()
	for _, want := range []string{"[default0] ", "[default1] ", `"subcommand": "worker"`, "worker ready"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("launch's stderr has no %q", want)
		}
	}
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Errorf("launch after SIGTERM exited %d, want 0", code)
	}
	if !strings.Contains(p.stderr.String(), `"signal": "terminated"`) {
		t.Errorf("launch did not log forwarding SIGTERM")
	}
}

// TestLaunchRestartsGroup: a failing worker group is restarted --max-restarts times, each with
// TORCHELASTIC_RESTART_COUNT one higher, then launch fails naming the rank.
func TestLaunchRestartsGroup(t *testing.T) {
	// `score` with no flags fails at once with a usage error (exit 2).
	p := startProc(t, "launch", "launch", "--nproc-per-node", "2", "--max-restarts", "2", "--", "score")
	if code := p.wait(t, 30*time.Second); code != 1 {
		t.Errorf("launch of a failing group exited %d, want 1", code)
	}
	stderr := p.stderr.String()
	if n := strings.Count(stderr, "restarting the worker group"); n != 2 {
		t.Errorf("launch restarted the group %d times, want 2", n)
	}
	if !strings.Contains(stderr, "after 2 restart(s)") || !strings.Contains(stderr, `"restart": 2`) {
		t.Errorf("launch's stderr does not tell the restarts:\n%s", tail(stderr, 20))
	}
}

// TestLaunchEnvironment: each child gets torchrun's environment and the cluster's etcd.
func TestLaunchEnvironment(t *testing.T) {
	g := &localGroup{sub: "worker", args: []string{"--threads", "2"}, nproc: 4, nnodes: 2, nodeRank: 1, role: "default",
		master: [2]string{"10.0.0.1", "2379"}, etcd: "http://10.0.0.1:2379", cluster: "job7", runID: "job7", maxRest: 3}
	t.Setenv("OMP_NUM_THREADS", "")
	env := g.env(2, 1)
	want := map[string]string{
		"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
		"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "6", "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "8",
		"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2379",
		"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": "job7",
	}
	got := make(map[string]string)
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		got[k] = v // later entries win, as in exec
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("env %s = %q, want %q", k, got[k], v)
		}
	}
	if got["OMP_NUM_THREADS"] != "" {
		t.Errorf("OMP_NUM_THREADS = %q with the variable set (empty), want it kept", got["OMP_NUM_THREADS"])
	}
	args := g.childArgs()
	if args[0] != "worker" || !slices.Contains(args, "--etcd") || !slices.Contains(args, "job7") || !slices.Equal(args[len(args)-2:], []string{"--threads", "2"}) {
		t.Errorf("childArgs() = %v, want worker --etcd ... --cluster job7 ... then the user's --threads 2 last", args)
	}
	g.sub, g.args = "score", nil
	if args := g.childArgs(); !slices.Equal(args, []string{"score"}) {
		t.Errorf("childArgs() of score = %v, want [score]: only cluster commands get --etcd", args)
	}
}

// TestLaunchOMPThreads: OMP_NUM_THREADS=1 when unset and more than one process, as torchrun.
func TestLaunchOMPThreads(t *testing.T) {
	t.Setenv("OMP_NUM_THREADS", "") // restored when the test ends
	os.Unsetenv("OMP_NUM_THREADS")
	g := &localGroup{nproc: 2, nnodes: 1, role: "default"}
	if !slices.Contains(g.env(0, 0), "OMP_NUM_THREADS=1") {
		t.Errorf("env of 2 processes with OMP_NUM_THREADS unset has no OMP_NUM_THREADS=1")
	}
	g.nproc = 1
	if slices.Contains(g.env(0, 0), "OMP_NUM_THREADS=1") {
		t.Errorf("env of 1 process sets OMP_NUM_THREADS=1, want it left alone")
	}
}

// TestLaunchFlags: torchrun's underscore spellings and PET_ variables work; bad combinations are usage
// errors.
func TestLaunchFlags(t *testing.T) {
	t.Setenv("PET_MAX_RESTARTS", "4")
	f, sub, err := parseLaunch([]string{"--nproc_per_node", "3", "--rdzv_endpoint", "etcd.example:2400", "--rdzv-id", "job", "--monitor-interval", "0.5", "generate", "--ids", "1"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, nproc, _ := f.sizes(); nproc != 3 || f.maxRestarts != 4 || f.monitorInterval != 500*time.Millisecond || !slices.Equal(sub, []string{"generate", "--ids", "1"}) {
		t.Errorf("parseLaunch = nproc %d, max-restarts %d, monitor %v, sub %v; want 3, 4 (PET_), 500ms, [generate --ids 1]", nproc, f.maxRestarts, f.monitorInterval, sub)
	}
	if ep, _ := f.etcdAddr(); ep != "etcd.example:2400" {
		t.Errorf("etcd address = %q, want etcd.example:2400", ep)
	}
	f, sub, _ = parseLaunch([]string{"--rdzv-endpoint", "etcd.example", "--", "--threads", "1"}, io.Discard)
	if ep, _ := f.etcdAddr(); ep != "etcd.example:2379" || !slices.Equal(sub, []string{"worker", "--threads", "1"}) {
		t.Errorf("--rdzv-endpoint etcd.example -- --threads 1 = %q, %v; want etcd.example:2379, worker --threads 1", ep, sub)
	}
	f, _, _ = parseLaunch(nil, io.Discard)
	if ep, _ := f.etcdAddr(); ep != "127.0.0.1:29500" {
		t.Errorf("default etcd address = %q, want MASTER_ADDR:MASTER_PORT 127.0.0.1:29500", ep)
	}
	for _, args := range [][]string{
		{"--nnodes", "1:2"},
		{"--nnodes", "0"},
		{"--nproc-per-node", "gpu"},
		{"--nproc-per-node", "0"},
		{"--node-rank", "1"},
		{"--standalone"},
		{"--standalone", "--nnodes", "2", "--model", "m"},
		{"--model", "m"},
		{"--rdzv-backend", "zookeeper"},
		{"--rdzv-id", "a/b"},
		{"--max-restarts", "-1"},
		{"--", "launch"},
	} {
		if _, _, err := parseLaunch(args, io.Discard); err == nil {
			t.Errorf("parseLaunch(%q) = nil error, want a usage error", args)
		}
	}
}
