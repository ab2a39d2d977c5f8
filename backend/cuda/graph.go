package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/tpfleet/tpfleet/backend"
)

// Decode steps as CUDA graphs.
//
// A decode step issues about a hundred small kernels; launched one by one through cgo they leave the GPU
// idle between them, and the host time can exceed the GPU time. Step records the step's stream work once
// with stream capture and replays it with one cuGraphLaunch. The model's Go code still runs on every
// step, in replay mode: the ops check their operands and do their host bookkeeping (KV positions) as
// usual, but instead of launching they only compare each launch with the recorded one and copy the
// step's host arguments (token ids, positions, cache addresses: kernels read these from device memory,
// see kvRow) into pinned memory. The graph's first node copies them all to the device at once, and the
// kernels read them there. So a recording serves every step with
// the same shapes (a batch-size bucket), whichever sequences and positions it holds.
//
// Device memory: what the ops allocate during capture is reserved for the graph (never returned to the
// pool while the graph lives), and replay hands out the same blocks in the same order. The step's result
// lives there too, so it is valid until the next Step with the same key.
//
// If a replay's launches differ from the recording (a chunked cache dropped positions, a sequence of
// another capacity), the replay is undone (the ops' host bookkeeping is restored) and the step runs
// eagerly; the next step records again. Ops that cannot be recorded (a host sync) make the key eager
// for good. NCCL collectives are recorded (NCCL supports stream capture); every rank of a group records
// and replays the same steps, so the collectives inside their graphs pair up as they would eagerly.

// errNotRecordable is returned by an op that cannot be part of a recorded step.
var errNotRecordable = errors.New("cuda: op cannot be recorded in a graph")

// errReplayDiff is returned by an op whose launch differs from the recording; Step then runs the step
// eagerly.
var errReplayDiff = errors.New("cuda: step differs from its recording")

// graphsAvailable reports whether the driver exports the graph and event entry points.
func graphsAvailable() bool {
	return drv.beginCapture != nil && drv.endCapture != nil && drv.graphInstantiate != nil &&
		drv.graphLaunch != nil && drv.graphExecDestroy != nil && drv.graphDestroy != nil &&
		drv.eventCreate != nil && drv.eventDestroy != nil && drv.eventRecord != nil && drv.eventSynchronize != nil
}

// Signature kinds: the first value of each recorded stream operation.
const (
	sigLaunch uint64 = iota + 1
	sigHtoD
	sigDtoD
	sigMemset
	sigMatmul
	sigArg
	sigCollective
)

type recMode uint8

const (
	recCapture recMode = iota + 1
	recReplay
)

// recorder is the state of one Step while it captures or replays. The stream, the pool and the uploads
// consult it (Backend.rec, stream.rec, pool.rec point to it) instead of working eagerly.
type recorder struct {
	mode  recMode
	g     *stepGraph
	cur   int   // replay: index of the next signature value
	alloc int   // replay: index of the next allocation
	args  int64 // next free offset in the arguments, g.pinned[0, g.argCap)
	pin   int64 // next free offset in g.pinned for other uploads, from g.argCap
	err   error // the first failure: errNotRecordable or errReplayDiff, wrapped with the detail
	undo  []func()
}

// fail records the first failure and returns it.
func (r *recorder) fail(err error) error {
	if r.err == nil {
		r.err = err
	}
	return r.err
}

// onUndo registers f to restore host state if the step is undone.
func (r *recorder) onUndo(f func()) { r.undo = append(r.undo, f) }

func (r *recorder) runUndo() {
	for i := len(r.undo) - 1; i >= 0; i-- {
		r.undo[i]()
	}
	r.undo = nil
}

// op records (capture) or checks (replay) one stream operation's signature. It returns whether the
// operation must really be enqueued: true while capturing, false while replaying.
func (r *recorder) op(sig []uint64) (enqueue bool, err error) {
	if r.err != nil {
		return false, r.err
	}
	if r.mode == recCapture {
		r.g.sigs = append(r.g.sigs, uint64(len(sig)))
		r.g.sigs = append(r.g.sigs, sig...)
		return true, nil
	}
	s := r.g.sigs
	if r.cur >= len(s) || s[r.cur] != uint64(len(sig)) || int(s[r.cur])+r.cur+1 > len(s) {
		return false, r.fail(fmt.Errorf("%w: operation of kind %d at value %d", errReplayDiff, sig[0], r.cur))
	}
	rec := s[r.cur+1 : r.cur+1+len(sig)]
	for i := range sig {
		if rec[i] != sig[i] {
			return false, r.fail(fmt.Errorf("%w: operation of kind %d at value %d differs in field %d (%#x, recorded %#x)",
				errReplayDiff, sig[0], r.cur, i, sig[i], rec[i]))
		}
	}
	r.cur += 1 + len(sig)
	return false, nil
}

