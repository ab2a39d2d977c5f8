// Package commtest is the conformance suite for comm.Comm. Every implementation's tests call [Run]:
//
//	func TestConformance(t *testing.T) {
//		commtest.Run(t, func(t *testing.T, n int) []comm.Comm { return comm.NewLocalGroup(n) })
//	}
//
// Run checks, for groups of 1 to 4 ranks, the results of every collective on seeded random data of
// several lengths (0, fewer than the ranks, not divisible by them, large) against float64 references
// written here; that all ranks hold bitwise-identical AllReduce results and that a second run gives the
// same bits; that BFloat16 sums are rounded once, ties to even; and the failure contract of comm.Comm:
// arguments that do not fit or that differ between ranks fail with comm.ErrMismatch on some rank and
// with an error on every rank (by its next call when ranks disagree on Broadcast's root), a cancelled or expired ctx fails promptly with ctx's error, a closed or
// failed rank makes its peers fail promptly with errors that name it, a broken communicator then
// fails with comm.ErrClosed, and no goroutine outlives Close.
package commtest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/comm"
)

// Time limits of the suite. A correct implementation needs a fraction of them.
const (
	// callTimeout bounds every collective the suite calls, so a hang fails instead of blocking.
	callTimeout = 10 * time.Second
	// prompt is the longest a rank may take to notice that a peer failed or that its ctx ended.
	prompt = 5 * time.Second
	// settleTimeout is how long goroutines may take to end after Close.
	settleTimeout = 5 * time.Second
)

// Run runs the suite. newGroup returns the n ranks of a fresh communicator, rank r at index r, and
// registers its own cleanup with t. Run closes the ranks at the end of each subtest and then fails if
// the number of goroutines has not come back to what it was before newGroup, so newGroup must not leave
// goroutines running after Close (or must end them in a t.Cleanup that runs before it returns). The
// communicators should not time out by themselves within callTimeout (10 s). Subtests run one after
// another.
func Run(t *testing.T, newGroup func(t *testing.T, n int) []comm.Comm) {
	for _, n := range []int{1, 2, 3, 4} {
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) {
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					if n < tc.minRanks {
						t.Skipf("needs %d ranks", tc.minRanks)
					}
					base := runtime.NumGoroutine()
					comms := newGroup(t, n)
					if len(comms) != n {
						t.Fatalf("newGroup(%d) returned %d ranks", n, len(comms))
					}
					for r, c := range comms {
						if c.Rank() != r || c.Size() != n {
							t.Fatalf("rank %d: Rank(), Size() = %d, %d, want %d, %d", r, c.Rank(), c.Size(), r, n)
						}
					}
					defer checkGoroutines(t, base)
					defer closeAll(t, comms)
					tc.run(t, comms)
				})
			}
		})
	}
}

var cases = []struct {
	name     string
	minRanks int
	run      func(t *testing.T, comms []comm.Comm)
}{
	{"AllReduceFloat32", 1, testAllReduceF32},
	{"AllReduceBFloat16", 1, testAllReduceBF16},
	{"AllReduceBFloat16RoundsOnce", 1, testRoundsOnce},
	{"AllGather", 1, testAllGather},
	{"Broadcast", 1, testBroadcast},
	{"Barrier", 1, testBarrier},
	{"Sequence", 1, testSequence},
	{"RecvLengthMismatch", 1, testRecvLength},
	{"RootOutOfRange", 1, testRootRange},
	{"UnsupportedBuffer", 1, testUnsupported},
	{"LengthMismatch", 2, testLengthMismatch},
	{"DTypeMismatch", 2, testDTypeMismatch},
	{"RootMismatch", 2, testRootMismatch},
	{"CollectiveMismatch", 2, testCollectiveMismatch},
	{"Cancel", 1, testCancel},
	{"Deadline", 1, testDeadline},
	{"CloseFailsPeers", 1, testClose},
	{"CloseDuringCall", 2, testCloseDuringCall},
}

