package cpu

import (
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/backend"
)

// kvCache is the cpu KVCache: the keys and values of the kept positions (consecutive, from
// positions.First()).
type kvCache struct {
	kvHeads, headDim int
	positions        backend.KVPositions
	k, v             []float32 // [kept, kvHeads, headDim]
}

var _ backend.KVCache = (*kvCache)(nil)

// NewKVCache makes an empty cache for kvHeads heads of headDim and positions below capacity. A global
// cache preallocates room for capacity positions; a chunked one (window.Chunk > 0) for at most
// 2·window.Chunk and grows if a long Append needs more. The returned cache is not safe for concurrent
// use.
//
// A chunked cache drops positions as backend.KVPositions says, and frees their storage.
func (b *Backend) NewKVCache(kvHeads, headDim, capacity int, window backend.Window) (backend.KVCache, error) {
	if kvHeads <= 0 || headDim <= 0 || capacity <= 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cpu: new kv cache kvHeads=%d headDim=%d capacity=%d chunk=%d: %w",
			kvHeads, headDim, capacity, window.Chunk, backend.ErrShape)
	}
	room := capacity
	if window.Chunk > 0 {
		room = min(capacity, 2*window.Chunk)
	}
	stride := kvHeads * headDim
	return &kvCache{
		kvHeads:   kvHeads,
		headDim:   headDim,
		positions: backend.KVPositions{Window: window, Capacity: capacity},
		k:         make([]float32, 0, room*stride),
		v:         make([]float32, 0, room*stride),
	}, nil
}

// Len returns the number of positions appended so far.
func (c *kvCache) Len() int { return c.positions.Len() }

// Kept returns the number of positions held in memory.
func (c *kvCache) Kept() int { return c.positions.Kept() }

// Append stores k and v ([T, kvHeads, headDim]) for positions pos, which must be consecutive, start
// where the previous Append ended (any position >= 0 for the first) and stay below the capacity. On
// error the cache is unchanged.
func (c *kvCache) Append(k, v backend.Tensor, pos []int) error {
	kt, err := asTensor("kv append", "k", k)
	if err != nil {
		return err
	}
	vt, err := asTensor("kv append", "v", v)
	if err != nil {
		return err
	}
	ok := func(s []int) bool {
		return len(s) == 3 && s[0] == len(pos) && s[1] == c.kvHeads && s[2] == c.headDim
	}
	if !ok(kt.shape) || !ok(vt.shape) {
		return fmt.Errorf("cpu: kv append k%v v%v pos[%d] to a cache of [%d %d]: %w",
			kt.shape, vt.shape, len(pos), c.kvHeads, c.headDim, backend.ErrShape)
	}
	if err := c.positions.CheckAppend(pos); err != nil {
		return fmt.Errorf("cpu: %w", err)
	}
	if dropped := c.positions.Append(pos); dropped > 0 {
		off := dropped * c.kvHeads * c.headDim
		c.k = c.k[:copy(c.k, c.k[off:])]
		c.v = c.v[:copy(c.v, c.v[off:])]
	}
	c.k = append(c.k, kt.data...)
	c.v = append(c.v, vt.data...)
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
	if len(qt.shape) != 3 || qt.shape[0] != len(pos) || qt.shape[2] != c.headDim || qt.shape[1] == 0 ||
		qt.shape[1]%c.kvHeads != 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cpu: attention q%v pos[%d] cache [%d %d] chunk %d: %w",
			qt.shape, len(pos), c.kvHeads, c.headDim, window.Chunk, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	if err := c.positions.CheckAttend(pos, window); err != nil {
		return nil, fmt.Errorf("cpu: %w", err)
	}
	first, kept := c.positions.First(), c.positions.Kept()
	group := heads / c.kvHeads
	stride := c.kvHeads * D
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
				off := (from-first+j)*stride + kvOff
				s[j] = dot(qv, c.k[off:off+D]) * scale
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
				off := (from-first+j)*stride + kvOff
				axpy(o, float32(float64(e)*inv), c.v[off:off+D])
			}
		}
	})
	return out, nil
}
