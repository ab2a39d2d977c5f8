package cuda

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/backend"
)

// SetGEMVRows sets the most rows Linear runs on the GEMV kernel (0: never; at most 8, the kernels' limit) and
// returns the previous value, so that tests can time cuBLASLt on the same shapes.
func SetGEMVRows(b *Backend, rows int) int {
	old := b.gemvRows
	b.gemvRows = rows
	return old
}

// SetGEMVSplit makes b's Linear split K over a block's warps for small weights (the default) or not, and
// returns the previous setting.
func SetGEMVSplit(b *Backend, on bool) bool {
	old := !b.noGEMVSplit
	b.noGEMVSplit = !on
	return old
}

// SetSplitPerSM sets the blocks per SM b's decode attention aims at and returns the previous value.
func SetSplitPerSM(b *Backend, n int) int {
	old := b.splitPerSM
	b.splitPerSM = n
	return old
}

// SetDecodeMinTiles sets the fewest 16-key tiles an attention_decode block of b takes (the kernel's minb,
// which it raises to AD_MINT, 4) and returns the previous value, so that tests can time other cuts.
func SetDecodeMinTiles(b *Backend, n int) int {
	old := b.decodeMinTiles
	b.decodeMinTiles = n
	return old
}

// SetFlash turns b's tensor-core prefill path (attention_flash) on or off and returns the previous
// setting, so that tests can compare it with the attention kernel.
func SetFlash(b *Backend, on bool) bool {
	old := !b.noFlash
	b.noFlash = !on
	return old
}

// FlashEligible reports whether Attention of q (a cuda tensor [T, heads, D]) over a cache of kvHeads
// heads takes the flash path.
func FlashEligible(b *Backend, q any, heads, kvHeads int) bool {
	qt, ok := q.(*tensor)
	if !ok || len(qt.shape) != 3 {
		return false
	}
	return b.flashEligible(qt, heads, kvHeads, qt.shape[2], qt.shape[0])
}

// SetQuantGEMV makes b's Linear and Experts on quantised weights use the GEMV kernels for few rows (the
// default) or the dequantise-to-bf16 paths at any row count, and returns the previous setting.
func SetQuantGEMV(b *Backend, on bool) bool {
	old := !b.noQuantGEMV
	b.noQuantGEMV = !on
	return old
}

// SetFP8Gemm makes b's Linear on fp8 weights with dynamic activations use the FP8 GEMM for prefill (the
// default) or the dequantise-to-bf16 path, and returns the previous setting.
func SetFP8Gemm(b *Backend, on bool) bool {
	old := !b.noFP8Gemm
	b.noFP8Gemm = !on
	return old
}

// SetFP8OuterVec makes b's FP8 GEMM apply the row scales through cuBLASLt's outer-vector scaling (the
// default where New's probe found it works: Info.FP8OuterVec; on is ignored elsewhere) or through
// fp8_scale_out, and returns the previous setting.
func SetFP8OuterVec(b *Backend, on bool) bool {
	old := b.fp8OuterVec
	b.fp8OuterVec = on && b.info.FP8OuterVec
	return old
}

// SetDecode turns b's attention_decode on or off (off: decode attention takes attention_split and
// attention_combine) and returns the previous setting, so that tests can compare the two.
func SetDecode(b *Backend, on bool) bool {
	old := !b.noDecode
	b.noDecode = !on
	return old
}

// AttendRows is the decode attention of AttendBatch without the append: query t of q [T, heads, D] at
// position pos[t] of caches[t] (each position already appended), in one launch.
func AttendRows(b *Backend, q backend.Tensor, caches []backend.KVCache, pos []int, window backend.Window, scale float32) (backend.Tensor, error) {
	qt, err := b.asTensor("attend rows", "q", q)
	if err != nil {
		return nil, err
	}
	if len(qt.shape) != 3 || qt.shape[0] != len(pos) || len(caches) != len(pos) || len(pos) == 0 {
		return nil, fmt.Errorf("cuda: attend rows q%v, %d caches, %d positions: %w", qt.shape, len(caches), len(pos), backend.ErrShape)
	}
	rows := make([]kvRow, len(pos))
	for i, c := range caches {
		kc, ok := c.(*kvCache)
		if !ok || kc.b != b || kc.pool.headDim != qt.shape[2] || qt.shape[1]%kc.pool.kvHeads != 0 ||
			(i > 0 && kc.pool.kvHeads != rows[0].c.pool.kvHeads) {
			return nil, fmt.Errorf("cuda: attend rows: cache %d (%T) does not fit q%v: %w", i, c, qt.shape, backend.ErrShape)
		}
		if err := kc.table.CheckAttend(pos[i:i+1], window); err != nil {
			return nil, fmt.Errorf("cuda: attend rows: cache %d: %w", i, err)
		}
		rows[i] = kvRow{kc, pos[i]}
	}
	out, err := b.act(qt.shape...)
	if err != nil {
		return nil, err
	}
	err = b.attendDecode(qt, rows[0].c.pool.kvHeads, rows, out, window, scale)
	return b.result("attend rows", out, err)
}

