package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/quant"
)

// int4Rows are the row (token) counts the int4 tests run: decode (1, 2), the three q4gemv kernels' limits
// (8 is q4gemv_2's, 16 q4gemv_4's), a partial q4gemv launch (37), four q4gemv launches (64, skinnyRows)
// and prefill (256, 2048: q4gemm).
var int4Rows = []int{1, 2, 8, 16, 37, 64, 256, 2048}

// int4Formats are the group sizes the int4 tests load: the default 128 and 32 (a scale for every 32-input
// block, the smallest q4gemv takes).
var int4Formats = []quant.Format{{Kind: quant.Int4, GroupSize: 128}, {Kind: quant.Int4, GroupSize: 32}}

// int4PathOK reports whether paths (counterDiff's words for one Linear or Experts call on int4 weights at T
// rows) name the path it must take: the GEMV up to 64 rows (the GEMV alone), above that q4gemm (Linear) or
// q4gemm_experts (Experts, counted among the grouped paths).
func int4PathOK(paths string, T int, experts bool) bool {
	switch {
	case experts && T <= 64:
		return paths == "exp-gemv×1"
	case experts:
		return paths == "exp-q4×1 exp-grouped×1"
	case T <= 64:
		return paths == "qgemv×1"
	}
	return paths == "q4gemm×1"
}

// TestInt4LinearVsCPU compares Linear on int4 weights with the cpu backend at int4Rows rows for group
// sizes 128 and 32: up to 64 rows the tensor-core GEMV (q4gemv_N, float32 accuracy: quantGEMVRelL2), at
// 256 and 2048 q4gemm (bf16(q·s) weights and x rounded to bf16: quantBF16RelL2). The shapes have K of 10,
// 32 and 64 input blocks and N not a multiple of a block's 64 or 32 rows (nor of q4gemm's 256); the
// path each call took is checked by the counters. TestInt4GEMMVsCPU covers q4gemm's own cases. Every
// shape runs with q4split on (these few row tiles split K over the blocks: the counter must say so) and
// off (one block a row tile).
func TestInt4LinearVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(51, 52))}
	for _, unfuse := range []string{"", cuda.FuseQ4Split} {
		restore, err := cuda.SetUnfuse(g, unfuse)
		if err != nil {
			t.Fatal(err)
		}
		before := g.Counters()
		int4LinearVsCPU(t, g, e, unfuse)
		restore()
		if split := g.Counters().Q4Split - before.Q4Split; (split > 0) != (unfuse == "") {
			t.Errorf("unfuse %q: %d q4gemv launches split K, want them %s", unfuse, split, map[bool]string{true: "some", false: "none"}[unfuse == ""])
		}
	}
}

func int4LinearVsCPU(t *testing.T, g *cuda.Backend, e *opEnv, unfuse string) {
	for _, f := range int4Formats {
		for _, s := range []struct{ in, out int }{{320, 72}, {1024, 776}, {2048, 256}} {
			w := e.qweight(f, 0.05, s.out, s.in)
			for _, T := range int4Rows {
				x := e.input(1, T, s.in)
				shape := fmt.Sprintf("%s [%d %d]x[%d %d] unfuse %q", f, T, s.in, s.out, s.in, unfuse)
				bound := quantGEMVRelL2
				if T > 64 {
					bound = quantBF16RelL2
				}
				before := g.Counters()
				e.qcompare("Int4Linear", shape, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
					return b.Linear(pickSide(x, side), pickSide(w, side))
				})
				if got := counterDiff(before, g.Counters()); !int4PathOK(got, T, false) {
					t.Errorf("Int4Linear %s took paths %q: want the GEMV up to 64 rows, else the dequantised copy", shape, got)
				}
			}
		}
	}
}

