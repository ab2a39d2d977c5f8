package cuda

import (
	"fmt"
	"runtime"

	"github.com/tpfleet/tpfleet/backend"
)

// int4 weights run on their own kernels (kernels/quant_int4.cu), chosen by the format when the weight is
// loaded, never by a branch inside a kernel:
//   - decode and small batches, T <= skinnyRows rows or tokens: tensor-core GEMVs that read the codes (½
//     byte a weight) and turn each pair of codes into bf16 in two instructions; x enters as hi + lo bf16
//     columns, so the product keeps float32 accuracy as the skinny-GEMM rule asks (doc.go, Numerics).
//     Linear: q4gemv_N, up to 16 rows a launch (above 4 rows on x converted once by q4_xprep), in the
//     WIDE form q4gemv_Nw where K and the group size are multiples of 128 (q4Wide); LinearMulti: two or
//     three int4 weights of one x as one q4gemv_multi_1(w) launch; the routed experts: q4expert_gemv_N
//     on the [E, K, N] layout, K split over blocks as expert_gemv_N does.
//   - prefill (more rows): q4gemm, a tensor-core GEMM that turns the codes into bf16(q·s) fragments in
//     registers (FuseQ4GEMM): Linear on q4gemm (x in bf16: a float32 x rounded once, or split into hi
//     and lo halves where Linear keeps float32 accuracy), the routed experts on q4gemm_experts_swiglu
//     (gate_up with SiLU·mul in its epilogue) and q4gemm_experts (down), every active expert in one launch
//     and no host synchronisation. With FuseQ4GEMM off (or shapes q4gemm does not take: K or the group size
//     not a multiple of 32), dequant_int4_bf16 writes the weight (one expert at a time for Experts) as bf16
//     and cuBLASLt multiplies, as for fp8; both multiply the same bf16 weights and inputs.
//
// The threshold, from bytes and instructions (H100: 3.35 TB/s, 132 SMs issuing 4 warp-instructions a
// cycle at 1.755 GHz, so 0.138 warp-instructions a weight at the int4 bandwidth floor): a GEMV launch of
// up to 16 rows costs about 0.1 (q4gemv_1w, the SASS of NVRTC 11.8: the codes 0.05, the hi/lo input
// columns 0.02, the mma and the group scales) to 0.16 (q4gemv_4w) warp-instructions a weight, so T rows
// cost T/16 launches of about 1 to 1.2 times the floor each, ½ byte a weight read each time (from L2 for
// the later launches of a weight that fits it). Dequantising instead reads ½ byte, writes 2 and cuBLASLt
// reads 2 back: 9 times the floor before the GEMM's own time, which grows by a tensor-core pass of 4T
// flops a weight (x hi and lo, as the bf16 path splits a float32 x). The GEMV stays ahead up to about
// 150 rows; at 64 (skinnyRows) it is twice as fast and keeps float32 accuracy, which the bf16 copy (q·s
// rounded to bf16) does not. Above skinnyRows q4gemm runs (the dequantised path with FuseQ4GEMM off), for
// dense weights up to q4gemmDenseMaxRows rows of x (more take the dequantised path: cuBLASLt's faster
// tiles outweigh the copy there).
//
// q4gemm reads ½ byte a weight once per tile of rows of x (128 for Linear, 64 for the experts), where the
// dequantised path moved 4½ bytes a weight before its GEMM (½ read, 2 written, 2 read back), and keeps the
// tensor cores busy at prefill's row counts: blocks of 4 warps, each warp 32 channels × 128 rows (Linear)
// or 64 × 64 (experts), with 2.8 (Linear) and 3.6 (experts) other instructions an mma in the main loop
// (NVRTC 11.8's SASS for sm_90: 255 and 207–210 registers, two blocks an SM, no spills).
// docs/gpu-notes.md has the prediction for Scout.

