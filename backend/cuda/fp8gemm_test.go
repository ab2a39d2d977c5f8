package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// quantFP8GemmRelL2 bounds the FP8 prefill GEMM against the cpu: the products of E4M3 codes are exact and
// the scales are applied once, so only the tensor cores' float32 accumulation (and its order) differs
// from the cpu's sum of the same products: about 1e-6 relative. A wrong scale, row or code gives errors of
// order one; the bound leaves room for the FP8 accumulator's reduced precision on Hopper.
const quantFP8GemmRelL2 = 1e-3

// fp8GemmArch reports whether the card has FP8 tensor cores (sm_89 and later), where Linear must take
// the FP8 GEMM.
func fp8GemmArch(g *cuda.Backend) bool {
	arch := strings.TrimPrefix(g.Info().Arch, "sm_")
	n, err := strconv.Atoi(strings.TrimRight(arch, "a"))
	return err == nil && n >= 89
}

// TestQuantFP8GemmVsCPU compares Linear on fp8 weights with dynamic activations (--quantization fp8) at
// prefill row counts with the cpu backend: the FP8 GEMM (fp8_act_codes, cuBLASLt on the codes with its
// outer-vector scales or fp8_scale_out) with float32 and bf16 inputs, rows with a clamped maximum (above the activation bound
// 1200) and a zero row; the same shapes on the dequantised path (SetFP8Gemm off) for comparison; and a
// width the FP8 GEMM does not take (out not a multiple of 16: the dequantised path). On sm_89 and later
// the FP8 GEMM must have run (Counters.QuantFP8Gemm).
func TestQuantFP8GemmVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(51, 52))}
	f := quant.Format{Kind: quant.FP8, DynamicActivations: true}
	for _, s := range []struct{ T, in, out int }{{65, 512, 384}, {300, 2048, 1536}, {2048, 5120, 1024}, {129, 1024, 200}} {
		w := e.qweight(f, 0.05, s.out, s.in)
		vals := randVals(e.r, s.T*s.in, 1)
		vals[3] = 5000                      // row 0's maximum is clamped to the activation bound
		clear(vals[s.in : 2*s.in])          // row 1 is zero
		xf := e.pairOf(vals, s.T, s.in)     // float32 rows
		xb := e.bf16PairOf(vals, s.T, s.in) // bf16 rows (the cpu gets the same bf16-rounded values)
		fast := s.out%16 == 0 && s.in%16 == 0
		for _, in := range []struct {
			name string
			x    pair
		}{{"f32", xf}, {"bf16", xb}} {
			for _, on := range []bool{true, false} {
				old := cuda.SetFP8Gemm(g, on)
				before := g.Counters()
				name := "QFP8Gemm"
				bound := quantFP8GemmRelL2
				if !on || !fast {
					name, bound = "QFP8Deq", quantBF16RelL2
				}
				e.qcompare(name, fmt.Sprintf("%s x %s [%d %d]x[%d %d]", f, in.name, s.T, s.in, s.out, s.in), bound, func(b backend.Ops, side int) (backend.Tensor, error) {
					return b.Linear(pickSide(in.x, side), pickSide(w, side))
				})
				ran := g.Counters().QuantFP8Gemm - before.QuantFP8Gemm
				if want := on && fast && fp8GemmArch(g); (ran > 0) != want {
					t.Errorf("%s [%d %d]x[%d %d] with the FP8 GEMM %v on %s: it ran %d times, want it to run: %v", in.name, s.T, s.in, s.out, s.in, on, g.Info().Arch, ran, want)
				}
				cuda.SetFP8Gemm(g, old)
			}
		}
	}
}

// quantFP8ActRelL2 bounds the routed experts on the FP8 GEMM against the cpu: the products are exact, so
// the gate and up sums differ from the cpu's by the accumulation only, but the SwiGLU rows are rounded to
// E4M3 again before down, and an element near a rounding midpoint lands on the neighbouring value (a step
// is 6–12 % of it): a few 1e-3 relative L2 expected; a wrong expert, row or scale gives order one.
const quantFP8ActRelL2 = 3e-2

