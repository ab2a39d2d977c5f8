package cuda

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

// maxHeadDim is the largest head dimension the attention kernel takes (ATT_MAXD in attention.cu).
const maxHeadDim = 256

// blockPool is the cuda BlockPool: blocks of [2, blockSize, kvHeads, headDim] bf16 (keys, then values)
// in slabs of device memory that never move, so a growing pool keeps its blocks where they are. A block
// is named to the kernels by its device address (the block tables hold addresses).
type blockPool struct {
	b                      *Backend
	kvHeads, headDim, size int
	ids                    *backend.BlockIDs
	slabs                  []*buffer
	perSlab                []int // first block id of each slab
}

var _ backend.BlockPool = (*blockPool)(nil)

// NewBlockPool makes a pool of blocks blocks of blockSize positions for kvHeads heads of headDim,
// allocated now, or a growing one (blocks == 0) that allocates slabs of at least 16 blocks, doubling,
// as caches need them. A growing pool that must grow inside a recorded step makes the step run eagerly
// (the allocation cannot be recorded); the next step records again.
func (b *Backend) NewBlockPool(kvHeads, headDim, blockSize, blocks int) (backend.BlockPool, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if kvHeads <= 0 || headDim <= 0 || blockSize <= 0 || blocks < 0 {
		return nil, fmt.Errorf("cuda: new kv block pool kvHeads=%d headDim=%d block size=%d blocks=%d: %w",
			kvHeads, headDim, blockSize, blocks, backend.ErrShape)
	}
	if _, ok := numel([]int{2, blockSize, kvHeads, headDim, max(blocks, 1)}); !ok {
		return nil, fmt.Errorf("cuda: kv block pool of %d blocks of %d×%d×%d: %w", blocks, blockSize, kvHeads, headDim, backend.ErrShape)
	}
	p := &blockPool{b: b, kvHeads: kvHeads, headDim: headDim, size: blockSize}
	ids, err := backend.NewBlockIDs(blocks, p.grow)
	if err != nil {
		return nil, fmt.Errorf("cuda: %w", err)
	}
	p.ids = ids
	return p, nil
}

// grow allocates a slab for blocks total .. total+n-1.
func (p *blockPool) grow(total, n int) error {
	if r := p.b.rec; r != nil {
		return r.fail(fmt.Errorf("%w: the kv block pool grows", errReplayDiff))
	}
	buf, err := p.b.pool.getDedicated(int64(n) * p.blockBytes())
	if err != nil {
		return err
	}
	p.slabs = append(p.slabs, p.b.pool.owned(buf))
	p.perSlab = append(p.perSlab, total)
	return nil
}

func (p *blockPool) BlockSize() int           { return p.size }
func (p *blockPool) Usage() (used, total int) { return p.ids.Usage() }

// blockBytes is the size of one block: keys and values of size positions in bf16.
func (p *blockPool) blockBytes() int64 {
	return 2 * int64(p.size) * int64(p.kvHeads) * int64(p.headDim) * 2
}

// addr is block id's device address.
func (p *blockPool) addr(id int) devptr {
	s := len(p.perSlab) - 1
	for p.perSlab[s] > id {
		s--
	}
	return p.slabs[s].ptr + devptr(int64(id-p.perSlab[s])*p.blockBytes())
}

// kvCache is the cuda KVCache: a block table over a blockPool, on the host (backend.BlockTable) and on the
// device (table: one int64 block address per logical block, ceil(capacity / block size) of them, written
// by kv_append as positions are appended). A chunked cache drops positions the way the cpu cache does
// and returns the blocks that hold only dropped positions; their table entries are never read again.
type kvCache struct {
	b     *Backend
	pool  *blockPool
	table backend.BlockTable
	dtab  *buffer
}

var _ backend.KVCache = (*kvCache)(nil)

