package cpu

import (
	"context"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
)

// AllReduce sums t across the ranks of c in place, through a comm.HostF32 view of its storage. Views
// made by Reshape or Rows that share t's storage see the sum too. It blocks until c's collective
// completes or ctx ends; when ctx has ended, the error wraps ctx.Err() rather than c's error.
func (b *Backend) AllReduce(ctx context.Context, c comm.Comm, t backend.Tensor) error {
	tt, err := asTensor("allreduce", "t", t)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("cpu: allreduce t%v: nil comm", tt.shape)
	}
	if err := c.AllReduce(ctx, comm.HostF32(tt.data)); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fmt.Errorf("cpu: allreduce t%v: %w", tt.shape, err)
	}
	return nil
}

// AllGather concatenates each rank's t [T, n] along the last dimension in rank order → [T, n·size].
// Every rank must pass the same shape. It blocks like AllReduce.
func (b *Backend) AllGather(ctx context.Context, c comm.Comm, t backend.Tensor) (backend.Tensor, error) {
	tt, err := asTensor("allgather", "t", t)
	if err != nil {
		return nil, err
	}
	if len(tt.shape) != 2 {
		return nil, fmt.Errorf("cpu: allgather t%v: %w", tt.shape, backend.ErrShape)
	}
	if c == nil {
		return nil, fmt.Errorf("cpu: allgather t%v: nil comm", tt.shape)
	}
	T, n, size := tt.shape[0], tt.shape[1], c.Size()
	recv := make(comm.HostF32, size*T*n) // [size][T][n]
	if err := c.AllGather(ctx, comm.HostF32(tt.data), recv); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("cpu: allgather t%v: %w", tt.shape, err)
	}
	out := alloc(T, size*n)
	for r := range size {
		for t := range T {
			copy(out.data[t*size*n+r*n:t*size*n+(r+1)*n], recv[(r*T+t)*n:(r*T+t+1)*n])
		}
	}
	return out, nil
}
