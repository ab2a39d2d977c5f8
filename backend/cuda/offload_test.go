package cuda_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
)

// offloadRelL2 bounds offloaded against resident Experts on the same card: the same kernels on the same
// expert weights, but on compact weights of the chosen experts, so the split of K over blocks (which
// depends on the number of experts) may differ: the summation order only.
const offloadRelL2 = 1e-5

// TestOffloadExpertsVsResident: Experts and ExpertsAdd on experts weights kept in pinned host memory
// (OffloadExperts) give the resident weights' result for bf16, fp8 (dynamic activations) and int4, at
// decode (1 and 7 tokens), 300 tokens (the grouped GEMMs), top-1 and top-2, all experts here and half of
// them (first 4 of 8: expert parallelism). A batch-1 top-1 call copies exactly one expert of each
// weight (OffloadStats); other ops refuse an offloaded weight.
func TestOffloadExpertsVsResident(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(71, 72))}
	const E, H, I = 8, 256, 128
	for _, f := range []quant.Format{{}, {Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 128}} {
		var gu, dn backend.Tensor
		if f.Quantized() {
			gu, dn = e.qweight(f, 0.1, E, H, 2*I).g, e.qweight(f, 0.1, E, I, H).g
		} else {
			gu, dn = e.weight(0.1, E, H, 2*I).g, e.weight(0.1, E, I, H).g
		}
		hgu, err := g.OffloadExperts(gu)
		if err != nil {
			t.Fatalf("%s: OffloadExperts: %v", f, err)
		}
		hdn, err := g.OffloadExperts(dn)
		if err != nil {
			t.Fatalf("%s: OffloadExperts: %v", f, err)
		}
		for _, s := range []struct{ T, k, first, local int }{{1, 1, 0, E}, {1, 2, 0, E}, {7, 2, 0, E}, {300, 2, 0, E}, {7, 1, 4, E / 2}, {300, 1, 4, E / 2}} {
			x, add := e.input(1, s.T, H).g, e.input(1, s.T, H).g
			logits, err := g.FromFloat32([]int{s.T, E}, randVals(e.r, s.T*E, 3))
			if err != nil {
				t.Fatal(err)
			}
			wgu, wdn, ogu, odn := gu, dn, hgu, hdn
			if s.local < E { // the rank holds experts [first, first+local): slices of the stacked weights
				if wgu, wdn, ogu, odn, err = halfExperts(g, f, e, s.first, s.local); err != nil {
					t.Fatal(err)
				}
			}
			for _, withAdd := range []bool{false, true} {
				call := func(a, b backend.Tensor) ([]float32, error) {
					r, err := g.Route(logits, s.k)
					if err != nil {
						return nil, err
					}
					var y backend.Tensor
					if withAdd {
						y, err = g.ExpertsAdd(x, r, a, b, s.first, add)
					} else {
						y, err = g.Experts(x, r, a, b, s.first)
					}
					if err != nil {
						return nil, err
					}
					return g.Float32(y)
				}
				want, err := call(wgu, wdn)
				if err != nil {
					t.Fatalf("%s resident: %v", f, err)
				}
				before := g.OffloadStats()
				got, err := call(ogu, odn)
				if err != nil {
					t.Fatalf("%s offloaded: %v", f, err)
				}
				st := g.OffloadStats()
				shape := fmt.Sprintf("%s T %d k %d experts [%d,%d) of %d add %v", f, s.T, s.k, s.first, s.first+s.local, E, withAdd)
				rel := relL2(got, want)
				if rel > offloadRelL2 || math.IsNaN(rel) {
					t.Errorf("%s: offloaded vs resident relative L2 = %.3g, want <= %.3g", shape, rel, offloadRelL2)
				}
				copied := st.Experts - before.Experts
				if s.T == 1 && s.k == 1 && s.local == E && copied != 2 {
					t.Errorf("%s: copied %d expert slices, want 2 (the one chosen expert's gate_up and down)", shape, copied)
				}
				t.Logf("%-60s relL2 %.3g, copied %d slices, %d bytes", shape, rel, copied, st.Bytes-before.Bytes)
				row("Offload experts", shape, fmt.Sprintf("relL2 %.2e", rel), fmt.Sprintf("%d slices %d B", copied, st.Bytes-before.Bytes))
			}
		}
		// A routing that is not the last one Route made takes the path without overlap (a stream
		// synchronisation, copies on the compute stream): same result.
		x, logits := e.input(1, 5, H).g, e.input(3, 5, E).g
		r1, err := g.Route(logits, 2)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := g.Route(e.input(3, 5, E).g, 2); err != nil {
			t.Fatal(err)
		}
		want, err := g.Experts(x, r1, gu, dn, 0)
		if err != nil {
			t.Fatal(err)
		}
		got, err := g.Experts(x, r1, hgu, hdn, 0)
		if err != nil {
			t.Fatalf("%s offloaded, an older routing: %v", f, err)
		}
		wv, _ := g.Float32(want)
		gv, err := g.Float32(got)
		if err != nil {
			t.Fatal(err)
		}
		if rel := relL2(gv, wv); rel > offloadRelL2 || math.IsNaN(rel) {
			t.Errorf("%s T 5 k 2, an older routing: offloaded vs resident relative L2 = %.3g, want <= %.3g", f, rel, offloadRelL2)
		}
		if _, err := g.Linear(e.input(1, 1, H).g, hgu); !errors.Is(err, backend.ErrShape) {
			t.Errorf("Linear on an offloaded weight = %v, want ErrShape", err)
		}
	}
}