// NewKVCache makes an empty cache in pool's blocks for positions below capacity; its device block table
// (8 bytes per block of capacity) is allocated now, its blocks as positions are appended. The cache is
// not safe for concurrent use.
func (b *Backend) NewKVCache(pool backend.BlockPool, capacity int, window backend.Window) (backend.KVCache, error) {
	if b.closed {
		return nil, ErrClosed
	}
	p, ok := pool.(*blockPool)
	if !ok || p == nil || p.b != b {
		return nil, fmt.Errorf("cuda: new kv cache: pool is a %T of another backend: %w", pool, ErrForeign)
	}
	t, err := backend.NewBlockTable(p.size, capacity, window)
	if err != nil {
		return nil, fmt.Errorf("cuda: new kv cache: %w", err)
	}
	dtab, err := b.pool.getDedicated(8 * int64(ceilDiv(capacity, p.size)))
	if err != nil {
		return nil, err
	}
	return &kvCache{b: b, pool: p, table: t, dtab: b.pool.owned(dtab)}, nil
}

// Len returns the number of positions appended so far.
func (c *kvCache) Len() int { return c.table.Len() }

// Kept returns the number of positions attention may still read.
func (c *kvCache) Kept() int { return c.table.Kept() }

// Free returns the cache's blocks to its pool. Work already enqueued that reads them runs before any
// later use of them (one stream).
func (c *kvCache) Free() { c.table.Free(c.pool.ids) }

// kvRow is one row of keys/values to append, or one query, as kv_append and attention_split read it from
// device memory (KV_ROW int64 words in attention.cu): its cache's device block table and block size, the
// cache's first kept position, the row's position and the block that holds it. Passing these as data
// rather than launch parameters lets one launch serve the rows of several sequences (AttendBatch) and
// keeps a decode step's launches the same whatever its sequences, positions and blocks, so a recorded
// step (a CUDA graph) replays for all of them.
type kvRow struct {
	c   *kvCache
	pos int
}

const kvRowWords = 5 // KV_ROW

// uploadRows uploads rows for kv_append or attention_split, followed by extra zero bytes; the table is
// read now, so upload rows after the host Append of their positions.
func (b *Backend) uploadRows(rows []kvRow, extra int) (*buffer, error) {
	m := make([]byte, 8*kvRowWords*len(rows)+extra)
	for i, r := range rows {
		w := m[8*kvRowWords*i:]
		var blk devptr
		if id, _ := r.c.table.Block(r.pos); id >= 0 {
			blk = r.c.pool.addr(id)
		}
		binary.LittleEndian.PutUint64(w[0:], uint64(r.c.dtab.ptr))
		binary.LittleEndian.PutUint64(w[8:], uint64(r.c.pool.size))
		binary.LittleEndian.PutUint64(w[16:], uint64(r.c.table.First()))
		binary.LittleEndian.PutUint64(w[24:], uint64(r.pos))
		binary.LittleEndian.PutUint64(w[32:], uint64(blk))
	}
	return b.temp(m)
}

// appendRows converts k and v [T, kvHeads, D] into the caches and positions rows names, in one launch.
func (b *Backend) appendRows(kt, vt *tensor, rows []kvRow) error {
	meta, err := b.uploadRows(rows, 0)
	if err != nil {
		return err
	}
	defer b.pool.release(*meta)
	stride := kt.shape[1] * kt.shape[2]
	n := len(rows) * stride
	return b.stream.launch(b.k.kvAppend, elemGrid(n), elemBlockDim, 0, kt, int(kt.dt), vt, int(vt.dt),
		meta, int64(stride), int64(n))
}

// reserve takes the blocks pos needs and records pos as appended (backend.BlockTable.Append),
// restorably while a step is recorded or replayed.
func (c *kvCache) reserve(pos []int) error {
	u, err := c.table.Append(c.pool.ids, pos)
	if err != nil {
		return err
	}
	if r := c.b.rec; r != nil { // a recorded step may be undone and run again
		r.onUndo(func() { c.table.Undo(c.pool.ids, u) })
	}
	return nil
}

// Append stores k and v ([T, kvHeads, headDim], any dtype, converted to bf16) for positions pos, which
// must be consecutive, start where the previous Append ended (any position >= 0 for the first) and stay
// below the capacity. On error (bad shapes or positions, an exhausted pool: backend.ErrNoBlocks) the
// cache is unchanged.
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
	if err := c.checkAppend(kt, vt, pos); err != nil {
		return err
	}
	if len(pos) == 0 {
		return nil
	}
	if err := c.reserve(pos); err != nil {
		return fmt.Errorf("cuda: kv append: %w", err)
	}
	rows := make([]kvRow, len(pos))
	for i, p := range pos {
		rows[i] = kvRow{c, p}
	}
	if err := b.appendRows(kt, vt, rows); err != nil {
		return fmt.Errorf("cuda: kv append: %w", err)
	}
	return nil
}

