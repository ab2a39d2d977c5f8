package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/comm/nccl"
	"github.com/tpfleet/tpfleet/model"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/shard"
)

// parallelFlags choose how a local model is split over a tensor-parallel group: N ranks as goroutines of
// this process (--tp N), or this process as one rank of N processes (--rank R with a rendezvous directory,
// like torchrun's file store) joined by a TCP ring on the CPU or by NCCL on GPUs.
type parallelFlags struct {
	tp        int
	plan      string
	rank      int
	rdzv      string
	ringHost  string
	gpu       int
	opTimeout time.Duration
}

func (f *parallelFlags) add(fs *flag.FlagSet) {
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel size")
	fs.StringVar(&f.plan, "plan", "tp", `"tp" (HF's tp_plan, vocab-parallel embedding), "ep" (expert parallel) or a JSON plan file in HF's format`)
	fs.IntVar(&f.rank, "rank", -1, "run only this rank, in a group of --tp processes that meet in --rdzv (-1: all ranks in this process)")
	fs.StringVar(&f.rdzv, "rdzv", "", "rendezvous directory shared by the processes of a group (with --rank); use a fresh one per run")
	fs.StringVar(&f.ringHost, "ring-host", "127.0.0.1", "address this rank listens on for its ring peer (with --rank, --device cpu)")
	fs.IntVar(&f.gpu, "gpu", -1, "with --device cuda: this rank's GPU with --rank (-1: the local rank, --rank mod the visible GPUs); "+
		"without, the GPU of rank 0, rank r on GPU gpu+r (-1: 0)")
	fs.DurationVar(&f.opTimeout, "op-timeout", comm.DefaultOpTimeout, "deadline of one collective, of the rendezvous and of NCCL's set-up (with --rank); a dead peer fails the group within it")
}

func (f *parallelFlags) check() error {
	switch {
	case f.tp < 1:
		return usagef("--tp %d must be >= 1", f.tp)
	case f.rank < -1 || f.rank >= f.tp:
		return usagef("--rank %d must be in [0, %d)", f.rank, f.tp)
	case f.rank >= 0 && f.rdzv == "":
		return usagef("--rank needs --rdzv, a directory shared by the group's processes")
	case f.gpu < -1:
		return usagef("--gpu %d must be >= 0 (or -1: the local rank)", f.gpu)
	case f.opTimeout <= 0:
		return usagef("--op-timeout must be positive")
	}
	return nil
}

// resolvePlan returns one of the model's built-in plans by name ("tp", "ep") or reads a plan file.
func resolvePlan(cfg model.Config, name string) (shard.Plan, error) {
	plan, err := shard.ResolvePlan(cfg, name)
	if errors.Is(err, os.ErrNotExist) {
		return plan, usagef("--%v", err)
	}
	return plan, err
}

// group is the ranks of one TP group that this process runs, in rank order: all of them, or only its own.
type group struct {
	ranks    []modelrun.Model
	leader   bool // this process runs rank 0, which reports results
	comms    []comm.Comm
	backends []io.Closer // GPU backends, closed after the communicators
}

// Info is the model's description (the same on every rank).
func (g *group) Info() model.Info { return g.ranks[0].Config().Info() }

