package cuda

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
)

// Launch geometry of the elementwise kernels (grid-stride loops).
const (
	elemBlock = 256
	maxBlocks = 65535
)

// Launch geometry of the GEMV kernels (GEMV_WARPS and GEMV_ROWS in gemv.cu).
const (
	gemvWarps       = 4
	gemvRowsPerWarp = 2
)

func elemGrid(n int) dim3 {
	return dim3{uint32(min(max((n+elemBlock-1)/elemBlock, 1), maxBlocks)), 1, 1}
}

var elemBlockDim = dim3{elemBlock, 1, 1}

// elemUnroll is ELEM_UNROLL: the kernels with GRID_STRIDE_N loops handle that many elements a thread per
// pass, and elemGridN sizes their grids.
const elemUnroll = 4

func elemGridN(n int) dim3 { return elemGrid(ceilDiv(n, elemUnroll)) }

// vec8 reports whether the 16-byte elementwise kernels (*_v8, FuseVec) take n elements of operands at
// ptrs: n a multiple of 8 and every operand 16-byte aligned (pool blocks are; views of them may not be).
func (b *Backend) vec8(n int, ptrs ...devptr) bool {
	if !b.fused(FuseVec) || n%8 != 0 {
		return false
	}
	for _, p := range ptrs {
		if p%16 != 0 {
			return false
		}
	}
	return true
}

// Embed gathers rows of table [V, H]: out[i] = table[ids[i]-first] when first <= ids[i] < first+V, else
// zeros. The output has the table's dtype (the gather is exact).
func (b *Backend) Embed(table backend.Tensor, ids []int, first int) (backend.Tensor, error) {
	tt, err := b.asTensor("embed", "table", table)
	if err != nil {
		return nil, err
	}
	if len(tt.shape) != 2 {
		return nil, fmt.Errorf("cuda: embed table%v: %w", tt.shape, backend.ErrShape)
	}
	V, H := tt.shape[0], tt.shape[1]
	out, err := b.newTensor(tt.dt, len(ids), H)
	if err != nil {
		return nil, err
	}
	n := len(ids) * H
	if n == 0 {
		return out, nil
	}
	rows := make([]int, len(ids))
	for i, id := range ids {
		rows[i] = -1
		if id >= first && id-first < V {
			rows[i] = id - first
		}
	}
	rb, err := int32Bytes("rows", rows)
	if err != nil {
		return nil, err
	}
	rbuf, err := b.temp(rb)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*rbuf)
	err = b.stream.launch(b.k.embed, elemGrid(n), elemBlockDim, 0, tt, int(tt.dt), rbuf, H, out, int64(n))
	return b.result("embed", out, err)
}

// result wraps an op's launch error; on success it returns out.
func (b *Backend) result(op string, out *tensor, err error) (backend.Tensor, error) {
	if err != nil {
		return nil, fmt.Errorf("cuda: %s: %w", op, err)
	}
	return out, nil
}

