package cpu

import (
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/backend"
)

// blockPool is the cpu BlockPool: blocks of [2, blockSize, kvHeads, headDim] float32 (keys, then
// values) in slabs that are never moved, so a growing pool keeps its blocks where they are.
type blockPool struct {
	kvHeads, headDim, size int
	ids                    *backend.BlockIDs
	slabs                  [][]float32
	perSlab                []int // first block id of each slab
}

var _ backend.BlockPool = (*blockPool)(nil)

// NewBlockPool makes a pool of blocks blocks of blockSize positions for kvHeads heads of headDim, or a
// growing one (blocks == 0) that adds slabs of at least 16 blocks, doubling, as caches need them. It is
// not safe for concurrent use (one goroutine drives a backend).
func (b *Backend) NewBlockPool(kvHeads, headDim, blockSize, blocks int) (backend.BlockPool, error) {
	if kvHeads <= 0 || headDim <= 0 || blockSize <= 0 || blocks < 0 {
		return nil, fmt.Errorf("cpu: new kv block pool kvHeads=%d headDim=%d block size=%d blocks=%d: %w",
			kvHeads, headDim, blockSize, blocks, backend.ErrShape)
	}
	p := &blockPool{kvHeads: kvHeads, headDim: headDim, size: blockSize}
	ids, err := backend.NewBlockIDs(blocks, func(total, n int) error {
		p.perSlab = append(p.perSlab, total)
		p.slabs = append(p.slabs, make([]float32, n*p.blockLen()))
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("cpu: %w", err)
	}
	p.ids = ids
	return p, nil
}

func (p *blockPool) BlockSize() int           { return p.size }
func (p *blockPool) Usage() (used, total int) { return p.ids.Usage() }

// blockLen is the float32s of one block: keys and values of size positions.
func (p *blockPool) blockLen() int { return 2 * p.size * p.kvHeads * p.headDim }

// block returns block id's keys and values, each [size, kvHeads, headDim].
func (p *blockPool) block(id int) (k, v []float32) {
	s := len(p.perSlab) - 1
	for p.perSlab[s] > id {
		s--
	}
	n := p.blockLen()
	off := (id - p.perSlab[s]) * n
	blk := p.slabs[s][off : off+n]
	return blk[:n/2], blk[n/2:]
}

// kvCache is the cpu KVCache: a block table over a blockPool.
type kvCache struct {
	pool  *blockPool
	table backend.BlockTable
}

var _ backend.KVCache = (*kvCache)(nil)

// NewKVCache makes an empty cache in pool's blocks for positions below capacity. A chunked cache
// (window.Chunk > 0) drops positions as backend.KVPositions says and returns the blocks that hold only
// dropped positions. The returned cache is not safe for concurrent use.
func (b *Backend) NewKVCache(pool backend.BlockPool, capacity int, window backend.Window) (backend.KVCache, error) {
	p, ok := pool.(*blockPool)
	if !ok || p == nil {
		return nil, fmt.Errorf("cpu: new kv cache: pool is a %T: %w", pool, ErrForeign)
	}
	t, err := backend.NewBlockTable(p.size, capacity, window)
	if err != nil {
		return nil, fmt.Errorf("cpu: new kv cache: %w", err)
	}
	return &kvCache{pool: p, table: t}, nil
}

// Len returns the number of positions appended so far.
func (c *kvCache) Len() int { return c.table.Len() }

// Kept returns the number of positions held in memory.
func (c *kvCache) Kept() int { return c.table.Kept() }

// Free returns the cache's blocks to its pool.
func (c *kvCache) Free() { c.table.Free(c.pool.ids) }

// Append stores k and v ([T, kvHeads, headDim]) for positions pos, which must be consecutive, start
// where the previous Append ended (any position >= 0 for the first) and stay below the capacity. On
// error (bad shapes, positions, or an exhausted pool: backend.ErrNoBlocks) the cache is unchanged.
func (c *kvCache) Append(k, v backend.Tensor, pos []int) error {
	kt, err := asTensor("kv append", "k", k)
	if err != nil {
		return err
	}
	vt, err := asTensor("kv append", "v", v)
	if err != nil {
		return err
	}
	p := c.pool
	ok := func(s []int) bool {
		return len(s) == 3 && s[0] == len(pos) && s[1] == p.kvHeads && s[2] == p.headDim
	}
	if !ok(kt.shape) || !ok(vt.shape) {
		return fmt.Errorf("cpu: kv append k%v v%v pos[%d] to a cache of [%d %d]: %w",
			kt.shape, vt.shape, len(pos), p.kvHeads, p.headDim, backend.ErrShape)
	}
	if err := c.table.CheckAppend(pos); err != nil {
		return fmt.Errorf("cpu: %w", err)
	}
	if _, err := c.table.Append(p.ids, pos); err != nil {
		return fmt.Errorf("cpu: kv append: %w", err)
	}
	stride := p.kvHeads * p.headDim
	for i, q := range pos {
		id, row := c.table.Block(q)
		kb, vb := p.block(id)
		copy(kb[row*stride:(row+1)*stride], kt.data[i*stride:(i+1)*stride])
		copy(vb[row*stride:(row+1)*stride], vt.data[i*stride:(i+1)*stride])
	}
	return nil
}

// Attention computes softmax(q·kᵀ·scale)·v for q [T, heads, D] at positions pos over the keys of cache
// each query may see under window, query head h reading kv head h / (heads / kvHeads). Scores are float32
// dot products; the softmax subtracts the row maximum and sums the exponentials in float64. Each query
// position must be held by the cache, and so must every key it may see: attending with a wider window
// than the cache keeps is an error once the cache has dropped positions. Work is split over
// (query, head) pairs.
func (b *Backend) Attention(q backend.Tensor, cache backend.KVCache, pos []int, window backend.Window, scale float32) (backend.Tensor, error) {
	qt, err := asTensor("attention", "q", q)
	if err != nil {
		return nil, err
	}
	c, ok := cache.(*kvCache)
	if !ok || c == nil {
		return nil, fmt.Errorf("cpu: attention: cache is a %T: %w", cache, ErrForeign)
	}
	pl := c.pool
	if len(qt.shape) != 3 || qt.shape[0] != len(pos) || qt.shape[2] != pl.headDim || qt.shape[1] == 0 ||
		qt.shape[1]%pl.kvHeads != 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cpu: attention q%v pos[%d] cache [%d %d] chunk %d: %w",
			qt.shape, len(pos), pl.kvHeads, pl.headDim, window.Chunk, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	if err := c.table.CheckAttend(pos, window); err != nil {
		return nil, fmt.Errorf("cpu: %w", err)
	}
	first, kept := c.table.First(), c.table.Kept()
	group := heads / pl.kvHeads
	stride := pl.kvHeads * D
	// The keys and values of each held block, by logical block, looked up once.
	keys, vals := make([][]float32, len(c.table.IDs)), make([][]float32, len(c.table.IDs))
	for blk, id := range c.table.IDs {
		if id >= 0 {
			keys[blk], vals[blk] = pl.block(id)
		}
	}
	bs := pl.size
	out := alloc(T, heads, D)
	items := T * heads
	b.parallel(items, b.grain(items, 2*kept*D), func(lo, hi int) {
		scores := make([]float32, kept)
		for it := lo; it < hi; it++ {
			t, h := it/heads, it%heads
			p := pos[t]
			from := first
			if window.Chunk > 0 {
				from = max(from, p-p%window.Chunk)
			}
			qv := qt.data[it*D : (it+1)*D]
			kvOff := (h / group) * D
			s := scores[:p-from+1]
			m := float32(math.Inf(-1))
			for j := range s {
				key := from + j
				off := (key%bs)*stride + kvOff
				s[j] = dot(qv, keys[key/bs][off:off+D]) * scale
				m = max(m, s[j])
			}
			var sum float64
			for j, v := range s {
				e := math.Exp(float64(v - m))
				s[j] = float32(e)
				sum += e
			}
			inv := 1 / sum
			o := out.data[it*D : (it+1)*D]
			for j, e := range s {
				key := from + j
				off := (key%bs)*stride + kvOff
				axpy(o, float32(float64(e)*inv), vals[key/bs][off:off+D])
			}
		}
	})
	return out, nil
}