// lengths are the buffer lengths tried for n ranks: empty, shorter than n, not divisible by n, large.
func lengths(n int) []int {
	ls := []int{0, 1, n - 1, n + 1, 7, 1000, 4099}
	slices.Sort(ls)
	return slices.Compact(ls)
}

func testAllReduceF32(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	// The largest length makes frames larger than loopback socket buffers.
	for _, l := range append(lengths(n), 1<<18) {
		ins := randF32(n, l, uint64(l))
		first := allReduceF32(t, comms, ins)
		for i := range l {
			var want, abs float64
			for _, in := range ins {
				want += float64(in[i])
				abs += math.Abs(float64(in[i]))
			}
			tol := float64(n) * 0x1p-24 * abs
			if got := float64(first[0][i]); math.Abs(got-want) > tol {
				t.Fatalf("AllReduce(float32[%d])[%d] = %g, want %g ± %g", l, i, got, want, tol)
			}
		}
		checkIdentical(t, fmt.Sprintf("AllReduce(float32[%d])", l), first)
		again := allReduceF32(t, comms, ins)
		for r := range again {
			if i := firstDiffF32(again[r], first[r]); i >= 0 {
				t.Fatalf("rank %d: second AllReduce(float32[%d])[%d] = %#x, first run %#x", r, l, i,
					math.Float32bits(again[r][i]), math.Float32bits(first[r][i]))
			}
		}
	}
}

func testAllReduceBF16(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	for _, l := range lengths(n) {
		ins := make([][]uint16, n)
		for r, f := range randF32(n, l, uint64(l)+100) {
			ins[r] = make([]uint16, l)
			for i, x := range f {
				ins[r][i] = uint16(math.Float32bits(x) >> 16)
			}
		}
		first := allReduceBF16(t, comms, ins)
		for i := range l {
			var want, abs float64
			for _, in := range ins {
				want += float64(widen(in[i]))
				abs += math.Abs(float64(widen(in[i])))
			}
			tol := 0x1p-8*math.Abs(want) + 2*float64(n)*0x1p-24*abs
			if got := float64(widen(first[0][i])); math.Abs(got-want) > tol {
				t.Fatalf("AllReduce(bfloat16[%d])[%d] = %g, want %g ± %g", l, i, got, want, tol)
			}
		}
		what := fmt.Sprintf("AllReduce(bfloat16[%d])", l)
		for r := 1; r < n; r++ {
			if i := firstDiff(first[r], first[0]); i >= 0 {
				t.Fatalf("%s: rank %d [%d] = %#04x, rank 0 %#04x", what, r, i, first[r][i], first[0][i])
			}
		}
		again := allReduceBF16(t, comms, ins)
		for r := range again {
			if i := firstDiff(again[r], first[r]); i >= 0 {
				t.Fatalf("rank %d: second %s[%d] = %#04x, first run %#04x", r, what, i, again[r][i], first[r][i])
			}
		}
	}
}

// testRoundsOnce uses values whose float32 sum is exact in any order but not a bfloat16, so the result
// shows whether the sum was rounded once (to nearest, ties to even) or at every step.
func testRoundsOnce(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	const l = 64
	ins := make([][]uint16, n)
	sums := make([]float32, l)
	for r := range ins {
		ins[r] = make([]uint16, l)
		for i := range l {
			v := float32(1 + i%4) // 1..4, ...
			if r != i%n {
				v = float32(1+(i+r)%3) * 0x1p-9 // ... plus small terms that a bfloat16 sum would lose
			}
			ins[r][i] = uint16(math.Float32bits(v) >> 16)
			sums[i] += v
		}
	}
	got := allReduceBF16(t, comms, ins)
	for i, s := range sums {
		if want := roundBF16(s); got[0][i] != want {
			t.Fatalf("AllReduce(bfloat16[%d])[%d] = %#04x (%g), want %#04x (%g, the float32 sum %g rounded once)",
				l, i, got[0][i], widen(got[0][i]), want, widen(want), s)
		}
	}
	for r := 1; r < n; r++ {
		if i := firstDiff(got[r], got[0]); i >= 0 {
			t.Fatalf("AllReduce(bfloat16[%d]): rank %d [%d] = %#04x, rank 0 %#04x", l, r, i, got[r][i], got[0][i])
		}
	}
	// Ties go to the even neighbour, whatever the order of the terms.
	for _, tc := range []struct {
		sum  float32
		want uint16
	}{{1 + 0x1p-8, 0x3f80}, {1 + 0x1p-7 + 0x1p-8, 0x3f82}, {-(1 + 0x1p-8), 0xbf80}} {
		if got := roundBF16(tc.sum); got != tc.want {
			t.Fatalf("roundBF16(%g) = %#04x, want %#04x", tc.sum, got, tc.want)
		}
	}
}