// RMSNorm normalises x over its last dimension in float32, x · 1/sqrt(mean(x²) + eps) (the root in
// float64), then multiplies by weight when it is not nil. One block a row. The output is float32 at any
// row count: it feeds GEMMs, and Linear decides how precisely each reads it (narrow products such as
// a MoE router at float32 accuracy, the others in bf16 above skinnyRows rows).
func (b *Backend) RMSNorm(x, weight backend.Tensor, eps float32) (backend.Tensor, error) {
	xt, err := b.asTensor("rmsnorm", "x", x)
	if err != nil {
		return nil, err
	}
	var wt *tensor
	if weight != nil {
		if wt, err = b.asTensor("rmsnorm", "weight", weight); err != nil {
			return nil, err
		}
		if len(xt.shape) == 0 || len(wt.shape) != 1 || wt.shape[0] != xt.shape[len(xt.shape)-1] {
			return nil, fmt.Errorf("cuda: rmsnorm x%v weight%v: %w", xt.shape, wt.shape, backend.ErrShape)
		}
	}
	if len(xt.shape) == 0 {
		return nil, fmt.Errorf("cuda: rmsnorm x%v: %w", xt.shape, backend.ErrShape)
	}
	n := xt.shape[len(xt.shape)-1]
	out, err := b.newTensor(F32, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	if n == 0 || xt.numel() == 0 {
		return out, nil
	}
	rows := xt.numel() / n
	var wp any = devptr(0)
	wdt, hasW := int(BF16), false
	if wt != nil {
		wp, wdt, hasW = wt, int(wt.dt), true
	}
	err = b.stream.launch(b.k.rmsnorm, dim3{uint32(rows), 1, 1}, b.normBlock(rows, n), 0,
		xt, int(xt.dt), wp, wdt, hasW, out, int(out.dt), n, eps)
	return b.result("rmsnorm", out, err)
}

// normBlock is the block of the norm kernels (one block a row of n): with few rows (decode) each block is
// a large share of the work, so it gets enough threads for every thread to load NORM_UNROLL (4) elements
// at once; with many rows, 256 threads.
func (b *Backend) normBlock(rows, n int) dim3 {
	if rows > 4*b.dev.multiprocessors {
		return dim3{256, 1, 1}
	}
	return dim3{uint32(min(max(roundUp(int64(ceilDiv(n, 4)), 32), 32), 1024)), 1, 1}
}

// add_rmsnorm_v8's limits (NORM_V8 and NORM_V8_MAXN in elementwise.cu): 8-element chunks a thread,
// elements a row.
const (
	normV8     = 4
	normV8MaxN = 8192
)

var _ backend.AddNormer = (*Backend)(nil)

// AddRMSNorm returns sum = x + y (float32, as Add) and RMSNorm(sum, weight, eps) (as RMSNorm, float32),
// in one kernel: the residual update and the norm after it read and write the row once.
func (b *Backend) AddRMSNorm(x, y, weight backend.Tensor, eps float32) (sum, normed backend.Tensor, err error) {
	xt, err := b.asTensor("add_rmsnorm", "x", x)
	if err != nil {
		return nil, nil, err
	}
	yt, err := b.asTensor("add_rmsnorm", "y", y)
	if err != nil {
		return nil, nil, err
	}
	wt, err := b.asTensor("add_rmsnorm", "weight", weight)
	if err != nil {
		return nil, nil, err
	}
	if len(xt.shape) == 0 || !slices.Equal(xt.shape, yt.shape) || len(wt.shape) != 1 || wt.shape[0] != xt.shape[len(xt.shape)-1] {
		return nil, nil, fmt.Errorf("cuda: add_rmsnorm x%v y%v weight%v: %w", xt.shape, yt.shape, wt.shape, backend.ErrShape)
	}
	st, err := b.newTensor(F32, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, nil, err
	}
	out, err := b.newTensor(F32, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, nil, err
	}
	n := xt.shape[len(xt.shape)-1]
	if n == 0 || xt.numel() == 0 {
		return st, out, nil
	}
	rows := xt.numel() / n
	k, block := b.k.addRMSNorm, b.normBlock(rows, n)
	// add_rmsnorm_v8 at the same block size: the same sums in the same order.
	if n <= normV8MaxN && n/8 <= normV8*int(block.x) && b.vec8(n, xt.ptr(), yt.ptr(), wt.ptr()) {
		k = b.k.addRMSNormV8
	}
	err = b.stream.launch(k, dim3{uint32(rows), 1, 1}, block, 0,
		xt, int(xt.dt), yt, int(yt.dt), st, wt, int(wt.dt), out, int(out.dt), n, eps)
	if err != nil {
		return nil, nil, fmt.Errorf("cuda: add_rmsnorm: %w", err)
	}
	return st, out, nil
}

// Add returns a + b elementwise; the shapes must be equal. The sum is float32: Add builds the residual
// stream.
func (b *Backend) Add(x, y backend.Tensor) (backend.Tensor, error) {
	return b.binary("add", b.k.add, F32, x, y)
}

// SiLUMul returns silu(gate) · up elementwise (float32 math); the shapes must be equal. The product feeds
// the down projection, so it is stored as a GEMM input (Config.Activations).
func (b *Backend) SiLUMul(gate, up backend.Tensor) (backend.Tensor, error) {
	dt := b.cfg.Activations
	if gt, ok := gate.(*tensor); ok && gt != nil {
		dt = b.actType(gt.shape)
	}
	return b.binary("silumul", b.k.siluMul, dt, gate, up)
}

func (b *Backend) binary(op string, k *kernel, dt DType, x, y backend.Tensor) (backend.Tensor, error) {
	xt, err := b.asTensor(op, "a", x)
	if err != nil {
		return nil, err
	}
	yt, err := b.asTensor(op, "b", y)
	if err != nil {
		return nil, err
	}
	if !slices.Equal(xt.shape, yt.shape) {
		return nil, fmt.Errorf("cuda: %s a%v b%v: %w", op, xt.shape, yt.shape, backend.ErrShape)
	}
	out, err := b.newTensor(dt, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	n := xt.numel()
	if n == 0 {
		return out, nil
	}
	if k == b.k.siluMul && b.vec8(n, xt.ptr(), yt.ptr(), out.ptr()) {
		err = b.stream.launch(b.k.siluMulV8, elemGrid(n/8), elemBlockDim, 0, xt, int(xt.dt), yt, int(yt.dt), out, int(out.dt), int64(n/8))
		return b.result(op, out, err)
	}
	err = b.stream.launch(k, elemGridN(n), elemBlockDim, 0, xt, int(xt.dt), yt, int(yt.dt), out, int(out.dt), int64(n))
	return b.result(op, out, err)
}

// ScaleRows multiplies row i of x ([T, ...]) by scale[i] (len T).
func (b *Backend) ScaleRows(x backend.Tensor, scale []float32) (backend.Tensor, error) {
	xt, err := b.asTensor("scalerows", "x", x)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) == 0 || xt.shape[0] != len(scale) {
		return nil, fmt.Errorf("cuda: scalerows x%v scale[%d]: %w", xt.shape, len(scale), backend.ErrShape)
	}
	out, err := b.act(slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	n := xt.numel()
	if n == 0 {
		return out, nil
	}
	sbuf, err := b.temp(float32Bytes(scale))
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*sbuf)
	row := n / len(scale)
	err = b.stream.launch(b.k.scaleRows, elemGrid(n), elemBlockDim, 0, xt, int(xt.dt), sbuf, out, int(out.dt), int64(row), int64(n))
	return b.result("scalerows", out, err)
}

// RoPE rotates the interleaved pairs (x[2i], x[2i+1]) of each head of x [T, heads, D] by the angle
// θ = float32(pos[t])·invFreq[i] (a float32 product); cos θ and sin θ are evaluated in float64 and
// rounded to float32, the rotation is float32.
func (b *Backend) RoPE(x backend.Tensor, pos []int, invFreq []float32) (backend.Tensor, error) {
	xt, err := b.asTensor("rope", "x", x)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 3 || xt.shape[0] != len(pos) || xt.shape[2]%2 != 0 || xt.shape[2]/2 != len(invFreq) {
		return nil, fmt.Errorf("cuda: rope x%v pos[%d] invFreq[%d]: %w", xt.shape, len(pos), len(invFreq), backend.ErrShape)
	}
	T, heads, D := xt.shape[0], xt.shape[1], xt.shape[2]
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	pairs := T * heads * (D / 2)
	if pairs == 0 {
		return out, nil
	}
	pbuf, fbuf, err := b.ropeArgs(pos, invFreq)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*pbuf)
	defer b.pool.release(*fbuf)
	err = b.stream.launch(b.k.rope, elemGrid(pairs), elemBlockDim, 0, xt, int(xt.dt), pbuf, fbuf, out, int(out.dt), heads, D/2, int64(pairs))
	return b.result("rope", out, err)
}

