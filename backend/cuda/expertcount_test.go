package cuda_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// marginCPU is the cpu backend noting the smallest gap, over every token routed, between the k-th and the
// (k+1)-th router logit: a choice the cuda backend's float32 rounding could flip only sits that close.
type marginCPU struct {
	*cpu.Backend
	min float64
}

func (b *marginCPU) Route(logits backend.Tensor, k int) (backend.Routing, error) {
	if v, err := b.Float32(logits); err == nil && len(logits.Shape()) == 2 {
		E := logits.Shape()[1]
		for row := 0; row+E <= len(v) && k < E; row += E {
			s := slices.Clone(v[row : row+E])
			sort.Slice(s, func(i, j int) bool { return s[i] > s[j] })
			b.min = math.Min(b.min, float64(s[k-1]-s[k]))
		}
	}
	return b.Backend.Route(logits, k)
}

// sharpRouter gives a fixture's model routing decisions far from ties, so that cuda (bf16 KV cache and
// GEMM inputs: ~1e-3 relative error in the hidden state) routes every token exactly as cpu does and the
// counts can be compared exactly: token v's embedding gets +3000 on coordinate v mod E and +1500 on
// another coordinate (by v / E), the MoE input norm weight 1 on coordinates 0..E-1 (the fixtures' are
// random, some near zero or negative), and router row e +10 on coordinate e, so that the top two
// experts of a token lead the rest by far more than rounding moves a logit (marginCPU logs the smallest
// gap). The other weights are the fixture's.
type sharpRouter struct {
	llama4.Weights
	ops backend.Ops
	E   int
}

func (w sharpRouter) Load(ctx context.Context, name string) (backend.Tensor, llama4.Layout, error) {
	t, lay, err := w.Weights.Load(ctx, name)
	router := strings.HasSuffix(name, ".feed_forward.router.weight")
	norm := strings.HasSuffix(name, ".post_attention_layernorm.weight")
	if err != nil || w.E < 2 || (name != "model.embed_tokens.weight" && !router && !norm) {
		return t, lay, err
	}
	v, err := w.ops.Float32(t)
	if err != nil {
		return nil, lay, err
	}
	if norm {
		for e := range w.E {
			v[e] = 1
		}
		return w.load(t, lay, v)
	}
	H := t.Shape()[1]
	for r := range t.Shape()[0] {
		row := v[r*H : (r+1)*H]
		if router {
			e := r
			if lay.Units != nil {
				e = lay.Units[r]
			}
			row[e] += 10
			continue
		}
		a := r % w.E
		row[a] += 3000
		row[(a+1+(r/w.E)%(w.E-1))%w.E] += 1500
	}
	return w.load(t, lay, v)
}

// load makes a bf16 tensor of t's shape from v.
func (w sharpRouter) load(t backend.Tensor, lay llama4.Layout, v []float32) (backend.Tensor, llama4.Layout, error) {
	data := make([]byte, 2*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint16(data[2*i:], safetensors.Float32ToBF16(f))
	}
	out, err := w.ops.Load(safetensors.BF16, t.Shape(), data)
	return out, lay, err
}

