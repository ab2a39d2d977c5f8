package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// waitCoordinator waits until the coordinator at addr serves (health SERVING).
func waitCoordinator(t *testing.T, addr string) *client.Client {
	t.Helper()
	cli, err := client.Dial(addr, clientOptions(t)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cli.WaitReady(ctx, 20*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	return cli
}

// generateConcurrently runs n `tpfleet generate --addr ... --json` at once (in this process) with the
// fixture's prompt, greedy, and checks that each prints the fixture's greedy ids.
func generateConcurrently(t *testing.T, addr string, g golden, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]string, n)
	for i := range n {
		wg.Go(func() {
			code, stdout, stderr := tpfleet(t, "generate", "--addr", addr, "--model", filepath.Join(fixtures, "moe-top1"),
				"--ids", joinIDs(g.prompt), "--max-tokens", strconv.Itoa(len(g.greedy)), "--temperature", "0", "--ignore-eos", "--json")
			var out generateJSON
			if err := json.Unmarshal([]byte(stdout), &out); code != 0 || err != nil {
				errs[i] = fmt.Sprintf("exit %d, stdout %q, stderr %s", code, stdout, stderr)
				return
			}
			if !slices.Equal(out.IDs, g.greedy) || out.FinishReason != "length" || out.PromptTokens != len(g.prompt) {
				errs[i] = fmt.Sprintf("got %+v, want ids %v, length, %d prompt tokens", out, g.greedy, len(g.prompt))
			}
		})
	}
	wg.Wait()
	for i, e := range errs {
		if e != "" {
			t.Errorf("concurrent request %d: %s", i, e)
		}
	}
}

// planEpoch reads the stored plan's epoch with `tpfleet cluster shards --json`.
func planEpoch(t *testing.T, ep string) int64 {
	t.Helper()
	code, stdout, stderr := tpfleet(t, "cluster", "shards", "--etcd", ep, "--json")
	var v struct {
		Plan *struct {
			Epoch  int64 `json:"epoch"`
			Groups []struct {
				Ranks []struct {
					MemberID string `json:"member_id"`
				} `json:"ranks"`
			} `json:"groups"`
		} `json:"plan"`
	}
	if err := json.Unmarshal([]byte(stdout), &v); code != 0 || err != nil || v.Plan == nil {
		t.Fatalf("cluster shards --json = %d, %q (%s)", code, stdout, stderr)
	}
	return v.Plan.Epoch
}

// countLine counts the log lines of stderr whose message is msg.
func countLine(stderr, msg string) int { return strings.Count(stderr, "\t"+msg+"\t") }