// ropeArgs uploads the positions (int32) and inverse frequencies the rope kernels read; the caller
// releases both buffers after enqueuing the kernel.
func (b *Backend) ropeArgs(pos []int, invFreq []float32) (pbuf, fbuf *buffer, err error) {
	pb, err := int32Bytes("pos", pos)
	if err != nil {
		return nil, nil, err
	}
	if pbuf, err = b.temp(pb); err != nil {
		return nil, nil, err
	}
	if fbuf, err = b.temp(float32Bytes(invFreq)); err != nil {
		b.pool.release(*pbuf)
		return nil, nil, err
	}
	return pbuf, fbuf, nil
}

// gemvMaxRows is the most rows Linear runs on the GEMV kernel (gemv.cu) rather than cuBLASLt: it
// reads each weight once with 16-byte loads and computes in float32 on the float32 x as it is, in one
// launch (the hi/lo split GEMM takes three). Measured on an H200 (docs/gpu-notes.md): at 1 row the
// GEMV is as fast or faster than cuBLASLt on the decode shapes, at 2 rows they tie within the noise, and
// from 4 rows on cuBLASLt wins (the GEMV rereads x from L1 for every weight row). The kernels exist for
// up to 8 rows (SetGEMVRows in tests).
const gemvMaxRows = 2

