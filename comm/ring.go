package comm

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"time"
)

// Defaults of RingConfig.
const (
	// DefaultOpTimeout bounds a ring collective whose context has no deadline.
	DefaultOpTimeout = 30 * time.Second
	// DefaultDialTimeout bounds Connect.
	DefaultDialTimeout = 30 * time.Second
)

// abortGrace is how long a failing rank waits for its last frame, and then an abort frame, to reach
// the next rank before it closes the connection.
const abortGrace = 500 * time.Millisecond

// RingConfig configures one rank of a TCP ring.
type RingConfig struct {
	// Rank is this rank, 0 <= Rank < len(Addrs).
	Rank int
	// Addrs holds every rank's listener address (host:port, as RingListener.Addr gives it), indexed
	// by rank. Rank r dials rank r+1 (mod n) and accepts rank r-1; errors name peers by these addresses.
	Addrs []string
	// OpTimeout bounds a collective whose context has no deadline: a rank that waits longer for its
	// peers fails, and so breaks the communicator. Zero means DefaultOpTimeout. Set it above the
	// longest gap between ranks reaching the same collective (a slow layer, a rank that loads late).
	OpTimeout time.Duration
	// DialTimeout bounds Connect: dialling rank r+1, retried until it answers, and accepting rank r-1.
	// Zero means DefaultDialTimeout; an earlier deadline of Connect's ctx wins.
	DialTimeout time.Duration
	// ServerTLS and ClientTLS, when set, wrap the ring's connections in TLS before the hello: the
	// accepted connection with ServerTLS, the dialled one with ClientTLS. Set both or neither; they
	// decide who may join (package internal/security makes configurations that need a worker's
	// certificate of the same cluster). Nil means plain TCP.
	ServerTLS, ClientTLS *tls.Config
}

// Validate reports a config that Connect cannot use.
func (c RingConfig) Validate() error {
	n := len(c.Addrs)
	switch {
	case n == 0:
		return errors.New("comm: ring config: no addresses")
	case c.Rank < 0 || c.Rank >= n:
		return fmt.Errorf("comm: ring config: rank %d outside 0..%d", c.Rank, n-1)
	case c.OpTimeout < 0:
		return fmt.Errorf("comm: ring config: negative op timeout %v", c.OpTimeout)
	case c.DialTimeout < 0:
		return fmt.Errorf("comm: ring config: negative dial timeout %v", c.DialTimeout)
	case (c.ServerTLS == nil) != (c.ClientTLS == nil):
		return errors.New("comm: ring config: ServerTLS and ClientTLS must be set together")
	}
	if n == 1 {
		return nil
	}
	for r, a := range c.Addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("comm: ring config: address of rank %d: %w", r, err)
		}
	}
	return nil
}

// RingListener is the TCP listener through which a rank accepts its ring predecessor. Open it before
// publishing its address to the peers, so that they can dial as soon as they know it.
type RingListener struct {
	ln *net.TCPListener
}

// Listen opens a RingListener on addr, a host:port such as "127.0.0.1:0" (port 0 picks a free port).
func Listen(addr string) (*RingListener, error) {
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("comm: listen %s: %w", addr, err)
	}
	ln, err := net.ListenTCP("tcp", a)
	if err != nil {
		return nil, fmt.Errorf("comm: listen %s: %w", addr, err)
	}
	return &RingListener{ln: ln}, nil
}

// Addr is the bound address, such as "127.0.0.1:40123", to publish to the peers. For a listener on
// an unspecified address ("0.0.0.0:0") publish a routable host with this port instead.
func (l *RingListener) Addr() string { return l.ln.Addr().String() }

// Close closes the listener; connections it accepted stay open. It is idempotent.
func (l *RingListener) Close() error {
	if err := l.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("comm: close listener %s: %w", l.Addr(), err)
	}
	return nil
}

