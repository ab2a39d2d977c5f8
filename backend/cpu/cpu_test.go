package cpu

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/backendtest"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/safetensors"
)

var _ backendtest.RoutingReader = (*Backend)(nil)

func TestConformance(t *testing.T) {
	for _, threads := range []int{0, 1, 3} {
		t.Run(fmt.Sprintf("threads=%d", threads), func(t *testing.T) {
			backendtest.Run(t, New(Config{Threads: threads}), backendtest.Tolerance{RelL2: 1e-5})
		})
	}
}

func TestConfig(t *testing.T) {
	if got, want := New(Config{}).Threads(), runtime.GOMAXPROCS(0); got != want {
		t.Errorf("New(Config{}).Threads() = %d, want %d", got, want)
	}
	if got, want := New(Config{Threads: -3}).Threads(), runtime.GOMAXPROCS(0); got != want {
		t.Errorf("New(Config{Threads: -3}).Threads() = %d, want %d", got, want)
	}
	if got := New(Config{Threads: 5}).Threads(); got != 5 {
		t.Errorf("New(Config{Threads: 5}).Threads() = %d, want 5", got)
	}
	if err := (Config{Threads: -1}).Validate(); err == nil {
		t.Errorf("Config{Threads: -1}.Validate() = nil, want an error")
	}
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("Config{}.Validate() = %v, want nil", err)
	}
	cfg := Config{Threads: DefaultThreads}
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	cfg.AddFlags(fs)
	if err := fs.Parse([]string{"-cpu-threads=7"}); err != nil {
		t.Fatalf("Parse(-cpu-threads=7) error: %v", err)
	}
	if cfg.Threads != 7 {
		t.Errorf("after -cpu-threads=7: Threads = %d, want 7", cfg.Threads)
	}
}

func randTensor(t testing.TB, b *Backend, r *rand.Rand, shape ...int) backend.Tensor {
	t.Helper()
	n, _ := numel(shape)
	v := make([]float32, n)
	for i := range v {
		v[i] = 2*r.Float32() - 1
	}
	x, err := b.FromFloat32(shape, v)
	if err != nil {
		t.Fatalf("FromFloat32(%v) error: %v", shape, err)
	}
	return x
}

func data(t testing.TB, x backend.Tensor) []float32 {
	t.Helper()
	d, err := Data(x)
	if err != nil {
		t.Fatalf("Data error: %v", err)
	}
	return d
}

func sameBits(a, b []float32) bool {
	return slices.EqualFunc(a, b, func(x, y float32) bool { return math.Float32bits(x) == math.Float32bits(y) })
}

// TestLinearDeterministic checks that Linear gives the same bits for every thread count, and that a row's
// result does not depend on the other rows of x (decode and prefill agree).
func TestLinearDeterministic(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	one := New(Config{Threads: 1})
	for _, tc := range []struct{ T, in, out int }{{1, 512, 2048}, {64, 513, 300}, {17, 96, 50}, {5, 3, 7}} {
		x := randTensor(t, one, r, tc.T, tc.in)
		w := randTensor(t, one, r, tc.out, tc.in)
		want, err := one.Linear(x, w)
		if err != nil {
			t.Fatalf("Linear error: %v", err)
		}
		for _, threads := range []int{2, 3, 7, 64} {
			got, err := New(Config{Threads: threads}).Linear(x, w)
			if err != nil {
				t.Fatalf("Linear error: %v", err)
			}
			if !sameBits(data(t, got), data(t, want)) {
				t.Errorf("Linear([%d %d], [%d %d]) with %d threads differs from 1 thread", tc.T, tc.in, tc.out, tc.in, threads)
			}
		}
		for _, row := range []int{0, tc.T - 1} {
			xr, err := one.Rows(x, row, row+1)
			if err != nil {
				t.Fatalf("Rows error: %v", err)
			}
			got, err := New(Config{Threads: 2}).Linear(xr, w)
			if err != nil {
				t.Fatalf("Linear error: %v", err)
			}
			if !sameBits(data(t, got), data(t, want)[row*tc.out:(row+1)*tc.out]) {
				t.Errorf("Linear(row %d of [%d %d]) alone differs from the same row in the batch", row, tc.T, tc.in)
			}
		}
	}
}

