package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Bounds of the quantised ops against the cpu backend (the reference: the dequantised weights in float32,
// quant.Weight.Dequantize). The GEMV paths dequantise in registers to the very same float32 weights, so
// only the summation order differs (about 1e-6). The prefill paths round the dequantised weights and the
// inputs to bf16 (as the bf16 path rounds its inputs: 2^-9 relative each), like the bf16 comparisons.
// Where the format quantises activations, the experts' SwiGLU rows are rounded to E4M3 after products
// that differ from the cpu's: an element near a rounding midpoint lands on the neighbouring E4M3 value
// (a step is 6–12 % of it). With float32 products (GEMV) that is rare (about 2e-5 of the elements): one
// such element moves a one-token output by a few 1e-3. With bf16-rounded inputs (prefill, about 4e-3
// relative off in the gate and up products) some 10 % of the elements move a step, about 2–3e-2
// relative L2: a bug (a wrong scale, index or nibble) gives errors of order one.
const (
	quantGEMVRelL2    = 1e-4
	quantGEMVActRelL2 = 1e-2
	quantBF16RelL2    = 1.5e-2
	quantBF16ActRelL2 = 6e-2
)

// quantFormats are the formats the tests load: fp8 rowwise weight-only, fp8 with dynamic activations
// (FbgemmFp8, --quantization fp8), the compressed-tensors FP8 format (dequantised to bf16), and int4 with
// groups of 128 and 32.
var quantFormats = []quant.Format{
	{Kind: quant.FP8},
	{Kind: quant.FP8, DynamicActivations: true},
	quant.CompressedTensorsFP8(),
	{Kind: quant.Int4, GroupSize: 128},
	{Kind: quant.Int4, GroupSize: 32},
}

// qweight quantises random values of shape (input dimension 1) to f and loads the weight on both
// backends.
func (e *opEnv) qweight(f quant.Format, scale float32, shape ...int) pair {
	e.t.Helper()
	n := 1
	for _, d := range shape {
		n *= d
	}
	qf := f
	qf.RoundBF16 = false // the codes and scales do not depend on how they are dequantised
	w, err := quant.Quantize(qf, shape, 1, randVals(e.r, n, scale))
	if err != nil {
		e.t.Fatal(err)
	}
	w.Format = f
	c, err := e.cpu.LoadQuantized(w)
	if err != nil {
		e.t.Fatal(err)
	}
	g, err := e.gpu.LoadQuantized(w)
	if err != nil {
		e.t.Fatalf("cuda LoadQuantized %s%v: %v", f, shape, err)
	}
	return pair{c, g}
}

// qcompare runs op on both backends and checks the cuda result against the cpu's: no NaN, relative L2
// within bound. A failure says the shape, the relative L2, the largest |Δ| and where it is, and the
// first element off by more than bound·max|ref| (index, row and column of a [rows, cols] result, both
// values), so that a log alone locates the fault. It appends a table row with the error and the paths
// taken (Counters before and after).
func (e *opEnv) qcompare(name, shape string, bound float64, op func(b backend.Ops, side int) (backend.Tensor, error)) {
	e.t.Helper()
	want, err := op(e.cpu, 0)
	if err != nil {
		e.t.Fatalf("%s %s on cpu: %v", name, shape, err)
	}
	before := e.gpu.Counters()
	got, err := op(e.gpu, 1)
	if err != nil {
		e.t.Fatalf("%s %s on cuda: %v", name, shape, err)
	}
	paths := counterDiff(before, e.gpu.Counters())
	wv, err := e.cpu.Float32(want)
	if err != nil {
		e.t.Fatal(err)
	}
	gv, err := e.gpu.Float32(got)
	if err != nil {
		e.t.Fatalf("%s %s on cuda: %v", name, shape, err)
	}
	if len(gv) != len(wv) {
		e.t.Fatalf("%s %s: cuda gave %d values %v, cpu %d %v", name, shape, len(gv), got.Shape(), len(wv), want.Shape())
	}
	cols := 1
	if s := want.Shape(); len(s) > 0 {
		cols = s[len(s)-1]
	}
	var maxRef, maxErr float64
	maxAt, nan := -1, -1
	for i := range wv {
		maxRef = max(maxRef, math.Abs(float64(wv[i])))
		if math.IsNaN(float64(gv[i])) && nan < 0 {
			nan = i
		}
		if d := math.Abs(float64(gv[i]) - float64(wv[i])); d > maxErr {
			maxErr, maxAt = d, i
		}
	}
	rel := relL2(gv, wv)
	status := ""
	if nan >= 0 || rel > bound || math.IsNaN(rel) {
		status = " FAIL"
		first := -1
		for i := range wv {
			if d := math.Abs(float64(gv[i]) - float64(wv[i])); d > bound*maxRef || math.IsNaN(d) {
				first = i
				break
			}
		}
		msg := fmt.Sprintf("%s %s (paths %s): relative L2 vs cpu = %.3g, want <= %.3g; max |Δ| = %.3g (max |ref| %.3g)",
			name, shape, paths, rel, bound, maxErr, maxRef)
		if maxAt >= 0 {
			msg += fmt.Sprintf(" at [%d] (row %d col %d: cuda %g cpu %g)", maxAt, maxAt/cols, maxAt%cols, gv[maxAt], wv[maxAt])
		}
		if first >= 0 {
			msg += fmt.Sprintf("; first off by > %.3g·max|ref|: [%d] (row %d col %d: cuda %g cpu %g)", bound, first, first/cols, first%cols, gv[first], wv[first])
		}
		if nan >= 0 {
			msg += fmt.Sprintf("; first NaN at [%d] (row %d col %d)", nan, nan/cols, nan%cols)
		}
		e.t.Error(msg)
	}
	e.t.Logf("%-12s %-44s relL2 %.3g max|Δ| %.3g  %s", name, shape, rel, maxErr, paths)
	row(name, shape, fmt.Sprintf("relL2 %.2e%s", rel, status), paths)
}

// counterDiff names the paths Linear and Experts took between two Counters readings.
func counterDiff(a, b cuda.Counters) string {
	var parts []string
	for _, c := range []struct {
		name string
		n    int64
	}{
		{"gemv", b.GEMV - a.GEMV}, {"lt", b.Gemm - a.Gemm}, {"split", b.Split - a.Split}, {"simple", b.Fallback - a.Fallback},
		{"qgemv", b.QuantGEMV - a.QuantGEMV}, {"qdequant", b.QuantDequant - a.QuantDequant}, {"q4gemm", b.QuantQ4GEMM - a.QuantQ4GEMM},
		{"qfp8gemm", b.QuantFP8Gemm - a.QuantFP8Gemm}, {"exp-fp8", b.ExpertsFP8 - a.ExpertsFP8}, {"exp-q4", b.ExpertsQ4 - a.ExpertsQ4},
		{"exp-gemv", b.ExpertsGEMV - a.ExpertsGEMV}, {"exp-grouped", b.ExpertsGrouped - a.ExpertsGrouped},
		{"exp-simple", b.ExpertsSimple - a.ExpertsSimple},
		{"fp8-exp-gemv", b.FP8ExpertGEMV - a.FP8ExpertGEMV}, {"fp8-staged", b.FP8Staged - a.FP8Staged}, {"fp8-outer-vec", b.FP8OuterVec - a.FP8OuterVec},
	} {
		if c.n != 0 {
			parts = append(parts, fmt.Sprintf("%s×%d", c.name, c.n))
		}
	}
	return strings.Join(parts, " ")
}

func pickSide(p pair, side int) backend.Tensor {
	if side == 0 {
		return p.c
	}
	return p.g
}

// routedAdd is a qcompare side function for the shared expert's add fused into the routed experts:
// Route, then ExpertsAdd of the experts from first on g (side 1), and Route, Experts and Add on the cpu
// backend (side 0), what the fused op must equal.
func routedAdd(g *cuda.Backend, logits, x, gu, dn, add pair, k, first int) func(backend.Ops, int) (backend.Tensor, error) {
	return func(b backend.Ops, side int) (backend.Tensor, error) {
		r, err := b.Route(pickSide(logits, side), k)
		if err != nil {
			return nil, err
		}
		if side == 1 {
			return g.ExpertsAdd(x.g, r, gu.g, dn.g, first, add.g)
		}
		y, err := b.Experts(x.c, r, gu.c, dn.c, first)
		if err != nil {
			return nil, err
		}
		return b.Add(y, add.c)
	}
}

// TestQuantLinearVsCPU compares Linear on quantised weights with the cpu backend for every format, at
// 1, 7, 64 and 300 rows, on shapes the GEMV takes (K a multiple of 16 for fp8, 32 for int4) and shapes it
// does not (K = 1000, 77: the dequantise-to-bf16 path), at 1 row both GEMV kernels (split-K and one
// warp a row pair; fp8 has one), and at up to 64 rows (the GEMV, 8 rows a launch) the dequantised path
// too (SetQuantGEMV off). 300 rows is prefill: the dequantised path, or for fp8 with dynamic activations
// the FP8 GEMM, which also takes 64 rows (at its own bound).
func TestQuantLinearVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(11, 12))}
	for _, f := range quantFormats {
		for _, s := range []struct{ in, out int }{{512, 384}, {2048, 1536}, {96, 40}, {1000, 200}, {77, 33}} {
			w := e.qweight(f, 0.05, s.out, s.in)
			for _, T := range []int{1, 7, 64, 300} {
				x := e.input(1, T, s.in)
				shape := fmt.Sprintf("%s [%d %d]x[%d %d]", f, T, s.in, s.out, s.in)
				// The default paths (split-K GEMV at 1 row), the one-warp GEMV (split off), the
				// dequantised path at GEMV row counts.
				for _, mode := range []string{"", " nosplit", " deq"} {
					if (mode == " nosplit" && T > 2) || (mode == " deq" && T > 64) {
						continue
					}
					oldQ := cuda.SetQuantGEMV(g, mode != " deq")
					oldS := cuda.SetGEMVSplit(g, mode != " nosplit")
					bound := quantBF16RelL2
					switch {
					case mode == "" && fp8GemmTakes(g, f, T, s.in, s.out):
						bound = quantFP8GemmRelL2 // decode batches above 8 rows run the FP8 GEMM
					case mode != " deq" && T <= 64 && qgemvShape(f, s.in):
						bound = quantGEMVRelL2
					}
					e.qcompare("QLinear"+mode, shape, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
						return b.Linear(pickSide(x, side), pickSide(w, side))
					})
					cuda.SetQuantGEMV(g, oldQ)
					cuda.SetGEMVSplit(g, oldS)
				}
			}
		}
	}
	// LinearMulti with quantised weights (q, k and v of a decode step) takes Linear's paths.
	x := e.input(1, 1, 512)
	ws := []pair{e.qweight(quantFormats[1], 0.05, 256, 512), e.qweight(quantFormats[3], 0.05, 64, 512), e.qweight(quantFormats[0], 0.05, 64, 512)}
	for i := range ws {
		e.qcompare("QLinearMulti", fmt.Sprintf("[1 512] w%d of 3", i), quantGEMVRelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
			if side == 0 {
				return b.Linear(x.c, ws[i].c)
			}
			out, err := g.LinearMulti(x.g, ws[0].g, ws[1].g, ws[2].g)
			if err != nil {
				return nil, err
			}
			return out[i], nil
		})
	}
}

