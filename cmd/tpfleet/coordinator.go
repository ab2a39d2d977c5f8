package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
)

// etcdFlag adds --etcd, a shorter spelling of --etcd-endpoints, bound to the same list.
func etcdFlag(fs *flag.FlagSet, c *cluster.Config) {
	fs.Func("etcd", "etcd client URLs or host:port, comma-separated (same as --etcd-endpoints)", func(s string) error {
		c.Endpoints = splitList(s)
		return nil
	})
}

// splitList splits a comma-separated list, dropping blanks.
func splitList(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// runCoordinator runs a coordinator until interrupted: it campaigns for leadership of the cluster's
// coordinators, plans the workers in etcd into TP groups and serves clients. It prints the address it
// listens on to stdout.
func runCoordinator(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg coordinator.Config
	var logLevel string
	var tf tlsFlags
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg.ListenAddr = coordinator.DefaultListenAddr
	cfg.HTTPAddr = coordinator.DefaultHTTPAddr
	cfg.TP = coordinator.DefaultTP
	cfg.Plan = coordinator.DefaultPlan
	cfg.AddFlags(fs)
	etcdFlag(fs, &cfg.Etcd)
	tf.add(fs)
	fs.StringVar(&logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case cfg.Model == "":
		return usagef("--model is required")
	case len(cfg.Etcd.Endpoints) == 0:
		return usagef("--etcd is required (e.g. --etcd 127.0.0.1:2379; tpfleet etcd runs one)")
	}
	log, err := newLogger(stderr, logLevel)
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
	c, err := coordinator.New(cfg)
	if err != nil {
		return err
	}
	if err := c.Start(ctx); err != nil {
		return err
	}
	defer c.Close()
	if _, err := fmt.Fprintln(stdout, c.Addr()); err != nil {
		return err
	}
	return waitServing(ctx, log, c.Addr(), c.Ready(), c.Err())
}

// waitServing logs when the server is ready and blocks until ctx ends (nil) or errc reports a failure.
func waitServing(ctx context.Context, log *zap.Logger, addr string, ready <-chan struct{}, errc <-chan error) error {
	for {
		select {
		case <-ready:
			log.Info("serving; stop with Ctrl-C", zap.String("addr", addr))
			ready = nil
		case err := <-errc:
			return err
		case <-ctx.Done():
			return nil
		}
	}
}