func testAllGather(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	for _, m := range []int{0, 1, 5, 1000} {
		sends := randF32(n, m, uint64(m)+200)
		recvs := make([]comm.HostF32, n)
		sendsBF := make([]comm.HostBF16, n)
		recvsBF := make([]comm.HostBF16, n)
		for r := range n {
			recvs[r] = poisonF32(n * m)
			sendsBF[r] = make(comm.HostBF16, m)
			for i, x := range sends[r] {
				sendsBF[r][i] = uint16(math.Float32bits(x) >> 16)
			}
			recvsBF[r] = make(comm.HostBF16, n*m)
		}
		must(t, fmt.Sprintf("AllGather(float32[%d])", m), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
			return c.AllGather(ctx, comm.HostF32(sends[r]), recvs[r])
		}))
		must(t, fmt.Sprintf("AllGather(bfloat16[%d])", m), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
			return c.AllGather(ctx, sendsBF[r], recvsBF[r])
		}))
		for r := range n {
			for k := range n {
				if i := firstDiffF32(recvs[r][k*m:(k+1)*m], sends[k]); i >= 0 {
					t.Fatalf("rank %d: AllGather(float32[%d]) recv[%d] = %g, want rank %d's send[%d] = %g",
						r, m, k*m+i, recvs[r][k*m+i], k, i, sends[k][i])
				}
				if i := firstDiff(recvsBF[r][k*m:(k+1)*m], sendsBF[k]); i >= 0 {
					t.Fatalf("rank %d: AllGather(bfloat16[%d]) recv[%d] = %#04x, want rank %d's send[%d] = %#04x",
						r, m, k*m+i, recvsBF[r][k*m+i], k, i, sendsBF[k][i])
				}
			}
		}
	}
	// In place: each rank's send is its own block of recv.
	const m = 3
	recvs := make([]comm.HostF32, n)
	for r := range recvs {
		recvs[r] = poisonF32(n * m)
		for i := range m {
			recvs[r][r*m+i] = float32(10*r + i)
		}
	}
	must(t, "AllGather in place", onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.AllGather(ctx, recvs[r][r*m:(r+1)*m], recvs[r])
	}))
	for r := range n {
		for i, got := range recvs[r] {
			if want := float32(10*(i/m) + i%m); got != want {
				t.Fatalf("rank %d: AllGather in place: recv[%d] = %g, want %g", r, i, got, want)
			}
		}
	}
}

func testBroadcast(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	for root := range n {
		for _, l := range []int{0, 3, 1000} {
			data := randF32(n, l, uint64(l+root))
			bf := make([]comm.HostBF16, n)
			for r := range n {
				bf[r] = make(comm.HostBF16, l)
				for i, x := range data[r] {
					bf[r][i] = uint16(math.Float32bits(x) >> 16)
				}
			}
			want, wantBF := slices.Clone(data[root]), slices.Clone(bf[root])
			must(t, fmt.Sprintf("Broadcast(float32[%d], %d)", l, root), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
				return c.Broadcast(ctx, comm.HostF32(data[r]), root)
			}))
			must(t, fmt.Sprintf("Broadcast(bfloat16[%d], %d)", l, root), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
				return c.Broadcast(ctx, bf[r], root)
			}))
			for r := range n {
				if i := firstDiffF32(data[r], want); i >= 0 {
					t.Fatalf("rank %d: Broadcast(float32[%d], %d)[%d] = %g, want %g", r, l, root, i, data[r][i], want[i])
				}
				if i := firstDiff(bf[r], wantBF); i >= 0 {
					t.Fatalf("rank %d: Broadcast(bfloat16[%d], %d)[%d] = %#04x, want %#04x", r, l, root, i, bf[r][i], wantBF[i])
				}
			}
		}
	}
}

