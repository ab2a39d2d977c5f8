package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/tpfleet/tpfleet/backend"
)

// The FP8 GEMM. Linear of more than fp8GemvRows rows (prefill, and decode batches) on an fp8 weight with
// dynamic activations (FbgemmFp8, --quantization fp8: quant.Format.DynamicActivations, weights in
// float32-scaled E4M3) runs on the tensor cores' FP8 path instead of a bf16 copy of the weight:
//
//  1. fp8_act_codes quantises each row of x to E4M3 codes and one float32 scale (quant.FakeQuantFP8Rows'
//     rule: a code times its scale is the value the other paths multiply);
//  2. cuBLASLt multiplies the codes, x [T, in] · w [out, in]ᵀ, accumulating in float32, and applies the
//     scales itself, D[t][o] = sw[o]·sx[t]·Σ, with its outer-vector scaling (cuBLASLt 12.9 and later on
//     Hopper) where New's probe found it works (Info.FP8OuterVec);
//  3. otherwise with unit scales, and fp8_scale_out applies them: y[t][o] ·= sx[t]·sw[o].
//
// Every product of two E4M3 values is exact in float32, so the result is the reference's Σ (qx·sx)(qw·sw)
// up to the summation order and the tensor cores' accumulation. The weight is read once, a byte an
// element, where the dequantised path writes and reads a bf16 copy (2 + 2 bytes) and runs the bf16 GEMM
// at half the FP8 rate. Where cuBLASLt has no FP8 algorithm (before sm_89, or a shape it declines) the
// GEMV (decode batches) or the dequantised path runs.
//
// The routed experts' prefill (expertsFP8Grouped) runs the same GEMM per active expert on the tokens
// gathered by expert. Their codes are output-major already ([E, out, in], fp8.go: transposed once at
// load), the layout cuBLASLt's FP8 takes ("TN"), so a step only quantises the rows and multiplies. By
// default (FuseFP8Grouped) the routed experts take the grouped fp8 kernels instead (grouped.go: every
// active expert in one launch a projection, no host read of the counts); this path is what
// TPFLEET_CUDA_UNFUSE=fp8grouped restores.

// fp8GemmOK reports whether x [T, in] · wᵀ may take the FP8 GEMM: an fp8 weight with dynamic activations
// (codes scaled in float32), more rows than the fp8 GEMV takes (at most skinnyRows of them only with the
// quantised GEMV on: SetQuantGEMV off keeps decode sizes on the dequantised path), in and out multiples
// of 16 (cuBLASLt's FP8 wants 16-byte leading dimensions) and operands 16-byte aligned.
func (b *Backend) fp8GemmOK(xt, wt *tensor) bool {
	T, in, out := xt.shape[0], xt.shape[1], wt.shape[0]
	return !b.noFP8Gemm && wt.q.code == qfFP8 && wt.q.dyn() && T > fp8GemvRows && (T > skinnyRows || !b.noQuantGEMV) &&
		in%16 == 0 && out%16 == 0 && wt.ptr()%16 == 0 && wt.q.scales.ptr%16 == 0
}

// fp8Plan returns the FP8 GEMM's plan for m rows of x (a multiple of 16) times w [n, k]: with cuBLASLt's
// outer-vector scaling where the probe enabled it and cuBLASLt has an algorithm for the shape, else
// unscaled (fp8_scale_out applies the scales). ok is false where cuBLASLt has no FP8 plan at all.
func (b *Backend) fp8Plan(m, n, k int) (key gemmKey, plan *gemmPlan, err error) {
	key = gemmKey{m: m, n: n, k: k, out: F32, fp8: true}
	if b.fp8OuterVec {
		key.scaled = true
		if plan, err = b.gemm.plan(key); err != nil || plan.ok {
			return key, plan, err
		}
		key.scaled = false
	}
	plan, err = b.gemm.plan(key)
	return key, plan, err
}

