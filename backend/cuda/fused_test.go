package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/safetensors"
)

// TestAddRMSNormEqualsAddThenNorm: the fused kernel must give exactly what Add then RMSNorm give, in both
// activation modes and at decode (1 row) and prefill (100 rows, bf16 norm output) sizes.
func TestAddRMSNormEqualsAddThenNorm(t *testing.T) {
	for _, act := range []cuda.DType{cuda.BF16, cuda.F32} {
		b := newBackend(t, act)
		r := rand.New(rand.NewPCG(3, 4))
		for _, rows := range []int{1, 7, 100} {
			const n = 5120
			x, err := b.FromFloat32([]int{rows, n}, randVals(r, rows*n, 4))
			if err != nil {
				t.Fatal(err)
			}
			y, err := b.FromFloat32([]int{rows, n}, randVals(r, rows*n, 1))
			if err != nil {
				t.Fatal(err)
			}
			w, err := b.Load(safetensors.BF16, []int{n}, bf16Data(randVals(r, n, 2)))
			if err != nil {
				t.Fatal(err)
			}
			sum, normed, err := b.AddRMSNorm(x, y, w, 1e-5)
			if err != nil {
				t.Fatal(err)
			}
			wantSum, err := b.Add(x, y)
			if err != nil {
				t.Fatal(err)
			}
			wantNormed, err := b.RMSNorm(wantSum, w, 1e-5)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				name      string
				got, want backend.Tensor
			}{{"sum", sum, wantSum}, {"normed", normed, wantNormed}} {
				g, err := b.Float32(c.got)
				if err != nil {
					t.Fatal(err)
				}
				h, err := b.Float32(c.want)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(g, h) {
					t.Errorf("act %s rows %d: %s differs from Add then RMSNorm (rel L2 %.3g)", act, rows, c.name, relL2(g, h))
				}
			}
		}
	}
}

// TestAttendBatchEqualsEach: AttendBatch over several sequences must give what Append and Attention give
// one sequence at a time, for decode-sized spans (one launch over all rows) and with a prefill span
// among them (one span at a time), with and without a chunked window; and the caches must end up in the
// same state (checked by a second, decode-only round).
func TestAttendBatchEqualsEach(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(5, 6))
	const heads, kvHeads, D = 8, 2, 64
	for _, chunk := range []int{0, 16} {
		window := backend.Window{Chunk: chunk}
		for _, lens := range [][]int{{1, 1, 1}, {3, 1, 8, 2}, {1, 20, 1}} {
			// Two copies of the same sequences: prefilled alike, then one batched and one per span.
			starts := []int{5, 17, 30, 2}
			var batched, each []backend.KVCache
			for i := range lens {
				for _, dst := range []*[]backend.KVCache{&batched, &each} {
					c := newCache(t, b, kvHeads, D, 128, window, 0)
					*dst = append(*dst, c)
				}
				n := starts[i]
				kv := randTensor(t, b, r, n, kvHeads, D)
				pos := seq(0, n)
				for _, c := range []backend.KVCache{batched[i], each[i]} {
					if err := c.Append(kv, kv, pos); err != nil {
						t.Fatal(err)
					}
				}
			}
			for round := range 2 {
				rows := 0
				spans := make([]backend.AttendSpan, len(lens))
				for i, l := range lens {
					if round == 1 {
						l = 1
					}
					first := batched[i].Len()
					spans[i] = backend.AttendSpan{Cache: batched[i], Start: rows, End: rows + l, Pos: seq(first, l)}
					rows += l
				}
				q := randTensor(t, b, r, rows, heads, D)
				k := randTensor(t, b, r, rows, kvHeads, D)
				v := randTensor(t, b, r, rows, kvHeads, D)
				got, err := b.AttendBatch(q, k, v, spans, window, 0.125)
				if err != nil {
					t.Fatal(err)
				}
				var outs []backend.Tensor
				for i, sp := range spans {
					rk, _ := b.Rows(k, sp.Start, sp.End)
					rv, _ := b.Rows(v, sp.Start, sp.End)
					if err := each[i].Append(rk, rv, sp.Pos); err != nil {
						t.Fatal(err)
					}
					rq, _ := b.Rows(q, sp.Start, sp.End)
					o, err := b.Attention(rq, each[i], sp.Pos, window, 0.125)
					if err != nil {
						t.Fatal(err)
					}
					outs = append(outs, o)
				}
				want, err := b.Concat(outs...)
				if err != nil {
					t.Fatal(err)
				}
				g, _ := b.Float32(got)
				h, _ := b.Float32(want)
				if d := relL2(g, h); d > 1e-6 {
					t.Errorf("chunk %d spans %v round %d: AttendBatch vs one by one rel L2 %.3g", chunk, lens, round, d)
				}
			}
		}
	}
}