// Connect joins rank cfg.Rank into the TCP ring of len(cfg.Addrs) ranks: it dials the next rank
// (retrying until it answers) while it accepts the previous one on l, and checks each peer's rank and
// world size with a handshake. A group of one rank gives Solo and needs no listener. l stays the
// caller's: close it when Connect returns; it accepts one ring at a time. Every rank must call Connect;
// it returns once both neighbours are connected, or fails within cfg.DialTimeout or ctx.
//
// The Comm it returns runs AllReduce as a ring reduce-scatter followed by a ring all-gather (each
// element is summed in one fixed order, starting at the rank that owns its chunk, and every rank then
// copies the owner's result), AllGather and Barrier around the ring, and Broadcast along the ring from
// root and back to it. Every read and write has a deadline: ctx's, or else cfg.OpTimeout from the
// start of the collective.
func Connect(ctx context.Context, l *RingListener, cfg RingConfig) (Comm, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := len(cfg.Addrs)
	if n == 1 {
		return Solo(), nil
	}
	if l == nil {
		return nil, &OpError{Rank: cfg.Rank, Op: OpConnect, Peer: -1, Err: errors.New("nil listener")}
	}
	ctx, cancel := context.WithTimeout(ctx, cmp.Or(cfg.DialTimeout, DefaultDialTimeout))
	defer cancel()

	var (
		wg         sync.WaitGroup
		once       sync.Once
		first      error
		prev, next net.Conn
	)
	fail := func(err error) { once.Do(func() { first = err; cancel() }) }
	wg.Go(func() {
		var err error
		if next, err = dialNext(ctx, cfg); err != nil {
			fail(err)
		}
	})
	wg.Go(func() {
		var err error
		if prev, err = acceptPrev(ctx, l, cfg); err != nil {
			fail(err)
		}
	})
	wg.Wait()
	if first != nil {
		for _, c := range []net.Conn{prev, next} {
			if c != nil {
				c.Close()
			}
		}
		return nil, first
	}
	return &ring{
		rank:      cfg.Rank,
		size:      n,
		addrs:     slices.Clone(cfg.Addrs),
		opTimeout: cmp.Or(cfg.OpTimeout, DefaultOpTimeout),
		prev:      prev,
		next:      next,
		in:        bufio.NewReaderSize(prev, 64<<10),
	}, nil
}

// dialNext connects to rank+1, retrying refused or dropped connections until ctx ends. A peer that
// answers with the wrong rank or world size is an error at once.
func dialNext(ctx context.Context, cfg RingConfig) (net.Conn, error) {
	n := len(cfg.Addrs)
	peer := (cfg.Rank + 1) % n
	fail := func(err error) error {
		return &OpError{Rank: cfg.Rank, Op: OpConnect, Peer: peer, Addr: cfg.Addrs[peer], Action: "dial", Err: err}
	}
	var d net.Dialer
	wait := 10 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "tcp", cfg.Addrs[peer])
		if err == nil {
			if cfg.ClientTLS != nil {
				conn = tls.Client(conn, cfg.ClientTLS)
			}
			if err = handshake(ctx, conn, true, cfg.Rank, n, peer); err == nil {
				return conn, nil
			}
			conn.Close()
			if errors.Is(err, errWrongPeer) || isTLSRefusal(err) {
				return nil, fail(err)
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fail(fmt.Errorf("%w; last attempt: %v", ctx.Err(), unwrapNet(err)))
		case <-t.C:
		}
		wait = min(2*wait, 500*time.Millisecond)
	}
}

// isTLSRefusal reports a TLS handshake that failed on certificates (as opposed to a peer not yet
// listening): retrying cannot help.
func isTLSRefusal(err error) bool {
	var (
		cv *tls.CertificateVerificationError
		ae tls.AlertError
	)
	return errors.As(err, &cv) || errors.As(err, &ae)
}

// acceptPrev accepts connections on l until one is rank-1 of this ring or ctx ends. Connections from
// anything else are closed and remembered for the error.
func acceptPrev(ctx context.Context, l *RingListener, cfg RingConfig) (net.Conn, error) {
	n := len(cfg.Addrs)
	peer := (cfg.Rank - 1 + n) % n
	deadline, _ := ctx.Deadline()
	l.ln.SetDeadline(deadline)
	defer l.ln.SetDeadline(time.Time{})
	stop := afterDone(ctx, func() { l.ln.SetDeadline(aLongTimeAgo) })
	defer stop()
	var rejected error
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			switch {
			case ctx.Err() != nil:
				err = ctx.Err()
			case errors.Is(err, os.ErrDeadlineExceeded):
				err = context.DeadlineExceeded
			default:
				err = unwrapNet(err)
			}
			if rejected != nil {
				err = fmt.Errorf("%w; rejected %v", err, rejected)
			}
			return nil, &OpError{Rank: cfg.Rank, Op: OpConnect, Peer: peer, Addr: cfg.Addrs[peer],
				Action: "accept from", Err: err}
		}
		if cfg.ServerTLS != nil {
			conn = tls.Server(conn, cfg.ServerTLS)
		}
		if err := handshake(ctx, conn, false, cfg.Rank, n, peer); err != nil {
			rejected = fmt.Errorf("%s: %w", conn.RemoteAddr(), unwrapNet(err))
			conn.Close()
			continue
		}
		return conn, nil
	}
}

