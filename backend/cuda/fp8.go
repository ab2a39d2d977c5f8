package cuda

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
)

// FP8 weights (quant.FP8: E4M3 codes, one float32 scale per output channel) have their own decode paths
// (kernels/quant_fp8.cu) and keep their codes output-major on the GPU:
//
//   - Layout. A Linear weight [out, in] is output-major as the checkpoint stores it. A routed experts
//     weight, [E, in, out] in package quant's layout, is stored [E, out, in] (qweight.kmajor) where in and
//     out are multiples of 16: LoadQuantized and Quantize transpose each expert once, at load. The shape,
//     the scales ([E, out]) and each expert's slice of codes (what offload copies) are unchanged; only the
//     order of the codes inside a slice differs. So cuBLASLt's FP8 GEMM takes an expert's codes as they
//     are (no transpose in a step), and the decode GEMV reads an output channel's codes K-contiguously.
//   - Decode (Linear at most fp8GemvRows rows with dynamic activations, at most skinnyRows without, and
//     Experts at most skinnyRows tokens): fp8_gemv_N and fp8_expert_gemv_N, a warp per output row pair,
//     the codes widened in hardware, the row scale applied once to each sum. With dynamic activations,
//     where the input rows fit fp8XS floats, the staged kernels (fp8_gemv_xs_N, fp8_expert_gemv_xs_N)
//     quantise them per token themselves: no activation launch in a batch-1 step. LinearMulti runs the
//     fp8 weights of one input (q, k, v; gate and up) in one launch.
//   - More rows with dynamic activations: the FP8 GEMM (fp8gemm.go), also at decode batch 16 and 64.
//
// Numerics: every path's weight is quant.Weight.Dequantize's q·s; the GEMVs multiply the scale into the
// sum of x·q rather than into each weight (a float32 rounding apart), except for the compressed-tensors
// format, whose bf16(q·s) they form weight by weight.

// fp8GemvRows is the most rows Linear runs on the fp8 GEMV where the format quantises activations: more
// take the FP8 GEMM (one read of the weight on the tensor cores, where the GEMV reads it once every
// qgemvKernelRows rows and spends about as many FMAs as the copy rate allows at 8 rows).
const fp8GemvRows = qgemvKernelRows

// fp8ExpertGemvRows is the default Backend.fp8ExpertGemvRows: the most tokens the routed experts on fp8
// weights with dynamic activations run on the fp8 expert GEMV before the grouped fp8 kernels. On an H100
// (TestFP8GroupedTimes, Scout's H 5120 I 8192) the GEMV took 618 µs at 16 tokens against 709 grouped and
// 1265 at 64 against 1116: the two meet near 34.
const fp8ExpertGemvRows = 32

// fp8XS is the number of floats of input rows a staged fp8 block keeps in shared memory (FP8_XS).
const fp8XS = 8192

// fp8Block is the fp8 GEMV kernels' block (FP8_THREADS): 8 warps of 2 output rows.
var fp8Block = dim3{256, 1, 1}

// fp8StagedPerSM is how many blocks of a staged fp8 GEMV an SM gets: each block quantises the input
// itself (a read of x from L2), so the grid is capped and its blocks loop over their row groups; two
// blocks of 8 warps keep 64 KiB of codes in flight an SM (FP8_UNROLL chunks of 2 rows a lane).
const fp8StagedPerSM = 2

// fp8StagedBlocks returns the grid of a staged fp8 GEMV over groups row groups (a block's warps' rows)
// with at most limit blocks: as few groups a block as the limit allows, and the same number for every
// block (the last one excepted), so that no block runs a group longer than the rest.
func fp8StagedBlocks(groups, limit int) int {
	if groups <= limit {
		return groups
	}
	return ceilDiv(groups, ceilDiv(groups, limit))
}

// fp8Chunk is the columns a block of fp8_expert_gemv writes in a row: a pair a warp (FP8_CHUNK).
const fp8Chunk = 16

// fp8SwiGLUBlocks returns the grid of fp8_expert_gemv(_xs)_swiglu_N over chunks gate chunks: the largest
// divisor of chunks at most limit (the unfused kernel's grid, or the staged cap).
func fp8SwiGLUBlocks(chunks, limit int) int {
	for d := min(chunks, max(limit, 1)); d > 1; d-- {
		if chunks%d == 0 {
			return d
		}
	}
	return 1
}

// isFP8 reports whether q is an fp8 format (E4M3 codes, float32 scales).
func (q *qweight) isFP8() bool { return q != nil && (q.code == qfFP8 || q.code == qfFP8BF16) }

