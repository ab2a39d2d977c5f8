package worker

import (
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/internal/samplingpb"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// sequence is one sequence's state on this rank: its KV caches and, on rank 0, its sampler.
type sequence struct {
	seq      run.Sequence
	capacity int
	blocks   int             // KV blocks reserved at capacity (memplan.Geometry.Blocks); 0 without a memory plan
	sampler  *sample.Sampler // rank 0 only
	stream   uint64          // the Step stream that started it (0: a direct Step call); see releaseStream
	rev      int64           // the leader_rev of the request that started it; see fence
	// promptLogprobs: the sequence was started with prompt_logprobs and has not sampled yet, so its
	// pieces run with every position's logits (on every rank); prompt collects them on rank 0.
	promptLogprobs bool
	prompt         *sample.PromptLogprobs
	images         *imageSlots // image features its prompt's later pieces still need (images.go); nil: none
}

// Step runs one StepRequest and returns its response; see the package doc for the semantics. Requests
// are run one at a time, across all streams, in the order Step is called. Sequences started through
// Step belong to no stream: only a release or a new epoch drops them.
func (w *Worker) Step(req *tpfleetv1.StepRequest) *tpfleetv1.StepResponse {
	return w.stepOn(0, req)
}

// stepOn is Step for the Step stream numbered stream (0: none): the sequences it starts are dropped when
// that stream ends (releaseStream).
func (w *Worker) stepOn(stream uint64, req *tpfleetv1.StepRequest) *tpfleetv1.StepResponse {
	resp := &tpfleetv1.StepResponse{Step: req.GetStep()}
	start := time.Now()
	results, err := w.step(stream, req)
	tokens := 0
	for _, s := range req.GetSeqs() {
		tokens += len(s.GetIds())
	}
	w.metrics.step(time.Since(start), tokens, err)
	if err == nil {
		w.firstSteps(req, start)
	}
	if err != nil {
		resp.Error = oneLine(err.Error())
		w.lg.Debug("step failed", zap.Uint64("step", req.GetStep()), zap.Int64("epoch", req.GetEpoch()), zap.Error(err))
		return resp
	}
	resp.Results = results
	return resp
}

func (w *Worker) step(stream uint64, req *tpfleetv1.StepRequest) ([]*tpfleetv1.SequenceResult, error) {
	if req.GetProtocol() != tpfleetv1.StepProtocol_STEP_PROTOCOL_V1 {
		return nil, fmt.Errorf("%w: %s, this worker speaks %s", ErrProtocol, req.GetProtocol(), tpfleetv1.StepProtocol_STEP_PROTOCOL_V1)
	}
	w.runMu.Lock()
	defer w.runMu.Unlock()
	w.mu.Lock()
	state, epoch, rank, failure, closed := w.state, w.epoch, w.rank, w.failure, w.closed
	w.mu.Unlock()
	switch {
	case closed:
		return nil, ErrClosed
	case req.GetEpoch() != epoch:
		return nil, fmt.Errorf("%w: request epoch %d, worker on epoch %d (%s)", ErrEpochMismatch, req.GetEpoch(), epoch, state)
	}
	if err := w.fence(req.GetLeaderRev()); err != nil {
		return nil, err
	}
	// Releases apply after the work, also when the work fails: they only drop state.
	defer w.release(req.GetRelease())
	switch state {
	case StateIdle:
		return nil, fmt.Errorf("%w: idle: no assignment in epoch %d", ErrNotServing, epoch)
	case StateLoading:
		return nil, fmt.Errorf("%w: loading epoch %d", ErrNotServing, epoch)
	case StateFailed:
		return nil, fmt.Errorf("%w: epoch %d: %w", ErrFailed, epoch, failure)
	}
	wts := w.wts
	if err := w.validate(req, wts.info); err != nil {
		return nil, err
	}
	// Works run in batches: consecutive works of distinct sequences share one forward pass (each weight is
	// read once per batch); a sequence that comes back in the same request starts a new batch.
	var results []*tpfleetv1.SequenceResult
	var batch []int // indices into req.Seqs
	inBatch := map[uint64]bool{}
	alone := false // the batch holds a sequence collecting its prompt's logprobs
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		seqs := make([]run.Sequence, len(batch))
		ids := make([][]int, len(batch))
		for k, i := range batch {
			work := req.GetSeqs()[i]
			seqs[k] = w.seqs[work.GetSeqId()].seq
			for _, t := range work.GetIds() {
				ids[k] = append(ids[k], int(t))
			}
		}
		first := req.GetSeqs()[batch[0]].GetSeqId()
		// A sequence that collects its prompt's logprobs (alone in its batch) needs every position's
		// logits; the others need only their last.
		all := false
		for _, i := range batch {
			all = all || w.seqs[req.GetSeqs()[i].GetSeqId()].promptLogprobs
		}
		feats, err := w.batchImages(wts, batch, req, ids)
		if err != nil {
			return err
		}
		var logits backend.Tensor
		if feats != nil {
			logits, err = wts.model.(run.ImageModel).ForwardBatchImages(w.ctx, seqs, ids, wts.images.SlotID(), feats, all)
		} else {
			logits, err = wts.model.ForwardBatch(w.ctx, seqs, ids, all)
		}
		if err != nil {
			return w.stepError(epoch, batch[0], first, err)
		}
		if rank == 0 {
			var rows []float32
			vocab := wts.info.VocabSize
			row := 0 // the first row of sequence k's logits
			for k, i := range batch {
				work := req.GetSeqs()[i]
				s := w.seqs[work.GetSeqId()]
				n := 1
				if all {
					n = len(ids[k])
				}
				from := row
				row += n
				s.sampler.Feed(ids[k]) // the prompt, for the penalties
				if !work.GetSample() && s.prompt == nil {
					continue
				}
				if rows == nil {
					if rows, err = w.ops.Float32(logits); err != nil {
						return w.stepError(epoch, i, work.GetSeqId(), err)
					}
				}
				if s.prompt != nil {
					if err := s.prompt.Add(ids[k], rows[from*vocab:row*vocab], vocab); err != nil {
						return w.stepError(epoch, i, work.GetSeqId(), err)
					}
				}
				if !work.GetSample() {
					continue
				}
				c := s.sampler.Choose(rows[(row-1)*vocab : row*vocab])
				res := &tpfleetv1.SequenceResult{SeqId: work.GetSeqId(), NextId: int32(c.ID),
					Logprobs: samplingpb.ChoiceLogprobs(s.sampler.Params(), c)}
				if s.prompt != nil {
					res.PromptLogprobs = samplingpb.PromptLogprobs(s.prompt.Choices())
					s.prompt = nil
				}
				results = append(results, res)
			}
		}
		for _, i := range batch { // on every rank: a sequence that sampled has its prompt behind it
			if work := req.GetSeqs()[i]; work.GetSample() {
				w.seqs[work.GetSeqId()].promptLogprobs = false
			}
		}
		batch, inBatch, alone = batch[:0], map[uint64]bool{}, false
		return nil
	}
	encoded, err := w.encodeImages(req, wts) // one pass of the vision tower over all the new images
	if err != nil {
		return nil, err
	}
	for i, work := range req.GetSeqs() {
		id := work.GetSeqId()
		// A sequence collecting its prompt's logprobs runs alone: the lm_head over all of its piece's
		// rows is its cost, not its neighbours'.
		pl := work.PromptLogprobs != nil
		if s, ok := w.seqs[id]; ok && !work.GetStart() {
			pl = s.promptLogprobs
		}
		if inBatch[id] || alone || (pl && len(batch) > 0) {
			if err := flush(); err != nil {
				return nil, err
			}
		}
		alone = pl
		if work.GetStart() {
			seq, err := wts.model.NewSequence(int(work.GetCapacity()))
			if err != nil {
				return nil, w.stepError(epoch, i, id, err)
			}
			w.dropSeq(id) // a start of a held id replaces it
			s := &sequence{seq: seq, capacity: int(work.GetCapacity()), stream: stream, rev: req.GetLeaderRev(), images: encoded[i],
				promptLogprobs: work.PromptLogprobs != nil}
			if w.mem != nil {
				s.blocks = w.mem.geom.Blocks(s.capacity)
			}
			if rank == 0 {
				s.sampler = sample.New(samplingParams(work.GetSampling(), wts))
				s.sampler.Skip(int(work.GetResumed()), wts.info.VocabSize)
				if s.promptLogprobs {
					s.prompt = sample.NewPromptLogprobs(int(work.GetPromptLogprobs()))
				}
			}
			w.seqs[id] = s
		}
		batch, inBatch[id] = append(batch, i), true
	}
	if err := flush(); err != nil {
		return nil, err
	}
	w.mu.Lock()
	w.nseqs, w.nreserved = len(w.seqs), w.reservedLocked(nil)
	w.mu.Unlock()
	return results, nil
}

