package comm

import (
	"context"
	"fmt"
	"sync"
)

// NewLocalGroup returns the n ranks of a communicator whose ranks are goroutines of this process, rank
// r at index r; n = 1 gives Solo. Each Comm must be driven by its own goroutine. The ranks exchange
// data through shared memory: a collective starts once every rank has called it, each rank then reads
// the others' buffers, and no rank returns before all have finished reading. AllReduce adds the ranks'
// values in rank order 0, 1, ..., n-1 in float32 (each rank sums one chunk of the buffer, every rank
// copies the result), so every rank gets the same bits on every run.
//
// A rank whose ctx ends, or that is closed, while it waits for the others aborts the group: the other
// ranks' pending and later collectives fail with an error naming it. NewLocalGroup panics if n < 1.
func NewLocalGroup(n int) []Comm {
	if n < 1 {
		panic(fmt.Sprintf("comm: NewLocalGroup(%d): a group needs at least one rank", n))
	}
	if n == 1 {
		return []Comm{Solo()}
	}
	g := &localGroup{n: n, aborted: make(chan struct{}), closed: make([]bool, n)}
	comms := make([]Comm, n)
	for r := range comms {
		comms[r] = &localComm{g: g, rank: r}
	}
	return comms
}

// localGroup is the state the ranks of one local communicator share.
type localGroup struct {
	n int

	mu        sync.Mutex
	pending   *localOp      // the collective the ranks are arriving at; nil between collectives
	aborted   chan struct{} // closed when the group breaks
	abortRank int           // the rank whose failure broke the group; -1 when it was not one rank's
	abortMsg  string        // the text of that failure
	closed    []bool        // closed[r]: rank r's Comm is closed
}

// localOp is one collective: what each rank passed, and the rendezvous.
type localOp struct {
	posts   []localPost
	arrived int           // ranks that called; the op is committed when arrived == n
	ready   chan struct{} // closed when committed
	err     error         // the ranks' arguments disagree; set when committed
	sum     Buffer        // AllReduce's result; rank r writes chunk r
	reading sync.WaitGroup
}

// localPost is what one rank passed to a collective.
type localPost struct {
	op        string
	buf, recv Buffer // recv only for AllGather
	root      int
}

// localComm is one rank of a local group.
type localComm struct {
	g    *localGroup
	rank int
}

var _ Comm = (*localComm)(nil)

func (c *localComm) Rank() int { return c.rank }
func (c *localComm) Size() int { return c.g.n }

func (c *localComm) AllReduce(ctx context.Context, buf Buffer) error {
	op, err := c.join(ctx, localPost{op: OpAllReduce, buf: buf})
	if err != nil {
		return err
	}
	own := chunk(buf.Len(), c.g.n, c.rank)
	op.reduce(own)
	op.leave()
	copyAt(buf, 0, op.sum)
	return nil
}

func (c *localComm) AllGather(ctx context.Context, send, recv Buffer) error {
	op, err := c.join(ctx, localPost{op: OpAllGather, buf: send, recv: recv})
	if err != nil {
		return err
	}
	for r, p := range op.posts {
		copyAt(recv, r*send.Len(), p.buf)
	}
	op.leave()
	return nil
}

func (c *localComm) Broadcast(ctx context.Context, buf Buffer, root int) error {
	op, err := c.join(ctx, localPost{op: OpBroadcast, buf: buf, root: root})
	if err != nil {
		return err
	}
	if c.rank != root {
		copyAt(buf, 0, op.posts[root].buf)
	}
	op.leave()
	return nil
}

func (c *localComm) Barrier(ctx context.Context) error {
	op, err := c.join(ctx, localPost{op: OpBarrier})
	if err != nil {
		return err
	}
	op.leave()
	return nil
}

func (c *localComm) Close() error {
	g := c.g
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed[c.rank] {
		g.closed[c.rank] = true
		g.abortLocked(c.rank, &OpError{Rank: c.rank, Op: OpClose, Peer: -1, Err: ErrClosed})
	}
	return nil
}

// join posts p for this rank and waits until every rank has posted (the op is committed) or the group
// breaks or ctx ends. Once committed, a rank takes part whatever happens to ctx: the others are about to
// read its buffers, and all of them will finish without blocking.
func (c *localComm) join(ctx context.Context, p localPost) (*localOp, error) {
	g := c.g
	g.mu.Lock()
	if err := g.unusableLocked(c.rank, p.op); err != nil {
		g.mu.Unlock()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		oe := &OpError{Rank: c.rank, Op: p.op, Peer: -1, Err: err}
		g.abortLocked(c.rank, oe)
		g.mu.Unlock()
		return nil, oe
	}
	op := g.pending
	if op == nil {
		op = &localOp{posts: make([]localPost, g.n), ready: make(chan struct{})}
		g.pending = op
	}
	op.posts[c.rank] = p
	op.arrived++
	if op.arrived == g.n {
		g.pending = nil
		op.commit()
		if op.err != nil {
			g.abortLocked(-1, op.err)
		}
	}
	g.mu.Unlock()

	select {
	case <-op.ready:
	case <-g.aborted:
	case <-ctx.Done():
	}

	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case op.arrived == g.n:
		if op.err != nil {
			return nil, &OpError{Rank: c.rank, Op: p.op, Peer: -1, Err: op.err}
		}
		return op, nil
	case ctx.Err() != nil:
		oe := &OpError{Rank: c.rank, Op: p.op, Peer: op.missing(), Action: "wait for", Err: ctx.Err()}
		g.abortLocked(c.rank, oe)
		return nil, oe
	default:
		return nil, g.unusableLocked(c.rank, p.op)
	}
}

