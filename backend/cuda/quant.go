package cuda

import (
	"fmt"
	"runtime"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Quantised weights (package quant's formats) stay on the GPU in their compact form: fp8 as one E4M3
// code a byte and one float32 scale per output channel, int4 as two nibbles a byte and one bf16 scale
// per output channel and group (quant's package doc, Layout). Linear and Experts dispatch on the format:
//   - decode and small batches (at most skinnyRows rows or tokens): GEMV kernels
//     (quant.cu for fp8, quant_int4.cu for int4: quant_int4.go) that read the codes and dequantise in
//     registers, so a step reads 1 (fp8) or ½ (int4) byte a weight instead of 2; for fp8 at 1 or 2 rows
//     a weight of at most gemvSplitMaxRows rows splits K over a block's warps (qgemv_split_N), as the
//     bf16 GEMV does;
//   - prefill: for int4, q4gemm (quant_int4.go), a tensor-core GEMM that dequantises the codes in
//     registers, the routed experts in one launch; else (fp8 weight-only, int4 with FuseQ4GEMM off or a
//     shape q4gemm does not take) the weight (one expert at a time for Experts) is dequantised into a bf16
//     scratch and the bf16 path (cuBLASLt) runs on it.
//
// Each dequantised weight is quant.Weight.Dequantize's value (q·scale in float32, rounded to bf16 for the
// compressed-tensors format); the prefill scratch rounds it to bf16, as the bf16 path rounds its inputs.
// Where the format has DynamicActivations, the input rows are quantised per token (quant.FakeQuantFP8Rows)
// in float32 first (fp8_act_rows, or the staged fp8 kernels themselves): the score-scaled input of the
// experts' gate/up and the SwiGLU product before down. fp8 weights take their own paths (fp8.go,
// fp8gemm.go) and keep the routed experts' codes output-major; the kernels of this file's input-major fp8
// weights are in quant.cu, int4's in quant_int4.cu (quant_int4.go).

// quantized is the DType of a quantised weight's codes (tensor.q says the format). Only Linear,
// LinearMulti, Experts and ExpertsAdd take such a tensor.
const quantized DType = 100

// Weight format codes of the kernels (QF_* in quant.cu).
const (
	qfFP8     = 0 // q·s in float32
	qfFP8BF16 = 1 // bf16(q·s)
	qfInt4    = 2 // q·s, s bf16-valued
)

// qgemvKernelRows is the most rows one quantised GEMV launch takes (qgemv_8). Linear runs up to
// skinnyRows rows on it (qgemvOK), qgemvKernelRows rows a launch: each launch reads the compact weight
// once (at 64 rows 8 times, 8 bytes a weight for fp8, where the bf16 copy costs 2 written and 2 read),
// and the result keeps float32 accuracy, as the skinny-GEMM rule asks (doc.go, Numerics). More rows
// (prefill; also with Activations F32, where the bf16 weights' path would split x) take the bf16 copy.
const qgemvKernelRows = 8

// actQuantBlock is fp8_act_rows' and fp8_act_codes' block: one block a row.
var actQuantBlock = dim3{256, 1, 1}

// qweight is a quantised weight's format and scales (the codes are the tensor's buffer).
type qweight struct {
	format quant.Format
	code   int     // qf*
	scales *buffer // float32 (fp8) or bf16 (int4), quant.Weight.ScaleShape
	in     int     // the input dimension's size
	gs     int     // input columns per scale group (int4); in for fp8
	groups int     // scale groups along the input dimension
	// kmajor: the codes of an experts weight [E, in, out] are stored [E, out, in], output-major (fp8.go,
	// fp8KMajor); the shape and the scales are as package quant has them.
	kmajor bool
}

func (q *qweight) dyn() bool { return q.format.DynamicActivations }

var _ backend.QuantizedLoader = (*Backend)(nil)

// LoadQuantized copies w (codes and scales) to the device in its compact form (backend.QuantizedLoader).
// Linear takes a weight [out, in] (InputDim 1) and Experts weights [E, in, out] (InputDim 1); fp8 experts
// weights are transposed to output-major on the way (fp8.go). int4 scales must be bf16 values
// (quant.Quantize makes them so): they are stored as bf16.
func (b *Backend) LoadQuantized(w quant.Weight) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if err := w.Check(); err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", w.Format, w.Shape, err)
	}
	if _, ok := numel(w.Shape); !ok || w.InputDim != 1 {
		return nil, fmt.Errorf("cuda: load %s%v with input dimension %d (want 1: [out, in] or [E, in, out]): %w",
			w.Format, w.Shape, w.InputDim, backend.ErrShape)
	}
	q := &qweight{format: w.Format, in: w.Shape[w.InputDim]}
	var scales []byte
	switch {
	case w.Format.Kind == quant.FP8 && w.Format.RoundBF16:
		q.code, q.gs, q.groups, scales = qfFP8BF16, q.in, 1, float32Bytes(w.Scales)
	case w.Format.Kind == quant.FP8:
		q.code, q.gs, q.groups, scales = qfFP8, q.in, 1, float32Bytes(w.Scales)
	case w.Format.Kind == quant.Int4:
		for i, s := range w.Scales {
			if safetensors.BF16ToFloat32(safetensors.Float32ToBF16(s)) != s {
				return nil, fmt.Errorf("cuda: load %s%v: scale %d = %g is not a bf16 value: %w", w.Format, w.Shape, i, s, quant.ErrFormat)
			}
		}
		q.code, q.gs, scales = qfInt4, w.Format.GroupSize, bf16Bytes(w.Scales)
		q.groups = ceilDiv(q.in, q.gs)
	default:
		return nil, fmt.Errorf("cuda: load %s%v: %w", w.Format, w.Shape, quant.ErrFormat)
	}
	codes, err := b.pool.getDedicated(int64(len(w.Data)))
	if err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", w.Format, w.Shape, err)
	}
	codes = b.pool.owned(codes)
	if fp8KMajor(w.Format, w.Shape) {
		q.kmajor = true
		err = b.uploadKMajor(codes.ptr, w.Data, w.Shape[0], w.Shape[1], w.Shape[2])
	} else {
		err = b.upload(codes.ptr, w.Data)
	}
	if err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", w.Format, w.Shape, err)
	}
	if q.scales, err = b.pool.getDedicated(int64(len(scales))); err != nil {
		return nil, fmt.Errorf("cuda: load %s%v scales: %w", w.Format, w.Shape, err)
	}
	q.scales = b.pool.owned(q.scales)
	if err := b.upload(q.scales.ptr, scales); err != nil {
		return nil, fmt.Errorf("cuda: load %s%v scales: %w", w.Format, w.Shape, err)
	}
	return &tensor{b: b, buf: codes, shape: slices.Clone(w.Shape), dt: quantized, q: q}, nil
}

