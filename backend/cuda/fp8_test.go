package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/quant"
)

// fp8Formats are the fp8 formats: --quantization fp8 (dynamic activations), weight-only rowwise, and the
// compressed-tensors checkpoint format (weights rounded to bf16).
var fp8Formats = []quant.Format{{Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.FP8}, quant.CompressedTensorsFP8()}

// fp8Paths returns the Counters that say which fp8 path ran between a and b.
func fp8Paths(a, b cuda.Counters) (gemv, staged, gemm, expertGEMV, grouped, outerVec int64) {
	return b.QuantGEMV - a.QuantGEMV, b.FP8Staged - a.FP8Staged, b.QuantFP8Gemm - a.QuantFP8Gemm, b.FP8ExpertGEMV - a.FP8ExpertGEMV,
		b.ExpertsFP8 - a.ExpertsFP8, b.FP8OuterVec - a.FP8OuterVec
}

// TestFP8LinearDecodeVsCPU compares Linear on fp8 weights with the cpu at decode and decode-batch row
// counts (1, 2, 8, 16, 64) on Scout's widths and a small one, float32 and bf16 inputs, and checks the
// path each took: with dynamic activations the fp8 GEMV up to 8 rows (staged, quantising x itself, where
// the rows fit 8192 floats) and the FP8 GEMM above (on sm_89 and later, at its own bound); the weight-only
// formats the fp8 GEMV up to 64 rows.
func TestFP8LinearDecodeVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(91, 92))}
	t.Logf("%s: cuBLASLt outer-vector scaling %v (%s)", g.Info().Arch, g.Info().FP8OuterVec, g.Info().FP8OuterVecNote)
	for _, f := range fp8Formats {
		for _, s := range []struct{ in, out int }{{5120, 1024}, {8192, 640}, {512, 384}} {
			w := e.qweight(f, 0.05, s.out, s.in)
			for _, T := range []int{1, 2, 8, 16, 64} {
				for _, bf := range []bool{false, true} {
					vals := randVals(e.r, T*s.in, 1)
					vals[1] = 3000 // row 0's maximum is clamped to the activation bound
					x, dt := e.pairOf(vals, T, s.in), "f32"
					if bf {
						x, dt = e.bf16PairOf(vals, T, s.in), "bf16"
					}
					gemm := fp8GemmTakes(g, f, T, s.in, s.out)
					bound := quantGEMVRelL2
					if gemm {
						bound = quantFP8GemmRelL2
					}
					before := g.Counters()
					e.qcompare("FP8Linear", fmt.Sprintf("%s x %s [%d %d]x[%d %d]", f, dt, T, s.in, s.out, s.in), bound, func(b backend.Ops, side int) (backend.Tensor, error) {
						return b.Linear(pickSide(x, side), pickSide(w, side))
					})
					gv, st, gm, _, _, ov := fp8Paths(before, g.Counters())
					wantStaged := f.DynamicActivations && T <= 8 && T*s.in <= 8192
					if (gm > 0) != gemm || (gv > 0) == gemm || (st > 0) != wantStaged {
						t.Errorf("%s T %d [%d %d]: fp8 gemv %d (staged %d), FP8 GEMM %d; want the GEMM: %v, staged: %v", f, T, s.out, s.in, gv, st, gm, gemm, wantStaged)
					}
					if gm > 0 && (ov > 0) != g.Info().FP8OuterVec {
						t.Errorf("%s T %d: %d FP8 GEMMs with cuBLASLt's scales, want them: %v (Info.FP8OuterVec)", f, T, ov, g.Info().FP8OuterVec)
					}
				}
			}
		}
	}
}

