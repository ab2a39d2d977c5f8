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
)

// decodeRelL2 bounds the worst query's relative L2 error of decode attention against the cpu backend.
// Decode queries are float32 (skinny activations), and attention_decode feeds q and P to the tensor cores
// as bf16 hi + lo pairs, so the result is close to float32 (measured: see the table row); the bound leaves
// room for bf16 outputs.
const decodeRelL2 = 2e-3

// decodeSeq is one sequence of a decode batch: n positions cached in blocks of block (0: 16), the last
// one appended with the query by AttendBatch.
type decodeSeq struct{ n, block int }

type decodeCase struct {
	name              string
	heads, kvHeads, D int
	chunk             int
	seqs              []decodeSeq
}

func (s decodeCase) String() string {
	var lens []string
	for _, q := range s.seqs {
		lens = append(lens, fmt.Sprint(q.n))
	}
	return fmt.Sprintf("%s h %d/%d D %d chunk %d ctx %s", s.name, s.heads, s.kvHeads, s.D, s.chunk, strings.Join(lens, ","))
}

// TestDecodeAttention compares the batched decode attention (AttendBatch: one kv_append and one
// attention_decode over every sequence's new row) with the cpu backend's Append and Attention one sequence
// at a time: Scout's 40/8 heads of 128 at contexts from 1 to 20000 tokens in one batch (the long ones cut
// over many blocks and merged), chunked windows across a chunk boundary, groups of 4 and 8, D 32 and 64, a
// few queries of one sequence (Attention); in both activation modes. The same launch again must give the
// same bits, and the old split kernel (attention_split) must agree.
func TestDecodeAttention(t *testing.T) {
	c := cpu.New(cpu.Config{})
	cases := []decodeCase{
		{name: "scout", heads: 40, kvHeads: 8, D: 128, seqs: []decodeSeq{{1, 16}, {17, 5}, {300, 64}, {4096, 16}, {20000, 16}}},
		{name: "scout chunked", heads: 40, kvHeads: 8, D: 128, chunk: 8192, seqs: []decodeSeq{{9000, 16}, {8192, 16}, {8193, 1}, {100, 16}}},
		{name: "one long", heads: 40, kvHeads: 8, D: 128, seqs: []decodeSeq{{30000, 16}}},
		{name: "G4 D64", heads: 8, kvHeads: 2, D: 64, chunk: 16, seqs: []decodeSeq{{1, 16}, {33, 16}, {700, 5}}},
		{name: "G8 D32", heads: 8, kvHeads: 1, D: 32, seqs: []decodeSeq{{2000, 16}, {3, 16}}},
		{name: "G2 D16 (fixtures)", heads: 4, kvHeads: 2, D: 16, seqs: []decodeSeq{{1, 16}, {65, 16}, {1000, 16}}},
	}
	for _, act := range []cuda.DType{cuda.F32, cuda.BF16} {
		g := newBackend(t, act)
		for i, s := range cases {
			label := fmt.Sprintf("%v act %v", s, act)
			t.Run(fmt.Sprintf("%s/act=%v", s.name, act), func(t *testing.T) {
				worst, legacy := decodeWorst(t, c, g, s, uint64(500+i))
				status := ""
				if worst > decodeRelL2 || legacy > decodeRelL2 {
					status = " FAIL"
					t.Errorf("%s: worst query relL2 vs cpu %.3g, vs attention_split %.3g, want <= %.3g", label, worst, legacy, decodeRelL2)
				}
				t.Logf("%s: worst query relL2 vs cpu %.3g, vs attention_split %.3g", label, worst, legacy)
				row("Attn decode", label, fmt.Sprintf("relL2 %.2e (vs split kernel %.2e)%s", worst, legacy, status), "")
			})
		}
	}
	t.Run("few queries of one sequence", func(t *testing.T) {
		g := newBackend(t, cuda.BF16)
		const heads, kvHeads, D, n = 40, 8, 128, 5000
		var outs [2][]float32
		for j, b := range []backend.Ops{c, g} {
			cache := newCache(t, b, kvHeads, D, n, backend.Window{}, 16)
			r := rand.New(rand.NewPCG(9, 9))
			k := fromF32(t, b, randVals(r, n*kvHeads*D, 1), n, kvHeads, D)
			v := fromF32(t, b, randVals(r, n*kvHeads*D, 1), n, kvHeads, D)
			if err := cache.Append(k, v, seq(0, n)); err != nil {
				t.Fatal(err)
			}
			q := fromF32(t, b, randVals(r, 3*heads*D, 2), 3, heads, D)
			out, err := b.Attention(q, cache, []int{n - 3, n - 2, n - 1}, backend.Window{}, float32(1/math.Sqrt(D)))
			if err != nil {
				t.Fatal(err)
			}
			outs[j] = float32s(t, b, out)
		}
		if rel := relL2(outs[1], outs[0]); rel > decodeRelL2 {
			t.Errorf("Attention T 3 at %d..%d: relL2 vs cpu %.3g, want <= %.3g", n-3, n-1, rel, decodeRelL2)
		} else {
			t.Logf("Attention T 3 at %d..%d: relL2 vs cpu %.3g", n-3, n-1, rel)
		}
	})
}

