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
