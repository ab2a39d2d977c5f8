package cuda_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

// unfused runs f with every fusion of b off (cuda.Config.Unfuse "all") and then restores them.
func unfused(t *testing.T, b *cuda.Backend, f func()) {
	t.Helper()
	restore, err := cuda.SetUnfuse(b, "all")
	if err != nil {
		t.Fatal(err)
	}
	defer restore()
	f()
}

// sameFloats reads both tensors and reports where they differ bit for bit.
func sameFloats(t *testing.T, b *cuda.Backend, what string, got, want backend.Tensor) {
	t.Helper()
	g, err := b.Float32(got)
	if err != nil {
		t.Fatal(err)
	}
	h, err := b.Float32(want)
	if err != nil {
		t.Fatal(err)
	}
	if len(g) != len(h) {
		t.Fatalf("%s: %d values, want %d", what, len(g), len(h))
	}
	for i := range g {
		if g[i] != h[i] && !(g[i] != g[i] && h[i] != h[i]) {
			t.Errorf("%s: fused [%d] = %g, unfused %g (rel L2 %.3g over all)", what, i, g[i], h[i], relL2(g, h))
			return
		}
	}
}

// moeWeights are one MoE layer's weights: the router, the shared expert and the routed experts.
type moeWeights struct {
	router, gate, up, sharedDown, gateUp, down backend.Tensor
}

