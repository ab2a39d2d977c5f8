package cuda

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

var _ backend.QKAttender = (*Backend)(nil)

// AttendBatchQK is AttendBatch of q and k under tr (backend.QKAttender). On the decode path (every span
// at most splitMaxQueries rows) with FuseQKV, RoPE, the qk-norm, the NoPE temperature and the cache append
// are one launch (qk_append in kernels/qkv.cu) with the values RoPEQK, ScaleRows and the append store;
// otherwise RoPEQK and ScaleRows run first and then AttendBatch.
func (b *Backend) AttendBatchQK(q, k, v backend.Tensor, spans []backend.AttendSpan, window backend.Window, scale float32,
	tr backend.QKTransform) (backend.Tensor, error) {
	if tr.InvFreq == nil && tr.QScale == nil {
		return b.AttendBatch(q, k, v, spans, window, scale)
	}
	return b.attendBatch(q, k, v, spans, window, scale, &tr)
}

// qkAppendMaxD is the widest head qk_append takes (QKA_PAIRS pairs a lane of one warp).
const qkAppendMaxD = 256

// qkAppendOK reports whether qk_append takes q [T, heads, D] and k under tr.
func (b *Backend) qkAppendOK(qt, kt *tensor, tr *backend.QKTransform) bool {
	T, D := qt.shape[0], qt.shape[2]
	return b.fused(FuseQKV) && D%2 == 0 && D <= qkAppendMaxD && (tr.InvFreq == nil || len(tr.InvFreq) == D/2) &&
		(tr.QScale == nil || len(tr.QScale) == T) && qt.shape[1]+kt.shape[1] <= maxBlocks
}

// transformQK applies tr to q and k with the unfused ops: RoPEQK at the spans' positions, then ScaleRows.
func (b *Backend) transformQK(qt, kt *tensor, spans []backend.AttendSpan, tr *backend.QKTransform) (*tensor, *tensor, error) {
	var q, k backend.Tensor = qt, kt
	var err error
	if tr.InvFreq != nil {
		var pos []int
		for _, sp := range spans {
			pos = append(pos, sp.Pos...)
		}
		if q, k, err = b.RoPEQK(q, k, pos, tr.InvFreq, tr.Norm, tr.Eps); err != nil {
			return nil, nil, err
		}
	}
	if tr.QScale != nil {
		if q, err = b.ScaleRows(q, tr.QScale); err != nil {
			return nil, nil, err
		}
	}
	return q.(*tensor), k.(*tensor), nil
}

// qkAppend launches qk_append: q and k [T, ·, D] under tr at the positions of rows, q's result returned
// (as RoPEQK and ScaleRows would store it), k's and v's written into the caches rows name (as kv_append
// writes them). The caches' blocks must be reserved (AttendBatch does it first).
func (b *Backend) qkAppend(qt, kt, vt *tensor, rows []kvRow, tr *backend.QKTransform) (*tensor, error) {
	T, qh, kh, D := qt.shape[0], qt.shape[1], kt.shape[1], qt.shape[2]
	qo, err := b.act(T, qh, D)
	if err != nil {
		return nil, err
	}
	meta, err := b.uploadRows(rows, 0)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*meta)
	var inv, qscale any = devptr(0), devptr(0)
	if tr.InvFreq != nil {
		buf, err := b.temp(float32Bytes(tr.InvFreq))
		if err != nil {
			return nil, err
		}
		defer b.pool.release(*buf)
		inv = buf
	}
	if tr.QScale != nil {
		buf, err := b.temp(float32Bytes(tr.QScale))
		if err != nil {
			return nil, err
		}
		defer b.pool.release(*buf)
		qscale = buf
	}
	if T == 0 {
		return qo, nil
	}
	rope := tr.InvFreq != nil
	if err := b.stream.launch(b.k.qkAppend, dim3{uint32(T), uint32(qh + kh), 1}, dim3{32, 1, 1}, 0,
		qt, int(qt.dt), kt, int(kt.dt), vt, int(vt.dt), meta, inv, rope, rope && tr.Norm, tr.Eps, qscale, qo, int(qo.dt), qh, kh, D/2); err != nil {
		return nil, fmt.Errorf("qk_append: %w", err)
	}
	return qo, nil
}
