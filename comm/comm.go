package comm

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// DType is the element type of a Buffer.
type DType int

const (
	// Float32 is IEEE 754 binary32.
	Float32 DType = iota + 1
	// BFloat16 is bfloat16: the upper 16 bits of a binary32.
	BFloat16
)

// String returns "float32" or "bfloat16".
func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case BFloat16:
		return "bfloat16"
	}
	return fmt.Sprintf("DType(%d)", int(d))
}

// Size is the number of bytes of one element, 0 for an unknown DType.
func (d DType) Size() int {
	switch d {
	case Float32:
		return 4
	case BFloat16:
		return 2
	}
	return 0
}

// Buffer is memory a collective reads and writes in place. Host buffers are HostF32 and HostBF16;
// DeviceBuffer is GPU memory, which only a device communicator (comm/nccl) accepts. A CPU
// implementation given a buffer it cannot use returns an error wrapping errors.ErrUnsupported.
type Buffer interface {
	// DType is the element type.
	DType() DType
	// Len is the number of elements.
	Len() int
}

// HostF32 is a Buffer of float32 values in host memory.
type HostF32 []float32

// DType returns Float32.
func (HostF32) DType() DType { return Float32 }

// Len returns len(b).
func (b HostF32) Len() int { return len(b) }

// HostBF16 is a Buffer of bfloat16 values in host memory, held as their bit patterns.
type HostBF16 []uint16

// DType returns BFloat16.
func (HostBF16) DType() DType { return BFloat16 }

// Len returns len(b).
func (b HostBF16) Len() int { return len(b) }

var (
	_ Buffer = HostF32(nil)
	_ Buffer = HostBF16(nil)
)

// Comm is one rank's handle on a communicator: the ranks of one TP group, which exchange activations
// through collectives.
//
// Ordering and concurrency: every rank must call the same collectives, with buffers of the same dtype
// and length and with the same root, in the same order. One goroutine drives a Comm; its collectives
// are never called concurrently. Close is the exception: any goroutine may call it, also during a
// collective, which then fails with an error wrapping ErrClosed.
//
// Buffers: collectives work in place on the caller's memory and keep no reference to it after they
// return. Buffers of different ranks must not overlap. After a failed call the contents of the buffers
// are unspecified.
//
// Results: after AllReduce every rank holds bitwise-identical values, so ranks that then take discrete
// decisions on them (top-k expert choice, sampling) decide alike. The summation order is fixed by the
// implementation and the group size, never by timing, so the same inputs give the same bits on every
// run. BFloat16 values are summed in float32 and the sum is rounded once to bfloat16, to nearest with
// ties to even.
//
// Errors: every error is an *OpError naming this rank, the collective and, when one is involved, the
// peer rank and its address. A buffer whose dtype or length does not fit the call gives an error
// wrapping ErrMismatch. So do arguments that differ between ranks (dtype, length, root, or another
// collective) on at least one rank; the other ranks fail in the same call or, at the latest (a rank
// that already has its data cannot always learn that a later one disagreed), in their next one. When
// ctx has a deadline it bounds the call; when ctx ends first the error wraps ctx.Err(). Any failed
// collective breaks the communicator on every rank: the failing rank tells its peers, whose pending and
// later collectives fail promptly instead of hanging, and later calls on a broken communicator fail
// with an error wrapping ErrClosed. Close it and build a new one.
type Comm interface {
	// Rank is this rank's index in the group, 0 <= Rank < Size.
	Rank() int
	// Size is the number of ranks in the group.
	Size() int
	// AllReduce replaces buf on every rank by the elementwise sum of all ranks' buf.
	AllReduce(ctx context.Context, buf Buffer) error
	// AllGather concatenates every rank's send into recv, in rank order: rank r's send lands at
	// recv[r*n, (r+1)*n), where n = send.Len() and recv.Len() must be Size()*n. send may be this
	// rank's own block of recv.
	AllGather(ctx context.Context, send, recv Buffer) error
	// Broadcast copies root's buf into buf on every other rank.
	Broadcast(ctx context.Context, buf Buffer, root int) error
	// Barrier returns once every rank has called it.
	Barrier(ctx context.Context) error
	// Close releases the communicator and makes the peers' pending and later collectives fail. It is
	// idempotent and never blocks on peers.
	Close() error
}

