package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"errors"
	"slices"
	"time"

	"github.com/tpfleet/tpfleet/backend"
)

// ProfileEntry is the GPU time of one kind of stream operation (a kernel, a cuBLASLt matmul of one
// shape, a copy) over a profiled run: backend.ProfileEntry, whose Device is the GPU time.
type ProfileEntry = backend.ProfileEntry

// profileSpinCycles is how long Profile holds the stream before f's operations: about 50 ms at 2 GHz.
const profileSpinCycles = int64(100_000_000)

// profiler records an event after every stream operation while Profile runs.
type profiler struct {
	events []C.CUevent // reused across runs
	labels []string
	n      int
}

// mark records an event labelled op on s, after the operation just enqueued.
func (p *profiler) mark(s *stream, op string) {
	if p.n == len(p.events) {
		var e C.CUevent
		if check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, s.d.ctx, &e, 0))) != nil {
			return
		}
		p.events = append(p.events, e)
		p.labels = append(p.labels, "")
	}
	if check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, s.d.ctx, p.events[p.n], s.s))) == nil {
		p.labels[p.n] = op
		p.n++
	}
}

// Profile runs f eagerly (no graphs) with an event after each stream operation and returns the GPU
// time per operation kind, largest first, and the GPU time from the first operation's start to the
// last one's end. The time between two events is charged to the later operation, so launch gaps show
// up in the operation that waited for its launch; a spin kernel launched before f holds the stream for
// about 50 ms, so that f's operations queue up and run back to back when f enqueues faster than that. For
// finding where a step's time goes; it slows the host side down.
func (b *Backend) Profile(f func() error) (entries []ProfileEntry, total time.Duration, err error) {
	if b.closed {
		return nil, 0, ErrClosed
	}
	if drv.eventElapsedTime == nil || !graphsAvailable() {
		return nil, 0, errors.New("cuda: profile: the driver has no event timing entry points")
	}
	if b.rec != nil || b.stream.prof != nil {
		return nil, 0, errors.New("cuda: profile: already recording or profiling")
	}
	if err := b.Synchronize(); err != nil {
		return nil, 0, err
	}
	p := b.prof
	if p == nil {
		p = &profiler{}
		b.prof = p
	}
	p.n = 0
	// Hold the stream for a while so that f's operations queue up behind the spin: the events then
	// measure the GPU's work, not the host's launches (unless f enqueues for longer than this).
	if err := b.stream.launch(b.k.spin, dim3{1, 1, 1}, dim3{1, 1, 1}, 0, profileSpinCycles); err != nil {
		return nil, 0, err
	}
	p.mark(b.stream, "start")
	b.stream.prof = p
	ferr := f()
	b.stream.prof = nil
	if err := b.Synchronize(); err != nil {
		return nil, 0, errors.Join(ferr, err)
	}
	if ferr != nil {
		return nil, 0, ferr
	}
	byOp := map[string]*ProfileEntry{}
	for i := 1; i < p.n; i++ {
		var ms C.float
		if err := check("cuEventElapsedTime", cuResult(C.tp_cuEventElapsedTime(drv.eventElapsedTime, b.dev.ctx, &ms, p.events[i-1], p.events[i]))); err != nil {
			return nil, 0, err
		}
		d := time.Duration(float64(ms) * float64(time.Millisecond))
		e := byOp[p.labels[i]]
		if e == nil {
			e = &ProfileEntry{Op: p.labels[i]}
			byOp[p.labels[i]] = e
		}
		e.Calls++
		e.Device += d
		total += d
	}
	for _, e := range byOp {
		entries = append(entries, *e)
	}
	slices.SortFunc(entries, func(a, b ProfileEntry) int { return int(b.Device - a.Device) })
	return entries, total, nil
}

func (b *Backend) closeProfiler() {
	if b.prof == nil {
		return
	}
	for _, e := range b.prof.events {
		_ = check("cuEventDestroy", cuResult(C.tp_cuEventDestroy(drv.eventDestroy, b.dev.ctx, e)))
	}
	b.prof = nil
}
