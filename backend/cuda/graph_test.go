package cuda_test

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
)

// TestGraphDecodeEqualsEager decodes the same sequences on two backends, one recording decode steps as
// CUDA graphs (the default) and one eager, and requires the same logits at every step: the kernels are
// deterministic, so a replay must reproduce the eager step exactly. The batch phase runs two different
// sets of three sequences (different capacities, chunk boundaries crossed) through the one recording of
// "decode 3", so replays serve other caches and positions than the captured ones.
func TestGraphDecodeEqualsEager(t *testing.T) {
	graphs := newBackend(t, cuda.BF16)
	eager, err := cuda.New(cuda.Config{Poison: true, Eager: true})
	if err != nil {
		t.Fatal(err)
	}
	defer eager.Close()
	for _, fixture := range []string{"moe-top1", "dense-moe-mm"} {
		t.Run(fixture, func(t *testing.T) {
			dir := filepath.Join(fixturesDir(t), fixture)
			cfg, ckpt := openFixture(t, dir)
			ctx := context.Background()
			load := func(b *cuda.Backend) *llama4.Model {
				m, err := llama4.Load(ctx, b, cfg, llama4.NewCheckpointWeights(ckpt, b, cfg), llama4.Parallel{})
				if err != nil {
					t.Fatal(err)
				}
				return m
			}
			mg, me := load(graphs), load(eager)
			// A fixed pool (as the memory planner sizes it): blocks are taken and given back at chunk
			// boundaries inside replayed steps, and no step needs a new allocation, so each key records once.
			for _, m := range []*llama4.Model{mg, me} {
				if err := m.SetKVBlocks(16, 64); err != nil {
					t.Fatal(err)
				}
			}
			before := stats(graphs)

			// One sequence, 40 steps: crosses chunk boundaries (the fixtures' chunk is 16).
			compare := func(phase string, capacities []int, prompt [][]int, steps int) {
				t.Helper()
				sg, se := make([]*llama4.Sequence, len(capacities)), make([]*llama4.Sequence, len(capacities))
				for i, c := range capacities {
					if sg[i], err = mg.NewSequence(c); err != nil {
						t.Fatal(err)
					}
					if se[i], err = me.NewSequence(c); err != nil {
						t.Fatal(err)
					}
				}
				var worst float64
				var graphTime, eagerTime time.Duration
				for step := 0; step <= steps; step++ {
					ids := prompt
					if step > 0 {
						ids = make([][]int, len(capacities))
						for i := range ids {
							ids[i] = []int{(step*37 + i*101 + 5) % cfg.VocabSize}
						}
					}
					start := time.Now()
					lg := logits(t, graphs, mg, sg, ids)
					graphTime += time.Since(start)
					start = time.Now()
					le := logits(t, eager, me, se, ids)
					eagerTime += time.Since(start)
					d := relL2(lg, le)
					worst = math.Max(worst, d)
					if d > 1e-6 {
						t.Fatalf("%s step %d: graph vs eager logits rel L2 %.3g", phase, step, d)
					}
				}
				t.Logf("%s: %d steps, worst rel L2 %.3g; host wall graph %v, eager %v", phase, steps, worst, graphTime, eagerTime)
				for i := range sg {
					sg[i].Free()
					se[i].Free()
				}
				if used, total, _ := mg.KVUsage(); used != 0 || total != 64 {
					t.Errorf("%s: %d of %d KV blocks in use after the sequences were freed, want 0 of 64", phase, used, total)
				}
			}
			compare("single", []int{64}, [][]int{{1, 475, 188, 269, 460}}, 40)
			compare("batch A", []int{64, 100, 48}, [][]int{{3, 4, 5}, {7}, {9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25}}, 20)
			compare("batch B", []int{80, 80, 40}, [][]int{{30}, {31, 32}, {33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50}}, 20)

			after := stats(graphs)
			key1, key3 := fmt.Sprintf("llama4 %p decode 1", mg), fmt.Sprintf("llama4 %p decode 3", mg)
			for _, key := range []string{key1, key3} {
				a, b := after[key], before[key]
				replays, captures := a.Replays-b.Replays, a.Captures-b.Captures
				t.Logf("%s: %d steps, %d replays, %d captures, eager %v", key, a.Steps-b.Steps, replays, captures, a.Eager)
				if a.Eager || replays == 0 {
					t.Errorf("%s was not replayed: %+v", key, a)
				}
				if captures != 1 {
					t.Errorf("%s was recorded %d times, want once: block tables and blocks are data of the replays", key, captures)
				}
			}
			status := "equal, replayed"
			if t.Failed() {
				status = "FAIL"
			}
			row("graph "+fixture, "decode 1 and 3 vs eager", status, fmt.Sprintf("%+v", after[key3]))
		})
	}
}

func stats(b *cuda.Backend) map[string]cuda.GraphStats {
	m := map[string]cuda.GraphStats{}
	for _, s := range b.Graphs() {
		m[s.Key] = s
	}
	return m
}

// logits runs one ForwardBatch step and reads its logits back.
func logits(t *testing.T, b *cuda.Backend, m *llama4.Model, seqs []*llama4.Sequence, ids [][]int) []float32 {
	t.Helper()
	out, err := m.ForwardBatch(context.Background(), seqs, ids, false)
	if err != nil {
		t.Fatal(err)
	}
	v, err := b.Float32(out)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

var _ backend.StepRecorder = (*cuda.Backend)(nil)
