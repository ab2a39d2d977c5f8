package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/security"
)

// gossipKeyFile is the name of the gossip key file tpfleet certs writes beside the certificates.
const gossipKeyFile = "gossip.key"

// runCerts makes a development CA and the cluster's certificates, as `cockroach cert` does:
//
//	tpfleet certs [--dir certs] [--cluster NAME] [--host H,...] [--lifetime 8760h]
//
// It writes ca.crt and ca.key (kept when the directory has them: run it again to issue new certificates
// of the same CA), coordinator, worker, node (coordinator and worker, for serve and launch
// --standalone), client and admin .crt/.key with their roles as tpfleet://<cluster>/<role> URIs, and
// gossip.key (unless there is one). Production clusters use their own CA: see docs/security.md.
func runCerts(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "certs", "directory of the certificates (created with mode 0700)")
	clusterName := fs.String("cluster", cluster.DefaultCluster, "cluster name the roles are for (--cluster of the processes)")
	hosts := fs.String("host", "", "comma-separated DNS names and IP addresses the certificates are valid for, besides localhost, 127.0.0.1 and ::1 (etcd's clients check them)")
	lifetime := fs.Duration("lifetime", security.DefaultCertLifetime, "validity of the certificates (the CA's is 10 years)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case *lifetime <= 0:
		return usagef("--lifetime must be positive")
	}
	if err := (cluster.Config{Endpoints: []string{"x"}, Cluster: *clusterName}).Validate(); err != nil {
		return usagef("--cluster %q is not a cluster name: letters, digits and . _ : @ -", *clusterName)
	}
	written, err := security.CreateDevCerts(*dir, *clusterName, splitList(*hosts), *lifetime)
	if err != nil {
		return err
	}
	keyPath := filepath.Join(*dir, gossipKeyFile)
	if _, err := os.Stat(keyPath); errors.Is(err, os.ErrNotExist) {
		k := make([]byte, 32)
		if _, err := rand.Read(k); err != nil {
			return err
		}
		data := fmt.Sprintf("# gossip keys of cluster %s (--gossip-key-file), made %s; the first encrypts\n%s\n",
			*clusterName, time.Now().UTC().Format(time.RFC3339), base64.StdEncoding.EncodeToString(k))
		if err := os.WriteFile(keyPath, []byte(data), 0o600); err != nil {
			return err
		}
		written = append(written, keyPath)
	}
	for _, f := range written {
		fmt.Fprintln(stdout, f)
	}
	return nil
}