// fp8KMajor reports whether a weight of shape in format f is kept output-major with its experts
// transposed at load: fp8 experts [E, in, out] with in and out multiples of 16 (the kernels' 16-byte
// chunks of a row). Others keep package quant's layout (and the input-major kernels of quant.cu).
func fp8KMajor(f quant.Format, shape []int) bool {
	return f.Kind == quant.FP8 && len(shape) == 3 && shape[0] > 0 && shape[1] > 0 && shape[2] > 0 && shape[1]%16 == 0 && shape[2]%16 == 0
}

// transposeU8 enqueues transpose_u8: dst [C, R] = srcᵀ for src [R, C] bytes.
func (b *Backend) transposeU8(src devptr, R, C int, dst devptr) error {
	return b.stream.launch(b.k.transposeU8, dim3{uint32(ceilDiv(C, 64)), uint32(ceilDiv(R, 64)), 1}, dim3{256, 1, 1}, 0,
		src, int64(R), int64(C), dst)
}

// uploadKMajor copies the codes of an experts weight [E, K, N] (host, input-major) to dst as [E, N, K]:
// each expert's slice through a pooled scratch and transpose_u8 (stream order lets the next expert reuse
// the scratch).
func (b *Backend) uploadKMajor(dst devptr, data []byte, E, K, N int) error {
	per := int64(K) * int64(N)
	tmp, err := b.pool.get(per)
	if err != nil {
		return err
	}
	defer b.pool.release(*tmp)
	for e := range int64(E) {
		if err := b.upload(tmp.ptr, data[e*per:(e+1)*per]); err != nil {
			return err
		}
		if err := b.transposeU8(tmp.ptr, K, N, dst+devptr(e*per)); err != nil {
			return err
		}
	}
	return nil
}

// quantizeKMajor quantises the bf16 experts weight src [E, K, N] to fp8 (q.code) into codes [E, N, K]
// and q.scales [E, N]: quantize_bf16 over groups of experts into a pooled scratch (at most 256 MiB, or
// one expert), each expert then transposed into place.
func (b *Backend) quantizeKMajor(src *tensor, q *qweight, codes devptr, E, K, N int) error {
	per := int64(K) * int64(N)
	group := max(int64(256<<20)/per, 1)
	tmp, err := b.pool.get(min(group, int64(E)) * per)
	if err != nil {
		return err
	}
	defer b.pool.release(*tmp)
	for e0 := int64(0); e0 < int64(E); e0 += group {
		n := min(group, int64(E)-e0)
		ns := n * int64(N)
		if err := b.stream.launch(b.k.quantizeBF16, elemGrid(int(min(ns, 1<<30))), elemBlockDim, 0,
			src.ptr()+devptr(e0*per*2), int64(K), int64(N), q.code, q.gs, q.groups, ns, tmp, q.scales.ptr+devptr(e0*int64(N)*4)); err != nil {
			return err
		}
		for i := range n {
			if err := b.transposeU8(tmp.ptr+devptr(i*per), K, N, codes+devptr((e0+i)*per)); err != nil {
				return err
			}
		}
	}
	return nil
}

// fp8GemvOK reports whether x [T, in] · wᵀ may run on the fp8 GEMV: an fp8 weight [out, in], at most
// skinnyRows rows (linearQuant tries the FP8 GEMM first where the format quantises activations and there
// are more than fp8GemvRows), in a multiple of 16 and 16-byte aligned operands.
func (b *Backend) fp8GemvOK(xt, wt *tensor) bool {
	T, in := xt.shape[0], xt.shape[1]
	return wt.q.isFP8() && len(wt.shape) == 2 && !b.noQuantGEMV && T <= skinnyRows && in > 0 && in%16 == 0 &&
		wt.ptr()%16 == 0 && xt.ptr()%16 == 0 && wt.q.scales.ptr%4 == 0
}

// fp8Staged reports whether an fp8 GEMV of T rows of width K quantises its input itself (staged
// kernels): dynamic activations and rows that fit fp8XS floats.
func fp8Staged(dyn bool, T, K int) bool { return dyn && T*K <= fp8XS }

// fp8ActRows enqueues fp8_act_rows over the rows of x [rows, n] into a new float32 tensor: each row
// quantised to FP8 per token (quant.FakeQuantFP8Rows) where dyn, else converted; in the fp8 GEMVs'
// word-major order where wm (n % 16 == 0). Once for every weight that reads the rows.
func (b *Backend) fp8ActRows(xt *tensor, dyn, wm bool) (*tensor, error) {
	rows, n := xt.shape[0], xt.shape[1]
	out, err := b.newTensor(F32, rows, n)
	if err != nil || rows == 0 || n == 0 {
		return out, err
	}
	err = b.stream.launch(b.k.fp8ActRows, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
		xt, int(xt.dt), devptr(0), devptr(0), 1, n, dyn, out, int(F32), devptr(0), wm)
	return out, err
}