// allocate hands out a pooled block for a recorded step: while capturing, a block taken from the pool
// for the graph's lifetime; while replaying, the block the same allocation got during capture.
func (r *recorder) allocate(p *pool, n int64) (*buffer, error) {
	if r.err != nil {
		return nil, r.err
	}
	class := sizeClass(n)
	if r.mode == recCapture {
		b, err := p.getPooled(n)
		if err != nil {
			return nil, err
		}
		b.kind = graphOwned
		r.g.allocs = append(r.g.allocs, *b)
		return b, nil
	}
	if r.alloc >= len(r.g.allocs) || r.g.allocs[r.alloc].size != class {
		return nil, r.fail(fmt.Errorf("%w: allocation %d of %d bytes", errReplayDiff, r.alloc, n))
	}
	b := r.g.allocs[r.alloc]
	r.alloc++
	return &b, nil
}

// argAlign aligns each kernel argument array in a recording's arguments.
const argAlign = 16

// arg places a kernel argument array (Backend.temp) in the recording's arguments: the bytes go to the
// graph's pinned memory, which the graph's first node copies to g.args, and the kernels read them at
// the same offset there.
func (r *recorder) arg(src []byte) (*buffer, error) {
	if r.err != nil {
		return nil, r.err
	}
	n := int64(len(src))
	off := r.args
	if off+n > r.g.argCap {
		return nil, r.fail(fmt.Errorf("%w: the step's kernel arguments outgrew the %d bytes of its first run", errReplayDiff, r.g.argCap))
	}
	r.args = roundUp(off+n, argAlign)
	if _, err := r.op([]uint64{sigArg, uint64(n), uint64(off)}); err != nil {
		return nil, err
	}
	copy(r.g.pinned.bytes(off, n), src)
	return &buffer{ptr: r.g.args.ptr + devptr(off), size: n, kind: graphOwned}, nil
}

// upload stages src for the graph's host-to-device copy: captured as a copy from the graph's pinned
// memory, and on replay written to the same pinned bytes before the graph is launched.
func (r *recorder) upload(s *stream, dst devptr, src []byte) error {
	n := int64(len(src))
	if r.err != nil {
		return r.err
	}
	if r.pin+n > r.g.pinned.size {
		return r.fail(fmt.Errorf("%w: a step's host arguments exceed %d bytes", errNotRecordable, r.g.pinned.size))
	}
	off := r.pin
	r.pin = roundUp(off+n, 16)
	enqueue, err := r.op([]uint64{sigHtoD, uint64(dst), uint64(n), uint64(off)})
	if err != nil {
		return err
	}
	copy(r.g.pinned.bytes(off, n), src)
	if enqueue {
		return s.htodNow(dst, unsafe.Add(r.g.pinned.p, off), n)
	}
	return nil
}

// stepGraph is one key's recording: the signatures of its stream operations, the blocks its ops
// allocated, the pinned memory its uploads read, and the instantiated graph.
type stepGraph struct {
	sigs   []uint64
	allocs []buffer
	args   *buffer // the kernel arguments on the device, copied from pinned[0, argCap) at the start
	argCap int64
	pinned *pinned
	exec   C.CUgraphExec
	done   C.CUevent // recorded after each launch: the pinned arguments may be rewritten once it fires
}

// stepState is what Step knows of one key.
type stepState struct {
	runs     int   // steps run with this key
	args     int64 // bytes of kernel arguments the first (eager) step uploaded
	eager    bool  // never record this key again
	g        *stepGraph
	replays  int64
	captures int
}

// maxCaptures is how many times a key is recorded before Step gives up on it: a key whose steps keep
// differing (more than a chunk boundary now and then) is not worth recording.
const maxCaptures = 64

// graphPinnedBytes is the pinned memory each recording holds for its host arguments.
const graphPinnedBytes = 1 << 20

// GraphStats says how Step ran the steps of one key (backend.GraphStats).
type GraphStats = backend.GraphStats

// Graphs reports Step's work per key.
func (b *Backend) Graphs() []GraphStats {
	out := make([]GraphStats, 0, len(b.steps))
	for k, st := range b.steps {
		out = append(out, GraphStats{Key: k, Steps: st.runs, Replays: st.replays, Captures: st.captures, Eager: st.eager})
	}
	return out
}

