package worker

import (
	"context"
	"fmt"
	"runtime"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/model/run"
)

// watchPlans feeds the plans etcd delivers to the applier.
func (w *Worker) watchPlans() {
	for p := range w.cli.WatchPlan(w.bgCtx) {
		w.offer(p)
	}
}

// offer records p as the newest plan if it is, cancels the epoch being applied unless it is loading the
// very weights p needs (a coordinator restart or an unrelated re-plan then costs no reload), and wakes
// the applier.
func (w *Worker) offer(p cluster.Plan) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if p.Epoch <= w.latest.Epoch {
		return
	}
	w.latest = p
	if j := w.applying; j != nil {
		_, a, ok := findAssignment(p, w.cfg.ID)
		keep := j.phase == phaseWeights && j.assigned && ok && w.keyFor(p, a) == j.key
		if !keep {
			j.cancel()
		}
	}
	w.notifyLocked()
	select {
	case w.wake <- struct{}{}:
	default: // the applier is already due to look at w.latest
	}
}

// applyLoop applies the newest plan, one epoch at a time, until the worker closes.
func (w *Worker) applyLoop() {
	for {
		select {
		case <-w.bgCtx.Done():
			return
		case <-w.wake:
		}
		for w.bgCtx.Err() == nil {
			w.mu.Lock()
			p := w.latest
			if p.Epoch <= w.epoch {
				w.mu.Unlock()
				break
			}
			ctx, cancel := context.WithCancel(w.bgCtx)
			j := &applyJob{cancel: cancel}
			w.applying = j
			w.mu.Unlock()
			w.apply(ctx, j, p)
			cancel()
			w.mu.Lock()
			w.applying = nil
			w.mu.Unlock()
		}
	}
}

// findAssignment returns member id's group and assignment in p.
func findAssignment(p cluster.Plan, id string) (cluster.Group, cluster.Assignment, bool) {
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			if a.MemberID == id {
				return g, a, true
			}
		}
	}
	return cluster.Group{}, cluster.Assignment{}, false
}