// TestInt4LinearMulti compares LinearMulti's int4 fusion (q4gemv_multi_1: two or three int4 weights of
// one x at up to 4 rows in one launch) with the cpu backend's Linear, for q, k and v of a decode step
// (groups of 128: the WIDE kernel; of 32: the other) and for a bf16 router beside the shared expert's int4
// gate and up (the router runs apart), at 1 and 3 rows.
func TestInt4LinearMulti(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(91, 92))}
	f := int4Formats[0]
	const in = 512
	restore, err := cuda.SetUnfuse(g, "")
	if err != nil {
		t.Fatal(err)
	}
	defer restore()
	split := g.Counters().Q4Split
	defer func() {
		if g.Counters().Q4Split == split {
			t.Error("no q4gemv_multi launch split K over the blocks (q4split), though its few row tiles leave SMs idle")
		}
	}()
	sets := []struct {
		name  string
		ws    []pair
		fused int // int4 products in the one launch
	}{
		{"q k v", []pair{e.qweight(f, 0.05, 640, in), e.qweight(f, 0.05, 128, in), e.qweight(f, 0.05, 72, in)}, 3},
		{"router gate up", []pair{e.weight(0.05, 16, in), e.qweight(f, 0.05, 384, in), e.qweight(f, 0.05, 384, in)}, 2},
		{"q k v (g32)", []pair{e.qweight(int4Formats[1], 0.05, 256, in), e.qweight(int4Formats[1], 0.05, 64, in), e.qweight(int4Formats[1], 0.05, 64, in)}, 3},
	}
	for _, set := range sets {
		for _, T := range []int{1, 3} {
			x := e.input(1, T, in)
			gws := make([]backend.Tensor, len(set.ws))
			for i, w := range set.ws {
				gws[i] = w.g
			}
			before := g.Counters()
			outs, err := g.LinearMulti(x.g, gws...)
			if err != nil {
				t.Fatalf("LinearMulti %s T %d: %v", set.name, T, err)
			}
			d := g.Counters()
			if got := d.QuantGEMV - before.QuantGEMV; got != int64(set.fused) {
				t.Errorf("LinearMulti %s T %d: %d int4 products on the GEMV, want %d", set.name, T, got, set.fused)
			}
			for i := range set.ws {
				e.qcompare("Int4LinearMulti", fmt.Sprintf("%s T %d w%d", set.name, T, i), quantGEMVRelL2, func(b backend.Ops, side int) (backend.Tensor, error) {
					if side == 0 {
						return b.Linear(x.c, set.ws[i].c)
					}
					return outs[i], nil
				})
			}
		}
	}
}

// int4Logits makes router logits [T, E] on both backends that route unevenly: most tokens prefer expert
// 1, every third token expert 4 too, every seventh expert 6, and expert 3 never wins (one expert gets
// most of the rows, several get a few, one none).
func int4Logits(e *opEnv, T, E int) pair {
	v := randVals(e.r, T*E, 0.5)
	for tk := range T {
		row := v[tk*E : (tk+1)*E]
		row[1] += 3
		if tk%3 == 0 {
			row[4] += 4
		}
		if tk%7 == 0 {
			row[6] += 6
		}
		row[3] -= 20
	}
	c, err := e.cpu.FromFloat32([]int{T, E}, v)
	if err != nil {
		e.t.Fatal(err)
	}
	gt, err := e.gpu.FromFloat32([]int{T, E}, v)
	if err != nil {
		e.t.Fatal(err)
	}
	return pair{c, gt}
}

// TestInt4ExpertsVsCPU compares Route+Experts on int4 expert weights with the cpu backend at int4Rows
// tokens, top-1 and top-2, group sizes 128 and 32, with uneven routing (int4Logits): up to 64 tokens the
// tensor-core expert GEMV (q4expert_gemv_N: experts with more rows than a pass, experts with none),
// at 256 and 2048 q4gemm_experts_swiglu and q4gemm_experts over every active expert.
func TestInt4ExpertsVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(61, 62))}
	const E, H, I = 8, 512, 320
	for _, f := range int4Formats {
		gu := e.qweight(f, float32(2/math.Sqrt(H)), E, H, 2*I)
		dn := e.qweight(f, float32(2/math.Sqrt(I)), E, I, H)
		for _, T := range int4Rows {
			for _, k := range []int{1, 2} {
				x := e.input(1, T, H)
				logits := int4Logits(e, T, E)
				shape := fmt.Sprintf("%s T %d E %d k %d H %d I %d", f, T, E, k, H, I)
				bound := quantGEMVRelL2
				if T > 64 {
					bound = quantBF16RelL2
				}
				before := g.Counters()
				e.qcompare("Int4Experts", shape, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
					r, err := b.Route(pickSide(logits, side), k)
					if err != nil {
						return nil, err
					}
					return b.Experts(pickSide(x, side), r, pickSide(gu, side), pickSide(dn, side), 0)
				})
				if got := counterDiff(before, g.Counters()); !int4PathOK(got, T, true) {
					t.Errorf("Int4Experts %s took paths %q: want the expert GEMV up to 64 tokens, else the grouped GEMMs", shape, got)
				}
			}
		}
	}
}

