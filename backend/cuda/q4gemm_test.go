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
)

// Bounds of q4gemm (FuseQ4GEMM) against the path it replaces, the weight dequantised to bf16 and
// multiplied by cuBLASLt: both multiply the same bf16(q·s) weights by the same bf16 inputs (a float32 x
// rounded, or split into hi and lo halves, by the same kernels) with float32 accumulation, so only the
// order of the sums differs: about 1e-7 relative an output, 1e-5 leaves a hundredfold margin and a
// wrong index, nibble or scale gives errors of order one. The experts' SwiGLU rounds silu(gate)·up to
// bf16 on both paths: where the two sums of an element straddle a rounding midpoint (about 1e-7 / 2^-9 of
// the elements) its act differs by a bf16 step (2^-8), which down carries into the output: 2e-4.
// Against the cpu backend (float32 math on the exact q·s) the bounds are quantBF16RelL2's.
const (
	int4GEMMFusedRelL2    = 1e-5
	int4ExpertsFusedRelL2 = 2e-4
)

// int4GEMMRows are the row counts of the q4gemm tests: 37 (within the GEMVs' rows, run on q4gemm with
// SetQuantGEMV off: a float32 x is then split into hi and lo), 65 (a 64-row tile and one row), 256 and
// 2048 (prefill).
var int4GEMMRows = []int{37, 65, 256, 2048}

// sameQ4 compares two results of one op on the cuda backend, q4gemm's (got) and the dequantised path's
// (want), within bound (relative L2), and tables the difference.
func sameQ4(t *testing.T, g *cuda.Backend, name, shape string, got, want backend.Tensor, bound float64) {
	t.Helper()
	gv, err := g.Float32(got)
	if err != nil {
		t.Fatalf("%s %s: %v", name, shape, err)
	}
	wv, err := g.Float32(want)
	if err != nil {
		t.Fatalf("%s %s: %v", name, shape, err)
	}
	if len(gv) != len(wv) {
		t.Fatalf("%s %s: q4gemm gave %d values, the dequantised path %d", name, shape, len(gv), len(wv))
	}
	rel := relL2(gv, wv)
	status := ""
	if rel > bound || math.IsNaN(rel) {
		status = " FAIL"
		t.Errorf("%s %s: relative L2 between q4gemm and the dequantised path = %.3g, want <= %.3g", name, shape, rel, bound)
	}
	t.Logf("%-12s %-44s q4gemm vs dequantised relL2 %.3g", name, shape, rel)
	row(name+" vs unfused", shape, fmt.Sprintf("relL2 %.2e%s", rel, status), "")
}

// checkQ4 compares run (side 0: the cpu backend, 1: g) with the cpu backend (quantBF16RelL2), checks that g
// took fusedPaths, and compares g's result with the same call with FuseQ4GEMM off (the dequantised path,
// within tol), whose counters must satisfy unfusedOK where it is not nil (want: what it expects, for the
// message).
func checkQ4(e *opEnv, g *cuda.Backend, name, shape, fusedPaths string, unfusedOK func(paths string) bool, want string,
	tol float64, run func(b backend.Ops, side int) (backend.Tensor, error)) {
	t := e.t
	t.Helper()
	var fused backend.Tensor
	before := g.Counters()
	e.qcompare(name, shape, quantBF16RelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
		y, err := run(b, side)
		if side == 1 {
			fused = y
		}
		return y, err
	})
	if got := counterDiff(before, g.Counters()); got != fusedPaths {
		t.Errorf("%s %s took paths %q, want %s", name, shape, got, fusedPaths)
	}
	restore, err := cuda.SetUnfuse(g, cuda.FuseQ4GEMM)
	if err != nil {
		t.Fatal(err)
	}
	before = g.Counters()
	unf, err := run(g, 1)
	paths := counterDiff(before, g.Counters())
	restore()
	if err != nil {
		t.Fatalf("%s %s unfused: %v", name, shape, err)
	}
	if unfusedOK != nil && !unfusedOK(paths) {
		t.Errorf("%s %s with q4gemm off took paths %q, want %s", name, shape, paths, want)
	}
	sameQ4(t, g, name, shape, fused, unf, tol)
}

