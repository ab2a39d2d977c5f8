package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// fakeVocab bounds the fake worker's tokens, as a model's vocabulary would.
const fakeVocab = 512

// fakeWorker is an in-process Worker server that checks the step protocol and "samples" the successor
// of the last id fed to a sequence: a prompt ending in p generates p+1, p+2, ... (mod fakeVocab). It
// records every StepRequest, so tests can compare what the ranks of a group received.
type fakeWorker struct {
	pb.UnimplementedWorkerServer
	id   string
	addr string
	srv  *grpc.Server

	mu sync.Mutex
	// hook, when set, runs before each step is answered, on the stream's goroutine and without mu; a
	// non-empty return fails the step with that error text.
	hook func(req *pb.StepRequest) string
	// next, when set, chooses the id sampled after a sequence's ids (its prompt and the ids fed since);
	// it runs under mu.
	next   func(seq []int32) int32
	epoch  int64
	group  int32
	rank   int32
	state  string
	seqs   map[uint64][]int32
	caps   map[uint64]int
	lps    map[uint64]*pb.SamplingParams // sequences whose sampling asks for logprobs
	plps   map[uint64]bool               // sequences started with prompt_logprobs, until they sample
	steps  []*pb.StepRequest
	status int // Status calls
}

var _ pb.WorkerServer = (*fakeWorker)(nil)

// startFakeWorker serves a fake worker on 127.0.0.1:0 until the test ends; opts configure its gRPC
// server (TLS credentials).
func startFakeWorker(t *testing.T, id string, opts ...grpc.ServerOption) *fakeWorker {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w := &fakeWorker{id: id, addr: lis.Addr().String(), state: "idle", seqs: map[uint64][]int32{}, caps: map[uint64]int{}, lps: map[uint64]*pb.SamplingParams{}, plps: map[uint64]bool{}}
	w.srv = grpc.NewServer(opts...)
	pb.RegisterWorkerServer(w.srv, w)
	go func() { _ = w.srv.Serve(lis) }()
	t.Cleanup(w.srv.Stop)
	return w
}

// serve puts the fake in epoch as group and rank, serving.
func (w *fakeWorker) serve(epoch int64, group, rank int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if epoch != w.epoch {
		clear(w.seqs)
		clear(w.caps)
	}
	w.epoch, w.group, w.rank, w.state = epoch, int32(group), int32(rank), "serving"
}

func (w *fakeWorker) setHook(hook func(req *pb.StepRequest) string) {
	w.mu.Lock()
	w.hook = hook
	w.mu.Unlock()
}

func (w *fakeWorker) setNext(next func(seq []int32) int32) {
	w.mu.Lock()
	w.next = next
	w.mu.Unlock()
}

func (w *fakeWorker) setState(s string) {
	w.mu.Lock()
	w.state = s
	w.mu.Unlock()
}

// follow registers the fake as a member of the cluster and applies every plan it sees, until the test
// ends. It returns the registration.
func (w *fakeWorker) follow(t *testing.T, cl *cluster.Client) *cluster.Registration {
	t.Helper()
	return w.followAs(t, cl, cluster.Member{ID: w.id, Addr: w.addr, Host: "test"}, 2*time.Second)
}

