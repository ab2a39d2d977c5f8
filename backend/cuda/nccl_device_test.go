package cuda_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/nccl"
	"github.com/tpfleet/tpfleet/internal/gputest"
)

// TestNCCLDevice runs AllReduce (float32, bfloat16), AllGather, Broadcast and Barrier on device
// buffers across 2 GPUs in one process, through backend/cuda, and checks that host buffers are
// rejected. It skips with fewer than 2 GPUs.
func TestNCCLDevice(t *testing.T) {
	gputest.Require(t)
	n, err := cuda.DeviceCount()
	gputest.Check(t, "cuda.DeviceCount", err)
	if n < 2 {
		t.Skipf("needs 2 GPUs, %d present", n)
	}
	_, _, err = nccl.Library()
	gputest.Check(t, "nccl.Library", err)
	const size = 2
	ctx := context.Background()
	bs := make([]*cuda.Backend, size)
	ctxs := make([]uintptr, size)
	for r := range bs {
		if bs[r], err = cuda.New(cuda.Config{Device: r}); err != nil {
			t.Fatal(err)
		}
		defer bs[r].Close()
		ctxs[r] = bs[r].Context()
	}
	start := time.Now()
	comms, err := nccl.NewGroup(ctx, ctxs)
	if err != nil {
		t.Fatal(err)
	}
	initTime := time.Since(start)
	defer func() {
		for _, c := range comms {
			if err := c.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
	}()
	each := func(f func(r int) error) {
		t.Helper()
		errs := make([]error, size)
		var wg sync.WaitGroup
		for r := range size {
			wg.Go(func() { errs[r] = f(r) })
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
	// AllReduce, float32 (a Linear's output) and bf16 (an embedding), 1000 elements.
	const T, N = 4, 250
	each(func(r int) error {
		b := bs[r]
		v := make([]float32, T*N)
		for i := range v {
			v[i] = float32(r+1) * float32(i%13)
		}
		x, err := b.FromFloat32([]int{T, N}, v)
		if err != nil {
			return err
		}
		if err := b.AllReduce(ctx, comms[r], x); err != nil {
			return err
		}
		got, err := b.Float32(x)
		if err != nil {
			return err
		}
		for i, g := range got {
			if want := 3 * float32(i%13); g != want {
				return fmt.Errorf("rank %d: f32 all-reduce [%d] = %v, want %v", r, i, g, want)
			}
		}
		// bf16: ScaleRows stores bf16 above 64 rows (the prefill rule; skinny inputs stay f32); all-reduce
		// it and compare with twice the value.
		rows, err := b.Reshape(x, 100, 10)
		if err != nil {
			return err
		}
		ones := make([]float32, 100)
		for i := range ones {
			ones[i] = 1
		}
		y, err := b.ScaleRows(rows, ones)
		if err != nil {
			return err
		}
		if dt, _ := cuda.DTypeOf(y); dt != cuda.BF16 {
			return fmt.Errorf("scalerows output is %v, want bf16", dt)
		}
		before, err := b.Float32(y)
		if err != nil {
			return err
		}
		if err := b.AllReduce(ctx, comms[r], y); err != nil {
			return err
		}
		after, err := b.Float32(y)
		if err != nil {
			return err
		}
		for i := range after {
			if after[i] != 2*before[i] {
				return fmt.Errorf("rank %d: bf16 all-reduce [%d] = %v, want %v", r, i, after[i], 2*before[i])
			}
		}
		// AllGather [T, N] → [T, 2N] in rank order.
		v = make([]float32, T*N)
		for i := range v {
			v[i] = float32(1000*r + i)
		}
		z, err := b.FromFloat32([]int{T, N}, v)
		if err != nil {
			return err
		}
		g, err := b.AllGather(ctx, comms[r], z)
		if err != nil {
			return err
		}
		got, err = b.Float32(g)
		if err != nil {
			return err
		}
		for tt := range T {
			for k := range size {
				for j := range N {
					if w := float32(1000*k + tt*N + j); got[tt*size*N+k*N+j] != w {
						return fmt.Errorf("rank %d: all-gather [%d, %d] = %v, want %v", r, tt, k*N+j, got[tt*size*N+k*N+j], w)
					}
				}
			}
		}
		// Broadcast from rank 1.
		w, err := b.FromFloat32([]int{3}, []float32{float32(r), float32(r) + 0.5, 7})
		if err != nil {
			return err
		}
		buf, err := b.DeviceBuffer(w)
		if err != nil {
			return err
		}
		if err := comms[r].Broadcast(ctx, buf, 1); err != nil {
			return err
		}
		got, err = b.Float32(w)
		if err != nil {
			return err
		}
		if fmt.Sprint(got) != "[1 1.5 7]" {
			return fmt.Errorf("rank %d: broadcast = %v, want [1 1.5 7]", r, got)
		}
		return comms[r].Barrier(ctx)
	})
	// Decode-sized all-reduce latency: 5120 floats, 200 times, stream-ordered.
	var lat time.Duration
	each(func(r int) error {
		x, err := bs[r].FromFloat32([]int{1, 5120}, make([]float32, 5120))
		if err != nil {
			return err
		}
		if err := bs[r].Synchronize(); err != nil {
			return err
		}
		start := time.Now()
		for range 200 {
			if err := bs[r].AllReduce(ctx, comms[r], x); err != nil {
				return err
			}
		}
		if err := bs[r].Synchronize(); err != nil {
			return err
		}
		if r == 0 {
			lat = time.Since(start) / 200
		}
		return nil
	})
	t.Logf("init %v; all-reduce of 5120 f32: %v each", initTime, lat)
	row("nccl device", "2 GPUs: all-reduce f32/bf16, all-gather, broadcast, barrier", "ok",
		fmt.Sprintf("init %v, all-reduce 5120 f32 %v", initTime.Round(time.Millisecond), lat.Round(100*time.Nanosecond)))

	// A host buffer on an NCCL communicator: ErrUnsupported (it breaks the group, so it comes last).
	each(func(r int) error {
		if err := comms[r].AllReduce(ctx, comm.HostF32{1}); !errors.Is(err, errors.ErrUnsupported) {
			return fmt.Errorf("rank %d: AllReduce(HostF32) error = %v, want ErrUnsupported", r, err)
		}
		return nil
	})
}
