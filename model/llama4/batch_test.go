package llama4_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/sample"
)

// TestForwardBatchEqualsSingle: sequences of different lengths and positions run together in one batch
// give the logits each gives alone, and batched greedy decoding reproduces HF's ids for every sequence.
func TestForwardBatchEqualsSingle(t *testing.T) {
	ctx := context.Background()
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m, ops := f.loadOps(t)
			a, b := f.scoreIDs[0], f.scoreIDs[1][:23]
			wantA, err := m.Score(ctx, a)
			if err != nil {
				t.Fatal(err)
			}
			wantB, err := m.Score(ctx, b)
			if err != nil {
				t.Fatal(err)
			}
			sa, _ := m.NewSequence(len(a))
			sb, _ := m.NewSequence(len(b))
			// A prefill of a's first 9 tokens alone, then a's remaining tokens batched with b's prompt.
			first, err := m.Forward(ctx, sa, a[:9], true)
			if err != nil {
				t.Fatal(err)
			}
			rest, err := m.ForwardBatch(ctx, []*llama4.Sequence{sa, sb}, [][]int{a[9:], b}, true)
			if err != nil {
				t.Fatal(err)
			}
			got1, _ := ops.Float32(first)
			got2, _ := ops.Float32(rest)
			vocab := f.cfg.VocabSize
			gotA := append(got1, got2[:(len(a)-9)*vocab]...)
			gotB := got2[(len(a)-9)*vocab:]
			if worst, at := maxRelDiff(t, gotA, wantA, vocab); worst > 1e-5 {
				t.Errorf("batched sequence a: max |Δ|/max |ref| = %.3g at %d", worst, at)
			}
			if worst, at := maxRelDiff(t, gotB, wantB, vocab); worst > 1e-5 {
				t.Errorf("batched sequence b: max |Δ|/max |ref| = %.3g at %d", worst, at)
			}

			// Three sequences decoded greedily together, each must give HF's greedy ids.
			n := len(f.greedyIDs)
			seqs := make([]*llama4.Sequence, 3)
			next := make([][]int, 3)
			got := make([][]int, 3)
			for i := range seqs {
				seqs[i], _ = m.NewSequence(len(f.prompt) + n)
				next[i] = f.prompt
			}
			for step := 0; step < n; step++ {
				logits, err := m.ForwardBatch(ctx, seqs, next, false)
				if err != nil {
					t.Fatal(err)
				}
				rows, _ := ops.Float32(logits)
				for i := range seqs {
					id := sample.Argmax(rows[i*vocab : (i+1)*vocab])
					got[i] = append(got[i], id)
					next[i] = []int{id}
				}
			}
			for i := range got {
				if !slices.Equal(got[i], f.greedyIDs) {
					t.Errorf("batched greedy sequence %d = %v, want %v", i, got[i], f.greedyIDs)
				}
			}
		})
	}
}

func TestForwardBatchRejectsBadBatches(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.load(t)
	ctx := context.Background()
	s1, _ := m.NewSequence(8)
	s2, _ := m.NewSequence(8)
	for _, tc := range []struct {
		name string
		seqs []*llama4.Sequence
		ids  [][]int
	}{
		{"no sequences", nil, nil},
		{"lengths differ", []*llama4.Sequence{s1}, [][]int{{1}, {2}}},
		{"same sequence twice", []*llama4.Sequence{s1, s1}, [][]int{{1}, {2}}},
		{"bad id in second", []*llama4.Sequence{s1, s2}, [][]int{{1}, {600}}},
	} {
		if _, err := m.ForwardBatch(ctx, tc.seqs, tc.ids, false); !errors.Is(err, llama4.ErrInput) {
			t.Errorf("%s: ForwardBatch error = %v, want ErrInput", tc.name, err)
		}
	}
	if s1.Len() != 0 || s2.Len() != 0 {
		t.Errorf("rejected batches advanced sequences to %d and %d", s1.Len(), s2.Len())
	}
}