// fp8GEMV returns x · wᵀ for each of ws (one to three fp8 weights of one format and input width, each
// taking fp8GemvOK; all but the last of an even number of rows) in one launch per qgemvKernelRows rows
// of x (fp8_gemv_N, or the staged fp8_gemv_xs_N).
func (b *Backend) fp8GEMV(xt *tensor, ws []*tensor) ([]backend.Tensor, error) {
	T, K := xt.shape[0], xt.shape[1]
	q := ws[0].q
	fail := func(err error) ([]backend.Tensor, error) {
		return nil, fmt.Errorf("cuda: linear x%v w%v (%s, fp8 gemv): %w", xt.shape, ws[0].shape, q.format, err)
	}
	staged := fp8Staged(q.dyn(), min(T, qgemvKernelRows), K) && T <= qgemvKernelRows
	x := xt
	if !staged { // float32 rows in word-major order, quantised where the format says so
		var err error
		if x, err = b.fp8ActRows(xt, q.dyn(), true); err != nil {
			return fail(err)
		}
	}
	ys := make([]*tensor, 3)
	out := make([]backend.Tensor, len(ws))
	pairs := 0
	for i, w := range ws {
		y, err := b.newTensor(F32, T, w.shape[0])
		if err != nil {
			return fail(err)
		}
		ys[i], out[i] = y, y
		pairs += ceilDiv(w.shape[0], 2)
	}
	blocks := ceilDiv(pairs, int(fp8Block.x/32))
	if staged {
		blocks = fp8StagedBlocks(blocks, fp8StagedPerSM*max(b.dev.multiprocessors, 1))
	}
	for r0 := 0; r0 < T; r0 += qgemvKernelRows {
		n := min(qgemvKernelRows, T-r0)
		i := 0
		for 1<<i < n {
			i++
		}
		k := b.k.fp8GEMV[i]
		if staged {
			k = b.k.fp8GEMVStaged[i]
		}
		args := []any{x.ptr() + devptr(int64(r0)*int64(K)*x.dt.size()), int(x.dt), q.dyn(), q.code, n, K}
		for s := range 3 {
			if s >= len(ws) {
				args = append(args, devptr(0), devptr(0), devptr(0), 0)
				continue
			}
			N := ws[s].shape[0]
			args = append(args, ws[s], ws[s].q.scales, ys[s].ptr()+devptr(int64(r0)*int64(N)*4), N)
		}
		if err := b.stream.launch(k, dim3{uint32(blocks), 1, 1}, fp8Block, 0, args...); err != nil {
			return fail(err)
		}
	}
	b.counts.QuantGEMV += int64(len(ws))
	if staged {
		b.counts.FP8Staged += int64(len(ws))
	}
	return out, nil
}

// linearMultiFP8 is LinearMulti where ws has fp8 weights: those that the fp8 GEMV takes together (same
// format and input width, fp8GemvOK, an even number of rows but for the last; two or three of them) run
// in one launch (fp8GEMV); those the FP8 GEMM takes (more than fp8GemvRows rows) share one quantisation
// of x (linearFP8Multi); the others are each a Linear. ok is false, with nothing done, where no two
// weights share anything.
func (b *Backend) linearMultiFP8(xt *tensor, wts []*tensor) (out []backend.Tensor, ok bool, err error) {
	if len(xt.shape) != 2 {
		return nil, false, nil
	}
	var gemv, gemm []int
	for i, w := range wts {
		if w.q == nil || !w.q.isFP8() || len(w.shape) != 2 || w.shape[1] != xt.shape[1] {
			continue
		}
		switch {
		case b.fp8GemmOK(xt, w):
			gemm = append(gemm, i)
		case b.fp8GemvOK(xt, w) && len(gemv) < 3:
			if len(gemv) > 0 {
				first := wts[gemv[0]].q
				if w.q.code != first.code || w.q.dyn() != first.dyn() || wts[gemv[len(gemv)-1]].shape[0]%2 != 0 {
					continue
				}
			}
			gemv = append(gemv, i)
		}
	}
	if len(gemv) < 2 && len(gemm) < 2 {
		return nil, false, nil
	}
	out = make([]backend.Tensor, len(wts))
	for gi, group := range [][]int{gemv, gemm} {
		if len(group) < 2 {
			continue
		}
		ws := make([]*tensor, len(group))
		for j, i := range group {
			ws[j] = wts[i]
		}
		var ys []backend.Tensor
		if gi == 1 { // the FP8 GEMM's
			var done bool
			if ys, done, err = b.linearFP8Multi(xt, ws); !done {
				continue // cuBLASLt declined a shape: each a Linear below
			}
		} else {
			ys, err = b.fp8GEMV(xt, ws)
		}
		if err != nil {
			return nil, true, err
		}
		for j, i := range group {
			out[i] = ys[j]
		}
	}
	for i, w := range wts {
		if out[i] == nil {
			if out[i], err = b.Linear(xt, w); err != nil {
				return nil, true, err
			}
		}
	}
	return out, true, nil
}

