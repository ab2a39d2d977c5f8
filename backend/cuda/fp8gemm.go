package cuda

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// The FP8 prefill GEMM. Linear of many rows (prefill) on an fp8 weight with dynamic activations
// (FbgemmFp8, --quantization fp8: quant.Format.DynamicActivations, weights in float32-scaled E4M3) runs
// on the tensor cores' FP8 path instead of a bf16 copy of the weight:
//
//  1. act_quant_fp8 quantises each row of x to E4M3 codes and one float32 scale (quant.FakeQuantFP8Rows'
//     rule: a code times its scale is the value the other paths multiply);
//  2. cuBLASLt multiplies the codes, x [T, in] · w [out, in]ᵀ, accumulating in float32 with unit scales
//     (Hopper's cuBLASLt takes one scale a tensor, not one a row);
//  3. fp8_scale_out applies the scales: y[t][o] ·= sx[t]·sw[o].
//
// Every product of two E4M3 values is exact in float32, so the result is the reference's Σ (qx·sx)(qw·sw)
// up to the summation order and the tensor cores' accumulation. The weight is read once, a byte an
// element, where the dequantised path writes and reads a bf16 copy (2 + 2 bytes) and runs the bf16 GEMM
// at half the FP8 rate. Where cuBLASLt has no FP8 algorithm (before sm_89, or a shape it declines) the
// dequantised path runs.
//
// The routed experts' prefill (expertsFP8Grouped) runs the same GEMM per active expert on the tokens
// gathered by expert: their weights are input-major ([E, in, out]) and cuBLASLt's FP8 takes W output-
// major only ("TN"), so each active expert's codes are first transposed into a scratch (transpose_u8: a
// byte read and written a weight, where dequantising writes two and the bf16 GEMM reads two more).

// fp8GemmOK reports whether x [T, in] · wᵀ may take the FP8 GEMM: an fp8 weight with dynamic activations
// (codes scaled in float32), more rows than the quantised GEMV takes, in and out multiples of 16 (cuBLASLt's
// FP8 wants 16-byte leading dimensions) and operands 16-byte aligned.
func (b *Backend) fp8GemmOK(xt, wt *tensor) bool {
	T, in, out := xt.shape[0], xt.shape[1], wt.shape[0]
	return !b.noFP8Gemm && wt.q.code == qfFP8 && wt.q.dyn() && T > skinnyRows && in%16 == 0 && out%16 == 0 &&
		wt.ptr()%16 == 0 && wt.q.scales.ptr%16 == 0
}

// linearFP8 is Linear on the FP8 GEMM (see above); ok is false, with nothing enqueued, where cuBLASLt has
// no plan for the shape.
func (b *Backend) linearFP8(xt, wt *tensor) (y backend.Tensor, ok bool, err error) {
	T, in, out := xt.shape[0], xt.shape[1], wt.shape[0]
	// The GEMM runs on rows padded to a multiple of 16 (zero codes), so that every prompt length has the
	// shapes cuBLASLt's FP8 kernels take; only the first T rows are scaled and returned.
	M := ceilDiv(T, 16) * 16
	key := gemmKey{m: M, n: out, k: in, out: F32, fp8: true}
	plan, err := b.gemm.plan(key)
	if err != nil {
		return nil, false, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
	}
	if !plan.ok {
		return nil, false, nil
	}
	fail := func(err error) (backend.Tensor, bool, error) {
		return nil, true, fmt.Errorf("cuda: linear x%v w%v (%s, fp8 gemm): %w", xt.shape, wt.shape, wt.q.format, err)
	}
	codes, err := b.pool.get(int64(M) * int64(in))
	if err != nil {
		return fail(err)
	}
	defer b.pool.release(*codes)
	if M > T {
		if err := b.stream.memset(codes.ptr+devptr(int64(T)*int64(in)), 0, int64(M-T)*int64(in)); err != nil {
			return fail(err)
		}
	}
	scales, err := b.pool.get(int64(T) * 4)
	if err != nil {
		return fail(err)
	}
	defer b.pool.release(*scales)
	yt, err := b.newTensor(F32, M, out)
	if err != nil {
		return fail(err)
	}
	yt.shape = []int{T, out} // the padding rows stay in the block, unread
	if err := b.stream.launch(b.k.actQuantFP8, dim3{uint32(T), 1, 1}, actQuantBlock, 0, xt, int(xt.dt), devptr(0), devptr(0), 1, in,
		codes, scales, devptr(0)); err != nil {
		return fail(err)
	}
	if err := b.gemm.run(plan, key, codes.ptr, wt.ptr(), yt.ptr(), b.stream); err != nil {
		return fail(err)
	}
	if err := b.stream.launch(b.k.fp8ScaleOut, elemGrid(T*out), elemBlockDim, 0, yt, scales, wt.q.scales, int64(T), int64(out)); err != nil {
		return fail(err)
	}
	b.counts.QuantFP8Gemm++
	return yt, true, nil
}