func randTensor(t *testing.T, b *cuda.Backend, r *rand.Rand, shape ...int) backend.Tensor {
	t.Helper()
	n := 1
	for _, d := range shape {
		n *= d
	}
	x, err := b.FromFloat32(shape, randVals(r, n, 1))
	if err != nil {
		t.Fatal(err)
	}
	return x
}

func seq(from, n int) []int {
	p := make([]int, n)
	for i := range p {
		p[i] = from + i
	}
	return p
}

// TestLinearMulti: LinearMulti must equal one Linear per weight exactly, on the fused GEMV path (1 and 2
// rows, q/k/v and router/gate/up shapes), on the fallbacks (3 rows; an odd output width) and at 100 rows
// (prefill: x rounded to bf16 once for the wide products, the 16-output router split).
func TestLinearMulti(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(7, 8))
	weight := func(out, in int) backend.Tensor {
		w, err := b.Load(safetensors.BF16, []int{out, in}, bf16Data(randVals(r, out*in, 0.05)))
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	read := func(x backend.Tensor) []float32 {
		v, err := b.Float32(x)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	const in = 512
	for _, outs := range [][]int{{640, 128, 128}, {16, 1024, 1024}, {64, 63}} {
		ws := make([]backend.Tensor, len(outs))
		for i, n := range outs {
			ws[i] = weight(n, in)
		}
		for _, T := range []int{1, 2, 3, 100} {
			x := randTensor(t, b, r, T, in)
			got, err := b.LinearMulti(x, ws...)
			if err != nil {
				t.Fatal(err)
			}
			for i, w := range ws {
				want, err := b.Linear(x, w)
				if err != nil {
					t.Fatal(err)
				}
				if g, h := read(got[i]), read(want); !slices.Equal(g, h) {
					t.Errorf("outs %v T %d: LinearMulti[%d] differs from Linear (rel L2 %.3g)", outs, T, i, relL2(g, h))
				}
			}
		}
	}
}

// TestRoPEQKEqualsRoPEThenNorm: the fused rotation and qk-norm must give what RoPE and the weightless
// RMSNorm give, for decode (float32 activations) and prefill (bf16) row counts, with and without norm:
// equal without it, within float32 summation order (1e-6) with it at decode, within bf16 rounding at
// prefill.
func TestRoPEQKEqualsRoPEThenNorm(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(9, 10))
	invFreq := make([]float32, 64)
	for i := range invFreq {
		invFreq[i] = float32(1 / math.Pow(500000, float64(2*i)/128))
	}
	for _, T := range []int{1, 3, 100} {
		q, k := randTensor(t, b, r, T, 40, 128), randTensor(t, b, r, T, 8, 128)
		pos := seq(8000, T)
		for _, norm := range []bool{false, true} {
			gq, gk, err := b.RoPEQK(q, k, pos, invFreq, norm, 1e-5)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				name    string
				in, got backend.Tensor
			}{{"q", q, gq}, {"k", k, gk}} {
				want, err := b.RoPE(c.in, pos, invFreq)
				if err != nil {
					t.Fatal(err)
				}
				if norm {
					if want, err = b.RMSNorm(want, nil, 1e-5); err != nil {
						t.Fatal(err)
					}
				}
				g, _ := b.Float32(c.got)
				h, _ := b.Float32(want)
				bound := 0.0 // without norm: the same arithmetic
				switch {
				case norm && T > 64:
					// RoPEQK stores bf16 above 64 rows; RMSNorm stores float32 at any row count (since the
					// prefill precision fix) over RoPE's bf16 output: the two differ by bf16 rounding (1.6e-3
					// measured on an H100), a fraction of bf16's 2^-8.
					bound = 4e-3
				case norm:
					bound = 1e-6
				}
				if d := relL2(g, h); d > bound {
					t.Errorf("T %d norm %v %s: RoPEQK vs RoPE then RMSNorm rel L2 %.3g > %g", T, norm, c.name, d, bound)
				}
			}
		}
	}
}

