package backend

import (
	"errors"
	"fmt"
)

// ErrNoBlocks reports a KV block pool with no free block left (a pool of a fixed block count). Appends
// that would need one fail with it, wrapped with the pool's usage, and leave the cache unchanged.
var ErrNoBlocks = errors.New("backend: kv block pool exhausted")

// BlockPool is a backend's store of KV cache blocks for layers of one shape (kvHeads heads of
// headDim): a block holds the keys and values of BlockSize consecutive positions of one cache. Caches
// made from one pool (Ops.NewKVCache) share its blocks; each keeps a block table (the block of each
// of its position ranges) and returns its blocks when it drops positions or is freed.
type BlockPool interface {
	// BlockSize is the number of positions a block holds.
	BlockSize() int
	// Usage reports the blocks held by caches and the blocks the pool has now (a growing pool's total
	// grows as needed; a fixed pool's is its block count).
	Usage() (used, total int)
}

// BlockIDs is the block accounting every BlockPool implementation shares: which block ids are free.
// Ids are 0 .. Total()-1. A fixed allocator (made with a positive limit) never grows; a growing one
// (limit 0) asks its grow function for more blocks when none is free. The zero value is not usable:
// use NewBlockIDs.
type BlockIDs struct {
	limit  int
	total  int
	free   []int  // a stack of free ids
	isFree []bool // by id
	grow   func(total, n int) error
}

// NewBlockIDs makes an allocator of blocks blocks (fixed), or of none yet when blocks is 0 (growing):
// grow(total, n) must then make room for blocks total .. total+n-1, or fail.
func NewBlockIDs(blocks int, grow func(total, n int) error) (*BlockIDs, error) {
	if blocks < 0 {
		return nil, fmt.Errorf("kv block pool of %d blocks: %w", blocks, ErrShape)
	}
	a := &BlockIDs{limit: blocks, grow: grow}
	if blocks > 0 {
		if err := grow(0, blocks); err != nil {
			return nil, err
		}
		a.add(blocks)
	}
	return a, nil
}

func (a *BlockIDs) add(n int) {
	for id := a.total + n - 1; id >= a.total; id-- {
		a.free = append(a.free, id)
		a.isFree = append(a.isFree, false)
	}
	for id := a.total; id < a.total+n; id++ {
		a.isFree[id] = true
	}
	a.total += n
}

// Usage reports the blocks taken and the blocks there are.
func (a *BlockIDs) Usage() (used, total int) { return a.total - len(a.free), a.total }

// Take takes n free blocks, growing a growing allocator first where needed (by at least what is
// missing, and by doubling). With too few blocks it takes none and returns an error wrapping
// ErrNoBlocks.
func (a *BlockIDs) Take(n int) ([]int, error) {
	if n <= 0 {
		return nil, nil
	}
	if missing := n - len(a.free); missing > 0 {
		if a.limit > 0 {
			used, total := a.Usage()
			return nil, fmt.Errorf("%d kv blocks wanted, %d of %d in use: %w", n, used, total, ErrNoBlocks)
		}
		more := max(missing, a.total, 16)
		if err := a.grow(a.total, more); err != nil {
			return nil, fmt.Errorf("grow the kv block pool by %d blocks: %w", more, err)
		}
		a.add(more)
	}
	ids := make([]int, n)
	for i := range ids {
		id := a.free[len(a.free)-1]
		a.free = a.free[:len(a.free)-1]
		a.isFree[id] = false
		ids[i] = id
	}
	return ids, nil
}

// Put returns blocks; ids not taken are ignored (a double free changes nothing).
func (a *BlockIDs) Put(ids ...int) {
	for _, id := range ids {
		if id >= 0 && id < a.total && !a.isFree[id] {
			a.isFree[id] = true
			a.free = append(a.free, id)
		}
	}
}

// Retake takes back the given blocks, which must be free (undoing a Put); it reports whether they all
// were.
func (a *BlockIDs) Retake(ids ...int) bool {
	ok := true
	for _, id := range ids {
		if id < 0 || id >= a.total || !a.isFree[id] {
			ok = false
			continue
		}
		a.isFree[id] = false
		for i, f := range a.free {
			if f == id {
				a.free = append(a.free[:i], a.free[i+1:]...)
				break
			}
		}
	}
	return ok
}

