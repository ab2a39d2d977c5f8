package comm_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/commtest"
)

func TestLocalGroupConformance(t *testing.T) {
	commtest.Run(t, func(t *testing.T, n int) []comm.Comm { return comm.NewLocalGroup(n) })
}

func TestRingConformance(t *testing.T) {
	commtest.Run(t, newRing)
}

// newRing connects n ranks of a TCP ring over 127.0.0.1, each in its own goroutine.
func newRing(t *testing.T, n int) []comm.Comm {
	t.Helper()
	ls := make([]*comm.RingListener, n)
	addrs := make([]string, n)
	for r := range ls {
		l, err := comm.Listen("127.0.0.1:0")
		if err != nil {
			t.Fatalf("Listen(127.0.0.1:0) = %v", err)
		}
		defer l.Close()
		ls[r], addrs[r] = l, l.Addr()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	comms := make([]comm.Comm, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for r := range comms {
		wg.Go(func() {
			comms[r], errs[r] = comm.Connect(ctx, ls[r], comm.RingConfig{Rank: r, Addrs: addrs, OpTimeout: 20 * time.Second})
		})
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: Connect(%v) = %v", r, addrs, err)
		}
	}
	t.Cleanup(func() {
		for _, c := range comms {
			c.Close()
		}
	})
	return comms
}