// SetUnfuse turns b's fusions in list off as Config.Unfuse does ("all", names of Fusions; "" turns every
// one on) and returns a function that restores the previous set.
func SetUnfuse(b *Backend, list string) (restore func(), err error) {
	on, err := parseUnfuse(list)
	if err != nil {
		return nil, err
	}
	old := b.fuse
	b.fuse = on
	return func() { b.fuse = old }, nil
}

// FuseCounters waits for b's stream and returns the fused epilogues' counters (eg_last), which must all
// be zero between launches; nil before the first fused epilogue made them.
func FuseCounters(b *Backend) ([]int32, error) {
	if b.fuseCtr == nil {
		return nil, nil
	}
	if err := b.stream.sync(); err != nil {
		return nil, err
	}
	raw := make([]byte, b.fuseCtr.size)
	if err := b.download(raw, b.fuseCtr.ptr); err != nil {
		return nil, err
	}
	out := make([]int32, len(raw)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out, nil
}

// SetGroupedMaxRows sets the most routing slots per local expert that run on the grouped expert kernels
// (0: no limit, so that tests reach the kernels at any shape; negative: the default) and returns the
// previous value.
func SetGroupedMaxRows(b *Backend, n int) int {
	return setLimit(&b.groupedMaxRows, n, groupedMaxRowsPerExpert)
}

// setLimit sets *field to n (negative: def) and returns the previous value.
func setLimit(field *int, n, def int) int {
	if n < 0 {
		n = def
	}
	old := *field
	*field = n
	return old
}

// SetQ4GEMMMaxRows sets the most rows of x a dense Linear on int4 weights runs on q4gemm (0: no limit, so
// that tests reach q4gemm at any row count; negative: the default) and returns the previous value.
func SetQ4GEMMMaxRows(b *Backend, n int) int {
	return setLimit(&b.q4gemmMaxRows, n, q4gemmDenseMaxRows)
}

// SetFP8ExpertGEMVRows sets the most tokens the fp8 routed experts (dynamic activations) run on the
// expert GEMV before the grouped fp8 kernels (negative: the default) and returns the previous value.
func SetFP8ExpertGEMVRows(b *Backend, n int) int {
	return setLimit(&b.fp8ExpertGemvRows, n, fp8ExpertGemvRows)
}

// ActCodes runs fp8_act_codes on x [rows, n]: each row's E4M3 codes (FbgemmFp8's per-token
// quantisation) and its scale, as the FP8 GEMM gets them.
func ActCodes(b *Backend, x backend.Tensor) (codes []byte, scales []float32, err error) {
	xt, err := b.asTensor("act codes", "x", x)
	if err != nil {
		return nil, nil, err
	}
	rows, n := xt.shape[0], xt.shape[1]
	buf, err := b.pool.get(int64(rows) * int64(n+4))
	if err != nil {
		return nil, nil, err
	}
	defer b.pool.release(*buf)
	cp, sp := buf.ptr, buf.ptr+devptr(int64(rows)*int64(n))
	if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
		xt, int(xt.dt), devptr(0), devptr(0), 1, n, cp, sp, devptr(0)); err != nil {
		return nil, nil, err
	}
	out := make([]byte, rows*(n+4))
	if err := b.download(out, buf.ptr); err != nil {
		return nil, nil, err
	}
	scales = make([]float32, rows)
	for r := range scales {
		scales[r] = math.Float32frombits(binary.LittleEndian.Uint32(out[rows*n+4*r:]))
	}
	return out[:rows*n], scales, nil
}

// ActRows runs fp8_act_rows on x [rows, n] with dynamic quantisation: the values FbgemmFp8 multiplies
// (quant.FakeQuantFP8Rows), float32, in row order.
func ActRows(b *Backend, x backend.Tensor) (backend.Tensor, error) {
	xt, err := b.asTensor("act rows", "x", x)
	if err != nil {
		return nil, err
	}
	return b.fp8ActRows(xt, true, false)
}