// BlockTable is the host side of one paged cache: its positions (KVPositions) and the pool block of
// each of its logical blocks (position / block size). Both backends keep one per cache; the device
// side (the table the kernels read) follows it.
type BlockTable struct {
	KVPositions
	Size int
	// IDs[b] is the pool block holding positions [b·Size, (b+1)·Size), -1 when none is held (dropped,
	// or not yet appended).
	IDs []int
}

// NewBlockTable makes the table of an empty cache of positions below capacity under window, with
// blocks of size positions.
func NewBlockTable(size, capacity int, window Window) (BlockTable, error) {
	if size <= 0 || capacity <= 0 || window.Chunk < 0 {
		return BlockTable{}, fmt.Errorf("kv block table: block size %d, capacity %d, chunk %d: %w", size, capacity, window.Chunk, ErrShape)
	}
	return BlockTable{KVPositions: KVPositions{Window: window, Capacity: capacity}, Size: size}, nil
}

// Held is the number of blocks the table holds.
func (t *BlockTable) Held() int {
	n := 0
	for _, id := range t.IDs {
		if id >= 0 {
			n++
		}
	}
	return n
}

// BlockAppend is what an Append did to a BlockTable, so that it can be undone: the blocks taken (by
// logical index) and the blocks returned.
type BlockAppend struct {
	saved     KVPositions
	savedLen  int
	Taken     []int // logical blocks that got a new pool block
	Dropped   []int // pool blocks returned (their logical blocks are now -1)
	droppedAt []int
}

// Append records pos (which CheckAppend accepted): it takes pool blocks from ids for the logical
// blocks pos reaches that the table lacks, then drops the positions the window hides (KVPositions.Append)
// and returns the blocks wholly below the first kept position. On error (the pool is exhausted) the
// table is unchanged.
func (t *BlockTable) Append(ids *BlockIDs, pos []int) (BlockAppend, error) {
	u := BlockAppend{saved: t.KVPositions, savedLen: len(t.IDs)}
	if len(pos) == 0 {
		return u, nil
	}
	lastBlock := pos[len(pos)-1] / t.Size
	for b := pos[0] / t.Size; b <= lastBlock; b++ {
		if b >= len(t.IDs) || t.IDs[b] < 0 {
			u.Taken = append(u.Taken, b)
		}
	}
	got, err := ids.Take(len(u.Taken))
	if err != nil {
		u.Taken = nil
		return u, err
	}
	for len(t.IDs) <= lastBlock {
		t.IDs = append(t.IDs, -1)
	}
	for i, b := range u.Taken {
		t.IDs[b] = got[i]
	}
	t.KVPositions.Append(pos)
	below := t.First() / t.Size // blocks before this one hold only dropped positions
	for b := 0; b < below && b < len(t.IDs); b++ {
		if t.IDs[b] >= 0 {
			u.Dropped = append(u.Dropped, t.IDs[b])
			u.droppedAt = append(u.droppedAt, b)
			t.IDs[b] = -1
		}
	}
	ids.Put(u.Dropped...)
	return u, nil
}

// Undo reverts an Append made last on this table (and, on ids, every later Take and Put undone first).
func (t *BlockTable) Undo(ids *BlockIDs, u BlockAppend) {
	ids.Retake(u.Dropped...)
	for i, b := range u.droppedAt {
		t.IDs[b] = u.Dropped[i]
	}
	for _, b := range u.Taken {
		ids.Put(t.IDs[b])
		t.IDs[b] = -1
	}
	t.IDs = t.IDs[:u.savedLen]
	t.KVPositions = u.saved
}

// Free returns every block the table holds to ids and empties it: no position is held any more and
// later Appends fail their checks as if the capacity were 0.
func (t *BlockTable) Free(ids *BlockIDs) {
	for b, id := range t.IDs {
		if id >= 0 {
			ids.Put(id)
			t.IDs[b] = -1
		}
	}
	t.IDs = nil
	t.KVPositions = KVPositions{Window: t.Window}
}

// Block returns the pool block and the row within it that hold position p (which the table holds).
func (t *BlockTable) Block(p int) (id, row int) {
	return t.IDs[p/t.Size], p % t.Size
}
