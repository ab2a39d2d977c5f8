package coordinator

import (
	"context"
	"errors"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// testGroup runs a group of the fake workers (rank order) in epoch 1 over q until the test ends.
func testGroup(t *testing.T, q *queue, maxBatch, budget int, ws ...*fakeWorker) (failed *atomic.Int32) {
	t.Helper()
	return testGroupWith(t, q, maxBatch, budget, 0, ws...)
}

// testGroupWith is testGroup with a prefill chunk (0: none).
func testGroupWith(t *testing.T, q *queue, maxBatch, budget, prefillChunk int, ws ...*fakeWorker) (failed *atomic.Int32) {
	t.Helper()
	g := cluster.Group{ID: 0}
	for r, w := range ws {
		w.serve(1, 0, r)
		g.Ranks = append(g.Ranks, cluster.Assignment{Rank: r, MemberID: w.id, Addr: w.addr})
	}
	failed = new(atomic.Int32)
	var seq atomic.Uint64
	cfg := groupConfig{
		epoch: 1, group: g, queue: q, maxBatch: maxBatch, tokenBudget: budget, prefillChunk: prefillChunk, seqIDs: &seq,
		stepTimeout: DefaultStepTimeout, stepTokenTimeout: DefaultStepTokenTimeout,
		dial: workerDialer(nil), log: zap.NewNop(), onReady: func(bool) {}, onFailed: func() { failed.Add(1) },
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { runGroup(ctx, cfg) })
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	return failed
}

func greedyRequest(prompt []int32, maxTokens int, stop ...int32) *request {
	s := make(map[int32]bool)
	for _, id := range stop {
		s[id] = true
	}
	return newRequest(prompt, maxTokens, sample.Params{TopP: 1}, s)
}

// result waits for r to end and returns everything it emitted.
func result(t *testing.T, r *request) ([]int32, string, error) {
	t.Helper()
	var ids []int32
	timeout := time.After(10 * time.Second)
	for {
		select {
		case <-r.notify:
		case <-timeout:
			t.Fatalf("request with prompt %v did not end", r.prompt)
		}
		got, _, done, finish, err := r.take()
		ids = append(ids, got...)
		if done {
			return ids, finish, err
		}
	}
}

// stepGate holds each step of a fake worker until the test lets it go, so that a test decides what is
// queued at each step boundary.
type stepGate struct {
	seen    chan *pb.StepRequest
	proceed chan struct{}
}

func gate(w *fakeWorker) *stepGate {
	g := &stepGate{seen: make(chan *pb.StepRequest), proceed: make(chan struct{})}
	w.setHook(func(req *pb.StepRequest) string {
		g.seen <- proto.Clone(req).(*pb.StepRequest)
		<-g.proceed
		return ""
	})
	return g
}

// next returns the next step the worker received (it is held until release).
func (g *stepGate) next(t *testing.T) *pb.StepRequest {
	t.Helper()
	select {
	case req := <-g.seen:
		return req
	case <-time.After(10 * time.Second):
		t.Fatal("no step came")
		return nil
	}
}

func (g *stepGate) release() { g.proceed <- struct{}{} }

// work summarises a step's work for comparison: seq index (order of arrival), ids, start, sample.
type work struct {
	seq    uint64
	ids    []int32
	start  bool
	sample bool
}

func works(req *pb.StepRequest) []work {
	var out []work
	for _, s := range req.GetSeqs() {
		out = append(out, work{s.GetSeqId(), s.GetIds(), s.GetStart(), s.GetSample()})
	}
	return out
}

func equalWorks(a, b []work) bool {
	return slices.EqualFunc(a, b, func(x, y work) bool {
		return x.seq == y.seq && slices.Equal(x.ids, y.ids) && x.start == y.start && x.sample == y.sample
	})
}

// TestContinuousBatching drives a TP=2 group of fake workers step by step: requests queued while a step
// runs join the batch at the next step boundary, prompts are fed in pieces within the token budget
// (sampling only after the last piece), decodes come first, finished sequences are released, a
// cancelled sequence is released at the next boundary, and both ranks receive the same requests in the
// same order.
func TestContinuousBatching(t *testing.T) {
	w0, w1 := startFakeWorker(t, "w0"), startFakeWorker(t, "w1")
	g := gate(w0)
	q := newQueue(16)
	testGroup(t, q, 4, 8, w0, w1)

	a := greedyRequest([]int32{10}, 3)
	if err := q.push(a); err != nil {
		t.Fatal(err)
	}
	s1 := g.next(t)
	seqA := s1.GetSeqs()[0].GetSeqId()
	if want := []work{{seqA, []int32{10}, true, true}}; !equalWorks(works(s1), want) || s1.GetSeqs()[0].GetCapacity() != 4 {
		t.Fatalf("step 1 = %+v (capacity %d), want %+v (capacity 4)", works(s1), s1.GetSeqs()[0].GetCapacity(), want)
	}
	// b (10 prompt ids) and c join at the next boundary; the budget of 8 leaves b 7 ids after a's
	// decode, and nothing for c.
	b := greedyRequest([]int32{100, 101, 102, 103, 104, 105, 106, 107, 108, 109}, 2)
	c := greedyRequest([]int32{200}, 2)
	for _, r := range []*request{b, c} {
		if err := q.push(r); err != nil {
			t.Fatal(err)
		}
	}
	g.release()
	s2 := g.next(t)
	seqB := seqA + 1
	if want := []work{{seqA, []int32{11}, false, true}, {seqB, []int32{100, 101, 102, 103, 104, 105, 106}, true, false}}; !equalWorks(works(s2), want) {
		t.Fatalf("step 2 = %+v, want %+v", works(s2), want)
	}
	g.release()
	s3 := g.next(t)
	seqC := seqB + 1
	if want := []work{{seqA, []int32{12}, false, true}, {seqB, []int32{107, 108, 109}, false, true}, {seqC, []int32{200}, true, true}}; !equalWorks(works(s3), want) {
		t.Fatalf("step 3 = %+v, want %+v", works(s3), want)
	}
	g.release()
	s4 := g.next(t)
	if want := []work{{seqB, []int32{110}, false, true}, {seqC, []int32{201}, false, true}}; !equalWorks(works(s4), want) || !slices.Equal(s4.GetRelease(), []uint64{seqA}) {
		t.Fatalf("step 4 = %+v release %v, want %+v release [%d]", works(s4), s4.GetRelease(), want, seqA)
	}
	g.release()
	for _, tc := range []struct {
		name string
		r    *request
		want []int32
	}{{"a", a, []int32{11, 12, 13}}, {"b", b, []int32{110, 111}}, {"c", c, []int32{201, 202}}} {
		ids, finish, err := result(t, tc.r)
		if !slices.Equal(ids, tc.want) || finish != FinishLength || err != nil {
			t.Errorf("request %s = %v, %q, %v; want %v, length", tc.name, ids, finish, err, tc.want)
		}
	}
	s5 := g.next(t) // the release of b and c, with no work
	if len(s5.GetSeqs()) != 0 || !slices.Equal(s5.GetRelease(), []uint64{seqB, seqC}) {
		t.Fatalf("step 5 = %+v release %v, want no work, release [%d %d]", works(s5), s5.GetRelease(), seqB, seqC)
	}
	g.release()

	// Cancellation: d is released at the step boundary after its client went away.
	d := greedyRequest([]int32{300}, 100)
	if err := q.push(d); err != nil {
		t.Fatal(err)
	}
	s6 := g.next(t)
	seqD := s6.GetSeqs()[0].GetSeqId()
	d.cancel()
	g.release()
	s7 := g.next(t)
	if len(s7.GetSeqs()) != 0 || !slices.Equal(s7.GetRelease(), []uint64{seqD}) {
		t.Fatalf("step after cancel = %+v release %v, want no work, release [%d]", works(s7), s7.GetRelease(), seqD)
	}
	g.release()
	eventually(t, "both ranks to run 7 steps", func() bool { return len(w0.recorded()) == 7 && len(w1.recorded()) == 7 })
	if r0, r1 := w0.recorded(), w1.recorded(); !slices.EqualFunc(r0, r1, func(a, b *pb.StepRequest) bool { return proto.Equal(a, b) }) {
		t.Errorf("rank 0 and rank 1 received different steps:\n%v\n%v", r0, r1)
	}
	if n := w0.held(); n != 0 {
		t.Errorf("worker holds %d sequences after every request ended, want 0", n)
	}
}

// TestBatchStopsAtStopID: a stop id ends a request with "stop", the id included.
func TestBatchStopsAtStopID(t *testing.T) {
	w := startFakeWorker(t, "w0")
	q := newQueue(4)
	testGroup(t, q, 4, 16, w)
	r := greedyRequest([]int32{7, 8}, 10, 12)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	ids, finish, err := result(t, r)
	if !slices.Equal(ids, []int32{9, 10, 11, 12}) || finish != FinishStop || err != nil {
		t.Errorf("generate with stop id 12 = %v, %q, %v; want [9 10 11 12], stop", ids, finish, err)
	}
}

// TestBatchStepErrors: a step that fails whatever group runs it ends its request with ErrStepFailed
// (INTERNAL) after maxFailures tries, and the group reconnects and serves the next request; a request
// whose group broke (ErrWorkerLost) and that no group takes again fails at its resume deadline with
// ErrNotPlaced (UNAVAILABLE), which wraps the failure.
func TestBatchStepErrors(t *testing.T) {
	w0, w1 := startFakeWorker(t, "w0"), startFakeWorker(t, "w1")
	var fail atomic.Bool
	var tries atomic.Int32
	w1.setHook(func(*pb.StepRequest) string {
		if fail.Load() {
			tries.Add(1)
			return "worker: failed: epoch 1: all-reduce: peer gone"
		}
		return ""
	})
	q := newQueue(4)
	q.resumeTimeout = time.Second
	failed := testGroup(t, q, 4, 16, w0, w1)

	fail.Store(true)
	r := greedyRequest([]int32{1}, 5)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	_, _, err := result(t, r)
	if !errors.Is(err, ErrStepFailed) || Code(err).String() != "Internal" {
		t.Fatalf("request on a failing step ended with %v (code %v), want ErrStepFailed, Internal", err, Code(err))
	}
	if n := tries.Load(); n != maxFailures {
		t.Errorf("a request failing every step was tried %d times, want %d", n, maxFailures)
	}
	fail.Store(false)
	r = greedyRequest([]int32{1}, 5)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	if ids, _, err := result(t, r); err != nil || !slices.Equal(ids, []int32{2, 3, 4, 5, 6}) {
		t.Fatalf("request after the group reconnected = %v, %v; want [2 3 4 5 6]", ids, err)
	}

	// A broken stream: rank 1 goes away while a step is in flight, for good.
	released := func(w *fakeWorker) bool {
		steps := w.recorded()
		return len(steps) > 0 && len(steps[len(steps)-1].GetSeqs()) == 0
	}
	eventually(t, "the release of the last request", func() bool { return released(w0) && released(w1) })
	g := gate(w0)
	r = greedyRequest([]int32{1}, 5)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	g.next(t)
	w1.srv.Stop()
	if _, _, err := result(t, r); !errors.Is(err, ErrNotPlaced) || !errors.Is(err, ErrWorkerLost) || Code(err).String() != "Unavailable" {
		t.Fatalf("request on a broken stream ended with %v (code %v), want ErrNotPlaced wrapping ErrWorkerLost, Unavailable", err, Code(err))
	}
	g.release()
	if failed.Load() != 0 {
		t.Errorf("onFailed called %d times, want 0: no worker reported its epoch failed", failed.Load())
	}
}

// TestBatchResumesAfterFailure: a step that fails once (a peer's communicator closed by a plan change,
// a stray epoch mismatch) does not fail the requests in flight: they resume with their prompt and the
// ids already streamed (re-prefill, the sampler skipping the draws made), and the client gets every id
// once, as if nothing happened.
func TestBatchResumesAfterFailure(t *testing.T) {
	w0, w1 := startFakeWorker(t, "w0"), startFakeWorker(t, "w1")
	var once atomic.Bool
	w1.setHook(func(req *pb.StepRequest) string {
		for _, s := range req.GetSeqs() {
			if slices.Contains(s.GetIds(), 4) && once.CompareAndSwap(false, true) {
				return "worker: epoch mismatch: request epoch 1, worker on epoch 2 (loading)"
			}
		}
		return ""
	})
	q := newQueue(4)
	testGroup(t, q, 4, 16, w0, w1)
	r := greedyRequest([]int32{1}, 6)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	ids, finish, err := result(t, r)
	if !slices.Equal(ids, []int32{2, 3, 4, 5, 6, 7}) || finish != FinishLength || err != nil {
		t.Fatalf("request across a failed step = %v, %q, %v; want [2 3 4 5 6 7], length, no error", ids, finish, err)
	}
	var resumed *pb.SequenceWork
	for _, st := range w0.recorded() {
		for _, s := range st.GetSeqs() {
			if s.GetStart() && s.GetResumed() > 0 {
				resumed = s
			}
		}
	}
	if resumed == nil || !slices.Equal(resumed.GetIds(), []int32{1, 2, 3, 4}) || resumed.GetResumed() != 3 || !resumed.GetSample() {
		t.Errorf("resumed sequence's start = %v, want ids [1 2 3 4], resumed 3, sample", resumed)
	}
}

// TestGroupReportsFailedEpoch: after a step fails, a worker that reports its epoch failed makes the
// group call onFailed (the leader then writes a new epoch).
func TestGroupReportsFailedEpoch(t *testing.T) {
	w := startFakeWorker(t, "w0")
	w.setHook(func(*pb.StepRequest) string {
		w.setState(workerFailed)
		return "worker: failed: epoch 1: boom"
	})
	q := newQueue(4)
	q.resumeTimeout = 500 * time.Millisecond
	failed := testGroup(t, q, 4, 16, w)
	r := greedyRequest([]int32{1}, 5)
	if err := q.push(r); err != nil {
		t.Fatal(err)
	}
	if _, _, err := result(t, r); !errors.Is(err, ErrStepFailed) {
		t.Fatalf("request ended with %v, want ErrStepFailed", err)
	}
	eventually(t, "onFailed", func() bool { return failed.Load() > 0 })
}

// TestPrefillChunk: with a prefill chunk, a long prompt that joins a running batch is fed in pieces of at
// most the chunk over several steps, and every one of those steps also decodes the running sequence: the
// long prompt does not stall it (counted in steps). The outputs are those of a model that reads every id
// in order (greedy over the whole sequence), as without chunking.
func TestPrefillChunk(t *testing.T) {
	const chunk = 8
	w0, w1 := startFakeWorker(t, "w0"), startFakeWorker(t, "w1")
	sum := func(ids []int32) int32 { // the next id depends on every id before it, in order
		var h int32
		for _, id := range ids {
			h = (h*31 + id) % fakeVocab
		}
		return h
	}
	w0.setNext(sum)
	g := gate(w0)
	q := newQueue(16)
	testGroupWith(t, q, 4, 64, chunk, w0, w1)

	a := greedyRequest([]int32{10}, 12)
	if err := q.push(a); err != nil {
		t.Fatal(err)
	}
	s1 := g.next(t)
	seqA := s1.GetSeqs()[0].GetSeqId()
	long := make([]int32, 37) // 5 pieces of 8: 8, 8, 8, 8, 5
	for i := range long {
		long[i] = int32(100 + i)
	}
	b := greedyRequest(long, 3)
	if err := q.push(b); err != nil {
		t.Fatal(err)
	}
	g.release()
	fed, prefillSteps := 0, 0
	for fed < len(long) {
		st := g.next(t)
		ws := works(st)
		if len(ws) != 2 || ws[0].seq != seqA || len(ws[0].ids) != 1 || !ws[0].sample {
			t.Fatalf("step %d while b is prefilled = %+v, want a's decode first, then b's piece", st.GetStep(), ws)
		}
		piece := ws[1]
		want := min(chunk, len(long)-fed)
		if !slices.Equal(piece.ids, long[fed:fed+want]) || piece.start != (fed == 0) || piece.sample != (fed+want == len(long)) {
			t.Fatalf("step %d: b's piece = %+v, want ids %v (start %v, sample %v)", st.GetStep(), piece, long[fed:fed+want], fed == 0, fed+want == len(long))
		}
		fed += want
		prefillSteps++
		g.release()
	}
	if prefillSteps != 5 {
		t.Errorf("b's 37-token prompt took %d steps, want 5 pieces of at most %d", prefillSteps, chunk)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(done)
	wg.Go(func() { // the remaining steps run ungated
		for {
			select {
			case <-g.seen:
				select {
				case g.proceed <- struct{}{}:
				case <-done:
					return
				}
			case <-done:
				return
			}
		}
	})
	greedyOf := func(prompt []int32, n int) []int32 {
		seq, out := slices.Clone(prompt), []int32(nil)
		for range n {
			id := sum(seq)
			out, seq = append(out, id), append(seq, id)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		r    *request
		want []int32
	}{{"a", a, greedyOf([]int32{10}, 12)}, {"b", b, greedyOf(long, 3)}} {
		ids, finish, err := result(t, tc.r)
		if !slices.Equal(ids, tc.want) || finish != FinishLength || err != nil {
			t.Errorf("request %s = %v, %q, %v; want %v, length", tc.name, ids, finish, err, tc.want)
		}
	}
}

// TestPlanPromptLogprobsPieces: a request that asks for its prompt's logprobs is fed at most
// promptLogprobsChunk prompt tokens a step (the workers compute the lm_head over all of them) and asks
// for them at its start only; another request's prompt takes the rest of the budget as before.
func TestPlanPromptLogprobsPieces(t *testing.T) {
	q := newQueue(4)
	var ids atomic.Uint64
	b := &batch{cfg: groupConfig{queue: q, maxBatch: 4, tokenBudget: 4096, seqIDs: &ids}}
	n := int32(3)
	asking := newRequest(make([]int32, 1200), 1, sample.Params{}, nil)
	asking.promptLogprobs = &n
	plain := newRequest(make([]int32, 1200), 1, sample.Params{}, nil)
	for _, r := range []*request{asking, plain} {
		if err := q.push(r); err != nil {
			t.Fatal(err)
		}
	}
	var pieces [][2]int // per step: the asking request's piece and the plain one's
	for len(pieces) < 4 {
		work, _ := b.plan()
		var p [2]int
		for _, w := range work {
			k := int(w.GetSeqId()) - 1
			p[k] = len(w.GetIds())
			if (w.PromptLogprobs != nil) != (k == 0 && w.GetStart()) {
				t.Errorf("step %d: seq %d (start %v) prompt_logprobs %v, want them on the asking request's start only", len(pieces), k+1, w.GetStart(), w.PromptLogprobs)
			}
		}
		pieces = append(pieces, p)
	}
	if want := [][2]int{{512, 1200}, {512, 0}, {176, 0}, {0, 0}}; !reflect.DeepEqual(pieces, want) {
		t.Errorf("prompt pieces per step = %v, want %v", pieces, want)
	}
}
