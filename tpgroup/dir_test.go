package tpgroup

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	_ "github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/comm/nccl"
)

// TestDirCarriesNCCLID: the directory rendezvous of separate rank processes hands rank 0's NCCL unique
// id to every rank (atomically written files) and every rank's record; ranks on different devices, a
// rank 0 that never publishes its id, a foreign file, a bad id and a missing rank are errors that say
// so, within the deadline.
func TestDirCarriesNCCLID(t *testing.T) {
	var f fakeID
	dir := Dir(t.TempDir())
	const size = 3
	ids := make([]nccl.UniqueID, size)
	recs := make([][]record, size)
	errs := make([]error, size)
	var wg sync.WaitGroup
	for r := range size {
		wg.Go(func() {
			time.Sleep(time.Duration(size-r) * 30 * time.Millisecond) // rank 0 last; any order works
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ids[r], recs[r], errs[r] = exchangeID(ctx, dir, r, size, record{Device: "cuda", Addr: fmt.Sprintf("host pid %d cuda:%d", 100+r, r)}, f.newID)
		})
	}
	wg.Wait()
	for r := range size {
		if errs[r] != nil {
			t.Fatalf("rank %d: %v", r, errs[r])
		}
		if ids[r] != ids[0] || ids[r] == (nccl.UniqueID{}) {
			t.Errorf("rank %d got id %v, want rank 0's %v", r, ids[r], ids[0])
		}
		for p, rec := range recs[r] {
			if want := fmt.Sprintf("host pid %d cuda:%d", 100+p, p); rec.Addr != want || rec.Device != "cuda" {
				t.Errorf("rank %d: record of rank %d = %+v, want %q on cuda", r, p, rec, want)
			}
		}
	}
	if n := f.calls.Load(); n != 1 {
		t.Errorf("newID called %d times, want 1 (rank 0 only)", n)
	}
	if tmp, _ := filepath.Glob(filepath.Join(string(dir), ".*.tmp")); len(tmp) != 0 {
		t.Errorf("temporary files left behind: %v", tmp)
	}

	write := func(name, data string) func(Dir) {
		return func(d Dir) { _ = writeFileAtomic(filepath.Join(string(d), name), []byte(data)) }
	}
	cases := []struct {
		name  string
		setup func(Dir)
		rec   record
		want  string
	}{
		{"mixed devices", write("rank-0.json", `{"device":"cpu","addr":"127.0.0.1:4000"}`),
			record{Device: "cuda", Addr: "gpu-host"}, "rank 0 runs on cpu (127.0.0.1:4000), this rank (1) on cuda"},
		{"no id", write("rank-0.json", `{"device":"cuda","addr":"gpu-host-0"}`),
			record{Device: "cuda", Addr: "gpu-host-1"}, "rank 0 did not publish the NCCL unique id"},
		{"foreign file", write("rank-0.json", "127.0.0.1:4000"), record{Device: "cpu", Addr: "127.0.0.1:4001"}, "use a fresh one per run"},
		{"bad id", func(d Dir) {
			write("rank-0.json", `{"device":"cuda","addr":"x"}`)(d)
			write("nccl-id", "AAAA")(d)
		}, record{Device: "cuda", Addr: "y"}, "invalid unique id"},
		{"missing rank", func(Dir) {}, record{Device: "cuda", Addr: "y"}, "rank 0 did not publish its address"},
	}
	for _, tc := range cases {
		d := Dir(t.TempDir())
		tc.setup(d)
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		_, _, err := exchangeID(ctx, d, 1, 2, tc.rec, f.newID)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: exchangeID = %v, want an error with %q", tc.name, err, tc.want)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s: exchangeID took %v", tc.name, d)
		}
	}
}

// TestJoinRingOverDir: CPU ranks (no device context) join the TCP ring through a directory, and their
// all-reduce sums across ranks; Local makes an in-process group of the same kind.
func TestJoinRingOverDir(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := Dir(t.TempDir())
	const size = 3
	errs := make([]error, size)
	var wg sync.WaitGroup
	for r := range size {
		wg.Go(func() {
			ops, err := backend.Open(ctx, "cpu", backend.Options{Threads: 1})
			if err != nil {
				errs[r] = err
				return
			}
			c, err := Join(ctx, dir, r, size, ops, Options{Device: "cpu", OpTimeout: 10 * time.Second})
			if err != nil {
				errs[r] = err
				return
			}
			defer c.Close()
			x, _ := ops.FromFloat32([]int{1, 2}, []float32{float32(r), 1})
			if err := ops.AllReduce(ctx, c, x); err != nil {
				errs[r] = err
				return
			}
			if got, _ := ops.Float32(x); got[0] != 3 || got[1] != size {
				errs[r] = fmt.Errorf("rank %d: all-reduce = %v, want [3 %d]", r, got, size)
			}
		})
	}
	wg.Wait()
	for r, err := range errs {
		if err != nil {
			t.Errorf("rank %d: %v", r, err)
		}
	}
	ops, _ := backend.Open(ctx, "cpu", backend.Options{})
	comms, err := Local(ctx, []backend.Ops{ops, ops})
	if err != nil || len(comms) != 2 || comms[1].Rank() != 1 {
		t.Errorf("Local(2 cpu) = %v, %v; want 2 in-process ranks", comms, err)
	}
	if c, err := Join(ctx, dir, 0, 1, ops, Options{}); err != nil || c.Size() != 1 {
		t.Errorf("Join(size 1) = %v, %v; want Solo", c, err)
	}
}