var _ backend.StepRecorder = (*Backend)(nil)

// Step runs f, one step of a model, and records it as a CUDA graph to replay later steps with the same
// key (see the comment at the top of graph.go). The first step of a key runs eagerly (it warms the pool
// and cuBLASLt's plans), the second is recorded, later ones replay. f may run twice in one Step: a
// replay that differs from its recording is undone and f runs again eagerly. Without the driver's graph
// entry points, with Config.Eager, or inside another Step, Step just calls f.
func (b *Backend) Step(key string, f func() (backend.Tensor, error)) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if b.rec != nil { // inside another Step: that one flushes
		return f()
	}
	f = b.flushing(f)
	if b.cfg.Eager || b.stream.prof != nil || !graphsAvailable() {
		return f()
	}
	if b.steps == nil {
		b.steps = map[string]*stepState{}
	}
	st := b.steps[key]
	if st == nil {
		st = &stepState{}
		b.steps[key] = st
	}
	st.runs++
	switch {
	case st.eager:
		return f()
	case st.runs == 1:
		return b.measure(st, f)
	case st.g == nil:
		return b.capture(st, f)
	default:
		return b.replay(st, f)
	}
}

// flushing returns f followed by flushRoutes, so that a step launches everything its ops deferred
// (recorded with the rest of it); after a failed f the deferred work is dropped with the step.
func (b *Backend) flushing(f func() (backend.Tensor, error)) func() (backend.Tensor, error) {
	return func() (backend.Tensor, error) {
		out, err := f()
		if err != nil {
			b.pendingRoutes = nil
			return nil, err
		}
		if err := b.flushRoutes(); err != nil {
			return nil, err
		}
		return out, nil
	}
}

// measure runs f eagerly and keeps the bytes of kernel arguments it uploads, the room the next recording
// of st's key reserves for them.
func (b *Backend) measure(st *stepState, f func() (backend.Tensor, error)) (backend.Tensor, error) {
	b.argBytes = 0
	out, err := f()
	st.args = b.argBytes
	return out, err
}

// begin installs r as the recorder of the stream, the pool and the ops.
func (b *Backend) begin(r *recorder) {
	b.rec, b.stream.rec, b.pool.rec = r, r, r
}

func (b *Backend) end() {
	b.rec, b.stream.rec, b.pool.rec = nil, nil, nil
}

// capture records f as st's graph, launches it, and returns f's result. When the step cannot be
// recorded it is undone and run eagerly, and the key stays eager.
func (b *Backend) capture(st *stepState, f func() (backend.Tensor, error)) (backend.Tensor, error) {
	st.captures++
	if st.captures > maxCaptures {
		st.eager = true
		return f()
	}
	if st.args > graphPinnedBytes/2 {
		st.eager = true
		return f()
	}
	g := &stepGraph{argCap: roundUp(max(st.args, argAlign), 256)}
	var err error
	if g.pinned, err = b.dev.allocPinned(graphPinnedBytes); err != nil {
		return nil, err
	}
	if g.args, err = b.pool.getPooled(g.argCap); err != nil {
		b.freeGraph(g)
		return nil, err
	}
	g.args.kind = graphOwned
	if err := b.stream.beginCapture(); err != nil {
		b.freeGraph(g)
		st.eager = true
		return f()
	}
	// The first node: every kernel argument of the step, in one copy.
	if err := b.stream.htodNow(g.args.ptr, g.pinned.p, g.argCap); err != nil {
		_, _ = b.stream.endCapture()
		b.freeGraph(g)
		st.eager = true
		return f()
	}
	r := &recorder{mode: recCapture, g: g, pin: g.argCap}
	b.begin(r)
	out, ferr := f()
	b.end()
	graph, cerr := b.stream.endCapture()
	if ferr == nil && cerr == nil && r.err == nil {
		g.exec, cerr = instantiate(b.dev, graph)
	}
	if graph != nil {
		_ = check("cuGraphDestroy", cuResult(C.tp_cuGraphDestroy(drv.graphDestroy, b.dev.ctx, graph))) // the exec graph is independent of it
	}
	if ferr != nil || cerr != nil || r.err != nil {
		// Nothing captured has run: restore the host state and run the step for real.
		r.runUndo()
		b.freeGraph(g)
		if ferr != nil && r.err == nil && cerr == nil {
			return nil, ferr // the step itself failed (bad input): as eagerly, but with nothing enqueued
		}
		if !errors.Is(r.err, errReplayDiff) { // an op that cannot be recorded: for good
			st.eager = true
		}
		return b.measure(st, f) // the step outgrew its first run's arguments: measure again, record next time
	}
	if err := check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, b.dev.ctx, &g.done, 2))); err != nil { // 2: CU_EVENT_DISABLE_TIMING
		b.freeGraph(g)
		return nil, err
	}
	st.g = g
	if err := b.launchGraph(g); err != nil {
		return nil, err
	}
	return out, nil
}

