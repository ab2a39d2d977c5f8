package comm

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"
)

// TestRingLargeFrames shrinks the socket buffers far below a frame, so a rank that sent its whole
// frame before receiving would deadlock with its neighbours.
func TestRingLargeFrames(t *testing.T) {
	const n, l = 3, 3 << 18 // frames of l/n float32s: 1 MiB
	rings := connect(t, n)
	for _, c := range rings {
		for _, conn := range []net.Conn{c.prev, c.next} {
			tc := conn.(*net.TCPConn)
			if err := tc.SetReadBuffer(64 << 10); err != nil {
				t.Fatal(err)
			}
			if err := tc.SetWriteBuffer(64 << 10); err != nil {
				t.Fatal(err)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	bufs := make([]HostF32, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r, c := range rings {
		bufs[r] = make(HostF32, l)
		for i := range bufs[r] {
			bufs[r][i] = float32(r*l + i)
		}
		wg.Go(func() { errs[r] = c.AllReduce(ctx, bufs[r]) })
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: AllReduce(float32[%d]) = %v", r, l, err)
		}
		for i, got := range bufs[r] {
			if want := float32(n*i + l*n*(n-1)/2); got != want {
				t.Fatalf("rank %d: AllReduce(float32[%d])[%d] = %g, want %g", r, l, i, got, want)
			}
		}
	}
}

// connect joins n ranks of a TCP ring over 127.0.0.1.
func connect(t *testing.T, n int) []*ring {
	t.Helper()
	ls := make([]*RingListener, n)
	addrs := make([]string, n)
	for r := range ls {
		l, err := Listen("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ls[r], addrs[r] = l, l.Addr()
	}
	rings := make([]*ring, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range rings {
		wg.Go(func() {
			c, err := Connect(context.Background(), ls[r], RingConfig{Rank: r, Addrs: addrs, DialTimeout: 10 * time.Second})
			if err == nil {
				rings[r] = c.(*ring)
			}
			errs[r] = err
		})
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: Connect = %v", r, err)
		}
	}
	t.Cleanup(func() {
		for _, c := range rings {
			c.Close()
		}
	})
	return rings
}
