package cuda_test

import (
	"fmt"
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

	// Decode attention at a 2048-token context: 40 query heads over 8 kv heads of 128.
	cache := newCache(t, b, 8, 128, 4096, backend.Window{}, 0)
	const ctx = 2049
	kv, err := b.FromFloat32([]int{ctx, 8, 128}, make([]float32, ctx*8*128))
	if err != nil {
		t.Fatal(err)
	}
	pos := make([]int, ctx)
	for i := range pos {
		pos[i] = i
	}
	if err := cache.Append(kv, kv, pos); err != nil {
		t.Fatal(err)
	}
	q, err := b.FromFloat32([]int{1, 40, 128}, make([]float32, 40*128))
	if err != nil {
		t.Fatal(err)
	}
	for _, perSM := range []int{1, 2, 4, 8} {
		old := cuda.SetSplitPerSM(b, perSM)
		measure("Attn decode", fmt.Sprintf("ctx %d h 40/8 D 128, %d blocks/SM", ctx, perSM), int64(ctx)*8*128*2*2, func() error {
			_, err := b.Attention(q, cache, []int{ctx - 1}, backend.Window{}, 0.088)
			return err
		})
		cuda.SetSplitPerSM(b, old)
	}
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