// replay runs f in replay mode against st's graph and launches the graph; a replay that differs is
// undone, the graph dropped and f run eagerly.
func (b *Backend) replay(st *stepState, f func() (backend.Tensor, error)) (backend.Tensor, error) {
	g := st.g
	// The previous launch must have read its pinned arguments before they are rewritten.
	if err := b.dev.eventSync(g.done); err != nil {
		return nil, err
	}
	r := &recorder{mode: recReplay, g: g, pin: g.argCap}
	b.begin(r)
	out, ferr := f()
	b.end()
	if r.err == nil && (r.cur != len(g.sigs) || r.alloc != len(g.allocs) || r.args > g.argCap) {
		r.err = fmt.Errorf("%w: the step ended early", errReplayDiff)
	}
	if r.err != nil || ferr != nil {
		r.runUndo()
		if r.err == nil {
			return nil, ferr
		}
		// Earlier results of this key are no longer promised: the graph and its memory can go. The next
		// step records again, with room for this step's arguments.
		st.g = nil
		b.freeGraph(g)
		return b.measure(st, f)
	}
	if err := b.launchGraph(g); err != nil {
		return nil, err
	}
	st.replays++
	return out, nil
}

func (b *Backend) launchGraph(g *stepGraph) error {
	if err := check("cuGraphLaunch", cuResult(C.tp_cuGraphLaunch(drv.graphLaunch, b.dev.ctx, g.exec, b.stream.s))); err != nil {
		return err
	}
	return check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, b.dev.ctx, g.done, b.stream.s)))
}

// freeGraph destroys g's executable graph and returns its memory. Work already enqueued that uses the
// memory runs before any later use of it (one stream), and the pinned memory is freed only after the
// stream is idle.
func (b *Backend) freeGraph(g *stepGraph) {
	if g.exec != nil {
		_ = check("cuGraphExecDestroy", cuResult(C.tp_cuGraphExecDestroy(drv.graphExecDestroy, b.dev.ctx, g.exec)))
		g.exec = nil
	}
	if g.done != nil {
		_ = check("cuEventDestroy", cuResult(C.tp_cuEventDestroy(drv.eventDestroy, b.dev.ctx, g.done)))
		g.done = nil
	}
	for _, a := range g.allocs {
		a.kind = pooled
		b.pool.release(a)
	}
	g.allocs = nil
	if g.args != nil {
		g.args.kind = pooled
		b.pool.release(*g.args)
		g.args = nil
	}
	if g.pinned != nil {
		if b.stream.sync() == nil {
			_ = g.pinned.free()
		}
		g.pinned = nil
	}
}

// ReleaseGraphs frees every recorded step: their CUDA graphs and memory. Later steps record again. Call it
// from the goroutine that drives the backend before closing an NCCL communicator the steps used: NCCL
// destroys a communicator only once the graphs that captured its collectives are gone.
func (b *Backend) ReleaseGraphs() {
	b.closeGraphs()
	b.steps = nil
}

func (b *Backend) closeGraphs() {
	for _, st := range b.steps {
		if st.g != nil {
			b.freeGraph(st.g)
			st.g = nil
		}
	}
}

func instantiate(d *device, g C.CUgraph) (C.CUgraphExec, error) {
	var e C.CUgraphExec
	err := check("cuGraphInstantiate", cuResult(C.tp_cuGraphInstantiate(drv.graphInstantiate, d.ctx, &e, g, 0)))
	return e, err
}

// Capture modes (CUstreamCaptureMode). Relaxed: the pool may call cuMemAlloc while a step is captured.
const captureRelaxed = 2

func (s *stream) beginCapture() error {
	return check("cuStreamBeginCapture", cuResult(C.tp_cuStreamBeginCapture(drv.beginCapture, s.d.ctx, s.s, captureRelaxed)))
}

// endCapture ends the capture and returns the graph (nil when the capture failed).
func (s *stream) endCapture() (C.CUgraph, error) {
	var g C.CUgraph
	err := check("cuStreamEndCapture", cuResult(C.tp_cuStreamEndCapture(drv.endCapture, s.d.ctx, s.s, &g)))
	if err != nil {
		return nil, err
	}
	return g, nil
}