func testBarrier(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	for last := range n {
		var entered atomic.Bool
		errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
			if r == last {
				time.Sleep(20 * time.Millisecond) // so the others reach the barrier first (not needed for correctness)
				entered.Store(true)
				return c.Barrier(ctx)
			}
			if err := c.Barrier(ctx); err != nil {
				return err
			}
			if !entered.Load() {
				return fmt.Errorf("returned before rank %d called Barrier", last)
			}
			return nil
		})
		must(t, "Barrier", errs)
	}
}

// testSequence mixes collectives, so an implementation that keeps state between them (sequence
// numbers, buffers) is checked for staying in step.
func testSequence(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		for step := range 20 {
			l := step % 5
			buf := make(comm.HostF32, l)
			for i := range buf {
				buf[i] = float32(r + i)
			}
			if err := c.AllReduce(ctx, buf); err != nil {
				return err
			}
			for i, got := range buf {
				if want := float32(n*i + n*(n-1)/2); got != want {
					return fmt.Errorf("step %d: AllReduce(float32[%d])[%d] = %g, want %g", step, l, i, got, want)
				}
			}
			recv := make(comm.HostBF16, n*l)
			send := make(comm.HostBF16, l)
			for i := range send {
				send[i] = uint16(r)
			}
			if err := c.AllGather(ctx, send, recv); err != nil {
				return err
			}
			for i, got := range recv {
				if want := uint16(i / max(l, 1)); got != want {
					return fmt.Errorf("step %d: AllGather(bfloat16[%d]) recv[%d] = %d, want %d", step, l, i, got, want)
				}
			}
			root := step % n
			b := comm.HostF32{float32(r), float32(step)}
			if err := c.Broadcast(ctx, b, root); err != nil {
				return err
			}
			if b[0] != float32(root) || b[1] != float32(step) {
				return fmt.Errorf("step %d: Broadcast(root %d) = %v, want [%d %d]", step, root, b, root, step)
			}
			if step%3 == 0 {
				if err := c.Barrier(ctx); err != nil {
					return err
				}
			}
		}
		return nil
	})
	must(t, "sequence", errs)
}

func testRecvLength(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	bad := n - 1
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		recv := make(comm.HostF32, 4*n)
		if r == bad {
			recv = recv[:4*n-1]
		}
		return c.AllGather(ctx, make(comm.HostF32, 4), recv)
	})
	checkFailed(t, "AllGather with a short recv", comms, errs, bad, comm.ErrMismatch)
}

func testRootRange(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.Broadcast(ctx, make(comm.HostF32, 4), n)
	})
	checkFailed(t, fmt.Sprintf("Broadcast(root %d)", n), comms, errs, 0, comm.ErrMismatch)
}

// deviceBuffer stands for a buffer type that CPU implementations cannot use.
type deviceBuffer struct{}

func (deviceBuffer) DType() comm.DType { return comm.Float32 }
func (deviceBuffer) Len() int          { return 4 }

func testUnsupported(t *testing.T, comms []comm.Comm) {
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		if r == 0 {
			return c.AllReduce(ctx, deviceBuffer{})
		}
		return c.AllReduce(ctx, make(comm.HostF32, 4))
	})
	checkFailed(t, "AllReduce(device buffer)", comms, errs, 0, errors.ErrUnsupported)
}

