package llama4_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/shard"
)

// loadRanks loads every rank of a TP group in this process, each with its own CPU backend, over comms.
func (f *fixture) loadRanks(t *testing.T, plan shard.Plan, comms []comm.Comm) []*llama4.Model {
	t.Helper()
	ranks := make([]*llama4.Model, len(comms))
	for r, comm := range comms {
		man, err := shard.NewManifest(f.cfg, f.ckpt, plan, len(comms), r)
		if err != nil {
			t.Fatal(err)
		}
		ops := cpu.New(cpu.Config{})
		m, err := llama4.Load(context.Background(), ops, f.cfg, run.NewRankWeights(shard.NewRankReader(f.ckpt, man), ops), llama4.Parallel{Comm: comm})
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
		ranks[r] = m
	}
	return ranks
}

// onAllRanks runs f on every rank concurrently, as the ranks of a TP group run, and returns rank 0's result.
func onAllRanks[T any](t *testing.T, ranks []*llama4.Model, f func(m *llama4.Model) (T, error)) T {
	t.Helper()
	results := make([]T, len(ranks))
	errs := make([]error, len(ranks))
	var wg sync.WaitGroup
	for r, m := range ranks {
		wg.Go(func() { results[r], errs[r] = f(m) })
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	return results[0]
}

// TestTensorParallelEqualsTP1: for every fixture, TP=2 and TP=4 under the default (HF) plan and the
// expert-parallel plan give the TP=1 logits within 1e-5 relative and the same greedy ids (issue 3).
func TestTensorParallelEqualsTP1(t *testing.T) {
	plans := map[string]shard.Plan{"tp": shard.DefaultPlan(llama4.Config{}), "ep": shard.ExpertParallelPlan(llama4.Config{})}
	for _, f := range fixtures(t) {
		want, err := f.load(t).Score(context.Background(), f.scoreIDs[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, planName := range []string{"tp", "ep"} {
			for _, tp := range []int{2, 4} {
				t.Run(fmt.Sprintf("%s/%s/tp%d", f.name, planName, tp), func(t *testing.T) {
					ranks := f.loadRanks(t, plans[planName], comm.NewLocalGroup(tp))
					got := onAllRanks(t, ranks, func(m *llama4.Model) ([]float32, error) {
						return m.Score(context.Background(), f.scoreIDs[0])
					})
					if worst, at := maxRelDiff(t, got, want, f.cfg.VocabSize); worst > 1e-5 {
						t.Errorf("max |Δ|/max |ref| vs TP=1 = %.3g at position %d, want <= 1e-5", worst, at)
					}
					ids := onAllRanks(t, ranks, func(m *llama4.Model) ([]int, error) {
						ids, _, err := m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs)}, nil)
						return ids, err
					})
					if !slices.Equal(ids, f.greedyIDs) {
						t.Errorf("greedy ids = %v, want %v", ids, f.greedyIDs)
					}
				})
			}
		}
	}
}

// TestExpertReplicasEqualTP1: under the ep plan at TP=2, experts placed in another order, and experts 0
// and E-1 held on both ranks (replicas: E+2 slots), give bit for bit the logits and greedy ids of the
// plain ep plan on every rank (each token's choice is computed once, by the replica its position picks),
// which are TP=1's within 1e-5; every replica gets tokens, and the expert counts, in the checkpoint's
// numbering, are the plain plan's.
func TestExpertReplicasEqualTP1(t *testing.T) {
	ep := shard.ExpertParallelPlan(llama4.Config{})
	for _, f := range fixtures(t) {
		E := f.cfg.NumExperts
		var moeLayers []int
		for l, isMoE := range f.cfg.MoE {
			if isMoE {
				moeLayers = append(moeLayers, l)
			}
		}
		if len(moeLayers) == 0 || E%2 != 0 {
			continue
		}
		want, err := f.load(t).Score(context.Background(), f.scoreIDs[0])
		if err != nil {
			t.Fatal(err)
		}
		plain := f.loadRanks(t, ep, comm.NewLocalGroup(2))
		plainLogits := onAllRanks(t, plain, func(m *llama4.Model) ([]float32, error) { return m.Score(context.Background(), f.scoreIDs[0]) })
		plainLoad := plain[0].ExpertLoad()

		permuted, replicated := make([]int, E), []int{E - 1}
		for i := range E {
			permuted[i] = E - 1 - i
		}
		for i := range E / 2 {
			replicated = append(replicated, i) // rank 0: E-1, 0 .. E/2-1
		}
		replicated = append(replicated, 0) // rank 1: 0, E/2 .. E-1
		for i := E / 2; i < E; i++ {
			replicated = append(replicated, i)
		}
		for _, tc := range []struct {
			name  string
			order []int
		}{{"permuted", permuted}, {"replicas", replicated}} {
			t.Run(fmt.Sprintf("%s/%s", f.name, tc.name), func(t *testing.T) {
				layers := make(map[int][]int)
				for _, l := range moeLayers {
					layers[l] = tc.order
				}
				ranks := f.loadRanks(t, ep.WithOrder("experts", layers), comm.NewLocalGroup(2))
				got := make([][]float32, len(ranks))
				onAllRanks(t, ranks, func(m *llama4.Model) (struct{}, error) {
					l, err := m.Score(context.Background(), f.scoreIDs[0])
					got[slices.Index(ranks, m)] = l
					return struct{}{}, err
				})
				for r, g := range got {
					if !slices.Equal(g, plainLogits) {
						t.Errorf("rank %d: logits differ from the plain ep plan's (order %v)", r, tc.order)
					}
				}
				if worst, at := maxRelDiff(t, got[0], want, f.cfg.VocabSize); worst > 1e-5 {
					t.Errorf("max |Δ|/max |ref| vs TP=1 = %.3g at position %d, want <= 1e-5", worst, at)
				}
				for r, m := range ranks {
					if load := m.ExpertLoad(); !slices.EqualFunc(load, plainLoad, slices.Equal) {
						t.Errorf("rank %d: ExpertLoad() = %v, want the plain plan's %v", r, load, plainLoad)
					}
				}
				slotLoad := ranks[0].SlotLoad()
				for _, l := range moeLayers {
					var sum int64
					for slot, n := range slotLoad[l] {
						sum += n
						if plainLoad[l][tc.order[slot]] >= 4 && n == 0 {
							t.Errorf("layer %d: slot %d (expert %d, %d tokens) got none: %v", l, slot, tc.order[slot], plainLoad[l][tc.order[slot]], slotLoad[l])
						}
					}
					if total := int64(len(f.scoreIDs[0]) * f.cfg.TopK); sum != total {
						t.Errorf("layer %d: slot load %v sums to %d, want %d", l, slotLoad[l], sum, total)
					}
				}
				t.Logf("layer %d: tokens per expert %v; slots %v: %v", moeLayers[0], plainLoad[moeLayers[0]], tc.order, slotLoad[moeLayers[0]])
				ids := onAllRanks(t, ranks, func(m *llama4.Model) ([]int, error) {
					ids, _, err := m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs)}, nil)
					return ids, err
				})
				if !slices.Equal(ids, f.greedyIDs) {
					t.Errorf("greedy ids = %v, want %v", ids, f.greedyIDs)
				}
			})
		}
	}
}