// fp8GemmTakes reports whether Linear of T rows on a weight [out, in] in format f runs on the FP8 GEMM
// (fp8GemmOK, on a card with FP8 tensor cores): dynamic activations, more than 8 rows, in and out
// multiples of 16.
func fp8GemmTakes(g *cuda.Backend, f quant.Format, T, in, out int) bool {
	return f.Kind == quant.FP8 && f.DynamicActivations && !f.RoundBF16 && T > 8 && in%16 == 0 && out%16 == 0 && fp8GemmArch(g)
}

// qgemvShape reports whether the quantised GEMV takes an input width of in for f (qgemvOK).
func qgemvShape(f quant.Format, in int) bool {
	if f.Kind == quant.Int4 {
		return in%32 == 0 && f.GroupSize%32 == 0
	}
	return in%16 == 0
}

// TestQuantExpertsVsCPU compares Route+Experts on quantised expert weights with the cpu backend for every
// format: top-1 and top-2 routing, decode (the quantised split-K GEMV), 64 tokens, 300 tokens (the
// grouped GEMMs on bf16-dequantised experts), the grouped path at few tokens (SetQuantGEMV off), and a
// shape the fast paths do not take (H not a multiple of 8; weight-only formats).
func TestQuantExpertsVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(21, 22))}
	for _, f := range quantFormats {
		for _, s := range []struct {
			T, E, k, H, I int
			gemv          bool
		}{
			{1, 8, 1, 512, 256, true}, {1, 8, 2, 512, 256, true}, {7, 8, 2, 256, 128, true}, {64, 8, 1, 256, 128, true},
			{300, 8, 2, 256, 128, true}, {7, 8, 2, 256, 128, false}, {1, 16, 1, 1024, 512, true}, {5, 4, 2, 100, 52, true},
		} {
			if s.H%8 != 0 && f.DynamicActivations {
				continue // refused (TestQuantExpertsRefusals)
			}
			x := e.input(1, s.T, s.H)
			logits := e.input(3, s.T, s.E)
			gu := e.qweight(f, float32(2/math.Sqrt(float64(s.H))), s.E, s.H, 2*s.I)
			dn := e.qweight(f, float32(2/math.Sqrt(float64(s.I))), s.E, s.I, s.H)
			bound := quantBF16RelL2
			switch {
			case s.gemv && fp8GroupedTakes(g, f, s.T):
				bound = fp8GroupedRelL2 // the grouped fp8 kernels (decode batches too)
			case s.gemv && s.T <= 64 && s.H%8 == 0 && f.DynamicActivations:
				bound = quantGEMVActRelL2
			case s.gemv && s.T <= 64 && s.H%8 == 0:
				bound = quantGEMVRelL2
			case f.DynamicActivations:
				bound = quantBF16ActRelL2
			}
			name := "QExperts"
			if !s.gemv {
				name = "QExperts grp"
			}
			shape := fmt.Sprintf("%s T %d E %d k %d H %d I %d", f, s.T, s.E, s.k, s.H, s.I)
			old := cuda.SetQuantGEMV(g, s.gemv)
			e.qcompare(name, shape, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
				r, err := b.Route(pickSide(logits, side), s.k)
				if err != nil {
					return nil, err
				}
				return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
			})
			cuda.SetQuantGEMV(g, old)
		}
	}
	// Experts held partly here (first = 4 of 8: expert parallelism) and ExpertsAdd.
	f := quantFormats[1]
	x, logits := e.input(1, 3, 256), e.input(3, 3, 8)
	gu, dn := e.qweight(f, 0.1, 4, 256, 256), e.qweight(f, 0.1, 4, 128, 256)
	add := e.input(1, 3, 256)
	e.qcompare("QExpertsAdd", fmt.Sprintf("%s T 3 E 4 of 8 (first 4) k 2 H 256 I 128", f), quantGEMVActRelL2,
		routedAdd(g, logits, x, gu, dn, add, 2, 4))
}

