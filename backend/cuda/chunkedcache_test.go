package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/safetensors"
)

// chunkedCacheCase is a prompt of n positions fed to one chunked layer's cache in pieces of piece rows
// (0: whole), the way llama4.Model.Forward does: AttendBatch per piece (the cache's capacity the
// sequence's, as NewSequence asks), with bf16 q, k and v as prefill stores them.
type chunkedCacheCase struct {
	name              string
	heads, kvHeads, D int
	chunk, block      int
	n, piece          int
	capacity          int // 0: n
}

// TestChunkedCacheLongPrefill compares, piece by piece, what the cuda backend's paged cache gives for
// a prompt appended to a chunked layer in pieces of many chunks (the long-context fixture's layer: 4/2
// heads of 16, chunk 16, blocks of 16, 208 positions; a prompt whole is one AttendBatch of 13 chunks)
// with the cpu backend's, row by row: the worst row's relative L2 must stay within conformanceRelL2, and
// both caches must keep the same positions and blocks. The head-dim-128 cases take the flash kernel for
// the long pieces, the others the scalar attention kernel (and the split kernel for pieces of at most 8).
func TestChunkedCacheLongPrefill(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	c := cpu.New(cpu.Config{})
	var cases []chunkedCacheCase
	for _, piece := range []int{0, 37, 16, 5, 1} {
		cases = append(cases, chunkedCacheCase{name: "longctx layer", heads: 4, kvHeads: 2, D: 16, chunk: 16, block: 16, n: 208, piece: piece})
	}
	cases = append(cases,
		chunkedCacheCase{name: "longctx layer, spare capacity", heads: 4, kvHeads: 2, D: 16, chunk: 16, block: 16, n: 208, capacity: 512},
		chunkedCacheCase{name: "capacity one chunk", heads: 4, kvHeads: 2, D: 16, chunk: 16, block: 16, n: 16},
		chunkedCacheCase{name: "block 5", heads: 4, kvHeads: 2, D: 16, chunk: 16, block: 5, n: 208},
		chunkedCacheCase{name: "D128 flash", heads: 40, kvHeads: 8, D: 128, chunk: 128, block: 16, n: 1100},
		chunkedCacheCase{name: "D128 flash pieces", heads: 40, kvHeads: 8, D: 128, chunk: 128, block: 16, n: 1100, piece: 300},
	)
	for i, s := range cases {
		label := fmt.Sprintf("%s: %d positions in pieces of %d (0: whole), h %d/%d D %d chunk %d block %d capacity %d",
			s.name, s.n, s.piece, s.heads, s.kvHeads, s.D, s.chunk, s.block, max(s.capacity, s.n))
		t.Run(fmt.Sprintf("%s/piece=%d", s.name, s.piece), func(t *testing.T) {
			worst, at, err := chunkedCacheWorst(t, c, g, s, uint64(300+i))
			status := ""
			switch {
			case err != nil:
				status = " FAIL: " + err.Error()
				t.Errorf("%s: %v", label, err)
			case worst > conformanceRelL2:
				status = " FAIL"
				t.Errorf("%s: worst row relative L2 vs cpu %.3g at position %d, want <= %.3g", label, worst, at, conformanceRelL2)
			}
			t.Logf("%s: worst row relL2 vs cpu %.3g at position %d", label, worst, at)
			row("Chunked cache", label, fmt.Sprintf("worst row relL2 %.2e at %d%s", worst, at, status), "")
		})
	}
}

// chunkedCacheWorst runs case s on the cpu backend c and the cuda backend g with the same bf16 inputs
// and returns the worst row's relative L2 of g's attention output against c's, and its position.
func chunkedCacheWorst(t *testing.T, c, g backend.Ops, s chunkedCacheCase, seed uint64) (worst float64, at int, err error) {
	t.Helper()
	capacity := max(s.capacity, s.n)
	w := backend.Window{Chunk: s.chunk}
	cc := newCache(t, c, s.kvHeads, s.D, capacity, w, s.block)
	gc := newCache(t, g, s.kvHeads, s.D, capacity, w, s.block)
	defer cc.Free()
	defer gc.Free()
	r := rand.New(rand.NewPCG(seed, 7))
	piece := s.piece
	if piece == 0 {
		piece = s.n
	}
	scale := float32(1 / math.Sqrt(float64(s.D)))
	at = -1
	for p0 := 0; p0 < s.n; p0 += piece {
		T := min(piece, s.n-p0)
		q := bf16Data(randVals(r, T*s.heads*s.D, 2))
		k := bf16Data(randVals(r, T*s.kvHeads*s.D, 1))
		v := bf16Data(randVals(r, T*s.kvHeads*s.D, 1))
		pos := make([]int, T)
		for i := range pos {
			pos[i] = p0 + i
		}
		outs := make([][]float32, 2)
		for j, b := range []backend.Ops{c, g} {
			cache := []backend.KVCache{cc, gc}[j]
			load := func(data []byte, heads int) backend.Tensor {
				x, err := b.Load(safetensors.BF16, []int{T, heads, s.D}, data)
				if err != nil {
					t.Fatal(err)
				}
				return x
			}
			qt, kt, vt := load(q, s.heads), load(k, s.kvHeads), load(v, s.kvHeads)
			var out backend.Tensor
			var err error
			if ba, ok := b.(backend.BatchAttender); ok {
				out, err = ba.AttendBatch(qt, kt, vt, []backend.AttendSpan{{Cache: cache, Start: 0, End: T, Pos: pos}}, w, scale)
			} else if err = cache.Append(kt, vt, pos); err == nil {
				out, err = b.Attention(qt, cache, pos, w, scale)
			}
			if err != nil {
				return 0, p0, fmt.Errorf("%s: piece at %d: %w", b.Name(), p0, err)
			}
			outs[j] = float32s(t, b, out)
		}
		if cc.Len() != gc.Len() || cc.Kept() != gc.Kept() {
			return 0, p0, fmt.Errorf("after the piece at %d: cuda holds %d of %d positions, cpu %d of %d", p0, gc.Kept(), gc.Len(), cc.Kept(), cc.Len())
		}
		row := s.heads * s.D
		for i := range T {
			gv, cv := outs[1][i*row:(i+1)*row], outs[0][i*row:(i+1)*row]
			for _, x := range gv {
				if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
					return math.Inf(1), p0 + i, nil
				}
			}
			if rel := relL2(gv, cv); rel > worst || at < 0 {
				worst, at = rel, p0+i
			}
		}
	}
	return worst, at, nil
}
