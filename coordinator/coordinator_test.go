package coordinator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// fixture is a tiny checkpoint: vocabulary 512, context 256, eos ids 2 and 3, 4 heads, 2 kv heads.
const fixture = "../testdata/fixtures/moe-top1"

// testEndpoints are the client URLs of the etcd that TestMain starts for the package's tests; each test
// uses its own cluster name.
var testEndpoints []string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "coordinator-etcd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{
		Dir: dir, ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0",
		HeartbeatInterval: 50 * time.Millisecond, ElectionTimeout: 500 * time.Millisecond, UnsafeNoFsync: true,
	})
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testEndpoints = e.Endpoints()
	code := m.Run()
	_ = e.Close()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// etcdConfig is the test's own cluster in the shared etcd.
func etcdConfig(t *testing.T) cluster.Config {
	return cluster.Config{Endpoints: testEndpoints, Cluster: clusterName(t)}
}

// clusterClient is a client of the test's cluster, closed when the test ends.
func clusterClient(t *testing.T) *cluster.Client {
	t.Helper()
	cl, err := cluster.New(testCtx(t), etcdConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// testConfig is a coordinator of the fixture at TP 2 on a free port, quick to plan.
func testConfig(t *testing.T) Config {
	return Config{
		ListenAddr: "127.0.0.1:0",
		Etcd:       etcdConfig(t),
		Model:      fixture,
		TP:         2,
		Settle:     20 * time.Millisecond,
		LeaderTTL:  2 * time.Second,
		Logger:     zap.NewNop(),
	}
}

// startCoordinator starts a coordinator and returns it with a client of it; both close when the test
// ends.
func startCoordinator(t *testing.T, cfg Config) (*Coordinator, *testClient) {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, dialTest(t, c.Addr())
}

// testClient is a client of a coordinator under test: the Go client, and the generated stubs for what
// it does not wrap.
type testClient struct {
	*client.Client
	gen   pb.GenerationClient
	admin pb.AdminClient
}

// dialTest makes a testClient of the coordinator at addr; it closes when the test ends.
func dialTest(t *testing.T, addr string) *testClient {
	t.Helper()
	cli, err := client.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &testClient{Client: cli, gen: pb.NewGenerationClient(conn), admin: pb.NewAdminClient(conn)}
}

// startWorkers starts fake workers w0..wn-1 that register in the test's cluster and follow its plan.
func startWorkers(t *testing.T, cl *cluster.Client, n int) ([]*fakeWorker, []*cluster.Registration) {
	t.Helper()
	var ws []*fakeWorker
	var regs []*cluster.Registration
	for i := range n {
		w := startFakeWorker(t, fmt.Sprintf("w%d", i))
		regs = append(regs, w.follow(t, cl))
		ws = append(ws, w)
	}
	return ws, regs
}

func waitReady(t *testing.T, c *Coordinator) {
	t.Helper()
	select {
	case <-c.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("coordinator not ready within 10s")
	}
}

// storedEpoch reads the plan's epoch from etcd.
func storedEpoch(t *testing.T, cl *cluster.Client) int64 {
	t.Helper()
	p, _, err := cl.Plan(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	return p.Epoch
}

func greedy() *sample.Params { return &sample.Params{TopP: 1} }

// TestServe: two fake workers at TP 2 serve 8 concurrent requests; bad requests fail with
// INVALID_ARGUMENT and a message, and the coordinator keeps serving.
func TestServe(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)

	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range 8 {
		wg.Go(func() {
			prompt := []int{10 * (i + 1), 10*(i+1) + 1}
			var streamed []int
			res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: prompt, MaxTokens: 30, Sampling: greedy(), IgnoreEOS: true},
				func(ids []int, _ string) error { streamed = append(streamed, ids...); return nil })
			want := echo(prompt, 30)
			switch {
			case err != nil:
				errs[i] = err
			case !slices.Equal(res.IDs, want) || !slices.Equal(streamed, want) || res.FinishReason != FinishLength || res.PromptTokens != 2:
				errs[i] = fmt.Errorf("got %+v (streamed %v), want %v, length, 2 prompt tokens", res, streamed, want)
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("request %d: %v", i, err)
		}
	}

	// eos: a prompt ending in 1 generates 2, an eos id of the fixture.
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 5, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{2}) || res.FinishReason != FinishStop {
		t.Errorf("Generate([1]) = %+v, %v; want [2], stop", res, err)
	}

	for _, tc := range []struct {
		name string
		req  *pb.GenerateRequest
		msg  string
	}{
		{"empty prompt", &pb.GenerateRequest{MaxTokens: 4}, "empty prompt"},
		{"id past the vocabulary", &pb.GenerateRequest{PromptIds: []int32{1, 512}, MaxTokens: 4}, "id 512 at index 1 is outside the vocabulary [0, 512)"},
		{"negative id", &pb.GenerateRequest{PromptIds: []int32{-1}, MaxTokens: 4}, "outside the vocabulary"},
		{"max_tokens 0", &pb.GenerateRequest{PromptIds: []int32{1}}, "max_tokens 0 must be positive"},
		{"max_tokens negative", &pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: -3}, "must be positive"},
		{"past the context", &pb.GenerateRequest{PromptIds: []int32{1, 2}, MaxTokens: 255}, "2 prompt tokens + max_tokens 255 exceed the model's context of 256"},
		{"unknown model", &pb.GenerateRequest{Model: "gpt-2", PromptIds: []int32{1}, MaxTokens: 4}, `unknown model "gpt-2": this cluster serves "moe-top1"`},
		{"text and ids", &pb.GenerateRequest{Prompt: "hello", PromptIds: []int32{1}, MaxTokens: 4}, "not both"},
		{"negative temperature", &pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{Temperature: -1}}, "temperature"},
		{"top_p above 1", &pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, Sampling: &pb.SamplingParams{TopP: 1.5}}, "top-p"},
		{"stop id past the vocabulary", &pb.GenerateRequest{PromptIds: []int32{1}, MaxTokens: 4, StopIds: []int32{600}}, "stop id 600"},
	} {
		stream, err := cli.gen.Generate(testCtx(t), tc.req)
		if err == nil {
			_, err = stream.Recv()
		}
		if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tc.msg) {
			t.Errorf("Generate(%s) = %v, want InvalidArgument with %q", tc.name, err, tc.msg)
		}
	}
	res, err = cli.Generate(testCtx(t), client.GenerateRequest{Model: "moe-top1", PromptIDs: []int{40}, MaxTokens: 3, Sampling: greedy(), IgnoreEOS: true}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{41, 42, 43}) {
		t.Errorf("Generate after bad requests = %+v, %v; want [41 42 43]", res, err)
	}

	// Text needs the model's tokenizer, which this fixture lacks.
	stream, err := cli.gen.Generate(testCtx(t), &pb.GenerateRequest{Prompt: "hello", MaxTokens: 4})
	if err == nil {
		_, err = stream.Recv()
	}
	if st, _ := status.FromError(err); st.Code() != codes.FailedPrecondition || !strings.Contains(st.Message(), "moe-top1 has no tokenizer") || Reason(err) != "NO_TOKENIZER" {
		t.Errorf("Generate(text, no tokenizer) = %v, want FailedPrecondition, has no tokenizer, NO_TOKENIZER", err)
	}
	if _, err := cli.Tokenize(testCtx(t), "", "hi", true); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "no tokenizer") {
		t.Errorf("Tokenize without a tokenizer = %v, want FailedPrecondition, no tokenizer", err)
	}
	models, err := cli.gen.ListModels(testCtx(t), &pb.ListModelsRequest{})
	if err != nil || len(models.GetModels()) != 1 {
		t.Fatalf("ListModels = %v, %v", models, err)
	}
	if m := models.GetModels()[0]; m.GetName() != "moe-top1" || m.GetVocabSize() != 512 || m.GetMaxPositionEmbeddings() != 256 || m.GetTp() != 2 || m.GetReplicas() != 1 {
		t.Errorf("ListModels = %v, want moe-top1, vocab 512, context 256, tp 2, 1 replica", m)
	}
	sh, err := cli.Shards(testCtx(t))
	if err != nil || sh.Epoch != 1 || sh.TP != 2 || len(sh.Assignments) != 2 || sh.Assignments[1].MemberID != "w1" {
		t.Errorf("Shards = %+v, %v; want epoch 1, tp 2, w0 and w1", sh, err)
	}
	ms, err := cli.admin.Members(testCtx(t), &pb.MembersRequest{})
	if err != nil || len(ms.GetMembers()) != 2 {
		t.Errorf("Members = %v, %v; want 2 members", ms, err)
	}
}