// Launch geometry of quant_int4.cu (Q4_MAXW, Q4E_WARPS, Q4E_COLS, Q4E_KTILE).
const (
	q4MaxWarps = 16
	q4eThreads = 128
	q4eCols    = 256
	q4eKTile   = 1024
	// q4gemvRows is the most rows of x one q4gemv launch takes (q4gemv_4).
	q4gemvRows = 16
	// q4WarpsPerSM is the q4gemv warps a launch aims at per SM: enough four-block (2 KiB a warp at 64
	// weight rows) load batches in flight to cover the memory latency, within the registers of a
	// 512-thread block.
	q4WarpsPerSM = 24
	// With FuseQ4Split, a q4gemv launch whose row tiles would leave SMs idle (q4SplitBelow: one block an
	// SM, the last wave part empty, e.g. 80 tiles of a 5120-row weight on 132 SMs) also splits K, into
	// as many blocks of q4SplitWarps warps as fit the SMs at once (gridDim.y splits, at least a unit a
	// warp), so that the launch is one wave: q4gemv_1 and _2 use 128 registers a thread (their
	// 512-thread bounds), four such blocks an SM; q4gemv_4 about 180, two.
	q4SplitBelow = 0.9
	q4SplitWarps = 4
	// q4eBlocksPerSM is the q4expert_gemv blocks (4 warps) a launch aims at per SM.
	q4eBlocksPerSM = 8
	// q4gemm's geometry (Q4G_WARPS, Q4G_BK, Q4G_DMT/DNT, Q4G_EMT/ENT): blocks of 4 warps; q4gemm's of 128
	// rows of x × 128 output channels, q4gemm_experts' of 64 rows × 256 channels (q4gemm_experts_swiglu:
	// 128 columns of act, from 128 of gate and 128 of up); K and the group size in multiples of 32 (a stage
	// lies in one group).
	q4gThreads  = 128
	q4gBK       = 32
	q4gDenseBM  = 128
	q4gDenseBN  = 128
	q4gExpertBM = 64
	q4gExpertBN = 256
)

// q4Launch is a q4gemv launch's geometry: S K splits (gridDim.y) of blocks of W warps, and with S > 1
// the split partials and the counters the kernel adds them with (q4gemv_rows in quant_int4.cu).
type q4Launch struct {
	S, W int
	part *buffer
	ctr  *buffer
}

// q4Geometry sizes a q4gemv launch of tiles row tiles over in inputs (wide: 128-input units, else 32),
// with slab floats of partial sums a block when split and maxW warps a block at most. Without a split a
// block's warps cut K alone, as many as q4WarpsPerSM asks; with FuseQ4Split, tiles that would fill the
// SMs' last wave less than q4SplitBelow split K too, into at most perSM blocks an SM. Release the
// partials (release) once the launch is enqueued.
func (b *Backend) q4Geometry(tiles, in, slab int, wide bool, maxW, perSM int) (q4Launch, error) {
	sms := max(b.dev.multiprocessors, 1)
	g := q4Launch{S: 1, W: min(ceilDiv(q4WarpsPerSM*sms, tiles), maxW, max(in/32/4, 1))}
	if !b.fused(FuseQ4Split) || float64(tiles)/float64(ceilDiv(tiles, sms)*sms) >= q4SplitBelow {
		return g, nil
	}
	units := in / 32
	if wide {
		units = in / 128
	}
	S := min(perSM*sms/tiles, units/q4SplitWarps) // all blocks resident at once: one wave
	if S < 2 {
		return g, nil
	}
	ctr, err := b.fuseCounters(tiles)
	if err != nil || ctr == nil { // nil: a recorded step's counters are too few; no split then
		return g, err
	}
	part, err := b.pool.get(int64(S) * int64(tiles) * int64(slab) * 4)
	if err != nil {
		return g, err
	}
	b.counts.Q4Split++
	return q4Launch{S: S, W: q4SplitWarps, part: part, ctr: ctr}, nil
}

// args are the kernel's last two arguments: the partials and the counters (null without a split).
func (g q4Launch) args() (devptr, devptr) {
	if g.part == nil {
		return 0, 0
	}
	return g.part.ptr, g.ctr.ptr
}