// stepError classifies an error of seqs[i]'s forward pass. Invalid input (which validate should have
// caught) leaves the worker serving; anything else (a collective failed: a peer died or timed out, or
// the worker is closing) fails the epoch and closes its communicator, so that the peers fail at once.
func (w *Worker) stepError(epoch int64, i int, id uint64, err error) error {
	where := fmt.Sprintf("seq %d (seqs[%d])", id, i)
	if errors.Is(err, run.ErrInput) {
		return fmt.Errorf("%w: %s: %w", ErrInvalidRequest, where, err)
	}
	if w.ctx.Err() != nil {
		return fmt.Errorf("%w: %s: %w", ErrClosed, where, err)
	}
	err = fmt.Errorf("%w: epoch %d: %s: %w", ErrFailed, epoch, where, err)
	w.mu.Lock()
	var comm interface{ Close() error }
	if w.epoch == epoch && w.state == StateServing {
		w.failure = err
		if w.comm != nil {
			comm = w.comm
		}
		w.comm = nil
		w.setStateLocked(StateFailed)
	}
	w.nseqs, w.nreserved = len(w.seqs), w.reservedLocked(nil)
	w.mu.Unlock()
	if comm != nil {
		_ = comm.Close()
	}
	w.lg.Error("step failed", zap.Int64("epoch", epoch), zap.Error(err))
	return err
}

