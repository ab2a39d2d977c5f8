package cuda_test

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/safetensors"
)

// flashCase is a prefill for Attention's flash path: a cache whose first Append starts at position
// first and covers [first, start), then T new positions start.. appended and attended.
type flashCase struct {
	name              string
	heads, kvHeads, D int
	chunk             int
	first, start, T   int
	qScale, kvScale   float32
	capacity          int // 0: start + T
	block             int // KV block size (0: 16)
}

func (s flashCase) String() string {
	return fmt.Sprintf("%s T %d at %d (cache from %d) h %d/%d D %d chunk %d block %d", s.name, s.T, s.start, s.first, s.heads, s.kvHeads, s.D, s.chunk, cmp.Or(s.block, 16))
}

// newCache makes a cache in a growing pool of blocks of block positions (0: 16) on b.
func newCache(t testing.TB, b backend.Ops, kvHeads, D, capacity int, w backend.Window, block int) backend.KVCache {
	t.Helper()
	pool, err := b.NewBlockPool(kvHeads, D, cmp.Or(block, 16), 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := b.NewKVCache(pool, capacity, w)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// flashSide is one backend's cache and q for a flashCase.
type flashSide struct {
	b     backend.Ops
	cache backend.KVCache
	q     backend.Tensor
	pos   []int
}

// setupFlash fills a cache on b with the case's keys and values (the same random values on every
// backend for the same seed) and loads q as bf16, the dtype prefill activations have.
func setupFlash(t testing.TB, b backend.Ops, s flashCase, seed uint64) flashSide {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 99))
	capacity := s.capacity
	if capacity == 0 {
		capacity = s.start + s.T
	}
	w := backend.Window{Chunk: s.chunk}
	c := newCache(t, b, s.kvHeads, s.D, capacity, w, s.block)
	appendRange := func(lo, hi int) {
		if hi <= lo {
			return
		}
		n := (hi - lo) * s.kvHeads * s.D
		k, err := b.FromFloat32([]int{hi - lo, s.kvHeads, s.D}, randVals(r, n, s.kvScale))
		if err != nil {
			t.Fatal(err)
		}
		v, err := b.FromFloat32([]int{hi - lo, s.kvHeads, s.D}, randVals(r, n, s.kvScale))
		if err != nil {
			t.Fatal(err)
		}
		pos := make([]int, hi-lo)
		for i := range pos {
			pos[i] = lo + i
		}
		if err := c.Append(k, v, pos); err != nil {
			t.Fatal(err)
		}
	}
	appendRange(s.first, s.start)
	appendRange(s.start, s.start+s.T)
	q, err := b.Load(safetensors.BF16, []int{s.T, s.heads, s.D}, bf16Data(randVals(r, s.T*s.heads*s.D, s.qScale)))
	if err != nil {
		t.Fatal(err)
	}
	pos := make([]int, s.T)
	for i := range pos {
		pos[i] = s.start + i
	}
	return flashSide{b: b, cache: c, q: q, pos: pos}
}

func (f flashSide) attend(s flashCase) (backend.Tensor, error) {
	return f.b.Attention(f.q, f.cache, f.pos, backend.Window{Chunk: s.chunk}, float32(1/math.Sqrt(float64(s.D))))
}

