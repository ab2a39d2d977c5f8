package nccl

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"
)

// UniqueID is NCCL's 128-byte bootstrap id (ncclUniqueId). One rank makes it with NewUniqueID and every
// rank of the group passes the same id to NewNCCL (through the rendezvous: etcd, a file, a flag).
type UniqueID [128]byte

// DeviceBuffer is GPU memory for the NCCL communicator: Len elements of Type at device address Ptr, and
// the CUDA stream (a CUstream; 0 is the legacy default stream) the collective is enqueued on. Only the
// NCCL communicator accepts it; the CPU communicators reject it with an error wrapping
// errors.ErrUnsupported, and NCCL rejects host buffers the same way.
type DeviceBuffer struct {
	Ptr    uintptr
	N      int
	Type   DType
	Stream uintptr
	// Captured says Stream is capturing a CUDA graph: the collective becomes a node of the graph and
	// runs when the graph is launched, so the communicator records no completion event for it (an event
	// recorded during capture cannot be polled). Whoever launches the graph watches its completion.
	Captured bool
}

// DType returns the element type.
func (b DeviceBuffer) DType() DType { return b.Type }

// Len returns the number of elements.
func (b DeviceBuffer) Len() int { return b.N }

var _ Buffer = DeviceBuffer{}

// ncclComm is one rank of an NCCL communicator.
//
// Collectives on device buffers are stream-ordered: AllReduce, AllGather and Broadcast enqueue the
// operation on the buffer's stream and return without waiting for the GPU (the result is there for
// the work enqueued after it on that stream). Barrier waits for completion. Errors that NCCL finds
// asynchronously (a peer's failure, a network error) come from ncclCommGetAsyncError, checked after
// every call and by a watchdog; the watchdog also aborts the communicator (ncclCommAbort, which makes
// its kernels return) when the last enqueued collective has not completed within the op timeout, so a
// dead peer gives an error instead of a hang. After that the stream's results are garbage and every
// later call fails with an error wrapping ErrClosed.
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

var _ Comm = (*ncclComm)(nil)

// watchdogPeriod is how often the watchdog polls NCCL's async error and the last collective's event.
const watchdogPeriod = 50 * time.Millisecond

// NewNCCL joins rank of an NCCL communicator of size ranks (ncclCommInitRank), blocking until every rank
// has joined. The calling goroutine must be locked to its OS thread (runtime.LockOSThread) with the
// device's primary context current on it: with backend/cuda, call Backend.MakeCurrent on the locked
// thread first. The communicator remembers that context and makes it current around each of its calls,
// restoring the thread's own afterwards. NCCL_NVLS_ENABLE is set to 0 in the process when unset. ctx
// bounds nothing once ncclCommInitRank runs (NCCL has no cancellation there); it is checked first.
// JoinNCCL does the same on a locked thread of its own, and stops waiting when ctx ends.
func NewNCCL(ctx context.Context, id UniqueID, rank, size int) (Comm, error) {
	c, err := newNCCL(ctx, id, rank, size, DefaultOpTimeout)
	if err != nil {
		return nil, err // not a nil *ncclComm in a non-nil Comm
	}
	return c, nil
}

func newNCCL(ctx context.Context, id UniqueID, rank, size int, timeout time.Duration) (*ncclComm, error) {
	if size < 1 || rank < 0 || rank >= size {
		return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: fmt.Errorf("%w: rank %d of %d", ErrMismatch, rank, size)}
	}
	if err := load(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: err}
	}
	cur, err := currentContext()
	if err != nil {
		return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: err}
	}
	comm, err := initRank(id, rank, size)
	if err != nil {
		return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: err}
	}
	return newComm(device{comm: comm, ctx: cuCtx(cur)}, rank, size, timeout)
}

// NCCLConfig is one rank of an NCCL communicator that JoinNCCL joins: one process per GPU, the ranks
// meeting through the UniqueID that rank 0 made (NewUniqueID) and published (a rendezvous file, etcd).
type NCCLConfig struct {
	// ID is the group's bootstrap id, the same on every rank.
	ID UniqueID
	// Rank is this rank's index, 0 <= Rank < Size.
	Rank, Size int
	// MakeCurrent makes this rank's CUDA context current on the calling OS thread: with backend/cuda,
	// the device's Backend.MakeCurrent. Required.
	MakeCurrent func() error
	// OpTimeout is how long a collective may stay pending before the watchdog aborts the communicator
	// (a dead or stuck peer). Zero means DefaultOpTimeout.
	OpTimeout time.Duration
}