// TestQuantFP8ExpertsVsCPU compares Route+Experts (and ExpertsAdd) on fp8 expert weights with dynamic
// activations at prefill token counts with the cpu: the FP8 GEMM per active expert (fp8_act_codes on the
// gathered rows, cuBLASLt on the expert's output-major codes, the scales) and, for comparison, the
// dequantised grouped path (SetFP8Gemm off). On sm_89 and later the FP8 path must have run
// (Counters.ExpertsFP8).
func TestQuantFP8ExpertsVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(81, 82))}
	f := quant.Format{Kind: quant.FP8, DynamicActivations: true}
	for _, s := range []struct{ T, E, k, H, I int }{{300, 8, 2, 256, 128}, {129, 16, 1, 1024, 512}, {1000, 4, 1, 512, 256}} {
		x, add := e.input(1, s.T, s.H), e.input(1, s.T, s.H)
		logits := e.input(3, s.T, s.E)
		gu := e.qweight(f, float32(2/math.Sqrt(float64(s.H))), s.E, s.H, 2*s.I)
		dn := e.qweight(f, float32(2/math.Sqrt(float64(s.I))), s.E, s.I, s.H)
		for _, on := range []bool{true, false} {
			old := cuda.SetFP8Gemm(g, on)
			before := g.Counters()
			name, bound := "QExpertsFP8", quantFP8ActRelL2
			if !on {
				name, bound = "QExpertsDeq", quantBF16ActRelL2
			}
			e.qcompare(name, fmt.Sprintf("%s T %d E %d k %d H %d I %d +add", f, s.T, s.E, s.k, s.H, s.I), bound, routedAdd(g, logits, x, gu, dn, add, s.k, 0))
			ran := g.Counters().ExpertsFP8 - before.ExpertsFP8
			if want := on && fp8GemmArch(g); (ran > 0) != want {
				t.Errorf("T %d E %d with the FP8 GEMM %v on %s: the FP8 experts path ran %d times, want it to run: %v", s.T, s.E, on, g.Info().Arch, ran, want)
			}
			cuda.SetFP8Gemm(g, old)
		}
	}
}

// pairOf loads vals [rows, cols] as float32 on both backends.
func (e *opEnv) pairOf(vals []float32, shape ...int) pair {
	e.t.Helper()
	c, err := e.cpu.FromFloat32(shape, vals)
	if err != nil {
		e.t.Fatal(err)
	}
	g, err := e.gpu.FromFloat32(shape, vals)
	if err != nil {
		e.t.Fatal(err)
	}
	return pair{c, g}
}

// bf16PairOf loads vals rounded to bf16: a bf16 tensor on the GPU, their float32 values on the cpu.
func (e *opEnv) bf16PairOf(vals []float32, shape ...int) pair {
	e.t.Helper()
	data := bf16Data(vals)
	rounded := make([]float32, len(vals))
	if err := safetensors.ToFloat32(safetensors.BF16, data, rounded); err != nil {
		e.t.Fatal(err)
	}
	c, err := e.cpu.FromFloat32(shape, rounded)
	if err != nil {
		e.t.Fatal(err)
	}
	g, err := e.gpu.Load(safetensors.BF16, shape, data)
	if err != nil {
		e.t.Fatal(err)
	}
	return pair{c, g}
}

