package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// workerStatuses asks every worker of the plan for its Status.
func workerStatuses(t *testing.T, sh client.Shards) []*pb.StatusResponse {
	t.Helper()
	var out []*pb.StatusResponse
	for _, a := range sh.Assignments {
		conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := pb.NewWorkerClient(conn).Status(ctx, &pb.StatusRequest{})
		cancel()
		_ = conn.Close()
		if err != nil {
			t.Fatalf("Status of worker %s: %v", a.MemberID, err)
		}
		out = append(out, st)
	}
	return out
}

// serveTime polls the coordinator at cli with one-token greedy requests until one succeeds, and returns
// how long after since that was.
func serveTime(t *testing.T, cli *client.Client, since time.Time, prompt []int) time.Duration {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: prompt, MaxTokens: 1, Sampling: &sample.Params{TopP: 1}, IgnoreEOS: true}, nil)
		cancel()
		if err == nil {
			return time.Since(since)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("the standby did not serve within 30s")
	return 0
}

// TestCoordinatorFailover is issue 13's coordinator fail-over: etcd, two coordinators with a long
// --leader-ttl (10s, so a take-over within it is gossip's doing) and two CPU workers as one TP=2 group.
// SIGKILL of the leader: the standby serves within 2 s, with the same epoch and no weight reload; the
// streams in flight on the dead leader end with UNAVAILABLE, and their retry on the new leader completes
// with the uninterrupted greedy output; 5 s later no worker holds a Step stream or a sequence of the
// dead leader. SIGTERM of the new leader (a clean exit) steps down at once: the restarted coordinator
// takes over well within the lease.
func TestCoordinatorFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("fail-over: separate processes")
	}
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	coordArgs := []string{"coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--listen", "127.0.0.1:0",
		"--http-listen", "127.0.0.1:0", "--leader-ttl", "10s", "--settle", "50ms", "--step-timeout", "2s", "--shutdown-grace", "1s"}
	a := startProc(t, "coordinator A", coordArgs...)
	addrA := a.line(t)
	var workers []*proc
	for range 2 {
		workers = append(workers, startProc(t, "worker", "worker", "--etcd", ep, "--threads", "1", "--op-timeout", "20s"))
	}
	cliA := waitCoordinator(t, addrA)
	b := startProc(t, "coordinator B", coordArgs...)
	addrB := b.line(t)
	cliB, err := client.Dial(addrB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cliB.Close() })
	sh, err := cliA.Shards(context.Background())
	if err != nil || sh.LeaderID == "" {
		t.Fatalf("Shards on the leader = %+v, %v; want its leader id", sh, err)
	}
	if shB, err := cliB.Shards(context.Background()); err != nil || shB.LeaderID != "" || shB.Epoch != sh.Epoch {
		t.Errorf("Shards on the standby = %+v, %v; want epoch %d and no leader id", shB, err, sh.Epoch)
	}
	greedy := &sample.Params{TopP: 1}
	want := g.greedy
	req := client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: len(want), Sampling: greedy, IgnoreEOS: true}
	gw := startProc(t, "gateway", "gateway", "--coordinators", addrA+","+addrB, "--model", model, "--http-listen", "127.0.0.1:0")
	gwAddr := gw.line(t)
	time.Sleep(2 * time.Second) // the standby's gossip node joins the workers'

	// Streams in flight on A when it dies.
	const n = 4
	errs := make([]error, n)
	var started sync.WaitGroup
	var wg sync.WaitGroup
	started.Add(n)
	for i := range n {
		var once sync.Once
		wg.Go(func() {
			_, errs[i] = cliA.Generate(context.Background(), req, func([]int, string) error {
				once.Do(started.Done)
				return nil
			})
			once.Do(started.Done)
		})
	}
	// HTTP streams through the gateway process (over A while A leads).
	const nHTTP = 2
	httpErrs := make([]error, nHTTP)
	started.Add(nHTTP)
	for i := range nHTTP {
		var once sync.Once
		wg.Go(func() {
			s := &chaosStream{}
			s.onToken = func() { once.Do(started.Done) }
			_, httpErrs[i] = chaosHTTP(context.Background(), gwAddr, g.prompt, len(want), s)
			once.Do(started.Done)
		})
	}
	started.Wait()
	loads := 0
	for _, w := range workers {
		loads += countLine(w.stderr.String(), "weights loaded")
	}
	kill := time.Now()
	a.signal(t, syscall.SIGKILL)
	took := serveTime(t, cliB, kill, g.prompt)
	t.Logf("standby serving %v after the leader's SIGKILL (--leader-ttl 10s)", took.Round(time.Millisecond))
	if bound := takeoverBound(); took > bound {
		t.Errorf("the standby served %v after the leader's SIGKILL, want within %v", took, bound)
	}
	wg.Wait()
	for i, err := range errs {
		// A stream cut by its coordinator's death ends with UNAVAILABLE: the client retries elsewhere.
		if status.Code(err) != codes.Unavailable {
			t.Errorf("stream %d on the killed leader = %v, want UNAVAILABLE", i, err)
			continue
		}
		res, err := cliB.Generate(context.Background(), req, nil)
		if err != nil || !slices.Equal(res.IDs, want) {
			t.Errorf("retry of stream %d on the new leader = %v, %v; want %v", i, res.IDs, err, want)
		}
	}
	// The gateway outlives the coordinator: its streams end with an error event a client can act on,
	// and the same request sent again to the gateway goes to the new leader.
	for i, err := range httpErrs {
		if err == nil || !strings.Contains(err.Error(), "error event coordinator_lost") {
			t.Errorf("HTTP stream %d through the gateway when the leader died: %v, want an error event coordinator_lost", i, err)
			continue
		}
		ids, err := chaosHTTP(context.Background(), gwAddr, g.prompt, len(want), &chaosStream{})
		if err != nil || !slices.Equal(ids, want) {
			t.Errorf("retry of HTTP stream %d through the gateway = %v, %v; want %v", i, ids, err, want)
		}
	}
	shB, err := cliB.Shards(context.Background())
	if err != nil || shB.Epoch != sh.Epoch || shB.LeaderID == "" {
		t.Errorf("Shards on the new leader = %+v, %v; want epoch %d (resumed) and its leader id", shB, err, sh.Epoch)
	}
	time.Sleep(time.Until(kill.Add(5 * time.Second)))
	for _, st := range workerStatuses(t, shB) {
		if st.GetStepStreams() != 1 || st.GetSequences() != 0 {
			t.Errorf("worker %s 5s after the leader's SIGKILL: %d Step streams, %d sequences; want 1 (the new leader's), 0",
				st.GetMemberId(), st.GetStepStreams(), st.GetSequences())
		}
	}
	after := 0
	for _, w := range workers {
		after += countLine(w.stderr.String(), "weights loaded")
	}
	if after != loads {
		t.Errorf("workers loaded weights %d times across the take-over, want 0", after-loads)
	}

	// A clean exit steps down at once: a restarted A takes over from B within a second or two, not 10s.
	a2 := startProc(t, "coordinator A (restarted)", coordArgs...)
	addrA2 := a2.line(t)
	cliA2, err := client.Dial(addrA2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cliA2.Close() })
	time.Sleep(time.Second)
	term := time.Now()
	b.signal(t, syscall.SIGTERM)
	took = serveTime(t, cliA2, term, g.prompt)
	t.Logf("restarted coordinator serving %v after the leader's SIGTERM (--shutdown-grace 1s, idle)", took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("the standby served %v after the leader's SIGTERM, want well within the 10s lease", took)
	}
	if code := b.wait(t, 10*time.Second); code != 0 {
		t.Errorf("coordinator B exited %d after SIGTERM, want 0", code)
	}
	res, err := cliA2.Generate(context.Background(), req, nil)
	if err != nil || !slices.Equal(res.IDs, want) {
		t.Errorf("Generate on the restarted coordinator = %v, %v; want %v", res.IDs, err, want)
	}
}

// takeoverBound is how soon a standby must serve after the leader's SIGKILL: issue 13's 2 s (measured
// 0.3-0.4 s under -race: the standby's health Watch stream to the leader ends with the process);
// TPFLEET_TAKEOVER_BOUND overrides it.
func takeoverBound() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("TPFLEET_TAKEOVER_BOUND")); err == nil && d > 0 {
		return d
	}
	return 2 * time.Second
}
