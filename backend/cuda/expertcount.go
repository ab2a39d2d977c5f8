package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/tpfleet/tpfleet/backend"
)

// Expert counts on the device (backend.ExpertTallier).
//
// The routing stays in device memory, so the host cannot count it the way cpu's routing is counted
// (backend.ExpertCounter) without a copy and a wait per MoE layer, which would also keep decode steps out
// of CUDA graphs. Instead a tally is an array of 64-bit counters in device memory, allocated once (at
// model load) and never moved: Add enqueues count_experts (kernels/expert_count.cu) on the backend's
// stream like any op, so a recorded step captures the launch with the counters' fixed address and every
// replay counts again. Counts copies the counters to the host on a stream of its own, whenever a worker
// asks, from whichever goroutine asks.

var _ backend.ExpertTallier = (*Backend)(nil)

// streamNonBlocking is CU_STREAM_NON_BLOCKING.
const streamNonBlocking = 1

// tallyReader copies tallies to the host for Counts: on a non-blocking stream of its own, so that a read
// neither waits for the backend's stream nor touches the legacy default stream (which a step being
// captured on the backend's blocking stream forbids), into pinned memory sized, by NewExpertTally, for
// the largest tally. One per Backend, made by the first NewExpertTally and freed by Close; mu serialises
// the reads, the growth of host and Close.
type tallyReader struct {
	mu     sync.Mutex
	s      *stream
	host   *pinned
	closed bool
}

// expertTally is the cuda backend.ExpertTally: n uint64 counters at buf.
type expertTally struct {
	b   *Backend // Add only: the goroutine that drives the backend
	r   *tallyReader
	buf *buffer
	n   int
}

// NewExpertTally returns n zeroed counters in device memory (backend.ExpertTallier). It waits for the
// stream once (the counters are zeroed on it, and Counts reads them on another). Not inside Step.
func (b *Backend) NewExpertTally(n int) (backend.ExpertTally, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if n < 0 {
		return nil, fmt.Errorf("cuda: new expert tally of %d counters: %w", n, backend.ErrShape)
	}
	if b.rec != nil {
		return nil, fmt.Errorf("cuda: new expert tally inside a recorded step: %w", errNotRecordable)
	}
	size := int64(max(n, 1)) * 8
	r, err := b.tallyReader(size)
	if err != nil {
		return nil, fmt.Errorf("cuda: new expert tally: %w", err)
	}
	buf, err := b.pool.getDedicated(size)
	if err != nil {
		return nil, fmt.Errorf("cuda: new expert tally of %d counters: %w", n, err)
	}
	buf = b.pool.owned(buf)
	if err := b.stream.memset(buf.ptr, 0, size); err != nil {
		return nil, fmt.Errorf("cuda: new expert tally: %w", err)
	}
	if err := b.stream.sync(); err != nil {
		return nil, fmt.Errorf("cuda: new expert tally: %w", err)
	}
	return &expertTally{b: b, r: r, buf: buf, n: n}, nil
}

// tallyReader returns the backend's reader, made on first use, with pinned memory for size bytes.
func (b *Backend) tallyReader(size int64) (*tallyReader, error) {
	if b.tallies == nil {
		var s C.CUstream
		if err := check("cuStreamCreate", cuResult(C.tp_cuStreamCreate(drv.streamCreate, b.dev.ctx, &s, streamNonBlocking))); err != nil {
			return nil, err
		}
		b.tallies = &tallyReader{s: &stream{d: b.dev, s: s}}
	}
	r := b.tallies
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.host != nil && r.host.size >= size {
		return r, nil
	}
	h, err := b.dev.allocPinned(max(size, 4096))
	if err != nil {
		return nil, err
	}
	if r.host != nil {
		if err := r.host.free(); err != nil {
			return nil, errors.Join(err, h.free())
		}
	}
	r.host = h
	return r, nil
}

// closeTallies frees the reader's stream and pinned memory; later Counts return ErrClosed. Close calls
// it before the pool frees the counters.
func (b *Backend) closeTallies() error {
	r := b.tallies
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	var errs []error
	if r.host != nil {
		errs = append(errs, r.host.free())
		r.host = nil
	}
	errs = append(errs, r.s.destroy())
	return errors.Join(errs...)
}

// Add enqueues count_experts over r's choices into counters [first, first+n) (backend.ExpertTally): one
// thread a choice, an atomic add into its expert's counter, an id outside [0, n) skipped. Recorded in a
// Step like every launch.
func (t *expertTally) Add(r backend.Routing, first, n int) error {
	b := t.b
	if b.closed {
		return ErrClosed
	}
	rt, err := b.asRouting("count experts", r)
	if err != nil {
		return err
	}
	if first < 0 || n < 0 || first > t.n-n {
		return fmt.Errorf("cuda: count experts into counters [%d, %d+%d) of %d: %w", first, first, n, t.n, backend.ErrShape)
	}
	choices := rt.tokens * rt.k
	if choices == 0 || n == 0 {
		return nil
	}
	ptr := t.buf.ptr + devptr(8*first)
	if rt.logits != nil && rt.count == nil && b.fused(FuseRoute) {
		// The choice itself is not made yet (Route deferred it): count it in the launch that makes it
		// (route_plan, moe.go), or in materialize's.
		rt.count = &pendingCount{ptr: ptr, n: n}
		return nil
	}
	if err := b.materialize(rt); err != nil {
		return err
	}
	return b.launchCount(rt, ptr, n)
}

// launchCount enqueues count_experts over r's choices into the n counters at ptr.
func (b *Backend) launchCount(r *routing, ptr devptr, n int) error {
	choices := r.tokens * r.k
	err := b.stream.launch(b.k.countExperts, dim3{uint32((choices + 127) / 128), 1, 1}, dim3{128, 1, 1}, 0,
		r.experts, choices, ptr, n)
	if err != nil {
		return fmt.Errorf("cuda: count experts: %w", err)
	}
	return nil
}

// Counts copies the counters to the host (backend.ExpertTally) on the reader's stream and waits for that
// copy only: what the device has finished counting. Safe for concurrent use with the goroutine that
// drives the backend.
func (t *expertTally) Counts() ([]int64, error) {
	r := t.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	out := make([]int64, t.n)
	if t.n == 0 {
		return out, nil
	}
	size := int64(t.n) * 8
	if err := r.s.dtoh(r.host.p, t.buf.ptr, size); err != nil {
		return nil, fmt.Errorf("cuda: expert counts: %w", err)
	}
	if err := r.s.sync(); err != nil {
		return nil, fmt.Errorf("cuda: expert counts: %w", err)
	}
	raw := r.host.bytes(0, size)
	for i := range out {
		out[i] = int64(binary.LittleEndian.Uint64(raw[8*i:]))
	}
	return out, nil
}