// checkAppend checks k and v [len(pos), kvHeads, headDim] and the positions.
func (c *kvCache) checkAppend(kt, vt *tensor, pos []int) error {
	ok := func(s []int) bool {
		return len(s) == 3 && s[0] == len(pos) && s[1] == c.pool.kvHeads && s[2] == c.pool.headDim
	}
	if !ok(kt.shape) || !ok(vt.shape) {
		return fmt.Errorf("cuda: kv append k%v v%v pos[%d] to a cache of [%d %d]: %w",
			kt.shape, vt.shape, len(pos), c.pool.kvHeads, c.pool.headDim, backend.ErrShape)
	}
	if err := c.table.CheckAppend(pos); err != nil {
		return fmt.Errorf("cuda: %w", err)
	}
	return nil
}

// Attention computes softmax(q·kᵀ·scale)·v for q [T, heads, D] at positions pos over the keys of cache
// each query may see under window, query head h reading kv head h / (heads / kvHeads): an online softmax
// in float32 over the bf16 cache; for at most splitMaxQueries queries split over the keys (attendDecode),
// else the prefill kernels (attention_flash, or one block per (query, head)). Each query position must be
// held by the cache, and so must every key it may see. D is at most 256.
func (b *Backend) Attention(q backend.Tensor, cache backend.KVCache, pos []int, window backend.Window, scale float32) (backend.Tensor, error) {
	qt, err := b.asTensor("attention", "q", q)
	if err != nil {
		return nil, err
	}
	c, ok := cache.(*kvCache)
	if !ok || c == nil || c.b != b {
		return nil, fmt.Errorf("cuda: attention: cache is a %T of another backend: %w", cache, ErrForeign)
	}
	kvHeads := c.pool.kvHeads
	if len(qt.shape) != 3 || qt.shape[0] != len(pos) || qt.shape[2] != c.pool.headDim || qt.shape[1] == 0 ||
		qt.shape[1]%kvHeads != 0 || window.Chunk < 0 {
		return nil, fmt.Errorf("cuda: attention q%v pos[%d] cache [%d %d] chunk %d: %w",
			qt.shape, len(pos), kvHeads, c.pool.headDim, window.Chunk, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	if D > maxHeadDim {
		return nil, fmt.Errorf("cuda: attention head dim %d > %d is not supported: %w", D, maxHeadDim, backend.ErrShape)
	}
	if err := c.table.CheckAttend(pos, window); err != nil {
		return nil, fmt.Errorf("cuda: %w", err)
	}
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	if T == 0 {
		return out, nil
	}
	if splitEligible(T, heads, kvHeads, D) {
		rows := make([]kvRow, T)
		for i, p := range pos {
			rows[i] = kvRow{c, p}
		}
		err = b.attendDecode(qt, kvHeads, rows, out, window, scale)
		return b.result("attention", out, err)
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
	if b.flashEligible(qt, heads, kvHeads, D, T) {
		err = b.attentionFlash(qt, c, pbuf, out, window, scale)
		return b.result("attention", out, err)
	}
	err = b.stream.launch(b.k.attention, dim3{uint32(T), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		qt, int(qt.dt), c.dtab, c.pool.size, pbuf, out, int(out.dt), heads, kvHeads, D, window.Chunk, c.table.First(), scale)
	return b.result("attention", out, err)
}

// splitEligible reports whether T queries of heads query heads over kvHeads of dimension D take the split
// path.
func splitEligible(T, heads, kvHeads, D int) bool {
	return T <= splitMaxQueries && heads/kvHeads <= splitMaxGroup && D%2 == 0
}

// Split-K decode attention: attention_decode (flash.cu) for the shapes it takes, else attention_split and
// attention_combine (attention.cu).
const (
	defaultSplitPerSM = 4    // attention_decode blocks per SM (its __launch_bounds__ minimum: all resident at once)
	legacySplitPerSM  = 2    // attention_split blocks per SM: more splits shorten each warp's walk but lengthen the combine
	splitMaxQueries   = 8    // Attention takes the split path for at most this many queries
	splitMaxGroup     = 8    // and at most this many query heads per kv head (ATTS_MAXG, AD_MAXG)
	splitMaxSplits    = 1024 // ATTC_MAXSPLITS
	decodeMaxRows     = 512  // queries per attention_decode launch (AD_MAXT)
	decodeThreads     = 128  // attention_decode's block (AD_WARPS warps)
	// defaultDecodeMinTiles is the fewest 16-key tiles an attention_decode block takes (its minb;
	// Backend.decodeMinTiles): a segment cut into many short pieces costs a long serial merge in the block
	// that finishes it. On an H100 one 4096-key query over Scout's 8 kv heads took 82 µs at 4 tiles a block
	// (64 pieces a segment), against 29 µs on attention_split. The kernel takes at least AD_MINT (4).
	defaultDecodeMinTiles = 16
)

// decodeEligible reports whether attention_decode takes queries of heads query heads over kvHeads of
// dimension D (a multiple of 16 up to 128; at most 8 query heads a kv head). The others take
// attention_split.
func (b *Backend) decodeEligible(heads, kvHeads, D int) bool {
	return !b.noDecode && (D == 16 || D == 32 || D == 64 || D == 128) && heads/kvHeads <= splitMaxGroup
}

// attendDecode is decode attention for the queries rows names (several sequences, or a few queries of one)
// in one launch: attentionDecode where the shape allows, else attentionSplit.
func (b *Backend) attendDecode(qt *tensor, kvHeads int, rows []kvRow, out *tensor, window backend.Window, scale float32) error {
	if b.decodeEligible(qt.shape[1], kvHeads, qt.shape[2]) {
		return b.attentionDecode(qt, kvHeads, rows, out, window, scale)
	}
	return b.attentionSplit(qt, kvHeads, rows, out, window, scale)
}

// attentionDecode is flash-decoding on tensor cores with the keys split by the total work
// (attention_decode in flash.cu): the visible keys of every (query, kv head) are cut into 16-key tiles,
// and the launch's tiles, all queries' together, are dealt out to a fixed grid of b.splitPerSM blocks per
// SM in equal contiguous ranges of at least b.decodeMinTiles tiles, so a batch of short contexts and one
// long context both keep every SM reading K/V, and a short context's keys (at most 64) stay in one block. The kernel computes the ranges
// from the positions it reads, so the launch is the same at any context length (recorded steps replay).
// A query's keys cut over several blocks are merged, in block order, by the block that finishes last (a
// counter per (query, kv head), zeroed by the upload that carries the rows); no second kernel. Query t
// reads the cache and position of rows[t]; at most decodeMaxRows queries a launch.
func (b *Backend) attentionDecode(qt *tensor, kvHeads int, rows []kvRow, out *tensor, window backend.Window, scale float32) error {
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	blocks := max(b.splitPerSM, 1) * max(b.dev.multiprocessors, 1)
	ss := decodeSlotFloats(heads/kvHeads, D)
	part, err := b.pool.get(int64(2*blocks) * int64(ss) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*part)
	for t0 := 0; t0 < T; t0 += decodeMaxRows {
		n := min(decodeMaxRows, T-t0)
		meta, err := b.uploadRows(rows[t0:t0+n], 4*n*kvHeads) // the rows, then a zeroed counter per segment
		if err != nil {
			return err
		}
		err = b.stream.launch(b.k.attentionDecode, dim3{uint32(blocks), 1, 1}, dim3{decodeThreads, 1, 1}, 0,
			qt, int(qt.dt), meta, meta.ptr+devptr(8*kvRowWords*n), n, t0, part, ss, out, int(out.dt), heads, kvHeads, D,
			window.Chunk, scale, b.decodeMinTiles)
		b.pool.release(*meta)
		if err != nil {
			return err
		}
	}
	return nil
}

// decodeSlotFloats is the size of one attention_decode partial (G×D sums and G (max, sum) pairs), rounded
// to 128 bytes so that no two slots share a cache line.
func decodeSlotFloats(G, D int) int { return (G*(D+2) + 31) / 32 * 32 }

// attentionSplit is flash-decoding: the visible key range of each query is cut into splits; block
// (split, kv head, query) runs the online softmax for all query heads of its kv head over its split (K/V
// read once per group) and writes float32 partials (max, sum, Σ e·v), and attention_combine merges the
// splits with the log-sum-exp rule, in split order (deterministic). Query t reads the cache and position
// of rows[t], so the queries may come from several sequences. The number of splits aims at
// legacySplitPerSM blocks per SM and depends only on the shapes; the kernel sizes the spans from the positions it
// reads, so the launches are the same at every context length.
func (b *Backend) attentionSplit(qt *tensor, kvHeads int, rows []kvRow, out *tensor, window backend.Window, scale float32) error {
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	target := legacySplitPerSM * max(b.dev.multiprocessors, 1)
	splits := min(max(ceilDiv(target, T*kvHeads), 1), splitMaxSplits)
	meta, err := b.uploadRows(rows, 0)
	if err != nil {
		return err
	}
	defer b.pool.release(*meta)
	parts := int64(T) * int64(heads) * int64(splits)
	ml, err := b.pool.get(parts * 2 * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*ml)
	acc, err := b.pool.get(parts * int64(D) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*acc)
	kern, threads := b.k.attentionSplit, uint32(128)
	if D <= 128 { // attention_split_128_gM for the smallest group size M that holds heads/kvHeads
		for i, g := range [...]int{1, 2, 4, 5, 8} {
			if heads/kvHeads <= g {
				kern, threads = b.k.attentionSplit128[i], 256 // ATTS_WARPS_128 warps
				break
			}
		}
	}
	if err := b.stream.launch(kern, dim3{uint32(splits), uint32(kvHeads), uint32(T)}, dim3{threads, 1, 1}, 0,
		qt, int(qt.dt), meta, ml, acc, heads, kvHeads, D, window.Chunk, scale, splits); err != nil {
		return err
	}
	return b.stream.launch(b.k.attentionCombine, dim3{uint32(T), uint32(heads), 1}, dim3{128, 1, 1}, 0,
		ml, acc, out, int(out.dt), heads, D, splits)
}

var _ backend.BatchAttender = (*Backend)(nil)

// AttendBatch appends and attends the rows of several sequences (backend.BatchAttender). When every
// span has at most splitMaxQueries rows (decode), it takes one kv_append launch and one split attention
// over all rows (attendDecode), whatever the number of sequences; otherwise each span goes through Append
// and Attention. On attention_decode a context of at most 64 keys gives the same values either way; a
// longer one may be cut over the blocks differently when it is attended with others (the split follows
// the batch's total work), which changes its values only by float32 summation order.
func (b *Backend) AttendBatch(q, k, v backend.Tensor, spans []backend.AttendSpan, window backend.Window, scale float32) (backend.Tensor, error) {
	return b.attendBatch(q, k, v, spans, window, scale, nil)
}

// attendBatch is AttendBatch with q and k under tr first, when tr is not nil (AttendBatchQK, qkv.go).
func (b *Backend) attendBatch(q, k, v backend.Tensor, spans []backend.AttendSpan, window backend.Window, scale float32,
	tr *backend.QKTransform) (backend.Tensor, error) {
	qt, err := b.asTensor("attend batch", "q", q)
	if err != nil {
		return nil, err
	}
	kt, err := b.asTensor("attend batch", "k", k)
	if err != nil {
		return nil, err
	}
	vt, err := b.asTensor("attend batch", "v", v)
	if err != nil {
		return nil, err
	}
	if len(qt.shape) != 3 || len(kt.shape) != 3 || !slices.Equal(kt.shape, vt.shape) || kt.shape[0] != qt.shape[0] ||
		kt.shape[2] != qt.shape[2] || window.Chunk < 0 || len(spans) == 0 {
		return nil, fmt.Errorf("cuda: attend batch q%v k%v v%v, %d spans, chunk %d: %w", qt.shape, kt.shape, vt.shape, len(spans), window.Chunk, backend.ErrShape)
	}
	T, heads, kvHeads, D := qt.shape[0], qt.shape[1], kt.shape[1], qt.shape[2]
	caches := make([]*kvCache, len(spans))
	small, next := true, 0
	for i, sp := range spans {
		c, ok := sp.Cache.(*kvCache)
		if !ok || c == nil || c.b != b {
			return nil, fmt.Errorf("cuda: attend batch: span %d's cache is a %T of another backend: %w", i, sp.Cache, ErrForeign)
		}
		if sp.Start != next || sp.End < sp.Start || sp.End > T || len(sp.Pos) != sp.End-sp.Start ||
			c.pool.kvHeads != kvHeads || c.pool.headDim != D || slices.Contains(caches[:i], c) {
			return nil, fmt.Errorf("cuda: attend batch: span %d rows [%d, %d) pos[%d] of %d rows, cache [%d %d], k%v: %w",
				i, sp.Start, sp.End, len(sp.Pos), T, c.pool.kvHeads, c.pool.headDim, kt.shape, backend.ErrShape)
		}
		caches[i], next = c, sp.End
		small = small && splitEligible(sp.End-sp.Start, heads, kvHeads, D)
	}
	if next != T {
		return nil, fmt.Errorf("cuda: attend batch: spans cover %d of %d rows: %w", next, T, backend.ErrShape)
	}
	if tr != nil && !(small && b.qkAppendOK(qt, kt, tr)) {
		if qt, kt, err = b.transformQK(qt, kt, spans, tr); err != nil {
			return nil, err
		}
		tr = nil
	}
	if !small {
		return b.attendEach(qt, kt, vt, spans, window, scale)
	}
	for i, sp := range spans {
		if err := caches[i].table.CheckAppend(sp.Pos); err != nil {
			return nil, fmt.Errorf("cuda: attend batch: span %d: %w", i, err)
		}
	}
	// The blocks of every span's positions, taken before the rows name them; on failure the spans
	// taken so far are undone, so no cache changes.
	undo := make([]backend.BlockAppend, 0, len(spans))
	for i, sp := range spans {
		u, err := caches[i].table.Append(caches[i].pool.ids, sp.Pos)
		if err != nil {
			for j := len(undo) - 1; j >= 0; j-- {
				caches[j].table.Undo(caches[j].pool.ids, undo[j])
			}
			return nil, fmt.Errorf("cuda: attend batch: span %d: %w", i, err)
		}
		undo = append(undo, u)
	}
	if r := b.rec; r != nil { // a recorded step may be undone and run again
		r.onUndo(func() {
			for j := len(undo) - 1; j >= 0; j-- {
				caches[j].table.Undo(caches[j].pool.ids, undo[j])
			}
		})
	}
	rows := make([]kvRow, 0, T)
	for i, sp := range spans {
		for _, p := range sp.Pos {
			rows = append(rows, kvRow{caches[i], p})
		}
	}
	if tr != nil {
		if qt, err = b.qkAppend(qt, kt, vt, rows, tr); err != nil {
			return nil, fmt.Errorf("cuda: attend batch: qk append: %w", err)
		}
	} else if err := b.appendRows(kt, vt, rows); err != nil {
		return nil, fmt.Errorf("cuda: attend batch: kv append: %w", err)
	}
	for i, sp := range spans {
		if err := caches[i].table.CheckAttend(sp.Pos, window); err != nil {
			return nil, fmt.Errorf("cuda: attend batch: span %d: %w", i, err)
		}
	}
	out, err := b.act(T, heads, D)
	if err != nil {
		return nil, err
	}
	err = b.attendDecode(qt, kvHeads, rows, out, window, scale)
	return b.result("attend batch", out, err)
}

// attendEach is AttendBatch one span at a time.
func (b *Backend) attendEach(qt, kt, vt *tensor, spans []backend.AttendSpan, window backend.Window, scale float32) (backend.Tensor, error) {
	outs := make([]backend.Tensor, len(spans))
	for i, sp := range spans {
		kr, err := b.Rows(kt, sp.Start, sp.End)
		if err != nil {
			return nil, err
		}
		vr, err := b.Rows(vt, sp.Start, sp.End)
		if err != nil {
			return nil, err
		}
		if err := sp.Cache.Append(kr, vr, sp.Pos); err != nil {
			return nil, err
		}
		qr, err := b.Rows(qt, sp.Start, sp.End)
		if err != nil {
			return nil, err
		}
		if outs[i], err = b.Attention(qr, sp.Cache, sp.Pos, window, scale); err != nil {
			return nil, err
		}
	}
	if len(outs) == 1 {
		return outs[0], nil
	}
	return b.Concat(outs...)
}
