package nccl

import (
	"context"
	"errors"
	"fmt"
	"github.com/tpfleet/tpfleet/comm"
	"runtime"
	"sync"
	"time"
)

// UniqueID is NCCL's 128-byte bootstrap id (ncclUniqueId). One rank makes it with NewUniqueID and every
// rank of the group passes the same id to New (through the rendezvous: etcd, a file, a flag).
type UniqueID [128]byte

// ncclComm is one rank of an NCCL communicator.
//
// Collectives on device buffers are stream-ordered: AllReduce, AllGather and Broadcast enqueue the
// operation on the buffer's stream and return without waiting for the GPU (the result is there for
// the work enqueued after it on that stream). Barrier waits for completion. Errors that NCCL finds
// asynchronously (a peer's failure, a network error) come from ncclCommGetAsyncError, checked after
// every call and by a watchdog; the watchdog also aborts the communicator (ncclCommAbort, which makes
// its kernels return) when the last enqueued collective has not completed within the op timeout, so a
// dead peer gives an error instead of a hang. After that the stream's results are garbage and every
// later call fails with an error wrapping comm.ErrClosed.
type ncclComm struct {
	rank, size int
	timeout    time.Duration

	mu         sync.Mutex
	d          device
	closed     bool
	broken     error
	recorded   bool // an event was recorded after the last collective and has not been seen complete
	lastRecord time.Time
	captured   bool // a collective was captured into a CUDA graph (see Close)
	stop       chan struct{}
}

var _ comm.Comm = (*ncclComm)(nil)

// watchdogPeriod is how often the watchdog polls NCCL's async error and the last collective's event.
const watchdogPeriod = 50 * time.Millisecond

// New joins rank of an NCCL communicator of size ranks (ncclCommInitRank), blocking until every rank
// has joined. The calling goroutine must be locked to its OS thread (runtime.LockOSThread) with the
// device's primary context current on it: with the cuda backend, call its MakeCurrent (backend.DeviceContext) on the locked
// thread first. The communicator remembers that context and makes it current around each of its calls,
// restoring the thread's own afterwards. NCCL_NVLS_ENABLE is set to 0 in the process when unset. ctx
// bounds nothing once ncclCommInitRank runs (NCCL has no cancellation there); it is checked first.
// Join does the same on a locked thread of its own, and stops waiting when ctx ends.
func New(ctx context.Context, id UniqueID, rank, size int) (comm.Comm, error) {
	c, err := newNCCL(ctx, id, rank, size, comm.DefaultOpTimeout)
	if err != nil {
		return nil, err // not a nil *ncclComm in a non-nil comm.Comm
	}
	return c, nil
}

