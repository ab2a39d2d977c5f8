package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"slices"
	"time"
	"unsafe"

	"github.com/tpfleet/tpfleet/backend"
)

// Expert offload (--offload-experts): a model whose routed experts do not fit the GPU keeps them in
// pinned host memory, and each Experts call copies only the experts its tokens chose to the device.
//
// OffloadExperts moves a loaded experts weight [E, K, N] (bf16 or quantised: codes and scales) to
// page-locked host memory and frees its device copy. Experts on such a weight reads the routing to the
// host (one synchronisation a MoE layer), copies the chosen experts' slices, in the order of their
// ids, into pooled device blocks with asynchronous copies from the pinned memory, remaps the routing to
// those compact slots, and runs the resident path on the compact [A, K, N] weights (A = the experts
// chosen). A decode step of batch 1 and top-1 copies one expert a MoE layer: PCIe bandwidth is its floor
// (OffloadStats, HostCopyRate).
//
// Overlap. Route records an event right after its kernel when weights are offloaded. Experts then waits
// on that event only (not on the stream), so the GPU goes on with what the model enqueued between Route
// and Experts (the shared expert's GEMVs); it reads the routing on a second stream (the copy stream),
// enqueues the chosen experts' copies there into a device cache (one block each for gate_up's and down's
// codes and scales, grown as needed), after the previous Experts call that read the cache, and makes the
// compute stream wait for the copies before the experts' kernels. The copies thus overlap the shared
// expert's compute. Where the driver lacks cuStreamWaitEvent or the events, or the routing is not the
// last one Route made, the routing is read with a stream synchronisation and the copies run on the
// compute stream into pooled blocks. Steps with offloaded experts cannot be CUDA graphs (the routing read
// is a host synchronisation): Step records nothing for them and they run eagerly.

// hostWeight is an experts weight in pinned host memory: codes (bf16 values or quantised codes) and, for
// a quantised weight, its scales, both expert-major.
type hostWeight struct {
	codes, scales *pinned
	slice         int64 // code bytes an expert
	scaleSlice    int64 // scale bytes an expert
}

// OffloadStats counts the offloaded Experts calls and what they copied.
type OffloadStats struct {
	Calls     int64 // Experts calls on offloaded weights
	Experts   int64 // expert slices copied (gate_up and down count one each)
	Bytes     int64 // bytes copied host to device (codes and scales)
	HostBytes int64 // bytes held in pinned host memory
}

// OffloadStats returns the counts so far.
func (b *Backend) OffloadStats() OffloadStats { return b.offload }

// OffloadCopied returns OffloadStats' calls and bytes (tpfleet bench --offload-experts).
func (b *Backend) OffloadCopied() (calls, bytes int64) { return b.offload.Calls, b.offload.Bytes }