// JoinNCCL joins rank cfg.Rank of an NCCL communicator of cfg.Size ranks, each rank in its own process
// (or goroutine). It runs ncclCommInitRank on a goroutine of its own, locked to its OS thread, with
// the context cfg.MakeCurrent makes current there, so the caller needs no thread affinity.
// ncclCommInitRank returns once every rank has joined; it cannot be cancelled. JoinNCCL waits for it
// until ctx ends: then it returns an error wrapping ctx's error, and the initialisation goes on in the
// background until NCCL gives up or the peers come, when its communicator is closed at once. Join the
// ranks once they are all known to be alive (after a rendezvous), so that this is rare. Errors: an
// *OpError with op "connect" (ErrMismatch for a bad rank or size, NCCL's error for a failed
// initialisation), or an error wrapping ErrUnavailable when libnccl.so.2 or libcuda.so.1 cannot be
// loaded.
func JoinNCCL(ctx context.Context, cfg NCCLConfig) (Comm, error) {
	rank, size := cfg.Rank, cfg.Size
	fail := func(err error) (Comm, error) { return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: err} }
	switch {
	case size < 1 || rank < 0 || rank >= size:
		return fail(fmt.Errorf("%w: rank %d of %d", ErrMismatch, rank, size))
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
			r.err = &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: fmt.Errorf("make the CUDA context current: %w", r.err)}
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

