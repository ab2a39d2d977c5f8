package cuda

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// maxHeadDim is the largest head dimension the attention kernel takes (ATT_MAXD in attention.cu).
const maxHeadDim = 256

// kvCache is the cuda KVCache: bf16 keys and values [capacity, kvHeads, headDim] indexed by absolute
// position. A chunked cache drops positions the way the cpu cache does (at the start of each Append,
// those before the chunk of the last position appended so far), but only logically: Kept and the
// checks in Attention follow the drops, while the memory stays allocated for the whole capacity.
type kvCache struct {
	b                *Backend
	kvHeads, headDim int
	positions        backend.KVPositions
	k, v             *buffer
}

var _ backend.KVCache = (*kvCache)(nil)

// NewKVCache makes an empty bf16 cache for kvHeads heads of headDim and positions below capacity. Its
// memory (2·capacity·kvHeads·headDim·2 bytes) is allocated now. The cache is not safe for concurrent
// use.
func (b *Backend) NewKVCache(kvHeads, headDim, capacity int, window backend.Window) (backend.KVCache, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if kvHeads <= 0 || headDim <= 0 || capacity <= 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cuda: new kv cache kvHeads=%d headDim=%d capacity=%d chunk=%d: %w",
			kvHeads, headDim, capacity, window.Chunk, backend.ErrShape)
	}
	n, ok := numel([]int{capacity, kvHeads, headDim})
	if !ok {
		return nil, fmt.Errorf("cuda: new kv cache of %d×%d×%d: %w", capacity, kvHeads, headDim, backend.ErrShape)
	}
	c := &kvCache{b: b, kvHeads: kvHeads, headDim: headDim, positions: backend.KVPositions{Window: window, Capacity: capacity}}
	var err error
	if c.k, err = b.pool.getDedicated(int64(n) * 2); err != nil {
		return nil, err
	}
	c.k = b.pool.owned(c.k)
	if c.v, err = b.pool.getDedicated(int64(n) * 2); err != nil {
		return nil, err
	}
	c.v = b.pool.owned(c.v)
	return c, nil
}

// Len returns the number of positions appended so far.
func (c *kvCache) Len() int { return c.positions.Len() }

// Kept returns the number of positions attention may still read.
func (c *kvCache) Kept() int { return c.positions.Kept() }

// Append stores k and v ([T, kvHeads, headDim], any dtype, converted to bf16) for positions pos, which
// must be consecutive, start where the previous Append ended (any position >= 0 for the first) and stay
// below the capacity. On error the cache is unchanged.
func (c *kvCache) Append(k, v backend.Tensor, pos []int) error {
	b := c.b
	kt, err := b.asTensor("kv append", "k", k)
	if err != nil {
		return err
	}
	vt, err := b.asTensor("kv append", "v", v)
	if err != nil {
		return err
	}
	ok := func(s []int) bool {
		return len(s) == 3 && s[0] == len(pos) && s[1] == c.kvHeads && s[2] == c.headDim
	}
	if !ok(kt.shape) || !ok(vt.shape) {
		return fmt.Errorf("cuda: kv append k%v v%v pos[%d] to a cache of [%d %d]: %w",
			kt.shape, vt.shape, len(pos), c.kvHeads, c.headDim, backend.ErrShape)
	}
	if err := c.positions.CheckAppend(pos); err != nil {
		return fmt.Errorf("cuda: %w", err)
	}
	if len(pos) == 0 {
		return nil
	}
	stride := c.kvHeads * c.headDim
	n := len(pos) * stride
	if err := b.stream.launch(b.k.kvAppend, elemGrid(n), elemBlockDim, 0, kt, int(kt.dt), vt, int(vt.dt),
		c.k, c.v, int64(pos[0])*int64(stride), int64(n)); err != nil {
		return fmt.Errorf("cuda: kv append: %w", err)
	}
	c.positions.Append(pos) // the memory covers every position; dropping is only logical
	return nil
}