// gemvKernelRows is the most rows the GEMV kernels take (gemv_8).
const gemvKernelRows = 8

// Linear computes x · wᵀ for x [T, in] and w [out, in] → [T, out], float32 out (Linear outputs are
// residual-stream updates, routing logits and the model's logits, which DESIGN §6 keeps in float32).
// The path depends on T, the number of rows:
//   - T <= gemvMaxRows (2), a bf16 w and in % 8 == 0: the GEMV kernel, float32 math on x as stored.
//   - T <= skinnyRows (64; any T with Activations F32) and a float32 x: one cuBLASLt GEMM of 2T rows on the hi/lo
//     bf16 split of x (see splitLinear), float32-input accuracy for one weight read.
//   - a float32 x and a narrow w (narrowProduct: a MoE router, whose top-k turns a rounding of x into
//     another expert), at any T: the hi/lo split as well.
//   - otherwise (prefill): x rounded to bf16, one cuBLASLt GEMM (bf16 inputs, float32 accumulation).
//
// A quantised w (LoadQuantized) takes linearQuant's paths (quant.go). A weight that is not bf16 (or an
// operand not 256-byte aligned) is first converted into a temporary bf16 copy for cuBLASLt. Shapes
// cuBLASLt has no algorithm for run on a simple kernel (float32 math on the operands as stored).
func (b *Backend) Linear(x, w backend.Tensor) (backend.Tensor, error) {
	xt, err := b.asTensor("linear", "x", x)
	if err != nil {
		return nil, err
	}
	wt, err := b.asTensor("linear", "w", w)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 2 || len(wt.shape) != 2 || xt.shape[1] != wt.shape[1] {
		return nil, fmt.Errorf("cuda: linear x%v w%v: %w", xt.shape, wt.shape, backend.ErrShape)
	}
	if err := notQuantized("linear input", xt); err != nil {
		return nil, err
	}
	if wt.q != nil {
		return b.linearQuant(xt, wt)
	}
	T, in, outDim := xt.shape[0], xt.shape[1], wt.shape[0]
	y, err := b.newTensor(F32, T, outDim)
	if err != nil {
		return nil, err
	}
	if T == 0 || outDim == 0 {
		return y, nil
	}
	if b.gemvOK(xt, wt) {
		b.counts.GEMV++
		i := 0
		for 1<<i < T {
			i++
		}
		if T <= 2 && outDim <= gemvSplitMaxRows && !b.noGEMVSplit {
			err = b.stream.launch(b.k.gemvSplit[T-1], gemvSplitGrid(outDim), gemvBlock, 0, xt, int(xt.dt), wt, y, T, in, outDim)
		} else {
			err = b.stream.launch(b.k.gemv[i], gemvGrid(outDim), gemvBlock, 0, xt, int(xt.dt), wt, y, T, in, outDim)
		}
		return b.result("linear", y, err)
	}
	key := gemmKey{m: T, n: outDim, k: in, out: y.dt}
	var plan *gemmPlan
	if in > 0 {
		if plan, err = b.gemm.plan(key); err != nil {
			return nil, fmt.Errorf("cuda: linear x%v w%v: %w", xt.shape, wt.shape, err)
		}
	}
	if plan == nil || !plan.ok {
		b.counts.Fallback++
		err = b.stream.launch(b.k.linearSimple, elemGrid(T*outDim), elemBlockDim, 0,
			xt, int(xt.dt), wt, int(wt.dt), y, int(y.dt), T, in, outDim)
		return b.result("linear", y, err)
	}
	b.counts.Gemm++
	wp, wtmp, err := b.bf16Operand(wt)
	if err != nil {
		return nil, err
	}
	if wtmp != nil {
		defer b.pool.release(*wtmp)
	}
	if xt.dt != BF16 && (b.cfg.Activations == F32 || T <= skinnyRows || narrowProduct(in, outDim)) {
		err = b.splitLinear(xt, wp, y)
	} else {
		var xp devptr
		var xtmp *buffer
		if xp, xtmp, err = b.bf16Operand(xt); err != nil {
			return nil, err
		}
		if xtmp != nil {
			defer b.pool.release(*xtmp)
		}
		err = b.gemm.run(plan, key, xp, wp, y.ptr(), b.stream)
	}
	runtime.KeepAlive(xt)
	runtime.KeepAlive(wt)
	if err != nil {
		return nil, fmt.Errorf("cuda: linear x%v w%v: %w", xt.shape, wt.shape, err)
	}
	return y, nil
}

