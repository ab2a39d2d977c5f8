package cuda

// #include "shim.h"
import "C"

import "errors"

// Concurrent expert GEMMs (FuseStreams). A prefill's routed experts on cuBLASLt run one GEMM per active
// expert and projection, each a small grid where an expert has a hundred or so rows (Scout's down
// projection at 128 rows: 40 output tiles of 128 for 132 SMs, fewer with FP8's wider tiles), and one after
// another on the compute stream they leave most SMs idle. A fan-out runs them on sideStreams side streams
// at once:
//
//   - the side streams wait for an event recorded on the compute stream when the fan-out starts (the
//     inputs, enqueued before, are ready);
//   - each job goes to the next side stream in turn, with that stream's own cuBLASLt workspace;
//   - join records an event on every side stream used and makes the compute stream wait for each, so that
//     everything enqueued after the join runs after the jobs.
//
// Memory stays safe under the pool's rule (one stream's order): blocks the jobs use are released after the
// join (callers defer their releases past it), and a block released then is only reused by work enqueued
// on the compute stream after the join. Nothing may be released and reused between the fan-out's start
// and its join (the callers use no temporary weights there). No fan-out while a step is recorded (graphs
// capture one stream) or profiled (the events time one stream): the jobs then run on the compute stream,
// as with the fusion off.

// sideStreams is the number of side streams a fan-out spreads its jobs over.
const sideStreams = 4

// sides are the side streams, their cuBLASLt workspaces and the events of the fork and the joins, made at
// the first fan-out.
type sides struct {
	s    [sideStreams]*stream
	ws   [sideStreams]devptr
	fork C.CUevent
	done [sideStreams]C.CUevent
}

// fanOut is one fan-out in progress (see above): next hands out the streams, join ends it.
type fanOut struct {
	b    *Backend
	used [sideStreams]bool
	n    int
}

// startFanOut begins a fan-out after everything enqueued so far, or returns nil (the jobs then run on
// the compute stream) where there is none: the fusion off, a recorded or profiled step, or a driver
// without events.
func (b *Backend) startFanOut() (*fanOut, error) {
	if !b.fused(FuseStreams) || b.rec != nil || b.stream.prof != nil {
		return nil, nil
	}
	if b.side == nil {
		if drv.streamWaitEvent == nil || drv.eventCreate == nil || drv.eventRecord == nil || drv.eventDestroy == nil {
			return nil, nil
		}
		if err := b.newSides(); err != nil {
			return nil, err
		}
	}
	if err := check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, b.dev.ctx, b.side.fork, b.stream.s))); err != nil {
		return nil, err
	}
	b.counts.FanOuts++
	return &fanOut{b: b}, nil
}

// next returns the side stream of the fan-out's next job; a side stream's first job makes it wait for the
// fork.
func (f *fanOut) next() (*stream, error) {
	i := f.n % sideStreams
	f.n++
	sd := f.b.side
	if !f.used[i] {
		if err := check("cuStreamWaitEvent", cuResult(C.tp_cuStreamWaitEvent(drv.streamWaitEvent, f.b.dev.ctx, sd.s[i].s, sd.fork, 0))); err != nil {
			return nil, err
		}
		f.used[i] = true
	}
	return sd.s[i], nil
}

// jobStream is the stream for the next job of f: a side stream, or the compute stream without a fan-out.
func (b *Backend) jobStream(f *fanOut) (*stream, error) {
	if f == nil {
		return b.stream, nil
	}
	return f.next()
}

// join makes the compute stream wait for every job of the fan-out (nothing for a nil one). It must run
// before any block the jobs use is released, also on an error path.
func (f *fanOut) join() error {
	if f == nil {
		return nil
	}
	sd := f.b.side
	var errs []error
	for i, used := range f.used {
		if !used {
			continue
		}
		if err := check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, f.b.dev.ctx, sd.done[i], sd.s[i].s))); err != nil {
			errs = append(errs, err)
			continue
		}
		errs = append(errs, check("cuStreamWaitEvent", cuResult(C.tp_cuStreamWaitEvent(drv.streamWaitEvent, f.b.dev.ctx, f.b.stream.s, sd.done[i], 0))))
	}
	if err := errors.Join(errs...); err != nil {
		// The compute stream may not wait for the jobs: wait here, so that their blocks can be released.
		return errors.Join(err, f.b.syncSides())
	}
	f.b.stream.plainNext = true
	return nil
}

// newSides makes b.side: the streams, a workspace of the compute stream's size each, the events.
func (b *Backend) newSides() error {
	sd := &sides{}
	fail := func(err error) error {
		b.side = sd
		b.closeSides()
		return err
	}
	const disableTiming = 2 // CU_EVENT_DISABLE_TIMING
	for i := range sideStreams {
		s, err := b.dev.newStream()
		if err != nil {
			return fail(err)
		}
		sd.s[i] = s
		if b.gemm.wsSize > 0 {
			ws, err := b.dev.memAlloc(b.gemm.wsSize)
			if err != nil {
				return fail(err)
			}
			sd.ws[i], s.ws = ws, ws
		}
		var ev C.CUevent
		if err := check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, b.dev.ctx, &ev, disableTiming))); err != nil {
			return fail(err)
		}
		sd.done[i] = ev
	}
	var ev C.CUevent
	if err := check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, b.dev.ctx, &ev, disableTiming))); err != nil {
		return fail(err)
	}
	sd.fork = ev
	b.side = sd
	return nil
}

// syncSides waits for every side stream.
func (b *Backend) syncSides() error {
	if b.side == nil {
		return nil
	}
	var errs []error
	for _, s := range b.side.s {
		if s != nil {
			errs = append(errs, s.sync())
		}
	}
	return errors.Join(errs...)
}

// closeSides waits for the side streams and releases them, their workspaces and the events.
func (b *Backend) closeSides() {
	sd := b.side
	if sd == nil {
		return
	}
	b.side = nil
	for i, s := range sd.s {
		if s != nil {
			_ = s.sync()
			_ = s.destroy()
		}
		if sd.ws[i] != 0 {
			_ = b.dev.memFree(sd.ws[i])
		}
	}
	for _, e := range append(sd.done[:], sd.fork) {
		if e != nil {
			_ = check("cuEventDestroy", cuResult(C.tp_cuEventDestroy(drv.eventDestroy, b.dev.ctx, e)))
		}
	}
}
