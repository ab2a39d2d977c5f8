package llama4_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/shard"
)

// tallyingCPU is the cpu backend with a host stand-in for backend.ExpertTallier (a device backend's
// counters), so that the model's tally path runs here: the model then counts through the tally and
// never through the routing's backend.ExpertCounter.
type tallyingCPU struct {
	*cpu.Backend
	adds atomic.Int64
}

var _ backend.ExpertTallier = (*tallyingCPU)(nil)

func (b *tallyingCPU) NewExpertTally(n int) (backend.ExpertTally, error) {
	return &hostTally{b: b, counts: make([]atomic.Int64, n)}, nil
}

type hostTally struct {
	b      *tallyingCPU
	counts []atomic.Int64
}

func (t *hostTally) Add(r backend.Routing, first, n int) error {
	if first < 0 || n < 0 || first+n > len(t.counts) {
		return fmt.Errorf("host tally: [%d, %d+%d) of %d: %w", first, first, n, len(t.counts), backend.ErrShape)
	}
	experts, _, err := t.b.ReadRouting(r)
	if err != nil {
		return err
	}
	for _, e := range experts {
		if e >= 0 && e < n {
			t.counts[first+e].Add(1)
		}
	}
	t.b.adds.Add(1)
	return nil
}

func (t *hostTally) Counts() ([]int64, error) {
	out := make([]int64, len(t.counts))
	for i := range out {
		out[i] = t.counts[i].Load()
	}
	return out, nil
}

// TestExpertTallyEqualsHostCounts: a backend that counts slots on its device (backend.ExpertTallier,
// here a host stand-in) gives the model the ExpertLoad and SlotLoad that counting the cpu routing gives,
// on every fixture with MoE layers, at TP 1 and TP 2, under the plain plans and with replicas of hot
// experts (the tokens per checkpoint expert then come from the sums over its slots).
func TestExpertTallyEqualsHostCounts(t *testing.T) {
	ep := shard.ExpertParallelPlan(llama4.Config{})
	for _, f := range fixtures(t) {
		E := f.cfg.NumExperts
		var moeLayers []int
		for l, isMoE := range f.cfg.MoE {
			if isMoE {
				moeLayers = append(moeLayers, l)
			}
		}
		if len(moeLayers) == 0 {
			continue
		}
		withOrder := func(order []int) shard.Plan {
			layers := map[int][]int{}
			for _, l := range moeLayers {
				layers[l] = order
			}
			return ep.WithOrder("experts", layers)
		}
		tp1Replica := append(slices.Collect(func(yield func(int) bool) {
			for e := E - 1; e >= 0 && yield(e); e-- {
			}
		}), 0) // E-1 .. 0, then expert 0 again: E+1 slots on one rank
		tp2Replicas := []int{E - 1}
		for i := range E / 2 {
			tp2Replicas = append(tp2Replicas, i)
		}
		tp2Replicas = append(tp2Replicas, 0)
		for i := E / 2; i < E; i++ {
			tp2Replicas = append(tp2Replicas, i)
		}
		cases := []struct {
			name string
			plan shard.Plan
			tp   int
		}{
			{"tp/tp1", shard.DefaultPlan(llama4.Config{}), 1},
			{"ep-replicas/tp1", withOrder(tp1Replica), 1},
			{"tp/tp2", shard.DefaultPlan(llama4.Config{}), 2},
			{"ep/tp2", ep, 2},
		}
		if E%2 == 0 {
			cases = append(cases, struct {
				name string
				plan shard.Plan
				tp   int
			}{"ep-replicas/tp2", withOrder(tp2Replicas), 2})
		}
		for _, tc := range cases {
			t.Run(f.name+"/"+tc.name, func(t *testing.T) {
				run := func(tallying bool) (load, slots [][][]int64, adds int64) {
					ranks, ops := loadRanksOn(t, f, tc.plan, comm.NewLocalGroup(tc.tp), tallying)
					var wg sync.WaitGroup
					errs := make([]error, len(ranks))
					for r, m := range ranks {
						wg.Go(func() {
							if _, errs[r] = m.Score(context.Background(), f.scoreIDs[0]); errs[r] != nil {
								return
							}
							_, _, errs[r] = m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{MaxTokens: 6}, nil)
						})
					}
					wg.Wait()
					for r, err := range errs {
						if err != nil {
							t.Fatalf("rank %d: %v", r, err)
						}
					}
					for r, m := range ranks {
						load, slots = append(load, m.ExpertLoad()), append(slots, m.SlotLoad())
						if tc, ok := ops[r].(*tallyingCPU); ok {
							adds += tc.adds.Load()
						}
					}
					return load, slots, adds
				}
				wantLoad, wantSlots, _ := run(false)
				gotLoad, gotSlots, adds := run(true)
				if adds == 0 {
					t.Fatalf("the model never counted through the tally")
				}
				for r := range gotLoad {
					if !slices.EqualFunc(gotLoad[r], wantLoad[0], slices.Equal) {
						t.Errorf("rank %d: ExpertLoad() = %v, want the host count's %v", r, gotLoad[r], wantLoad[0])
					}
					if !slices.EqualFunc(gotSlots[r], wantSlots[0], slices.Equal) {
						t.Errorf("rank %d: SlotLoad() = %v, want the host count's %v", r, gotSlots[r], wantSlots[0])
					}
				}
				var sum int64
				for _, c := range gotLoad[0][moeLayers[0]] {
					sum += c
				}
				if sum == 0 {
					t.Errorf("layer %d counted no tokens: %v", moeLayers[0], gotLoad[0][moeLayers[0]])
				}
				t.Logf("layer %d: tokens %v, slots %v", moeLayers[0], gotLoad[0][moeLayers[0]], gotSlots[0][moeLayers[0]])
			})
		}
	}
}

// loadRanksOn loads every rank of a TP group on its own cpu backend, tallying or not.
func loadRanksOn(t *testing.T, f *fixture, plan shard.Plan, comms []comm.Comm, tallying bool) ([]*llama4.Model, []backend.Ops) {
	t.Helper()
	ranks, ops := make([]*llama4.Model, len(comms)), make([]backend.Ops, len(comms))
	for r, c := range comms {
		man, err := shard.NewManifest(f.cfg, f.ckpt, plan, len(comms), r)
		if err != nil {
			t.Fatal(err)
		}
		ops[r] = cpu.New(cpu.Config{})
		if tallying {
			ops[r] = &tallyingCPU{Backend: ops[r].(*cpu.Backend)}
		}
		m, err := llama4.Load(context.Background(), ops[r], f.cfg, run.NewRankWeights(shard.NewRankReader(f.ckpt, man), ops[r]), llama4.Parallel{Comm: c})
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
		ranks[r] = m
	}
	return ranks, ops
}