// OffloadExperts moves t, an experts weight [E, K, N] loaded on b (bf16 or quantised), to pinned host
// memory and returns its offloaded form, which only Experts reads; t's device memory is freed when t
// becomes unreachable. The pinned memory is freed when the returned tensor becomes unreachable.
func (b *Backend) OffloadExperts(t backend.Tensor) (backend.Tensor, error) {
	tt, err := b.asTensor("offload experts", "weight", t)
	if err != nil {
		return nil, err
	}
	if tt.host != nil {
		return tt, nil
	}
	if len(tt.shape) != 3 || tt.shape[0] < 1 || (tt.q == nil && tt.dt != BF16) {
		return nil, fmt.Errorf("cuda: offload experts %v (%s): want a bf16 or quantised [E, K, N] weight: %w", tt.shape, formatOf(tt), backend.ErrShape)
	}
	E, per := int64(tt.shape[0]), int64(tt.shape[1])*int64(tt.shape[2])
	h := &hostWeight{slice: per * 2}
	if tt.q != nil {
		h.slice = per
		if tt.q.code == qfInt4 {
			if per%2 != 0 {
				return nil, fmt.Errorf("cuda: offload experts %v (%s): an expert's elements must be even (nibbles): %w", tt.shape, tt.q.format, backend.ErrShape)
			}
			h.slice = per / 2
		}
		size := int64(4)
		if tt.q.code == qfInt4 {
			size = 2
		}
		h.scaleSlice = int64(tt.q.groups) * int64(tt.shape[2]) * size
	}
	if err := b.newOffloader(); err != nil {
		return nil, fmt.Errorf("cuda: offload experts %v: %w", tt.shape, err)
	}
	if h.codes, err = b.dev.allocPinned(E * h.slice); err != nil {
		return nil, fmt.Errorf("cuda: offload experts %v: %w", tt.shape, err)
	}
	runtime.AddCleanup(h, freePinned, h.codes)
	if err := b.download(h.codes.bytes(0, E*h.slice), tt.ptr()); err != nil {
		return nil, fmt.Errorf("cuda: offload experts %v: %w", tt.shape, err)
	}
	out := &tensor{b: b, shape: slices.Clone(tt.shape), dt: tt.dt, host: h}
	b.offload.HostBytes += E * h.slice
	if tt.q != nil {
		if h.scales, err = b.dev.allocPinned(E * h.scaleSlice); err != nil {
			return nil, fmt.Errorf("cuda: offload experts %v scales: %w", tt.shape, err)
		}
		runtime.AddCleanup(h, freePinned, h.scales)
		if err := b.download(h.scales.bytes(0, E*h.scaleSlice), tt.q.scales.ptr); err != nil {
			return nil, fmt.Errorf("cuda: offload experts %v scales: %w", tt.shape, err)
		}
		q := *tt.q
		q.scales = nil
		out.q = &q
		b.offload.HostBytes += E * h.scaleSlice
	}
	return out, nil
}

func freePinned(p *pinned) { _ = p.free() } // the context may be gone already: nothing left to free then

// expertsOffloaded is Experts where gateUp and down are offloaded (see above).
func (b *Backend) expertsOffloaded(xt *tensor, rt *routing, gt, dt *tensor, first int, add *tensor) (backend.Tensor, error) {
	if gt.host == nil || dt.host == nil {
		return nil, fmt.Errorf("cuda: experts gateUp %v down %v: both offloaded or neither: %w", gt.shape, dt.shape, backend.ErrShape)
	}
	if b.rec != nil { // the routing read is a host synchronisation: the Step runs eagerly
		return nil, b.rec.fail(fmt.Errorf("%w: experts on offloaded weights", errNotRecordable))
	}
	ids, overlap, err := b.offloadIDs(rt)
	if err != nil {
		return nil, fmt.Errorf("cuda: experts (offloaded): %w", err)
	}
	chosen, compactIDs := compactRouting(ids, first, gt.shape[0])
	b.offload.Calls++
	if len(chosen) == 0 { // no token chose an expert of this rank: zeros (+ add)
		out, err := b.newTensor(F32, xt.shape[0], xt.shape[1])
		if err != nil {
			return nil, err
		}
		if err := b.stream.memset(out.ptr(), 0, int64(out.numel())*4); err != nil {
			return nil, err
		}
		if add == nil {
			return out, nil
		}
		return b.Add(out, add)
	}
	var cg, cd *tensor
	if overlap {
		cg, cd, err = b.fetchOverlapped(gt, dt, chosen)
	} else {
		if cg, err = b.fetchExperts(gt, chosen); err == nil {
			cd, err = b.fetchExperts(dt, chosen)
		}
	}
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 4*len(ids))
	for i, v := range compactIDs {
		binary.LittleEndian.PutUint32(raw[4*i:], uint32(v))
	}
	ex, err := b.pool.get(int64(len(raw)))
	if err != nil {
		return nil, err
	}
	ex = b.pool.owned(ex)
	if err := b.upload(ex.ptr, raw); err != nil {
		return nil, err
	}
	compact := &routing{b: b, tokens: rt.tokens, k: rt.k, choices: rt.choices, experts: ex, scores: rt.scores}
	out, err := b.experts(xt, compact, cg, cd, 0, add)
	if err == nil && overlap { // the next copies into the cache wait for these kernels
		err = check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, b.dev.ctx, b.off.used, b.stream.s)))
	}
	return out, err
}