// handshake runs the TLS handshake of a *tls.Conn and exchanges hellos on conn, within ctx.
func handshake(ctx context.Context, conn net.Conn, dialer bool, rank, size, peer int) error {
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := afterDone(ctx, func() { conn.SetDeadline(aLongTimeAgo) })
	var err error
	if tc, ok := conn.(*tls.Conn); ok {
		if err = tc.HandshakeContext(ctx); err != nil {
			err = fmt.Errorf("TLS handshake: %w", err)
		}
	}
	if err == nil {
		err = exchangeHello(conn, dialer, rank, size, peer)
	}
	stop()
	if err != nil {
		return err
	}
	return conn.SetDeadline(time.Time{})
}

// ring is one rank of a TCP ring. The goroutine that drives it owns everything but mu's fields; the
// connections are safe to close from any goroutine.
type ring struct {
	rank, size int
	addrs      []string
	opTimeout  time.Duration
	prev, next net.Conn      // from rank-1, to rank+1
	in         *bufio.Reader // reads prev
	seq        uint64        // collectives started

	out   []byte // the frame being sent
	inBuf []byte // the payload received
	hdr   [headerSize]byte
	work  []float32 // the float32 accumulator of a bfloat16 AllReduce
	dirty bool      // a send to next failed part-way, so no abort frame can follow it

	mu        sync.Mutex
	closed    bool  // Close was called
	broken    error // the failure that broke the ring
	closeOnce sync.Once
}

var _ Comm = (*ring)(nil)

func (c *ring) Rank() int { return c.rank }
func (c *ring) Size() int { return c.size }

func (c *ring) AllReduce(ctx context.Context, buf Buffer) error {
	return c.run(ctx, OpAllReduce, func() error {
		if err := checkBuffer(buf); err != nil {
			return err
		}
		total := buf.Len()
		work := c.accumulator(buf)
		h := header{seq: c.seq, op: codeAllReduce, dtype: uint8(buf.DType()), wire: uint8(Float32), total: uint64(total)}
		// Reduce-scatter in float32: at step s this rank passes on chunk rank-s and adds its own values
		// to chunk rank-s-1. Chunk c is summed in ring order from rank c, and after n-1 steps this rank
		// holds the full sum of chunk rank+1.
		for s := range c.size - 1 {
			send, recv := c.chunk(total, c.rank-s), c.chunk(total, c.rank-s-1)
			f := c.frame(h.with(send.len()))
			putF32(f[headerSize:], work[send.lo:send.hi])
			p, err := c.exchange(OpAllReduce, f, h.with(recv.len()))
			if err != nil {
				return err
			}
			addF32(work[recv.lo:recv.hi], p)
		}
		own := c.chunk(total, c.rank+1)
		if b, ok := buf.(HostBF16); ok {
			for i := own.lo; i < own.hi; i++ {
				b[i] = f32ToBF16(work[i])
			}
		}
		// All-gather in the buffer's dtype: every rank copies each chunk's final value from its owner.
		h.wire = h.dtype
		for s := range c.size - 1 {
			send, recv := c.chunk(total, c.rank+1-s), c.chunk(total, c.rank-s)
			f := c.frame(h.with(send.len()))
			putElems(f[headerSize:], buf, send.lo, send.hi)
			p, err := c.exchange(OpAllReduce, f, h.with(recv.len()))
			if err != nil {
				return err
			}
			getElems(buf, recv.lo, p)
		}
		return nil
	})
}

func (c *ring) AllGather(ctx context.Context, send, recv Buffer) error {
	return c.run(ctx, OpAllGather, func() error {
		if err := checkGather(send, recv, c.size); err != nil {
			return err
		}
		m := send.Len()
		copyAt(recv, c.rank*m, send)
		h := header{seq: c.seq, op: codeAllGather, dtype: uint8(send.DType()), wire: uint8(send.DType()),
			total: uint64(m), count: uint32(m)}
		// At step s this rank passes on block rank-s and receives block rank-s-1.
		for s := range c.size - 1 {
			out, in := c.mod(c.rank-s), c.mod(c.rank-s-1)
			f := c.frame(h)
			putElems(f[headerSize:], recv, out*m, (out+1)*m)
			p, err := c.exchange(OpAllGather, f, h)
			if err != nil {
				return err
			}
			getElems(recv, in*m, p)
		}
		return nil
	})
}