// narrowProduct reports whether x · wᵀ for w [out, in] is narrow: at most narrowMaxOut outputs and at
// most an eighth of the input width. Such a product costs little next to the wide ones that read the same
// x, and is typically a router whose top-k is a discrete choice: above skinnyRows rows Linear still feeds it
// a float32 x at float32 accuracy (the hi/lo split), since rounding x to bf16 flips the expert of tokens
// whose router logits nearly tie, and one flipped expert changes a token's whole MLP output (the
// long-context fixture's 208-token prefill: relative L2 8e-2 against HF with the router input in bf16,
// 5.7e-3 with it split; docs/gpu-notes.md).
func narrowProduct(in, out int) bool { return out <= narrowMaxOut && 8*out <= in }

// narrowMaxOut is the most outputs of a narrow product (narrowProduct): Llama 4's routers have 16
// (Scout) and 128 (Maverick) experts.
const narrowMaxOut = 128

// splitLinear computes y = x · wᵀ for a float32 x as [hi; lo] · wᵀ, one GEMM of 2T rows (the weight is
// read once) into a float32 scratch, then y = top + bottom half. hi = bf16(x) and lo = bf16(x − hi)
// keep about 16 significant bits of x, so the result matches float32 math on bf16 weights far better
// than rounding x to bf16 does.
func (b *Backend) splitLinear(xt *tensor, w devptr, y *tensor) error {
	T, in, out := xt.shape[0], xt.shape[1], y.shape[1]
	key := gemmKey{m: 2 * T, n: out, k: in, out: F32}
	plan, err := b.gemm.plan(key)
	if err != nil {
		return err
	}
	if !plan.ok {
		return fmt.Errorf("no cuBLASLt algorithm for the split GEMM m=%d n=%d k=%d", 2*T, out, in)
	}
	b.counts.Split++
	n := T * in
	halves, err := b.pool.get(int64(2*n) * 2)
	if err != nil {
		return err
	}
	defer b.pool.release(*halves)
	d, err := b.pool.get(int64(2*T*out) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*d)
	if err := b.splitHalves(xt, halves); err != nil {
		return err
	}
	if err := b.gemm.run(plan, key, halves.ptr, w, d.ptr, b.stream); err != nil {
		return err
	}
	return b.stream.launch(b.k.addHalves, elemGrid(T*out), elemBlockDim, 0, d, y, int(y.dt), int64(T*out))
}

// splitHalves enqueues split_bf16 (split_bf16_v8 where it can): xt's n elements as bf16 hi = bf16(x) in
// halves[0, n) and lo = bf16(x − hi) in halves[n, 2n), rows [hi; lo] of a GEMM of twice xt's rows.
func (b *Backend) splitHalves(xt *tensor, halves *buffer) error {
	n := xt.numel()
	if b.vec8(n, xt.ptr()) {
		return b.stream.launch(b.k.splitBF16V8, elemGrid(n/8), elemBlockDim, 0, xt, int(xt.dt), halves, int64(n/8))
	}
	return b.stream.launch(b.k.splitBF16, elemGrid(n), elemBlockDim, 0, xt, int(xt.dt), halves, int64(n))
}