// TestDeterministicOps checks that Attention, Experts and RMSNorm give the same bits for every thread
// count.
func TestDeterministicOps(t *testing.T) {
	run := func(b *Backend) [][]float32 {
		r := rand.New(rand.NewPCG(3, 4))
		var outs [][]float32
		x := randTensor(t, b, r, 37, 96)
		y, err := b.RMSNorm(x, nil, 1e-5)
		if err != nil {
			t.Fatalf("RMSNorm error: %v", err)
		}
		outs = append(outs, data(t, y))

		c, err := newCache(t, b, 2, 32, 64, backend.Window{Chunk: 8})
		if err != nil {
			t.Fatalf("NewKVCache error: %v", err)
		}
		pos := make([]int, 37)
		for i := range pos {
			pos[i] = i
		}
		if err := c.Append(randTensor(t, b, r, 37, 2, 32), randTensor(t, b, r, 37, 2, 32), pos); err != nil {
			t.Fatalf("Append error: %v", err)
		}
		a, err := b.Attention(randTensor(t, b, r, 37, 8, 32), c, pos, backend.Window{Chunk: 8}, 0.2)
		if err != nil {
			t.Fatalf("Attention error: %v", err)
		}
		outs = append(outs, data(t, a))

		rt, err := b.Route(randTensor(t, b, r, 37, 4), 2)
		if err != nil {
			t.Fatalf("Route error: %v", err)
		}
		e, err := b.Experts(x, rt, randTensor(t, b, r, 4, 96, 2*40), randTensor(t, b, r, 4, 40, 96), 0)
		if err != nil {
			t.Fatalf("Experts error: %v", err)
		}
		return append(outs, data(t, e))
	}
	want := run(New(Config{Threads: 1}))
	for _, threads := range []int{2, 5} {
		got := run(New(Config{Threads: threads}))
		for i, name := range []string{"RMSNorm", "Attention", "Experts"} {
			if !sameBits(got[i], want[i]) {
				t.Errorf("%s with %d threads differs from 1 thread", name, threads)
			}
		}
	}
}

// TestExpertsSplitExact checks that with k ≤ 2 the expert-parallel halves sum to exactly the full result,
// and that a token's output does not depend on the other tokens of the batch.
func TestExpertsSplitExact(t *testing.T) {
	b := New(Config{Threads: 2})
	r := rand.New(rand.NewPCG(5, 6))
	const T, E, H, I = 19, 6, 64, 24
	x := randTensor(t, b, r, T, H)
	gu := randTensor(t, b, r, E, H, 2*I)
	dn := randTensor(t, b, r, E, I, H)
	for _, k := range []int{1, 2} {
		logits := randTensor(t, b, r, T, E)
		rt, err := b.Route(logits, k)
		if err != nil {
			t.Fatalf("Route error: %v", err)
		}
		full, err := b.Experts(x, rt, gu, dn, 0)
		if err != nil {
			t.Fatalf("Experts error: %v", err)
		}
		sum := make([]float32, T*H)
		for _, rg := range [][2]int{{0, 2}, {2, 5}, {5, 6}} {
			g, _ := b.Rows(gu, rg[0], rg[1])
			d, _ := b.Rows(dn, rg[0], rg[1])
			part, err := b.Experts(x, rt, g, d, rg[0])
			if err != nil {
				t.Fatalf("Experts(first %d) error: %v", rg[0], err)
			}
			for i, v := range data(t, part) {
				sum[i] += v
			}
		}
		if !sameBits(sum, data(t, full)) {
			t.Errorf("k=%d: sum of expert-parallel parts differs from the full Experts", k)
		}
		// Token 7 alone.
		x7, _ := b.Rows(x, 7, 8)
		l7, _ := b.Rows(logits, 7, 8)
		rt7, err := b.Route(l7, k)
		if err != nil {
			t.Fatalf("Route error: %v", err)
		}
		one, err := b.Experts(x7, rt7, gu, dn, 0)
		if err != nil {
			t.Fatalf("Experts error: %v", err)
		}
		if !sameBits(data(t, one), data(t, full)[7*H:8*H]) {
			t.Errorf("k=%d: Experts of token 7 alone differs from token 7 in the batch", k)
		}
	}
}