func (c *ring) Broadcast(ctx context.Context, buf Buffer, root int) error {
	return c.run(ctx, OpBroadcast, func() error {
		if err := checkBuffer(buf); err != nil {
			return err
		}
		if err := checkRoot(root, c.size); err != nil {
			return err
		}
		h := header{seq: c.seq, op: codeBroadcast, dtype: uint8(buf.DType()), wire: uint8(buf.DType()),
			root: uint32(root), total: uint64(buf.Len()), count: uint32(buf.Len())}
		// The buffer travels from root along the ring to root-1, which closes the ring with an empty
		// frame to root. Every rank thus reads one header, so a rank that disagrees on the root is
		// caught, and root returns only once every rank has the data.
		if c.rank == root {
			f := c.frame(h)
			putElems(f[headerSize:], buf, 0, buf.Len())
			if err := c.send(OpBroadcast, f); err != nil {
				return err
			}
			_, err := c.recv(OpBroadcast, h.with(0))
			return err
		}
		p, err := c.recv(OpBroadcast, h)
		if err != nil {
			return err
		}
		getElems(buf, 0, p)
		if c.mod(c.rank+1) == root {
			return c.send(OpBroadcast, c.frame(h.with(0)))
		}
		f := c.frame(h)
		putElems(f[headerSize:], buf, 0, buf.Len())
		return c.send(OpBroadcast, f)
	})
}

func (c *ring) Barrier(ctx context.Context) error {
	return c.run(ctx, OpBarrier, func() error {
		// After n-1 steps, each frame received having been sent only after the sender received its
		// previous one, every rank has heard (indirectly) from every other.
		h := header{seq: c.seq, op: codeBarrier}
		for range c.size - 1 {
			if _, err := c.exchange(OpBarrier, c.frame(h), h); err != nil {
				return err
			}
		}
		return nil
	})
}

func (c *ring) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	return c.closeConns()
}

func (c *ring) closeConns() error {
	var err error
	c.closeOnce.Do(func() { err = errors.Join(c.prev.Close(), c.next.Close()) })
	if err != nil {
		return &OpError{Rank: c.rank, Op: OpClose, Peer: -1, Err: err}
	}
	return nil
}

// run runs collective op's body f under ctx: it bounds every read and write by ctx's deadline (or the
// op timeout) and interrupts them when ctx ends. When f fails, run breaks the ring and returns an
// *OpError whose cause is ctx.Err() if ctx ended, ErrClosed if the Comm was closed.
func (c *ring) run(ctx context.Context, op string, f func() error) error {
	c.mu.Lock()
	unusable := c.closed || c.broken != nil
	broken := c.broken
	c.mu.Unlock()
	if unusable {
		err := ErrClosed
		if broken != nil {
			err = fmt.Errorf("%w by an earlier error: %v", ErrClosed, broken)
		}
		return &OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
	}

	c.seq++
	deadline, hasDeadline := ctx.Deadline()
	if !hasDeadline {
		deadline = time.Now().Add(c.opTimeout)
	}
	err := ctx.Err()
	if err == nil {
		c.setDeadline(deadline)
		stop := afterDone(ctx, func() { c.setDeadline(aLongTimeAgo) })
		err = f()
		stop()
		if err == nil {
			return nil
		}
	}

	oe, ok := errors.AsType[*OpError](err)
	if !ok {
		oe = &OpError{Rank: c.rank, Op: op, Peer: -1, Err: err}
	}
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	switch {
	case ctx.Err() != nil:
		oe.Err = ctx.Err()
	case closed:
		oe.Err = ErrClosed
	case errors.Is(oe.Err, os.ErrDeadlineExceeded) && hasDeadline:
		oe.Err = context.DeadlineExceeded
	case errors.Is(oe.Err, os.ErrDeadlineExceeded):
		oe.Err = fmt.Errorf("op timeout %v: %w", c.opTimeout, oe.Err)
	}
	c.abort(oe)
	return oe
}

// abort breaks the ring after a failure: it passes the failure's text on to the next rank in an abort
// frame (when the stream to it is still at a frame boundary) and closes both connections, so the
// failure travels around the ring.
func (c *ring) abort(err error) {
	c.mu.Lock()
	if c.broken == nil {
		c.broken = err
	}
	closed := c.closed
	c.mu.Unlock()
	if !closed && !c.dirty {
		msg := origin(err)
		if len(msg) > maxAbortText {
			msg = msg[:maxAbortText]
		}
		f := c.frame(header{op: codeAbort, count: uint32(len(msg))})
		copy(f[headerSize:], msg)
		c.next.SetWriteDeadline(time.Now().Add(abortGrace))
		c.next.Write(f) // best effort: the next rank may be gone
	}
	c.closeConns()
}

