package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"strings"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/worker"
)

// runWorker runs one worker until ctx ends (SIGINT or SIGTERM), then closes it gracefully:
//
//	tpfleet worker --etcd http://127.0.0.1:2379 [--cluster NAME] [--model DIR] [--listen ADDR] [--id ID] [--threads N] ...
//	tpfleet worker --etcd http://127.0.0.1:2379 --device cuda --gpu N ...   # one worker process per GPU
//
// Under torchrun (or tpfleet launch) it records RANK, LOCAL_RANK and WORLD_SIZE in the member's labels and
// takes LOCAL_RANK as --device-index (--gpu) when that flag is absent.
func runWorker(ctx context.Context, args []string, _, stderr io.Writer) error {
	cfg := worker.DefaultConfig()
	var tf tlsFlags
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.AddFlags(fs)
	tf.add(fs)
	fs.Func("etcd", "etcd client URLs, comma-separated (same as --etcd-endpoints)", func(s string) error {
		cfg.Etcd.Endpoints = cfg.Etcd.Endpoints[:0]
		for _, e := range strings.Split(s, ",") {
			if e = strings.TrimSpace(e); e != "" {
				cfg.Etcd.Endpoints = append(cfg.Etcd.Endpoints, e)
			}
		}
		return nil
	})
	logLevel := fs.String("log-level", "info", "log level on stderr: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	set := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if err := cfg.ApplyTorchrunEnv(os.Getenv, set["device-index"] || set["gpu"]); err != nil {
		return usagef("%v", err)
	}
	if len(cfg.Etcd.Endpoints) == 0 {
		return usagef("--etcd is required: the etcd client URLs of the cluster")
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr
	cfg.Logger = log
	tl, stopTLS, err := tf.start(ctx, log)
	if err != nil {
		return err
	}
	defer stopTLS()
	cfg.TLS, cfg.Insecure = tl, tf.cfg.Insecure
	if err := cfg.Validate(); err != nil {
		return usagef("%v", err)
	}

	w, err := worker.New(cfg)
	if err != nil {
		return err
	}
	if err := w.Start(ctx); err != nil {
		_ = w.Close()
		if ctx.Err() != nil {
			return nil // interrupted while starting
		}
		return err
	}
	ready := w.Ready()
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down", zap.Error(context.Cause(ctx)))
			return w.Close()
		case <-ready:
			st := w.Status()
			log.Info("worker ready", zap.String("addr", w.Addr()), zap.String("state", string(st.State)), zap.Int64("epoch", st.Epoch))
			ready = nil
		case err, ok := <-w.Err():
			if !ok {
				return errors.New("worker stopped")
			}
			return errors.Join(err, w.Close())
		}
	}
}