// offloader is the overlap's state (see the package comment above), made with the first offloaded
// weight where the driver has what it needs.
type offloader struct {
	copy                 *stream
	routed, copied, used C.CUevent
	routing              *routing   // the routing routed was recorded after; nil once used or when none
	ids                  *pinned    // the routing's expert ids, read on the copy stream
	cache                [4]*buffer // gate_up codes and scales, down codes and scales of the chosen experts
}

// newOffloader makes b.off where the driver has events and cuStreamWaitEvent; without them b.off stays nil.
func (b *Backend) newOffloader() error {
	if b.off != nil || drv.streamWaitEvent == nil || drv.eventCreate == nil || drv.eventRecord == nil ||
		drv.eventSynchronize == nil || drv.eventDestroy == nil {
		return nil
	}
	o := &offloader{}
	var err error
	if o.copy, err = b.dev.newStream(); err != nil {
		return err
	}
	const disableTiming = 2 // CU_EVENT_DISABLE_TIMING
	for _, e := range []*C.CUevent{&o.routed, &o.copied, &o.used} {
		// Through a local: cgo checks the whole object behind a pointer that is not an address expression,
		// and o holds Go pointers.
		var ev C.CUevent
		if err := check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, b.dev.ctx, &ev, disableTiming))); err != nil {
			b.off = o
			b.closeOffload()
			return err
		}
		*e = ev
	}
	if o.ids, err = b.dev.allocPinned(64 << 10); err != nil {
		b.off = o
		b.closeOffload()
		return err
	}
	b.off = o
	return nil
}

// closeOffload releases the copy stream, the events and the pinned ids (the caches are dedicated pool
// blocks: the pool frees them).
func (b *Backend) closeOffload() {
	o := b.off
	if o == nil {
		return
	}
	b.off = nil
	if o.copy != nil {
		_ = o.copy.sync()
		_ = o.copy.destroy()
	}
	for _, e := range []C.CUevent{o.routed, o.copied, o.used} {
		if e != nil {
			_ = check("cuEventDestroy", cuResult(C.tp_cuEventDestroy(drv.eventDestroy, b.dev.ctx, e)))
		}
	}
	if o.ids != nil {
		_ = o.ids.free()
	}
}

// offloadRouted is Route's hook: with offloaded weights, an event after the routing kernel, so that
// Experts can wait for the routing alone.
func (b *Backend) offloadRouted(r *routing) {
	o := b.off
	if o == nil || b.rec != nil {
		return
	}
	o.routing = nil
	if check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, b.dev.ctx, o.routed, b.stream.s))) == nil {
		o.routing = r
	}
}

// offloadIDs reads rt's expert ids: waiting for Route's event only and copying on the copy stream where
// the overlap is available (overlap true), else with ReadRouting (a stream synchronisation).
func (b *Backend) offloadIDs(rt *routing) (ids []int, overlap bool, err error) {
	o := b.off
	if o == nil || o.routing != rt {
		ids, _, err = b.ReadRouting(rt)
		return ids, false, err
	}
	o.routing = nil
	if err := b.dev.eventSync(o.routed); err != nil {
		return nil, false, err
	}
	n := int64(rt.tokens) * int64(rt.k) * 4
	if n > o.ids.size {
		if err := o.copy.sync(); err != nil {
			return nil, false, err
		}
		_ = o.ids.free()
		if o.ids, err = b.dev.allocPinned(roundUp(n, 64<<10)); err != nil {
			return nil, false, err
		}
	}
	if n > 0 {
		if err := o.copy.dtoh(o.ids.p, rt.experts.ptr, n); err != nil {
			return nil, false, err
		}
	}
	if err := o.copy.sync(); err != nil {
		return nil, false, err
	}
	raw := o.ids.bytes(0, n)
	ids = make([]int, rt.tokens*rt.k)
	for i := range ids {
		ids[i] = int(int32(binary.LittleEndian.Uint32(raw[4*i:])))
	}
	return ids, true, nil
}

