package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
	"github.com/tpfleet/tpfleet/worker"
)

type serveFlags struct {
	model       string
	tp          int
	workers     int
	device      string
	threads     int
	plan        string
	listen      string
	httpListen  string
	dataDir     string
	etcdListen  string
	maxQueue    int
	maxBatch    int
	tokenBudget int
	logLevel    string
}

// runServe is the one-machine deployment: an embedded etcd, a coordinator and --workers local workers
// (default: --tp, one TP group), all in this process, until SIGINT or SIGTERM. It prints the
// coordinator's gRPC address on stdout; the OpenAI-compatible HTTP gateway listens on --http-listen.
//
//	tpfleet serve --model DIR [--tp N] [--device cpu] [--listen ADDR] [--http-listen ADDR] [--workers N]
func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f serveFlags
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.model, "model", "", "checkpoint directory (config.json and *.safetensors)")
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel size: workers per group")
	fs.IntVar(&f.workers, "workers", 0, "local workers; a multiple of --tp gives several replicas (0: --tp)")
	fs.StringVar(&f.device, "device", worker.DeviceCPU, "where the workers run: cpu")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads of each worker's matrix products (0: cores / workers)")
	fs.StringVar(&f.plan, "plan", coordinator.DefaultPlan, `tp_plan: "tp", "ep" or a plan file in HF's format`)
	fs.StringVar(&f.listen, "listen", coordinator.DefaultListenAddr, "host:port of the coordinator's gRPC server (port 0: any)")
	fs.StringVar(&f.httpListen, "http-listen", coordinator.DefaultHTTPAddr, "host:port of the OpenAI-compatible HTTP gateway (port 0: any; empty: no gateway)")
	fs.StringVar(&f.dataDir, "data-dir", "", "etcd's data directory, kept across runs (empty: a temporary one, removed at exit)")
	fs.StringVar(&f.etcdListen, "etcd-listen", "127.0.0.1:0", "host:port of the embedded etcd's clients (port 0: any)")
	fs.IntVar(&f.maxQueue, "max-queue", 0, "requests that may wait for a batch (0: 256)")
	fs.IntVar(&f.maxBatch, "max-batch", 0, "sequences per step (0: 32)")
	fs.IntVar(&f.tokenBudget, "token-budget", 0, "tokens per step: decodes plus prompt pieces (0: 512)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.workers == 0 {
		f.workers = f.tp
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case f.model == "":
		return usagef("--model is required")
	case f.tp < 1:
		return usagef("--tp %d must be >= 1", f.tp)
	case f.workers < f.tp:
		return usagef("--workers %d is fewer than --tp %d: no group could form", f.workers, f.tp)
	case f.threads < 0:
		return usagef("--threads %d must be >= 0", f.threads)
	case f.device != worker.DeviceCPU:
		return usagef("--device %q: this build runs on cpu only", f.device)
	}
	if f.threads == 0 {
		f.threads = max(1, runtime.NumCPU()/f.workers)
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr

	dir := f.dataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "tpfleet-serve-etcd-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: dir, ClientAddr: f.etcdListen, PeerAddr: "127.0.0.1:0", Logger: log.Named("etcd")})
	if err != nil {
		return err
	}
	defer e.Close()
	etcd := cluster.Config{Endpoints: e.Endpoints()}

	c, err := coordinator.New(coordinator.Config{
		ListenAddr: f.listen, HTTPAddr: f.httpListen, Model: f.model, TP: f.tp, Plan: f.plan,
		MaxQueue: f.maxQueue, MaxBatch: f.maxBatch, TokenBudget: f.tokenBudget,
		Etcd: etcd, Logger: log.Named("coordinator"),
	})
	if err != nil {
		return err
	}
	if err := c.Start(ctx); err != nil {
		return err
	}
	defer c.Close()

	var workers []*worker.Worker
	defer func() {
		for _, w := range workers {
			_ = w.Close()
		}
	}()
	werrs := make(chan error, f.workers)
	for i := range f.workers {
		wcfg := worker.DefaultConfig()
		wcfg.ID = fmt.Sprintf("serve-%d-w%03d", os.Getpid(), i)
		wcfg.DeviceIndex = i
		wcfg.Threads = f.threads
		wcfg.Etcd = etcd
		wcfg.Logger = log.Named(fmt.Sprintf("worker%d", i))
		w, err := worker.New(wcfg)
		if err != nil {
			return err
		}
		if err := w.Start(ctx); err != nil {
			_ = w.Close()
			return err
		}
		workers = append(workers, w)
		go func() {
			if err, ok := <-w.Err(); ok && err != nil {
				werrs <- fmt.Errorf("worker %d: %w", i, err)
			}
		}()
	}
	log.Info("serve started", zap.String("addr", c.Addr()), zap.String("http-addr", c.HTTPAddr()), zap.Strings("etcd-endpoints", e.Endpoints()),
		zap.Int("workers", f.workers), zap.Int("tp", f.tp), zap.Int("replicas", f.workers/f.tp), zap.Int("threads", f.threads))
	if _, err := fmt.Fprintln(stdout, c.Addr()); err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		select {
		case err := <-c.Err():
			errc <- err
		case err := <-werrs:
			errc <- err
		case <-ctx.Done():
		}
	}()
	err = waitServing(ctx, log, c.Addr(), c.Ready(), errc)
	log.Info("shutting down")
	start := time.Now()
	cerr := c.Close()
	for _, w := range workers {
		cerr = errors.Join(cerr, w.Close())
	}
	workers = nil
	log.Info("stopped", zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return errors.Join(err, cerr)
}