// fp8ExpertGEMV enqueues the routed experts' GEMV of one projection on the output-major fp8 weight w
// [E, K, N] (stored [E, N, K]) for plan p: P [R, N] (float32, one split) = the rows of each active expert
// times its weight. The rows are x[perm[r] / k]·scores[perm[r]] (mode 0: gate_up) or x[r] (mode 1: down,
// x [R, K] float32), quantised per token where w's format says so: by the kernel itself where every
// expert's rows (at most T) fit fp8XS floats (staged), else first by fp8_act_rows into a pooled block in
// the kernel's word-major order, which the caller releases (tmp, nil if none). With epi (not nil) the
// kernel ends with that fused epilogue (fp8_expert_gemv(_xs)_swiglu_N, _combine_N); the down projection's
// input is quantised as without it, by the staged kernel itself or by fp8_act_rows.
func (b *Backend) fp8ExpertGEMV(e *expertsCall, p *expertPlan, w *tensor, x any, xdt, mode, K, N int, P *buffer, epi *expertEpi) (tmp *buffer, err error) {
	R, k, E := e.slots(), e.r.k, e.E
	dyn := w.q.dyn()
	staged := e.T*K <= fp8XS
	if !staged {
		// The rows gathered (mode 0) and quantised (dyn) into [R, K] float32, word-major: mode 1 reads them.
		if tmp, err = b.pool.get(int64(R) * int64(K) * 4); err != nil {
			return nil, err
		}
		var perm, scores devptr
		if mode == 0 {
			perm, scores = p.perm.ptr, e.scores()
		}
		kk := 1
		if mode == 0 {
			kk = k
		}
		if err := b.stream.launch(b.k.fp8ActRows, dim3{uint32(R), 1, 1}, actQuantBlock, 0,
			x, xdt, perm, scores, kk, K, dyn, tmp, int(F32), p.rowsOf(E), true); err != nil {
			return tmp, err
		}
		x, xdt, mode = tmp, int(F32), 1
	}
	kern := b.k.fp8ExpertGEMV
	if staged {
		kern = b.k.fp8ExpertGEMVStaged
	}
	i := 0 // fp8_expert_gemv_1: one row an expert (decode of one token)
	if e.T > 1 {
		i = 1 // _4: four rows a pass
	}
	z := e.expertBound()
	blocks := ceilDiv(ceilDiv(N, 2), int(fp8Block.x/32))
	limit := blocks
	if staged {
		limit = max(fp8StagedPerSM*max(b.dev.multiprocessors, 1)/z, 1)
		blocks = fp8StagedBlocks(blocks, limit)
	}
	args := []any{x, xdt, mode, p.perm, e.scores(), k, p.seg(), p.active(E), p.meta(E), w, w.q.scales, w.q.code, dyn, K, N, P}
	if epi != nil {
		kern = epi.pick(b.k.fp8ExpertSwiGLU[boolIndex(staged)], b.k.fp8ExpertCombine[boolIndex(staged)])
		if epi.act != nil {
			// No counter (a block holds gate chunk q and up chunk q + I/fp8Chunk: gridDim.x divides
			// I/fp8Chunk), so the arguments are act and its dtype alone, not epi.args'.
			args = append(args, epi.act, int(F32))
			blocks = fp8SwiGLUBlocks(N/2/fp8Chunk, limit)
		} else {
			args = append(args, epi.args(e, p)...)
		}
	}
	err = b.stream.launch(kern[i], dim3{uint32(blocks), 1, uint32(z)}, fp8Block, 0, args...)
	if err == nil {
		b.counts.FP8ExpertGEMV++
		if staged {
			b.counts.FP8Staged++
		}
	}
	return tmp, err
}

// dequantFP8Experts enqueues fp8_dequant_experts for elements [off, off+n) of the output-major experts
// weight t in logical order ([E, K, N]) into a pooled bf16 block the caller releases after enqueuing its
// use.
func (b *Backend) dequantFP8Experts(t *tensor, off, n int64) (*buffer, error) {
	buf, err := b.pool.get(n * 2)
	if err != nil || n == 0 {
		return buf, err
	}
	if err := b.stream.launch(b.k.fp8DequantExperts, elemGrid(int(min(n, 1<<30))), elemBlockDim, 0,
		t, t.q.scales, t.q.code, int64(t.shape[1]), int64(t.shape[2]), off, n, buf); err != nil {
		b.pool.release(*buf)
		return nil, err
	}
	return buf, nil
}
