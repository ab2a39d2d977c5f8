package worker_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/tpfleet/tpfleet/cluster"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/worker"
)

// fixture is the checkpoint the tests serve, relative to the package directory.
var fixture = filepath.Join("..", "testdata", "fixtures", "moe-top1")

// testTimeout bounds every test's context.
const testTimeout = 60 * time.Second

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// golden is the fixture's HF reference: a prompt and its greedy continuation.
type golden struct {
	Prompt []int32 `json:"prompt_ids"`
	Greedy []int32 `json:"greedy_ids"`
}

func readGolden(t *testing.T) golden {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixture, "golden.json"))
	if err != nil {
		t.Fatal(err)
	}
	var g golden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

// startEtcd starts an embedded etcd on loopback ports picked by the kernel.
func startEtcd(t *testing.T) *cluster.Embedded {
	t.Helper()
	e, err := cluster.StartEmbedded(testCtx(t), cluster.EmbedConfig{
		Dir:           t.TempDir(),
		ClientAddr:    "127.0.0.1:0",
		PeerAddr:      "127.0.0.1:0",
		Logger:        zap.NewNop(),
		UnsafeNoFsync: true,
	})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// newClient is the test's own etcd client: it plays the coordinator's part in etcd.
func newClient(t *testing.T, e *cluster.Embedded) *cluster.Client {
	t.Helper()
	c, err := cluster.New(testCtx(t), cluster.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("cluster.New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// testConfig is a worker config for tests: loopback, one CPU thread, short timeouts, logs at warn
// level and above through t.Log.
func testConfig(t *testing.T, e *cluster.Embedded, id string) worker.Config {
	cfg := worker.DefaultConfig()
	cfg.ID = id
	cfg.Threads = 1
	cfg.Etcd = cluster.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()}
	cfg.OpTimeout = 10 * time.Second
	cfg.RendezvousTimeout = 20 * time.Second
	cfg.GracefulStopTimeout = 2 * time.Second
	cfg.Logger = zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	return cfg
}

// startWorker starts a worker and closes it when the test ends.
func startWorker(t *testing.T, cfg worker.Config) *worker.Worker {
	t.Helper()
	w, err := worker.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := w.Close(); err != nil {
			t.Errorf("Close %s: %v", cfg.ID, err)
		}
	})
	if err := w.Start(testCtx(t)); err != nil {
		t.Fatalf("Start %s: %v", cfg.ID, err)
	}
	return w
}

// dial connects to a worker's gRPC server.
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// plan is a plan of one group whose ranks are ws in order.
func plan(epoch int64, ws ...*worker.Worker) cluster.Plan {
	g := cluster.Group{ID: 0}
	for r, w := range ws {
		g.Ranks = append(g.Ranks, cluster.Assignment{Rank: r, MemberID: w.ID(), Addr: w.Addr()})
	}
	return cluster.Plan{Epoch: epoch, Model: fixture, TP: len(ws), PlanName: "tp", Groups: []cluster.Group{g}}
}

// putPlan stores p (the previous epoch being p.Epoch-1) and waits until every worker in wait has applied
// it, through the LoadPlan RPC.
func putPlan(t *testing.T, cli *cluster.Client, p cluster.Plan, wait ...tpfleetv1.WorkerClient) {
	t.Helper()
	ctx := testCtx(t)
	if err := cli.PutPlan(ctx, p, p.Epoch-1); err != nil {
		t.Fatalf("PutPlan(epoch %d): %v", p.Epoch, err)
	}
	for i, c := range wait {
		if _, err := c.LoadPlan(ctx, &tpfleetv1.LoadPlanRequest{Epoch: p.Epoch}); err != nil {
			t.Fatalf("worker %d: LoadPlan(%d): %v", i, p.Epoch, err)
		}
	}
}

// eventually calls check until it returns nil, failing the test with check's last error after timeout.
// It polls every 10 ms: a retry loop, not a synchronising sleep.
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

// group is the test's coordinator for one TP group: a Step stream to each rank, fed identical requests.
type group struct {
	t       *testing.T
	streams []tpfleetv1.Worker_StepClient
	epoch   int64
	step    uint64
}

func newGroup(t *testing.T, epoch int64, clients ...tpfleetv1.WorkerClient) *group {
	t.Helper()
	g := &group{t: t, epoch: epoch}
	for i, c := range clients {
		s, err := c.Step(testCtx(t))
		if err != nil {
			t.Fatalf("rank %d: Step: %v", i, err)
		}
		t.Cleanup(func() { _ = s.CloseSend() })
		g.streams = append(g.streams, s)
	}
	return g
}

// send sends req (with the next step number, and the group's epoch and protocol unless set) to every
// rank and returns their responses in rank order.
func (g *group) send(req *tpfleetv1.StepRequest) []*tpfleetv1.StepResponse {
	g.t.Helper()
	g.step++
	req.Step = g.step
	if req.Epoch == 0 {
		req.Epoch = g.epoch
	}
	if req.Protocol == tpfleetv1.StepProtocol_STEP_PROTOCOL_UNSPECIFIED {
		req.Protocol = tpfleetv1.StepProtocol_STEP_PROTOCOL_V1
	}
	for r, s := range g.streams {
		if err := s.Send(req); err != nil {
			g.t.Fatalf("rank %d: send step %d: %v", r, g.step, err)
		}
	}
	resps := make([]*tpfleetv1.StepResponse, len(g.streams))
	for r, s := range g.streams {
		resp, err := s.Recv()
		if err != nil {
			g.t.Fatalf("rank %d: recv step %d: %v", r, g.step, err)
		}
		if resp.GetStep() != g.step {
			g.t.Fatalf("rank %d: response to step %d has step %d", r, g.step, resp.GetStep())
		}
		resps[r] = resp
	}
	return resps
}

// run sends the work and returns rank 0's results by sequence, failing the test on any error and when
// another rank returns results.
func (g *group) run(seqs ...*tpfleetv1.SequenceWork) map[uint64]int32 {
	g.t.Helper()
	resps := g.send(&tpfleetv1.StepRequest{Seqs: seqs})
	for r, resp := range resps {
		if resp.GetError() != "" {
			g.t.Fatalf("rank %d: step %d: %s", r, resp.GetStep(), resp.GetError())
		}
		if r > 0 && len(resp.GetResults()) > 0 {
			g.t.Fatalf("rank %d: step %d returned results %v; only rank 0 samples", r, resp.GetStep(), resp.GetResults())
		}
	}
	out := make(map[uint64]int32)
	for _, res := range resps[0].GetResults() {
		out[res.GetSeqId()] = res.GetNextId()
	}
	return out
}

// greedy is a SequenceWork that starts sequence id with prompt and greedy sampling.
func greedy(id uint64, prompt []int32, capacity int) *tpfleetv1.SequenceWork {
	return &tpfleetv1.SequenceWork{SeqId: id, Ids: prompt, Start: true, Capacity: int32(capacity),
		Sampling: &tpfleetv1.SamplingParams{Temperature: 0}, Sample: true}
}

// next is a SequenceWork that feeds one token to sequence id and samples.
func next(id uint64, tok int32) *tpfleetv1.SequenceWork {
	return &tpfleetv1.SequenceWork{SeqId: id, Ids: []int32{tok}, Sample: true}
}

// generate runs sequence id from prompt for n tokens, one step per token, feeding back rank 0's choice.
func (g *group) generate(id uint64, prompt []int32, n int) []int32 {
	g.t.Helper()
	var out []int32
	work := greedy(id, prompt, len(prompt)+n)
	for len(out) < n {
		res, ok := g.run(work)[id]
		if !ok {
			g.t.Fatalf("step %d: no result for sequence %d", g.step, id)
		}
		out = append(out, res)
		work = next(id, res)
	}
	return out
}

// wantError sends req and checks that every rank answers with an error starting with prefix.
func (g *group) wantError(req *tpfleetv1.StepRequest, prefix string) {
	g.t.Helper()
	for r, resp := range g.send(req) {
		if !strings.HasPrefix(resp.GetError(), prefix) || len(resp.GetResults()) > 0 {
			g.t.Errorf("rank %d: step %d: error %q, results %v; want an error starting with %q and no results",
				r, resp.GetStep(), resp.GetError(), resp.GetResults(), prefix)
		}
		if strings.ContainsAny(resp.GetError(), "\n\r") {
			g.t.Errorf("rank %d: step %d: error %q spans lines", r, resp.GetStep(), resp.GetError())
		}
	}
}

// health returns the health status of service on conn.
func health(t *testing.T, conn *grpc.ClientConn, service string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	resp, err := healthpb.NewHealthClient(conn).Check(testCtx(t), &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatalf("health check %q: %v", service, err)
	}
	return resp.GetStatus()
}

// members returns the IDs of the registered members.
func members(t *testing.T, cli *cluster.Client) []string {
	t.Helper()
	ms, _, err := cli.Members(testCtx(t))
	if err != nil {
		t.Fatalf("Members: %v", err)
	}
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.ID
	}
	return ids
}