// fetchOverlapped enqueues the copies of experts chosen of gt and dt on the copy stream into the device
// cache, after the previous Experts call that read it, and makes the compute stream wait for them. It
// returns compact weights [len(chosen), K, N] over the cache.
func (b *Backend) fetchOverlapped(gt, dt *tensor, chosen []int) (cg, cd *tensor, err error) {
	o := b.off
	A := int64(len(chosen))
	need := [4]int64{A * gt.host.slice, A * gt.host.scaleSlice, A * dt.host.slice, A * dt.host.scaleSlice}
	for i, n := range need {
		if c := o.cache[i]; n == 0 || (c != nil && c.size >= n) {
			continue
		}
		// Growing: nothing may still read or write the old block.
		if err := o.copy.sync(); err != nil {
			return nil, nil, err
		}
		if err := b.stream.sync(); err != nil {
			return nil, nil, err
		}
		if o.cache[i] != nil {
			b.pool.release(*o.cache[i])
			o.cache[i] = nil
		}
		if o.cache[i], err = b.pool.getDedicated(n); err != nil {
			return nil, nil, fmt.Errorf("cuda: experts (offloaded): device cache of %d bytes: %w", n, err)
		}
	}
	if err := check("cuStreamWaitEvent", cuResult(C.tp_cuStreamWaitEvent(drv.streamWaitEvent, b.dev.ctx, o.copy.s, o.used, 0))); err != nil {
		return nil, nil, err
	}
	view := func(w *tensor, codes, scales *buffer) (*tensor, error) {
		t := &tensor{b: b, buf: &buffer{ptr: codes.ptr, size: codes.size, kind: dedicated}, shape: []int{len(chosen), w.shape[1], w.shape[2]}, dt: w.dt}
		if err := b.copyExperts(o.copy, codes.ptr, w.host.codes, w.host.slice, chosen, true); err != nil {
			return nil, err
		}
		if w.q != nil {
			if err := b.copyExperts(o.copy, scales.ptr, w.host.scales, w.host.scaleSlice, chosen, false); err != nil {
				return nil, err
			}
			q := *w.q
			q.scales = &buffer{ptr: scales.ptr, size: scales.size, kind: dedicated}
			t.q = &q
		}
		return t, nil
	}
	if cg, err = view(gt, o.cache[0], o.cache[1]); err != nil {
		return nil, nil, err
	}
	if cd, err = view(dt, o.cache[2], o.cache[3]); err != nil {
		return nil, nil, err
	}
	if err := check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, b.dev.ctx, o.copied, o.copy.s))); err != nil {
		return nil, nil, err
	}
	if err := check("cuStreamWaitEvent", cuResult(C.tp_cuStreamWaitEvent(drv.streamWaitEvent, b.dev.ctx, b.stream.s, o.copied, 0))); err != nil {
		return nil, nil, err
	}
	return cg, cd, nil
}

// compactRouting returns the local experts (ids first .. first+E-1) that ids choose, sorted, and ids
// renumbered as indices into that list, -1 for the ids of experts held elsewhere: the routing of the
// compact weights [len(chosen), K, N] that fetchExperts makes.
func compactRouting(ids []int, first, E int) (chosen []int, compact []int32) {
	slot := make([]int32, E)
	for i := range slot {
		slot[i] = -1
	}
	for _, id := range ids {
		if l := id - first; l >= 0 && l < E && slot[l] < 0 {
			slot[l] = 0
			chosen = append(chosen, l)
		}
	}
	slices.Sort(chosen)
	for i, l := range chosen {
		slot[l] = int32(i)
	}
	compact = make([]int32, len(ids))
	for i, id := range ids {
		compact[i] = -1 // not among this call's compact experts
		if l := id - first; l >= 0 && l < E {
			compact[i] = slot[l]
		}
	}
	return chosen, compact
}