// notQuantized returns an error for an op that cannot read a quantised tensor.
func notQuantized(op string, t *tensor) error {
	if t.q == nil {
		return nil
	}
	return fmt.Errorf("cuda: %s of a %s weight%v: only Linear and Experts read quantised weights: %w", op, t.q.format, t.shape, backend.ErrShape)
}

// dequant enqueues dequant_bf16 (dequant_int4_bf16 for int4) for elements [off, off+n) of the quantised
// weight t, viewed as [outer, in, inner] with in = t.q.in (the input dimension is 1: inner is the product
// of the dimensions after it), into a pooled bf16 block the caller releases after enqueuing its use.
// Output-major fp8 experts (kmajor) are dequantised in the same logical order (fp8_dequant_experts).
func (b *Backend) dequant(t *tensor, off, n int64) (*buffer, error) {
	q := t.q
	if q.kmajor {
		return b.dequantFP8Experts(t, off, n)
	}
	inner := int64(1)
	for _, d := range t.shape[2:] {
		inner *= int64(d)
	}
	buf, err := b.pool.get(n * 2)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return buf, nil
	}
	if q.code == qfInt4 {
		if err := b.dequantInt4(t, inner, off, n, buf); err != nil {
			b.pool.release(*buf)
			return nil, err
		}
		return buf, nil
	}
	if err := b.stream.launch(b.k.dequantBF16, elemGrid(int(min(n, 1<<30))), elemBlockDim, 0,
		t, q.scales, q.code, int64(q.in), inner, q.gs, q.groups, off, n, buf); err != nil {
		b.pool.release(*buf)
		return nil, err
	}
	return buf, nil
}

// qgemvOK reports whether x [T, in] · wᵀ runs on the quantised GEMV: for int4 q4gemvOK (quant_int4.go);
// for fp8 at most skinnyRows rows, K a multiple of a 16-byte chunk's codes and 16-byte aligned operands
// (every block of qgemvKernelRows rows of x then is too).
func (b *Backend) qgemvOK(xt, wt *tensor) bool {
	if wt.q.code == qfInt4 {
		return b.q4gemvOK(xt, wt)
	}
	T, in := xt.shape[0], xt.shape[1]
	return !b.noQuantGEMV && T <= skinnyRows && in > 0 && in%16 == 0 && wt.ptr()%16 == 0 && xt.ptr()%16 == 0
}