// TestKVCacheKept checks the exact lazy-drop schedule of a chunked cache.
func TestKVCacheKept(t *testing.T) {
	b := New(Config{})
	r := rand.New(rand.NewPCG(7, 8))
	c, err := newCache(t, b, 1, 4, 100, backend.Window{Chunk: 4})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	next := 0
	for _, tc := range []struct{ T, kept int }{
		{10, 10}, // nothing dropped yet: queries 0..9 are attended after this Append
		{1, 3},   // before appending 10: drop below 8 (the chunk of 9) → 8, 9, 10
		{1, 4},   // 8..11
		{1, 5},   // before 12: the chunk of 11 starts at 8, nothing to drop → 8..12
		{3, 4},   // before 13..15: drop below 12 → 12..15
		{6, 10},  // before 16..21: drop below 12 → 12..21
		{1, 3},   // before 22: drop below 20 → 20, 21, 22
	} {
		pos := make([]int, tc.T)
		for i := range pos {
			pos[i] = next + i
		}
		if err := c.Append(randTensor(t, b, r, tc.T, 1, 4), randTensor(t, b, r, tc.T, 1, 4), pos); err != nil {
			t.Fatalf("Append(%v) error: %v", pos, err)
		}
		next += tc.T
		if c.Len() != next || c.Kept() != tc.kept {
			t.Errorf("after Append(%d..%d): Len, Kept = %d, %d, want %d, %d", pos[0], next-1, c.Len(), c.Kept(), next, tc.kept)
		}
	}
}

// TestAttentionAppendsExact checks that attention after several Appends gives the same bits as after one.
func TestAttentionAppendsExact(t *testing.T) {
	b := New(Config{Threads: 2})
	r := rand.New(rand.NewPCG(9, 10))
	const total, kvh, heads, D = 30, 2, 4, 16
	k := randTensor(t, b, r, total, kvh, D)
	v := randTensor(t, b, r, total, kvh, D)
	q := randTensor(t, b, r, total, heads, D)
	for _, w := range []backend.Window{{}, {Chunk: 8}} {
		all := make([]int, total)
		for i := range all {
			all[i] = i
		}
		one, _ := newCache(t, b, kvh, D, total, w)
		if err := one.Append(k, v, all); err != nil {
			t.Fatalf("Append error: %v", err)
		}
		want, err := b.Attention(q, one, all, w, 0.25)
		if err != nil {
			t.Fatalf("Attention error: %v", err)
		}
		many, _ := newCache(t, b, kvh, D, total, w)
		var got []float32
		for from := 0; from < total; {
			to := min(total, from+1+from%7)
			kk, _ := b.Rows(k, from, to)
			vv, _ := b.Rows(v, from, to)
			qq, _ := b.Rows(q, from, to)
			if err := many.Append(kk, vv, all[from:to]); err != nil {
				t.Fatalf("Append(%d..%d) error: %v", from, to-1, err)
			}
			y, err := b.Attention(qq, many, all[from:to], w, 0.25)
			if err != nil {
				t.Fatalf("Attention(%d..%d) error: %v", from, to-1, err)
			}
			got = append(got, data(t, y)...)
			from = to
		}
		if !sameBits(got, data(t, want)) {
			t.Errorf("chunk %d: attention over several Appends differs from one Append", w.Chunk)
		}
	}
}