// followAs is follow with the member m registered under a lease of ttl. The plan watch ends with the
// test or when cl closes.
func (w *fakeWorker) followAs(t *testing.T, cl *cluster.Client, m cluster.Member, ttl time.Duration) *cluster.Registration {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	reg, err := cl.Register(ctx, m, ttl)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for p := range cl.WatchPlan(ctx) {
			placed := false
			for _, g := range p.Groups {
				for _, a := range g.Ranks {
					if a.MemberID == w.id {
						w.serve(p.Epoch, g.ID, a.Rank)
						placed = true
					}
				}
			}
			if !placed {
				w.mu.Lock()
				w.epoch, w.state, w.group, w.rank = p.Epoch, "idle", -1, -1
				w.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return reg
}

func (w *fakeWorker) Status(context.Context, *pb.StatusRequest) (*pb.StatusResponse, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.status++
	return &pb.StatusResponse{MemberId: w.id, Epoch: w.epoch, Group: w.group, Rank: w.rank, State: w.state, Sequences: int32(len(w.seqs))}, nil
}

func (w *fakeWorker) Step(stream grpc.BidiStreamingServer[pb.StepRequest, pb.StepResponse]) error {
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		resp := &pb.StepResponse{Step: req.GetStep()}
		w.mu.Lock()
		hook := w.hook
		w.mu.Unlock()
		if hook != nil {
			resp.Error = hook(req)
		}
		if resp.Error == "" {
			resp.Results, err = w.step(req)
			if err != nil {
				resp.Error = err.Error()
			}
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
	}
}

// step checks and runs one request.
func (w *fakeWorker) step(req *pb.StepRequest) ([]*pb.SequenceResult, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.steps = append(w.steps, proto.Clone(req).(*pb.StepRequest))
	if req.GetEpoch() != w.epoch || w.state != "serving" {
		return nil, fmt.Errorf("fake: epoch %d, worker on %d (%s)", req.GetEpoch(), w.epoch, w.state)
	}
	var out []*pb.SequenceResult
	for _, s := range req.GetSeqs() {
		id := s.GetSeqId()
		if s.GetStart() {
			w.seqs[id], w.caps[id] = nil, int(s.GetCapacity())
			delete(w.lps, id)
			w.plps[id] = s.PromptLogprobs != nil
			if s.GetSampling().GetLogprobs() {
				w.lps[id] = s.GetSampling()
			}
		} else if _, ok := w.seqs[id]; !ok {
			return nil, fmt.Errorf("fake: unknown sequence %d", id)
		}
		if len(s.GetIds()) == 0 || len(w.seqs[id])+len(s.GetIds()) > w.caps[id] {
			return nil, fmt.Errorf("fake: sequence %d: %d ids after %d, capacity %d", id, len(s.GetIds()), len(w.seqs[id]), w.caps[id])
		}
		w.seqs[id] = append(w.seqs[id], s.GetIds()...)
		if s.GetSample() && w.rank == 0 {
			ids := w.seqs[id]
			next := (ids[len(ids)-1] + 1) % fakeVocab
			if w.next != nil {
				next = w.next(ids)
			}
			res := &pb.SequenceResult{SeqId: id, NextId: next}
			if sp := w.lps[id]; sp != nil { // the chosen id has -1/8 and is the top one; then id+1, id+2, … at -1, -2, …
				res.Logprobs = &pb.ChosenLogprobs{Logprob: -0.125}
				for k := range sp.GetTopLogprobs() {
					l := &pb.TokenLogprob{Id: next, Logprob: -0.125}
					if k > 0 {
						l = &pb.TokenLogprob{Id: (next + k) % fakeVocab, Logprob: -float32(k)}
					}
					res.Logprobs.Top = append(res.Logprobs.Top, l)
				}
			}
			if w.plps[id] { // prompt token i (i >= 1) has -i/4, with no top ones
				for i := 1; i < len(ids); i++ {
					res.PromptLogprobs = append(res.PromptLogprobs, &pb.ChosenLogprobs{Logprob: -float32(i) / 4})
				}
				w.plps[id] = false
			}
			out = append(out, res)
		}
	}
	for _, id := range req.GetRelease() {
		delete(w.seqs, id)
		delete(w.caps, id)
		delete(w.lps, id)
		delete(w.plps, id)
	}
	return out, nil
}

// recorded returns a copy of the requests the fake has run.
func (w *fakeWorker) recorded() []*pb.StepRequest {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]*pb.StepRequest(nil), w.steps...)
}

// held returns the number of sequences the fake holds.
func (w *fakeWorker) held() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.seqs)
}

// echo returns what the fake generates after prompt: n successors of its last id.
func echo(prompt []int, n int) []int {
	out := make([]int, n)
	last := prompt[len(prompt)-1]
	for i := range out {
		last = (last + 1) % fakeVocab
		out[i] = last
	}
	return out
}

// eventually retries cond every few milliseconds until it holds, failing the test after 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9._-]`)

var (
	runs  atomic.Int64 // numbers the tests that asked for a cluster name
	names sync.Map     // *testing.T → its cluster name
)

// clusterName returns a cluster name unique to the test, also across -count=N runs of it.
func clusterName(t *testing.T) string {
	name, _ := names.LoadOrStore(t, fmt.Sprintf("%s-%d", unsafeName.ReplaceAllString(t.Name(), "-"), runs.Add(1)))
	return name.(string)
}