// validate checks every SequenceWork of req against the sequences held, in order (a request may start
// a sequence and feed it again), before anything runs: a request that fails validation changes no
// sequence. The checks depend only on the request and on state every rank shares, so all ranks of a
// group reject the same requests.
func (w *Worker) validate(req *tpfleetv1.StepRequest, cfg model.Info) error {
	type shadow struct{ len, capacity int }
	sim := make(map[uint64]shadow)
	reserved := 0
	if w.mem != nil {
		reserved = w.reservedLocked(req.GetRelease())
	}
	for i, work := range req.GetSeqs() {
		id := work.GetSeqId()
		where := fmt.Sprintf("seq %d (seqs[%d])", id, i)
		var sh shadow
		if work.GetStart() {
			c := int(work.GetCapacity())
			if c < 1 || c > cfg.MaxPositions {
				return fmt.Errorf("%w: %s: capacity %d outside [1, max_position_embeddings=%d]", ErrInvalidRequest, where, c, cfg.MaxPositions)
			}
			if sp := work.GetSampling(); sp != nil {
				if err := samplingpb.FromProto(sp).Validate(); err != nil {
					return fmt.Errorf("%w: %s: %w", ErrInvalidRequest, where, err)
				}
			}
			if n := work.PromptLogprobs; n != nil && (*n < 0 || *n > sample.MaxTopLogprobs) {
				return fmt.Errorf("%w: %s: prompt logprobs %d outside [0, %d]", ErrInvalidRequest, where, *n, sample.MaxTopLogprobs)
			}
			if w.mem != nil {
				// The coordinator admits by the smallest plan of the group, so this holds on every rank
				// unless it overcommits: refuse rather than run out of memory.
				need := w.mem.geom.Blocks(c)
				if reserved+need > w.mem.plan.Blocks {
					return fmt.Errorf("%w: %s: capacity %d needs %d KV blocks, %d of this rank's %d are reserved",
						ErrKVCacheFull, where, c, need, reserved, w.mem.plan.Blocks)
				}
				reserved += need
			}
			sh = shadow{0, c}
			if n := len(work.GetImages()); n > 0 && w.wts.images == nil {
				return fmt.Errorf("%w: %s: %d images: %w", ErrInvalidRequest, where, n, w.wts.noImages)
			}
		} else if work.PromptLogprobs != nil {
			return fmt.Errorf("%w: %s: prompt logprobs are asked for with start only", ErrInvalidRequest, where)
		} else if len(work.GetImages()) > 0 {
			return fmt.Errorf("%w: %s: images come with start only", ErrInvalidRequest, where)
		} else if s, ok := sim[id]; ok {
			sh = s
		} else if s, ok := w.seqs[id]; ok {
			sh = shadow{s.seq.Len(), s.capacity}
		} else {
			return fmt.Errorf("%w: %s was not started in this epoch, or was released", ErrUnknownSequence, where)
		}
		ids := work.GetIds()
		if len(ids) == 0 {
			return fmt.Errorf("%w: %s: no ids", ErrInvalidRequest, where)
		}
		for j, t := range ids {
			if t < 0 || int(t) >= cfg.VocabSize {
				return fmt.Errorf("%w: %s: token id %d at index %d is outside the vocabulary [0, %d)", ErrInvalidRequest, where, t, j, cfg.VocabSize)
			}
		}
		if sh.len+len(ids) > sh.capacity {
			return fmt.Errorf("%w: %s: %d ids after %d exceed the capacity of %d", ErrInvalidRequest, where, len(ids), sh.len, sh.capacity)
		}
		sh.len += len(ids)
		sim[id] = sh
	}
	return nil
}

