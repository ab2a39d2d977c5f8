package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/shard"
	"github.com/tpfleet/tpfleet/tpgroup"
)

// parallelFlags choose how a local model is split over a tensor-parallel group: N ranks as goroutines of
// this process (--tp N), or this process as one rank of N processes (--rank R with a rendezvous directory,
// like torchrun's file store, tpgroup.Dir) joined by a TCP ring on the CPU or by NCCL on GPUs.
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
	backends []backend.Ops // closed (those that are io.Closers) after the communicators
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
		if r, ok := b.(backend.GraphReporter); ok {
			r.ReleaseGraphs() // before the communicators: NCCL waits for the graphs that captured them
		}
	}
	for _, c := range g.comms {
		errs = append(errs, c.Close())
	}
	for _, b := range g.backends {
		if c, ok := b.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// newRankOps opens the backends of this process's ranks (registry name --device) and their
// communicators. With every rank in this process, rank r opens device --gpu+r (devices of backends that
// have them; cpu ranks share the host's cores) and the ranks make an in-process group (tpgroup.Local:
// NCCL on device backends, else comm.NewLocalGroup); with --rank, this process's rank opens its device
// (localDevice) and joins the other processes' ranks through the rendezvous directory (tpgroup.Join).
func newRankOps(ctx context.Context, f modelFlags) (*group, []backend.Ops, []int, error) {
	if f.par.rank >= 0 {
		return newRankProcess(ctx, f)
	}
	first := max(f.par.gpu, 0)
	g := &group{leader: true}
	ops := make([]backend.Ops, f.par.tp)
	ranks := make([]int, f.par.tp)
	for i := range ops {
		b, err := openRank(ctx, f, first+i)
		if err != nil {
			g.Close()
			return nil, nil, nil, fmt.Errorf("rank %d: %w", i, err)
		}
		g.backends = append(g.backends, b)
		ops[i], ranks[i] = b, i
	}
	comms, err := tpgroup.Local(ctx, ops)
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	g.comms = comms
	return g, ops, ranks, nil
}

// openRank opens --device on device index (ignored by backends without devices).
func openRank(ctx context.Context, f modelFlags, device int) (backend.Ops, error) {
	return backend.Open(ctx, f.device, backend.Options{Device: device, Threads: f.threads, Config: f.backendConfig[f.device]})
}

// localDevice is the device of rank in a process of its own, for backends with devices: --gpu, or else
// the local rank, rank mod the number of devices this process sees (ranks 0..n-1 of a host on devices
// 0..n-1, as torchrun's LOCAL_RANK). Counting the devices loads the backend's libraries, so a missing
// one is the first error, naming it. Backends without devices get 0.
func localDevice(device string, f parallelFlags) (int, error) {
	if !backend.HasDevices(device) {
		return 0, nil
	}
	n, err := backend.DeviceCount(device)
	if err != nil {
		return 0, err
	}
	switch {
	case n < 1:
		return 0, fmt.Errorf("%w: %s: no device visible (CUDA_VISIBLE_DEVICES=%q)", backend.ErrUnavailable, device, os.Getenv("CUDA_VISIBLE_DEVICES"))
	case f.gpu >= n:
		return 0, fmt.Errorf("%w: --gpu %d: %d %s devices visible (CUDA_VISIBLE_DEVICES=%q)", backend.ErrUnavailable, f.gpu, n, device, os.Getenv("CUDA_VISIBLE_DEVICES"))
	case f.gpu >= 0:
		return f.gpu, nil
	}
	return f.rank % n, nil
}

// newRankProcess opens this process's rank (--rank) on its device and joins the group's other processes
// through the rendezvous directory --rdzv (tpgroup.Join: the TCP ring on --ring-host, or NCCL on a device
// backend, rank 0's unique id passed through the directory). --op-timeout bounds the meeting and the
// communicator's set-up. A missing library fails first, with the error that names it.
func newRankProcess(ctx context.Context, f modelFlags) (*group, []backend.Ops, []int, error) {
	dev, err := localDevice(f.device, f.par)
	if err != nil {
		return nil, nil, nil, err
	}
	if d, _ := backend.Lookup(f.device); d.DeviceComm && f.par.tp > 1 {
		if err := tpgroup.CheckDeviceComm(); err != nil { // before the device's set-up and the wait for peers
			return nil, nil, nil, err
		}
	}
	b, err := openRank(ctx, f, dev)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("rank %d: %w", f.par.rank, err)
	}
	g := &group{leader: f.par.rank == 0, backends: []backend.Ops{b}}
	host, _ := os.Hostname()
	jctx, cancel := context.WithTimeout(ctx, f.par.opTimeout)
	defer cancel()
	c, err := tpgroup.Join(jctx, tpgroup.Dir(f.par.rdzv), f.par.rank, f.par.tp, b, tpgroup.Options{
		Device:    f.device,
		Name:      fmt.Sprintf("%s pid %d %s", host, os.Getpid(), b.Name()),
		RingHost:  f.par.ringHost,
		OpTimeout: f.par.opTimeout,
	})
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	g.comms = []comm.Comm{c}
	return g, []backend.Ops{b}, []int{f.par.rank}, nil
}