// NewNCCLGroup makes an in-process NCCL group of len(contexts) ranks, rank r on the CUDA context
// contexts[r] (a CUcontext, such as backend/cuda's Backend.Context: one GPU per rank). One thread
// initialises them all between ncclGroupStart and ncclGroupEnd. Drive each communicator from its own
// goroutine, as the ranks of any group.
func NewNCCLGroup(ctx context.Context, contexts []uintptr) ([]Comm, error) {
	if len(contexts) == 0 {
		return nil, fmt.Errorf("nccl: new NCCL group of 0 ranks: %w", ErrMismatch)
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
		return nil, &OpError{Rank: 0, Op: opConnect, Peer: -1, Err: err}
	}
	comms := make([]Comm, len(raw))
	for r, c := range raw {
		if comms[r], err = newComm(device{comm: c, ctx: cuCtx(contexts[r])}, r, len(raw), DefaultOpTimeout); err != nil {
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

// Underlying returns the communicator c forwards its collectives to now: c itself, unless c has a method
// Current() Comm (a forwarder, such as a worker's communicator that is replaced at every plan epoch), in
// which case the one it currently forwards to. A CUDA graph that captured a collective is bound to the
// underlying communicator.
func Underlying(c Comm) Comm {
	for range 8 { // forwarders of forwarders, but never a cycle
		f, ok := c.(interface{ Current() Comm })
		if !ok {
			return c
		}
		n := f.Current()
		if n == nil {
			return c
		}
		c = n
	}
	return c
}

// AcceptsDeviceBuffers reports whether c is an NCCL communicator, the only kind that takes DeviceBuffer
// values. (The CPU communicators reject them, but only once their peers have joined the call.) A Comm
// of another package that forwards its collectives to an NCCL communicator (one that is replaced at
// every plan epoch, say) says so by having a method AcceptsDeviceBuffers() bool that returns true.
func AcceptsDeviceBuffers(c Comm) bool {
	switch c := c.(type) {
	case *ncclComm:
		return true
	case interface{ AcceptsDeviceBuffers() bool }:
		return c.AcceptsDeviceBuffers()
	}
	return false
}

// newComm wraps an initialised communicator and starts its watchdog; timeout 0 means DefaultOpTimeout.
func newComm(d device, rank, size int, timeout time.Duration) (*ncclComm, error) {
	if timeout <= 0 {
		timeout = DefaultOpTimeout
	}
	if err := d.setup(); err != nil {
		_ = d.release(true) // already failing
		return nil, &OpError{Rank: rank, Op: opConnect, Peer: -1, Err: err}
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
func checkDevice(b Buffer) (DeviceBuffer, error) {
	d, ok := b.(DeviceBuffer)
	if !ok {
		return d, fmt.Errorf("buffer type %T on an NCCL communicator: %w", b, errors.ErrUnsupported)
	}
	if d.Type.size() == 0 || d.N < 0 || (d.N > 0 && d.Ptr == 0) {
		return d, fmt.Errorf("%w: device buffer %s[%d] at %#x", ErrMismatch, d.Type, d.N, d.Ptr)
	}
	return d, nil
}

// run runs an enqueueing collective under the lock: it fails on a closed or broken communicator, breaks
// it on any error, and records the completion event on stream after the call.
func (c *ncclComm) run(ctx context.Context, op string, stream uintptr, captured bool, f func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usable(); err != nil {
		return &OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
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
		return &OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
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
		return ErrClosed
	case c.broken != nil:
		return fmt.Errorf("%w: broken by an earlier failure: %w", ErrClosed, c.broken)
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

// AllReduce sums buf (a DeviceBuffer) across the ranks in place, on its stream.
func (c *ncclComm) AllReduce(ctx context.Context, buf Buffer) error {
	b, err := checkDevice(buf)
	if err != nil {
		return c.fail(opAllReduce, err)
	}
	return c.run(ctx, opAllReduce, b.Stream, b.Captured, func() error { return c.d.allReduce(b) })
}

// AllGather concatenates every rank's send into recv in rank order, on send's stream.
func (c *ncclComm) AllGather(ctx context.Context, send, recv Buffer) error {
	s, err := checkDevice(send)
	if err != nil {
		return c.fail(opAllGather, err)
	}
	r, err := checkDevice(recv)
	if err != nil {
		return c.fail(opAllGather, err)
	}
	if s.Type != r.Type || r.N != c.size*s.N {
		return c.fail(opAllGather, fmt.Errorf("%w: send %s, recv %s, want recv %s[%d]", ErrMismatch, describe(s), describe(r), s.Type, c.size*s.N))
	}
	return c.run(ctx, opAllGather, s.Stream, s.Captured, func() error { return c.d.allGather(s, r) })
}

// Broadcast copies root's buf into buf on every other rank, on its stream.
func (c *ncclComm) Broadcast(ctx context.Context, buf Buffer, root int) error {
	b, err := checkDevice(buf)
	if err != nil {
		return c.fail(opBroadcast, err)
	}
	if err := checkRoot(root, c.size); err != nil {
		return c.fail(opBroadcast, err)
	}
	return c.run(ctx, opBroadcast, b.Stream, b.Captured, func() error { return c.d.broadcast(b, root) })
}

// Barrier all-reduces one float on the legacy default stream (so it also waits for the work of the
// context's blocking streams) and waits until it completes, ctx ends or the op timeout passes.
func (c *ncclComm) Barrier(ctx context.Context) error {
	c.mu.Lock()
	if err := c.usable(); err != nil {
		c.mu.Unlock()
		return &OpError{Rank: c.rank, Op: opBarrier, Peer: -1, Err: err}
	}
	b := c.d.barrierBuffer()
	c.mu.Unlock()
	if err := c.run(ctx, opBarrier, b.Stream, false, func() error { return c.d.allReduce(b) }); err != nil {
		return err
	}
	deadline := time.Now().Add(c.timeout)
	for wait := time.Microsecond; ; wait = min(2*wait, time.Millisecond) {
		c.mu.Lock()
		if err := c.usable(); err != nil {
			c.mu.Unlock()
			return &OpError{Rank: c.rank, Op: opBarrier, Peer: -1, Err: err}
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
			return &OpError{Rank: c.rank, Op: opBarrier, Peer: -1, Err: err}
		}
		if done {
			return nil
		}
		time.Sleep(wait)
	}
}

// fail breaks the communicator for an argument error (the peers would otherwise wait for this rank's
// part) and returns it as an OpError.
func (c *ncclComm) fail(op string, err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if uerr := c.usable(); uerr != nil {
		err = uerr
	} else {
		c.breakLocked(err)
	}
	return &OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
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
		return &OpError{Rank: c.rank, Op: opClose, Peer: -1, Err: err}
	}
	return nil
}