// TestQueueFull: with one sequence per step and two places in the queue, a fourth request while the
// first runs is refused with RESOURCE_EXHAUSTED; the others complete.
func TestQueueFull(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	var hold atomic.Bool
	hold.Store(true)
	entered, unblock := make(chan struct{}, 1), make(chan struct{})
	ws[0].setHook(func(*pb.StepRequest) string {
		if hold.Load() {
			select {
			case entered <- struct{}{}:
			default:
			}
			<-unblock
		}
		return ""
	})
	cfg := testConfig(t)
	cfg.MaxQueue, cfg.MaxBatch, cfg.TokenBudget = 2, 1, 4
	c, cli := startCoordinator(t, cfg)
	waitReady(t, c)

	var wg sync.WaitGroup
	errs := make([]error, 3)
	gen := func(i int) {
		res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{100 + i}, MaxTokens: 2, Sampling: greedy()}, nil)
		if err == nil && !slices.Equal(res.IDs, echo([]int{100 + i}, 2)) {
			err = fmt.Errorf("got %v", res.IDs)
		}
		errs[i] = err
	}
	wg.Go(func() { gen(0) })
	<-entered // request 0 is in the batch, its first step held
	wg.Go(func() { gen(1) })
	wg.Go(func() { gen(2) })
	eventually(t, "two queued requests", func() bool { return c.queue.len() == 2 })
	_, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 2}, nil)
	if st, _ := status.FromError(err); st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "queue full") || Reason(err) != "QUEUE_FULL" {
		t.Errorf("Generate with a full queue = %v (reason %q), want ResourceExhausted, queue full, QUEUE_FULL", err, Reason(err))
	}
	hold.Store(false)
	close(unblock)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("request %d: %v", i, err)
		}
	}
}

