package comm

import (
	"context"
	"fmt"
	"sync"
)

// Solo returns the communicator of a group of one rank (TP=1). AllReduce, Broadcast and Barrier leave
// their buffers as they are and AllGather copies send into recv; they still check their arguments and
// ctx, and Solo breaks and closes like any other Comm.
func Solo() Comm { return &solo{} }

type solo struct {
	mu     sync.Mutex
	closed bool
	broken error
}

var _ Comm = (*solo)(nil)

func (*solo) Rank() int { return 0 }
func (*solo) Size() int { return 1 }

func (s *solo) AllReduce(ctx context.Context, buf Buffer) error {
	return s.run(ctx, OpAllReduce, func() error { return checkBuffer(buf) })
}

func (s *solo) AllGather(ctx context.Context, send, recv Buffer) error {
	return s.run(ctx, OpAllGather, func() error {
		if err := checkGather(send, recv, 1); err != nil {
			return err
		}
		copyAt(recv, 0, send)
		return nil
	})
}

func (s *solo) Broadcast(ctx context.Context, buf Buffer, root int) error {
	return s.run(ctx, OpBroadcast, func() error {
		if err := checkBuffer(buf); err != nil {
			return err
		}
		return checkRoot(root, 1)
	})
}

func (s *solo) Barrier(ctx context.Context) error {
	return s.run(ctx, OpBarrier, func() error { return nil })
}

func (s *solo) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

// run checks that s is usable and ctx live, then runs f; an error breaks s.
func (s *solo) run(ctx context.Context, op string, f func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var err error
	switch {
	case s.closed:
		err = ErrClosed
	case s.broken != nil:
		err = fmt.Errorf("%w by an earlier error: %v", ErrClosed, s.broken)
	case ctx.Err() != nil:
		err = ctx.Err()
	default:
		err = f()
	}
	if err == nil {
		return nil
	}
	oe := &OpError{Rank: 0, Op: op, Peer: -1, Err: err}
	if s.broken == nil && !s.closed {
		s.broken = oe
	}
	return oe
}
