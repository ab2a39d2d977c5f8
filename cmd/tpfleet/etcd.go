package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/security"
)

type etcdFlags struct {
	listen, peerListen string
	dataDir            string
	name               string
	heartbeat          time.Duration
	election           time.Duration
	logLevel           string
	tls                tlsFlags
	users              string
}

// runEtcd runs a single-member etcd in this process until interrupted: the cluster store for tests and
// small setups without an etcd of their own. It prints its client URL on stdout once ready.
func runEtcd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f etcdFlags
	fs := flag.NewFlagSet("etcd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.listen, "listen", cluster.DefaultEmbedClientAddr, "host:port for etcd clients (port 0: any free port)")
	fs.StringVar(&f.peerListen, "peer-listen", "127.0.0.1:0", "host:port of etcd's peer listener, unused by a single member (port 0: any)")
	fs.StringVar(&f.dataDir, "data-dir", "", "etcd's data directory, reused with its keys when it exists (empty: a temporary one, removed at exit)")
	fs.StringVar(&f.name, "name", cluster.DefaultEmbedName, "etcd member name")
	fs.DurationVar(&f.heartbeat, "heartbeat-interval", 0, "raft heartbeat (0: etcd's 100ms)")
	fs.DurationVar(&f.election, "election-timeout", 0, "raft election timeout (0: etcd's 1s); the shortest lease is 1.5 of it, rounded up to a second")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	f.tls.add(fs)
	fs.StringVar(&f.users, "etcd-users", strings.Join(defaultEtcdUsers, ","), "with TLS: the common names of the certificates that may read and write the cluster's keys; etcd's authentication is turned on at the first start (empty: off, any certificate of the CA may write)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr
	tl, stopTLS, err := f.tls.start(ctx, log)
	if err != nil {
		return err
	}
	defer stopTLS()
	for _, l := range [][2]string{{"--listen", f.listen}, {"--peer-listen", f.peerListen}} {
		if warn, err := security.CheckListen(l[0], l[1], tl != nil, f.tls.cfg.Insecure); err != nil {
			return usagef("%v", err)
		} else if warn {
			log.Warn(security.InsecureWarning, zap.String("addr", l[1]))
		}
	}

	dir := f.dataDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "tpfleet-etcd-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{
		Dir: dir, ClientAddr: f.listen, PeerAddr: f.peerListen, Name: f.name, Logger: log,
		HeartbeatInterval: f.heartbeat, ElectionTimeout: f.election,
		TLS: f.tls.embedTLS(tl, splitList(f.users)),
	})
	if err != nil {
		return err
	}
	defer e.Close()
	eps := strings.Join(e.Endpoints(), ",")
	log.Info("etcd serving; stop with Ctrl-C", zap.String("etcd-endpoints", eps), zap.String("data-dir", dir))
	if _, err := fmt.Fprintln(stdout, eps); err != nil {
		return err
	}
	<-ctx.Done()
	log.Info("stopping etcd")
	return nil
}