// fp8GemmRun enqueues on s D [m, n] = the product of the codes x [m, k] and w [n, k] with the row scales
// sx (m) and sw (n) applied: by cuBLASLt (a scaled key) or by fp8_scale_out on the first rows of D.
func (b *Backend) fp8GemmRun(key gemmKey, plan *gemmPlan, x, w, d, sx, sw devptr, rows int, s *stream) error {
	if key.scaled {
		if err := b.gemm.runScaled(plan, key, x, w, d, sw, sx, s); err != nil {
			return err
		}
		b.counts.FP8OuterVec++
		return nil
	}
	if err := b.gemm.run(plan, key, x, w, d, s); err != nil {
		return err
	}
	return s.launch(b.k.fp8ScaleOut, fp8ScaleGrid(rows, key.n), elemBlockDim, 0, d, sx, sw, int64(rows), int64(key.n))
}

// fp8ScaleGrid sizes fp8_scale_out over [rows, n]: four columns a thread, rows along y.
func fp8ScaleGrid(rows, n int) dim3 {
	return dim3{uint32(max(ceilDiv(ceilDiv(n, 4), int(elemBlockDim.x)), 1)), uint32(min(max(rows, 1), 65535)), 1}
}

// linearFP8 is Linear on the FP8 GEMM (see above); ok is false, with nothing enqueued, where cuBLASLt has
// no plan for the shape.
func (b *Backend) linearFP8(xt, wt *tensor) (y backend.Tensor, ok bool, err error) {
	ys, ok, err := b.linearFP8Multi(xt, []*tensor{wt})
	if !ok || err != nil {
		return nil, ok, err
	}
	return ys[0], true, nil
}

// linearFP8Multi returns x · wᵀ for each of ws (fp8GemmOK, the same input width) on the FP8 GEMM, x's
// rows quantised once for all of them; ok is false, with nothing enqueued, where cuBLASLt has no plan for
// one of the shapes.
func (b *Backend) linearFP8Multi(xt *tensor, ws []*tensor) (ys []backend.Tensor, ok bool, err error) {
	T, in := xt.shape[0], xt.shape[1]
	// The GEMM runs on rows padded to a multiple of 16 (zero codes, zero scales), so that every prompt
	// length has the shapes cuBLASLt's FP8 kernels take; only the first T rows are returned.
	M := ceilDiv(T, 16) * 16
	keys := make([]gemmKey, len(ws))
	plans := make([]*gemmPlan, len(ws))
	for i, wt := range ws {
		if keys[i], plans[i], err = b.fp8Plan(M, wt.shape[0], in); err != nil {
			return nil, false, fmt.Errorf("cuda: linear x%v w%v (%s): %w", xt.shape, wt.shape, wt.q.format, err)
		}
		if !plans[i].ok {
			return nil, false, nil
		}
	}
	fail := func(err error) ([]backend.Tensor, bool, error) {
		return nil, true, fmt.Errorf("cuda: linear x%v w%v (%s, fp8 gemm): %w", xt.shape, ws[0].shape, ws[0].q.format, err)
	}
	codes, err := b.pool.get(int64(M) * int64(in))
	if err != nil {
		return fail(err)
	}
	defer b.pool.release(*codes)
	scales, err := b.pool.get(int64(M) * 4)
	if err != nil {
		return fail(err)
	}
	defer b.pool.release(*scales)
	if M > T {
		if err := b.stream.memset(codes.ptr+devptr(int64(T)*int64(in)), 0, int64(M-T)*int64(in)); err != nil {
			return fail(err)
		}
		if err := b.stream.memset(scales.ptr+devptr(4*T), 0, int64(M-T)*4); err != nil {
			return fail(err)
		}
	}
	if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(T), 1, 1}, actQuantBlock, 0, xt, int(xt.dt), devptr(0), devptr(0), 1, in,
		codes, scales, devptr(0)); err != nil {
		return fail(err)
	}
	ys = make([]backend.Tensor, len(ws))
	for i, wt := range ws {
		yt, err := b.newTensor(F32, M, wt.shape[0])
		if err != nil {
			return fail(err)
		}
		yt.shape = []int{T, wt.shape[0]} // the padding rows stay in the block, unread
		if err := b.fp8GemmRun(keys[i], plans[i], codes.ptr, wt.ptr(), yt.ptr(), scales.ptr, wt.q.scales.ptr, T, b.stream); err != nil {
			return fail(err)
		}
		ys[i] = yt
		b.counts.QuantFP8Gemm++
	}
	return ys, true, nil
}