func testLengthMismatch(t *testing.T, comms []comm.Comm) {
	bad := len(comms) - 1
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		if r == bad {
			return c.AllReduce(ctx, make(comm.HostF32, 5))
		}
		return c.AllReduce(ctx, make(comm.HostF32, 4))
	})
	checkFailed(t, "AllReduce with one longer buffer", comms, errs, -1, comm.ErrMismatch)
}

func testDTypeMismatch(t *testing.T, comms []comm.Comm) {
	bad := len(comms) - 1
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		if r == bad {
			return c.AllReduce(ctx, make(comm.HostBF16, 4))
		}
		return c.AllReduce(ctx, make(comm.HostF32, 4))
	})
	checkFailed(t, "AllReduce with one bfloat16 buffer", comms, errs, -1, comm.ErrMismatch)
}

// testRootMismatch lets ranks disagree on Broadcast's root. A rank that received its data from the
// root it expected may return before another notices the disagreement, so only some rank must fail
// at once; every rank must fail by its next call.
func testRootMismatch(t *testing.T, comms []comm.Comm) {
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.Broadcast(ctx, make(comm.HostF32, 4), min(r, 1))
	})
	if !slices.ContainsFunc(errs, func(err error) bool { return errors.Is(err, comm.ErrMismatch) }) {
		t.Errorf("Broadcast with different roots: no rank's error wraps %v: %v", comm.ErrMismatch, errs)
	}
	checkBroken(t, comms)
}

func testCollectiveMismatch(t *testing.T, comms []comm.Comm) {
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		if r == 1 {
			return c.AllGather(ctx, make(comm.HostF32, 4), make(comm.HostF32, 4*len(comms)))
		}
		return c.AllReduce(ctx, make(comm.HostF32, 4))
	})
	checkFailed(t, "AllReduce on all ranks but AllGather on rank 1", comms, errs, -1, comm.ErrMismatch)
}

// testCancel cancels the collective of every rank but the last, which never calls it: they must
// return ctx's error promptly, and the last rank, calling later, must fail promptly too.
func testCancel(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	ctx, cancel := context.WithCancel(context.Background())
	if n == 1 {
		cancel()
	} else {
		defer time.AfterFunc(20*time.Millisecond, cancel).Stop()
	}
	defer cancel()
	checkContextError(t, "AllReduce with a cancelled ctx", comms, ctx, context.Canceled)
}

func testDeadline(t *testing.T, comms []comm.Comm) {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if len(comms) == 1 {
		<-ctx.Done() // a single rank waits for nobody, so only an expired ctx fails it
	}
	checkContextError(t, "AllReduce with a 50ms deadline", comms, ctx, context.DeadlineExceeded)
}

func checkContextError(t *testing.T, what string, comms []comm.Comm, ctx context.Context, want error) {
	t.Helper()
	n := len(comms)
	start := time.Now()
	errs := onAll(comms[:max(n-1, 1)], func(_ context.Context, r int, c comm.Comm) error {
		return c.AllReduce(ctx, make(comm.HostF32, 8))
	})
	if d := time.Since(start); d > prompt {
		t.Errorf("%s took %v, want < %v", what, d, prompt)
	}
	for r, err := range errs {
		// The ranks share ctx, but one may hear of its end from a peer that saw it first: the peer's
		// failure then carries the same cause as text (peers' errors are not wrapped, so that their
		// context errors are not taken for this rank's).
		fromPeer := err != nil && strings.Contains(err.Error(), "peer failed") && strings.Contains(err.Error(), want.Error())
		if !errors.Is(err, want) && !fromPeer {
			t.Errorf("rank %d: %s = %v, want %v", r, what, err, want)
		}
	}
	if n > 1 {
		late := comms[n-1]
		start := time.Now()
		err := withTimeout(func(ctx context.Context) error { return late.AllReduce(ctx, make(comm.HostF32, 8)) })
		if err == nil || errors.Is(err, context.DeadlineExceeded) || time.Since(start) > prompt {
			t.Errorf("rank %d: AllReduce after the others' %s = %v after %v, want a prompt error",
				n-1, what, err, time.Since(start))
		}
	}
	checkBroken(t, comms)
}