// TestInt4GEMMVsCPU compares Linear on int4 weights at q4gemm's row counts (int4GEMMRows) with the cpu
// backend (quantBF16RelL2) and with the dequantised path (FuseQ4GEMM off: int4GEMMFusedRelL2): x float32
// (rounded to bf16 once; at 37 rows and for the narrow product split into hi and lo, q4gemm on twice the
// rows) and bf16 (read as it is); groups of 128, 32 and 64 (a last group of 32); K of 5 to 64 stages;
// output channels not a multiple of a block's 256 (776, 296) or fewer than a block (96: a narrow
// product). The counters check that q4gemm ran, and the dequantised path without it.
func TestInt4GEMMVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(101, 102))}
	for _, s := range []struct{ in, out, gs int }{{1024, 776, 128}, {2048, 256, 32}, {160, 296, 64}, {1024, 96, 128}} {
		f := quant.Format{Kind: quant.Int4, GroupSize: s.gs}
		w := e.qweight(f, 0.05, s.out, s.in)
		for _, T := range int4GEMMRows {
			for _, xdt := range []string{"f32", "bf16"} {
				x := e.input(1, T, s.in)
				if xdt == "bf16" {
					x = e.weight(1, T, s.in) // loaded as bf16 on both backends
				}
				old := cuda.SetQuantGEMV(g, T > 64)
				shape := fmt.Sprintf("%s x %s [%d %d]x[%d %d]", f, xdt, T, s.in, s.out, s.in)
				dequantised := func(paths string) bool {
					return strings.Contains(paths, "qdequant×1") && strings.Contains(paths, "lt×1") && !strings.Contains(paths, "q4gemm")
				}
				checkQ4(e, g, "Int4GEMM", shape, "q4gemm×1", dequantised, "the dequantised copy and cuBLASLt", int4GEMMFusedRelL2,
					func(b backend.Ops, side int) (backend.Tensor, error) {
						return b.Linear(pickSide(x, side), pickSide(w, side))
					})
				cuda.SetQuantGEMV(g, old)
			}
		}
	}
}

// TestInt4ExpertsGEMMVsCPU compares Route+Experts on int4 experts at q4gemm's row counts with the cpu
// backend (quantBF16RelL2) and with the dequantised path (FuseQ4GEMM off: cuBLASLt per active expert,
// int4ExpertsFusedRelL2): top-1 and top-2 over 8 experts with uneven routing (int4Logits: one expert with
// most rows, several with a few, one with none), groups of 128 and 32, H of 512 and 384 (down's
// channels: two 256-channel tiles, and one and a half), I of 256 and 320 (gate_up's SwiGLU tiles of 128
// columns: two, and two and a half). Then expert parallelism with the shared expert's add (ExpertsAdd,
// experts 4..7 of 8 held here: the rows routed elsewhere fill the permutation's tail, which the gather
// must read as gaps).
func TestInt4ExpertsGEMMVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(111, 112))}
	const E = 8
	for _, s := range []struct{ H, I, gs int }{{512, 256, 128}, {384, 320, 32}} {
		f := quant.Format{Kind: quant.Int4, GroupSize: s.gs}
		gu := e.qweight(f, float32(2/math.Sqrt(float64(s.H))), E, s.H, 2*s.I)
		dn := e.qweight(f, float32(2/math.Sqrt(float64(s.I))), E, s.I, s.H)
		for _, T := range []int{37, 256, 2048} {
			for _, k := range []int{1, 2} {
				x := e.input(1, T, s.H)
				logits := int4Logits(e, T, E)
				old := cuda.SetQuantGEMV(g, T > 64)
				shape := fmt.Sprintf("%s T %d E %d k %d H %d I %d", f, T, E, k, s.H, s.I)
				run := func(b backend.Ops, side int) (backend.Tensor, error) {
					r, err := b.Route(pickSide(logits, side), k)
					if err != nil {
						return nil, err
					}
					return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
				}
				checkQ4Experts(e, g, shape, "exp-grouped×1", run)
				cuda.SetQuantGEMV(g, old)
			}
		}
	}
	f := int4Formats[0]
	const T, H, I, k = 256, 512, 256, 2
	x, add := e.input(1, T, H), e.input(1, T, H)
	logits := int4Logits(e, T, E)
	gu, dn := e.qweight(f, 0.1, 4, H, 2*I), e.qweight(f, 0.1, 4, I, H)
	shape := fmt.Sprintf("%s T %d experts 4..7 of %d k %d H %d I %d + add", f, T, E, k, H, I)
	checkQ4Experts(e, g, shape, "", routedAdd(g, logits, x, gu, dn, add, k, 4))
}

// checkQ4Experts is checkQ4 for q4gemm's expert path (int4ExpertsFusedRelL2 against the dequantised bf16
// copies), whose counters with q4gemm off must read unfusedPaths where it is not "" (ExpertsAdd's are not
// checked).
func checkQ4Experts(e *opEnv, g *cuda.Backend, shape, unfusedPaths string, run func(b backend.Ops, side int) (backend.Tensor, error)) {
	e.t.Helper()
	var ok func(string) bool
	if unfusedPaths != "" {
		ok = func(paths string) bool { return paths == unfusedPaths }
	}
	checkQ4(e, g, "Int4ExpGEMM", shape, "exp-q4×1 exp-grouped×1", ok, unfusedPaths+" (cuBLASLt on bf16 copies)",
		int4ExpertsFusedRelL2, run)
}