// exchange sends frame to the next rank while it receives the frame want describes from the previous
// one, and returns the received payload. Sending and receiving at once keeps the ring from deadlocking
// on frames larger than the socket buffers. The first failure wins: a failed send stops the receive at
// once, a failed receive gives the send abortGrace to finish, so an abort frame can follow it.
func (c *ring) exchange(op string, frame []byte, want header) ([]byte, error) {
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	fail := func(err error, stopOther func()) { once.Do(func() { first = err; stopOther() }) }
	wg.Go(func() {
		if err := c.send(op, frame); err != nil {
			fail(err, func() { c.prev.SetReadDeadline(aLongTimeAgo) })
		}
	})
	p, err := c.recv(op, want)
	if err != nil {
		fail(err, func() { c.next.SetWriteDeadline(time.Now().Add(abortGrace)) })
	}
	wg.Wait()
	return p, first
}

// send writes one frame to the next rank.
func (c *ring) send(op string, frame []byte) error {
	if _, err := c.next.Write(frame); err != nil {
		c.dirty = true
		return c.peerError(op, "send to", c.mod(c.rank+1), err)
	}
	return nil
}

// recv reads one frame from the previous rank and checks that its header is want. The payload it
// returns is valid until the next recv.
func (c *ring) recv(op string, want header) ([]byte, error) {
	peer := c.mod(c.rank - 1)
	if _, err := io.ReadFull(c.in, c.hdr[:]); err != nil {
		return nil, c.peerError(op, "recv from", peer, err)
	}
	got := readHeader(c.hdr[:])
	if got.op == codeAbort {
		if got.count > 4*maxAbortText {
			return nil, c.peerError(op, "recv from", peer, fmt.Errorf("abort frame of %d bytes", got.count))
		}
		msg := make([]byte, got.count)
		if _, err := io.ReadFull(c.in, msg); err != nil {
			return nil, c.peerError(op, "recv from", peer, err)
		}
		return nil, c.peerError(op, "recv from", peer, &peerFailure{string(msg)})
	}
	if got != want {
		return nil, c.peerError(op, "recv from", peer,
			fmt.Errorf("%w: peer is at %v, this rank at %v", ErrMismatch, got, want))
	}
	c.inBuf = grow(c.inBuf, want.payloadSize())
	if _, err := io.ReadFull(c.in, c.inBuf); err != nil {
		return nil, c.peerError(op, "recv from", peer, err)
	}
	return c.inBuf, nil
}

// frame returns the send buffer holding header h, sized for h's payload.
func (c *ring) frame(h header) []byte {
	c.out = grow(c.out, headerSize+h.payloadSize())
	h.put(c.out)
	return c.out
}

// accumulator returns the float32 values AllReduce sums: buf itself, or a float32 copy of a bfloat16
// buf.
func (c *ring) accumulator(buf Buffer) []float32 {
	switch b := buf.(type) {
	case HostF32:
		return b
	case HostBF16:
		c.work = grow(c.work, len(b))
		for i, x := range b {
			c.work[i] = bf16ToF32(x)
		}
		return c.work
	}
	return nil
}

func (c *ring) peerError(op, action string, peer int, err error) *OpError {
	return &OpError{Rank: c.rank, Op: op, Peer: peer, Addr: c.addrs[peer], Action: action, Err: unwrapNet(err)}
}

func (c *ring) setDeadline(t time.Time) {
	c.prev.SetDeadline(t)
	c.next.SetDeadline(t)
}

// mod maps any rank offset into 0..size-1.
func (c *ring) mod(r int) int { return ((r % c.size) + c.size) % c.size }

// chunk is chunk i (mod size) of a buffer of total elements.
func (c *ring) chunk(total, i int) span { return chunk(total, c.size, c.mod(i)) }

// aLongTimeAgo is a deadline in the past, which interrupts blocked I/O at once.
var aLongTimeAgo = time.Unix(1, 0)

// afterDone calls f when ctx ends, until stop is called; stop waits for an f that has started.
func afterDone(ctx context.Context, f func()) (stop func()) {
	if ctx.Done() == nil {
		return func() {}
	}
	ran := make(chan struct{})
	cancel := context.AfterFunc(ctx, func() { f(); close(ran) })
	return func() {
		if !cancel() {
			<-ran
		}
	}
}

// unwrapNet drops an outer *net.OpError layer, whose addresses the OpError around it already gives.
// It unwraps that one known layer only, so it asserts the type rather than searching the chain.
func unwrapNet(err error) error {
	if ne, ok := err.(*net.OpError); ok && ne.Err != nil {
		return ne.Err
	}
	return err
}

// grow returns b resized to n elements, reallocated only when too small.
func grow[T any](b []T, n int) []T {
	if cap(b) < n {
		return make([]T, n)
	}
	return b[:n]
}