// ErrClosed reports a collective on a communicator that was closed, or broken by an earlier failure.
// Test for it with errors.Is.
var ErrClosed = errors.New("comm: communicator closed")

// ErrMismatch reports buffers or arguments that do not fit the collective, or that differ between
// ranks: another dtype, length or root, or another collective altogether. Test for it with errors.Is.
var ErrMismatch = errors.New("comm: mismatched collective")

// OpError is the error of a collective, or of Connect, on one rank.
type OpError struct {
	Rank int    // the rank that reports the error
	Op   string // "all-reduce", "all-gather", "broadcast", "barrier", "connect" or "close"
	// Peer is the other rank involved, or -1 when none is.
	Peer int
	// Addr is Peer's ring address; empty in process or when unknown.
	Addr string
	// Action is what this rank was doing with Peer: "send to", "recv from", "dial", "accept from" or
	// "wait for".
	Action string
	Err    error // the cause
}

// Error returns, for example, "comm: rank 1: all-reduce: recv from rank 0 (127.0.0.1:40123): EOF".
func (e *OpError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "comm: rank %d: %s: ", e.Rank, e.Op)
	if e.Peer >= 0 {
		fmt.Fprintf(&b, "%s rank %d", e.Action, e.Peer)
		if e.Addr != "" {
			fmt.Fprintf(&b, " (%s)", e.Addr)
		}
		b.WriteString(": ")
	}
	if e.Err != nil {
		b.WriteString(strings.TrimPrefix(e.Err.Error(), "comm: "))
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *OpError) Unwrap() error { return e.Err }

// peerFailure is the error another rank reported when its collective failed; it carries only the text,
// so that a peer's context.Canceled is not mistaken for this rank's.
type peerFailure struct{ msg string }

func (e *peerFailure) Error() string { return "peer failed: " + e.msg }

// origin is the text to pass on to peers when err breaks a communicator: the text of the first
// failure, when err was itself caused by a peer's.
func origin(err error) string {
	if pf, ok := errors.AsType[*peerFailure](err); ok {
		return pf.msg
	}
	return err.Error()
}

// The names of the collectives in errors.
const (
	OpAllReduce = "all-reduce"
	OpAllGather = "all-gather"
	OpBroadcast = "broadcast"
	OpBarrier   = "barrier"
	OpConnect   = "connect"
	OpClose     = "close"
)

// checkBuffer accepts the host buffer types.
func checkBuffer(b Buffer) error {
	switch b.(type) {
	case HostF32, HostBF16:
		return nil
	}
	return fmt.Errorf("buffer type %T: %w", b, errors.ErrUnsupported)
}

// checkGather checks AllGather's buffers for a group of n ranks.
func checkGather(send, recv Buffer, n int) error {
	if err := checkBuffer(send); err != nil {
		return err
	}
	if err := checkBuffer(recv); err != nil {
		return err
	}
	if send.DType() != recv.DType() || recv.Len() != n*send.Len() {
		return fmt.Errorf("%w: send %s, recv %s, want recv %s[%d]",
			ErrMismatch, describe(send), describe(recv), send.DType(), n*send.Len())
	}
	return nil
}

// checkRoot checks a broadcast root for a group of n ranks.
func checkRoot(root, n int) error {
	if root < 0 || root >= n {
		return fmt.Errorf("%w: root %d outside 0..%d", ErrMismatch, root, n-1)
	}
	return nil
}

// describe formats a buffer as "float32[1024]".
func describe(b Buffer) string { return fmt.Sprintf("%s[%d]", b.DType(), b.Len()) }

// copyAt copies src into dst from element off; both are host buffers of one dtype. A src that already
// is that part of dst is left alone, so that other ranks may read it meanwhile.
func copyAt(dst Buffer, off int, src Buffer) {
	switch d := dst.(type) {
	case HostF32:
		s := src.(HostF32)
		if len(s) > 0 && &d[off] != &s[0] {
			copy(d[off:], s)
		}
	case HostBF16:
		s := src.(HostBF16)
		if len(s) > 0 && &d[off] != &s[0] {
			copy(d[off:], s)
		}
	}
}

// span is the element range [lo, hi) of one chunk of a buffer.
type span struct{ lo, hi int }

func (s span) len() int { return s.hi - s.lo }

// chunk is the i-th of n near-equal chunks of a buffer of length total; chunks may be empty.
func chunk(total, n, i int) span {
	return span{i * total / n, (i + 1) * total / n}
}