func (g q4Launch) release(b *Backend) {
	if g.part != nil {
		b.pool.release(*g.part)
	}
}

// q4gemvOK reports whether x [T, in] · wᵀ (w int4) runs on q4gemv: at most skinnyRows rows, in and the
// group size multiples of 32 (a 32-input block lies in one group), a 16-byte aligned x.
func (b *Backend) q4gemvOK(xt, wt *tensor) bool {
	T, in := xt.shape[0], xt.shape[1]
	return !b.noQuantGEMV && T <= skinnyRows && in > 0 && in%32 == 0 && wt.q.gs%32 == 0 && wt.ptr()%16 == 0 &&
		wt.q.scales.ptr%16 == 0 && xt.ptr()%16 == 0
}

// linearInt4 enqueues y [T, out] = x [T, in] · wᵀ on q4gemv, q4gemvRows rows a launch (q4gemvOK holds).
// Above 4 rows x is first converted once to the GEMV's B records (q4_xprep, float32 hi + lo as bf16
// pairs: as many bytes as a float32 x), which q4gemv_2 and q4gemv_4 load instead of converting x in
// every block.
func (b *Backend) linearInt4(x, wt, y *tensor) error {
	T, in, outDim := x.shape[0], x.shape[1], wt.shape[0]
	var xq *buffer
	if T > 4 {
		var err error
		if xq, err = b.pool.get(int64(T) * int64(in) * 4); err != nil {
			return err
		}
		defer b.pool.release(*xq)
		if err := b.stream.launch(b.k.q4XPrep, elemGrid(T*in/8), elemBlockDim, 0, x, int(x.dt), T, in, xq); err != nil {
			return err
		}
	}
	ks := &b.k.q4gemv[q4Wide(wt)]
	for r0 := 0; r0 < T; r0 += q4gemvRows {
		n := min(q4gemvRows, T-r0)
		// nt: the kernel's n8 tiles (NT), 4 rows of x each; perSM: its split blocks that fit an SM.
		k, rows, nt, maxW, perSM := ks[0], 64, 1, q4MaxWarps, 4
		xp := x.ptr() + devptr(int64(r0)*int64(in)*x.dt.size())
		switch {
		case n > 8:
			k, rows, nt, maxW, perSM = ks[2], 32, 4, q4MaxWarps/2, 2
		case n > 4:
			k, rows, nt = ks[1], 32, 2
		}
		if n > 4 {
			xp = xq.ptr + devptr(int64(r0)*int64(in)*4) // row r0's records: 2 halves × in/8 × 16 bytes a row
		}
		blocks := ceilDiv(outDim, rows)
		// Warps split K: as many as the SMs want, each with at least one batch of four 32-input blocks;
		// blocks too few for the SMs split it too.
		g, err := b.q4Geometry(blocks, in, rows*4*nt, q4Wide(wt) == 1, maxW, perSM)
		if err != nil {
			return err
		}
		part, ctr := g.args()
		yp := y.ptr() + devptr(int64(r0)*int64(outDim)*4)
		err = b.stream.launch(k, dim3{uint32(blocks), uint32(g.S), 1}, dim3{uint32(32 * g.W), 1, 1}, 0,
			xp, int(x.dt), wt, wt.q.scales, wt.q.gs, yp, n, in, outDim, part, ctr)
		g.release(b)
		if err != nil {
			return err
		}
	}
	runtime.KeepAlive(x)
	return nil
}