// TestFP8LinearMultiEqualsLinear: LinearMulti over fp8 weights of one input (q, k, v; a bf16 router
// beside fp8 gate and up) gives each Linear's result bit for bit, at 1 row (one staged launch), 2 rows
// (x quantised once, one launch) and 16 rows (FP8 GEMMs).
func TestFP8LinearMultiEqualsLinear(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(93, 94))}
	const H = 5120
	for _, f := range fp8Formats {
		q, k, v := e.qweight(f, 0.05, 1024, H).g, e.qweight(f, 0.05, 256, H).g, e.qweight(f, 0.05, 256, H).g
		router, gate, up := e.weight(0.05, 16, H).g, e.qweight(f, 0.05, 512, H).g, e.qweight(f, 0.05, 512, H).g
		for _, T := range []int{1, 2, 16} {
			x, err := g.FromFloat32([]int{T, H}, randVals(e.r, T*H, 1))
			if err != nil {
				t.Fatal(err)
			}
			for _, ws := range [][]backend.Tensor{{q, k, v}, {router, gate, up}} {
				before := g.Counters()
				got, err := g.LinearMulti(x, ws...)
				if err != nil {
					t.Fatalf("%s T %d: LinearMulti: %v", f, T, err)
				}
				launches := g.Counters().QuantGEMV - before.QuantGEMV
				for i, w := range ws {
					want, err := g.Linear(x, w)
					if err != nil {
						t.Fatal(err)
					}
					sameTensorBits(t, fmt.Sprintf("%s T %d LinearMulti w%d of %d", f, T, i, len(ws)), g, got[i], g, want)
				}
				t.Logf("%s T %d: %d fp8 GEMV products in LinearMulti", f, T, launches)
			}
		}
	}
}

// sameTensorBits fails t unless a (of backend ba) and b (of bb) hold the same float32 bits.
func sameTensorBits(t *testing.T, name string, ba *cuda.Backend, a backend.Tensor, bb *cuda.Backend, b backend.Tensor) {
	t.Helper()
	av, err := ba.Float32(a)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	bv, err := bb.Float32(b)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(av) != len(bv) {
		t.Fatalf("%s: %d values, want %d", name, len(av), len(bv))
	}
	diff, first := 0, -1
	for i := range av {
		if math.Float32bits(av[i]) != math.Float32bits(bv[i]) {
			if first < 0 {
				first = i
			}
			diff++
		}
	}
	if diff > 0 {
		t.Errorf("%s: %d of %d values differ, first [%d] %g want %g", name, diff, len(av), first, av[first], bv[first])
	}
}

// skewedLogits returns router logits [T, E] under which one expert (3, or the last of fewer) is most
// tokens' first choice, another (5) some tokens', and with 8 or more experts the last four nobody's:
// uneven token counts an expert, idle experts.
func skewedLogits(r *rand.Rand, T, E int) []float32 {
	v := randVals(r, T*E, 1)
	hot, warm := min(3, E-1), min(5, E-1)
	for t := range T {
		v[t*E+hot] += 4
		if t%3 == 0 {
			v[t*E+warm] += 6
		}
		for x := E - 4; x < E && E >= 8; x++ {
			v[t*E+x] -= 10
		}
	}
	return v
}

// TestFP8ExpertsDecodeVsCPU compares Route+Experts on output-major fp8 experts with the cpu at decode
// token counts (1, 2, 8, 16, 64), top-1 and top-2, with uneven token counts an expert (skewedLogits),
// and checks the path: the fp8 expert GEMV for both projections, staged (quantising its rows itself)
// where T·H and T·I fit 8192 floats; with dynamic activations above 8 tokens the grouped fp8 kernels
// (FuseFP8Grouped, sm_89 and later). Also a Scout-wide shape (H 5120) at 1 and 2 tokens.
func TestFP8ExpertsDecodeVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(95, 96))}
	for _, f := range fp8Formats {
		for _, s := range []struct{ E, H, I int }{{16, 1024, 512}, {2, 5120, 2048}} {
			gu := e.qweight(f, float32(2/math.Sqrt(float64(s.H))), s.E, s.H, 2*s.I)
			dn := e.qweight(f, float32(2/math.Sqrt(float64(s.I))), s.E, s.I, s.H)
			for _, T := range []int{1, 2, 8, 16, 64} {
				if s.H > 1024 && T > 2 {
					continue
				}
				for _, k := range []int{1, 2} {
					x := e.input(1, T, s.H)
					logits := e.pairOf(skewedLogits(e.r, T, s.E), T, s.E)
					bound := quantGEMVRelL2
					grouped := fp8GroupedTakes(g, f, T)
					switch {
					case grouped:
						bound = fp8GroupedRelL2
					case f.DynamicActivations:
						bound = quantGEMVActRelL2
					}
					before := g.Counters()
					e.qcompare("FP8Experts", fmt.Sprintf("%s T %d E %d k %d H %d I %d", f, T, s.E, k, s.H, s.I), bound, func(b backend.Ops, side int) (backend.Tensor, error) {
						r, err := b.Route(pickSide(logits, side), k)
						if err != nil {
							return nil, err
						}
						return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
					})
					_, st, _, eg, _, _ := fp8Paths(before, g.Counters())
					if mma := g.Counters().ExpertsMMA - before.ExpertsMMA; grouped {
						if eg != 0 || mma != 1 {
							t.Errorf("%s T %d k %d H %d: %d fp8 expert GEMVs, ExpertsMMA +%d; want the grouped fp8 kernels (0, +1)", f, T, k, s.H, eg, mma)
						}
						continue
					}
					wantStaged := int64(0)
					for _, K := range []int{s.H, s.I} {
						if T*K <= 8192 {
							wantStaged++
						}
					}
					if eg != 2 || st != wantStaged {
						t.Errorf("%s T %d k %d H %d: %d fp8 expert GEMVs (%d staged), want 2 (%d staged)", f, T, k, s.H, eg, st, wantStaged)
					}
				}
			}
		}
	}
}