// TestInt4GEMMTimes times, on the device (Profile), q4gemm against the dequantised path (FuseQ4GEMM off)
// and against bf16 weights on cuBLASLt, at Scout's prefill shapes: Linear of 2048 bf16 rows on q/o
// ([5120 5120]), k/v ([1024 5120]), the shared expert's gate or up ([8192 5120]) and down ([5120 8192]),
// and a Scout MoE layer's routed experts (16 of [5120, 16384] and [8192, 5120], top-1) at 2048 tokens.
// Each row gives the time and the dense tensor rate (2·rows·in·out flops; the experts' over the
// tokens' products). No bound: the table rows are for the lead (docs/gpu-notes.md predicts them).
func TestInt4GEMMTimes(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(121, 122))
	const reps, T = 20, 2048
	f := quant.Format{Kind: quant.Int4, GroupSize: 128}
	timeIt := func(name, shape string, flops float64, op func() error) {
		t.Helper()
		per, ops := profileOp(t, g, reps, name+" "+shape, op)
		tf := flops / per.Seconds() / 1e12
		t.Logf("%-22s %-28s %9.1f µs  %6.1f TFLOP/s  (%s)", name, shape, float64(per.Nanoseconds())/1e3, tf, strings.Join(ops, ", "))
		row(name, shape, fmt.Sprintf("%.1f TFLOP/s", tf), per.Round(100*time.Nanosecond).String())
	}
	unfused := func(op func() error) func() error {
		return func() error {
			restore, err := cuda.SetUnfuse(g, cuda.FuseQ4GEMM)
			if err != nil {
				return err
			}
			defer restore()
			return op()
		}
	}
	for _, s := range []struct{ in, out int }{{5120, 5120}, {5120, 1024}, {5120, 8192}, {8192, 5120}} {
		q, err := g.RandomQuantized(f, []int{s.out, s.in}, 1, 0, 0.02, 5)
		if err != nil {
			t.Fatal(err)
		}
		bw, err := g.RandomBF16([]int{s.out, s.in}, 0, 0.02, 5)
		if err != nil {
			t.Fatal(err)
		}
		x, err := g.RandomBF16([]int{T, s.in}, 0, 1, 6)
		if err != nil {
			t.Fatal(err)
		}
		shape := fmt.Sprintf("[%d %d]x[%d %d]", T, s.in, s.out, s.in)
		flops := 2 * float64(T) * float64(s.in) * float64(s.out)
		lin := func(w backend.Tensor) func() error { return func() error { _, err := g.Linear(x, w); return err } }
		timeIt("Linear int4 q4gemm", shape, flops, lin(q))
		timeIt("Linear int4 dequant", shape, flops, unfused(lin(q)))
		timeIt("Linear bf16", shape, flops, lin(bw))
	}
	const E, H, I = 16, 5120, 8192
	gu, err := g.RandomQuantized(f, []int{E, H, 2 * I}, 1, 0, 0.02, 1)
	if err != nil {
		t.Fatal(err)
	}
	dn, err := g.RandomQuantized(f, []int{E, I, H}, 1, 0, 0.02, 2)
	if err != nil {
		t.Fatal(err)
	}
	x, err := g.RandomBF16([]int{T, H}, 0, 1, 7)
	if err != nil {
		t.Fatal(err)
	}
	logits, err := g.FromFloat32([]int{T, E}, randVals(r, T*E, 3))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := g.Route(logits, 1)
	if err != nil {
		t.Fatal(err)
	}
	flops := 2 * float64(T) * (float64(H)*2*I + float64(I)*H)
	exp := func() error { _, err := g.Experts(x, rt, gu, dn, 0); return err }
	shape := fmt.Sprintf("T %d E %d k 1 H %d I %d", T, E, H, I)
	timeIt("Experts int4 q4gemm", shape, flops, exp)
	timeIt("Experts int4 dequant", shape, flops, unfused(exp))
}

// TestQ4GEMMDispatch: at the default limit (q4gemmDenseMaxRows) a dense Linear on int4 weights takes
// q4gemm up to a few hundred rows of x and the dequantised copy with cuBLASLt above (faster there on an
// H100: TestInt4GEMMTimes); both agree with the cpu backend.
func TestQ4GEMMDispatch(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	old := cuda.SetQ4GEMMMaxRows(g, -1)
	defer cuda.SetQ4GEMMMaxRows(g, old)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(103, 104))}
	f := quant.Format{Kind: quant.Int4, GroupSize: 128}
	w := e.qweight(f, 0.05, 776, 1024)
	for _, c := range []struct {
		T       int
		q4gemm  bool
		explain string
	}{{256, true, "q4gemm"}, {384, true, "q4gemm"}, {385, false, "the dequantised copy"}, {2048, false, "the dequantised copy"}} {
		x := e.input(1, c.T, 1024)
		shape := fmt.Sprintf("%s [%d 1024]x[776 1024]", f, c.T)
		before := g.Counters()
		e.qcompare("Int4 dispatch", shape, quantBF16RelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.Linear(pickSide(x, side), pickSide(w, side))
		})
		paths := counterDiff(before, g.Counters())
		q4 := paths == "q4gemm×1"
		dequantised := strings.Contains(paths, "qdequant×1") && strings.Contains(paths, "lt×1")
		if q4 != c.q4gemm || (!q4 && !dequantised) {
			t.Errorf("%s took paths %q, want %s", shape, paths, c.explain)
		}
	}
}