func fromF32(t testing.TB, b backend.Ops, v []float32, shape ...int) backend.Tensor {
	t.Helper()
	x, err := b.FromFloat32(shape, v)
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// decodeWorst fills each sequence's cache on the cpu backend c and the cuda backend g with the same
// values (all but the last position), appends the last positions and attends them (g: AttendBatch over
// all sequences; c: Append and Attention per sequence), and returns the worst query's relative L2 of g
// against c, and of attention_decode against attention_split on g. It also checks that attention_decode
// gives the same bits when run again.
func decodeWorst(t *testing.T, c backend.Ops, g *cuda.Backend, s decodeCase, seed uint64) (worst, legacy float64) {
	t.Helper()
	w := backend.Window{Chunk: s.chunk}
	scale := float32(1 / math.Sqrt(float64(s.D)))
	T := len(s.seqs)
	r := rand.New(rand.NewPCG(seed, 1))
	var cc, gc []backend.KVCache
	for _, q := range s.seqs {
		cc = append(cc, newCache(t, c, s.kvHeads, s.D, q.n, w, q.block))
		gc = append(gc, newCache(t, g, s.kvHeads, s.D, q.n, w, q.block))
		if q.n == 1 {
			continue
		}
		// The prefix in pieces of at most 4096 rows (a chunked cache drops what it no longer needs).
		for p0 := 0; p0 < q.n-1; p0 += 4096 {
			m := min(4096, q.n-1-p0)
			kv := randVals(r, 2*m*s.kvHeads*s.D, 1)
			for j, b := range []backend.Ops{c, g} {
				k := fromF32(t, b, kv[:m*s.kvHeads*s.D], m, s.kvHeads, s.D)
				v := fromF32(t, b, kv[m*s.kvHeads*s.D:], m, s.kvHeads, s.D)
				if err := []backend.KVCache{cc[len(cc)-1], gc[len(gc)-1]}[j].Append(k, v, seq(p0, m)); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	defer func() {
		for i := range cc {
			cc[i].Free()
			gc[i].Free()
		}
	}()
	qv := randVals(r, T*s.heads*s.D, 2)
	kv := randVals(r, 2*T*s.kvHeads*s.D, 1)
	pos := make([]int, T)
	spans := make([]backend.AttendSpan, T)
	for i, q := range s.seqs {
		pos[i] = q.n - 1
		spans[i] = backend.AttendSpan{Cache: gc[i], Start: i, End: i + 1, Pos: pos[i : i+1]}
	}
	q, k, v := fromF32(t, g, qv, T, s.heads, s.D), fromF32(t, g, kv[:T*s.kvHeads*s.D], T, s.kvHeads, s.D),
		fromF32(t, g, kv[T*s.kvHeads*s.D:], T, s.kvHeads, s.D)
	out, err := g.AttendBatch(q, k, v, spans, w, scale)
	if err != nil {
		t.Fatal(err)
	}
	got := float32s(t, g, out)

	// The cpu backend, one sequence at a time.
	row := s.heads * s.D
	want := make([]float32, 0, T*row)
	kd, vd := kv[:T*s.kvHeads*s.D], kv[T*s.kvHeads*s.D:]
	for i := range s.seqs {
		kr := fromF32(t, c, kd[i*s.kvHeads*s.D:(i+1)*s.kvHeads*s.D], 1, s.kvHeads, s.D)
		vr := fromF32(t, c, vd[i*s.kvHeads*s.D:(i+1)*s.kvHeads*s.D], 1, s.kvHeads, s.D)
		if err := cc[i].Append(kr, vr, pos[i:i+1]); err != nil {
			t.Fatal(err)
		}
		o, err := c.Attention(fromF32(t, c, qv[i*row:(i+1)*row], 1, s.heads, s.D), cc[i], pos[i:i+1], w, scale)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, float32s(t, c, o)...)
	}
	for i := range T {
		if rel := relL2(got[i*row:(i+1)*row], want[i*row:(i+1)*row]); rel > worst || math.IsNaN(rel) {
			worst = rel
		}
	}

	// The same launch again (AttendRows: the attention without the append) gives the same bits; the
	// split kernel agrees.
	again, err := cuda.AttendRows(g, q, gc, pos, w, scale)
	if err != nil {
		t.Fatal(err)
	}
	if a := float32s(t, g, again); !slices.Equal(a, got) {
		t.Errorf("%v: attention_decode run again differs (relL2 %.3g)", s, relL2(a, got))
	}
	old := cuda.SetDecode(g, false)
	split, err := cuda.AttendRows(g, q, gc, pos, w, scale)
	cuda.SetDecode(g, old)
	if err != nil {
		t.Fatal(err)
	}
	sv := float32s(t, g, split)
	for i := range T {
		if rel := relL2(got[i*row:(i+1)*row], sv[i*row:(i+1)*row]); rel > legacy || math.IsNaN(rel) {
			legacy = rel
		}
	}
	return worst, legacy
}
