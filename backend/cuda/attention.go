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
	capacity         int
	window           backend.Window
	k, v             *buffer

	first    int // position of the first kept entry
	next     int // position the next Append must start at, valid when appended > 0
	appended int // positions appended so far (Len)
	dropped  int // every position below it has been dropped (0 when none)
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
	c := &kvCache{b: b, kvHeads: kvHeads, headDim: headDim, capacity: capacity, window: window}
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
func (c *kvCache) Len() int { return c.appended }

// Kept returns the number of positions attention may still read.
func (c *kvCache) Kept() int {
	if c.appended == 0 {
		return 0
	}
	return c.next - c.first
}

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
	if len(pos) == 0 {
		return nil
	}
	want := pos[0]
	if c.appended > 0 {
		want = c.next
	}
	for i, p := range pos {
		if p != want+i || p < 0 || p >= c.capacity {
			return fmt.Errorf("cuda: kv append positions %d..%d (pos[%d] = %d), want consecutive from %d below capacity %d: %w",
				pos[0], pos[len(pos)-1], i, p, want, c.capacity, backend.ErrShape)
		}
	}
	stride := c.kvHeads * c.headDim
	n := len(pos) * stride
	if err := b.stream.launch(b.k.kvAppend, elemGrid(n), elemBlockDim, 0, kt, int(kt.dt), vt, int(vt.dt),
		c.k, c.v, int64(pos[0])*int64(stride), int64(n)); err != nil {
		return fmt.Errorf("cuda: kv append: %w", err)
	}
	if c.appended > 0 {
		c.drop()
	} else {
		c.first = pos[0]
	}
	c.next = pos[len(pos)-1] + 1
	c.appended += len(pos)
	return nil
}

// drop forgets the positions before the chunk of the last appended position, for a chunked cache.
func (c *kvCache) drop() {
	chunk := c.window.Chunk
	if chunk == 0 {
		return
	}
	last := c.next - 1
	start := last - last%chunk
	if start <= c.first {
		return
	}
	c.first = start
	c.dropped = start
}

// Attention computes softmax(q·kᵀ·scale)·v for q [T, heads, D] at positions pos over the keys of cache
// each query may see under window, query head h reading kv head h / (heads / kvHeads): one block per
// (query, head), an online softmax in float32 over the bf16 cache. Each query position must be held by
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
	kept := c.Kept()
	for t, p := range pos {
		from := 0
		if window.Chunk > 0 {
			from = p - p%window.Chunk
		}
		if kept == 0 || p < c.first || p >= c.next || from < c.dropped {
			return nil, fmt.Errorf("cuda: attention pos[%d] = %d (chunk %d) over a cache holding %d..%d (dropped below %d): %w",
				t, p, window.Chunk, c.first, c.first+kept-1, c.dropped, backend.ErrShape)
		}
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
	err = b.stream.launch(b.k.attention, dim3{uint32(T), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		qt, int(qt.dt), c.k, c.v, pbuf, out, int(out.dt), heads, c.kvHeads, D, window.Chunk, c.first, scale)
	return b.result("attention", out, err)
}
