package llama4_test

import (
	"bytes"
	"context"
	"math"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

var _ shard.Source = (*dummy.Source)(nil)

// loadDummy loads every rank of TP tp of cfg's generated weights (seed) in format f.
func loadDummy(t *testing.T, cfg llama4.Config, seed uint64, tp int, f quant.Format) []*llama4.Model {
	t.Helper()
	src, err := dummy.NewSource(cfg, seed)
	if err != nil {
		t.Fatal(err)
	}
	view, err := shard.NewView(cfg, src)
	if err != nil {
		t.Fatal(err)
	}
	comms := comm.NewLocalGroup(tp)
	ranks := make([]*llama4.Model, tp)
	for r := range tp {
		man, err := shard.NewManifest(cfg, view, shard.DefaultPlan(cfg), tp, r)
		if err != nil {
			t.Fatal(err)
		}
		ops := cpu.New(cpu.Config{})
		w := run.NewRankWeights(shard.NewRankReader(view, man), ops).WithFormat(cfg, f)
		if ranks[r], err = llama4.Load(context.Background(), ops, cfg, w, llama4.Parallel{Comm: comms[r]}); err != nil {
			t.Fatalf("rank %d of %d: %v", r, tp, err)
		}
	}
	return ranks
}

// TestDummyWeights: generated weights (--load-format dummy) give finite logits on every fixture's
// configuration, in bf16 and quantised at load; TP=2 gives TP=1's logits (each rank generated only its own
// slices); the same seed gives the same bytes, another seed others.
func TestDummyWeights(t *testing.T) {
	ids := []int{1, 5, 9, 200 % 256, 42, 7, 3, 11, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59}
	for _, fx := range fixtures(t) {
		t.Run(fx.name, func(t *testing.T) {
			score := func(ranks []*llama4.Model) []float32 {
				return onAllRanks(t, ranks, func(m *llama4.Model) ([]float32, error) { return m.Score(context.Background(), ids) })
			}
			want := score(loadDummy(t, fx.cfg, 7, 1, quant.Format{}))
			var amax float64
			for i, v := range want {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					t.Fatalf("TP 1 logit %d = %v, want finite", i, v)
				}
				amax = math.Max(amax, math.Abs(float64(v)))
			}
			if amax == 0 {
				t.Fatalf("TP 1 logits are all zero")
			}
			if worst, at := maxRelDiff(t, score(loadDummy(t, fx.cfg, 7, 2, quant.Format{})), want, fx.cfg.VocabSize); worst > 1e-5 {
				t.Errorf("TP 2 vs TP 1: max |Δ|/max |ref| = %.3g at position %d, want <= 1e-5", worst, at)
			}
			for _, f := range []quant.Format{{Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 16}} {
				for i, v := range score(loadDummy(t, fx.cfg, 7, 1, f)) {
					if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
						t.Fatalf("%s: logit %d = %v, want finite", f, i, v)
					}
				}
			}
		})
	}
	fx := fixtures(t)[0]
	a, _ := dummy.NewSource(fx.cfg, 7)
	b, _ := dummy.NewSource(fx.cfg, 7)
	c, _ := dummy.NewSource(fx.cfg, 8)
	for _, name := range a.Names() {
		info, _ := a.Info(name)
		if len(info.Shape) < 2 {
			continue
		}
		x, err := a.ReadAll(name)
		if err != nil {
			t.Fatal(err)
		}
		y, _ := b.ReadAll(name)
		z, _ := c.ReadAll(name)
		if !bytes.Equal(x, y) {
			t.Errorf("%s: two sources of seed 7 differ", name)
		}
		if bytes.Equal(x, z) {
			t.Errorf("%s: seeds 7 and 8 give the same bytes", name)
		}
		// A slice is the whole tensor's part: ranges along the last dim, concatenated.
		last := len(info.Shape) - 1
		n := info.Shape[last]
		part, shape, err := a.ReadSlice(name, last, safetensors.Range{Start: n / 2, End: n}, safetensors.Range{Start: 0, End: 1})
		if err != nil {
			t.Fatal(err)
		}
		rows := len(x) / 2 / n
		for r := range rows {
			wantRow := append(append([]byte(nil), x[2*(r*n+n/2):2*(r*n+n)]...), x[2*r*n:2*(r*n+1)]...)
			if got := part[2*r*shape[last] : 2*(r+1)*shape[last]]; !bytes.Equal(got, wantRow) {
				t.Fatalf("%s: ReadSlice row %d differs from ReadAll's", name, r)
			}
		}
	}
}