// unusableLocked returns the error of a collective op on rank's closed or broken Comm, or nil.
func (g *localGroup) unusableLocked(rank int, op string) error {
	if g.closed[rank] {
		return &OpError{Rank: rank, Op: op, Peer: -1, Err: ErrClosed}
	}
	select {
	case <-g.aborted:
	default:
		return nil
	}
	if g.abortRank < 0 || g.abortRank == rank {
		return &OpError{Rank: rank, Op: op, Peer: -1,
			Err: fmt.Errorf("%w by an earlier error: %s", ErrClosed, g.abortMsg)}
	}
	return &OpError{Rank: rank, Op: op, Peer: g.abortRank, Action: "wait for",
		Err: &peerFailure{g.abortMsg}}
}

// abortLocked breaks the group because of rank's error err (rank -1: no single rank's), once.
func (g *localGroup) abortLocked(rank int, err error) {
	select {
	case <-g.aborted:
		return
	default:
	}
	g.abortRank, g.abortMsg = rank, origin(err)
	close(g.aborted)
}

// commit checks that the ranks agree and prepares the result; the group's lock is held.
func (op *localOp) commit() {
	op.err = op.check()
	if op.err == nil && op.posts[0].op == OpAllReduce {
		switch op.posts[0].buf.(type) {
		case HostF32:
			op.sum = make(HostF32, op.posts[0].buf.Len())
		case HostBF16:
			op.sum = make(HostBF16, op.posts[0].buf.Len())
		}
	}
	op.reading.Add(len(op.posts))
	close(op.ready)
}

// check returns an error wrapping ErrMismatch (or errors.ErrUnsupported) when some rank's arguments
// do not fit the collective or differ from rank 0's.
func (op *localOp) check() error {
	n, p0 := len(op.posts), op.posts[0]
	for r, p := range op.posts {
		if p.op != p0.op {
			return fmt.Errorf("%w: rank %d called %s, rank 0 %s", ErrMismatch, r, p.op, p0.op)
		}
	}
	for r, p := range op.posts {
		var err error
		switch p.op {
		case OpBarrier:
		case OpAllGather:
			err = checkGather(p.buf, p.recv, n)
		case OpBroadcast:
			if err = checkBuffer(p.buf); err == nil {
				err = checkRoot(p.root, n)
			}
		default:
			err = checkBuffer(p.buf)
		}
		if err != nil {
			return fmt.Errorf("%w (rank %d)", err, r)
		}
	}
	for r, p := range op.posts {
		switch {
		case p.op == OpBarrier:
		case p.buf.DType() != p0.buf.DType() || p.buf.Len() != p0.buf.Len():
			return fmt.Errorf("%w: rank %d has %s, rank 0 %s", ErrMismatch, r, describe(p.buf), describe(p0.buf))
		case p.root != p0.root:
			return fmt.Errorf("%w: rank %d broadcasts from root %d, rank 0 from %d", ErrMismatch, r, p.root, p0.root)
		}
	}
	return nil
}

// missing is the lowest rank that has not called the pending collective.
func (op *localOp) missing() int {
	for r, p := range op.posts {
		if p.op == "" {
			return r
		}
	}
	return -1
}

// reduce writes the sum of all ranks' buffers over s into op.sum, adding in rank order in float32.
func (op *localOp) reduce(s span) {
	switch sum := op.sum.(type) {
	case HostF32:
		out := sum[s.lo:s.hi]
		copy(out, op.posts[0].buf.(HostF32)[s.lo:s.hi])
		for _, p := range op.posts[1:] {
			for i, x := range p.buf.(HostF32)[s.lo:s.hi] {
				out[i] += x
			}
		}
	case HostBF16:
		acc := make([]float32, s.len())
		for i, x := range op.posts[0].buf.(HostBF16)[s.lo:s.hi] {
			acc[i] = bf16ToF32(x)
		}
		for _, p := range op.posts[1:] {
			for i, x := range p.buf.(HostBF16)[s.lo:s.hi] {
				acc[i] += bf16ToF32(x)
			}
		}
		for i, a := range acc {
			sum[s.lo+i] = f32ToBF16(a)
		}
	}
}

// leave waits until every rank has finished reading the others' buffers (and writing its chunk of
// op.sum). It never blocks for long: all ranks of a committed op are past every wait.
func (op *localOp) leave() {
	op.reading.Done()
	op.reading.Wait()
}