// linearMultiInt4 is LinearMulti's int4 fusion: at up to 4 rows, two or three of wts that are int4 weights
// q4gemv takes, with the same input width and group size, run as one q4gemv_multi_1 launch (q, k and v;
// the shared expert's gate and up beside a bf16 router); the others run as Linear. ok is false, with
// nothing enqueued, when fewer than two weights qualify.
func (b *Backend) linearMultiInt4(xt *tensor, wts []*tensor) (out []backend.Tensor, ok bool, err error) {
	if len(xt.shape) != 2 || xt.shape[0] > 4 || xt.shape[0] == 0 || len(wts) > 3 {
		return nil, false, nil
	}
	T, in := xt.shape[0], xt.shape[1]
	var idx []int
	for i, w := range wts {
		if w.q != nil && w.q.code == qfInt4 && len(w.shape) == 2 && w.shape[1] == in && w.shape[0] > 0 && b.q4gemvOK(xt, w) &&
			(len(idx) == 0 || (w.q.gs == wts[idx[0]].q.gs && q4Wide(w) == q4Wide(wts[idx[0]]))) {
			idx = append(idx, i)
		}
	}
	if len(idx) < 2 {
		return nil, false, nil
	}
	out = make([]backend.Tensor, len(wts))
	args := []any{xt, int(xt.dt)}
	blocks := 0
	for j := range 3 {
		if j >= len(idx) {
			args = append(args, devptr(0), devptr(0), devptr(0), 0)
			continue
		}
		w := wts[idx[j]]
		n := w.shape[0]
		y, err := b.newTensor(F32, T, n)
		if err != nil {
			return nil, true, err
		}
		out[idx[j]] = y
		args = append(args, w, w.q.scales, y, n)
		blocks += ceilDiv(n, 64)
	}
	wide := q4Wide(wts[idx[0]])
	g, err := b.q4Geometry(blocks, in, 64*4, wide == 1, q4MaxWarps, 4)
	if err != nil {
		return nil, true, err
	}
	part, ctr := g.args()
	args = append(args, wts[idx[0]].q.gs, T, in, part, ctr)
	b.counts.QuantGEMV += int64(len(idx))
	err = b.stream.launch(b.k.q4gemvMulti[wide], dim3{uint32(blocks), uint32(g.S), 1}, dim3{uint32(32 * g.W), 1, 1}, 0, args...)
	g.release(b)
	if err != nil {
		return nil, true, fmt.Errorf("cuda: linear multi x%v (int4): %w", xt.shape, err)
	}
	for i := range wts {
		if out[i] == nil {
			if out[i], err = b.Linear(xt, wts[i]); err != nil {
				return nil, true, err
			}
		}
	}
	return out, true, nil
}

// q4Wide is 1 where q4gemv reads w [N, K] with its WIDE loads (a lane's 16 bytes of a 128-input tile in
// one load: K and the group size multiples of 128, w 16-byte aligned), else 0 (four-byte loads of word c
// of each 16-byte block, so that groups of 32 work): the index of b.k.q4gemv and b.k.q4gemvMulti.
func q4Wide(w *tensor) int {
	if w.shape[1]%128 == 0 && w.q.gs%128 == 0 && w.ptr()%16 == 0 {
		return 1
	}
	return 0
}

// dequantInt4 enqueues dequant_int4_bf16 for elements [off, off+n) of the int4 weight t viewed as [outer,
// in, inner] into buf (bf16): 32 elements a thread, on the vector path where the range and the shape
// allow it (see the kernel).
func (b *Backend) dequantInt4(t *tensor, inner, off, n int64, buf *buffer) error {
	q := t.q
	in := int64(q.in)
	vec := off%32 == 0 && n%32 == 0 && t.ptr()%16 == 0 && q.scales.ptr%16 == 0 && buf.ptr%16 == 0 &&
		((inner == 1 && in%32 == 0) || (inner > 1 && inner%32 == 0))
	chunks := ceilDiv(int(min(n, 1<<40)), 32)
	return b.stream.launch(b.k.dequantInt4, elemGrid(chunks), elemBlockDim, 0,
		t, q.scales, in, inner, q.gs, q.groups, off, n, vec, buf)
}