// TestFP8PrefillVsCPU compares 2048-token prefill on fp8 weights with dynamic activations with the cpu:
// Linear on the FP8 GEMM, and the routed experts (16 experts, uneven counts, idle ones) on the FP8 GEMM
// per active expert. On sm_89 and later the FP8 paths must run, no step may transpose codes (the
// profile has no transpose_u8), and cuBLASLt's outer-vector scales, where on, must match fp8_scale_out's
// to float32 rounding.
func TestFP8PrefillVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(97, 98))}
	f := quant.Format{Kind: quant.FP8, DynamicActivations: true}
	const T, E, H, I = 2048, 16, 1024, 512
	w := e.qweight(f, 0.05, 1536, H)
	gu := e.qweight(f, float32(2/math.Sqrt(H)), E, H, 2*I)
	dn := e.qweight(f, float32(2/math.Sqrt(I)), E, I, H)
	x := e.input(1, T, H)
	logits := e.pairOf(skewedLogits(e.r, T, E), T, E)
	fp8 := fp8GemmArch(g)
	for _, c := range []struct {
		name  string
		bound float64
		op    func(b backend.Ops, side int) (backend.Tensor, error)
	}{
		{"FP8Prefill linear", quantFP8GemmRelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.Linear(pickSide(x, side), pickSide(w, side))
		}},
		{"FP8Prefill experts", quantFP8ActRelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
			r, err := b.Route(pickSide(logits, side), 1)
			if err != nil {
				return nil, err
			}
			return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
		}},
	} {
		before := g.Counters()
		e.qcompare(c.name, fmt.Sprintf("%s T %d E %d H %d I %d", f, T, E, H, I), c.bound, c.op)
		_, _, gm, _, grouped, _ := fp8Paths(before, g.Counters())
		if fp8 && gm+grouped == 0 {
			t.Errorf("%s on %s: the FP8 GEMM did not run", c.name, g.Info().Arch)
		}
		entries, _, err := g.Profile(func() error { _, err := c.op(g, 1); return err })
		if err != nil {
			t.Fatal(err)
		}
		var ops []string
		for _, en := range entries {
			ops = append(ops, en.Op)
			if strings.Contains(en.Op, "transpose") {
				t.Errorf("%s: a step transposes codes: %s ×%d", c.name, en.Op, en.Calls)
			}
		}
		t.Logf("%s: %s", c.name, strings.Join(ops, ", "))
		if g.Info().FP8OuterVec {
			on, err := c.op(g, 1)
			if err != nil {
				t.Fatal(err)
			}
			onv, err := g.Float32(on)
			if err != nil {
				t.Fatal(err)
			}
			old := cuda.SetFP8OuterVec(g, false)
			off, err := c.op(g, 1)
			cuda.SetFP8OuterVec(g, old)
			if err != nil {
				t.Fatal(err)
			}
			offv, err := g.Float32(off)
			if err != nil {
				t.Fatal(err)
			}
			if d := relL2(onv, offv); d > 1e-6 {
				t.Errorf("%s: cuBLASLt's outer-vector scales vs fp8_scale_out: relative L2 %.3g, want <= 1e-6", c.name, d)
			}
		}
	}
}

