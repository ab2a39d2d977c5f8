package cuda

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
// The copies run on the compute stream, so they do not overlap the step's other work: the routing is
// known only just before the experts run (a prefetch would need the router's choice earlier, or a
// device-side cache of hot experts). Steps with offloaded experts cannot be CUDA graphs (the routing
// read is a host synchronisation): Step records nothing for them and they run eagerly.

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
	ids, _, err := b.ReadRouting(rt) // a synchronisation: not recordable, so a Step with it runs eagerly
	if err != nil {
		return nil, fmt.Errorf("cuda: experts (offloaded): %w", err)
	}
	E := gt.shape[0]
	slot := make([]int32, E)
	for i := range slot {
		slot[i] = -1
	}
	var chosen []int
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
	cg, err := b.fetchExperts(gt, chosen)
	if err != nil {
		return nil, err
	}
	cd, err := b.fetchExperts(dt, chosen)
	if err != nil {
		return nil, err
	}
	raw := make([]byte, 4*len(ids))
	for i, id := range ids {
		v := int32(-1) // not among this call's compact experts
		if l := id - first; l >= 0 && l < E {
			v = slot[l]
		}
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
	compact := &routing{b: b, tokens: rt.tokens, k: rt.k, experts: ex, scores: rt.scores}
	return b.experts(xt, compact, cg, cd, 0, add)
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
	if err := b.copyExperts(codes.ptr, h.codes, h.slice, chosen); err != nil {
		return nil, err
	}
	if w.q != nil {
		sc, err := b.pool.get(A * h.scaleSlice)
		if err != nil {
			return nil, fmt.Errorf("cuda: experts (offloaded) %v scales: %w", w.shape, err)
		}
		sc = b.pool.owned(sc)
		if err := b.copyExperts(sc.ptr, h.scales, h.scaleSlice, chosen); err != nil {
			return nil, err
		}
		q := *w.q
		q.scales = sc
		t.q = &q
	}
	return t, nil
}

// copyExperts enqueues the copies of slices chosen of src (slice bytes each) to dst, one after the other;
// runs of consecutive experts go in one copy.
func (b *Backend) copyExperts(dst devptr, src *pinned, slice int64, chosen []int) error {
	for i := 0; i < len(chosen); {
		j := i + 1
		for j < len(chosen) && chosen[j] == chosen[j-1]+1 {
			j++
		}
		n := int64(j-i) * slice
		if err := b.stream.htodNow(dst+devptr(int64(i)*slice), unsafe.Add(src.p, int64(chosen[i])*slice), n); err != nil {
			return fmt.Errorf("cuda: experts (offloaded): %w", err)
		}
		if b.stream.prof != nil {
			b.stream.prof.mark(b.stream, "memcpy HtoD experts")
		}
		b.offload.Bytes += n
		b.offload.Experts += int64(j - i)
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