// TestCancelReleases: a client that goes away mid-generation gets its sequence released on the
// workers.
func TestCancelReleases(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)
	ctx, cancel := context.WithCancel(testCtx(t))
	got := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: []int{5}, MaxTokens: 250, Sampling: greedy(), IgnoreEOS: true},
			func([]int, string) error {
				select {
				case got <- struct{}{}:
				default:
				}
				return nil
			})
		done <- err
	}()
	<-got
	eventually(t, "the sequence on both workers", func() bool { return ws[0].held() == 1 && ws[1].held() == 1 })
	cancel()
	if err := <-done; status.Code(err) != codes.Canceled {
		t.Errorf("cancelled Generate = %v, want Canceled", err)
	}
	eventually(t, "the release of the cancelled sequence", func() bool { return ws[0].held() == 0 && ws[1].held() == 0 })
}

// TestResumeAfterRestart: a new coordinator resumes the stored plan without a new epoch: the workers
// stay on their epoch and serve again.
func TestResumeAfterRestart(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	a, cliA := startCoordinator(t, testConfig(t))
	waitReady(t, a)
	if _, err := cliA.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{7}, MaxTokens: 2, Sampling: greedy()}, nil); err != nil {
		t.Fatal(err)
	}
	epoch := storedEpoch(t, cl)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, cliB := startCoordinator(t, testConfig(t))
	waitReady(t, b)
	res, err := cliB.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{7}, MaxTokens: 2, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{8, 9}) {
		t.Errorf("Generate on the new coordinator = %+v, %v; want [8 9]", res, err)
	}
	if got := storedEpoch(t, cl); got != epoch {
		t.Errorf("epoch after the restart = %d, want %d (resumed)", got, epoch)
	}
	for _, w := range ws {
		if st, _ := w.Status(testCtx(t), nil); st.GetEpoch() != epoch || st.GetState() != workerServing {
			t.Errorf("worker %s after the restart: epoch %d %s, want %d serving", w.id, st.GetEpoch(), st.GetState(), epoch)
		}
	}
}

