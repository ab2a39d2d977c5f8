package coordinator

import (
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/cluster"
)

func TestBalanceExperts(t *testing.T) {
	for _, tc := range []struct {
		name   string
		counts []int64
		cur    []int // nil: checkpoint order
		tp     int
		want   []int
		moved  bool
	}{
		{"balanced stays", []int64{10, 1, 10, 1}, nil, 2, []int{0, 1, 2, 3}, false},
		{"two hot on one rank: one moves", []int64{64, 40, 36, 24}, nil, 2, []int{0, 3, 2, 1}, true},
		{"from a previous order", []int64{64, 40, 36, 24}, []int{0, 3, 2, 1}, 2, []int{0, 3, 2, 1}, false},
		{"four ranks: one each", []int64{5, 6, 7, 8}, nil, 4, []int{0, 1, 2, 3}, false},
		{"tp 1: nothing to move", []int64{1, 9, 3, 4}, nil, 1, []int{0, 1, 2, 3}, false},
		{"all on one rank of two", []int64{0, 0, 9, 9}, nil, 2, []int{0, 3, 2, 1}, true},
	} {
		var cur *cluster.UnitOrder
		if tc.cur != nil {
			cur = &cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{0: tc.cur}}
		}
		got, moved, err := balanceExperts(map[int][]int64{0: tc.counts}, cur, tc.tp)
		if err != nil || !slices.Equal(got.Layers[0], tc.want) || moved != tc.moved {
			t.Errorf("%s: balanceExperts(%v, %v, tp %d) = %v, moved %v, %v; want %v, moved %v", tc.name, tc.counts, tc.cur, tc.tp,
				got.Layers[0], moved, err, tc.want, tc.moved)
		}
	}
	if _, _, err := balanceExperts(map[int][]int64{0: {1, 2, 3}}, nil, 2); err == nil {
		t.Errorf("balanceExperts(3 experts, tp 2) = nil error, want one")
	}
}

func TestImbalance(t *testing.T) {
	load := map[int][]int64{0: {64, 40, 36, 24}, 1: {10, 10, 10, 10}}
	for _, tc := range []struct {
		order *cluster.UnitOrder
		tp    int
		want  float64
	}{
		{nil, 2, 104.0 * 2 / 164},
		{&cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{0: {0, 3, 2, 1}}}, 2, 88.0 * 2 / 164},
		{nil, 1, 1},
		{nil, 4, 64.0 * 4 / 164},
	} {
		if got := imbalance(load, tc.order, tc.tp); got < tc.want-1e-9 || got > tc.want+1e-9 {
			t.Errorf("imbalance(%v, %v, tp %d) = %g, want %g", load, tc.order, tc.tp, got, tc.want)
		}
	}
	if got := imbalance(map[int][]int64{0: {0, 0}}, nil, 2); got != 1 {
		t.Errorf("imbalance(nothing counted) = %g, want 1", got)
	}
}