// testClose closes rank 0: the others must fail promptly naming rank 0, and rank 0 must refuse work.
func testClose(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	if err := comms[0].Close(); err != nil {
		t.Fatalf("rank 0: Close() = %v, want nil", err)
	}
	if err := comms[0].Close(); err != nil {
		t.Fatalf("rank 0: second Close() = %v, want nil", err)
	}
	if err := withTimeout(func(ctx context.Context) error { return comms[0].Barrier(ctx) }); !errors.Is(err, comm.ErrClosed) {
		t.Errorf("rank 0: Barrier after Close = %v, want %v", err, comm.ErrClosed)
	}
	start := time.Now()
	errs := onAll(comms[1:], func(ctx context.Context, r int, c comm.Comm) error {
		return c.AllReduce(ctx, make(comm.HostF32, 8))
	})
	for i, err := range errs {
		r := i + 1
		switch {
		case err == nil || errors.Is(err, context.DeadlineExceeded):
			t.Errorf("rank %d: AllReduce with rank 0 closed = %v, want a prompt error", r, err)
		case !strings.Contains(err.Error(), "rank 0"):
			t.Errorf("rank %d: AllReduce with rank 0 closed = %q, want an error that names rank 0", r, err)
		}
	}
	if d := time.Since(start); d > prompt {
		t.Errorf("AllReduce with rank 0 closed took %v, want < %v", d, prompt)
	}
	if n > 1 {
		checkBroken(t, comms[1:])
	}
}

// testCloseDuringCall closes rank 0 from another goroutine while it waits for a rank that never comes.
func testCloseDuringCall(t *testing.T, comms []comm.Comm) {
	n := len(comms)
	defer time.AfterFunc(20*time.Millisecond, func() { comms[0].Close() }).Stop()
	start := time.Now()
	errs := onAll(comms[:n-1], func(ctx context.Context, r int, c comm.Comm) error {
		return c.AllReduce(ctx, make(comm.HostF32, 8))
	})
	if !errors.Is(errs[0], comm.ErrClosed) {
		t.Errorf("rank 0: AllReduce closed meanwhile = %v, want %v", errs[0], comm.ErrClosed)
	}
	for r, err := range errs[1:] {
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("rank %d: AllReduce with rank 0 closed meanwhile = %v, want a prompt error", r+1, err)
		}
	}
	if d := time.Since(start); d > prompt {
		t.Errorf("AllReduce closed meanwhile took %v, want < %v", d, prompt)
	}
}

// checkFailed checks that a collective failed on every rank, that rank culprit's error wraps want
// (culprit -1: some rank's), and that the communicator is then broken.
func checkFailed(t *testing.T, what string, comms []comm.Comm, errs []error, culprit int, want error) {
	t.Helper()
	some := false
	for r, err := range errs {
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("rank %d: %s = %v, want a prompt error", r, what, err)
		}
		if _, ok := errors.AsType[*comm.OpError](err); err != nil && !ok {
			t.Errorf("rank %d: %s = %T %v, want an *comm.OpError", r, what, err, err)
		}
		if errors.Is(err, want) {
			some = true
		} else if r == culprit {
			t.Errorf("rank %d: %s = %v, want %v", r, what, err, want)
		}
	}
	if !some {
		t.Errorf("%s: no rank's error wraps %v: %v", what, want, errs)
	}
	checkBroken(t, comms)
}

// checkBroken checks that every rank of a communicator that failed refuses further collectives.
func checkBroken(t *testing.T, comms []comm.Comm) {
	t.Helper()
	errs := onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.Barrier(ctx)
	})
	for i, err := range errs {
		if err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("rank %d: Barrier after a failure = %v, want a prompt error", comms[i].Rank(), err)
		}
	}
}

