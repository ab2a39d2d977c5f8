package tpgroup

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/comm/nccl"
)

// The NCCL id exchange of GPU workers (Join through cluster.Rendezvous), against a real embedded etcd.
// NCCL cannot run here: rank 0's id comes from a fake newID, and the test checks what every rank would
// pass to nccl.Join.

func startTestEtcd(t *testing.T) *cluster.Embedded {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: t.TempDir(), ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0",
		Logger: zap.NewNop(), UnsafeNoFsync: true})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func testClient(t *testing.T, e *cluster.Embedded) *cluster.Client {
	t.Helper()
	c, err := cluster.New(t.Context(), cluster.Config{Endpoints: e.Endpoints(), Cluster: "gpu", Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("cluster.New: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// fakeID returns distinct fake ids and counts the calls.
type fakeID struct{ calls atomic.Int32 }

func (f *fakeID) newID() (nccl.UniqueID, error) {
	n := f.calls.Add(1)
	var id nccl.UniqueID
	for i := range id {
		id[i] = byte(int(n)*31 + i)
	}
	return id, nil
}

// TestNCCLExchange: the ranks of a group, started in any order (rank 0 last here), all get the one id
// rank 0 made, and each other's marks; rank 0 makes exactly one id; the id is in etcd under the
// group's key with a lease; a new epoch gets a new id, never the old one.
func TestNCCLExchange(t *testing.T) {
	e := startTestEtcd(t)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	const size = 4
	var f fakeID
	run := func(epoch int64) []nccl.UniqueID {
		ids := make([]nccl.UniqueID, size)
		errs := make([]error, size)
		var wg sync.WaitGroup
		for rank := size - 1; rank >= 0; rank-- {
			cli := testClient(t, e)
			wg.Go(func() {
				var peers []record
				ids[rank], peers, errs[rank] = exchangeID(ctx, cli.Rendezvous(epoch, 1, time.Minute), rank, size,
					record{Device: "gpu", Addr: fmt.Sprintf("w%d cuda:%d", rank, rank)}, f.newID)
				for r, p := range peers {
					if want := fmt.Sprintf("w%d cuda:%d", r, r); p.Addr != want && errs[rank] == nil {
						errs[rank] = fmt.Errorf("peer %d's mark %q, want %q", r, p, want)
					}
				}
			})
			time.Sleep(20 * time.Millisecond) // ranks arrive one by one, rank 0 last; any order works
		}
		wg.Wait()
		for rank, err := range errs {
			if err != nil {
				t.Fatalf("epoch %d rank %d: %v", epoch, rank, err)
			}
		}
		return ids
	}

	ids := run(1)
	for rank, id := range ids {
		if id != ids[0] || id == (nccl.UniqueID{}) {
			t.Errorf("epoch 1: rank %d got another id than rank 0", rank)
		}
	}
	if n := f.calls.Load(); n != 1 {
		t.Errorf("newID called %d times for one group, want 1 (rank 0 only)", n)
	}
	cli := testClient(t, e)
	resp, err := cli.Etcd().Get(ctx, cli.Prefix()+"nccl/00000000000000000001/1")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != string(ids[0][:]) || resp.Kvs[0].Lease == 0 {
		t.Errorf("nccl/00000000000000000001/1 in etcd = %v, %v; want the raw id under a lease", resp.Kvs, err)
	}

	// The next epoch: a fresh id, never the old epoch's, even though that one is still in etcd.
	next := run(2)
	if next[0] == ids[0] {
		t.Errorf("epoch 2 reused epoch 1's id")
	}
	for rank, id := range next {
		if id != next[0] {
			t.Errorf("epoch 2: rank %d got another id than rank 0", rank)
		}
	}
	if err := cli.DeleteRendezvousBefore(ctx, 2); err != nil {
		t.Fatal(err)
	}
	resp, err = cli.Etcd().Get(ctx, cli.Prefix()+"nccl/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil || len(resp.Kvs) != 1 || !strings.HasSuffix(string(resp.Kvs[0].Key), "nccl/00000000000000000002/1") {
		t.Errorf("nccl keys after DeleteRendezvousBefore(2) = %v, %v; want epoch 2's only", resp.Kvs, err)
	}
}

// TestNCCLExchangeFailures: a rank whose peer never comes fails at its deadline naming the missing rank;
// a rank whose rank 0 never publishes the id fails naming it; rank 0's failure to make an id is
// reported, not published; a corrupt id in etcd is rejected.
func TestNCCLExchangeFailures(t *testing.T) {
	e := startTestEtcd(t)
	cli := testClient(t, e)
	var f fakeID

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, _, err := exchangeID(ctx, cli.Rendezvous(1, 0, time.Minute), 0, 2, record{Device: "gpu", Addr: "w0"}, f.newID)
	if !errors.Is(err, cluster.ErrRendezvousIncomplete) || !strings.Contains(err.Error(), "missing ranks [1]") {
		t.Errorf("rank 0 without rank 1 = %v, want ErrRendezvousIncomplete naming rank 1", err)
	}
	if f.calls.Load() != 0 {
		t.Errorf("rank 0 made an id before its peers came")
	}

	// Rank 0 marked itself ready (above) but never publishes an id: rank 1 fails naming it.
	ctx, cancel = context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, _, err = exchangeID(ctx, cli.Rendezvous(1, 0, time.Minute), 1, 2, record{Device: "gpu", Addr: "w1"}, f.newID)
	if !errors.Is(err, cluster.ErrRendezvousIncomplete) || !strings.Contains(err.Error(), "rank 0 did not publish the NCCL unique id") {
		t.Errorf("rank 1 without rank 0's id = %v, want ErrRendezvousIncomplete naming rank 0's id", err)
	}

	// newID fails on rank 0 (no NCCL): the error says so, and nothing is published.
	bad := func() (nccl.UniqueID, error) { return nccl.UniqueID{}, nccl.ErrUnavailable }
	ctx2, cancel2 := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel2()
	_, _, err = exchangeID(ctx2, cli.Rendezvous(2, 0, time.Minute), 0, 1, record{Device: "gpu", Addr: "w0"}, bad)
	if !errors.Is(err, nccl.ErrUnavailable) || !strings.Contains(err.Error(), "make the NCCL unique id") {
		t.Errorf("rank 0 with a failing newID = %v, want it wrapped", err)
	}
	resp, err := cli.Etcd().Get(ctx2, cli.Prefix()+"nccl/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 0 {
		t.Errorf("nccl keys after a failed newID = %v, %v; want none", resp.Count, err)
	}

	// An id of the wrong size in etcd (written by something else) is refused.
	if err := cli.PutNCCLID(ctx2, 3, 0, []byte("short"), 0); err != nil {
		t.Fatal(err)
	}
	if err := cli.PutRendezvous(ctx2, 3, 0, 0, []byte(`{"device":"gpu","addr":"w0"}`)); err != nil {
		t.Fatal(err)
	}
	_, _, err = exchangeID(ctx2, cli.Rendezvous(3, 0, time.Minute), 1, 2, record{Device: "gpu", Addr: "w1"}, f.newID)
	if !errors.Is(err, nccl.ErrInvalidUniqueID) {
		t.Errorf("rank 1 reading a 5-byte id = %v, want ErrInvalidUniqueID", err)
	}
}
