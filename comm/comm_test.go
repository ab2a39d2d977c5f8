package comm_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/comm"
)

func TestOpErrorString(t *testing.T) {
	for _, tc := range []struct {
		err  *comm.OpError
		want string
	}{
		{&comm.OpError{Rank: 1, Op: "all-reduce", Peer: 0, Addr: "127.0.0.1:40123", Action: "recv from", Err: io.EOF},
			"comm: rank 1: all-reduce: recv from rank 0 (127.0.0.1:40123): EOF"},
		{&comm.OpError{Rank: 0, Op: "barrier", Peer: 2, Action: "wait for", Err: context.Canceled},
			"comm: rank 0: barrier: wait for rank 2: context canceled"},
		{&comm.OpError{Rank: 3, Op: "broadcast", Peer: -1, Err: comm.ErrClosed},
			"comm: rank 3: broadcast: communicator closed"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("(%#v).Error() = %q, want %q", tc.err, got, tc.want)
		}
	}
}

func TestRingConfigValidate(t *testing.T) {
	two := []string{"127.0.0.1:1", "127.0.0.1:2"}
	for _, tc := range []struct {
		cfg  comm.RingConfig
		want string // a substring of the error; "" for none
	}{
		{comm.RingConfig{Rank: 1, Addrs: two}, ""},
		{comm.RingConfig{Rank: 0, Addrs: []string{""}}, ""},
		{comm.RingConfig{Rank: 0}, "no addresses"},
		{comm.RingConfig{Rank: 2, Addrs: two}, "rank 2 outside 0..1"},
		{comm.RingConfig{Rank: -1, Addrs: two}, "rank -1 outside"},
		{comm.RingConfig{Rank: 0, Addrs: two, OpTimeout: -time.Second}, "negative op timeout"},
		{comm.RingConfig{Rank: 0, Addrs: two, DialTimeout: -time.Second}, "negative dial timeout"},
		{comm.RingConfig{Rank: 0, Addrs: []string{"127.0.0.1:1", "nohost"}}, "address of rank 1"},
	} {
		err := tc.cfg.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("(%+v).Validate() = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

func TestConnectOneRank(t *testing.T) {
	c, err := comm.Connect(context.Background(), nil, comm.RingConfig{Addrs: []string{""}})
	if err != nil {
		t.Fatalf("Connect(one rank) = %v, want nil", err)
	}
	defer c.Close()
	if c.Rank() != 0 || c.Size() != 1 {
		t.Errorf("Connect(one rank): Rank(), Size() = %d, %d, want 0, 1", c.Rank(), c.Size())
	}
}

// TestConnectWrongPeer connects two ranks that disagree on the world size: both must fail with an
// error that says what they found.
func TestConnectWrongPeer(t *testing.T) {
	l0, l1 := listen(t), listen(t)
	cfgs := []comm.RingConfig{
		{Rank: 0, Addrs: []string{l0.Addr(), l1.Addr()}, DialTimeout: 2 * time.Second},
		{Rank: 1, Addrs: []string{l0.Addr(), l1.Addr(), l0.Addr()}, DialTimeout: 2 * time.Second},
	}
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for r, l := range []*comm.RingListener{l0, l1} {
		wg.Go(func() {
			c, err := comm.Connect(context.Background(), l, cfgs[r])
			if err == nil {
				c.Close()
			}
			errs[r] = err
		})
	}
	wg.Wait()
	// Both must fail. Which handshake each side sees fail first depends on timing (rank 1 meets rank 0
	// both as its predecessor and at the address it takes for rank 2, and a side whose peer gave up may
	// only see its dial time out), but at least one error must say what was found: the other world size.
	named := false
	for r, err := range errs {
		if err == nil {
			t.Errorf("rank %d: Connect(%+v) succeeded with a peer of another world size", r, cfgs[r])
			continue
		}
		if strings.Contains(err.Error(), "wrong peer") && strings.Contains(err.Error(), "of 2") && strings.Contains(err.Error(), "of 3") {
			named = true
		}
	}
	if !named {
		t.Errorf("no error names the mismatch: %v; %v", errs[0], errs[1])
	}
}

// TestConnectNoPeer connects a rank whose peer never comes: it must fail within DialTimeout, naming
// the peer it waited for.
func TestConnectNoPeer(t *testing.T) {
	l0, l1 := listen(t), listen(t)
	cfg := comm.RingConfig{Rank: 0, Addrs: []string{l0.Addr(), l1.Addr()}, DialTimeout: 200 * time.Millisecond}
	start := time.Now()
	c, err := comm.Connect(context.Background(), l0, cfg)
	if err == nil {
		c.Close()
	}
	want := fmt.Sprintf("rank 1 (%s)", l1.Addr())
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), want) {
		t.Errorf("Connect(%+v) = %v, want %v naming %q", cfg, err, context.DeadlineExceeded, want)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Connect(%+v) took %v, want about %v", cfg, d, cfg.DialTimeout)
	}
}

func TestListenerClose(t *testing.T) {
	l, err := comm.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen(127.0.0.1:0) = %v", err)
	}
	for i := range 2 {
		if err := l.Close(); err != nil {
			t.Errorf("Close() #%d = %v, want nil", i+1, err)
		}
	}
}

func listen(t *testing.T) *comm.RingListener {
	t.Helper()
	l, err := comm.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen(127.0.0.1:0) = %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}