// TestExpertCountsEqualCPU: the tokens per expert and per expert slot a model counts on the GPU
// (backend.ExpertTallier: count_experts into device counters) are exactly the cpu backend's (its routing
// counted on the host), for every fixture (with sharpRouter's embedding and router), under the plain
// plan and under an ep order with a replica (expert 0 in two slots, so MapExperts runs before the count),
// on a backend that records decode steps as CUDA graphs and on an eager one (bf16 activations, the
// default). The steps are a prefill and decode steps of one sequence, then of three: on the graphs backend
// the decode keys must have been replayed, so replays count too. Meanwhile another goroutine reads the
// counts, as a worker's Status does: the reads never fail, never go down, and do not spoil the recordings.
func TestExpertCountsEqualCPU(t *testing.T) {
	graphs := newBackend(t, cuda.BF16)
	eager, err := cuda.New(cuda.Config{Poison: true, Eager: true})
	if err != nil {
		t.Fatal(err)
	}
	defer eager.Close()
	ctx := context.Background()
	for _, fixture := range []string{"moe-top1", "moe-top2", "dense-moe-mm"} {
		dir := filepath.Join(fixturesDir(t), fixture)
		cfg, ckpt := openFixture(t, dir)
		E := cfg.NumExperts
		replica := make([]int, E+1) // E-1 .. 0, then expert 0 again: E+1 slots on the one rank
		for i := range E {
			replica[i] = E - 1 - i
		}
		layers := map[int][]int{}
		for l, isMoE := range cfg.MoE {
			if isMoE {
				layers[l] = replica
			}
		}
		plans := []struct {
			name string
			plan *shard.Plan
		}{{"plain", nil}, {"replica", ptr(shard.ExpertParallelPlan(llama4.Config{}).WithOrder("experts", layers))}}
		for _, pl := range plans {
			t.Run(fixture+"/"+pl.name, func(t *testing.T) {
				load := func(ops backend.Ops) *llama4.Model {
					t.Helper()
					var w llama4.Weights = llama4.NewCheckpointWeights(ckpt, ops, cfg)
					if pl.plan != nil {
						man, err := shard.NewManifest(cfg, ckpt, *pl.plan, 1, 0)
						if err != nil {
							t.Fatal(err)
						}
						w = run.NewRankWeights(shard.NewRankReader(ckpt, man), ops)
					}
					m, err := llama4.Load(ctx, ops, cfg, sharpRouter{Weights: w, ops: ops, E: E}, llama4.Parallel{})
					if err != nil {
						t.Fatal(err)
					}
					if err := m.SetKVBlocks(16, 64); err != nil {
						t.Fatal(err)
					}
					return m
				}
				ref := &marginCPU{Backend: cpu.New(cpu.Config{}), min: math.Inf(1)}
				mc := load(ref)
				driveExperts(t, ref, mc, cfg.VocabSize)
				wantLoad, wantSlots := mc.ExpertLoad(), mc.SlotLoad()
				t.Logf("cpu: tokens per expert %v, per slot %v; smallest top-k router margin %.3g", wantLoad, wantSlots, ref.min)

				for _, b := range []struct {
					name string
					b    *cuda.Backend
				}{{"graphs", graphs}, {"eager", eager}} {
					m := load(b.b)
					before := stats(b.b)
					var stop atomic.Bool
					var reads atomic.Int64
					var readErr error
					var wg sync.WaitGroup
					if b.name == "graphs" {
						wg.Go(func() { readErr = readWhileRunning(m, &stop, &reads) })
					}
					driveExperts(t, b.b, m, cfg.VocabSize)
					stop.Store(true)
					wg.Wait()
					if readErr != nil {
						t.Errorf("%s: counts read during the steps: %v", b.name, readErr)
					}
					gotLoad, gotSlots := m.ExpertLoad(), m.SlotLoad()
					if !slices.EqualFunc(gotLoad, wantLoad, slices.Equal) {
						t.Errorf("%s: ExpertLoad() = %v, want cpu's %v (smallest router margin %.3g)", b.name, gotLoad, wantLoad, ref.min)
					}
					if !slices.EqualFunc(gotSlots, wantSlots, slices.Equal) {
						t.Errorf("%s: SlotLoad() = %v, want cpu's %v", b.name, gotSlots, wantSlots)
					}
					after := stats(b.b)
					var replays int64
					for _, key := range []string{fmt.Sprintf("llama4 %p decode 1", m), fmt.Sprintf("llama4 %p decode 3", m)} {
						a := after[key]
						replays += a.Replays - before[key].Replays
						if b.name == "graphs" && (a.Eager || a.Replays == 0) {
							t.Errorf("graphs: %s was not replayed: %+v", key, a)
						}
					}
					t.Logf("%s: tokens per expert %v, per slot %v; %d replays; %d concurrent reads", b.name, gotLoad, gotSlots, replays, reads.Load())
					status := "equal"
					if t.Failed() {
						status = "FAIL"
					}
					row("expert counts "+fixture+"/"+pl.name, b.name+" vs cpu", status, fmt.Sprintf("replays %d, reads %d, margin %.3g", replays, reads.Load(), ref.min))
				}
			})
		}
	}
}

func ptr[T any](v T) *T { return &v }

// driveExperts runs a prefill and 30 decode steps of one sequence, then a prefill and 16 decode steps of
// three, with fixed token ids (teacher forcing: the same on every backend), reading each step's logits,
// and frees the sequences.
func driveExperts(t *testing.T, ops backend.Ops, m *llama4.Model, vocab int) {
	t.Helper()
	for _, ph := range []struct {
		capacities []int
		prompts    [][]int
		steps      int
	}{
		{[]int{64}, [][]int{{1, 475 % vocab, 188 % vocab, 269 % vocab, 460 % vocab}}, 30},
		{[]int{64, 100, 48}, [][]int{{3, 4, 5}, {7}, {9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25}}, 16},
	} {
		seqs := make([]*llama4.Sequence, len(ph.capacities))
		for i, c := range ph.capacities {
			s, err := m.NewSequence(c)
			if err != nil {
				t.Fatal(err)
			}
			seqs[i] = s
		}
		for step := 0; step <= ph.steps; step++ {
			ids := ph.prompts
			if step > 0 {
				ids = make([][]int, len(seqs))
				for i := range ids {
					ids[i] = []int{(step*37 + i*101 + 5) % vocab}
				}
			}
			out, err := m.ForwardBatch(context.Background(), seqs, ids, false)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ops.Float32(out); err != nil {
				t.Fatal(err)
			}
		}
		for _, s := range seqs {
			s.Free()
		}
	}
}

// readWhileRunning reads m's counts until stop, as a worker's Status does from its own goroutine: each
// read must give every MoE layer counts, and no count may go down.
func readWhileRunning(m *llama4.Model, stop *atomic.Bool, reads *atomic.Int64) error {
	var last [][]int64
	for !stop.Load() {
		cur := m.SlotLoad()
		if !slices.ContainsFunc(cur, func(c []int64) bool { return c != nil }) {
			return fmt.Errorf("read %d: no layer has counts (the read failed)", reads.Load())
		}
		for l, c := range cur {
			if last != nil && (c == nil) != (last[l] == nil) {
				return fmt.Errorf("read %d: layer %d: counts %v after %v", reads.Load(), l, c, last[l])
			}
			for s := range c {
				if last != nil && c[s] < last[l][s] {
					return fmt.Errorf("read %d: layer %d slot %d went down: %v after %v", reads.Load(), l, s, c, last[l])
				}
			}
		}
		last = cur
		reads.Add(1)
	}
	return nil
}
