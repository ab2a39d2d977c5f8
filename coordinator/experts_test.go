package coordinator

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/cluster"
)

func TestBalanceExperts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		counts    []int64
		cur       []int // nil: checkpoint order
		tp        int
		redundant int // keepRedundant: the order's
		want      []int
		moved     bool
	}{
		{"balanced stays", []int64{10, 1, 10, 1}, nil, 2, 0, []int{0, 1, 2, 3}, false},
		{"two hot on one rank: one moves", []int64{64, 40, 36, 24}, nil, 2, 0, []int{0, 3, 2, 1}, true},
		{"from a previous order", []int64{64, 40, 36, 24}, []int{0, 3, 2, 1}, 2, 0, []int{0, 3, 2, 1}, false},
		{"four ranks: one each", []int64{5, 6, 7, 8}, nil, 4, 0, []int{0, 1, 2, 3}, false},
		{"tp 1: nothing to move", []int64{1, 9, 3, 4}, nil, 1, 0, []int{0, 1, 2, 3}, false},
		{"all on one rank of two", []int64{0, 0, 9, 9}, nil, 2, 0, []int{0, 3, 2, 1}, true},
		// Moving only, the hottest stays where it is (it is placed first, on an empty field, at home) and its
		// rank-mate leaves.
		{"the hot rank's mate moves to the idle rank", []int64{10, 60, 0, 0}, []int{2, 3, 0, 1}, 2, 0, []int{2, 0, 3, 1}, true},
		// Replicas: one spare slot a rank; the hottest (0) gets a replica on rank 1, and 1 (cold) fills
		// the other spare slot: 65 tokens a rank.
		{"hottest replicated", []int64{100, 10, 10, 10}, nil, 2, 2, []int{0, 1, 3, 2, 0, 1}, true},
		{"replicas kept", []int64{100, 10, 10, 10}, []int{0, 1, 2, 0, 3, 2}, 2, keepRedundant, []int{0, 1, 2, 0, 3, 2}, false},
		{"replicas dropped", []int64{100, 10, 10, 10}, []int{0, 1, 2, 0, 3, 2}, 2, 0, []int{0, 3, 2, 1}, true},
		// Two hot experts over 4 ranks with 4 spare slots: each gets 2 replicas (40 tokens each, one a
		// rank) and 2, cold, fills the other two; 3 replicas each would leave a rank 53 tokens.
		{"two hot, two replicas each over 4 ranks", []int64{80, 80, 1, 1, 1, 1, 1, 1}, nil, 4, 4, []int{0, 5, 2, 2, 3, 0, 4, 1, 2, 6, 7, 1}, true},
	} {
		var cur *cluster.UnitOrder
		if tc.cur != nil {
			cur = &cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{0: tc.cur}}
		}
		got, moved, err := balanceExperts(map[int][]int64{0: tc.counts}, cur, tc.tp, tc.redundant)
		if err != nil || !slices.Equal(got.Layers[0], tc.want) || moved != tc.moved {
			t.Errorf("%s: balanceExperts(%v, %v, tp %d, redundant %d) = %v, moved %v, %v; want %v, moved %v", tc.name, tc.counts, tc.cur, tc.tp, tc.redundant,
				got.Layers[0], moved, err, tc.want, tc.moved)
		}
	}
	for _, bad := range []struct {
		counts        []int64
		tp, redundant int
	}{
		{[]int64{1, 2, 3}, 2, 0},    // experts do not divide
		{[]int64{1, 2, 3, 4}, 2, 1}, // 5 slots over 2 ranks
		{[]int64{1, 2, 3, 4}, 2, 6}, // more replicas than ranks to hold them
	} {
		if _, _, err := balanceExperts(map[int][]int64{0: bad.counts}, nil, bad.tp, bad.redundant); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("balanceExperts(%v, tp %d, redundant %d) = %v, want ErrInvalidRequest", bad.counts, bad.tp, bad.redundant, err)
		}
	}
}