// linearQuant is Linear for a quantised w [out, in]: for fp8 the FP8 GEMM (more than fp8GemvRows rows
// with dynamic activations) or the fp8 GEMV (fp8.go); else x's rows quantised first where the format says
// so, then the quantised GEMV for a few rows, else for int4 q4gemm (FuseQ4GEMM), else the bf16 Linear on
// a dequantised copy of w.
func (b *Backend) linearQuant(xt, wt *tensor) (backend.Tensor, error) {
	if len(wt.shape) != 2 {
		return nil, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, backend.ErrShape)
	}
	T, in, outDim := xt.shape[0], xt.shape[1], wt.shape[0]
	if T == 0 || outDim == 0 || in == 0 {
		y, err := b.newTensor(F32, T, outDim)
		if err != nil {
			return nil, err
		}
		if T > 0 && outDim > 0 {
			err = b.stream.memset(y.ptr(), 0, int64(T*outDim)*4)
		}
		return b.result("linear", y, err)
	}
	if b.fp8GemmOK(xt, wt) {
		y, ok, err := b.linearFP8(xt, wt)
		if ok || err != nil {
			return y, err
		}
	}
	if b.fp8GemvOK(xt, wt) {
		ys, err := b.fp8GEMV(xt, []*tensor{wt})
		if err != nil {
			return nil, err
		}
		return ys[0], nil
	}
	x := xt
	if wt.q.dyn() {
		var err error
		if x, err = b.fp8ActRows(xt, true, false); err != nil {
			return nil, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
		}
	}
	if b.qgemvOK(x, wt) {
		y, err := b.newTensor(F32, T, outDim)
		if err != nil {
			return nil, err
		}
		b.counts.QuantGEMV++
		if wt.q.code == qfInt4 {
			if err := b.linearInt4(x, wt, y); err != nil {
				return nil, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
			}
			return y, nil
		}
		for r0 := 0; r0 < T; r0 += qgemvKernelRows {
			n := min(qgemvKernelRows, T-r0)
			i := 0
			for 1<<i < n {
				i++
			}
			// As Linear's bf16 GEMV: at 1 or 2 rows, weights of up to gemvSplitMaxRows rows split K over
			// a block's warps (qgemv_split_N), the others one warp a row pair.
			k, grid := b.k.qgemv[i], gemvGrid(outDim)
			if T <= 2 && outDim <= gemvSplitMaxRows && !b.noGEMVSplit {
				k, grid = b.k.qgemvSplit[T-1], gemvSplitGrid(outDim)
			}
			xp := x.ptr() + devptr(int64(r0)*int64(in)*x.dt.size())
			yp := y.ptr() + devptr(int64(r0)*int64(outDim)*4)
			err = b.stream.launch(k, grid, gemvBlock, 0, xp, int(x.dt), wt, wt.q.scales, wt.q.code, wt.q.gs, yp, n, in, outDim)
			if err != nil {
				return nil, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
			}
		}
		runtime.KeepAlive(x)
		return y, nil
	}
	if b.q4gemmOK(wt, T) { // int4 above the GEMV's rows: q4gemm reads the codes (quant_int4.go)
		y, err := b.linearQ4GEMM(x, wt)
		if err != nil {
			return nil, fmt.Errorf("cuda: linear x%v w%v (%s, q4gemm): %w", xt.shape, wt.shape, wt.q.format, err)
		}
		return y, nil
	}
	b.counts.QuantDequant++
	buf, err := b.dequant(wt, 0, int64(outDim)*int64(in))
	if err != nil {
		return nil, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
	}
	defer b.pool.release(*buf)
	return b.Linear(x, &tensor{b: b, buf: buf, shape: wt.shape, dt: BF16})
}

// RandomQuantized makes a weight of shape (input dimension inputDim, which must be 1) in format f from
// random values mean + std·z (RandomBF16's, seed for seed), quantised on the device by quant.Quantize's
// rules: benchmarks' random quantised models start without generating and quantising gigabytes on the
// host. The weight needs a bf16 scratch of its size while it is made.
func (b *Backend) RandomQuantized(f quant.Format, shape []int, inputDim int, mean, std float32, seed uint64) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if _, ok := numel(shape); !ok || inputDim != 1 || len(shape) < 2 {
		return nil, fmt.Errorf("cuda: random %s%v with input dimension %d: %w", f, shape, inputDim, backend.ErrShape)
	}
	if _, _, _, err := quantLayout(f, shape); err != nil {
		return nil, fmt.Errorf("cuda: random %s%v: %w", f, shape, err)
	}
	src, err := b.RandomBF16(shape, mean, std, seed)
	if err != nil {
		return nil, err
	}
	return b.Quantize(src, f, inputDim)
}