// run calls f on every local rank concurrently, as the ranks of a TP group must run, and returns the first
// rank's error, or the first error of another rank when it failed alone.
func (g *group) run(f func(rank int, m modelrun.Model) error) error {
	if len(g.ranks) == 1 {
		return f(0, g.ranks[0])
	}
	errs := make([]error, len(g.ranks))
	var wg sync.WaitGroup
	for r, m := range g.ranks {
		wg.Go(func() { errs[r] = f(r, m) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (g *group) Close() error {
	var errs []error
	for _, b := range g.backends {
		if r, ok := b.(interface{ ReleaseGraphs() }); ok {
			r.ReleaseGraphs() // before the communicators: NCCL waits for the graphs that captured them
		}
	}
	for _, c := range g.comms {
		errs = append(errs, c.Close())
	}
	for _, b := range g.backends {
		errs = append(errs, b.Close())
	}
	return errors.Join(errs...)
}

// newRankOps makes the backends of this process's ranks and their communicators. On cpu each rank gets
// its own cpu backend and the communicators of groupComms. On cuda with every rank in this process, rank
// r runs on GPU --gpu+r, joined by an in-process NCCL group; with --rank, this process's rank runs on
// its GPU (newRankGPU) and joins the other processes' ranks through NCCL, the unique id passed through
// the rendezvous directory.
func newRankOps(ctx context.Context, f modelFlags) (*group, []backend.Ops, []int, error) {
	if f.device != "cuda" {
		comms, ranks, err := groupComms(ctx, f.par)
		if err != nil {
			return nil, nil, nil, err
		}
		ops := make([]backend.Ops, len(ranks))
		for i := range ops {
			ops[i] = cpu.New(cpu.Config{Threads: f.threads})
		}
		return &group{comms: comms, leader: ranks[0] == 0}, ops, ranks, nil
	}
	if f.par.rank >= 0 {
		return newRankGPU(ctx, f.par)
	}
	first := max(f.par.gpu, 0)
	g := &group{leader: true}
	ops := make([]backend.Ops, f.par.tp)
	ranks := make([]int, f.par.tp)
	ctxs := make([]uintptr, f.par.tp)
	for i := range ops {
		b, err := cuda.New(cuda.Config{Device: first + i})
		if err != nil {
			g.Close()
			return nil, nil, nil, fmt.Errorf("rank %d: %w", i, err)
		}
		g.backends = append(g.backends, b)
		ops[i], ranks[i], ctxs[i] = b, i, b.Context()
	}
	if f.par.tp == 1 {
		g.comms = []comm.Comm{comm.Solo()}
		return g, ops, ranks, nil
	}
	comms, err := nccl.NewGroup(ctx, ctxs)
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	g.comms = comms
	return g, ops, ranks, nil
}

// localGPU is the GPU of rank in a process of its own: --gpu, or else the local rank, rank mod the
// number of GPUs this process sees (ranks 0..n-1 of a host on GPUs 0..n-1, as torchrun's LOCAL_RANK).
// Counting the GPUs loads the CUDA libraries, so a missing one is the first error, naming it.
func localGPU(f parallelFlags) (int, error) {
	n, err := cuda.DeviceCount()
	if err != nil {
		return 0, err
	}
	switch {
	case n < 1:
		return 0, fmt.Errorf("%w: the driver sees no GPU (CUDA_VISIBLE_DEVICES=%q)", cuda.ErrUnavailable, os.Getenv("CUDA_VISIBLE_DEVICES"))
	case f.gpu >= n:
		return 0, fmt.Errorf("%w: --gpu %d: %d GPUs visible (CUDA_VISIBLE_DEVICES=%q)", cuda.ErrUnavailable, f.gpu, n, os.Getenv("CUDA_VISIBLE_DEVICES"))
	case f.gpu >= 0:
		return f.gpu, nil
	}
	return f.rank % n, nil
}

// newRankGPU opens this process's rank (--rank) on its GPU and, for --tp > 1, joins the group's NCCL
// communicator: rank 0 makes the NCCL unique id and publishes it with its rendezvous record; every
// rank waits for the others' records, takes rank 0's id and joins (nccl.Join, the GPU's context
// current). A missing CUDA or NCCL library fails first, with the error that names it.
func newRankGPU(ctx context.Context, f parallelFlags) (*group, []backend.Ops, []int, error) {
	gpu, err := localGPU(f)
	if err != nil {
		return nil, nil, nil, err
	}
	if f.tp > 1 {
		if _, _, err := nccl.Library(); err != nil { // before the GPU's set-up and the wait for peers
			return nil, nil, nil, err
		}
	}
	b, err := cuda.New(cuda.Config{Device: gpu})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("rank %d: %w", f.rank, err)
	}
	g := &group{leader: f.rank == 0, backends: []io.Closer{b}}
	if f.tp == 1 {
		g.comms = []comm.Comm{comm.Solo()}
		return g, []backend.Ops{b}, []int{f.rank}, nil
	}
	var id nccl.UniqueID
	if f.rank == 0 {
		if id, err = nccl.NewUniqueID(); err != nil {
			g.Close()
			return nil, nil, nil, fmt.Errorf("rank 0: make the NCCL unique id: %w", err)
		}
	}
	host, _ := os.Hostname()
	rec := rdzvRecord{Device: "cuda", Addr: fmt.Sprintf("%s pid %d %s", host, os.Getpid(), b.Name())}
	if f.rank == 0 {
		rec.NCCLID = &id
	}
	recs, err := rendezvous(ctx, f.rdzv, f.rank, f.tp, rec, f.opTimeout)
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	if f.rank != 0 {
		id = *recs[0].NCCLID // rendezvous checked it is there
	}
	jctx, cancel := context.WithTimeout(ctx, f.opTimeout)
	defer cancel()
	c, err := nccl.Join(jctx, nccl.Config{ID: id, Rank: f.rank, Size: f.tp, MakeCurrent: b.MakeCurrent, OpTimeout: f.opTimeout})
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	g.comms = []comm.Comm{c}
	return g, []backend.Ops{b}, []int{f.rank}, nil
}

// groupComms makes this process's communicators: one per local rank.
func groupComms(ctx context.Context, f parallelFlags) ([]comm.Comm, []int, error) {
	switch {
	case f.tp == 1:
		return []comm.Comm{comm.Solo()}, []int{0}, nil
	case f.rank < 0:
		ranks := make([]int, f.tp)
		for i := range ranks {
			ranks[i] = i
		}
		return comm.NewLocalGroup(f.tp), ranks, nil
	}
	l, err := comm.Listen(f.ringHost + ":0")
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	recs, err := rendezvous(ctx, f.rdzv, f.rank, f.tp, rdzvRecord{Device: "cpu", Addr: l.Addr()}, f.opTimeout)
	if err != nil {
		return nil, nil, err
	}
	addrs := make([]string, len(recs))
	for r, rec := range recs {
		addrs[r] = rec.Addr
	}
	c, err := comm.Connect(ctx, l, comm.RingConfig{Rank: f.rank, Addrs: addrs, OpTimeout: f.opTimeout, DialTimeout: f.opTimeout})
	if err != nil {
		return nil, nil, err
	}
	return []comm.Comm{c}, []int{f.rank}, nil
}

// rdzvRecord is what one rank publishes in the rendezvous directory.
type rdzvRecord struct {
	// Device is "cpu" or "cuda": every rank of a group must run on the same kind.
	Device string `json:"device"`
	// Addr is the rank's TCP ring address (cpu), or its host, pid and GPU (cuda: for errors and logs).
	Addr string `json:"addr"`
	// NCCLID is the group's NCCL unique id, from rank 0 on cuda (base64 in the file).
	NCCLID *nccl.UniqueID `json:"nccl_id,omitempty"`
}

// rdzvFile is the name of rank's record in the rendezvous directory.
func rdzvFile(dir string, rank int) string {
	return filepath.Join(dir, "rank-"+strconv.Itoa(rank)+".json")
}

// rendezvous publishes this rank's record as a file in dir (written to a temporary file and renamed, so
// that readers never see part of it) and waits, up to timeout, until every rank's is there. It returns
// the records in rank order, after checking that they agree: one device kind, and on cuda rank 0's
// NCCL unique id.
func rendezvous(ctx context.Context, dir string, rank, size int, rec rdzvRecord, timeout time.Duration) ([]rdzvRecord, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	if err := writeFileAtomic(rdzvFile(dir, rank), data); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	recs := make([]*rdzvRecord, size)
	for {
		missing := -1
		for r := range recs {
			if recs[r] != nil {
				continue
			}
			data, err := os.ReadFile(rdzvFile(dir, r))
			if err != nil {
				missing = r
				continue
			}
			var got rdzvRecord
			if err := json.Unmarshal(data, &got); err != nil {
				return nil, fmt.Errorf("rendezvous in %s: rank %d's record %s: %w (a directory of another run? use a fresh one per run)",
					dir, r, rdzvFile(dir, r), err)
			}
			recs[r] = &got
		}
		if missing < 0 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("rendezvous in %s: rank %d did not publish its address: %w", dir, missing, ctx.Err())
		case <-tick.C:
		}
	}
	out := make([]rdzvRecord, size)
	for r, got := range recs {
		if got.Device != rec.Device {
			return nil, fmt.Errorf("rendezvous in %s: rank %d runs on %s (%s), this rank (%d) on %s: give every rank the same --device",
				dir, r, got.Device, got.Addr, rank, rec.Device)
		}
		out[r] = *got
	}
	if rec.Device == "cuda" && out[0].NCCLID == nil {
		return nil, fmt.Errorf("rendezvous in %s: rank 0 (%s) published no NCCL unique id", dir, out[0].Addr)
	}
	return out, nil
}

// writeFileAtomic writes data to a temporary file in name's directory and renames it to name.
func writeFileAtomic(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}