// fence refuses a request of a leadership older than the newest seen (rev 0 is not fenced). A newer
// leadership's first request drops the sequences that older leaderships' requests started: their
// coordinator was deposed (it crashed, or gossip declared it dead) and the new leader prefills them
// again, so nothing would release them, even when the old stream stays open (a half-open connection).
// runMu is held.
func (w *Worker) fence(rev int64) error {
	if rev == 0 {
		return nil
	}
	seen := w.leaderRev.Load()
	if rev < seen {
		return fmt.Errorf("%w: leader revision %d, a newer leader (revision %d) steps this worker", ErrStaleLeader, rev, seen)
	}
	if rev == seen {
		return nil
	}
	w.leaderRev.Store(rev)
	n := 0
	for id, s := range w.seqs {
		if s.rev != 0 && s.rev < rev {
			w.dropSeq(id)
			n++
		}
	}
	w.mu.Lock()
	w.nseqs, w.nreserved = len(w.seqs), w.reservedLocked(nil)
	w.mu.Unlock()
	if n > 0 {
		w.lg.Info("a newer leader steps this worker; dropped the sequences of the older one", zap.Int64("leader-rev", rev), zap.Int("sequences", n))
	}
	return nil
}

// currentLeaderRev returns the highest leader revision seen.
func (w *Worker) currentLeaderRev() int64 { return w.leaderRev.Load() }

// releaseStream drops the sequences that the Step stream numbered stream started and that are still
// held: the coordinator that sent them is gone (it closed the stream, crashed, or its connection failed)
// and will prefill them again wherever it resumes them, so nothing would ever release them. It waits
// for the step in flight.
func (w *Worker) releaseStream(stream uint64) int {
	w.runMu.Lock()
	defer w.runMu.Unlock()
	n := 0
	for id, s := range w.seqs {
		if s.stream == stream {
			w.dropSeq(id)
			n++
		}
	}
	w.metrics.kv(w.seqs)
	w.mu.Lock()
	w.nseqs, w.nreserved = len(w.seqs), w.reservedLocked(nil)
	w.mu.Unlock()
	return n
}