// onAll runs f for every comm in its own goroutine, with a ctx bounded by callTimeout, and returns the
// errors in comm order.
func onAll(comms []comm.Comm, f func(ctx context.Context, r int, c comm.Comm) error) []error {
	errs := make([]error, len(comms))
	var wg sync.WaitGroup
	for i, c := range comms {
		wg.Go(func() {
			errs[i] = withTimeout(func(ctx context.Context) error { return f(ctx, c.Rank(), c) })
		})
	}
	wg.Wait()
	return errs
}

func withTimeout(f func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return f(ctx)
}

func must(t *testing.T, what string, errs []error) {
	t.Helper()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %s = %v, want nil", r, what, err)
		}
	}
}

func allReduceF32(t *testing.T, comms []comm.Comm, ins [][]float32) [][]float32 {
	t.Helper()
	outs := make([][]float32, len(ins))
	for r, in := range ins {
		outs[r] = slices.Clone(in)
	}
	must(t, fmt.Sprintf("AllReduce(float32[%d])", len(ins[0])), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.AllReduce(ctx, comm.HostF32(outs[r]))
	}))
	return outs
}

func allReduceBF16(t *testing.T, comms []comm.Comm, ins [][]uint16) [][]uint16 {
	t.Helper()
	outs := make([][]uint16, len(ins))
	for r, in := range ins {
		outs[r] = slices.Clone(in)
	}
	must(t, fmt.Sprintf("AllReduce(bfloat16[%d])", len(ins[0])), onAll(comms, func(ctx context.Context, r int, c comm.Comm) error {
		return c.AllReduce(ctx, comm.HostBF16(outs[r]))
	}))
	return outs
}

func checkIdentical(t *testing.T, what string, outs [][]float32) {
	t.Helper()
	for r := 1; r < len(outs); r++ {
		if i := firstDiffF32(outs[r], outs[0]); i >= 0 {
			t.Fatalf("%s: rank %d [%d] = %#x, rank 0 %#x", what, r, i, math.Float32bits(outs[r][i]), math.Float32bits(outs[0][i]))
		}
	}
}

var scales = []float64{1e-3, 1e-2, 0.1, 1, 10, 100, 1000}

// randF32 returns n ranks' worth of l seeded random values with varied magnitudes.
func randF32(n, l int, seed uint64) [][]float32 {
	out := make([][]float32, n)
	for r := range out {
		rng := rand.New(rand.NewPCG(seed, uint64(r)))
		out[r] = make([]float32, l)
		for i := range out[r] {
			out[r][i] = float32(rng.NormFloat64() * scales[rng.IntN(len(scales))])
		}
	}
	return out
}

// poisonF32 returns l NaNs, so unwritten elements show.
func poisonF32(l int) comm.HostF32 {
	b := make(comm.HostF32, l)
	for i := range b {
		b[i] = float32(math.NaN())
	}
	return b
}

// firstDiffF32 is the first index where a and b differ bitwise, or -1.
func firstDiffF32(a, b []float32) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

func firstDiff(a, b []uint16) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func widen(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// roundBF16 rounds a finite f to the nearer of the two bfloat16 values around it, ties to the even
// one. It is written independently of the comm package's rounding.
func roundBF16(f float32) uint16 {
	lo := uint16(math.Float32bits(f) >> 16) // toward zero
	hi := lo + 1                            // away from zero
	dlo := math.Abs(float64(f) - float64(widen(lo)))
	dhi := math.Abs(float64(widen(hi)) - float64(f))
	if dlo < dhi || dlo == dhi && lo%2 == 0 {
		return lo
	}
	return hi
}

func closeAll(t *testing.T, comms []comm.Comm) {
	t.Helper()
	for r, c := range comms {
		if err := c.Close(); err != nil {
			t.Errorf("rank %d: Close() = %v, want nil", r, err)
		}
	}
}

// checkGoroutines waits until no more goroutines run than base.
func checkGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("%d goroutines after Close, want <= %d:\n%s", runtime.NumGoroutine(), base, buf)
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}