// expertsFP8Grouped is the routed experts' prefill on fp8 weights with dynamic activations: for each
// active expert, its tokens' rows (gathered, scaled by their scores and quantised per token:
// fp8_act_codes) times its output-major gate_up codes on the FP8 GEMM with the scales, SwiGLU in float32,
// the product quantised per token again, times its down codes with the scales, and the combine.
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
		for h, nk := range [2][2]int{{2 * I, H}, {H, I}} {
			if keys[i][h], plans[i][h], err = b.fp8Plan(j.m, nk[0], nk[1]); err != nil {
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
	g, err := alloc(R*int64(2*I)*4, false)
	if err != nil {
		return false, err
	}
	if rows > 0 {
		if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			e.x, int(e.x.dt), p.perm, e.scores(), k, H, xc, xs, devptr(0)); err != nil {
			return false, err
		}
	}
	// gemmsFP8 runs projection h of every job: rows [r0, r0+m) of codes (n wide) times expert x of w
	// (logical [E, n, N], stored [E, N, n]), scaled, into out [.., N]; on the side streams at once
	// (fanout.go) where there are several.
	gemmsFP8 := func(h int, w *tensor, n, N int, codes, scales, out *buffer) error {
		var fo *fanOut
		if len(jobs) > 1 {
			var err error
			if fo, err = b.startFanOut(); err != nil {
				return err
			}
		}
		per := int64(n) * int64(N)
		for i, j := range jobs {
			s, err := b.jobStream(fo)
			if err == nil {
				err = b.fp8GemmRun(keys[i][h], plans[i][h], codes.ptr+devptr(int64(j.r0)*int64(n)), w.ptr()+devptr(int64(j.e)*per),
					out.ptr+devptr(int64(j.r0)*int64(N)*4), scales.ptr+devptr(4*j.r0), w.q.scales.ptr+devptr(4*int64(j.e)*int64(N)), keys[i][h].m, s)
			}
			if err != nil {
				return errors.Join(err, fo.join())
			}
		}
		return fo.join()
	}
	if err := gemmsFP8(0, e.gu, H, 2*I, xc, xs, g); err != nil {
		return false, err
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
		if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			a32, int(F32), devptr(0), devptr(0), 1, I, ac, as, p.rowsOf(E)); err != nil {
			return false, err
		}
	}
	y, err := alloc(R*int64(H)*4, false)
	if err != nil {
		return false, err
	}
	if err := gemmsFP8(1, e.down, I, H, ac, as, y); err != nil {
		return false, err
	}
	ap, adt := e.addend()
	if err := b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, max(rows, 1), H, p.rowOf, k,
		e.out, int(e.out.dt), int64(e.T*H), ap, adt); err != nil {
		return false, err
	}
	b.counts.ExpertsFP8++
	return true, nil
}

// fp8ExpertsOK reports whether Experts' prefill on e may take expertsFP8Grouped: the FP8 GEMM not turned
// off (SetFP8Gemm) and fp8DynKMajor.
func (b *Backend) fp8ExpertsOK(e *expertsCall) bool { return !b.noFP8Gemm && fp8DynKMajor(e) }

