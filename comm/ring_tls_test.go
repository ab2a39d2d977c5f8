package comm_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
)

// rankCert is a rank's certificate: file of set.
type rankCert struct {
	set  securitytest.Set
	file string
}

// connectTLS connects a ring of len(certs) ranks, rank r with certificate certs[r], the listeners
// admitting only workers (security.PeerServerConfig), and returns each rank's Comm and error.
func connectTLS(t *testing.T, certs []rankCert) ([]comm.Comm, []error) {
	t.Helper()
	n := len(certs)
	ls := make([]*comm.RingListener, n)
	addrs := make([]string, n)
	for r := range n {
		l, err := comm.Listen("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = l.Close() })
		ls[r], addrs[r] = l, l.Addr()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cs, errs := make([]comm.Comm, n), make([]error, n)
	var wg sync.WaitGroup
	for r := range n {
		tl := certs[r].set.Load(t, certs[r].file)
		cfg := comm.RingConfig{Rank: r, Addrs: addrs, DialTimeout: 3 * time.Second,
			ServerTLS: tl.PeerServerConfig(security.RoleWorker), ClientTLS: tl.ClientConfig(security.RoleWorker)}
		wg.Go(func() { cs[r], errs[r] = comm.Connect(ctx, ls[r], cfg) })
	}
	wg.Wait()
	for _, c := range cs {
		if c != nil {
			t.Cleanup(func() { _ = c.Close() })
		}
	}
	return cs, errs
}

// TestRingTLS: ranks with workers' certificates connect over TLS and all-reduce; a rank whose
// certificate is not a worker's (a client's), or is a worker's of another CA, is refused by its
// neighbours, so the ring does not form.
func TestRingTLS(t *testing.T) {
	set, other := securitytest.Certs(t), securitytest.Certs(t)
	cs, errs := connectTLS(t, []rankCert{{set, "worker"}, {set, "worker"}, {set, "node"}})
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: Connect over TLS: %v", r, err)
		}
	}
	bufs := []comm.HostF32{{1, 2}, {10, 20}, {100, 200}}
	var wg sync.WaitGroup
	rerrs := make([]error, len(cs))
	for r, c := range cs {
		wg.Go(func() { rerrs[r] = c.AllReduce(t.Context(), bufs[r]) })
	}
	wg.Wait()
	for r := range cs {
		if rerrs[r] != nil || bufs[r][0] != 111 || bufs[r][1] != 222 {
			t.Errorf("rank %d: AllReduce = %v, %v; want [111 222]", r, bufs[r], rerrs[r])
		}
	}

	for name, stranger := range map[string]rankCert{"a client certificate": {set, "client"}, "another CA's worker": {other, "worker"}} {
		_, errs = connectTLS(t, []rankCert{{set, "worker"}, stranger})
		for r, err := range errs {
			if err == nil {
				t.Errorf("%s in the ring: rank %d: Connect = nil, want refused", name, r)
			}
		}
	}
}
