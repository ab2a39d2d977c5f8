package backend

import (
	"errors"
	"slices"
	"testing"
)

func growing(t *testing.T) (*BlockIDs, *[]int) {
	t.Helper()
	var grown []int
	a, err := NewBlockIDs(0, func(total, n int) error {
		grown = append(grown, n)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return a, &grown
}

// TestBlockIDs: a fixed allocator runs out with ErrNoBlocks and takes nothing; a growing one doubles;
// Put ignores ids not taken; Retake undoes a Put.
func TestBlockIDs(t *testing.T) {
	fixed, err := NewBlockIDs(3, func(int, int) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	ids, err := fixed.Take(2)
	if err != nil || len(ids) != 2 {
		t.Fatalf("Take(2) = %v, %v", ids, err)
	}
	if _, err := fixed.Take(2); !errors.Is(err, ErrNoBlocks) {
		t.Errorf("Take(2) with 1 free: %v, want ErrNoBlocks", err)
	}
	if used, total := fixed.Usage(); used != 2 || total != 3 {
		t.Errorf("Usage after a failed Take = %d, %d, want 2, 3", used, total)
	}
	fixed.Put(ids[0], ids[0], 99, -1)
	if used, _ := fixed.Usage(); used != 1 {
		t.Errorf("Usage after Put of one id (twice) and of unknown ids = %d, want 1", used)
	}
	if !fixed.Retake(ids[0]) || fixed.Retake(ids[0]) {
		t.Error("Retake of a free id must succeed once")
	}
	if _, err := NewBlockIDs(-1, nil); !errors.Is(err, ErrShape) {
		t.Errorf("NewBlockIDs(-1): %v, want ErrShape", err)
	}

	g, grown := growing(t)
	if _, err := g.Take(5); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Take(12); err != nil {
		t.Fatal(err)
	}
	if _, total := g.Usage(); !slices.Equal(*grown, []int{16, 16}) || total != 32 {
		t.Errorf("growth = %v (total %d), want [16 16] (32)", *grown, total)
	}
}

// TestBlockTable: appends take the blocks their positions reach, a chunked table gives back blocks
// wholly before the chunk of the last position, Undo restores the table and the allocator exactly, and
// Free returns everything.
func TestBlockTable(t *testing.T) {
	ids, _ := growing(t)
	tab, err := NewBlockTable(4, 100, Window{Chunk: 8})
	if err != nil {
		t.Fatal(err)
	}
	span := func(from, to int) []int {
		var p []int
		for i := from; i < to; i++ {
			p = append(p, i)
		}
		return p
	}
	if _, err := tab.Append(ids, span(0, 10)); err != nil { // blocks 0, 1, 2
		t.Fatal(err)
	}
	if tab.Held() != 3 {
		t.Errorf("Held after 0..9 = %d, want 3", tab.Held())
	}
	if _, err := tab.Append(ids, span(10, 17)); err != nil { // drops below 8 (blocks 0, 1), takes 3, 4
		t.Fatal(err)
	}
	if tab.Held() != 3 || tab.First() != 8 || tab.IDs[0] != -1 || tab.IDs[1] != -1 {
		t.Errorf("after 10..16: Held %d, First %d, IDs %v; want 3, 8, blocks 0 and 1 dropped", tab.Held(), tab.First(), tab.IDs)
	}
	savedIDs, savedTab := slices.Clone(tab.IDs), tab.KVPositions
	usedBefore, _ := ids.Usage()
	u, err := tab.Append(ids, span(17, 25)) // drops below 16 (blocks 2, 3), takes 5, 6
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Taken) != 2 || len(u.Dropped) != 2 {
		t.Errorf("Append(17..24): taken %v, dropped %v, want 2 and 2", u.Taken, u.Dropped)
	}
	// Another table takes the freed blocks, then both are undone in reverse order.
	other, _ := NewBlockTable(4, 100, Window{})
	uo, err := other.Append(ids, span(0, 8))
	if err != nil {
		t.Fatal(err)
	}
	other.Undo(ids, uo)
	tab.Undo(ids, u)
	if !slices.Equal(tab.IDs, savedIDs) || tab.KVPositions != savedTab {
		t.Errorf("after Undo: IDs %v positions %+v, want %v %+v", tab.IDs, tab.KVPositions, savedIDs, savedTab)
	}
	if used, _ := ids.Usage(); used != usedBefore {
		t.Errorf("blocks in use after Undo = %d, want %d", used, usedBefore)
	}
	tab.Free(ids)
	if used, _ := ids.Usage(); used != 0 || tab.Kept() != 0 || tab.CheckAppend([]int{17}) == nil {
		t.Errorf("after Free: %d blocks in use, Kept %d; want 0, 0 and appends refused", used, tab.Kept())
	}
}