// TestQuantRefusals: ops that cannot read a quantised weight, and the expert shapes the dynamic
// activation paths do not take, give one clear error; so does a weight whose input dimension is not 1.
func TestQuantRefusals(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	w, err := quant.Quantize(quant.Format{Kind: quant.FP8, DynamicActivations: true}, []int{4, 100, 104}, 1, make([]float32, 4*100*104))
	if err != nil {
		t.Fatal(err)
	}
	gw, err := g.LoadQuantized(w)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Float32(gw); err == nil {
		t.Errorf("Float32 of a quantised weight: no error")
	} else {
		t.Logf("Float32: %v", err)
	}
	if _, err := g.Reshape(gw, 400, 104); err == nil {
		t.Errorf("Reshape of a quantised weight: no error")
	}
	dn, err := quant.Quantize(w.Format, []int{4, 52, 100}, 1, make([]float32, 4*52*100))
	if err != nil {
		t.Fatal(err)
	}
	gd, err := g.LoadQuantized(dn)
	if err != nil {
		t.Fatal(err)
	}
	x, _ := g.FromFloat32([]int{2, 100}, make([]float32, 200))
	logits, _ := g.FromFloat32([]int{2, 4}, make([]float32, 8))
	r, err := g.Route(logits, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Experts(x, r, gw, gd, 0); err == nil {
		t.Errorf("Experts with dynamic activations and H = 100: no error")
	} else {
		t.Logf("Experts H=100 fp8+act: %v", err)
	}
	w.InputDim = 0
	w.Shape = []int{100, 4, 104}
	if _, err := g.LoadQuantized(w); err == nil {
		t.Errorf("LoadQuantized with input dimension 0: no error")
	}
}

// TestQuantGEMVTimes times, on the device (Profile), Linear at one row on Scout-like shapes for bf16,
// fp8 (weight-only and with activation quantisation) and int4 weights, each with the split-K GEMV (the
// default) and without ("nosplit"), and a Scout decode MoE layer's routed expert (T 1, k 1, H 5120,
// I 8192), and reports the effective weight bandwidth (the weight's bytes in its format over the time).
// No bound: the table rows are for the lead.
func TestQuantGEMVTimes(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(31, 32))
	const reps = 50
	timeIt := weightTimer(t, g, reps)
	formats := []quant.Format{{}, {Kind: quant.FP8}, {Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 128}}
	for _, s := range []struct{ in, out int }{{5120, 8192}, {8192, 5120}} {
		vals := randVals(r, s.in*s.out, 0.05)
		x, err := g.FromFloat32([]int{1, s.in}, randVals(r, s.in, 1))
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range formats {
			var w backend.Tensor
			if f.Quantized() {
				qw, err := quant.Quantize(f, []int{s.out, s.in}, 1, vals)
				if err != nil {
					t.Fatal(err)
				}
				w, err = g.LoadQuantized(qw)
				if err != nil {
					t.Fatal(err)
				}
			} else {
				w, err = loadBF16(g, vals, s.out, s.in)
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, split := range []bool{true, false} {
				old := cuda.SetGEMVSplit(g, split)
				name := "GEMV " + f.String()
				if !split {
					name += " nosplit"
				}
				timeIt(name, fmt.Sprintf("[1 %d]x[%d %d]", s.in, s.out, s.in), f.Bytes([]int{s.out, s.in}, 1), func() error {
					_, err := g.Linear(x, w)
					return err
				})
				cuda.SetGEMVSplit(g, old)
			}
		}
	}
	// A routed expert of a Scout decode step: E 16, one chosen (k 1). The weights are random on the
	// device (RandomBF16, RandomQuantized: TestRandomQuantized checks those against quant.Quantize);
	// the host would take minutes to quantise 2 G weights column by column.
	const E, H, I = 16, 5120, 8192
	x, _ := g.FromFloat32([]int{1, H}, randVals(r, H, 1))
	logits, _ := g.FromFloat32([]int{1, E}, randVals(r, E, 3))
	for _, f := range formats {
		var gu, dn backend.Tensor
		var err error
		if f.Quantized() {
			if gu, err = g.RandomQuantized(f, []int{E, H, 2 * I}, 1, 0, 0.02, 1); err == nil {
				dn, err = g.RandomQuantized(f, []int{E, I, H}, 1, 0, 0.02, 2)
			}
		} else if gu, err = g.RandomBF16([]int{E, H, 2 * I}, 0, 0.02, 1); err == nil {
			dn, err = g.RandomBF16([]int{E, I, H}, 0, 0.02, 2)
		}
		if err != nil {
			t.Fatal(err)
		}
		bytes := (f.Bytes([]int{E, H, 2 * I}, 1) + f.Bytes([]int{E, I, H}, 1)) / E
		timeIt("Expert "+f.String(), fmt.Sprintf("T 1 k 1 H %d I %d", H, I), bytes, func() error {
			rt, err := g.Route(logits, 1)
			if err != nil {
				return err
			}
			_, err = g.Experts(x, rt, gu, dn, 0)
			return err
		})
	}
}

// loadBF16 loads vals as a bf16 weight of shape (the way checkpoints load).
func loadBF16(g *cuda.Backend, vals []float32, shape ...int) (backend.Tensor, error) {
	return g.Load(safetensors.BF16, shape, bf16Data(vals))
}

// TestRandomQuantized: RandomQuantized (bench's random quantised weights, quantised on the device) gives
// the codes and scales quant.Quantize makes of the same bf16 values on the host: Linear ([out, in]) and
// Experts ([E, in, out] weights) give bit-identical results on the two weights. A difference means the
// device quantiser (quantize_bf16) departs from quant.Quantize.
func TestRandomQuantized(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(41, 42))
	same := func(name string, a, b backend.Tensor) {
		t.Helper()
		av, err := g.Float32(a)
		if err != nil {
			t.Fatal(err)
		}
		bv, err := g.Float32(b)
		if err != nil {
			t.Fatal(err)
		}
		diff := 0
		for i := range av {
			if math.Float32bits(av[i]) != math.Float32bits(bv[i]) {
				if diff == 0 {
					t.Errorf("%s: device-quantised [%d] = %g, host-quantised %g", name, i, av[i], bv[i])
				}
				diff++
			}
		}
		if diff > 0 {
			t.Errorf("%s: %d of %d outputs differ", name, diff, len(av))
		}
		row("RandomQuant", name, fmt.Sprintf("%d/%d differ", diff, len(av)), "")
	}
	// hostCopy quantises the device's random bf16 values (the same seed) on the host and loads them.
	hostCopy := func(f quant.Format, shape []int, seed uint64) backend.Tensor {
		t.Helper()
		src, err := g.RandomBF16(shape, 0, 0.05, seed)
		if err != nil {
			t.Fatal(err)
		}
		vals, err := g.Float32(src)
		if err != nil {
			t.Fatal(err)
		}
		qf := f
		qf.RoundBF16 = false
		w, err := quant.Quantize(qf, shape, 1, vals)
		if err != nil {
			t.Fatal(err)
		}
		w.Format = f
		gw, err := g.LoadQuantized(w)
		if err != nil {
			t.Fatal(err)
		}
		return gw
	}
	for _, f := range []quant.Format{{Kind: quant.FP8}, quant.CompressedTensorsFP8(), {Kind: quant.Int4, GroupSize: 128}, {Kind: quant.Int4, GroupSize: 48}} {
		shape := []int{160, 400}
		dev, err := g.RandomQuantized(f, shape, 1, 0, 0.05, 7)
		if err != nil {
			t.Fatal(err)
		}
		host := hostCopy(f, shape, 7)
		x, _ := g.FromFloat32([]int{3, 400}, randVals(r, 1200, 1))
		a, err := g.Linear(x, dev)
		if err != nil {
			t.Fatal(err)
		}
		b, err := g.Linear(x, host)
		if err != nil {
			t.Fatal(err)
		}
		same(fmt.Sprintf("Linear %s %v", f, shape), a, b)

		const E, H, I = 3, 256, 96
		gud, err1 := g.RandomQuantized(f, []int{E, H, 2 * I}, 1, 0, 0.05, 8)
		dnd, err2 := g.RandomQuantized(f, []int{E, I, H}, 1, 0, 0.05, 9)
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		guh, dnh := hostCopy(f, []int{E, H, 2 * I}, 8), hostCopy(f, []int{E, I, H}, 9)
		xe, _ := g.FromFloat32([]int{4, H}, randVals(r, 4*H, 1))
		logits, _ := g.FromFloat32([]int{4, E}, randVals(r, 4*E, 3))
		rt, err := g.Route(logits, 2)
		if err != nil {
			t.Fatal(err)
		}
		a, err = g.Experts(xe, rt, gud, dnd, 0)
		if err != nil {
			t.Fatal(err)
		}
		b, err = g.Experts(xe, rt, guh, dnh, 0)
		if err != nil {
			t.Fatal(err)
		}
		same(fmt.Sprintf("Experts %s [%d %d %d]", f, E, H, 2*I), a, b)
	}
}

