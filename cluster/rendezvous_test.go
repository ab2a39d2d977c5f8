package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tpfleet/tpfleet/cluster"
)

func TestRendezvous(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "rdzv")
	ctx := testCtx(t)
	const epoch, group, size = 3, 1, 4

	// Every rank waits, as real ranks do, then publishes; all publish concurrently.
	var wg sync.WaitGroup
	results := make([][][]byte, size)
	errs := make([]error, size)
	for rank := range size {
		rc := newClient(t, e, "rdzv")
		wg.Go(func() {
			if err := rc.PutRendezvous(ctx, epoch, group, rank, fmt.Appendf(nil, "10.0.0.%d:2900%d", rank, rank)); err != nil {
				errs[rank] = err
				return
			}
			results[rank], errs[rank] = rc.WaitRendezvous(ctx, epoch, group, size)
		})
	}
	wg.Wait()
	for rank := range size {
		if errs[rank] != nil {
			t.Fatalf("rank %d: %v", rank, errs[rank])
		}
		for r, d := range results[rank] {
			if want := fmt.Sprintf("10.0.0.%d:2900%d", r, r); string(d) != want {
				t.Errorf("rank %d: WaitRendezvous()[%d] = %q, want %q", rank, r, d, want)
			}
		}
	}

	// A rank that never publishes: the error names it and wraps the deadline.
	for _, r := range []int{0, 2} {
		if err := c.PutRendezvous(ctx, epoch+1, 0, r, []byte{byte(r)}); err != nil {
			t.Fatalf("PutRendezvous: %v", err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err := c.WaitRendezvous(wctx, epoch+1, 0, 4)
	if !errors.Is(err, cluster.ErrRendezvousIncomplete) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "missing ranks [1 3]") {
		t.Errorf("WaitRendezvous with ranks 1 and 3 missing = %v, want ErrRendezvousIncomplete, DeadlineExceeded, naming [1 3]", err)
	}

	// Old epochs go; the named epoch and newer stay.
	if err := c.DeleteRendezvousBefore(ctx, epoch+1); err != nil {
		t.Fatalf("DeleteRendezvousBefore: %v", err)
	}
	resp, err := c.Etcd().Get(ctx, c.Prefix()+"rdzv/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, strings.TrimPrefix(string(kv.Key), c.Prefix()))
	}
	want := []string{"rdzv/00000000000000000004/0/0", "rdzv/00000000000000000004/0/2"}
	if strings.Join(keys, " ") != strings.Join(want, " ") {
		t.Errorf("keys after DeleteRendezvousBefore(%d) = %v, want %v", epoch+1, keys, want)
	}
}

// TestRendezvousWaitsForLateRank checks that WaitRendezvous blocks on a watch and returns as soon as
// the last rank publishes.
func TestRendezvousWaitsForLateRank(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "late")
	ctx := testCtx(t)
	if err := c.PutRendezvous(ctx, 1, 0, 0, []byte("nccl-id")); err != nil {
		t.Fatalf("PutRendezvous: %v", err)
	}
	type result struct {
		data [][]byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		d, err := c.WaitRendezvous(ctx, 1, 0, 2)
		done <- result{d, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("WaitRendezvous returned before rank 1 published: %v, %v", r.data, r.err)
	default:
	}
	if err := c.PutRendezvous(ctx, 1, 0, 1, []byte("ready")); err != nil {
		t.Fatalf("PutRendezvous: %v", err)
	}
	select {
	case r := <-done:
		if r.err != nil || len(r.data) != 2 || string(r.data[0]) != "nccl-id" || string(r.data[1]) != "ready" {
			t.Errorf("WaitRendezvous() = %q, %v, want [nccl-id ready]", r.data, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("WaitRendezvous did not return within 10s of the last rank publishing")
	}
	if _, err := c.WaitRendezvous(ctx, 0, 0, 1); !errors.Is(err, cluster.ErrInvalid) {
		t.Errorf("WaitRendezvous(epoch 0) = %v, want ErrInvalid", err)
	}
}
