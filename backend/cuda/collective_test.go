package cuda_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/comm"
)

func testCollectives(t *testing.T, b *cuda.Backend) {
	ctx := context.Background()
	x, err := b.FromFloat32([]int{2, 2}, []float32{1, 2, 3, 4})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.AllReduce(ctx, comm.Solo(), x); err != nil {
		t.Errorf("AllReduce(Solo) error: %v", err)
	}
	g, err := b.AllGather(ctx, comm.Solo(), x)
	if err != nil {
		t.Fatalf("AllGather(Solo) error: %v", err)
	}
	if got, err := b.Float32(g); err != nil || !slices.Equal(got, []float32{1, 2, 3, 4}) {
		t.Errorf("AllGather(Solo) = %v, %v; want [1 2 3 4]", got, err)
	}
	flat, _ := b.FromFloat32([]int{4}, []float32{1, 2, 3, 4})
	if _, err := b.AllGather(ctx, comm.Solo(), flat); !errors.Is(err, backend.ErrShape) {
		t.Errorf("AllGather([4]) error = %v, want ErrShape", err)
	}
	if err := b.AllReduce(ctx, nil, x); err == nil {
		t.Errorf("AllReduce(nil comm) error = nil, want an error")
	}
	group := comm.NewLocalGroup(2)
	defer func() {
		for _, c := range group {
			c.Close()
		}
	}()
	if err := b.AllReduce(ctx, group[0], x); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("AllReduce(2 ranks) error = %v, want errors.ErrUnsupported", err)
	}
	if _, err := b.AllGather(ctx, group[0], x); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("AllGather(2 ranks) error = %v, want errors.ErrUnsupported", err)
	}
	_ = cuda.ErrUnavailable
}
