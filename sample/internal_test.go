package sample

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestTopK: the heap selection gives the first k ids of the full sort, ties and NaN included.
func TestTopK(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{9, 100, 1000} {
		row := make([]float32, n)
		for i := range row {
			row[i] = float32(r.IntN(7)) // many ties
			if r.IntN(50) == 0 {
				row[i] = float32(math.NaN())
			}
		}
		order := func(a, b int) int {
			if c := cmp.Compare(row[b], row[a]); c != 0 {
				return c
			}
			return a - b
		}
		all := make([]int, n)
		for i := range all {
			all[i] = i
		}
		slices.SortFunc(all, order)
		for _, k := range []int{1, 2, 5, n / 3, n - 1} {
			if got := topK(row, k, order, nil); !slices.Equal(got, all[:k]) {
				t.Errorf("n %d k %d: topK = %v, want %v", n, k, got, all[:k])
			}
		}
	}
}
