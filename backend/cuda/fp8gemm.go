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
// dequantised path runs. The routed experts' weights are input-major ([E, in, out]); cuBLASLt's FP8
// takes a transposed W only ("TN"), so Experts keeps the dequantised grouped GEMMs for prefill.

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
	if err := b.stream.launch(b.k.actQuantFP8, dim3{uint32(T), 1, 1}, actQuantBlock, 0, xt, int(xt.dt), in, codes, scales); err != nil {
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