// release drops the named sequences; unknown ids are ignored.
func (w *Worker) release(ids []uint64) {
	for _, id := range ids {
		w.dropSeq(id)
	}
	w.metrics.kv(w.seqs)
	w.mu.Lock()
	w.nseqs, w.nreserved = len(w.seqs), w.reservedLocked(nil)
	w.mu.Unlock()
}

// dropSeq forgets sequence id (unknown ids are ignored) and returns its KV cache blocks to the model's
// pool. runMu is held.
func (w *Worker) dropSeq(id uint64) {
	if s, ok := w.seqs[id]; ok {
		s.seq.Free()
		delete(w.seqs, id)
	}
}

// clearSeqs drops every sequence (a new epoch, closing). runMu is held.
func (w *Worker) clearSeqs() {
	for id := range w.seqs {
		w.dropSeq(id)
	}
}

// KVBlocks reports the KV cache blocks the loaded model's sequences hold, the blocks its pool has and
// their size in positions (all 0 with no model loaded, or a model without a block pool).
func (w *Worker) KVBlocks() (used, total, blockSize int) {
	w.runMu.Lock()
	defer w.runMu.Unlock()
	if w.wts == nil {
		return 0, 0, 0
	}
	if p, ok := w.wts.model.(run.KVPool); ok {
		return p.KVUsage()
	}
	return 0, 0, 0
}

// samplingParams are the parameters of a sequence's sampler: sp, or the checkpoint's
// generation_config.json when sp is unset.
func samplingParams(sp *tpfleetv1.SamplingParams, wts *weights) sample.Params {
	if sp == nil {
		return wts.defaultSampling()
	}
	return samplingpb.FromProto(sp)
}

// firstSteps records the first step's time, and the first decode-only step's (one token a sequence: the
// step a device backend records as a CUDA graph), as start-up phases.
func (w *Worker) firstSteps(req *tpfleetv1.StepRequest, start time.Time) {
	if !w.stepped.Swap(true) {
		w.phases.Since(phase.FirstStep, start, fmt.Sprintf("%d sequences", len(req.GetSeqs())))
		w.lg.Info("start-up", w.phases.Field())
	}
	if w.decoded.Load() || len(req.GetSeqs()) == 0 {
		return
	}
	for _, s := range req.GetSeqs() {
		if len(s.GetIds()) != 1 {
			return
		}
	}
	if !w.decoded.Swap(true) {
		w.phases.Since(phase.Graph, start, "the first decode step (captured where the backend records steps)")
	}
}

// batchImages returns the image features of a batch's works (nil when none has any): for each, the rows
// of the image slots among its ids, taken from its sequence's features.
func (w *Worker) batchImages(wts *weights, batch []int, req *tpfleetv1.StepRequest, ids [][]int) ([][]float32, error) {
	var feats [][]float32
	for k, i := range batch {
		s := w.seqs[req.GetSeqs()[i].GetSeqId()]
		if s.images == nil {
			continue
		}
		n := 0
		for _, id := range ids[k] {
			if id == wts.images.SlotID() {
				n++
			}
		}
		rows, err := s.images.take(n, wts.images.Width())
		if err != nil {
			return nil, fmt.Errorf("%w: seq %d (seqs[%d]): %w", ErrInvalidRequest, req.GetSeqs()[i].GetSeqId(), i, err)
		}
		if s.images.rows == nil {
			s.images = nil
		}
		if rows == nil {
			continue
		}
		if feats == nil {
			feats = make([][]float32, len(batch))
		}
		feats[k] = rows
	}
	if feats != nil {
		if _, ok := wts.model.(run.ImageModel); !ok {
			return nil, fmt.Errorf("%w: the model takes no image features", ErrInvalidRequest)
		}
	}
	return feats, nil
}