// q4ExpertsOK reports whether Experts on int4 weights runs on q4expert_gemv: H and I multiples of 16 and
// group sizes too (a k16 step lies in one group), 16-byte aligned scales (eight a load).
func (b *Backend) q4ExpertsOK(e *expertsCall) bool {
	gq, dq := e.gu.q, e.down.q
	return gq.code == qfInt4 && dq.code == qfInt4 && e.H%16 == 0 && e.I%16 == 0 && gq.gs%16 == 0 && dq.gs%16 == 0 &&
		gq.scales.ptr%16 == 0 && dq.scales.ptr%16 == 0 && e.gu.ptr()%4 == 0 && e.down.ptr()%4 == 0
}

// q4SplitK is splitK for q4expert_gemv: K rows per block a multiple of 64 (four k16 steps, the kernel's
// batch of loads), at most q4eKTile, aiming at q4eBlocksPerSM blocks per SM.
func (b *Backend) q4SplitK(K, N, z int) (ksplit, splits int) {
	blocks := ceilDiv(N, q4eCols) * z
	target := q4eBlocksPerSM * max(b.dev.multiprocessors, 1)
	s := max(target/blocks, 1)
	ksplit = min(max(ceilDiv(ceilDiv(K, s), 64)*64, 64), q4eKTile)
	return ksplit, ceilDiv(K, ksplit)
}

// expertSplitK is the K split of the expert GEMV that reads w: q4SplitK for int4, else splitK.
func (b *Backend) expertSplitK(w *tensor, K, N, z int) (ksplit, splits int) {
	if w.q != nil && w.q.code == qfInt4 {
		return b.q4SplitK(K, N, z)
	}
	return b.splitK(K, N, z)
}

// launchQ4Expert enqueues q4expert_gemv_N over w [E, K, N] (int4) for plan p's active experts: rows are
// taken 4 a pass (q4expert_gemv_1) when no expert can have more than 4 (T <= 4), else 8 a pass. With epi
// (not nil) the kernel ends with that fused epilogue (q4expert_gemv_swiglu_N, q4expert_gemv_combine_N).
func (b *Backend) launchQ4Expert(e *expertsCall, p *expertPlan, x any, xdt, mode int, w *tensor, K, N, ks, splits int, P *buffer, R int,
	epi *expertEpi) error {
	if w.q == nil || w.q.code != qfInt4 {
		return fmt.Errorf("cuda: q4expert_gemv on a %s weight", formatOf(w))
	}
	kerns := b.k.q4expertGEMV
	args := []any{x, xdt, mode, p.perm, e.scores(), e.r.k, p.seg(), p.active(e.E), p.meta(e.E), w, w.q.scales, w.q.gs, K, N, ks, P, R}
	if epi != nil {
		kerns = epi.pick(b.k.q4expertSwiGLU, b.k.q4expertCombine)
		args = append(args, epi.args(e, p)...)
	}
	kern := kerns[1]
	if e.T <= 4 {
		kern = kerns[0]
	}
	grid := dim3{uint32(ceilDiv(N, q4eCols)), uint32(splits), uint32(e.expertBound())}
	return b.stream.launch(kern, grid, dim3{q4eThreads, 1, 1}, 0, args...)
}

// q4gemmDenseMaxRows is the default Backend.q4gemmMaxRows. q4gemm reads half a byte a weight where the
// dequantised path writes and reads two more, but its mma.sync tiles run at 60 % of cuBLASLt's rate: on an
// H100 at 2048 rows of Scout's dense shapes q4gemm took 352, 89, 465 and 556 µs against 210, 52, 315 and
// 311 µs dequantised (TestInt4GEMMTimes), and a bf16 copy of a 5120×5120 weight costs about 20 µs, so the
// rows at which the two meet are near 300–500 for those shapes.
const q4gemmDenseMaxRows = 384

// q4gemmOK reports whether Linear on the int4 weight w [out, in] runs on q4gemm above the GEMV's rows for
// T rows of x: FuseQ4GEMM on, at most q4gemmMaxRows rows, in and the group size multiples of q4gBK,
// 16-byte aligned codes.
func (b *Backend) q4gemmOK(w *tensor, T int) bool {
	return b.fused(FuseQ4GEMM) && (b.q4gemmMaxRows <= 0 || T <= b.q4gemmMaxRows) && w.q != nil && w.q.code == qfInt4 && len(w.shape) == 2 && w.shape[1] > 0 &&
		w.shape[1]%q4gBK == 0 && w.q.gs%q4gBK == 0 && w.ptr()%16 == 0
}