// apply moves the worker to epoch p: it drops the previous epoch's communicator and sequences, then,
// when the member has an assignment, loads its weights (or keeps the loaded ones when they are the
// same) and builds the group's communicator; when it has none it frees the weights and goes idle.
// ctx ends when a newer plan supersedes p or the worker closes.
func (w *Worker) apply(ctx context.Context, j *applyJob, p cluster.Plan) {
	start := time.Now()
	g, a, assigned := findAssignment(p, w.cfg.ID)
	var key weightsKey
	if assigned {
		key = w.keyFor(p, a)
	}
	w.mu.Lock()
	j.key, j.assigned, j.phase = key, assigned, phaseWeights
	old := w.comm
	w.comm = nil
	w.epoch = p.Epoch
	w.failure = nil
	if assigned {
		w.group, w.rank, w.tp = g.ID, a.Rank, p.TP
	} else {
		w.group, w.rank, w.tp = -1, -1, 0
	}
	w.setStateLocked(StateLoading) // also while an unassigned worker frees its weights
	w.mu.Unlock()
	lg := w.lg.With(zap.Int64("epoch", p.Epoch))
	if old != nil {
		_ = old.Close() // a step blocked in a collective of the old epoch fails at once
	}

	// The previous epoch's sequences go (the coordinator prefills them again); its weights go too unless
	// this epoch needs the same ones. Weights of the same checkpoint and format stay until the new ones are
	// loaded, which take over the tensors they share with them (and with those Prepare staged).
	w.runMu.Lock()
	n := len(w.seqs)
	w.clearSeqs()
	w.mem = nil
	prev, staged := w.wts, w.staged
	w.staged = nil
	if prev != nil {
		prev.comm.set(nil)
		if assigned && prev.key == key {
			prev = nil // kept whole
		} else {
			w.wts = nil
		}
	}
	wts := w.wts
	if staged != nil && (!assigned || wts != nil || !staged.key.sameSource(key)) {
		staged = nil
	}
	if prev != nil && (!assigned || !prev.key.sameSource(key)) {
		w.freeLocked(lg, prev)
		prev = nil
	}
	w.runMu.Unlock()
	w.mu.Lock()
	w.nseqs, w.nreserved, w.memPlan = 0, 0, nil
	w.mu.Unlock()
	if n > 0 {
		lg.Info("dropped the previous epoch's sequences", zap.Int("sequences", n))
	}

	if !assigned {
		w.mu.Lock()
		w.weightDir, w.weightSize, w.expertLoad = "", 0, nil
		w.setStateLocked(StateIdle)
		w.mu.Unlock()
		lg.Info("idle: no assignment in this epoch", zap.Int("groups", len(p.Groups)))
		return
	}
	lg.Info("applying plan", zap.Int("group", g.ID), zap.Int("rank", a.Rank), zap.Int("tp", p.TP),
		zap.String("model", p.Model), zap.String("plan", key.planName))
	switch {
	case wts != nil:
		lg.Info("reusing loaded weights", zap.Stringer("weights", key), zap.Int64("bytes", wts.bytes))
	case staged != nil && staged.key == key:
		wts = staged
		lg.Info("taking over the prepared weights", zap.Stringer("weights", key), zap.Int64("bytes", wts.bytes),
			zap.Int64("read-bytes", wts.read), zap.Int("kept-tensors", wts.kept))
	default:
		var err error
		wts, err = w.loadWeights(ctx, key, prev, staged)
		if err != nil {
			if prev != nil {
				w.runMu.Lock()
				w.freeLocked(lg, prev)
				w.runMu.Unlock()
			}
			w.fail(ctx, p.Epoch, fmt.Errorf("load weights of %s: %w", key, err))
			return
		}
		w.mu.Lock()
		w.loads++
		w.mu.Unlock()
	}
	w.runMu.Lock()
	w.wts = wts
	if prev != nil {
		// What the new weights did not take over is dropped now.
		w.freeLocked(lg, prev)
	}
	// The plan is made with the previous weights freed, so the device's free memory is this epoch's; the
	// model's block pool then gets the plan's blocks on a device, or with --kv-cache-tokens. A plan from the
	// host's memory (the CPU) admits by its blocks but keeps a pool that grows: the host is shared, and
	// its memory is taken as sequences need it rather than all at start-up.
	mem, err := w.planMemory(lg, wts, p.TP)
	w.mem = mem
	if kp, ok := wts.model.(run.KVPool); ok && err == nil {
		blocks := 0
		if _, device := w.ops.(backend.MemoryReporter); mem != nil && (device || w.cfg.KVCacheTokens > 0) {
			blocks = mem.plan.Blocks
		}
		if perr := kp.SetKVBlocks(w.blockSize(), blocks); perr != nil {
			if mem != nil {
				err = fmt.Errorf("kv block pool of the memory plan: %w", perr)
			} else {
				lg.Warn("kv block pool", zap.Error(perr))
			}
		}
	}
	w.runMu.Unlock()
	if err != nil {
		w.fail(ctx, p.Epoch, err)
		return
	}
	w.mu.Lock()
	w.memPlan, w.nreserved = mem, 0
	w.mu.Unlock()
	w.mu.Lock()
	w.weightDir, w.weightSize = key.dir, wts.bytes
	w.expertLoad, _ = wts.model.(run.ExpertLoader)
	w.mu.Unlock()

	// A newer plan that needs the same weights may have come while they loaded: its communicator is
	// the one to build.
	w.mu.Lock()
	if ctx.Err() != nil {
		w.mu.Unlock()
		return
	}
	j.phase = phaseComm
	if w.latest.Epoch > p.Epoch {
		p = w.latest
		g, a, _ = findAssignment(p, w.cfg.ID) // offer kept this job alive only for the same assignment
		w.epoch, w.group, w.rank, w.tp = p.Epoch, g.ID, a.Rank, p.TP
		w.notifyLocked()
		lg = w.lg.With(zap.Int64("epoch", p.Epoch))
		lg.Info("moving on to a newer epoch with the same weights")
	}
	w.mu.Unlock()

	joinStart := time.Now()
	comm, err := w.connect(ctx, p, g, a)
	if err != nil {
		w.fail(ctx, p.Epoch, fmt.Errorf("build the communicator of group %d rank %d: %w", g.ID, a.Rank, err))
		return
	}
	commKind := "tcp-ring"
	if _, device := w.ops.(backend.DeviceContext); device {
		commKind = "nccl"
	}
	w.phases.Since(phase.NCCL, joinStart, fmt.Sprintf("%s, %d ranks (with the wait for the group's peers)", commKind, p.TP))
	w.runMu.Lock()
	wts.comm.set(comm)
	w.runMu.Unlock()
	w.mu.Lock()
	if ctx.Err() != nil || w.epoch != p.Epoch {
		w.mu.Unlock()
		_ = comm.Close()
		return
	}
	w.comm = comm
	w.setStateLocked(StateServing)
	w.mu.Unlock()
	if !w.stepped.Load() {
		w.phases.Since(phase.Ready, w.phases.Start(), "process start to serving")
		w.lg.Info("start-up", w.phases.Field())
	}
	lg.Info("serving", zap.Int("group", g.ID), zap.Int("rank", a.Rank), zap.Int("tp", p.TP),
		zap.Duration("took", time.Since(start).Round(time.Millisecond)))
}