func TestAttentionDroppedError(t *testing.T) {
	b := New(Config{})
	r := rand.New(rand.NewPCG(11, 12))
	c, _ := newCache(t, b, 1, 4, 100, backend.Window{Chunk: 4})
	for p := range 10 {
		if err := c.Append(randTensor(t, b, r, 1, 1, 4), randTensor(t, b, r, 1, 1, 4), []int{p}); err != nil {
			t.Fatalf("Append(%d) error: %v", p, err)
		}
	}
	q := randTensor(t, b, r, 1, 1, 4)
	if _, err := b.Attention(q, c, []int{9}, backend.Window{Chunk: 4}, 1); err != nil {
		t.Errorf("Attention(pos 9, chunk 4) error: %v", err)
	}
	for _, tc := range []struct {
		pos   int
		chunk int
	}{{9, 0}, {9, 16}, {7, 4}, {10, 4}} {
		_, err := b.Attention(q, c, []int{tc.pos}, backend.Window{Chunk: tc.chunk}, 1)
		if !errors.Is(err, backend.ErrShape) {
			t.Errorf("Attention(pos %d, chunk %d) over a cache holding 8..9 error = %v, want ErrShape", tc.pos, tc.chunk, err)
		}
	}
}

func TestForeignErrors(t *testing.T) {
	b := New(Config{})
	if _, err := Data(nil); !errors.Is(err, backend.ErrShape) {
		t.Errorf("Data(nil) error = %v, want ErrShape", err)
	}
	var nilTensor *tensor
	if _, err := Data(nilTensor); !errors.Is(err, ErrForeign) {
		t.Errorf("Data((*tensor)(nil)) error = %v, want ErrForeign", err)
	}
	if _, _, err := b.ReadRouting(nil); !errors.Is(err, ErrForeign) {
		t.Errorf("ReadRouting(nil) error = %v, want ErrForeign", err)
	}
}

func TestLoadAllDTypes(t *testing.T) {
	b := New(Config{})
	// F8_E4M3: 0x38 = 1, 0xC0 = -2.
	x, err := b.Load(safetensors.F8_E4M3, []int{2}, []byte{0x38, 0xC0})
	if err != nil {
		t.Fatalf("Load(F8_E4M3) error: %v", err)
	}
	if got := data(t, x); !slices.Equal(got, []float32{1, -2}) {
		t.Errorf("Load(F8_E4M3, [0x38 0xC0]) = %v, want [1 -2]", got)
	}
}

