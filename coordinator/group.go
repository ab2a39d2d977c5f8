package coordinator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/wait"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// Worker states as StatusResponse.state reports them ("idle" and "loading" besides).
const (
	workerServing = "serving"
	workerFailed  = "failed"
)

// Timings of a group's connection to its workers.
const (
	statusTimeout  = 2 * time.Second        // one Status call
	pollFirst      = 50 * time.Millisecond  // first wait between Status calls while a worker loads
	pollMax        = 500 * time.Millisecond // longest wait between Status calls
	reconnectFirst = 100 * time.Millisecond // first wait before a failed group reconnects
	reconnectMax   = 2 * time.Second        // longest wait before a failed group reconnects
)

// errEpochFailed means a worker reports its epoch failed: it serves nothing until a new epoch.
var errEpochFailed = errors.New("failed in epoch")

// dialFunc opens a client connection to a worker; tests substitute in-process listeners.
type dialFunc func(addr string) (*grpc.ClientConn, error)

// groupConfig is what a group runner needs from the coordinator.
type groupConfig struct {
	epoch       int64
	leaderRev   int64 // the leadership's election revision, sent in every StepRequest (fencing); 0: none
	group       cluster.Group
	queue       *queue
	maxBatch    int
	tokenBudget int
	// prefillChunk caps one sequence's prompt piece per step (0: none beyond the budget).
	prefillChunk int
	// A step must be answered within stepTimeout plus stepTokenTimeout per token it feeds.
	stepTimeout      time.Duration
	stepTokenTimeout time.Duration
	seqIDs           *atomic.Uint64 // shared by the groups: sequence ids are unique per coordinator
	dial             dialFunc
	log              *zap.Logger
	// onReady is called with true when the group starts serving and false when it stops; from the
	// group's goroutine, so it must not block.
	onReady func(ready bool)
	// onFailed is called when a worker of the group reports its epoch failed (it stays failed until a
	// new epoch); from the group's goroutine, so it must not block.
	onFailed func()
	// obs records the group's steps (metrics.go); nil records nothing.
	obs *groupObs
	// kvCaps receives the group's KV budget while it serves (admission.go); nil: not reported.
	kvCaps *capacities
}

// sequence is a request in a group's batch.
type sequence struct {
	id      uint64
	req     *request
	tokens  []int32 // prompt and the ids chosen so far: what the workers must have seen to sample next
	fed     int     // tokens sent to the workers
	started bool    // the start work was sent
	blocks  int     // KV blocks reserved in the batch's kvBudget
}

// runGroup connects to the group's workers, waits until each serves the epoch, and runs the step loop,
// reconnecting after a failure, until ctx ends. Whether ctx ended or the group failed, the requests in
// its batch go back to the head of the queue (queue.resume; cancelled ones are dropped), to run again
// from their prompt and the ids chosen so far in whichever group takes them first.
func runGroup(ctx context.Context, cfg groupConfig) {
	backoff := reconnectFirst
	for ctx.Err() == nil {
		start := time.Now()
		err := serveGroup(ctx, cfg)
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > 10*reconnectMax {
			backoff = reconnectFirst
		}
		if errors.Is(err, errEpochFailed) {
			cfg.onFailed()
		}
		cfg.log.Warn("group failed; reconnecting", zap.Error(err), zap.Duration("after", backoff))
		if !wait.Sleep(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, reconnectMax)
	}
}

// rankReply is one message (or the end) of a rank's Step stream.
type rankReply struct {
	rank int
	resp *pb.StepResponse
	err  error
}