// TestClusterProcesses is issue 5's acceptance, with TLS on (issue 16): separate processes on 127.0.0.1
// — etcd, a coordinator at TP 2 and two CPU workers, each with its certificate — serve 8 concurrent requests with the fixture's greedy ids; bad requests fail
// with INVALID_ARGUMENT and the coordinator keeps serving; after the coordinator is killed (SIGKILL) a new
// one resumes the plan in etcd: no new epoch, no reload on the workers, and requests succeed again.
func TestClusterProcesses(t *testing.T) {
	start := time.Now()
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	certs := withTLS(t)
	_, ep := startEtcd(t, certs.Args("node")...)
	coordArgs := append([]string{"coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
		"--leader-ttl", "2s", "--settle", "50ms", "--api-key", testAPIKey}, certs.Args("coordinator")...)
	coord := startProc(t, "coordinator", coordArgs...)
	addr := coord.line(t)
	var workers []*proc
	for i := range 2 {
		workers = append(workers, startProc(t, fmt.Sprintf("worker %d", i), append([]string{"worker", "--etcd", ep, "--threads", "1", "--op-timeout", "20s"},
			certs.Args("worker")...)...))
	}
	cli := waitCoordinator(t, addr)
	t.Logf("serving after %v", time.Since(start).Round(time.Millisecond))

	generateConcurrently(t, addr, g, 8)

	// TLS everywhere: etcd speaks https; a client in plaintext, and one without the API key, are refused.
	if !strings.HasPrefix(ep, "https://") {
		t.Errorf("etcd endpoint %s, want https://", ep)
	}
	probe := client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: 1}
	t.Setenv(EnvToken, "")
	for name, opts := range map[string][]client.Option{"in plaintext": nil, "without the API key": clientOptions(t)} {
		cli, err := client.Dial(addr, opts...)
		if err != nil {
			t.Fatal(err)
		}
		want := codes.Unauthenticated
		if opts == nil {
			want = codes.Unavailable
		}
		if _, err := cli.Generate(context.Background(), probe, nil); status.Code(err) != want {
			t.Errorf("Generate %s = %v, want %v", name, err, want)
		}
		_ = cli.Close()
	}
	t.Setenv(EnvToken, testAPIKey)

	// Bad requests: INVALID_ARGUMENT with a message; the coordinator keeps serving.
	ctx := context.Background()
	greedy := &sample.Params{TopP: 1}
	for _, tc := range []struct {
		name string
		req  client.GenerateRequest
		msg  string
	}{
		{"empty prompt", client.GenerateRequest{MaxTokens: 4}, "empty prompt"},
		{"id outside the vocabulary", client.GenerateRequest{PromptIDs: []int{1, 600}, MaxTokens: 4}, "outside the vocabulary [0, 512)"},
		{"max_tokens 0", client.GenerateRequest{PromptIDs: []int{1}}, "max_tokens 0"},
		{"past the context", client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 256}, "exceed the model's context of 256"},
		{"unknown model", client.GenerateRequest{Model: "llama-2", PromptIDs: []int{1}, MaxTokens: 4}, `unknown model "llama-2"`},
	} {
		_, err := cli.Generate(ctx, tc.req, nil)
		if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("Generate(%s) = %v, want InvalidArgument with %q", tc.name, err, tc.msg)
		}
	}
	code, _, stderr := tpfleet(t, "generate", "--addr", addr, "--ids", "1,512", "--max-tokens", "3")
	if code != 1 || !strings.Contains(stderr, "InvalidArgument") || !strings.Contains(stderr, "outside the vocabulary") {
		t.Errorf("generate --addr with id 512 = exit %d, %q; want 1 and InvalidArgument", code, stderr)
	}
	// Plain output streams the ids, space separated.
	code, stdout, stderr := tpfleet(t, "generate", "--addr", addr, "--ids", joinIDs(g.prompt), "--max-tokens", "5", "--temperature", "0", "--ignore-eos")
	if want := strings.ReplaceAll(joinIDs(g.greedy[:5]), ",", " ") + "\n"; code != 0 || stdout != want {
		t.Errorf("generate --addr = %d, %q (%s), want 0, %q", code, stdout, stderr, want)
	}
	res, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: 3, Sampling: greedy, IgnoreEOS: true}, nil)
	if err != nil || !slices.Equal(res.IDs, g.greedy[:3]) {
		t.Errorf("Generate after bad requests = %+v, %v; want %v", res, err, g.greedy[:3])
	}

	code, stdout, _ = tpfleet(t, "cluster", "members", "--etcd", ep)
	if code != 0 || strings.Count(stdout, "127.0.0.1:") != 2 {
		t.Errorf("cluster members = %d, %q; want two workers", code, stdout)
	}
	epoch := planEpoch(t, ep)
	for i, w := range workers {
		ring := false
		for _, l := range strings.Split(w.stderr.String(), "\n") {
			ring = ring || strings.Contains(l, "\tcommunicator ready\t") && strings.Contains(l, `"tls": true`)
		}
		if !ring {
			t.Errorf("worker %d did not log a TLS ring (communicator ready, tls true)", i)
		}
		if !strings.Contains(w.stderr.String(), `"gossip-encrypted": true`) {
			t.Errorf("worker %d's gossip is not encrypted", i)
		}
	}
	if s := coord.stderr.String(); !strings.Contains(s, `"gossip-encrypted": true`) || strings.Contains(s, "cannot join a worker's gossip node") {
		t.Errorf("the coordinator's gossip is not encrypted, or could not join the workers' (encrypted) gossip")
	}
	loads := make([]int, len(workers))
	for i, w := range workers {
		loads[i] = countLine(w.stderr.String(), "weights loaded")
		if loads[i] != 1 {
			t.Errorf("worker %d loaded its weights %d times before the restart, want 1", i, loads[i])
		}
	}

	// Kill the coordinator; a new one resumes the plan.
	coord.signal(t, syscall.SIGKILL)
	coord.wait(t, 10*time.Second)
	restart := time.Now()
	coord2 := startProc(t, "coordinator 2", coordArgs...)
	addr = coord2.line(t)
	cli = waitCoordinator(t, addr)
	t.Logf("new coordinator serving %v after the kill", time.Since(restart).Round(time.Millisecond))
	if !strings.Contains(coord2.stderr.String(), "resuming plan") {
		t.Errorf("the new coordinator did not log that it resumed the plan")
	}
	if _, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: 300}, nil); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Generate past the context on the new coordinator = %v, want InvalidArgument", err)
	}
	generateConcurrently(t, addr, g, 8)
	if got := planEpoch(t, ep); got != epoch {
		t.Errorf("plan epoch after the coordinator restart = %d, want %d (resumed, not re-planned)", got, epoch)
	}
	for i, w := range workers {
		if n := countLine(w.stderr.String(), "weights loaded"); n != loads[i] {
			t.Errorf("worker %d loaded its weights %d times after the restart, want %d (no reload)", i, n, loads[i])
		}
	}
	t.Logf("total %v", time.Since(start).Round(time.Millisecond))
}