// bf16Operand returns t's address when it is bf16 and aligned, else a temporary bf16 copy (which the
// caller releases after enqueuing its use).
func (b *Backend) bf16Operand(t *tensor) (devptr, *buffer, error) {
	if t.dt == BF16 && t.ptr()%alignment == 0 {
		return t.ptr(), nil, nil
	}
	n := t.numel()
	buf, err := b.pool.get(int64(n) * 2)
	if err != nil {
		return 0, nil, err
	}
	if err := b.convert(t, buf.ptr, BF16, n); err != nil {
		b.pool.release(*buf)
		return 0, nil, err
	}
	return buf.ptr, buf, nil
}

// convert enqueues the conversion of t's n elements to dtype dt at dst (convert, or convert_v8).
func (b *Backend) convert(t *tensor, dst devptr, dt DType, n int) error {
	if b.vec8(n, t.ptr(), dst) {
		return b.stream.launch(b.k.convertV8, elemGrid(n/8), elemBlockDim, 0, t, int(t.dt), dst, int(dt), int64(n/8))
	}
	return b.stream.launch(b.k.convert, elemGrid(n), elemBlockDim, 0, t, int(t.dt), dst, int(dt), int64(n))
}

// commBuffer describes t's memory for an NCCL collective on the backend's stream.
func (b *Backend) commBuffer(t *tensor) comm.DeviceBuffer {
	typ := comm.Float32
	if t.dt == BF16 {
		typ = comm.BFloat16
	}
	return comm.DeviceBuffer{Ptr: uintptr(t.ptr()), N: t.numel(), Type: typ, Stream: b.Stream()}
}

// recordCollective records (capture) or checks (replay) a collective of kind op on bufs in a recorded
// step, and marks the buffers as captured. It says whether to call the communicator: always outside a
// recorded step, while capturing, and never while replaying (the graph runs it).
//
// The signature includes the underlying communicator, so a recording made with one (a worker's previous
// epoch, say) is not replayed with another: the replay differs, and the step is recorded again.
func (b *Backend) recordCollective(ctx context.Context, c comm.Comm, op uint64, bufs ...*comm.DeviceBuffer) (enqueue bool, err error) {
	if b.rec == nil {
		return true, nil
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	var id uint64
	if v := reflect.ValueOf(comm.Underlying(c)); v.Kind() == reflect.Pointer {
		id = uint64(v.Pointer())
	}
	sig := []uint64{sigCollective, op, id}
	for _, buf := range bufs {
		buf.Captured = true
		sig = append(sig, uint64(buf.Ptr), uint64(buf.N), uint64(buf.Type))
	}
	return b.rec.op(sig)
}

// AllReduce sums t across the ranks of c in place, enqueued on the backend's stream (c must be an NCCL
// communicator whose rank runs on this backend's device, see nccl.NewGroup). A single-rank
// communicator of any kind leaves t as it is.
func (b *Backend) AllReduce(ctx context.Context, c comm.Comm, t backend.Tensor) error {
	tt, err := b.asTensor("allreduce", "t", t)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("cuda: allreduce t%v: nil comm", tt.shape)
	}
	if c.Size() == 1 {
		return ctx.Err()
	}
	if !comm.AcceptsDeviceBuffers(c) {
		return fmt.Errorf("cuda: allreduce t%v over a %T of %d ranks: device tensors need an NCCL communicator: %w",
			tt.shape, c, c.Size(), errors.ErrUnsupported)
	}
	buf := b.commBuffer(tt)
	if enqueue, err := b.recordCollective(ctx, c, 1, &buf); !enqueue {
		return err
	}
	if err := c.AllReduce(ctx, buf); err != nil {
		return fmt.Errorf("cuda: allreduce t%v: %w", tt.shape, err)
	}
	runtime.KeepAlive(tt)
	return nil
}