// expertsFP8Grouped is the routed experts' prefill on fp8 weights with dynamic activations: for each
// active expert, its tokens' rows (gathered, scaled by their scores and quantised per token:
// act_quant_fp8) times its transposed gate_up codes on the FP8 GEMM, the scales, SwiGLU in float32, the
// product quantised per token again, times its transposed down codes, the scales, and the combine.
// done is false, with nothing enqueued, where cuBLASLt has no FP8 plan for a shape.
func (b *Backend) expertsFP8Grouped(e *expertsCall) (done bool, err error) {
	const align = 128 // rows: every block starts 128 rows after the previous one's start, at least
	p, err := b.planExperts(e, align)
	if err != nil {
		return false, err
	}
	defer p.release(b)
	H, I, k, E := e.H, e.I, e.r.k, e.E
	at, err := p.segments(b, E)
	if err != nil {
		return false, err
	}
	rows := at(2*E + 1)
	type job struct{ e, r0, n, m int } // m: n rounded up to 16 (the GEMM's rows; the extra rows are gaps)
	var jobs []job
	for x := range E {
		if n := at(2*x + 1); n > 0 {
			jobs = append(jobs, job{x, at(2 * x), n, ceilDiv(n, 16) * 16})
		}
	}
	keys := make([][2]gemmKey, len(jobs))
	plans := make([][2]*gemmPlan, len(jobs))
	for i, j := range jobs {
		keys[i] = [2]gemmKey{{m: j.m, n: 2 * I, k: H, out: F32, fp8: true}, {m: j.m, n: H, k: I, out: F32, fp8: true}}
		for h := range 2 {
			if plans[i][h], err = b.gemm.plan(keys[i][h]); err != nil {
				return false, err
			}
			if !plans[i][h].ok {
				return false, nil
			}
		}
	}
	R := int64(rows + 16) // room for the last block's rounded rows
	get := func(n int64) (*buffer, error) { return b.pool.get(max(n, 1)) }
	var bufs []*buffer
	defer func() { b.releaseAll(bufs...) }()
	alloc := func(n int64, zero bool) (*buffer, error) {
		buf, err := get(n)
		if err != nil {
			return nil, err
		}
		bufs = append(bufs, buf)
		if zero {
			err = b.stream.memset(buf.ptr, 0, n)
		}
		return buf, err
	}
	xc, err := alloc(R*int64(H), true) // the gathered rows' codes; gap and extra rows zero
	if err != nil {
		return false, err
	}
	xs, err := alloc(R*4, true)
	if err != nil {
		return false, err
	}
	wt, err := alloc(int64(max(H*2*I, I*H)), false) // one expert's transposed codes at a time
	if err != nil {
		return false, err
	}
	g, err := alloc(R*int64(2*I)*4, false)
	if err != nil {
		return false, err
	}
	if rows > 0 {
		if err := b.stream.launch(b.k.actQuantFP8, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			e.x, int(e.x.dt), p.perm, e.scores(), k, H, xc, xs, devptr(0)); err != nil {
			return false, err
		}
	}
	// gemmFP8 runs one expert's product: rows [r0, r0+m) of codes (n wide) times expert x of w [E, n, N]
	// (transposed first), scaled into out [.., N].
	gemmFP8 := func(key gemmKey, plan *gemmPlan, w *tensor, x, r0, n, N int, codes, scales, out *buffer) error {
		per := int64(n) * int64(N)
		if err := b.stream.launch(b.k.transposeU8, dim3{uint32(ceilDiv(N, 64)), uint32(ceilDiv(n, 64)), 1}, dim3{256, 1, 1}, 0,
			w.ptr()+devptr(int64(x)*per), int64(n), int64(N), wt); err != nil {
			return err
		}
		o := out.ptr + devptr(int64(r0)*int64(N)*4)
		if err := b.gemm.run(plan, key, codes.ptr+devptr(int64(r0)*int64(n)), wt.ptr, o, b.stream); err != nil {
			return err
		}
		return b.stream.launch(b.k.fp8ScaleOut, elemGrid(key.m*N), elemBlockDim, 0, o, scales.ptr+devptr(4*r0),
			w.q.scales.ptr+devptr(4*int64(x)*int64(N)), int64(key.m), int64(N))
	}
	for i, j := range jobs {
		if err := gemmFP8(keys[i][0], plans[i][0], e.gu, j.e, j.r0, H, 2*I, xc, xs, g); err != nil {
			return false, err
		}
	}
	a32, err := alloc(R*int64(I)*4, true)
	if err != nil {
		return false, err
	}
	ac, err := alloc(R*int64(I), true)
	if err != nil {
		return false, err
	}
	as, err := alloc(R*4, true)
	if err != nil {
		return false, err
	}
	if rows > 0 {
		if err := b.stream.launch(b.k.expertAct, elemGridN(rows*I), elemBlockDim, 0, g, 1, rows, I, p.meta(E), a32, int(F32)); err != nil {
			return false, err
		}
		// Only the gathered rows (meta[1]); the rest stay zero codes.
		if err := b.stream.launch(b.k.actQuantFP8, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			a32, int(F32), devptr(0), devptr(0), 1, I, ac, as, p.rowsOf(E)); err != nil {
			return false, err
		}
	}
	y, err := alloc(R*int64(H)*4, false)
	if err != nil {
		return false, err
	}
	for i, j := range jobs {
		if err := gemmFP8(keys[i][1], plans[i][1], e.down, j.e, j.r0, I, H, ac, as, y); err != nil {
			return false, err
		}
	}
	ap, adt := e.addend()
	if err := b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, max(rows, 1), H, p.rowOf, k,
		e.out, int(e.out.dt), int64(e.T*H), ap, adt); err != nil {
		return false, err
	}
	b.counts.ExpertsFP8++
	return true, nil
}

// fp8ExpertsOK reports whether Experts' prefill on e may take expertsFP8Grouped: both weights fp8 with
// dynamic activations (float32 scales), H and I multiples of 16 (cuBLASLt's FP8 leading dimensions; every
// expert's codes then start 16-byte aligned).
func (b *Backend) fp8ExpertsOK(e *expertsCall) bool {
	gq, dq := e.gu.q, e.down.q
	return !b.noFP8Gemm && gq != nil && dq != nil && gq.code == qfFP8 && dq.code == qfFP8 && gq.dyn() && dq.dyn() &&
		e.H%16 == 0 && e.I%16 == 0 && e.gu.ptr()%16 == 0 && e.down.ptr()%16 == 0
}