// TestQuantFP8GemmTimes times Linear at prefill (2048 rows) on Scout's shapes, and a Scout MoE layer's
// routed experts at 2048 tokens: bf16 (cuBLASLt), fp8 on the FP8 GEMM, fp8 on the dequantised path, int4
// (dequantised). A report, no assertion.
func TestQuantFP8GemmTimes(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(61, 62))
	const T, reps = 2048, 10
	for _, s := range []struct{ in, out int }{{5120, 5120}, {5120, 16384}, {8192, 5120}} {
		x, err := g.FromFloat32([]int{T, s.in}, randVals(r, T*s.in, 1))
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			f    quant.Format
			fp8  bool
		}{{"bf16", quant.Format{}, false}, {"fp8 gemm", quant.Format{Kind: quant.FP8, DynamicActivations: true}, true},
			{"fp8 dequant", quant.Format{Kind: quant.FP8, DynamicActivations: true}, false}, {"int4 dequant", quant.Format{Kind: quant.Int4, GroupSize: 128}, false}} {
			var w backend.Tensor
			if c.f.Quantized() {
				w, err = g.RandomQuantized(c.f, []int{s.out, s.in}, 1, 0, 0.02, 7)
			} else {
				w, err = g.RandomBF16([]int{s.out, s.in}, 0, 0.02, 7)
			}
			if err != nil {
				t.Fatal(err)
			}
			old := cuda.SetFP8Gemm(g, c.fp8)
			run := func() error { _, err := g.Linear(x, w); return err }
			if err := run(); err != nil { // warm-up, plans
				t.Fatalf("%s: %v", c.name, err)
			}
			_, total, err := g.Profile(func() error {
				for range reps {
					if err := run(); err != nil {
						return err
					}
				}
				return nil
			})
			cuda.SetFP8Gemm(g, old)
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			per := total / reps
			tflops := 2 * float64(T) * float64(s.in) * float64(s.out) / per.Seconds() / 1e12
			shape := fmt.Sprintf("[%d %d]x[%d %d]", T, s.in, s.out, s.in)
			t.Logf("%-14s %-26s %9.1f µs  %6.0f TFLOP/s", c.name, shape, float64(per.Nanoseconds())/1e3, tflops)
			row("Prefill "+c.name, shape, fmt.Sprintf("%.0f TFLOP/s", tflops), per.Round(time.Microsecond).String())
		}
	}
	// A Scout MoE layer's routed experts at prefill: 2048 tokens, 16 experts, top-1 (random weights made
	// on the device, as bench makes them), "fp8 gemm" on the FP8 GEMM per expert (the grouped fp8 kernels
	// off: TestFP8GroupedTimes times them beside it).
	restore, err := cuda.SetUnfuse(g, cuda.FuseFP8Grouped)
	if err != nil {
		t.Fatal(err)
	}
	defer restore()
	const E, H, I = 16, 5120, 8192
	x, err := g.FromFloat32([]int{T, H}, randVals(r, T*H, 1))
	if err != nil {
		t.Fatal(err)
	}
	logits, err := g.FromFloat32([]int{T, E}, randVals(r, T*E, 3))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		f    quant.Format
		fp8  bool
	}{{"bf16", quant.Format{}, false}, {"fp8 gemm", quant.Format{Kind: quant.FP8, DynamicActivations: true}, true},
		{"fp8 dequant", quant.Format{Kind: quant.FP8, DynamicActivations: true}, false}, {"int4 dequant", quant.Format{Kind: quant.Int4, GroupSize: 128}, false}} {
		var gu, dn backend.Tensor
		if c.f.Quantized() {
			if gu, err = g.RandomQuantized(c.f, []int{E, H, 2 * I}, 1, 0, 0.02, 1); err == nil {
				dn, err = g.RandomQuantized(c.f, []int{E, I, H}, 1, 0, 0.02, 2)
			}
		} else if gu, err = g.RandomBF16([]int{E, H, 2 * I}, 0, 0.02, 1); err == nil {
			dn, err = g.RandomBF16([]int{E, I, H}, 0, 0.02, 2)
		}
		if err != nil {
			t.Fatal(err)
		}
		old := cuda.SetFP8Gemm(g, c.fp8)
		run := func() error {
			rt, err := g.Route(logits, 1)
			if err != nil {
				return err
			}
			_, err = g.Experts(x, rt, gu, dn, 0)
			return err
		}
		if err := run(); err != nil {
			t.Fatalf("experts %s: %v", c.name, err)
		}
		_, total, err := g.Profile(func() error {
			for range 3 {
				if err := run(); err != nil {
					return err
				}
			}
			return nil
		})
		cuda.SetFP8Gemm(g, old)
		if err != nil {
			t.Fatalf("experts %s: %v", c.name, err)
		}
		per := total / 3
		shape := fmt.Sprintf("T %d E %d k 1 H %d I %d", T, E, H, I)
		t.Logf("experts %-14s %-30s %9.1f µs", c.name, shape, float64(per.Nanoseconds())/1e3)
		row("Prefill experts "+c.name, shape, fmt.Sprintf("%.0f TFLOP/s", 6*float64(T)*H*I/per.Seconds()/1e12), per.Round(time.Microsecond).String())
		gu, dn = nil, nil
	}
}