// TestFP8GraphEqualsEager records decode-shaped fp8 steps as CUDA graphs and requires each replay to give
// an eager backend's result bit for bit: LinearMulti (q, k, v) at 1 row (staged) and 2 rows, Linear at 16
// rows (the FP8 GEMM), and Route+Experts at 1 token (staged) and 16 tokens (rows quantised first).
func TestFP8GraphEqualsEager(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	eager, err := cuda.New(cuda.Config{Poison: true, Eager: true})
	if err != nil {
		t.Fatal(err)
	}
	defer eager.Close()
	r := rand.New(rand.NewPCG(99, 100))
	const H, I, E = 1024, 512, 16
	f := quant.Format{Kind: quant.FP8, DynamicActivations: true}
	type weights struct{ q, k, v, gu, dn backend.Tensor }
	load := func(b *cuda.Backend, seed uint64) weights {
		rr := rand.New(rand.NewPCG(seed, seed))
		mk := func(shape ...int) backend.Tensor {
			n := 1
			for _, d := range shape {
				n *= d
			}
			qw, err := quant.Quantize(f, shape, 1, randVals(rr, n, 0.05))
			if err != nil {
				t.Fatal(err)
			}
			w, err := b.LoadQuantized(qw)
			if err != nil {
				t.Fatal(err)
			}
			return w
		}
		return weights{mk(1024, H), mk(256, H), mk(256, H), mk(E, H, 2*I), mk(E, I, H)}
	}
	wg, we := load(g, 7), load(eager, 7)
	for _, T := range []int{1, 2, 16} {
		xv, lv := randVals(r, T*H, 1), skewedLogits(r, T, E)
		inputs := func(b *cuda.Backend) (x, logits backend.Tensor) {
			var err1, err2 error
			x, err1 = b.FromFloat32([]int{T, H}, xv)
			logits, err2 = b.FromFloat32([]int{T, E}, lv)
			if err1 != nil || err2 != nil {
				t.Fatal(err1, err2)
			}
			return x, logits
		}
		xg, lg := inputs(g)
		xe, le := inputs(eager)
		steps := []struct {
			name string
			f    func(b *cuda.Backend, w weights, x, logits backend.Tensor) (backend.Tensor, error)
		}{
			{"qkv", func(b *cuda.Backend, w weights, x, _ backend.Tensor) (backend.Tensor, error) {
				ys, err := b.LinearMulti(x, w.q, w.k, w.v)
				if err != nil {
					return nil, err
				}
				flat := make([]backend.Tensor, len(ys))
				for i, y := range ys {
					if flat[i], err = b.Reshape(y, y.Shape()[0]*y.Shape()[1]); err != nil {
						return nil, err
					}
				}
				return b.Concat(flat...)
			}},
			{"experts", func(b *cuda.Backend, w weights, x, logits backend.Tensor) (backend.Tensor, error) {
				rt, err := b.Route(logits, 1)
				if err != nil {
					return nil, err
				}
				return b.Experts(x, rt, w.gu, w.dn, 0)
			}},
		}
		for _, st := range steps {
			want, err := st.f(eager, we, xe, le)
			if err != nil {
				t.Fatalf("T %d %s eager: %v", T, st.name, err)
			}
			key := fmt.Sprintf("fp8 %s %d", st.name, T)
			for run := range 4 { // measure, capture, replay, replay
				got, err := g.Step(key, func() (backend.Tensor, error) { return st.f(g, wg, xg, lg) })
				if err != nil {
					t.Fatalf("%s run %d: %v", key, run, err)
				}
				sameTensorBits(t, fmt.Sprintf("%s run %d", key, run), g, got, eager, want)
			}
			for _, s := range g.Graphs() {
				if s.Key == key {
					t.Logf("%s: %+v", key, s)
					if s.Eager || s.Replays == 0 {
						t.Errorf("%s was not replayed: %+v", key, s)
					}
				}
			}
		}
	}
	if !slices.ContainsFunc(g.Graphs(), func(s cuda.GraphStats) bool { return strings.HasPrefix(s.Key, "fp8 ") }) {
		t.Errorf("no fp8 step was recorded")
	}
}
