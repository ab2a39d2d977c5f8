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

// ncclID is a fake 128-byte NCCL unique id (NCCL itself cannot run here): opaque bytes, zeros
// included.
func ncclID(seed byte) []byte {
	id := make([]byte, 128)
	for i := range id {
		id[i] = seed + byte(i)
	}
	id[7] = 0
	return id
}

// TestNCCLID: rank 0 publishes a group's id under nccl/<epoch>/<group>; the other ranks, already
// waiting, all get exactly those bytes; other groups and epochs are apart; a later put replaces the id;
// DeleteRendezvousBefore removes the ids of old epochs with their rendezvous data.
func TestNCCLID(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "nccl")
	ctx := testCtx(t)
	const epoch, group, waiters = 5, 2, 3

	var wg sync.WaitGroup
	got := make([][]byte, waiters)
	errs := make([]error, waiters)
	for r := range waiters {
		rc := newClient(t, e, "nccl")
		wg.Go(func() { got[r], errs[r] = rc.WaitNCCLID(ctx, epoch, group) })
	}
	// Another group's and another epoch's ids are not this group's.
	if err := c.PutNCCLID(ctx, epoch, group+1, ncclID(1), 0); err != nil {
		t.Fatalf("PutNCCLID: %v", err)
	}
	if err := c.PutNCCLID(ctx, epoch-1, group, ncclID(2), 0); err != nil {
		t.Fatalf("PutNCCLID: %v", err)
	}
	want := ncclID(3)
	if err := c.PutNCCLID(ctx, epoch, group, want, time.Minute); err != nil {
		t.Fatalf("PutNCCLID: %v", err)
	}
	wg.Wait()
	for r := range waiters {
		if errs[r] != nil || string(got[r]) != string(want) {
			t.Errorf("waiter %d: WaitNCCLID() = %d bytes (equal %v), %v; want the published id", r, len(got[r]), string(got[r]) == string(want), errs[r])
		}
	}

	// Published already: returned at once. Published again: the new id.
	if err := c.PutNCCLID(ctx, epoch, group, ncclID(4), 0); err != nil {
		t.Fatalf("PutNCCLID again: %v", err)
	}
	if id, err := c.WaitNCCLID(ctx, epoch, group); err != nil || string(id) != string(ncclID(4)) {
		t.Errorf("WaitNCCLID after a second put = %v, equal %v; want the second id", err, string(id) == string(ncclID(4)))
	}

	// The key, as etcdctl lists it, holds the raw bytes.
	resp, err := c.Etcd().Get(ctx, c.Prefix()+"nccl/", clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	keys := map[string][]byte{}
	for _, kv := range resp.Kvs {
		keys[strings.TrimPrefix(string(kv.Key), c.Prefix())] = kv.Value
	}
	if v := keys["nccl/00000000000000000005/2"]; string(v) != string(ncclID(4)) || len(keys) != 3 {
		t.Errorf("nccl keys = %d keys, nccl/00000000000000000005/2 = %d bytes; want 3 keys and the raw id", len(keys), len(v))
	}

	// Epochs below 5 go; epoch 5's ids stay.
	if err := c.PutRendezvous(ctx, epoch-1, group, 0, []byte("ready")); err != nil {
		t.Fatalf("PutRendezvous: %v", err)
	}
	if err := c.DeleteRendezvousBefore(ctx, epoch); err != nil {
		t.Fatalf("DeleteRendezvousBefore: %v", err)
	}
	resp, err = c.Etcd().Get(ctx, c.Prefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	var left []string
	for _, kv := range resp.Kvs {
		left = append(left, strings.TrimPrefix(string(kv.Key), c.Prefix()))
	}
	if w := []string{"nccl/00000000000000000005/2", "nccl/00000000000000000005/3"}; strings.Join(left, " ") != strings.Join(w, " ") {
		t.Errorf("keys after DeleteRendezvousBefore(%d) = %v, want %v", epoch, left, w)
	}
}

// TestNCCLIDErrors: a wait whose id never comes fails at its deadline naming what is missing, instead of
// hanging; a closed client fails with ErrClosed; bad arguments are ErrInvalid.
func TestNCCLIDErrors(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "nccl-errors")
	ctx := testCtx(t)
	wctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.WaitNCCLID(wctx, 7, 1)
	if !errors.Is(err, cluster.ErrRendezvousIncomplete) || !errors.Is(err, context.DeadlineExceeded) ||
		!strings.Contains(err.Error(), "rank 0 did not publish") || !strings.Contains(err.Error(), "epoch 7 group 1") {
		t.Errorf("WaitNCCLID with no id = %v, want ErrRendezvousIncomplete, DeadlineExceeded, naming rank 0, epoch and group", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("WaitNCCLID took %v past a 300ms deadline", d)
	}

	for name, err := range map[string]error{
		"epoch 0":      c.PutNCCLID(ctx, 0, 0, ncclID(0), 0),
		"group -1":     c.PutNCCLID(ctx, 1, -1, ncclID(0), 0),
		"empty id":     c.PutNCCLID(ctx, 1, 0, nil, 0),
		"negative ttl": c.PutNCCLID(ctx, 1, 0, ncclID(0), -time.Second),
	} {
		if !errors.Is(err, cluster.ErrInvalid) {
			t.Errorf("PutNCCLID with %s = %v, want ErrInvalid", name, err)
		}
	}
	if _, err := c.WaitNCCLID(ctx, 0, 0); !errors.Is(err, cluster.ErrInvalid) {
		t.Errorf("WaitNCCLID(epoch 0) = %v, want ErrInvalid", err)
	}

	closing := newClient(t, e, "nccl-errors")
	done := make(chan error, 1)
	go func() {
		_, err := closing.WaitNCCLID(ctx, 8, 0)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let it start waiting; it fails either way
	_ = closing.Close()
	select {
	case err := <-done:
		if !errors.Is(err, cluster.ErrClosed) {
			t.Errorf("WaitNCCLID on a closed client = %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitNCCLID did not return within 10s of Close")
	}
}

// TestNCCLIDLease: an id put with a TTL disappears by itself after it, so a crashed group leaves no id
// behind for anyone to reuse, even when no coordinator cleans up.
func TestNCCLIDLease(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "nccl-lease")
	ctx := testCtx(t)
	if err := c.PutNCCLID(ctx, 1, 0, ncclID(9), time.Second); err != nil {
		t.Fatalf("PutNCCLID: %v", err)
	}
	if id, err := c.WaitNCCLID(ctx, 1, 0); err != nil || len(id) != 128 {
		t.Fatalf("WaitNCCLID = %d bytes, %v; want the id while its lease lives", len(id), err)
	}
	eventually(t, 10*time.Second, func() error {
		resp, err := c.Etcd().Get(ctx, c.Prefix()+"nccl/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return err
		}
		if resp.Count != 0 {
			return fmt.Errorf("%d nccl keys left", resp.Count)
		}
		return nil
	})
}