func newMoEWeights(t *testing.T, b *cuda.Backend, r *rand.Rand, E, H, I int) moeWeights {
	t.Helper()
	load := func(shape ...int) backend.Tensor {
		n := 1
		for _, d := range shape {
			n *= d
		}
		w, err := b.Load(safetensors.BF16, shape, bf16Data(randVals(r, n, 0.05)))
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	return moeWeights{router: load(E, H), gate: load(I, H), up: load(I, H), sharedDown: load(H, I),
		gateUp: load(E, H, 2*I), down: load(E, I, H)}
}

// moeLayer runs a MoE layer's ops as model/llama4 does and returns the shared activation, the router
// logits and the layer's output, and the step's expert counts.
func moeLayer(t *testing.T, b *cuda.Backend, w moeWeights, tally backend.ExpertTally, x backend.Tensor, k, E int) (act, logits, out backend.Tensor, counts []int64) {
	t.Helper()
	before, err := tally.Counts()
	if err != nil {
		t.Fatal(err)
	}
	act, ys, err := b.LinearGated(x, w.gate, w.up, w.router)
	if err != nil {
		t.Fatal(err)
	}
	r, err := b.Route(ys[0], k)
	if err != nil {
		t.Fatal(err)
	}
	if err := tally.Add(r, 0, E); err != nil {
		t.Fatal(err)
	}
	shared, err := b.Linear(act, w.sharedDown)
	if err != nil {
		t.Fatal(err)
	}
	if out, err = b.ExpertsAdd(x, r, w.gateUp, w.down, 0, shared); err != nil {
		t.Fatal(err)
	}
	if err := b.Synchronize(); err != nil {
		t.Fatal(err)
	}
	after, err := tally.Counts()
	if err != nil {
		t.Fatal(err)
	}
	for i := range after {
		after[i] -= before[i]
	}
	return act, ys[0], out, after
}

// TestFusionsEqualUnfused: every fusion (cuda.Fusions()) but grouped gives what the kernels it replaces
// give, bit for bit: a MoE layer at decode sizes (route_plan, gemv_gated, the experts' SwiGLU and combine
// epilogues, the counts) and prefill sizes (the 16-byte gather, SiLU·mul and combine; packed expert
// blocks), the norms, SiLU·mul, the hi/lo split and the bf16 conversion at decode and prefill sizes.
func TestFusionsEqualUnfused(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	if i := b.Info(); len(i.Fusions) != len(cuda.Fusions()) {
		t.Fatalf("Info().Fusions = %v, want all of %v", i.Fusions, cuda.Fusions())
	}
	// FuseGrouped replaces cuBLASLt's GEMMs and is not bit for bit (TestGroupedEqualsUnfused compares it
	// within bounds): off on both sides here, so that the prefill sizes check pack and the 16-byte kernels.
	restore, err := cuda.SetUnfuse(b, cuda.FuseGrouped)
	if err != nil {
		t.Fatal(err)
	}
	defer restore()
	r := rand.New(rand.NewPCG(21, 22))
	const E, H, I = 8, 512, 256
	w := newMoEWeights(t, b, r, E, H, I)
	tally, err := b.NewExpertTally(E)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []int{1, 2} {
		for _, T := range []int{1, 2, 3, 16, 64, 300} {
			x := randTensor(t, b, r, T, H)
			act, logits, out, counts := moeLayer(t, b, w, tally, x, k, E)
			var uact, ulogits, uout backend.Tensor
			var ucounts []int64
			unfused(t, b, func() { uact, ulogits, uout, ucounts = moeLayer(t, b, w, tally, x, k, E) })
			name := fmt.Sprintf("MoE layer T %d top-%d", T, k)
			sameFloats(t, b, name+" shared activation", act, uact)
			sameFloats(t, b, name+" router logits", logits, ulogits)
			sameFloats(t, b, name+" output", out, uout)
			if !slices.Equal(counts, ucounts) {
				t.Errorf("%s: counts %v, unfused %v", name, counts, ucounts)
			}
		}
	}
	for _, rows := range []int{1, 7, 100} {
		const n = 5120
		x, y := randTensor(t, b, r, rows, n), randTensor(t, b, r, rows, n)
		nw, err := b.Load(safetensors.BF16, []int{n}, bf16Data(randVals(r, n, 2)))
		if err != nil {
			t.Fatal(err)
		}
		sum, normed, err := b.AddRMSNorm(x, y, nw, 1e-5)
		if err != nil {
			t.Fatal(err)
		}
		var usum, unormed backend.Tensor
		unfused(t, b, func() {
			if usum, unormed, err = b.AddRMSNorm(x, y, nw, 1e-5); err != nil {
				t.Fatal(err)
			}
		})
		sameFloats(t, b, fmt.Sprintf("add_rmsnorm rows %d sum", rows), sum, usum)
		sameFloats(t, b, fmt.Sprintf("add_rmsnorm rows %d norm", rows), normed, unormed)
	}
	for _, T := range []int{3, 100} {
		g, u := randTensor(t, b, r, T, 2*I), randTensor(t, b, r, T, 2*I)
		wq := newMoEWeights(t, b, r, E, H, I)
		x := randTensor(t, b, r, T, H)
		run := func() (s, lin, multi backend.Tensor) {
			var err error
			if s, err = b.SiLUMul(g, u); err != nil {
				t.Fatal(err)
			}
			if lin, err = b.Linear(x, wq.router); err != nil { // the hi/lo split (split_bf16)
				t.Fatal(err)
			}
			ys, err := b.LinearMulti(x, wq.gate, wq.up) // x rounded to bf16 once (convert) at 100 rows
			if err != nil {
				t.Fatal(err)
			}
			return s, lin, ys[1]
		}
		s, lin, multi := run()
		var us, ulin, umulti backend.Tensor
		unfused(t, b, func() { us, ulin, umulti = run() })
		sameFloats(t, b, fmt.Sprintf("silu_mul T %d", T), s, us)
		sameFloats(t, b, fmt.Sprintf("split linear T %d", T), lin, ulin)
		sameFloats(t, b, fmt.Sprintf("linear multi T %d", T), multi, umulti)
	}
	status := "equal"
	if t.Failed() {
		status = "FAIL"
	}
	row("fusions", "MoE layer T 1..300, norms, silu_mul, split, convert vs unfused", status, "")
}

// TestQuantExpertEpiloguesEqualUnfused: the fused epilogues of the quantised decode expert GEMVs
// (FuseExpertAct and FuseExpertCombine on int4 experts, q4expert_gemv_swiglu_N and _combine_N, and on
// output-major fp8 experts, fp8_expert_gemv(_xs)_swiglu_N and _combine_N) give what the GEMVs followed by
// expert_act and expert_combine give, bit for bit: Route+ExpertsAdd (the shared expert's add in the
// combine) at 1, 4 and 16 tokens, top-1 and top-2, uneven routing (int4Logits), every int4 and fp8 format.
// The fused kernels must run exactly where the slot limits allow (8 slots for SiLU·mul, 4 for the combine;
// kernel names from Profile), and Experts stays within the GEMV bounds of the cpu. FuseFP8Grouped is off on
// both sides: with it, fp8 experts with dynamic activations take the grouped kernels above 8 tokens.
func TestQuantExpertEpiloguesEqualUnfused(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(131, 132))}
	restoreAll, err := cuda.SetUnfuse(g, cuda.FuseFP8Grouped)
	if err != nil {
		t.Fatal(err)
	}
	defer restoreAll()
	const E, H, I = 8, 512, 256
	for _, f := range slices.Concat(int4Formats, fp8Formats) {
		gu := e.qweight(f, float32(2/math.Sqrt(H)), E, H, 2*I)
		dn := e.qweight(f, float32(2/math.Sqrt(I)), E, I, H)
		for _, T := range []int{1, 4, 16} {
			for _, k := range []int{1, 2} {
				name := fmt.Sprintf("%s T %d k %d", f, T, k)
				x, shared := e.input(1, T, H), e.input(1, T, H)
				logits := int4Logits(e, T, E)
				step := func() (backend.Tensor, error) {
					r, err := g.Route(logits.g, k)
					if err != nil {
						return nil, err
					}
					return g.ExpertsAdd(x.g, r, gu.g, dn.g, 0, shared.g)
				}
				fused, err := step()
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				var plain backend.Tensor
				restore, err := cuda.SetUnfuse(g, cuda.FuseExpertAct+","+cuda.FuseExpertCombine+","+cuda.FuseFP8Grouped)
				if err != nil {
					t.Fatal(err)
				}
				plain, err = step()
				restore()
				if err != nil {
					t.Fatalf("%s unfused: %v", name, err)
				}
				sameFloats(t, g, name+" ExpertsAdd", fused, plain)
				entries, _, err := g.Profile(func() error { _, err := step(); return err })
				if err != nil {
					t.Fatal(err)
				}
				var act, combine, swigluEpi, combineEpi bool
				for _, en := range entries {
					switch op := en.Op; {
					case op == "expert_act":
						act = true
					case op == "expert_combine":
						combine = true
					case op == "q4expert_gemv_swiglu_1", op == "q4expert_gemv_swiglu_2", op == "fp8_expert_gemv_swiglu_1",
						op == "fp8_expert_gemv_swiglu_4", op == "fp8_expert_gemv_xs_swiglu_1", op == "fp8_expert_gemv_xs_swiglu_4":
						swigluEpi = true
					case op == "q4expert_gemv_combine_1", op == "q4expert_gemv_combine_2", op == "fp8_expert_gemv_combine_1",
						op == "fp8_expert_gemv_combine_4", op == "fp8_expert_gemv_xs_combine_1", op == "fp8_expert_gemv_xs_combine_4":
						combineEpi = true
					}
				}
				wantAct, wantCombine := T*k <= 8, T*k <= 4
				if swigluEpi != wantAct || act == wantAct || combineEpi != wantCombine || combine == wantCombine {
					t.Errorf("%s: fused SiLU·mul %v (expert_act %v), fused combine %v (expert_combine %v); want fused SiLU·mul %v, fused combine %v",
						name, swigluEpi, act, combineEpi, combine, wantAct, wantCombine)
				}
				bound := quantGEMVRelL2
				if f.DynamicActivations {
					bound = quantGEMVActRelL2
				}
				e.qcompare("QuantExpertEpilogues", name, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
					r, err := b.Route(pickSide(logits, side), k)
					if err != nil {
						return nil, err
					}
					return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
				})
			}
		}
	}
	status := "equal"
	if t.Failed() {
		status = "FAIL"
	}
	row("quant expert epilogues", "int4, fp8 Experts T 1, 4, 16 fused vs unfused", status, "")
}