// freeLocked lets weights go (their tensors that other weights took over stay with those) and, on an
// asynchronous device, returns their memory to the backend. runMu is held.
func (w *Worker) freeLocked(lg *zap.Logger, wts *weights) {
	if s, ok := w.ops.(backend.Synchronizer); ok {
		// An asynchronous device's memory returns to the backend when its tensors are collected.
		runtime.GC()
		if err := s.Synchronize(); err != nil {
			lg.Warn("free the previous weights' device memory", zap.Error(err))
		}
	}
	lg.Info("dropped weights", zap.Stringer("weights", wts.key), zap.Int64("bytes", wts.bytes))
}

// PrepareResult is what Prepare loaded and what it took over from the weights held.
type PrepareResult struct {
	Loaded, Kept           int
	LoadedBytes, KeptBytes int64
}

// Prepare loads, beside the weights the worker serves with, its rank's weights in plan p (not yet
// written: its epoch may be 0), taking over the tensors it holds already; the epoch that places the worker
// so then starts without loading. The worker keeps serving meanwhile. A worker p does not place prepares
// nothing. Prepared weights that no epoch takes over are dropped at the next epoch. Calls are serialised.
// On a device backend (not safe for concurrent use) the steps wait while Prepare loads.
func (w *Worker) Prepare(ctx context.Context, p cluster.Plan) (PrepareResult, error) {
	w.prepareMu.Lock()
	defer w.prepareMu.Unlock()
	_, a, ok := findAssignment(p, w.cfg.ID)
	if !ok {
		return PrepareResult{}, nil
	}
	key := w.keyFor(p, a)
	w.runMu.Lock()
	cur, staged := w.wts, w.staged
	w.runMu.Unlock()
	for _, h := range []*weights{cur, staged} {
		if h != nil && h.key == key {
			return PrepareResult{Kept: h.tensors, KeptBytes: h.bytes}, nil
		}
	}
	lg := w.lg.With(zap.Int64("for-epoch", p.Epoch))
	lg.Info("preparing weights", zap.Stringer("weights", key))
	// A device backend is driven by one goroutine at a time (backend.Ops): its load holds the steps' lock,
	// so the current epoch's steps wait for it (as they would at the switch). The cpu backend is safe for
	// concurrent use and keeps serving meanwhile.
	_, device := w.ops.(backend.DeviceContext)
	if device {
		w.runMu.Lock()
	}
	wts, err := w.loadWeights(ctx, key, cur, staged)
	if !device {
		w.runMu.Lock()
	}
	if err == nil {
		w.staged = wts
	}
	w.runMu.Unlock()
	if err != nil {
		return PrepareResult{}, fmt.Errorf("worker: prepare %s: %w", key, err)
	}
	w.mu.Lock()
	w.loads++
	w.mu.Unlock()
	return PrepareResult{Loaded: wts.tensors - wts.kept, LoadedBytes: wts.read, Kept: wts.kept, KeptBytes: wts.keptBytes}, nil
}

// fail puts the worker in StateFailed for epoch, unless ctx ended (a newer epoch or Close stopped the
// work: not a failure).
func (w *Worker) fail(ctx context.Context, epoch int64, err error) {
	if ctx.Err() != nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.epoch != epoch {
		return
	}
	w.failure = err
	w.setStateLocked(StateFailed)
	w.lg.Error("epoch failed", zap.Int64("epoch", epoch), zap.Error(err))
}

// LoadPlan blocks until the worker has applied plan epoch: it returns nil once the worker serves its
// assignment in that epoch, or is idle in it (no assignment). It fails with an error wrapping
// ErrSuperseded when a newer epoch comes first, ErrFailed when the epoch failed, ErrClosed when the
// worker closes, or ctx's error. An epoch the worker has not seen yet is read from etcd once; later
// ones arrive through the worker's watch.
func (w *Worker) LoadPlan(ctx context.Context, epoch int64) error {
	if epoch < 1 {
		return fmt.Errorf("%w: load plan: epoch %d, want >= 1", ErrInvalidRequest, epoch)
	}
	fetched := false
	for {
		w.mu.Lock()
		state, cur, latest, failure, changed, started := w.state, w.epoch, w.latest.Epoch, w.failure, w.changed, w.started
		w.mu.Unlock()
		switch {
		case !started:
			return fmt.Errorf("%w: load plan: worker not started", ErrNotServing)
		case latest > epoch:
			return fmt.Errorf("%w: epoch %d by epoch %d", ErrSuperseded, epoch, latest)
		case cur == epoch && state == StateFailed:
			return fmt.Errorf("%w: epoch %d: %w", ErrFailed, epoch, failure)
		case cur == epoch && (state == StateServing || state == StateIdle):
			return nil
		case latest < epoch && !fetched:
			fetched = true
			p, ok, err := w.cli.Plan(ctx)
			if err != nil {
				return fmt.Errorf("worker: load plan %d: %w", epoch, err)
			}
			if ok {
				w.offer(p)
			}
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-w.closing:
			return ErrClosed
		case <-changed:
		}
	}
}