// weightTimer returns a function that times f on the device (Profile, reps runs after a warm-up) and
// logs and tables its effective bandwidth over bytes (a weight's bytes in its format), with the
// kernels each run launched. No bound: the rows are for the lead.
func weightTimer(t *testing.T, g *cuda.Backend, reps int) func(name, shape string, bytes int64, f func() error) {
	return func(name, shape string, bytes int64, f func() error) {
		t.Helper()
		per, ops := profileOp(t, g, reps, name+" "+shape, f)
		gbs := float64(bytes) / per.Seconds() / 1e9
		t.Logf("%-16s %-30s %8.1f µs  %6.0f GB/s of %d weight bytes  (%s)", name, shape, float64(per.Nanoseconds())/1e3, gbs, bytes, strings.Join(ops, ", "))
		row(name, shape, fmt.Sprintf("%.0f GB/s (%.1f MB)", gbs, float64(bytes)/1e6), per.Round(100*time.Nanosecond).String())
	}
}

// profileOp times f on the device (Profile, reps runs after a warm-up): the time a run and the kernels a
// run launched with their device time each.
func profileOp(t *testing.T, g *cuda.Backend, reps int, what string, f func() error) (time.Duration, []string) {
	t.Helper()
	if err := f(); err != nil { // warm-up
		t.Fatalf("%s: %v", what, err)
	}
	entries, total, err := g.Profile(func() error {
		for range reps {
			if err := f(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	var ops []string
	for _, en := range entries {
		ops = append(ops, fmt.Sprintf("%s %.1fµs", en.Op, float64(en.Device.Nanoseconds())/1e3/float64(reps)))
	}
	return total / time.Duration(reps), ops
}