// TestExpertsAddEqualsExpertsThenAdd: the shared expert's output added inside the experts' combine must
// give what Experts then Add give, on the decode (GEMV) and prefill (grouped GEMM) paths.
func TestExpertsAddEqualsExpertsThenAdd(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(11, 12))
	const E, H, I = 8, 512, 256
	gateUp, down := bf16Experts(t, b, r, E, H, I)
	for _, T := range []int{1, 3, 100} {
		for _, first := range []int{0, 4} { // 4: half the chosen experts are another rank's
			x, shared := randTensor(t, b, r, T, H), randTensor(t, b, r, T, H)
			logits := randTensor(t, b, r, T, 2*E)
			routing, err := b.Route(logits, 2)
			if err != nil {
				t.Fatal(err)
			}
			got, err := b.ExpertsAdd(x, routing, gateUp, down, first, shared)
			if err != nil {
				t.Fatal(err)
			}
			routed, err := b.Experts(x, routing, gateUp, down, first)
			if err != nil {
				t.Fatal(err)
			}
			want, err := b.Add(routed, shared)
			if err != nil {
				t.Fatal(err)
			}
			g, _ := b.Float32(got)
			h, _ := b.Float32(want)
			if !slices.Equal(g, h) {
				t.Errorf("T %d first %d: ExpertsAdd differs from Experts then Add (rel L2 %.3g)", T, first, relL2(g, h))
			}
		}
	}
}

// TestExpertEpilogueCountersReset: the decode expert GEMVs' fused epilogues (SiLU·mul in gate_up, the
// combine in down) hand off to the last block of each column tile through counters that must be zero
// again after every launch, and give what the unfused kernels give, call after call. Each call is
// checked on its own, so a failure says whether the counters or the hand-off went wrong first.
func TestExpertEpilogueCountersReset(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(21, 22))
	const E, H, I = 8, 512, 256 // I % 256 == 0: the SiLU·mul epilogue applies
	gateUp, down := bf16Experts(t, b, r, E, H, I)
	for call := range 6 {
		T, k := 1+call%2, 1+call/2%2 // 1 to 4 slots: both epilogues
		x := randTensor(t, b, r, T, H)
		routing, err := b.Route(randTensor(t, b, r, T, E), k)
		if err != nil {
			t.Fatal(err)
		}
		got, err := b.Experts(x, routing, gateUp, down, 0)
		if err != nil {
			t.Fatal(err)
		}
		ctr, err := cuda.FuseCounters(b)
		if err != nil {
			t.Fatal(err)
		}
		if ctr == nil {
			t.Fatalf("call %d (T %d k %d): no fused epilogue ran", call, T, k)
		}
		for i, c := range ctr {
			if c != 0 {
				t.Errorf("call %d (T %d k %d): counter %d is %d after the launch, want 0", call, T, k, i, c)
				break
			}
		}
		var want backend.Tensor
		unfused(t, b, func() {
			if want, err = b.Experts(x, routing, gateUp, down, 0); err != nil {
				t.Fatal(err)
			}
		})
		sameFloats(t, b, fmt.Sprintf("call %d (T %d k %d) Experts", call, T, k), got, want)
	}
}

// bf16Experts loads random bf16 routed-expert weights, gate_up [E, H, 2I] and down [E, I, H].
func bf16Experts(t *testing.T, b *cuda.Backend, r *rand.Rand, E, H, I int) (gateUp, down backend.Tensor) {
	t.Helper()
	gateUp, err := b.Load(safetensors.BF16, []int{E, H, 2 * I}, bf16Data(randVals(r, E*H*2*I, 0.05)))
	if err != nil {
		t.Fatal(err)
	}
	down, err = b.Load(safetensors.BF16, []int{E, I, H}, bf16Data(randVals(r, E*I*H, 0.05)))
	if err != nil {
		t.Fatal(err)
	}
	return gateUp, down
}