// TestInt4GraphEqualsEager records a step of int4 ops (Linear, Route, Experts) as a CUDA graph and
// requires every replay to give the eager step's values bit for bit, at 1 and 16 rows: the kernels take
// no decision from timing, so a replay reproduces the eager launch.
func TestInt4GraphEqualsEager(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(71, 72))}
	const E, H, I = 8, 512, 256
	f := int4Formats[0]
	w := e.qweight(f, 0.05, H, H) // [T, H] out, as the experts': the step returns both, concatenated
	gu := e.qweight(f, 0.1, E, H, 2*I)
	dn := e.qweight(f, 0.1, E, I, H)
	for _, T := range []int{1, 16} {
		x := e.input(1, T, H)
		logits := int4Logits(e, T, E)
		step := func() (backend.Tensor, error) {
			y, err := g.Linear(x.g, w.g)
			if err != nil {
				return nil, err
			}
			r, err := g.Route(logits.g, 2)
			if err != nil {
				return nil, err
			}
			z, err := g.Experts(x.g, r, gu.g, dn.g, 0)
			if err != nil {
				return nil, err
			}
			return g.Concat(y, z)
		}
		eagerOut, err := step()
		if err != nil {
			t.Fatal(err)
		}
		want, err := g.Float32(eagerOut)
		if err != nil {
			t.Fatal(err)
		}
		key := fmt.Sprintf("int4 step T %d", T)
		before := stats(g)[key]
		for run := range 4 { // measured, recorded, replayed twice
			out, err := g.Step(key, step)
			if err != nil {
				t.Fatalf("%s run %d: %v", key, run, err)
			}
			got, err := g.Float32(out)
			if err != nil {
				t.Fatal(err)
			}
			diff := 0
			for i := range got {
				if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
					if diff == 0 {
						t.Errorf("%s run %d: [%d] = %g, eager %g", key, run, i, got[i], want[i])
					}
					diff++
				}
			}
			if diff > 0 {
				t.Errorf("%s run %d: %d of %d values differ from the eager step", key, run, diff, len(got))
			}
		}
		after := stats(g)[key]
		if after.Replays-before.Replays == 0 || after.Eager {
			t.Errorf("%s was not replayed: %+v", key, after)
		}
		row("Int4Graph", key, fmt.Sprintf("%d replays", after.Replays-before.Replays), "bit-identical")
	}
}

// TestInt4Times times, on the device (Profile), Linear on int4 weights of Scout's shapes at 1, 4, 16
// and 64 rows beside bf16, and a Scout MoE layer's routed experts at 1, 16 and 256 tokens, and reports
// the effective bandwidth of the weight's bytes in its format. No bound: the table rows are for the lead.
func TestInt4Times(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(81, 82))
	const reps = 30
	timeIt := weightTimer(t, g, reps)
	f := quant.Format{Kind: quant.Int4, GroupSize: 128}
	for _, s := range []struct{ in, out int }{{5120, 5120}, {5120, 1024}, {5120, 8192}, {8192, 5120}} {
		q, err := g.RandomQuantized(f, []int{s.out, s.in}, 1, 0, 0.02, 3)
		if err != nil {
			t.Fatal(err)
		}
		bw, err := g.RandomBF16([]int{s.out, s.in}, 0, 0.02, 3)
		if err != nil {
			t.Fatal(err)
		}
		for _, T := range []int{1, 4, 16, 64} {
			x, err := g.FromFloat32([]int{T, s.in}, randVals(r, T*s.in, 1))
			if err != nil {
				t.Fatal(err)
			}
			shape := fmt.Sprintf("[%d %d]x[%d %d]", T, s.in, s.out, s.in)
			timeIt("Linear int4", shape, f.Bytes([]int{s.out, s.in}, 1), func() error { _, err := g.Linear(x, q); return err })
			timeIt("Linear bf16", shape, int64(2*s.out*s.in), func() error { _, err := g.Linear(x, bw); return err })
		}
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
	per := (f.Bytes([]int{E, H, 2 * I}, 1) + f.Bytes([]int{E, I, H}, 1)) / E
	// Decode at 1 and 16 tokens (q4expert_gemv), and 256 tokens: prefill's path, q4gemm_experts_swiglu
	// and q4gemm_experts over the active experts (TestInt4GEMMTimes compares it with the dequantised
	// path); the bytes are the active experts' codes and scales either way.
	for _, T := range []int{1, 16, 256} {
		x, _ := g.FromFloat32([]int{T, H}, randVals(r, T*H, 1))
		logits, _ := g.FromFloat32([]int{T, E}, randVals(r, T*E, 3))
		rt, err := g.Route(logits, 1)
		if err != nil {
			t.Fatal(err)
		}
		active := activeExperts(t, g, rt)
		timeIt("Experts int4", fmt.Sprintf("T %d k 1 (%d experts)", T, active), per*int64(active), func() error {
			_, err := g.Experts(x, rt, gu, dn, 0)
			return err
		})
	}
}
