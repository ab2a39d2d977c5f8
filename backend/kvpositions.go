package backend

import "fmt"

// KVPositions is the bookkeeping every KVCache implementation shares: which absolute positions have been
// appended, which are still kept under the cache's window, and whether an append or a query's keys fit.
// Kept positions are always consecutive, so first and next describe them. The zero value is not usable:
// set Window and Capacity.
//
// A chunked cache (Window.Chunk > 0) drops, at the start of each Append, the positions before the chunk
// of the last position appended so far: no later query can see them. Dropping at the start of the next
// Append rather than at the end of this one keeps a prefill that spans several chunks whole until its
// queries have been attended.
type KVPositions struct {
	Window   Window
	Capacity int // positions must stay below it

	first    int // position of the first kept entry
	next     int // position the next Append must start at, valid when appended > 0
	appended int // positions appended so far
	dropped  int // every position below it has been dropped (0 when none)
}

// Len is the number of positions appended so far.
func (p *KVPositions) Len() int { return p.appended }

// Kept is the number of positions still held.
func (p *KVPositions) Kept() int {
	if p.appended == 0 {
		return 0
	}
	return p.next - p.first
}

// First is the position of the first kept entry (meaningful when Kept() > 0).
func (p *KVPositions) First() int { return p.first }

// CheckAppend reports, as an error wrapping ErrShape, whether pos may be appended next: consecutive,
// starting where the previous Append ended (any position >= 0 for the first) and below Capacity.
func (p *KVPositions) CheckAppend(pos []int) error {
	if len(pos) == 0 {
		return nil
	}
	want := pos[0]
	if p.appended > 0 {
		want = p.next
	}
	for i, q := range pos {
		if q != want+i || q < 0 || q >= p.Capacity {
			return fmt.Errorf("kv append positions %d..%d (pos[%d] = %d), want consecutive from %d below capacity %d: %w",
				pos[0], pos[len(pos)-1], i, q, want, p.Capacity, ErrShape)
		}
	}
	return nil
}

// Append records pos, which CheckAppend accepted, and returns how many positions were dropped from the
// front of the kept range first (the caller frees their storage, or ignores them).
func (p *KVPositions) Append(pos []int) (dropped int) {
	if len(pos) == 0 {
		return 0
	}
	if p.appended == 0 {
		p.first = pos[0]
	} else if chunk := p.Window.Chunk; chunk > 0 {
		last := p.next - 1
		if start := last - last%chunk; start > p.first {
			dropped = start - p.first
			p.first, p.dropped = start, start
		}
	}
	p.next = pos[len(pos)-1] + 1
	p.appended += len(pos)
	return dropped
}

// CheckAttend reports, as an error wrapping ErrShape, whether queries at pos may attend under window:
// each query's position must be held, and so must every key the window lets it see.
func (p *KVPositions) CheckAttend(pos []int, window Window) error {
	kept := p.Kept()
	for t, q := range pos {
		from := 0
		if window.Chunk > 0 {
			from = q - q%window.Chunk
		}
		if kept == 0 || q < p.first || q >= p.next || from < p.dropped {
			return fmt.Errorf("attention pos[%d] = %d (chunk %d) over a cache holding %d..%d (dropped below %d): %w",
				t, q, window.Chunk, p.first, p.first+kept-1, p.dropped, ErrShape)
		}
	}
	return nil
}