// AllGather concatenates each rank's t [T, n] along the last dimension in rank order → [T, n·size],
// on the backend's stream: NCCL gathers the ranks' blocks into [size, T, n] and, for T > 1, a kernel
// permutes them into rows. A single-rank communicator returns t.
func (b *Backend) AllGather(ctx context.Context, c comm.Comm, t backend.Tensor) (backend.Tensor, error) {
	tt, err := b.asTensor("allgather", "t", t)
	if err != nil {
		return nil, err
	}
	if len(tt.shape) != 2 {
		return nil, fmt.Errorf("cuda: allgather t%v: %w", tt.shape, backend.ErrShape)
	}
	if c == nil {
		return nil, fmt.Errorf("cuda: allgather t%v: nil comm", tt.shape)
	}
	if c.Size() == 1 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return tt, nil
	}
	if !comm.AcceptsDeviceBuffers(c) {
		return nil, fmt.Errorf("cuda: allgather t%v over a %T of %d ranks: device tensors need an NCCL communicator: %w",
			tt.shape, c, c.Size(), errors.ErrUnsupported)
	}
	T, n, size := tt.shape[0], tt.shape[1], c.Size()
	g, err := b.newTensor(tt.dt, size, T, n)
	if err != nil {
		return nil, err
	}
	sb, gb := b.commBuffer(tt), b.commBuffer(g)
	enqueue, err := b.recordCollective(ctx, c, 2, &sb, &gb)
	if err != nil {
		return nil, err
	}
	if enqueue {
		if err := c.AllGather(ctx, sb, gb); err != nil {
			return nil, fmt.Errorf("cuda: allgather t%v: %w", tt.shape, err)
		}
	}
	runtime.KeepAlive(tt)
	if T <= 1 {
		return &tensor{b: b, buf: g.buf, off: g.off, shape: []int{T, size * n}, dt: g.dt}, nil
	}
	out, err := b.newTensor(tt.dt, T, size*n)
	if err != nil {
		return nil, err
	}
	total := T * size * n
	err = b.stream.launch(b.k.gatherPermute, elemGrid(total), elemBlockDim, 0, g, int(g.dt), out, T, n, size, int64(total))
	return b.result("allgather", out, err)
}

var _ backend.QKRotator = (*Backend)(nil)

// RoPEQK rotates q [T, qheads, D] and k [T, kheads, D] by position and, with norm, applies the
// weightless RMS norm to every head (backend.QKRotator): one launch, one warp a head, instead of two RoPE
// and two RMSNorm launches.
func (b *Backend) RoPEQK(q, k backend.Tensor, pos []int, invFreq []float32, norm bool, eps float32) (backend.Tensor, backend.Tensor, error) {
	qt, err := b.asTensor("rope qk", "q", q)
	if err != nil {
		return nil, nil, err
	}
	kt, err := b.asTensor("rope qk", "k", k)
	if err != nil {
		return nil, nil, err
	}
	if len(qt.shape) != 3 || len(kt.shape) != 3 || qt.shape[0] != len(pos) || kt.shape[0] != len(pos) ||
		qt.shape[2] != kt.shape[2] || qt.shape[2]%2 != 0 || qt.shape[2]/2 != len(invFreq) {
		return nil, nil, fmt.Errorf("cuda: rope qk q%v k%v pos[%d] invFreq[%d]: %w", qt.shape, kt.shape, len(pos), len(invFreq), backend.ErrShape)
	}
	T, qh, kh, D := qt.shape[0], qt.shape[1], kt.shape[1], qt.shape[2]
	qo, err := b.act(T, qh, D)
	if err != nil {
		return nil, nil, err
	}
	ko, err := b.newTensor(qo.dt, T, kh, D)
	if err != nil {
		return nil, nil, err
	}
	if T == 0 || D == 0 || qh+kh == 0 {
		return qo, ko, nil
	}
	pbuf, fbuf, err := b.ropeArgs(pos, invFreq)
	if err != nil {
		return nil, nil, err
	}
	defer b.pool.release(*pbuf)
	defer b.pool.release(*fbuf)
	if err := b.stream.launch(b.k.ropeQK, dim3{uint32(T), uint32(qh + kh), 1}, dim3{32, 1, 1}, 0,
		qt, int(qt.dt), kt, int(kt.dt), pbuf, fbuf, qo, ko, int(qo.dt), qh, kh, D/2, norm, eps); err != nil {
		return nil, nil, fmt.Errorf("cuda: rope qk: %w", err)
	}
	return qo, ko, nil
}