// TestBalanceExpertsProperties: on random loads, every placement holds every expert, (E+R)/tp slots a rank
// with no expert twice on one, the hottest expert on more than one rank when there are spare slots, a
// busiest rank no busier than before (with as many slots as
// before), and the same answer for the same input.
func TestBalanceExpertsProperties(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 300 {
		tp := []int{1, 2, 4}[trial%3]
		n := tp * (1 + r.IntN(4))
		redundant := tp * r.IntN(min(n, 3)) * min(tp-1, 1)
		counts := make([]int64, n)
		for e := range counts {
			counts[e] = int64(r.IntN(50))
			if r.IntN(4) == 0 {
				counts[e] *= 20 // hot
			}
		}
		load := map[int][]int64{3: counts}
		var cur *cluster.UnitOrder
		if trial%2 == 1 {
			cur = &cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{3: r.Perm(n)}}
		}
		got, _, err := balanceExperts(load, cur, tp, redundant)
		if err != nil {
			t.Fatalf("balanceExperts(%v, %v, tp %d, redundant %d): %v", counts, cur, tp, redundant, err)
		}
		again, _, _ := balanceExperts(load, cur, tp, redundant)
		ord := got.Layers[3]
		if !slices.Equal(ord, again.Layers[3]) {
			t.Errorf("balanceExperts(%v) = %v, then %v: want the same", counts, ord, again.Layers[3])
		}
		if len(ord) != n+redundant || !covers(ord, n) {
			t.Fatalf("balanceExperts(%v, tp %d, redundant %d) = %v: want %d slots holding every expert", counts, tp, redundant, ord, n+redundant)
		}
		per := len(ord) / tp
		hot := 0
		for e, c := range counts {
			if c > counts[hot] {
				hot = e
			}
		}
		hotRanks := 0
		for rank := range tp {
			mine := ord[rank*per : (rank+1)*per]
			for i, e := range mine {
				if slices.Contains(mine[:i], e) {
					t.Errorf("balanceExperts(%v, tp %d, redundant %d) = %v: expert %d twice on rank %d", counts, tp, redundant, ord, e, rank)
				}
			}
			if slices.Contains(mine, hot) {
				hotRanks++
			}
		}
		if redundant > 0 && hotRanks < 2 {
			t.Errorf("balanceExperts(%v, tp %d, redundant %d) = %v: the hottest expert %d is on %d rank(s), want a replica on another", counts, tp, redundant, ord, hot, hotRanks)
		}
		var curOrd []int
		if cur != nil {
			curOrd = cur.Layers[3]
		}
		if redundant > 0 {
			continue // the slots changed: the busiest rank may carry more (it holds more experts)
		}
		if before, after := slices.Max(rankLoad(counts, curOrd, tp)), slices.Max(rankLoad(counts, ord, tp)); after > before+1e-9 {
			t.Errorf("balanceExperts(%v, %v, tp %d, redundant %d) = %v: busiest rank %g tokens, before %g", counts, curOrd, tp, redundant, ord, after, before)
		}
	}
}

// TestExpertsDecision: the automatic mode acts only above its threshold and only when balancing helps.
func TestExpertsDecision(t *testing.T) {
	replicated := &cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{0: {0, 1, 2, 0, 3, 2}}}
	for _, tc := range []struct {
		name      string
		counts    []int64
		cur       *cluster.UnitOrder
		redundant int
		threshold float64
		act       bool
	}{
		{"skewed over the threshold", []int64{64, 40, 36, 24}, nil, 0, 1.05, true},
		{"skewed under a high threshold", []int64{64, 40, 36, 24}, nil, 0, 1.5, false},
		{"balanced", []int64{10, 10, 10, 10}, nil, 2, 1.05, false},
		{"one expert takes all: moving cannot help", []int64{100, 0, 0, 0}, nil, 0, 1.05, false},
		{"one expert takes all: a replica helps", []int64{100, 0, 0, 0}, nil, 2, 1.05, true},
		{"one expert takes all, with replicas in force: they balance it already", []int64{100, 0, 0, 0}, replicated, keepRedundant, 1.05, false},
		{"nothing counted", []int64{0, 0, 0, 0}, nil, 2, 1.05, false},
	} {
		act, now, after := expertsDecision(map[int][]int64{0: tc.counts}, tc.cur, 2, tc.redundant, tc.threshold)
		if act != tc.act || (act && after >= now) {
			t.Errorf("%s: expertsDecision(%v, threshold %g) = %t (imbalance %g → %g), want %t", tc.name, tc.counts, tc.threshold, act, now, after, tc.act)
		}
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
	replicated := &cluster.UnitOrder{Unit: expertsUnit, Layers: map[int][]int{0: {0, 1, 2, 0, 3, 2}}}
	if got, want := imbalance(map[int][]int64{0: {100, 10, 10, 10}}, replicated, 2), (50+10+5)*2/130.0; got < want-1e-9 || got > want+1e-9 {
		t.Errorf("imbalance(replicas) = %g, want %g (each replica half its expert's tokens)", got, want)
	}
	if got := imbalance(map[int][]int64{0: {0, 0}}, nil, 2); got != 1 {
		t.Errorf("imbalance(nothing counted) = %g, want 1", got)
	}
}