// linearQ4GEMM returns y [T, out] = x [T, in] · wᵀ (float32) on q4gemm (q4gemmOK holds, T > 0). x enters
// as bf16, by Linear's rule for the bf16 path: a float32 x is split into hi and lo halves, one q4gemm of 2T
// rows and their sum (float32 accuracy), with Activations F32, at most skinnyRows rows (SetQuantGEMV off)
// or a narrow product; else it is rounded to bf16 once.
func (b *Backend) linearQ4GEMM(x, w *tensor) (*tensor, error) {
	T, in, out := x.shape[0], x.shape[1], w.shape[0]
	y, err := b.newTensor(F32, T, out)
	if err != nil {
		return nil, err
	}
	b.counts.QuantQ4GEMM++
	if x.dt != BF16 && (b.cfg.Activations == F32 || T <= skinnyRows || narrowProduct(in, out)) {
		halves, err := b.pool.get(int64(2*T) * int64(in) * 2)
		if err != nil {
			return nil, err
		}
		defer b.pool.release(*halves)
		d, err := b.pool.get(int64(2*T) * int64(out) * 4)
		if err != nil {
			return nil, err
		}
		defer b.pool.release(*d)
		if err := b.splitHalves(x, halves); err != nil {
			return nil, err
		}
		if err := b.launchQ4GEMM(halves.ptr, w, d.ptr, 2*T); err != nil {
			return nil, err
		}
		if err := b.stream.launch(b.k.addHalves, elemGrid(T*out), elemBlockDim, 0, d, y, int(y.dt), int64(T*out)); err != nil {
			return nil, err
		}
		runtime.KeepAlive(x)
		return y, nil
	}
	xp := x.ptr()
	if x.dt != BF16 || xp%16 != 0 {
		tmp, err := b.pool.get(int64(T) * int64(in) * 2)
		if err != nil {
			return nil, err
		}
		defer b.pool.release(*tmp)
		if err := b.convert(x, tmp.ptr, BF16, T*in); err != nil {
			return nil, err
		}
		xp = tmp.ptr
	}
	if err := b.launchQ4GEMM(xp, w, y.ptr(), T); err != nil {
		return nil, err
	}
	runtime.KeepAlive(x)
	return y, nil
}

// launchQ4GEMM enqueues q4gemm: y [rows, out] (float32) = x [rows, in] (bf16 at xp) · wᵀ.
func (b *Backend) launchQ4GEMM(xp devptr, w *tensor, y devptr, rows int) error {
	in, out := w.shape[1], w.shape[0]
	if ceilDiv(rows, q4gDenseBM) > maxGridY {
		return fmt.Errorf("q4gemm of %d rows: more than %d row tiles: %w", rows, maxGridY, backend.ErrShape)
	}
	grid := dim3{uint32(ceilDiv(out, q4gDenseBN)), uint32(ceilDiv(rows, q4gDenseBM)), 1}
	return b.stream.launch(b.k.q4gemm, grid, dim3{q4gThreads, 1, 1}, 0, xp, w, w.q.scales, w.q.gs, y, rows, in, out)
}

// maxGridY is the most blocks of a grid's y dimension.
const maxGridY = 65535

