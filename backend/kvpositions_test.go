package backend_test

import (
	"errors"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
)

func span(from, to int) []int {
	var p []int
	for i := from; i < to; i++ {
		p = append(p, i)
	}
	return p
}

// TestKVPositionsChunked follows a chunk-4 cache through a prefill across chunks and single-token steps.
func TestKVPositionsChunked(t *testing.T) {
	p := backend.KVPositions{Window: backend.Window{Chunk: 4}, Capacity: 16}
	for _, step := range []struct {
		pos          []int
		dropped      int
		first, kept  int
		attendOK     []int // query positions that may attend afterwards
		attendRefuse []int
	}{
		{span(0, 6), 0, 0, 6, []int{0, 3, 4, 5}, []int{6}}, // prefill over chunks 0 and 1 stays whole
		{[]int{6}, 4, 4, 3, []int{4, 5, 6}, []int{3}},      // the next append drops chunk 0
		{[]int{7}, 0, 4, 4, []int{7}, nil},                 // still chunk 1
		{[]int{8}, 0, 4, 5, []int{8}, nil},                 // chunk 2 starts; chunk 1 goes at the next append
		{[]int{9}, 4, 8, 2, []int{8, 9}, []int{7}},         // chunk 1 dropped
		{span(10, 16), 0, 8, 8, []int{15}, []int{16}},      // up to capacity
	} {
		if err := p.CheckAppend(step.pos); err != nil {
			t.Fatalf("CheckAppend(%v) = %v", step.pos, err)
		}
		if got := p.Append(step.pos); got != step.dropped || p.First() != step.first || p.Kept() != step.kept {
			t.Errorf("Append(%v) = %d, first %d, kept %d; want %d, %d, %d", step.pos, got, p.First(), p.Kept(), step.dropped, step.first, step.kept)
		}
		for _, q := range step.attendOK {
			if err := p.CheckAttend([]int{q}, p.Window); err != nil {
				t.Errorf("after %v: CheckAttend(%d) = %v, want nil", step.pos, q, err)
			}
		}
		for _, q := range step.attendRefuse {
			if err := p.CheckAttend([]int{q}, p.Window); !errors.Is(err, backend.ErrShape) {
				t.Errorf("after %v: CheckAttend(%d) = %v, want ErrShape", step.pos, q, err)
			}
		}
	}
	if p.Len() != 16 {
		t.Errorf("Len() = %d, want 16", p.Len())
	}
	// A global window over a chunked cache that has dropped keys is refused.
	if err := p.CheckAttend([]int{15}, backend.Window{}); !errors.Is(err, backend.ErrShape) {
		t.Errorf("CheckAttend(global) after drops = %v, want ErrShape", err)
	}
}

func TestKVPositionsCheckAppend(t *testing.T) {
	p := backend.KVPositions{Capacity: 8}
	for _, bad := range [][]int{{-1}, {0, 2}, {7, 8}, {8}} {
		if err := p.CheckAppend(bad); !errors.Is(err, backend.ErrShape) {
			t.Errorf("CheckAppend(%v) on an empty cache = %v, want ErrShape", bad, err)
		}
	}
	if err := p.CheckAppend([]int{3, 4}); err != nil { // the first append may start anywhere
		t.Fatal(err)
	}
	p.Append([]int{3, 4})
	for _, bad := range [][]int{{4}, {6}, {5, 7}} {
		if err := p.CheckAppend(bad); !errors.Is(err, backend.ErrShape) {
			t.Errorf("CheckAppend(%v) after 3..4 = %v, want ErrShape", bad, err)
		}
	}
	if err := p.CheckAppend([]int{5, 6, 7}); err != nil {
		t.Errorf("CheckAppend(5..7) = %v", err)
	}
	if p.Kept() != 2 || p.First() != 3 || p.Len() != 2 {
		t.Errorf("Kept, First, Len = %d, %d, %d; want 2, 3, 2", p.Kept(), p.First(), p.Len())
	}
}