// TestFP8ActQuantExact: the activations' E4M3 codes and scales (fp8_act_codes, the FP8 GEMM's input) and
// their dequantised values (fp8_act_rows, the GEMVs' and the dequantised path's input) equal package
// quant's rule bit for bit: on sm_89 and later both round with the cvt.rn.satfinite instruction, checked
// here against the software rule. Rows built to hit the rounding's edges at a power-of-two scale (ties
// between E4M3 neighbours, which go to the even code; subnormal steps and their ties; the subnormal to
// normal boundary; signed zeros), a row whose maximum is clamped to the activation bound (values past
// ±448 after the division saturate), a zero row and random rows of several magnitudes; widths of 256
// (four elements a load) and 250 (rows not 16-byte aligned: one a load).
func TestFP8ActQuantExact(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(171, 172))
	sub := float32(math.Ldexp(1, -9)) // the smallest subnormal step
	edges := []float32{448, 1.0625, 1.1875, 1.3125, -1.0625, -1.1875, 272, 304, -304, 432, 416, 0.5 * sub, 1.5 * sub,
		2.5 * sub, 7.5 * sub, -1.5 * sub, 0.25 * sub, 0, float32(math.Copysign(0, -1)), 1e-30, -1e-30, 0.015625, 0.0146484375}
	for _, n := range []int{256, 250} {
		var rows [][]float32
		row := make([]float32, n) // max 448: scale 1, the values rounded as they are
		for i := range row {
			row[i] = edges[i%len(edges)]
		}
		rows = append(rows, row)
		twice := make([]float32, n) // max 896: scale 2, the same edges doubled
		for i := range twice {
			twice[i] = 2 * row[i]
		}
		rows = append(rows, twice)
		clamped := make([]float32, n) // max 2400 > 1200: scale 1200/448, values up to ±896 saturate at ±448
		for i := range clamped {
			clamped[i] = (2*r.Float32() - 1) * 2400
		}
		clamped[0] = 2400
		rows = append(rows, clamped, make([]float32, n))
		for _, mag := range []float32{1e-3, 1, 100, 1e4} {
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(r.NormFloat64()) * mag
			}
			rows = append(rows, v)
		}
		flat := make([]float32, 0, len(rows)*n)
		for _, row := range rows {
			flat = append(flat, row...)
		}
		x, err := g.FromFloat32([]int{len(rows), n}, flat)
		if err != nil {
			t.Fatal(err)
		}
		codes, scales, err := cuda.ActCodes(g, x)
		if err != nil {
			t.Fatal(err)
		}
		fq, err := cuda.ActRows(g, x)
		if err != nil {
			t.Fatal(err)
		}
		got, err := g.Float32(fq)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]float32, len(flat))
		quant.FakeQuantFP8Rows(want, flat, n)
		bad := 0
		for ri, row := range rows {
			var amax float32
			for _, v := range row {
				amax = max(amax, float32(math.Abs(float64(v))))
			}
			s := quant.FP8RowScale(amax, quant.ActivationScaleUB)
			if math.Float32bits(scales[ri]) != math.Float32bits(s) {
				t.Errorf("n %d row %d: scale %g, want %g", n, ri, scales[ri], s)
			}
			for i, v := range row {
				at := ri*n + i
				wc := quant.EncodeE4M3(min(max(v/s, -quant.FP8Max), quant.FP8Max))
				if codes[at] != wc || math.Float32bits(got[at]) != math.Float32bits(want[at]) {
					if bad++; bad <= 10 {
						t.Errorf("n %d row %d [%d] = %g (/s %g): code %#02x value %g, want %#02x and %g", n, ri, i, v, v/s, codes[at], got[at], wc, want[at])
					}
				}
			}
		}
		t.Logf("n %d: %d rows, %d values, %d differ from package quant's rule", n, len(rows), len(flat), bad)
	}
}