// fp8DynKMajor reports whether e's weights are what the FP8 tensor-core paths take: both fp8 with dynamic
// activations (float32 scales), output-major (then H and I are multiples of 16, cuBLASLt's FP8 leading
// dimensions and the grouped kernels' 16-byte chunks, and every expert's codes start 16-byte aligned),
// codes and scales 16-byte aligned.
func fp8DynKMajor(e *expertsCall) bool {
	gq, dq := e.gu.q, e.down.q
	return gq != nil && dq != nil && gq.code == qfFP8 && dq.code == qfFP8 && gq.dyn() && dq.dyn() &&
		gq.kmajor && dq.kmajor && e.H%16 == 0 && e.I%16 == 0 && e.gu.ptr()%16 == 0 && e.down.ptr()%16 == 0 &&
		gq.scales.ptr%16 == 0 && dq.scales.ptr%16 == 0
}

// probeOuterVec reports whether cuBLASLt's outer-vector scaling works on this device, and if not why: an
// n×n×n FP8 product of ones with row scales sx[t] = t+1 and column scales sw[o] = (o+1)/2 must give
// exactly n·sx[t]·sw[o] (which also catches the two vectors swapped), at n = 16 or, only where cuBLASLt
// has no scaled algorithm that small, 128. Any refusal or difference leaves the fp8_scale_out path on. New
// runs it once, on sm_89 and later, and its kernels phase says the outcome.
func (b *Backend) probeOuterVec() (ok bool, why string) {
	var whys []string
	for _, n := range []int{16, 128} {
		err := b.probeOuterVecAt(n)
		if err == nil {
			return true, fmt.Sprintf("cuBLASLt applies the scales (checked at %d×%d×%d)", n, n, n)
		}
		whys = append(whys, fmt.Sprintf("%d×%d×%d: %v", n, n, n, err))
		if !errors.Is(err, errNoScaledAlgo) { // a wrong product or a failed call: not at any size
			break
		}
	}
	return false, "fp8_scale_out applies the scales: " + strings.Join(whys, "; ")
}

var errNoScaledAlgo = errors.New("no scaled algorithm (or no scale-mode attribute)")

// probeOuterVecAt runs probeOuterVec's product at n×n×n.
func (b *Backend) probeOuterVecAt(n int) error {
	key := gemmKey{m: n, n: n, k: n, out: F32, fp8: true, scaled: true}
	plan, err := b.gemm.plan(key)
	if err != nil {
		return err
	}
	if !plan.ok {
		return errNoScaledAlgo
	}
	nn := int64(n) * int64(n)
	buf, err := b.pool.get(2*nn + 2*int64(n)*4 + nn*4)
	if err != nil {
		return err
	}
	defer b.pool.release(*buf)
	host := make([]byte, 2*nn+2*int64(n)*4)
	for i := range 2 * nn {
		host[i] = 0x38 // E4M3 1.0
	}
	for i := range n {
		binary.LittleEndian.PutUint32(host[2*nn+4*int64(i):], math.Float32bits(float32(i+1)))     // sx
		binary.LittleEndian.PutUint32(host[2*nn+4*int64(n+i):], math.Float32bits(float32(i+1)/2)) // sw
	}
	if err := b.upload(buf.ptr, host); err != nil {
		return err
	}
	x, w := buf.ptr, buf.ptr+devptr(nn)
	sx, sw, d := buf.ptr+devptr(2*nn), buf.ptr+devptr(2*nn+int64(n)*4), buf.ptr+devptr(2*nn+2*int64(n)*4)
	if err := b.gemm.runScaled(plan, key, x, w, d, sw, sx, b.stream); err != nil {
		return err
	}
	out := make([]byte, nn*4)
	if err := b.download(out, d); err != nil {
		return err
	}
	for t := range n {
		for o := range n {
			got := math.Float32frombits(binary.LittleEndian.Uint32(out[4*(t*n+o):]))
			if want := float32(n) * float32(t+1) * float32(o+1) / 2; got != want {
				return fmt.Errorf("product element [%d][%d] = %g, want %g", t, o, got, want)
			}
		}
	}
	return nil
}
