package cuda

import "github.com/tpfleet/tpfleet/backend"

// Tensor-core prefill attention (attention_flash in flash.cu).
const (
	flashRows = 64  // query rows per block (FA_BM)
	flashMaxD = 128 // FA_MAXD
)

// flashEligible reports whether attentionFlash takes a prefill: more than splitMaxQueries queries, a
// bf16 q whose rows are 4-byte aligned (the kernel reads element pairs), head dim 64 or 128 and whole
// query groups.
func (b *Backend) flashEligible(qt *tensor, heads, kvHeads, D, T int) bool {
	return !b.noFlash && qt.dt == BF16 && qt.off%4 == 0 && (D == 64 || D == flashMaxD) &&
		T > splitMaxQueries && kvHeads > 0 && heads%kvHeads == 0
}

// attentionFlash is FlashAttention-2 forward on tensor cores: block (query tile, head) holds 64 query
// rows' Q in registers and walks the keys they may see in tiles of 64 staged in shared memory (K and V
// of one tile, 34 KiB static), S = Q·Kᵀ and O += P·V by mma.sync with bf16 operands, and an online
// softmax in float32. The result equals the attention kernel's up to bf16 rounding of P.
func (b *Backend) attentionFlash(qt *tensor, c *kvCache, pbuf *buffer, out *tensor, window backend.Window, scale float32) error {
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	return b.stream.launch(b.k.attentionFlash, dim3{uint32(ceilDiv(T, flashRows)), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		qt, c.dtab, c.pool.size, pbuf, out, int(out.dt), T, heads, c.pool.kvHeads, D, window.Chunk, c.table.First(), scale)
}