// statusOf calls the Status RPC.
func statusOf(t *testing.T, c tpfleetv1.WorkerClient) *tpfleetv1.StatusResponse {
	t.Helper()
	st, err := c.Status(testCtx(t), &tpfleetv1.StatusRequest{})
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	return st
}

func equalIDs(a, b []int32) bool { return slices.Equal(a, b) }

func fmtIDs(ids []int32) string { return fmt.Sprint(ids) }

// goldenPromptLogprobs returns, for each prompt position but the last, the log-softmax (float64) of HF's
// logits there (golden.safetensors' greedy_logits): row i scores prompt token i+1.
func goldenPromptLogprobs(t *testing.T, gold golden) [][]float64 {
	t.Helper()
	c, err := safetensors.OpenCheckpoint(filepath.Join(fixture, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	logits, shape, err := c.Float32s("greedy_logits")
	if err != nil {
		t.Fatal(err)
	}
	vocab := shape[len(shape)-1]
	var out [][]float64
	for i := range len(gold.Prompt) - 1 {
		row := logits[i*vocab : (i+1)*vocab]
		m := math.Inf(-1)
		for _, x := range row {
			m = max(m, float64(x))
		}
		sum := 0.0
		for _, x := range row {
			sum += math.Exp(float64(x) - m)
		}
		lp := make([]float64, vocab)
		for j, x := range row {
			lp[j] = float64(x) - m - math.Log(sum)
		}
		out = append(out, lp)
	}
	return out
}