// q4ExpertsGEMMOK reports whether Experts on int4 weights runs on q4gemm_experts at prefill: FuseQ4GEMM
// on, H and I multiples of q4gBK and so the group sizes (a stage in one group; gate_up's 32-column
// chunks of gate and up), 16-byte aligned codes and scales, and the row-tile slots within a grid.
func (b *Backend) q4ExpertsGEMMOK(e *expertsCall) bool {
	gq, dq := e.gu.q, e.down.q
	return b.fused(FuseQ4GEMM) && gq.code == qfInt4 && dq.code == qfInt4 && e.H%q4gBK == 0 && e.I%q4gBK == 0 &&
		gq.gs%q4gBK == 0 && dq.gs%q4gBK == 0 && e.gu.ptr()%16 == 0 && e.down.ptr()%16 == 0 &&
		gq.scales.ptr%16 == 0 && dq.scales.ptr%16 == 0 && q4gSlots(e) <= maxGridY
}

// q4gSlots is the row-tile slots of a q4gemm_experts grid: at least the active experts' tiles of
// q4gExpertBM rows, Σ ceil(rows_e / q4gExpertBM) <= ceil(R / q4gExpertBM) + (active experts), with R the
// routing slots.
func q4gSlots(e *expertsCall) int { return ceilDiv(e.slots(), q4gExpertBM) + e.expertBound() }

// expertsQ4GEMM is the int4 prefill path of Experts: moe_plan with align 1 (the permutation filled with
// -1 first), the tokens gathered by expert (scaled by their scores, bf16: expert_gather), gate_up with
// SiLU·mul on q4gemm_experts_swiglu into act [R, I] (bf16), down on q4gemm_experts into y [R, H] (float32)
// and the combine, as expertsGrouped does with cuBLASLt on bf16 copies; R is the routing slots, of which
// the kernels read the plan's rows on the device, so nothing waits for the GPU.
func (b *Backend) expertsQ4GEMM(e *expertsCall) error {
	p, err := b.planExpertsFill(e, 1, true)
	if err != nil {
		return err
	}
	defer p.release(b)
	R, H, I, E, k := e.slots(), e.H, e.I, e.E, e.r.k
	xp, err := b.pool.get(int64(R) * int64(H) * 2)
	if err != nil {
		return err
	}
	defer b.pool.release(*xp)
	if b.vec8(H, e.x.ptr()) {
		err = b.stream.launch(b.k.expertGatherV8, elemGrid(R*H/8), elemBlockDim, 0, e.x, int(e.x.dt), p.perm, e.scores(), k, H, xp,
			int64(R)*int64(H)/8)
	} else {
		err = b.stream.launch(b.k.expertGather, elemGridN(R*H), elemBlockDim, 0, e.x, int(e.x.dt), p.perm, e.scores(), k, H, xp,
			int64(R)*int64(H))
	}
	if err != nil {
		return err
	}
	act, err := b.pool.get(int64(R) * int64(I) * 2)
	if err != nil {
		return err
	}
	defer b.pool.release(*act)
	slots := uint32(q4gSlots(e))
	gu, dn := e.gu, e.down
	if err := b.stream.launch(b.k.q4gemmSwiGLU, dim3{uint32(ceilDiv(I, q4gExpertBN/2)), slots, 1}, dim3{q4gThreads, 1, 1}, 0,
		xp, p.seg(), p.active(E), p.meta(E), gu, gu.q.scales, gu.q.gs, H, I, act); err != nil {
		return err
	}
	y, err := b.pool.get(int64(R) * int64(H) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*y)
	if err := b.stream.launch(b.k.q4gemmExperts, dim3{uint32(ceilDiv(H, q4gExpertBN)), slots, 1}, dim3{q4gThreads, 1, 1}, 0,
		act, p.seg(), p.active(E), p.meta(E), dn, dn.q.scales, dn.q.gs, I, H, y); err != nil {
		return err
	}
	ap, adt := e.addend()
	if b.vec8(H, ap) {
		err = b.stream.launch(b.k.expertV8, elemGrid(e.T*H/8), elemBlockDim, 0, y, 1, max(R, 1), H, p.rowOf, k,
			e.out, int(e.out.dt), int64(e.T*H/8), ap, adt)
	} else {
		err = b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, max(R, 1), H, p.rowOf, k,
			e.out, int(e.out.dt), int64(e.T*H), ap, adt)
	}
	runtime.KeepAlive(e)
	return err
}