// TestReplan: a joining member forms a second group in a new epoch, keeping the first; a member leaving
// breaks its group only.
func TestReplan(t *testing.T) {
	cl := clusterClient(t)
	_, regs := startWorkers(t, cl, 3)
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)
	shards := func() string {
		sh, err := cli.Shards(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		s := fmt.Sprintf("epoch %d:", sh.Epoch)
		for _, a := range sh.Assignments {
			s += fmt.Sprintf(" %d/%d=%s", a.Group, a.Rank, a.MemberID)
		}
		return s
	}
	if got, want := shards(), "epoch 1: 0/0=w0 0/1=w1"; got != want {
		t.Fatalf("plan with 3 members = %q, want %q", got, want)
	}
	w3 := startFakeWorker(t, "w3")
	w3.follow(t, cl)
	want := "epoch 2: 0/0=w0 0/1=w1 1/0=w2 1/1=w3"
	eventually(t, want, func() bool { return shards() == want })
	if err := regs[0].Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	want = "epoch 3: 1/0=w2 1/1=w3"
	eventually(t, want, func() bool { return shards() == want })
	eventually(t, "group 1 serving epoch 3", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.plan.Epoch == 3 && c.readyGroups[1]
	})
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{20}, MaxTokens: 3, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{21, 22, 23}) {
		t.Errorf("Generate after the re-plans = %+v, %v; want [21 22 23]", res, err)
	}
}

// TestStandby: a second coordinator is a standby (UNAVAILABLE, health NOT_SERVING) until the leader
// closes; then it leads and serves.
func TestStandby(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	a, _ := startCoordinator(t, testConfig(t))
	waitReady(t, a)
	b, cliB := startCoordinator(t, testConfig(t))
	_, err := cliB.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 2}, nil)
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "standby") || Reason(err) != "NOT_LEADER" {
		t.Errorf("Generate on a standby = %v (reason %q), want Unavailable, standby, NOT_LEADER", err, Reason(err))
	}
	if _, err := cliB.Rebalance(testCtx(t), 0); status.Code(err) != codes.Unavailable {
		t.Errorf("Rebalance on a standby = %v, want Unavailable", err)
	}
	if sh, err := cliB.Shards(testCtx(t)); err != nil || sh.Epoch != 1 {
		t.Errorf("Shards on a standby = %+v, %v; want epoch 1", sh, err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	waitReady(t, b)
	res, err := cliB.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{30}, MaxTokens: 2, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{31, 32}) {
		t.Errorf("Generate on the new leader = %+v, %v; want [31 32]", res, err)
	}
}

// TestRebalance: Rebalance writes a new epoch, with a new TP size when asked; a TP the model cannot be
// split into is INVALID_ARGUMENT.
func TestRebalance(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)
	epoch, err := cli.Rebalance(testCtx(t), 0)
	if err != nil || epoch != 2 {
		t.Fatalf("Rebalance(0) = %d, %v; want 2", epoch, err)
	}
	if epoch, err = cli.Rebalance(testCtx(t), 1); err != nil || epoch != 3 {
		t.Fatalf("Rebalance(1) = %d, %v; want 3", epoch, err)
	}
	sh, err := cli.Shards(testCtx(t))
	if err != nil || sh.TP != 1 || len(sh.Assignments) != 2 || sh.Assignments[1].Group != 1 {
		t.Errorf("Shards after Rebalance(1) = %+v, %v; want tp 1, two groups", sh, err)
	}
	if _, err := cli.Rebalance(testCtx(t), 3); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Rebalance(3) of a model with 4 heads = %v, want InvalidArgument", err)
	}
	eventually(t, "two groups serving", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.readyGroups) == 2
	})
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{50}, MaxTokens: 2, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{51, 52}) {
		t.Errorf("Generate after rebalancing = %+v, %v; want [51 52]", res, err)
	}
}