func float32s(t testing.TB, b backend.Ops, x backend.Tensor) []float32 {
	t.Helper()
	v, err := b.Float32(x)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// timeAttention returns the mean time of reps synchronized Attention calls after a warm-up.
func timeAttention(t testing.TB, g *cuda.Backend, f flashSide, s flashCase, reps int) time.Duration {
	t.Helper()
	if _, err := f.attend(s); err != nil {
		t.Fatal(err)
	}
	if err := g.Synchronize(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for range reps {
		if _, err := f.attend(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.Synchronize(); err != nil {
		t.Fatal(err)
	}
	return time.Since(start) / time.Duration(reps)
}

// TestFlashAttention compares Attention's tensor-core prefill path (attention_flash) with the cpu
// backend, and with the scalar attention kernel, on random inputs: global and chunked windows, T not a
// multiple of the 64-row tile, head dim 64, prefills continuing a cache, a cache whose first kept
// position is above 0 (so the window is cut at first_kept), and the smallest T the path takes.
func TestFlashAttention(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	c := cpu.New(cpu.Config{})
	defer cuda.SetFlash(g, cuda.SetFlash(g, true))
	for i, s := range []flashCase{
		{name: "global", heads: 40, kvHeads: 8, D: 128, T: 512},
		{name: "chunked", heads: 40, kvHeads: 8, D: 128, chunk: 128, T: 300},
		{name: "D64", heads: 16, kvHeads: 4, D: 64, T: 256},
		{name: "D64 chunked", heads: 16, kvHeads: 4, D: 64, chunk: 64, T: 200},
		{name: "continue", heads: 40, kvHeads: 8, D: 128, start: 200, T: 130},
		{name: "continue chunked", heads: 40, kvHeads: 8, D: 128, chunk: 128, start: 200, T: 130},
		{name: "first kept", heads: 40, kvHeads: 8, D: 128, first: 100, start: 100, T: 300},
		{name: "first kept chunked", heads: 40, kvHeads: 8, D: 128, chunk: 128, first: 100, start: 100, T: 300},
		{name: "continue dropped", heads: 40, kvHeads: 8, D: 128, chunk: 128, first: 100, start: 250, T: 130},
		{name: "smallest T", heads: 40, kvHeads: 8, D: 128, start: 500, T: 9},
		{name: "MHA spare capacity", heads: 8, kvHeads: 8, D: 128, T: 100, capacity: 1000},
		{name: "G5 peaked", heads: 10, kvHeads: 2, D: 128, chunk: 96, start: 40, T: 333, qScale: 8},
		// Paged: blocks smaller than a 64-key tile and not dividing the chunk, and one position a block.
		{name: "block 5 continue chunked", heads: 40, kvHeads: 8, D: 128, chunk: 128, start: 200, T: 130, block: 5},
		{name: "block 5 continue dropped", heads: 40, kvHeads: 8, D: 128, chunk: 128, first: 100, start: 250, T: 130, block: 5},
		{name: "block 1 D64 chunked", heads: 16, kvHeads: 4, D: 64, chunk: 64, start: 30, T: 200, block: 1},
		{name: "block 256 global", heads: 40, kvHeads: 8, D: 128, start: 100, T: 300, block: 256},
	} {
		if s.qScale == 0 {
			s.qScale = 2
		}
		if s.kvScale == 0 {
			s.kvScale = 1
		}
		t.Run(s.name, func(t *testing.T) {
			seed := uint64(100 + i)
			cs, gs := setupFlash(t, c, s, seed), setupFlash(t, g, s, seed)
			if !cuda.FlashEligible(g, gs.q, s.heads, s.kvHeads) {
				t.Fatalf("%v: Attention would not take the flash path", s)
			}
			want, err := cs.attend(s)
			if err != nil {
				t.Fatal(err)
			}
			got, err := gs.attend(s)
			if err != nil {
				t.Fatalf("%v: %v", s, err)
			}
			wv, gv := float32s(t, c, want), float32s(t, g, got)
			for j, v := range gv {
				if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
					t.Fatalf("%v: [%d] = %v", s, j, v)
				}
			}
			rel := relL2(gv, wv)
			cuda.SetFlash(g, false)
			old, err := gs.attend(s)
			cuda.SetFlash(g, true)
			if err != nil {
				t.Fatal(err)
			}
			relOld := relL2(float32s(t, g, old), wv)
			status := ""
			if rel > conformanceRelL2 {
				status = " FAIL"
				t.Errorf("%v: flash relative L2 vs cpu = %.3g, want <= %.3g (attention kernel: %.3g)", s, rel, conformanceRelL2, relOld)
			}
			t.Logf("%v: flash relL2 vs cpu %.3g, attention kernel %.3g", s, rel, relOld)
			row("Attn flash", s.String(), fmt.Sprintf("relL2 %.2e (old %.2e)%s", rel, relOld, status), "")
		})
	}
}

// TestFlashAttentionTiming times one layer's prefill attention (Scout's 40/8 heads, D 128) by the flash
// path and by the scalar attention kernel, and checks that the two agree. Times are reported, never
// asserted.
func TestFlashAttentionTiming(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	defer cuda.SetFlash(g, cuda.SetFlash(g, true))
	for _, s := range []flashCase{
		{name: "global", heads: 40, kvHeads: 8, D: 128, T: 512},
		{name: "global", heads: 40, kvHeads: 8, D: 128, T: 2048},
		{name: "chunked", heads: 40, kvHeads: 8, D: 128, chunk: 8192, T: 2048},
		{name: "continue", heads: 40, kvHeads: 8, D: 128, start: 2048, T: 2048},
	} {
		s.qScale, s.kvScale = 2, 1
		gs := setupFlash(t, g, s, 7)
		if !cuda.FlashEligible(g, gs.q, s.heads, s.kvHeads) {
			t.Fatalf("%v: Attention would not take the flash path", s)
		}
		got, err := gs.attend(s)
		if err != nil {
			t.Fatal(err)
		}
		flash := timeAttention(t, g, gs, s, 20)
		cuda.SetFlash(g, false)
		old, err := gs.attend(s)
		if err != nil {
			cuda.SetFlash(g, true)
			t.Fatal(err)
		}
		scalar := timeAttention(t, g, gs, s, 5)
		cuda.SetFlash(g, true)
		rel := relL2(float32s(t, g, got), float32s(t, g, old))
		status := ""
		if rel > conformanceRelL2 {
			status = " FAIL"
			t.Errorf("%v: flash vs attention kernel relative L2 = %.3g, want <= %.3g", s, rel, conformanceRelL2)
		}
		t.Logf("%v: flash %v, attention kernel %v (%.1fx); relL2 between them %.3g", s, flash, scalar,
			float64(scalar)/float64(flash), rel)
		row("Attn flash", s.String(), fmt.Sprintf("vs kernel relL2 %.2e%s", rel, status), flash.Round(time.Microsecond).String())
		row("Attn scalar", s.String(), "", scalar.Round(time.Microsecond).String())
	}
}
