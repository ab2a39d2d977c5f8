package cuda

import (
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

var _ backend.EncoderOps = (*Backend)(nil)

// encoderKernels are encoder.cu's kernels, looked up on first use.
type encoderKernels struct {
	layerNorm, addBias, gelu, rotatePairs, fullAttention *kernel
}

// Geometry of full_attention (ENC_* in encoder.cu).
const (
	encWarps   = 4
	encQueries = 4 * encWarps // queries a block
	encKeys    = 32           // keys a chunk
	encMaxD    = 128
)

func (b *Backend) encoder() (*encoderKernels, error) {
	if b.enc != nil {
		return b.enc, nil
	}
	k := &encoderKernels{}
	for _, e := range []struct {
		name string
		dst  **kernel
	}{
		{"layernorm", &k.layerNorm}, {"add_bias", &k.addBias}, {"gelu", &k.gelu},
		{"rotate_pairs", &k.rotatePairs}, {"full_attention", &k.fullAttention},
	} {
		var err error
		if *e.dst, err = b.module.function(e.name); err != nil {
			return nil, err
		}
	}
	b.enc = k
	return k, nil
}

// encoderOperands checks the operands of an encoder op and returns the kernels with them.
func (b *Backend) encoderOperands(op string, names []string, ts ...backend.Tensor) (*encoderKernels, []*tensor, error) {
	out := make([]*tensor, len(ts))
	for i, t := range ts {
		tt, err := b.asTensor(op, names[i], t)
		if err != nil {
			return nil, nil, err
		}
		if err := notQuantized(op, tt); err != nil {
			return nil, nil, err
		}
		out[i] = tt
	}
	k, err := b.encoder()
	return k, out, err
}

// LayerNorm normalises each row in float32 (mean and biased variance summed over the block, the root in
// float64), then applies weight and bias. One block a row; the output is a GEMM input (act).
func (b *Backend) LayerNorm(x, weight, bias backend.Tensor, eps float32) (backend.Tensor, error) {
	k, ts, err := b.encoderOperands("layernorm", []string{"x", "weight", "bias"}, x, weight, bias)
	if err != nil {
		return nil, err
	}
	xt, wt, bt := ts[0], ts[1], ts[2]
	if len(xt.shape) == 0 || len(wt.shape) != 1 || wt.shape[0] != xt.shape[len(xt.shape)-1] || !slices.Equal(wt.shape, bt.shape) {
		return nil, fmt.Errorf("cuda: layernorm x%v weight%v bias%v: %w", xt.shape, wt.shape, bt.shape, backend.ErrShape)
	}
	out, err := b.act(slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	n := wt.shape[0]
	if n == 0 || xt.numel() == 0 {
		return out, nil
	}
	rows := xt.numel() / n
	err = b.stream.launch(k.layerNorm, dim3{uint32(rows), 1, 1}, b.normBlock(rows, n), 0,
		xt, int(xt.dt), wt, int(wt.dt), bt, int(bt.dt), out, int(out.dt), n, eps)
	return b.result("layernorm", out, err)
}

// AddBias adds bias to every row of x; the output is float32 (a Linear output plus its bias).
func (b *Backend) AddBias(x, bias backend.Tensor) (backend.Tensor, error) {
	k, ts, err := b.encoderOperands("addbias", []string{"x", "bias"}, x, bias)
	if err != nil {
		return nil, err
	}
	xt, bt := ts[0], ts[1]
	if len(xt.shape) == 0 || len(bt.shape) != 1 || bt.shape[0] != xt.shape[len(xt.shape)-1] {
		return nil, fmt.Errorf("cuda: addbias x%v bias%v: %w", xt.shape, bt.shape, backend.ErrShape)
	}
	out, err := b.newTensor(F32, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	n := xt.numel()
	if n == 0 {
		return out, nil
	}
	err = b.stream.launch(k.addBias, elemGrid(n), elemBlockDim, 0, xt, int(xt.dt), bt, int(bt.dt), out, int(out.dt), bt.shape[0], int64(n))
	return b.result("addbias", out, err)
}

// GELU is 0.5·x·(1 + erf(x/√2)) in float32 (erff); the output is a GEMM input (act).
func (b *Backend) GELU(x backend.Tensor) (backend.Tensor, error) {
	k, ts, err := b.encoderOperands("gelu", []string{"x"}, x)
	if err != nil {
		return nil, err
	}
	xt := ts[0]
	out, err := b.act(slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	n := xt.numel()
	if n == 0 {
		return out, nil
	}
	err = b.stream.launch(k.gelu, elemGrid(n), elemBlockDim, 0, xt, int(xt.dt), out, int(out.dt), int64(n))
	return b.result("gelu", out, err)
}

// RotatePairs rotates the interleaved pairs of each head of x [T, heads, D] by the float32 tables cos
// and sin [T, D/2] (FromFloat32 tensors), in float32; the output is an attention input (act).
func (b *Backend) RotatePairs(x, cos, sin backend.Tensor) (backend.Tensor, error) {
	k, ts, err := b.encoderOperands("rotatepairs", []string{"x", "cos", "sin"}, x, cos, sin)
	if err != nil {
		return nil, err
	}
	xt, ct, st := ts[0], ts[1], ts[2]
	if len(xt.shape) != 3 || xt.shape[2]%2 != 0 || !slices.Equal(ct.shape, []int{xt.shape[0], xt.shape[2] / 2}) || !slices.Equal(ct.shape, st.shape) {
		return nil, fmt.Errorf("cuda: rotatepairs x%v cos%v sin%v: %w", xt.shape, ct.shape, st.shape, backend.ErrShape)
	}
	if ct.dt != F32 || st.dt != F32 {
		return nil, fmt.Errorf("cuda: rotatepairs: cos and sin must be float32 tables (FromFloat32), got %v and %v: %w", ct.dt, st.dt, backend.ErrShape)
	}
	T, heads, D := xt.shape[0], xt.shape[1], xt.shape[2]
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	pairs := T * heads * D / 2
	if pairs == 0 {
		return out, nil
	}
	err = b.stream.launch(k.rotatePairs, elemGrid(pairs), elemBlockDim, 0, xt, int(xt.dt), ct, st, out, int(out.dt), heads, D/2, int64(pairs))
	return b.result("rotatepairs", out, err)
}

// FullAttention runs full_attention: one block of 4 warps for 16 queries of one head of one sequence,
// keys and values staged through shared memory 32 at a time, online softmax in float32. Head width at
// most 128. The output is a GEMM input (act).
func (b *Backend) FullAttention(q, kk, v backend.Tensor, seq int, scale float32) (backend.Tensor, error) {
	k, ts, err := b.encoderOperands("fullattention", []string{"q", "k", "v"}, q, kk, v)
	if err != nil {
		return nil, err
	}
	qt, kt, vt := ts[0], ts[1], ts[2]
	if len(qt.shape) != 3 || !slices.Equal(qt.shape, kt.shape) || !slices.Equal(qt.shape, vt.shape) || seq <= 0 || qt.shape[0]%seq != 0 {
		return nil, fmt.Errorf("cuda: fullattention q%v k%v v%v seq %d: %w", qt.shape, kt.shape, vt.shape, seq, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	if D > encMaxD {
		return nil, fmt.Errorf("cuda: fullattention head width %d: at most %d: %w", D, encMaxD, backend.ErrShape)
	}
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	if T == 0 || heads == 0 || D == 0 {
		return out, nil
	}
	shmem := 4 * (encQueries*D + encKeys*(D+1) + encKeys*D)
	grid := dim3{uint32(ceilDiv(seq, encQueries)), uint32(heads), uint32(T / seq)}
	err = b.stream.launch(k.fullAttention, grid, dim3{encWarps * 32, 1, 1}, shmem,
		qt, int(qt.dt), kt, int(kt.dt), vt, int(vt.dt), out, int(out.dt), heads, D, seq, scale)
	return b.result("fullattention", out, err)
}