// Attention computes softmax(q·kᵀ·scale)·v for q [T, heads, D] at positions pos over the keys of cache
// each query may see under window, query head h reading kv head h / (heads / kvHeads): an online softmax
// in float32 over the bf16 cache, for at most splitMaxQueries queries split over the keys
// (attentionSplit), else one block per (query, head). Each query position must be held by
// the cache, and so must every key it may see. D is at most 256.
func (b *Backend) Attention(q backend.Tensor, cache backend.KVCache, pos []int, window backend.Window, scale float32) (backend.Tensor, error) {
	qt, err := b.asTensor("attention", "q", q)
	if err != nil {
		return nil, err
	}
	c, ok := cache.(*kvCache)
	if !ok || c == nil || c.b != b {
		return nil, fmt.Errorf("cuda: attention: cache is a %T of another backend: %w", cache, ErrForeign)
	}
	if len(qt.shape) != 3 || qt.shape[0] != len(pos) || qt.shape[2] != c.headDim || qt.shape[1] == 0 ||
		qt.shape[1]%c.kvHeads != 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cuda: attention q%v pos[%d] cache [%d %d] chunk %d: %w",
			qt.shape, len(pos), c.kvHeads, c.headDim, window.Chunk, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	if D > maxHeadDim {
		return nil, fmt.Errorf("cuda: attention head dim %d > %d is not supported: %w", D, maxHeadDim, backend.ErrShape)
	}
	if err := c.positions.CheckAttend(pos, window); err != nil {
		return nil, fmt.Errorf("cuda: %w", err)
	}
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	if T == 0 {
		return out, nil
	}
	pb, err := int32Bytes("pos", pos)
	if err != nil {
		return nil, err
	}
	pbuf, err := b.temp(pb)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*pbuf)
	if T <= splitMaxQueries && heads/c.kvHeads <= splitMaxGroup && D%2 == 0 {
		err = b.attentionSplit(qt, c, pos, pbuf, out, window, scale)
		return b.result("attention", out, err)
	}
	err = b.stream.launch(b.k.attention, dim3{uint32(T), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		qt, int(qt.dt), c.k, c.v, pbuf, out, int(out.dt), heads, c.kvHeads, D, window.Chunk, c.positions.First(), scale)
	return b.result("attention", out, err)
}

// Split-K decode attention (attention_split and attention_combine in attention.cu).
const (
	splitMaxQueries = 8    // Attention takes the split path for at most this many queries
	splitMaxGroup   = 8    // and at most this many query heads per kv head (ATTS_MAXG)
	splitMinSpan    = 32   // keys per split at least (8 per warp)
	splitMaxSplits  = 1024 // ATTC_MAXSPLITS
)

// attentionSplit is flash-decoding: the visible key range of each query is cut into splits of span
// keys; block (split, kv head, query) runs the online softmax for all query heads of its kv head over
// its split (K/V read once per group) and writes float32 partials (max, sum, Σ e·v), and
// attention_combine merges the splits with the log-sum-exp rule, in split order (deterministic). The
// number of splits aims at about 2 blocks per SM.
func (b *Backend) attentionSplit(qt *tensor, c *kvCache, pos []int, pbuf *buffer, out *tensor, window backend.Window, scale float32) error {
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	first := c.positions.First()
	maxN := 1
	for _, p := range pos {
		from := 0
		if window.Chunk > 0 {
			from = p - p%window.Chunk
		}
		from = max(from, first)
		maxN = max(maxN, p-from+1)
	}
	target := 2 * max(b.dev.multiprocessors, 1)
	splits := max(ceilDiv(target, T*c.kvHeads), 1)
	span := max(ceilDiv(maxN, splits), splitMinSpan)
	span = max(span, ceilDiv(maxN, splitMaxSplits))
	splits = ceilDiv(maxN, span)
	rows := int64(T) * int64(heads) * int64(splits)
	ml, err := b.pool.get(rows * 2 * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*ml)
	acc, err := b.pool.get(rows * int64(D) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*acc)
	if err := b.stream.launch(b.k.attentionSplit, dim3{uint32(splits), uint32(c.kvHeads), uint32(T)}, dim3{128, 1, 1}, 0,
		qt, int(qt.dt), c.k, c.v, pbuf, ml, acc, heads, c.kvHeads, D, window.Chunk, first, scale, splits, span); err != nil {
		return err
	}
	return b.stream.launch(b.k.attentionCombine, dim3{uint32(T), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		ml, acc, out, int(out.dt), heads, D, splits)
}
