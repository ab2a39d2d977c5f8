package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cuda"
)

// TestDecodeBandwidth reports, for the memory-bound kernels of a Scout decode step, the GPU time per call
// (Profile: event to event, the calls queued back to back) and the weight bytes per second, next to the
// device's copy rate. It is a measurement for docs/gpu-notes.md: it checks only that the ops run.
func TestDecodeBandwidth(t *testing.T) {
	newBackend(t, cuda.BF16) // skips without a GPU
	b, err := cuda.New(cuda.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	copyRate, err := b.CopyBandwidth(1<<30, 20)
	if err != nil {
		t.Fatal(err)
	}
	row("copy", "D2D 1 GiB", fmt.Sprintf("%.0f GB/s", copyRate/1e9), "")
	const calls = 10
	measure := func(name, shape string, bytes int64, op func() error) {
		t.Helper()
		entries, total, err := b.Profile(func() error {
			for range calls {
				if err := op(); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		per := total / calls
		var kernels string
		for _, e := range entries {
			kernels += fmt.Sprintf(" %s %v", e.Op, (e.Device / calls).Round(100*time.Nanosecond))
		}
		t.Logf("%s %s: %v per call, %.0f GB/s;%s", name, shape, per, float64(bytes)/per.Seconds()/1e9, kernels)
		row(name, shape, fmt.Sprintf("%.0f GB/s (%.0f%% of copy)", float64(bytes)/per.Seconds()/1e9, 100*float64(bytes)/per.Seconds()/copyRate),
			per.Round(100*time.Nanosecond).String())
	}
	weight := func(out, in int, seed uint64) backend.Tensor {
		w, err := b.RandomBF16([]int{out, in}, 0, 0.02, seed)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	vector := func(n int) backend.Tensor {
		x, err := b.FromFloat32([]int{1, n}, make([]float32, n))
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	for _, split := range []bool{true, false} {
		cuda.SetGEMVSplit(b, split)
		name := map[bool]string{true: "GEMV bw", false: "GEMV-warp bw"}[split]
		for _, s := range []struct{ in, out int }{{5120, 5120}, {5120, 1024}, {5120, 8192}, {8192, 5120}, {5120, 202048}} {
			w, x := weight(s.out, s.in, 1), vector(s.in)
			measure(name, fmt.Sprintf("[1 %d]x[%d %d]", s.in, s.out, s.in), int64(s.out)*int64(s.in)*2, func() error {
				_, err := b.Linear(x, w)
				return err
			})
		}
		q, k, v, x := weight(5120, 5120, 2), weight(1024, 5120, 3), weight(1024, 5120, 4), vector(5120)
		measure(name, "multi q/k/v 5120+1024+1024 x 5120", int64(7168*5120*2), func() error {
			_, err := b.LinearMulti(x, q, k, v)
			return err
		})
	}
	cuda.SetGEMVSplit(b, true)

	decodeAttentionBandwidth(t, b, copyRate)
	const E, H, I = 16, 5120, 8192
	gateUp, err := b.RandomBF16([]int{E, H, 2 * I}, 0, 0.02, 2)
	if err != nil {
		t.Fatal(err)
	}
	down, err := b.RandomBF16([]int{E, I, H}, 0, 0.02, 3)
	if err != nil {
		t.Fatal(err)
	}
	x, err := b.FromFloat32([]int{1, H}, make([]float32, H))
	if err != nil {
		t.Fatal(err)
	}
	logits, err := b.FromFloat32([]int{1, E}, []float32{0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	if err != nil {
		t.Fatal(err)
	}
	var r backend.Routing
	measure("Experts bw", fmt.Sprintf("T 1 E %d H %d I %d", E, H, I), int64(H)*3*I*2, func() error {
		if r, err = b.Route(logits, 1); err != nil {
			return err
		}
		_, err := b.Experts(x, r, gateUp, down, 0)
		return err
	})
}

// decodeAttentionBandwidth adds the decode attention rows to the table: Scout's 40 query heads over 8 kv
// heads of 128 (one layer, bf16 KV in blocks of 16), one sequence of 2048 cached tokens (Scout-4L's batch-1
// bench), batches of 1, 16 and 64 sequences of 4096, one 128 k-token context on a global (NoPE) layer, and
// one on a chunked layer, which reads only the current 8192-token chunk. Bytes are the K and V rows the
// queries see; GB/s is from the attention kernels' GPU time (Profile, without the rows' upload, which a
// recorded step folds into its one argument copy). The old split kernel, other grid sizes and other minb
// (the fewest 16-key tiles a block takes) are measured for comparison. About 1.6 GB of KV in all.
//
// minb matters only while it limits the blocks: the kernel runs min(grid, W/minb) of them, W the launch's
// tiles (kv heads × the queries' 16-key tiles), so on an H100 or H200 (132 SMs, 528 blocks) 1×2048 (W
// 1024), 1×4096 (W 2048) and the chunked layer (W 4096, 8192 keys visible) change blocks at the values
// swept, but 16×4096 (W 32768), 64×4096 (W 131072) and the global 1×131072 (W 65536) are grid-bound up to
// 62, 248 and 124 tiles a block: their sweeps keep values under that as controls (the same launch as the
// default) and go past it, where fewer blocks cut the segments into fewer pieces (merged serially).
func decodeAttentionBandwidth(t *testing.T, b *cuda.Backend, copyRate float64) {
	const heads, kvHeads, D, block = 40, 8, 128, 16
	const rowBytes = kvHeads * D * 2 * 2 // K and V of one position, bf16
	scale := float32(1 / math.Sqrt(D))
	// One random piece of K/V rows, appended over and over (its values do not matter here).
	const piece = 4096
	kv, err := b.RandomBF16([]int{piece, kvHeads, D}, 0, 1, 7)
	if err != nil {
		t.Fatal(err)
	}
	fill := func(c backend.KVCache, n int) {
		for p0 := 0; p0 < n; p0 += piece {
			m := min(piece, n-p0)
			k, err := b.Rows(kv, 0, m)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Append(k, k, seq(p0, m)); err != nil {
				t.Fatal(err)
			}
		}
	}
	type shape struct {
		name      string
		seqs, ctx int
		chunk     int
		perSM     []int // attention_decode blocks per SM to measure (the first is the default)
		// minb are attention_decode minb values to measure at the default grid besides the default (16,
		// the perSM rows'; the kernel raises values under 4 to 4).
		minb   []int
		legacy bool // also measure attention_split
	}
	for _, s := range []shape{
		{"1×2048", 1, 2048, 0, []int{4}, []int{4, 8, 32, 64}, true},
		{"1×4096", 1, 4096, 0, []int{4}, []int{4, 8, 32, 64}, true},
		{"16×4096", 16, 4096, 0, []int{4}, []int{8, 32, 128, 256}, false},
		{"64×4096", 64, 4096, 0, []int{4, 2, 3, 5}, []int{8, 32, 256, 512}, true},
		{"1×131072 global layer", 1, 131072, 0, []int{4, 2, 3, 5}, []int{64, 256, 512, 1024}, true},
		{"1×131072 chunked layer (chunk 8192)", 1, 131072, 8192, []int{4}, []int{4, 8, 32, 64}, true},
	} {
		w := backend.Window{Chunk: s.chunk}
		// A fixed pool for the batch. A chunked layer's cache holds at most a chunk and a piece, and an
		// append takes its blocks before it gives back those the window has left (so that it can be
		// undone): one more piece at the peak.
		held := s.ctx
		if s.chunk > 0 {
			held = s.chunk + 2*piece
		}
		pool, err := b.NewBlockPool(kvHeads, D, block, s.seqs*(held/block+1))
		if err != nil {
			t.Fatal(err)
		}
		caches := make([]backend.KVCache, s.seqs)
		pos := make([]int, s.seqs)
		var bytes int64
		for i := range caches {
			if caches[i], err = b.NewKVCache(pool, s.ctx, w); err != nil {
				t.Fatal(err)
			}
			fill(caches[i], s.ctx)
			pos[i] = s.ctx - 1
			visible := s.ctx
			if s.chunk > 0 {
				visible = pos[i]%s.chunk + 1
			}
			bytes += int64(visible) * rowBytes
		}
		q, err := b.FromFloat32([]int{s.seqs, heads, D}, randVals(rand.New(rand.NewPCG(1, 2)), s.seqs*heads*D, 1))
		if err != nil {
			t.Fatal(err)
		}
		attend := func() error {
			_, err := cuda.AttendRows(b, q, caches, pos, w, scale)
			return err
		}
		measureAttn := func(label string) {
			t.Helper()
			const calls = 10
			entries, total, err := b.Profile(func() error {
				for range calls {
					if err := attend(); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			var kern time.Duration
			var kernels string
			for _, e := range entries {
				kernels += fmt.Sprintf(" %s %v", e.Op, (e.Device / calls).Round(100*time.Nanosecond))
				if strings.HasPrefix(e.Op, "attention") {
					kern += e.Device
				}
			}
			kern /= calls
			gbs := float64(bytes) / kern.Seconds() / 1e9
			t.Logf("Attn decode %s: %.1f MB of K/V, kernels %v (%.0f GB/s, %.0f%% of copy), %v a call with the upload;%s",
				label, float64(bytes)/1e6, kern, gbs, 100*gbs*1e9/copyRate, total/calls, kernels)
			row("Attn decode", label, fmt.Sprintf("%.0f GB/s (%.0f%% of copy)", gbs, 100*gbs*1e9/copyRate), kern.Round(100*time.Nanosecond).String())
		}
		for _, n := range s.perSM {
			old := cuda.SetSplitPerSM(b, n)
			label := fmt.Sprintf("%s h 40/8 D 128", s.name)
			if n != s.perSM[0] {
				label += fmt.Sprintf(", %d blocks/SM", n)
			}
			measureAttn(label)
			cuda.SetSplitPerSM(b, old)
		}
		for _, m := range s.minb {
			old := cuda.SetDecodeMinTiles(b, m)
			measureAttn(fmt.Sprintf("%s h 40/8 D 128, minb %d", s.name, m))
			cuda.SetDecodeMinTiles(b, old)
		}
		if s.legacy {
			old := cuda.SetDecode(b, false)
			measureAttn(fmt.Sprintf("%s h 40/8 D 128, attention_split (before)", s.name))
			cuda.SetDecode(b, old)
		}
		for _, c := range caches {
			c.Free()
		}
		if err := b.Synchronize(); err != nil {
			t.Fatal(err)
		}
	}
}