// fetchExperts enqueues copies of experts chosen (sorted local ids) of the offloaded w into a compact
// device weight [len(chosen), K, N], whose blocks return to the pool when it becomes unreachable
// (stream order keeps them until the work enqueued on them is done).
func (b *Backend) fetchExperts(w *tensor, chosen []int) (*tensor, error) {
	h := w.host
	A := int64(len(chosen))
	codes, err := b.pool.get(A * h.slice)
	if err != nil {
		return nil, fmt.Errorf("cuda: experts (offloaded) %v: %w", w.shape, err)
	}
	codes = b.pool.owned(codes)
	t := &tensor{b: b, buf: codes, shape: []int{len(chosen), w.shape[1], w.shape[2]}, dt: w.dt}
	if err := b.copyExperts(b.stream, codes.ptr, h.codes, h.slice, chosen, true); err != nil {
		return nil, err
	}
	if w.q != nil {
		sc, err := b.pool.get(A * h.scaleSlice)
		if err != nil {
			return nil, fmt.Errorf("cuda: experts (offloaded) %v scales: %w", w.shape, err)
		}
		sc = b.pool.owned(sc)
		if err := b.copyExperts(b.stream, sc.ptr, h.scales, h.scaleSlice, chosen, false); err != nil {
			return nil, err
		}
		q := *w.q
		q.scales = sc
		t.q = &q
	}
	return t, nil
}

// copyExperts enqueues on s the copies of slices chosen of src (slice bytes each) to dst, one after the
// other; runs of consecutive experts go in one copy. countSlices says whether they count as expert slices in
// OffloadStats (a weight's codes do; its scales travel with them and count only as bytes).
func (b *Backend) copyExperts(s *stream, dst devptr, src *pinned, slice int64, chosen []int, countSlices bool) error {
	for i := 0; i < len(chosen); {
		j := i + 1
		for j < len(chosen) && chosen[j] == chosen[j-1]+1 {
			j++
		}
		n := int64(j-i) * slice
		if err := s.htodNow(dst+devptr(int64(i)*slice), unsafe.Add(src.p, int64(chosen[i])*slice), n); err != nil {
			return fmt.Errorf("cuda: experts (offloaded): %w", err)
		}
		if s.prof != nil {
			s.prof.mark(s, "memcpy HtoD experts")
		}
		b.offload.Bytes += n
		if countSlices {
			b.offload.Experts += int64(j - i)
		}
		i = j
	}
	return nil
}

// HostCopyRate measures the pinned-host-to-device copy rate in bytes a second (the PCIe floor of
// offloaded experts): 256 MiB copied four times after a warm-up. It waits for the GPU.
func (b *Backend) HostCopyRate() (float64, error) {
	if b.closed {
		return 0, ErrClosed
	}
	const n = 256 << 20
	h, err := b.dev.allocPinned(n)
	if err != nil {
		return 0, err
	}
	defer h.free()
	d, err := b.pool.get(n)
	if err != nil {
		return 0, err
	}
	defer b.pool.release(*d)
	if err := b.stream.htodNow(d.ptr, h.p, n); err != nil {
		return 0, err
	}
	if err := b.stream.sync(); err != nil {
		return 0, err
	}
	start := time.Now()
	const reps = 4
	for range reps {
		if err := b.stream.htodNow(d.ptr, h.p, n); err != nil {
			return 0, err
		}
	}
	if err := b.stream.sync(); err != nil {
		return 0, err
	}
	return float64(reps*n) / time.Since(start).Seconds(), nil
}