// halfExperts makes fresh weights of local experts (the rank's part under expert parallelism) and their
// offloaded forms.
func halfExperts(g *cuda.Backend, f quant.Format, e *opEnv, first, local int) (gu, dn, hgu, hdn backend.Tensor, err error) {
	const H, I = 256, 128
	if f.Quantized() {
		gu, dn = e.qweight(f, 0.1, local, H, 2*I).g, e.qweight(f, 0.1, local, I, H).g
	} else {
		gu, dn = e.weight(0.1, local, H, 2*I).g, e.weight(0.1, local, I, H).g
	}
	if hgu, err = g.OffloadExperts(gu); err != nil {
		return
	}
	hdn, err = g.OffloadExperts(dn)
	return
}

// TestOffloadGolden: a fixture model loaded with its routed experts offloaded (run.OffloadWeights, as
// --offload-experts loads) scores the golden ids with the resident model's logits (relative L2 <= 1e-5)
// and decodes the same greedy ids, in bf16 and with --quantization fp8 and int4.
func TestOffloadGolden(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	dir := filepath.Join(fixturesDir(t), "moe-top2")
	cfg, err := llama4.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, gold := openGolden(t, dir)
	row0 := make([]int, gold.seq)
	for i := range row0 {
		row0[i] = int(gold.ids[i])
	}
	ctx := context.Background()
	for _, f := range []quant.Format{{}, {Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 32}} {
		load := func(offload bool) *llama4.Model {
			var w run.Weights = llama4.NewCheckpointWeights(ckpt, b, cfg).WithFormat(cfg, f)
			if offload {
				ow, err := run.NewOffloadWeights(w, cfg, b)
				if err != nil {
					t.Fatal(err)
				}
				w = ow
				defer func() {
					if ow.Offloaded == 0 {
						t.Errorf("%s: no experts tensor was offloaded", f)
					}
				}()
			}
			m, err := llama4.Load(ctx, b, cfg, w, llama4.Parallel{})
			if err != nil {
				t.Fatalf("%s offload %v: %v", f, offload, err)
			}
			return m
		}
		res, off := load(false), load(true)
		want, err := res.Score(ctx, row0)
		if err != nil {
			t.Fatal(err)
		}
		before := b.OffloadStats()
		got, err := off.Score(ctx, row0)
		if err != nil {
			t.Fatalf("%s offloaded score: %v", f, err)
		}
		rel := relL2(got, want)
		if rel > offloadRelL2 || math.IsNaN(rel) {
			t.Errorf("%s: offloaded vs resident logits relative L2 = %.3g, want <= %.3g", f, rel, offloadRelL2)
		}
		prompt := row0[:8]
		wantIDs, _, err := res.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 16}, nil)
		if err != nil {
			t.Fatal(err)
		}
		gotIDs, _, err := off.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 16}, nil)
		if err != nil {
			t.Fatalf("%s offloaded generate: %v", f, err)
		}
		if !slices.Equal(gotIDs, wantIDs) {
			t.Errorf("%s: offloaded greedy ids %v, resident %v", f, gotIDs, wantIDs)
		}
		st := b.OffloadStats()
		t.Logf("%s: logits relL2 %.3g, greedy ids equal: %v; %d offloaded Experts calls copied %d bytes", f, rel, slices.Equal(gotIDs, wantIDs),
			st.Calls-before.Calls, st.Bytes-before.Bytes)
		row("Offload golden", "moe-top2 "+f.String(), fmt.Sprintf("relL2 %.2e", rel), fmt.Sprintf("%d B copied", st.Bytes-before.Bytes))
	}
}