// TestCollectives runs AllReduce and AllGather over in-process groups of 2 to 4 ranks.
func TestCollectives(t *testing.T) {
	b := New(Config{})
	for n := 2; n <= 4; n++ {
		t.Run(fmt.Sprintf("ranks=%d", n), func(t *testing.T) {
			comms := comm.NewLocalGroup(n)
			t.Cleanup(func() {
				for _, c := range comms {
					c.Close()
				}
			})
			const T, cols = 3, 5
			inputs := make([][]float32, n)
			for r := range inputs {
				inputs[r] = make([]float32, T*cols)
				for i := range inputs[r] {
					inputs[r][i] = float32(100*r + i)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			reduced := make([][]float32, n)
			gathered := make([][]float32, n)
			gatheredShape := make([][]int, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for r := range n {
				wg.Go(func() {
					errs[r] = func() error {
						x, err := b.FromFloat32([]int{T, cols}, inputs[r])
						if err != nil {
							return err
						}
						g, err := b.AllGather(ctx, comms[r], x)
						if err != nil {
							return err
						}
						gathered[r], gatheredShape[r] = data(t, g), g.Shape()
						if err := b.AllReduce(ctx, comms[r], x); err != nil {
							return err
						}
						reduced[r] = data(t, x)
						return nil
					}()
				})
			}
			wg.Wait()
			for r, err := range errs {
				if err != nil {
					t.Fatalf("rank %d: %v", r, err)
				}
			}
			wantSum := make([]float32, T*cols)
			for _, in := range inputs {
				for i, v := range in {
					wantSum[i] += v
				}
			}
			wantGather := make([]float32, 0, n*T*cols)
			for row := range T {
				for _, in := range inputs {
					wantGather = append(wantGather, in[row*cols:(row+1)*cols]...)
				}
			}
			for r := range n {
				if !slices.Equal(reduced[r], wantSum) {
					t.Errorf("rank %d: AllReduce = %v, want %v", r, reduced[r], wantSum)
				}
				if !slices.Equal(gatheredShape[r], []int{T, n * cols}) || !slices.Equal(gathered[r], wantGather) {
					t.Errorf("rank %d: AllGather = %v %v, want %v %v", r, gatheredShape[r], gathered[r], []int{T, n * cols}, wantGather)
				}
			}
		})
	}
}

func TestCollectivesSolo(t *testing.T) {
	b := New(Config{})
	x, _ := b.FromFloat32([]int{2, 2}, []float32{1, 2, 3, 4})
	ctx := context.Background()
	if err := b.AllReduce(ctx, comm.Solo(), x); err != nil {
		t.Fatalf("AllReduce(Solo) error: %v", err)
	}
	g, err := b.AllGather(ctx, comm.Solo(), x)
	if err != nil {
		t.Fatalf("AllGather(Solo) error: %v", err)
	}
	if got := data(t, g); !slices.Equal(got, []float32{1, 2, 3, 4}) {
		t.Errorf("AllGather(Solo) = %v, want [1 2 3 4]", got)
	}
	flat, _ := b.FromFloat32([]int{4}, []float32{1, 2, 3, 4})
	if _, err := b.AllGather(ctx, comm.Solo(), flat); !errors.Is(err, backend.ErrShape) {
		t.Errorf("AllGather([4]) error = %v, want ErrShape", err)
	}
	if err := b.AllReduce(ctx, nil, x); err == nil {
		t.Errorf("AllReduce(nil comm) error = nil, want an error")
	}
}

// BenchmarkLinear reports the throughput of Linear for a decode step and a small prefill.
func BenchmarkLinear(bm *testing.B) {
	for _, tc := range []struct{ T, in, out int }{{1, 512, 2048}, {64, 512, 2048}} {
		bm.Run(fmt.Sprintf("[%d,%d]x[%d,%d]", tc.T, tc.in, tc.out, tc.in), func(bm *testing.B) {
			b := New(Config{})
			r := rand.New(rand.NewPCG(1, 1))
			x := randTensor(bm, b, r, tc.T, tc.in)
			w := randTensor(bm, b, r, tc.out, tc.in)
			for bm.Loop() {
				if _, err := b.Linear(x, w); err != nil {
					bm.Fatal(err)
				}
			}
			flops := 2 * float64(tc.T) * float64(tc.in) * float64(tc.out) * float64(bm.N)
			bm.ReportMetric(flops/bm.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}

// TestNoGoroutineLeak checks that the parallel ops leave no goroutine behind.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	b := New(Config{Threads: 8})
	r := rand.New(rand.NewPCG(13, 14))
	x := randTensor(t, b, r, 33, 256)
	w := randTensor(t, b, r, 512, 256)
	for range 10 {
		if _, err := b.Linear(x, w); err != nil {
			t.Fatalf("Linear error: %v", err)
		}
	}
	// Workers call Done just before they return; give the scheduler a moment to retire them.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("goroutines after 10 Linear calls with 8 threads = %d, want <= %d", n, before)
	}
}

// newCache makes a cache in a growing pool of blocks of 4 positions.
func newCache(t *testing.T, b *Backend, kvHeads, headDim, capacity int, w backend.Window) (backend.KVCache, error) {
	t.Helper()
	pool, err := b.NewBlockPool(kvHeads, headDim, 4, 0)
	if err != nil {
		t.Fatalf("NewBlockPool error: %v", err)
	}
	return b.NewKVCache(pool, capacity, w)
}