func newNCCL(ctx context.Context, id UniqueID, rank, size int, timeout time.Duration) (*ncclComm, error) {
	if size < 1 || rank < 0 || rank >= size {
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: fmt.Errorf("%w: rank %d of %d", comm.ErrMismatch, rank, size)}
	}
	if err := load(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	cur, err := currentContext()
	if err != nil {
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	raw, err := initRank(id, rank, size)
	if err != nil {
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	return newComm(device{comm: raw, ctx: cuCtx(cur)}, rank, size, timeout)
}

// Config is one rank of an NCCL communicator that Join joins: one process per GPU, the ranks
// meeting through the UniqueID that rank 0 made (NewUniqueID) and published (a rendezvous file, etcd).
type Config struct {
	// ID is the group's bootstrap id, the same on every rank.
	ID UniqueID
	// Rank is this rank's index, 0 <= Rank < Size.
	Rank, Size int
	// MakeCurrent makes this rank's CUDA context current on the calling OS thread: with the cuda backend,
	// the device's Backend.MakeCurrent. Required.
	MakeCurrent func() error
	// OpTimeout is how long a collective may stay pending before the watchdog aborts the communicator
	// (a dead or stuck peer). Zero means comm.DefaultOpTimeout.
	OpTimeout time.Duration
}

// Join joins rank cfg.Rank of an NCCL communicator of cfg.Size ranks, each rank in its own process
// (or goroutine). It runs ncclCommInitRank on a goroutine of its own, locked to its OS thread, with
// the context cfg.MakeCurrent makes current there, so the caller needs no thread affinity.
// ncclCommInitRank returns once every rank has joined; it cannot be cancelled. Join waits for it
// until ctx ends: then it returns an error wrapping ctx's error, and the initialisation goes on in the
// background until NCCL gives up or the peers come, when its communicator is closed at once. Join the
// ranks once they are all known to be alive (after a rendezvous), so that this is rare. Errors: an
// *comm.OpError with op "connect" (comm.ErrMismatch for a bad rank or size, NCCL's error for a failed
// initialisation), or an error wrapping ErrUnavailable when libnccl.so.2 or libcuda.so.1 cannot be
// loaded.
func Join(ctx context.Context, cfg Config) (comm.Comm, error) {
	rank, size := cfg.Rank, cfg.Size
	fail := func(err error) (comm.Comm, error) {
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	switch {
	case size < 1 || rank < 0 || rank >= size:
		return fail(fmt.Errorf("%w: rank %d of %d", comm.ErrMismatch, rank, size))
	case cfg.MakeCurrent == nil:
		return fail(errors.New("nccl: join: no MakeCurrent to make the rank's CUDA context current"))
	case cfg.OpTimeout < 0:
		return fail(fmt.Errorf("nccl: join: negative op timeout %v", cfg.OpTimeout))
	}
	if err := load(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	type result struct {
		c   *ncclComm
		err error
	}
	// Unbuffered: the result goes either to the caller or, once the caller has given up (abandoned),
	// to Close, never to both or neither.
	done := make(chan result)
	abandoned := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var r result
		if r.err = cfg.MakeCurrent(); r.err != nil {
			r.err = &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: fmt.Errorf("make the CUDA context current: %w", r.err)}
		} else {
			r.c, r.err = newNCCL(context.Background(), cfg.ID, rank, size, cfg.OpTimeout)
		}
		select {
		case done <- r:
		case <-abandoned:
			if r.c != nil {
				_ = r.c.Close() // nobody waits for it any more
			}
		}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return nil, r.err
		}
		return r.c, nil
	case <-ctx.Done():
		close(abandoned)
		// The result may be ready at the same time: whichever side takes it closes it.
		select {
		case r := <-done:
			if r.c != nil {
				_ = r.c.Close()
			}
		default:
		}
		return fail(fmt.Errorf("waiting for ncclCommInitRank (the peers did not all join): %w", ctx.Err()))
	}
}

// NewGroup makes an in-process NCCL group of len(contexts) ranks, rank r on the CUDA context
// contexts[r] (a CUcontext, such as the cuda backend's Context (backend.DeviceContext): one GPU per rank). One thread
// initialises them all between ncclGroupStart and ncclGroupEnd. Drive each communicator from its own
// goroutine, as the ranks of any group.
func NewGroup(ctx context.Context, contexts []uintptr) ([]comm.Comm, error) {
	if len(contexts) == 0 {
		return nil, fmt.Errorf("nccl: new NCCL group of 0 ranks: %w", comm.ErrMismatch)
	}
	if err := load(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	id, err := NewUniqueID()
	if err != nil {
		return nil, err
	}
	raw, err := initGroup(id, contexts)
	if err != nil {
		for r, c := range raw {
			if c != nil {
				d := device{comm: c, ctx: cuCtx(contexts[r])}
				_ = d.release(true) // already failing
			}
		}
		return nil, &comm.OpError{Rank: 0, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	comms := make([]comm.Comm, len(raw))
	for r, c := range raw {
		if comms[r], err = newComm(device{comm: c, ctx: cuCtx(contexts[r])}, r, len(raw), comm.DefaultOpTimeout); err != nil {
			for _, c := range comms[:r] {
				_ = c.Close() // already failing
			}
			for i := r + 1; i < len(raw); i++ {
				d := device{comm: raw[i], ctx: cuCtx(contexts[i])}
				_ = d.release(true)
			}
			return nil, err
		}
	}
	return comms, nil
}

// newComm wraps an initialised communicator and starts its watchdog; timeout 0 means comm.DefaultOpTimeout.
func newComm(d device, rank, size int, timeout time.Duration) (*ncclComm, error) {
	if timeout <= 0 {
		timeout = comm.DefaultOpTimeout
	}
	if err := d.setup(); err != nil {
		_ = d.release(true) // already failing
		return nil, &comm.OpError{Rank: rank, Op: comm.OpConnect, Peer: -1, Err: err}
	}
	c := &ncclComm{rank: rank, size: size, timeout: timeout, d: d, stop: make(chan struct{})}
	go c.watchdog()
	return c, nil
}

// Rank returns this rank's index.
func (c *ncclComm) Rank() int { return c.rank }

// Size returns the number of ranks.
func (c *ncclComm) Size() int { return c.size }

// checkDevice accepts device buffers of a known dtype with an address.
func checkDevice(b comm.Buffer) (comm.DeviceBuffer, error) {
	d, ok := b.(comm.DeviceBuffer)
	if !ok {
		return d, fmt.Errorf("buffer type %T on an NCCL communicator: %w", b, errors.ErrUnsupported)
	}
	if d.Type.Size() == 0 || d.N < 0 || (d.N > 0 && d.Ptr == 0) {
		return d, fmt.Errorf("%w: device buffer %s[%d] at %#x", comm.ErrMismatch, d.Type, d.N, d.Ptr)
	}
	return d, nil
}

// run runs an enqueueing collective under the lock: it fails on a closed or broken communicator, breaks
// it on any error, and records the completion event on stream after the call.
func (c *ncclComm) run(ctx context.Context, op string, stream uintptr, captured bool, f func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usable(); err != nil {
		return &comm.OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
	}
	err := ctx.Err()
	if err == nil {
		err = f()
	}
	if err == nil && !captured {
		err = c.d.record(stream)
	}
	if err == nil {
		err = c.d.asyncError()
	}
	if err != nil {
		c.breakLocked(err)
		return &comm.OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
	}
	if captured {
		c.captured = true
	} else {
		c.recorded, c.lastRecord = true, time.Now()
	}
	return nil
}

// usable returns nil, or why the communicator can no longer be used. c.mu is held.
func (c *ncclComm) usable() error {
	switch {
	case c.closed:
		return comm.ErrClosed
	case c.broken != nil:
		return fmt.Errorf("%w: broken by an earlier failure: %w", comm.ErrClosed, c.broken)
	}
	return nil
}

// breakLocked marks the communicator broken and aborts it, so its pending kernels return. c.mu is held.
func (c *ncclComm) breakLocked(err error) {
	if c.broken != nil || c.closed {
		return
	}
	c.broken = err
	_ = c.d.release(true) // the communicator is already failing with err
}

func (c *ncclComm) watchdog() {
	t := time.NewTicker(watchdogPeriod)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.mu.Lock()
		if c.closed || c.broken != nil {
			c.mu.Unlock()
			return
		}
		c.checkLocked()
		c.mu.Unlock()
	}
}

// checkLocked polls the async error and the last collective's completion, breaking the communicator on
// an error or a collective pending past the timeout. c.mu is held.
func (c *ncclComm) checkLocked() {
	if err := c.d.asyncError(); err != nil {
		c.breakLocked(err)
		return
	}
	if !c.recorded {
		return
	}
	done, err := c.d.done()
	switch {
	case err != nil:
		c.breakLocked(err)
	case done:
		c.recorded = false
	case time.Since(c.lastRecord) > c.timeout:
		c.breakLocked(fmt.Errorf("collective not complete after %v (a peer is dead or stuck): %w", c.timeout, context.DeadlineExceeded))
	}
}

// AllReduce sums buf (a comm.DeviceBuffer) across the ranks in place, on its stream.
func (c *ncclComm) AllReduce(ctx context.Context, buf comm.Buffer) error {
	b, err := checkDevice(buf)
	if err != nil {
		return c.fail(comm.OpAllReduce, err)
	}
	return c.run(ctx, comm.OpAllReduce, b.Stream, b.Captured, func() error { return c.d.allReduce(b) })
}

// AllGather concatenates every rank's send into recv in rank order, on send's stream.
func (c *ncclComm) AllGather(ctx context.Context, send, recv comm.Buffer) error {
	s, err := checkDevice(send)
	if err != nil {
		return c.fail(comm.OpAllGather, err)
	}
	r, err := checkDevice(recv)
	if err != nil {
		return c.fail(comm.OpAllGather, err)
	}
	if s.Type != r.Type || r.N != c.size*s.N {
		return c.fail(comm.OpAllGather, fmt.Errorf("%w: send %s, recv %s, want recv %s[%d]", comm.ErrMismatch, describe(s), describe(r), s.Type, c.size*s.N))
	}
	return c.run(ctx, comm.OpAllGather, s.Stream, s.Captured, func() error { return c.d.allGather(s, r) })
}

// Broadcast copies root's buf into buf on every other rank, on its stream.
func (c *ncclComm) Broadcast(ctx context.Context, buf comm.Buffer, root int) error {
	b, err := checkDevice(buf)
	if err != nil {
		return c.fail(comm.OpBroadcast, err)
	}
	if err := checkRoot(root, c.size); err != nil {
		return c.fail(comm.OpBroadcast, err)
	}
	return c.run(ctx, comm.OpBroadcast, b.Stream, b.Captured, func() error { return c.d.broadcast(b, root) })
}

// Barrier all-reduces one float on the legacy default stream (so it also waits for the work of the
// context's blocking streams) and waits until it completes, ctx ends or the op timeout passes.
func (c *ncclComm) Barrier(ctx context.Context) error {
	c.mu.Lock()
	if err := c.usable(); err != nil {
		c.mu.Unlock()
		return &comm.OpError{Rank: c.rank, Op: comm.OpBarrier, Peer: -1, Err: err}
	}
	b := c.d.barrierBuffer()
	c.mu.Unlock()
	if err := c.run(ctx, comm.OpBarrier, b.Stream, false, func() error { return c.d.allReduce(b) }); err != nil {
		return err
	}
	deadline := time.Now().Add(c.timeout)
	for wait := time.Microsecond; ; wait = min(2*wait, time.Millisecond) {
		c.mu.Lock()
		if err := c.usable(); err != nil {
			c.mu.Unlock()
			return &comm.OpError{Rank: c.rank, Op: comm.OpBarrier, Peer: -1, Err: err}
		}
		c.checkLocked()
		done := !c.recorded && c.broken == nil
		var err error
		switch {
		case done:
		case ctx.Err() != nil:
			err = ctx.Err()
		case time.Now().After(deadline):
			err = fmt.Errorf("barrier not complete after %v: %w", c.timeout, context.DeadlineExceeded)
		}
		if err != nil {
			c.breakLocked(err)
		}
		if err == nil && c.broken != nil {
			err = c.broken
		}
		c.mu.Unlock()
		if err != nil {
			return &comm.OpError{Rank: c.rank, Op: comm.OpBarrier, Peer: -1, Err: err}
		}
		if done {
			return nil
		}
		time.Sleep(wait)
	}
}

// fail breaks the communicator for an argument error (the peers would otherwise wait for this rank's
// part) and returns it as an comm.OpError.
func (c *ncclComm) fail(op string, err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if uerr := c.usable(); uerr != nil {
		err = uerr
	} else {
		c.breakLocked(err)
	}
	return &comm.OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
}

// Close destroys the communicator (ncclCommDestroy), or aborts it when it is broken. It is idempotent.
func (c *ncclComm) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	close(c.stop)
	if c.broken != nil {
		return nil // aborted and released when it broke
	}
	if c.captured {
		// NCCL holds a reference for every CUDA graph that captured one of this communicator's
		// collectives, and ncclCommDestroy (ncclCommAbort too) waits until those graphs are destroyed,
		// which their owner (the GPU backend) does on its own schedule. So destroy in the background:
		// the goroutine ends once the graphs are gone.
		d := c.d
		go func() { _ = d.release(false) }()
		return nil
	}
	if err := c.d.release(false); err != nil {
		return &comm.OpError{Rank: c.rank, Op: comm.OpClose, Peer: -1, Err: err}
	}
	return nil
}

// checkRoot checks a broadcast root for a group of n ranks.
func checkRoot(root, n int) error {
	if root < 0 || root >= n {
		return fmt.Errorf("%w: root %d outside 0..%d", comm.ErrMismatch, root, n-1)
	}
	return nil
}

// describe formats a buffer as "float32[1024]".
func describe(b comm.Buffer) string { return fmt.Sprintf("%s[%d]", b.DType(), b.Len()) }

// AcceptsDeviceBuffers reports true: an NCCL communicator takes comm.DeviceBuffer values (see
// comm.AcceptsDeviceBuffers).
func (c *ncclComm) AcceptsDeviceBuffers() bool { return true }