// serveGroup is one connection of the group: it returns when ctx ends (ctx's error) or the group fails.
func serveGroup(ctx context.Context, cfg groupConfig) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ranks := cfg.group.Ranks
	conns := make([]*grpc.ClientConn, 0, len(ranks))
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	clients := make([]pb.WorkerClient, len(ranks))
	for i, a := range ranks {
		conn, err := cfg.dial(a.Addr)
		if err != nil {
			return fmt.Errorf("%w: rank %d (%s at %s): %w", ErrWorkerLost, i, a.MemberID, a.Addr, err)
		}
		conns = append(conns, conn)
		clients[i] = pb.NewWorkerClient(conn)
	}

	start := time.Now()
	plans := make([]*pb.MemoryPlan, len(ranks))
	for i, a := range ranks {
		st, err := waitServing(ctx, clients[i], cfg.epoch, cfg.group.ID, a, cfg.log)
		if err != nil {
			return err
		}
		plans[i] = st.GetMemory()
	}
	piece := cfg.tokenBudget // the most of one sequence a step feeds
	if cfg.prefillChunk > 0 {
		piece = min(piece, cfg.prefillChunk)
	}
	kv, err := budgetOf(plans, piece)
	if err != nil {
		return err
	}

	streams := make([]grpc.BidiStreamingClient[pb.StepRequest, pb.StepResponse], len(ranks))
	for i, a := range ranks {
		s, err := clients[i].Step(ctx)
		if err != nil {
			return fmt.Errorf("%w: rank %d (%s at %s): open step stream: %w", ErrWorkerLost, i, a.MemberID, a.Addr, ctxErr(ctx, err))
		}
		streams[i] = s
	}
	replies := make(chan rankReply, len(ranks)) // each receiver has at most one reply in flight per step
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: ends the receivers
	for i, s := range streams {
		wg.Go(func() {
			for {
				resp, err := s.Recv()
				select {
				case replies <- rankReply{rank: i, resp: resp, err: err}:
				case <-ctx.Done():
					return
				}
				if err != nil {
					return
				}
			}
		})
	}

	members := make([]string, len(ranks))
	for i, a := range ranks {
		members[i] = a.MemberID
	}
	fields := []zap.Field{zap.Strings("members", members), zap.Duration("took", time.Since(start).Round(time.Millisecond))}
	if kv != nil {
		fields = append(fields, zap.Int("kv-blocks", kv.blocks), zap.Int("block-size", kv.geom.BlockSize),
			zap.Int("longest-context", kv.geom.Longest(kv.blocks)))
		cfg.obs.setKV(kv)
	}
	cfg.log.Info("group serving", fields...)
	if cfg.kvCaps != nil {
		cfg.kvCaps.set(cfg.group.ID, kv)
		defer cfg.kvCaps.set(cfg.group.ID, nil)
	}
	cfg.onReady(true)
	defer cfg.onReady(false)
	b := &batch{cfg: cfg, streams: streams, replies: replies, kv: kv}
	err = b.loop(ctx)
	b.stop(ctx, err)
	return err
}

// waitServing polls a worker's Status until it serves epoch as the planned group and rank, or ctx ends;
// it returns the serving worker's status.
func waitServing(ctx context.Context, c pb.WorkerClient, epoch int64, group int, a cluster.Assignment, log *zap.Logger) (*pb.StatusResponse, error) {
	backoff := pollFirst
	var last string
	for {
		sctx, cancel := context.WithTimeout(ctx, statusTimeout)
		st, err := c.Status(sctx, &pb.StatusRequest{})
		cancel()
		var now string
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case err != nil:
			now = "unreachable: " + err.Error()
		case st.GetEpoch() == epoch && st.GetState() == workerServing:
			if st.GetGroup() != int32(group) || st.GetRank() != int32(a.Rank) || (st.GetMemberId() != "" && st.GetMemberId() != a.MemberID) {
				return nil, fmt.Errorf("%w: worker at %s serves epoch %d as %s group %d rank %d, want %s group %d rank %d",
					ErrStepFailed, a.Addr, epoch, st.GetMemberId(), st.GetGroup(), st.GetRank(), a.MemberID, group, a.Rank)
			}
			return st, nil
		case st.GetEpoch() == epoch && st.GetState() == workerFailed:
			return nil, fmt.Errorf("%w: worker %s at %s: %w %d", ErrStepFailed, a.MemberID, a.Addr, errEpochFailed, epoch)
		default:
			now = fmt.Sprintf("epoch %d, %s", st.GetEpoch(), st.GetState())
		}
		if now != last {
			log.Debug("waiting for worker", zap.Int("rank", a.Rank), zap.String("member-id", a.MemberID),
				zap.String("addr", a.Addr), zap.String("worker-state", now))
			last = now
		}
		if !wait.Sleep(ctx, backoff) {
			return nil, ctx.Err()
		}
		backoff = min(2*backoff, pollMax)
	}
}