// TestAttendBatchQKEqualsUnfused: AttendBatchQK (qk_append: RoPE, qk-norm or the NoPE temperature and the
// cache append in one launch) gives what RoPEQK, ScaleRows and AttendBatch give, bit for bit, and leaves
// the caches alike (a second round attends over what the first appended): decode spans of several
// sequences and a prefill span among them, heads of 64 and 128.
func TestAttendBatchQKEqualsUnfused(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(23, 24))
	const heads, kvHeads = 8, 2
	for _, D := range []int{64, 128} {
		inv := make([]float32, D/2)
		for i := range inv {
			inv[i] = float32(1 / (1 + float64(i)*float64(i)))
		}
		for _, tc := range []struct {
			name string
			tr   func(rows int) backend.QKTransform
		}{
			{"rope+norm", func(int) backend.QKTransform { return backend.QKTransform{InvFreq: inv, Norm: true, Eps: 1e-5} }},
			{"rope", func(int) backend.QKTransform { return backend.QKTransform{InvFreq: inv} }},
			{"temperature", func(rows int) backend.QKTransform {
				s := make([]float32, rows)
				for i := range s {
					s[i] = 1 + float32(i)/7
				}
				return backend.QKTransform{QScale: s}
			}},
		} {
			for _, lens := range [][]int{{1, 1, 1}, {1, 20, 1}} {
				starts := []int{5, 17, 30}
				var fused, plain []backend.KVCache
				for i := range lens {
					for _, cs := range []*[]backend.KVCache{&fused, &plain} {
						c := newCache(t, b, kvHeads, D, 128, backend.Window{Chunk: 16}, 0)
						k, v := randTensor(t, b, rand.New(rand.NewPCG(uint64(i), 1)), starts[i], kvHeads, D), randTensor(t, b, rand.New(rand.NewPCG(uint64(i), 2)), starts[i], kvHeads, D)
						if err := c.Append(k, v, seq(0, starts[i])); err != nil {
							t.Fatal(err)
						}
						*cs = append(*cs, c)
					}
				}
				for round := 0; round < 2; round++ {
					rows := 0
					var fs, ps []backend.AttendSpan
					for i, n := range lens {
						if round == 1 {
							n = 1
						}
						pos := seq(starts[i], n)
						fs = append(fs, backend.AttendSpan{Cache: fused[i], Start: rows, End: rows + n, Pos: pos})
						ps = append(ps, backend.AttendSpan{Cache: plain[i], Start: rows, End: rows + n, Pos: pos})
						rows += n
						starts[i] += n
					}
					q, k, v := randTensor(t, b, r, rows, heads, D), randTensor(t, b, r, rows, kvHeads, D), randTensor(t, b, r, rows, kvHeads, D)
					tr := tc.tr(rows)
					got, err := b.AttendBatchQK(q, k, v, fs, backend.Window{Chunk: 16}, 0.125, tr)
					if err != nil {
						t.Fatal(err)
					}
					var want backend.Tensor
					unfused(t, b, func() {
						if want, err = b.AttendBatchQK(q, k, v, ps, backend.Window{Chunk: 16}, 0.125, tr); err != nil {
							t.Fatal(err)
						}
					})
					sameFloats(t, b, fmt.Sprintf("D %d %s spans %v round %d", D, tc.name, lens, round), got, want)
				}
			}
		}
	}
	status := "equal"
	if t.Failed() {
		status = "FAIL"
	}
	row("fusions", "AttendBatchQK (qk_append) vs RoPEQK+ScaleRows+AttendBatch", status, "")
}

