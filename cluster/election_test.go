package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tpfleet/tpfleet/cluster"
)

// campaign runs Campaign in a goroutine and returns a channel for its result.
func campaign(ctx context.Context, c *cluster.Client, id string, ttl time.Duration) <-chan *cluster.Leadership {
	ch := make(chan *cluster.Leadership, 1)
	go func() {
		l, err := c.Campaign(ctx, id, ttl)
		if err != nil {
			l = nil
		}
		ch <- l
	}()
	return ch
}

// waitCampaigners waits until n campaign keys exist under leader/.
func waitCampaigners(t *testing.T, c *cluster.Client, n int) {
	t.Helper()
	eventually(t, 10*time.Second, func() error {
		resp, err := c.Etcd().Get(context.Background(), c.Prefix()+"leader/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if resp.Count != int64(n) {
			return fmt.Errorf("%d campaign keys, want %d", resp.Count, n)
		}
		return nil
	})
}

func wantLeader(t *testing.T, c *cluster.Client, want string) {
	t.Helper()
	id, ok, err := c.Leader(testCtx(t))
	if err != nil || !ok || id != want {
		t.Fatalf("Leader() = %q, %v, %v, want %q", id, ok, err, want)
	}
}

func TestElection(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	ctx := testCtx(t)
	ca, cb, cc := newClient(t, e, "elect"), newClient(t, e, "elect"), newClient(t, e, "elect")
	const ttl = time.Second

	if _, ok, err := ca.Leader(ctx); ok || err != nil {
		t.Fatalf("Leader() before any campaign = _, %v, %v, want false, nil", ok, err)
	}
	la, err := ca.Campaign(ctx, "coord-a", ttl)
	if err != nil {
		t.Fatalf("Campaign(coord-a): %v", err)
	}
	wantLeader(t, cb, "coord-a")
	if err := la.PutPlan(ctx, testPlan(1, 1, 1), 0); err != nil {
		t.Fatalf("leader's PutPlan: %v", err)
	}

	// b waits behind a.
	bch := campaign(ctx, cb, "coord-b", ttl)
	waitCampaigners(t, ca, 2)
	select {
	case <-bch:
		t.Fatalf("Campaign(coord-b) returned while coord-a leads")
	default:
	}

	// a resigns: b leads at once, a's leadership is done, and a's writes are fenced off.
	if err := la.Resign(ctx); err != nil {
		t.Fatalf("Resign(coord-a): %v", err)
	}
	if err := la.Resign(ctx); err != nil {
		t.Errorf("second Resign = %v, want nil", err)
	}
	var lb *cluster.Leadership
	select {
	case lb = <-bch:
		if lb == nil {
			t.Fatalf("Campaign(coord-b) failed")
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("coord-b not leading within 10s of coord-a resigning")
	}
	select {
	case <-la.Done():
	default:
		t.Errorf("coord-a's Done() open after Resign")
	}
	wantLeader(t, ca, "coord-b")
	if err := la.PutPlan(ctx, testPlan(2, 1, 1), 1); !errors.Is(err, cluster.ErrNotLeader) {
		t.Errorf("resigned leader's PutPlan = %v, want ErrNotLeader", err)
	}
	if err := lb.PutPlan(ctx, testPlan(2, 1, 1), 1); err != nil {
		t.Errorf("new leader's PutPlan: %v", err)
	}

	// b's process dies (its client closes without resigning): c takes over after b's lease expires.
	cch := campaign(ctx, cc, "coord-c", ttl)
	waitCampaigners(t, ca, 2)
	start := time.Now()
	if err := cb.Close(); err != nil {
		t.Fatalf("Close(b's client): %v", err)
	}
	select {
	case <-lb.Done():
	default:
		t.Errorf("coord-b's Done() open after its client closed")
	}
	select {
	case lc := <-cch:
		if lc == nil {
			t.Fatalf("Campaign(coord-c) failed")
		}
		t.Logf("coord-c leads %v after coord-b's client closed (TTL %v)", time.Since(start).Round(time.Millisecond), ttl)
		wantLeader(t, ca, "coord-c")
	case <-time.After(ttl + 5*time.Second):
		t.Fatalf("coord-c not leading within TTL+5s of coord-b's client closing")
	}
}

// TestLeadershipLostOnKeyDelete checks that a leader notices when its key disappears behind its back.
func TestLeadershipLostOnKeyDelete(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "lost")
	ctx := testCtx(t)
	l, err := c.Campaign(ctx, "coord", 5*time.Second)
	if err != nil {
		t.Fatalf("Campaign: %v", err)
	}
	if _, err := c.Etcd().Delete(ctx, l.Key()); err != nil {
		t.Fatalf("Delete(%s): %v", l.Key(), err)
	}
	select {
	case <-l.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("Done() not closed within 10s of the leader key's deletion")
	}
	if err := l.PutPlan(ctx, testPlan(1, 1, 1), 0); !errors.Is(err, cluster.ErrNotLeader) {
		t.Errorf("PutPlan after losing the key = %v, want ErrNotLeader", err)
	}
	if err := l.Resign(ctx); err != nil {
		t.Errorf("Resign after loss = %v, want nil", err)
	}
}

func TestCampaignContextEnds(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	ca, cb := newClient(t, e, "ctx"), newClient(t, e, "ctx")
	ctx := testCtx(t)
	if _, err := ca.Campaign(ctx, "coord-a", 5*time.Second); err != nil {
		t.Fatalf("Campaign(coord-a): %v", err)
	}
	bctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if l, err := cb.Campaign(bctx, "coord-b", 5*time.Second); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Campaign(coord-b) behind a leader = %v, %v, want DeadlineExceeded", l, err)
	}
	waitCampaigners(t, ca, 1) // coord-b's key is gone again
	wantLeader(t, cb, "coord-a")
}
