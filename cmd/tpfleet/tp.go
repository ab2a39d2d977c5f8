package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/nccl"
	"github.com/tpfleet/tpfleet/shard"
)

// parallelFlags choose how a local model is split over a tensor-parallel group: N ranks as goroutines of
// this process (--tp N), or this process as one rank of N processes joined by a TCP ring (--rank R with a
// rendezvous directory, like torchrun's file store).
type parallelFlags struct {
	tp        int
	plan      string
	rank      int
	rdzv      string
	ringHost  string
	opTimeout time.Duration
}

func (f *parallelFlags) add(fs *flag.FlagSet) {
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel size")
	fs.StringVar(&f.plan, "plan", "tp", `"tp" (HF's tp_plan, vocab-parallel embedding), "ep" (expert parallel) or a JSON plan file in HF's format`)
	fs.IntVar(&f.rank, "rank", -1, "run only this rank, in a group of --tp processes that meet in --rdzv (-1: all ranks in this process)")
	fs.StringVar(&f.rdzv, "rdzv", "", "rendezvous directory shared by the processes of a group (with --rank); use a fresh one per run")
	fs.StringVar(&f.ringHost, "ring-host", "127.0.0.1", "address this rank listens on for its ring peer (with --rank)")
	fs.DurationVar(&f.opTimeout, "op-timeout", nccl.DefaultOpTimeout, "deadline of one collective (with --rank); a dead peer fails the group within it")
}

func (f *parallelFlags) check() error {
	switch {
	case f.tp < 1:
		return usagef("--tp %d must be >= 1", f.tp)
	case f.rank < -1 || f.rank >= f.tp:
		return usagef("--rank %d must be in [0, %d)", f.rank, f.tp)
	case f.rank >= 0 && f.rdzv == "":
		return usagef("--rank needs --rdzv, a directory shared by the group's processes")
	case f.opTimeout <= 0:
		return usagef("--op-timeout must be positive")
	}
	return nil
}

// resolvePlan returns a built-in plan by name ("tp", "ep") or reads a plan file.
func resolvePlan(name string) (shard.Plan, error) {
	if plan, ok := shard.NamedPlan(name); ok {
		return plan, nil
	}
	plan, err := shard.LoadPlan(name)
	if errors.Is(err, os.ErrNotExist) {
		return plan, usagef("--plan %q is not tp, ep or a plan file", name)
	}
	return plan, err
}

// group is the ranks of one TP group that this process runs, in rank order: all of them, or only its own.
type group struct {
	ranks    []*llama4.Model
	leader   bool // this process runs rank 0, which reports results
	comms    []nccl.Comm
	backends []io.Closer // GPU backends, closed after the communicators
}

// Config is the model's configuration (the same on every rank).
func (g *group) Config() llama4.Config { return g.ranks[0].Config }

// run calls f on every local rank concurrently, as the ranks of a TP group must run, and returns the first
// rank's error, or the first error of another rank when it failed alone.
func (g *group) run(f func(rank int, m *llama4.Model) error) error {
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
	for _, c := range g.comms {
		errs = append(errs, c.Close())
	}
	for _, b := range g.backends {
		errs = append(errs, b.Close())
	}
	return errors.Join(errs...)
}

// newRankOps makes the backends of this process's ranks and their communicators. On cpu each rank gets
// its own cpu backend and the communicators of groupComms. On cuda the ranks run in this process on
// GPUs 0..tp-1, joined by an in-process NCCL group (one process per rank needs the NCCL unique id in the
// rendezvous, which is not wired yet).
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
		return nil, nil, nil, usagef("--device cuda runs every rank in this process: --rank is not supported")
	}
	g := &group{leader: true}
	ops := make([]backend.Ops, f.par.tp)
	ranks := make([]int, f.par.tp)
	ctxs := make([]uintptr, f.par.tp)
	for i := range ops {
		b, err := cuda.New(cuda.Config{Device: i})
		if err != nil {
			g.Close()
			return nil, nil, nil, fmt.Errorf("rank %d: %w", i, err)
		}
		g.backends = append(g.backends, b)
		ops[i], ranks[i], ctxs[i] = b, i, b.Context()
	}
	if f.par.tp == 1 {
		g.comms = []nccl.Comm{nccl.Solo()}
		return g, ops, ranks, nil
	}
	comms, err := nccl.NewNCCLGroup(ctx, ctxs)
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	g.comms = comms
	return g, ops, ranks, nil
}

// groupComms makes this process's communicators: one per local rank.
func groupComms(ctx context.Context, f parallelFlags) ([]nccl.Comm, []int, error) {
	switch {
	case f.tp == 1:
		return []nccl.Comm{nccl.Solo()}, []int{0}, nil
	case f.rank < 0:
		ranks := make([]int, f.tp)
		for i := range ranks {
			ranks[i] = i
		}
		return nccl.NewLocalGroup(f.tp), ranks, nil
	}
	l, err := nccl.Listen(f.ringHost + ":0")
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	addrs, err := rendezvous(ctx, f.rdzv, f.rank, f.tp, l.Addr(), f.opTimeout)
	if err != nil {
		return nil, nil, err
	}
	comm, err := nccl.Connect(ctx, l, nccl.RingConfig{Rank: f.rank, Addrs: addrs, OpTimeout: f.opTimeout, DialTimeout: f.opTimeout})
	if err != nil {
		return nil, nil, err
	}
	return []nccl.Comm{comm}, []int{f.rank}, nil
}

// rendezvous publishes this rank's ring address as a file in dir and waits until every rank's is there.
func rendezvous(ctx context.Context, dir string, rank, size int, addr string, timeout time.Duration) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	name := filepath.Join(dir, "rank-"+strconv.Itoa(rank)+".addr")
	tmp := name + ".tmp"
	if err := os.WriteFile(tmp, []byte(addr), 0o644); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	if err := os.Rename(tmp, name); err != nil {
		return nil, fmt.Errorf("rendezvous: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	addrs := make([]string, size)
	for {
		missing := -1
		for r := range addrs {
			if addrs[r] != "" {
				continue
			}
			data, err := os.ReadFile(filepath.Join(dir, "rank-"+strconv.Itoa(r)+".addr"))
			if err != nil {
				missing = r
				continue
			}
			addrs[r] = strings.TrimSpace(string(data))
		}
		if missing < 0 {
			return addrs, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("rendezvous in %s: rank %d did not publish its address: %w", dir, missing, ctx.Err())
		case <-tick.C:
		}
	}
}