// TestPDLDecodeEqualsSerial decodes a fixture model on a backend with programmatic dependent launch (the
// default) and on one without (cuda.Config.NoPDL), through CUDA graphs and eagerly, and requires the
// same logits at every step: PDL changes when kernels start, never what they compute.
func TestPDLDecodeEqualsSerial(t *testing.T) {
	pdl := newBackend(t, cuda.BF16)
	serial, err := cuda.New(cuda.Config{Poison: true, NoPDL: true})
	if err != nil {
		t.Fatal(err)
	}
	defer serial.Close()
	if serial.Info().PDL {
		t.Errorf("NoPDL backend: Info().PDL = true")
	}
	i := pdl.Info()
	t.Logf("%s (%s): PDL %v, fusions %v", i.Device, i.Arch, i.PDL, i.Fusions)
	// Unless the environment turned it off (TPFLEET_CUDA_PDL=0, as when a run bisects a failure).
	if cc, _ := strconv.Atoi(strings.TrimPrefix(i.Arch, "sm_")); cc >= 90 && !i.PDL && os.Getenv(cuda.EnvPDL) != "0" {
		t.Errorf("%s on %s: PDL off by default (driver without cuLaunchKernelEx, or a launch refused)", i.Device, i.Arch)
	}
	dir := filepath.Join(fixturesDir(t), "moe-top1")
	cfg, ckpt := openFixture(t, dir)
	ctx := context.Background()
	var models []*llama4.Model
	for _, b := range []*cuda.Backend{pdl, serial} {
		m, err := llama4.Load(ctx, b, cfg, llama4.NewCheckpointWeights(ckpt, b, cfg), llama4.Parallel{})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.SetKVBlocks(16, 64); err != nil {
			t.Fatal(err)
		}
		models = append(models, m)
	}
	var seqs [2][]*llama4.Sequence
	for s := range seqs {
		for range 3 {
			q, err := models[s].NewSequence(64)
			if err != nil {
				t.Fatal(err)
			}
			seqs[s] = append(seqs[s], q)
		}
	}
	ids := [][]int{{3, 4, 5}, {7}, {9, 10, 11, 12, 13, 14, 15, 16, 17, 18}}
	for step := 0; step <= 24; step++ {
		if step > 0 {
			for j := range ids {
				ids[j] = []int{(step*37 + j*101 + 5) % cfg.VocabSize}
			}
		}
		a, b := logits(t, pdl, models[0], seqs[0], ids), logits(t, serial, models[1], seqs[1], ids)
		if !slices.Equal(a, b) {
			t.Fatalf("step %d: logits with PDL differ from without (rel L2 %.3g)", step, relL2(a, b))
		}
	}
	for s := range seqs {
		for _, q := range seqs[s] {
			q.Free()
		}
	}
	status := "equal"
	if t.Failed() {
		status = "FAIL"
	}
	row("pdl "+i.Arch, fmt.Sprintf("decode 3 × 24 steps, PDL %v vs off", i.PDL), status, "")
}