// TestFailedEpochReplaced: a worker whose epoch failed gets a new epoch from the leader, the group
// serves again, and the request in flight resumes there instead of failing.
func TestFailedEpochReplaced(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	var once atomic.Bool
	ws[1].setHook(func(*pb.StepRequest) string {
		if once.CompareAndSwap(false, true) {
			ws[1].setState(workerFailed)
			return "worker: failed: epoch 1: all-reduce timed out"
		}
		return ""
	})
	c, cli := startCoordinator(t, testConfig(t))
	waitReady(t, c)
	res, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{60}, MaxTokens: 2, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{61, 62}) {
		t.Errorf("Generate across a failed epoch = %+v, %v; want [61 62], resumed in the next epoch", res, err)
	}
	eventually(t, "epoch 2", func() bool { return storedEpoch(t, cl) == 2 })
	eventually(t, "a group serving epoch 2", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.plan.Epoch == 2 && len(c.readyGroups) == 1
	})
	res, err = cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{60}, MaxTokens: 2, Sampling: greedy()}, nil)
	if err != nil || !slices.Equal(res.IDs, []int{61, 62}) {
		t.Errorf("Generate in the new epoch = %+v, %v; want [61 62]", res, err)
	}
}

// TestNoPlanUnavailable: with fewer workers than TP, Generate is UNAVAILABLE.
func TestNoPlanUnavailable(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 1)
	c, cli := startCoordinator(t, testConfig(t))
	eventually(t, "leadership", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.leader
	})
	_, err := cli.Generate(testCtx(t), client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 2}, nil)
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "no plan") {
		t.Errorf("Generate with 1 worker at TP 2 = %v, want Unavailable, no plan", err)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Model: fixture, Etcd: cluster.Config{Endpoints: []string{"127.0.0.1:2379"}}}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v, want nil", ok, err)
	}
	for _, tc := range []struct {
		name string
		edit func(*Config)
	}{
		{"no model", func(c *Config) { c.Model = "" }},
		{"negative tp", func(c *Config) { c.TP = -1 }},
		{"negative queue", func(c *Config) { c.MaxQueue = -1 }},
		{"budget below batch", func(c *Config) { c.MaxBatch, c.TokenBudget = 8, 4 }},
		{"bad listen address", func(c *Config) { c.ListenAddr = "nowhere" }},
		{"no etcd", func(c *Config) { c.Etcd.Endpoints = nil }},
		{"negative ttl", func(c *Config) { c.LeaderTTL = -time.Second }},
		{"gossip bind host name", func(c *Config) { c.Gossip.BindAddr = "localhost" }},
		{"gossip probe timeout above interval", func(c *Config) { c.Gossip.ProbeTimeout = 2 * time.Second }},
	} {
		c := ok
		tc.edit(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("Validate(%s) = %v, want ErrInvalidConfig", tc.name, err)
		}
	}
	noGossip := ok
	noGossip.NoGossip, noGossip.Gossip.BindAddr = true, "localhost"
	if err := noGossip.Validate(); err != nil {
		t.Errorf("Validate(NoGossip with a bad gossip config) = %v, want nil", err)
	}
	if d := (Config{ListenAddr: "0.0.0.0:7070"}).withDefaults(); d.Gossip.BindAddr != "0.0.0.0" {
		t.Errorf("gossip bind address for listen 0.0.0.0:7070 = %q, want 0.0.0.0", d.Gossip.BindAddr)
	}
	if d := (Config{ListenAddr: "localhost:7070"}).withDefaults(); d.Gossip.BindAddr != "" {
		t.Errorf("gossip bind address for listen localhost:7070 = %q, want empty (cluster's default)", d.Gossip.BindAddr)
	}
	cfg := ok
	cfg.TP = 3
	if _, err := New(cfg); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "TP 3") {
		t.Errorf("New(TP 3 for 4 heads) = %v, want ErrInvalidConfig naming TP 3", err)
	}
	cfg = ok
	cfg.Model = t.TempDir()
	if _, err := New(cfg); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("New(empty model dir) = %v, want ErrInvalidConfig", err)
	}
}
