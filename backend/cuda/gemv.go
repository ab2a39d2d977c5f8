package cuda

import (
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

// The GEMV kernels (gemv.cu) for decode: Linear at a few rows, and several products of one x in one
// launch (q, k and v; the routing logits and the shared expert's gate and up), which saves a decode layer launches.
//
// Measured and dropped (docs/gpu-notes.md): four rows a warp instead of two (no faster), and SwiGLU's
// product fused into the down projection's x loads (2.6 times slower than silu_mul and a GEMV: every warp
// recomputed the product and read two float32 rows per weight chunk).

// gemvBlock and gemvGrid size a GEMV launch over n output rows: GEMV_WARPS warps of GEMV_ROWS rows each.
var gemvBlock = dim3{gemvWarps * 32, 1, 1}

func gemvGrid(n int) dim3 {
	rows := gemvWarps * gemvRowsPerWarp
	return dim3{uint32((n + rows - 1) / rows), 1, 1}
}

// gemvSplitMaxRows is the most output rows for which Linear's GEMV splits K over a block's warps
// (gemv_split_N): decode's attention and MLP weights. The lm_head (202048 rows) has enough warps without.
const gemvSplitMaxRows = 32768

// gemvSplitGrid sizes a gemv_split_N or gemv_multi_N launch: GEMV_ROWS rows a block.
func gemvSplitGrid(n int) dim3 { return dim3{uint32(ceilDiv(n, gemvRowsPerWarp)), 1, 1} }

// gemvOK reports whether x · wᵀ runs on a GEMV kernel: at most gemvRows rows, a bf16 w, K a multiple of
// 8 and 16-byte aligned operands (the kernels' 16-byte loads).
func (b *Backend) gemvOK(xt, wt *tensor) bool {
	T, in := xt.shape[0], xt.shape[1]
	return T <= min(b.gemvRows, gemvKernelRows) && wt.dt == BF16 && in > 0 && in%8 == 0 && wt.ptr()%16 == 0 && xt.ptr()%16 == 0
}

var _ backend.MultiLinear = (*Backend)(nil)

// wideOperand returns x rounded to bf16 once for LinearMulti's products that Linear would each round
// (a float32 x of more than skinnyRows rows in the default mode, at least two such unquantised bf16 or
// int4 weights: q4gemm and the dequantised path round x alike), or nil when there is nothing to share. The
// narrow products (narrowProduct) keep the float32 x.
func (b *Backend) wideOperand(xt *tensor, wts []*tensor) (*tensor, error) {
	if xt.dt == BF16 || b.cfg.Activations != BF16 || len(xt.shape) != 2 || xt.shape[0] <= skinnyRows {
		return nil, nil
	}
	wide := 0
	for _, w := range wts {
		rounds := (w.q == nil && w.dt == BF16) || (w.q != nil && w.q.code == qfInt4)
		if rounds && len(w.shape) == 2 && w.shape[1] == xt.shape[1] && !narrowProduct(w.shape[1], w.shape[0]) {
			wide++
		}
	}
	if wide < 2 {
		return nil, nil
	}
	out, err := b.newTensor(BF16, slices.Clone(xt.shape)...)
	if err != nil {
		return nil, err
	}
	if err := b.convert(xt, out.ptr(), BF16, xt.numel()); err != nil {
		return nil, fmt.Errorf("cuda: linear multi x%v: %w", xt.shape, err)
	}
	return out, nil
}

// LinearMulti returns Linear(x, w) for each of ws (backend.MultiLinear). Two or three products that the
// GEMV kernels take (at most 2 rows, bf16 weights of the same input width and an even number of output
// rows each) run as one launch, as do two or three fp8 weights the fp8 GEMV takes (linearMultiFP8) and
// two or three int4 weights at up to 4 rows (linearMultiInt4);
// otherwise each is a Linear.
func (b *Backend) LinearMulti(x backend.Tensor, ws ...backend.Tensor) ([]backend.Tensor, error) {
	xt, err := b.asTensor("linear multi", "x", x)
	if err != nil {
		return nil, err
	}
	wts := make([]*tensor, len(ws))
	fused := !b.noGEMVSplit && len(ws) >= 2 && len(ws) <= 3 && len(xt.shape) == 2 && xt.shape[0] <= 2
	for i, w := range ws {
		if wts[i], err = b.asTensor("linear multi", "w", w); err != nil {
			return nil, err
		}
		fused = fused && len(wts[i].shape) == 2 && wts[i].shape[1] == xt.shape[1] && wts[i].shape[0]%gemvRowsPerWarp == 0 &&
			wts[i].shape[0] <= gemvSplitMaxRows && b.gemvOK(xt, wts[i])
	}
	if out, ok, err := b.linearMultiFP8(xt, wts); ok { // fp8 weights of one input in one launch (fp8.go)
		return out, err
	}
	if ys, ok, err := b.linearMultiInt4(xt, wts); ok || err != nil { // int4 weights of one input in one launch (quant_int4.go)
		return ys, err
	}
	out := make([]backend.Tensor, len(ws))
	if !fused {
		wide, err := b.wideOperand(xt, wts)
		if err != nil {
			return nil, err
		}
		for i, w := range ws {
			in := x
			if wide != nil && !narrowProduct(wts[i].shape[1], wts[i].shape[0]) {
				in = wide
			}
			if out[i], err = b.Linear(in, w); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	T, in := xt.shape[0], xt.shape[1]
	args := []any{xt, int(xt.dt)}
	total := 0
	for i := range 3 {
		if i >= len(wts) {
			args = append(args, devptr(0), devptr(0), 0)
			continue
		}
		n := wts[i].shape[0]
		y, err := b.newTensor(F32, T, n)
		if err != nil {
			return nil, err
		}
		out[i] = y
		args = append(args, wts[i], y, n)
		total += n
	}
	args = append(args, T, in)
	b.counts.GEMV += int64(len(ws))
	if err := b.stream.launch(b.k.gemvMulti[T-1], gemvSplitGrid(total), gemvBlock, 0, args...); err != nil {
		return nil, fmt.Errorf("cuda: linear multi x%v: %w", xt.shape, err)
	}
	return out, nil
}

var _ backend.GatedLinear = (*Backend)(nil)

// LinearGated returns SiLUMul(Linear(x, gate), Linear(x, up)) and Linear(x, w) for each of ws
// (backend.GatedLinear). At one or two rows (decode) with bf16 weights the GEMV kernels take, and at most
// one w (a MoE's router), it is one launch (gemv_gated_N, FuseSwiGLU): each block sums a row of gate and
// the same row of up as the GEMV does and stores silu(g)·u as SiLUMul does. Otherwise it is LinearMulti
// and SiLUMul.
func (b *Backend) LinearGated(x, gate, up backend.Tensor, ws ...backend.Tensor) (backend.Tensor, []backend.Tensor, error) {
	xt, err := b.asTensor("linear gated", "x", x)
	if err != nil {
		return nil, nil, err
	}
	gt, err := b.asTensor("linear gated", "gate", gate)
	if err != nil {
		return nil, nil, err
	}
	ut, err := b.asTensor("linear gated", "up", up)
	if err != nil {
		return nil, nil, err
	}
	wts := make([]*tensor, len(ws))
	for i, w := range ws {
		if wts[i], err = b.asTensor("linear gated", "w", w); err != nil {
			return nil, nil, err
		}
	}
	fused := b.fused(FuseSwiGLU) && !b.noGEMVSplit && len(ws) <= 1 && len(xt.shape) == 2 && xt.shape[0] >= 1 && xt.shape[0] <= 2 &&
		len(gt.shape) == 2 && slices.Equal(gt.shape, ut.shape) && gt.shape[1] == xt.shape[1] && gt.shape[0] <= gemvSplitMaxRows &&
		b.gemvOK(xt, gt) && b.gemvOK(xt, ut)
	for _, w := range wts {
		fused = fused && len(w.shape) == 2 && w.shape[1] == xt.shape[1] && w.shape[0]%gemvRowsPerWarp == 0 &&
			w.shape[0] <= gemvSplitMaxRows && b.gemvOK(xt, w)
	}
	if !fused {
		ys, err := b.LinearMulti(x, append(slices.Clone(ws), gate, up)...)
		if err != nil {
			return nil, nil, err
		}
		act, err := b.SiLUMul(ys[len(ws)], ys[len(ws)+1])
		if err != nil {
			return nil, nil, err
		}
		return act, ys[:len(ws)], nil
	}
	T, K, I := xt.shape[0], xt.shape[1], gt.shape[0]
	act, err := b.act(T, I) // SiLUMul's output type
	if err != nil {
		return nil, nil, err
	}
	ys := make([]backend.Tensor, len(ws))
	var w0, y0 any = devptr(0), devptr(0)
	n0 := 0
	if len(wts) == 1 {
		n0 = wts[0].shape[0]
		y, err := b.newTensor(F32, T, n0)
		if err != nil {
			return nil, nil, err
		}
		ys[0], w0, y0 = y, wts[0], y
	}
	b.counts.GEMV += int64(2 + len(ws))
	if err := b.stream.launch(b.k.gemvGated[T-1], dim3{uint32(n0/gemvRowsPerWarp + I), 1, 1}, gemvBlock, 0,
		xt, int(xt.dt), w0, y0, n0, gt, ut, act, int(act.dt), I, T, K); err != nil {
		return nil, nil, fmt.Errorf("cuda: linear gated x%v gate%v: %w", xt.shape, gt.shape, err)
	}
	return act, ys, nil
}