// batch is the step loop of one connected group: the sequences it runs and its workers' streams.
type batch struct {
	cfg     groupConfig
	streams []grpc.BidiStreamingClient[pb.StepRequest, pb.StepResponse]
	replies <-chan rankReply
	step    uint64
	active  []*sequence
	release []uint64  // sequences to release at the next step
	kv      *kvBudget // the group's KV blocks (admission.go); nil: no memory plans, not admitted by blocks
}

// loop runs steps until ctx ends or a step fails. Each iteration is one step boundary: cancelled
// sequences are released, the batch is filled from the queue within MaxBatch and the token budget, and
// one StepRequest goes to every rank.
func (b *batch) loop(ctx context.Context) error {
	for {
		queued := b.cfg.queue.wait() // before popping, so that a request added after the pop wakes us
		b.dropCancelled()
		work, sampled := b.plan()
		b.cfg.obs.setRunning(len(b.active))
		if len(work) == 0 && len(b.release) == 0 {
			select {
			case <-queued:
				continue
			case r := <-b.replies:
				return b.unexpected(r)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		start := time.Now()
		results, err := b.run(ctx, work)
		b.cfg.obs.step(time.Since(start), len(work), workTokens(work), err)
		if err != nil {
			return err
		}
		b.deliver(sampled, results)
		b.cfg.obs.setRunning(len(b.active))
	}
}

// dropCancelled takes the sequences whose clients went away out of the batch.
func (b *batch) dropCancelled() {
	b.active = slices.DeleteFunc(b.active, func(s *sequence) bool {
		if !s.req.cancelled() {
			return false
		}
		b.cfg.log.Debug("sequence cancelled", zap.Uint64("seq-id", s.id), zap.Int("generated", len(s.req.gen)))
		b.free(s)
		if s.started {
			b.release = append(b.release, s.id)
		}
		return true
	})
}

// promptLogprobsChunk caps the prompt piece a step feeds a sequence whose prompt's logprobs were asked
// for: the workers compute the lm_head over every position of its pieces, promptLogprobsChunk × vocab
// floats a step at most (400 MB for Llama 4's 202048 tokens).
const promptLogprobsChunk = 512

// plan builds the work of the next step: a decode for every sequence that has one new token, prompt
// pieces within what is left of the token budget (each at most prefillChunk tokens), then new sequences
// from the queue while the batch has room. It returns the work and the sequences that asked to sample.
func (b *batch) plan() ([]*pb.SequenceWork, []*sequence) {
	budget := b.cfg.tokenBudget
	var work []*pb.SequenceWork
	var sampled []*sequence
	feed := func(s *sequence, n int) {
		w := &pb.SequenceWork{SeqId: s.id, Ids: s.tokens[s.fed : s.fed+n]}
		if !s.started {
			w.Start, w.Capacity, w.Sampling = true, int32(len(s.req.prompt)+s.req.maxTokens), s.req.sampling
			w.Resumed = uint32(len(s.req.gen)) // rank 0 skips the draws made for them
			if len(s.req.gen) == 0 {           // the prompt's logprobs come with the first token
				w.PromptLogprobs = s.req.promptLogprobs
			}
			w.Images = s.req.images // the ranks encode them once and keep the features
			s.started = true
		}
		s.fed += n
		if s.fed == len(s.tokens) {
			w.Sample = true
			sampled = append(sampled, s)
		}
		budget -= n
		work = append(work, w)
	}
	for _, s := range b.active {
		if s.started && len(s.tokens)-s.fed == 1 {
			feed(s, 1)
		}
	}
	// A step carries at most maxStepImageBytes of images (one request's may be all of it): a start whose
	// images do not fit waits for the next step, so the StepRequest stays within the workers' message size.
	imageBytes := 0
	fits := func(s *sequence) bool {
		if s.started || len(s.req.images) == 0 {
			return true
		}
		n := s.req.imageBytes()
		if imageBytes > 0 && imageBytes+n > maxStepImageBytes {
			return false
		}
		imageBytes += n
		return true
	}
	piece := func(s *sequence, left int) int {
		n := min(left, budget)
		if c := b.cfg.prefillChunk; c > 0 {
			n = min(n, c)
		}
		if s.req.promptLogprobs != nil && len(s.req.gen) == 0 { // its pieces' logits are rows × vocab floats
			n = min(n, promptLogprobsChunk)
		}
		return n
	}
	for _, s := range b.active {
		if left := len(s.tokens) - s.fed; budget > 0 && (!s.started || left > 1) && fits(s) {
			feed(s, piece(s, left))
		}
	}
	for budget > 0 && len(b.active) < b.cfg.maxBatch {
		r := b.cfg.queue.popIf(b.admits)
		if r == nil {
			break
		}
		if r.cancelled() {
			continue
		}
		blocks := 0
		if b.kv != nil {
			if blocks = b.kv.need(r); blocks > b.kv.blocks {
				n := len(r.prompt) + r.maxTokens
				r.end("", fmt.Errorf("%w: %d prompt tokens + max_tokens %d = %d tokens need %d KV blocks of %d tokens; group %d holds %d, a context of at most %d tokens",
					ErrKVCapacity, len(r.prompt), r.maxTokens, n, blocks, b.kv.geom.BlockSize, b.cfg.group.ID, b.kv.blocks, b.kv.geom.Longest(b.kv.blocks)))
				continue
			}
			b.kv.used += blocks
			b.cfg.obs.setKVUsed(b.kv.used)
		}
		r.scheduled()
		s := &sequence{id: b.cfg.seqIDs.Add(1), req: r, tokens: append(slices.Clone(r.prompt), r.gen...), blocks: blocks}
		b.active = append(b.active, s)
		if fits(s) { // else it starts in a later step
			feed(s, piece(s, len(s.tokens)))
		}
	}
	return work, sampled
}

// run sends one step to every rank and waits for every rank's answer; it returns rank 0's results.
func (b *batch) run(ctx context.Context, work []*pb.SequenceWork) ([]*pb.SequenceResult, error) {
	b.step++
	req := &pb.StepRequest{
		Protocol:  pb.StepProtocol_STEP_PROTOCOL_V1,
		Epoch:     b.cfg.epoch,
		Step:      b.step,
		Seqs:      work,
		Release:   b.release,
		LeaderRev: b.cfg.leaderRev,
	}
	ranks := b.cfg.group.Ranks
	for i, s := range b.streams {
		if err := s.Send(req); err != nil {
			return nil, fmt.Errorf("%w: rank %d (%s at %s): send step %d: %w", ErrWorkerLost, i, ranks[i].MemberID, ranks[i].Addr, b.step, ctxErr(ctx, err))
		}
	}
	b.release = nil
	tokens := workTokens(work)
	limit := b.cfg.stepTimeout + time.Duration(tokens)*b.cfg.stepTokenTimeout
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	var results []*pb.SequenceResult
	answered := make([]bool, len(b.streams))
	for range b.streams {
		var r rankReply
		select {
		case r = <-b.replies:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline.C:
			var late []string
			for i, ok := range answered {
				if !ok {
					late = append(late, fmt.Sprintf("rank %d (%s at %s)", i, ranks[i].MemberID, ranks[i].Addr))
				}
			}
			return nil, fmt.Errorf("%w: step %d of %d tokens: no answer within %v from %s", ErrStepTimeout, b.step, tokens, limit, strings.Join(late, ", "))
		}
		a := ranks[r.rank]
		switch {
		case r.err != nil:
			return nil, fmt.Errorf("%w: rank %d (%s at %s): step %d: %w", ErrWorkerLost, r.rank, a.MemberID, a.Addr, b.step, ctxErr(ctx, r.err))
		case r.resp.GetError() != "":
			return nil, fmt.Errorf("%w: rank %d (%s at %s): step %d: %s", ErrStepFailed, r.rank, a.MemberID, a.Addr, b.step, r.resp.GetError())
		case r.resp.GetStep() != b.step || answered[r.rank]:
			return nil, fmt.Errorf("%w: rank %d (%s at %s) answered step %d, want %d", ErrStepFailed, r.rank, a.MemberID, a.Addr, r.resp.GetStep(), b.step)
		}
		answered[r.rank] = true
		if r.rank == 0 {
			results = r.resp.GetResults()
		}
	}
	return results, nil
}

// workTokens is the number of token ids a step feeds.
func workTokens(work []*pb.SequenceWork) int {
	n := 0
	for _, w := range work {
		n += len(w.GetIds())
	}
	return n
}

// unexpected turns a reply that came while no step was in flight into an error.
func (b *batch) unexpected(r rankReply) error {
	a := b.cfg.group.Ranks[r.rank]
	if r.err != nil {
		return fmt.Errorf("%w: rank %d (%s at %s): %w", ErrWorkerLost, r.rank, a.MemberID, a.Addr, r.err)
	}
	return fmt.Errorf("%w: rank %d (%s at %s) answered step %d, none in flight", ErrStepFailed, r.rank, a.MemberID, a.Addr, r.resp.GetStep())
}

// deliver hands rank 0's tokens to their requests and ends the requests that finished.
func (b *batch) deliver(sampled []*sequence, results []*pb.SequenceResult) {
	next := make(map[uint64]*pb.SequenceResult, len(results))
	for _, res := range results {
		next[res.GetSeqId()] = res
	}
	done := make(map[uint64]bool)
	for _, s := range sampled {
		res, ok := next[s.id]
		if !ok {
			s.req.end("", fmt.Errorf("%w: rank 0 returned no token for sequence %d at step %d", ErrStepFailed, s.id, b.step))
			done[s.id] = true // its blocks are freed with the others below
			continue
		}
		id := res.GetNextId()
		s.tokens = append(s.tokens, id)
		s.req.gen = append(s.req.gen, id)
		s.req.progressed()
		if lps := res.GetPromptLogprobs(); len(lps) > 0 {
			s.req.setPrompt(lps)
		}
		s.req.emit(id, res.GetLogprobs())
		if why, ok := s.req.finished(); ok {
			s.req.end(why, nil)
			done[s.id] = true
		}
	}
	if len(done) == 0 {
		return
	}
	b.active = slices.DeleteFunc(b.active, func(s *sequence) bool {
		if done[s.id] {
			b.release = append(b.release, s.id)
			b.free(s)
			return true
		}
		return false
	})
}

// admits reports whether the queue's head r may join the batch now: when its worst-case KV blocks fit in
// what the batch leaves (always without a budget). A cancelled request is taken (and dropped), and so is
// one larger than the whole budget (ended with ErrKVCapacity), so that neither holds the queue. A head
// that must wait holds the requests behind it: first come, first served, so a long request is not
// starved by shorter ones. Called under the queue's lock: it must not block.
func (b *batch) admits(r *request) bool {
	if b.kv == nil || r.cancelled() {
		return true
	}
	need := b.kv.need(r)
	if need > b.kv.blocks || b.kv.used+need <= b.kv.blocks {
		return true
	}
	if !r.kvWaited {
		r.kvWaited = true
		b.cfg.obs.kvWaited()
	}
	return false
}

// free returns s's KV blocks to the batch's budget.
func (b *batch) free(s *sequence) {
	if b.kv != nil && s.blocks > 0 {
		b.kv.used -= s.blocks
		s.blocks = 0
		b.cfg.obs.setKVUsed(b.kv.used)
	}
}

// stop hands the batch's requests back to the head of the queue (queue.resume), in their order, when
// the loop ended with err: after the group was stopped (ctx ended: a plan change) or failed (a lost
// worker, a failed or late step). They run again from their prompt and the ids chosen so far, so their
// clients see a pause and no id twice; a request fails only after maxFailures failures in a row or when
// no group takes it within its deadline.
func (b *batch) stop(ctx context.Context, err error) {
	cause := err
	if ctx.Err() != nil {
		cause = nil
	}
	resumed := 0
	for _, s := range slices.Backward(b.active) {
		if !s.req.cancelled() && b.cfg.queue.resume(s.req, cause) {
			resumed++
		}
	}
	b.cfg.obs.resumed(resumed)
	b.cfg.obs.setRunning(0)
	if b.kv != nil {
		b.kv.used = 0
		b.cfg.obs.setKVUsed(0)
	}
	if len(b.active) > 0 {
		b.cfg.log.Info("group let its requests go", zap.Int("requests", len(b.active)), zap.Int("resumed", resumed),
			zap.Bool("failed", cause != nil), zap.NamedError("cause", cause))
	}
	b.active = nil
}

// ctxErr returns ctx's error when ctx has ended, else err.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}
