package cluster_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
)

// TestEmbeddedTLSAuth: an embedded etcd with TLS and authentication on serves https:// to the
// certificates of its users, and refuses a client without a certificate, a certificate of another CA
// and a certificate of its CA whose common name is no user (a stranger's write), while it keeps
// serving its users.
func TestEmbeddedTLSAuth(t *testing.T) {
	t.Parallel()
	certs := securitytest.Certs(t)
	node := certs.Load(t, "node")
	nc := certs.Config("node")
	e, err := cluster.StartEmbedded(testCtx(t), cluster.EmbedConfig{
		Dir: t.TempDir(), ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0", Logger: zap.NewNop(),
		ReadyTimeout: 20 * time.Second, UnsafeNoFsync: true,
		TLS: &cluster.EmbedTLS{CertFile: nc.CertFile, KeyFile: nc.KeyFile, CAFile: nc.CAFile,
			Users: []string{"coordinator", "worker", "node"}, ClientTLS: node.EtcdClientConfig()},
	})
	if err != nil {
		t.Fatalf("StartEmbedded: %v", err)
	}
	t.Cleanup(func() { _ = e.Close() })
	eps := e.Endpoints()
	if !strings.HasPrefix(eps[0], "https://127.0.0.1:") {
		t.Fatalf("Endpoints() = %v, want https://127.0.0.1:<port>", eps)
	}

	// A worker's certificate: a member of the cluster.
	w, err := cluster.New(testCtx(t), cluster.Config{Endpoints: eps, TLS: certs.Load(t, "worker").EtcdClientConfig()})
	if err != nil {
		t.Fatalf("New(worker certificate): %v", err)
	}
	defer w.Close()
	put := func(cli *clientv3.Client, key string) error {
		ctx, cancel := context.WithTimeout(testCtx(t), 5*time.Second)
		defer cancel()
		_, err := cli.Put(ctx, key, "x")
		return err
	}
	if err := put(w.Etcd(), cluster.KeyRoot+"default/probe"); err != nil {
		t.Fatalf("Put by a worker = %v, want nil", err)
	}
	if err := put(w.Etcd(), "/elsewhere"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("Put by a worker outside %s = %v, want permission denied", cluster.KeyRoot, err)
	}

	// A stranger with a certificate of the CA but no etcd user (the client role's): refused.
	stranger, err := clientv3.New(clientv3.Config{Endpoints: eps, TLS: certs.Load(t, "client").EtcdClientConfig(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("clientv3.New: %v", err)
	}
	defer stranger.Close()
	if err := put(stranger, cluster.KeyRoot+"default/plan"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("Put of the plan by a certificate without an etcd user = %v, want permission denied", err)
	}

	// No certificate, and a certificate of another CA: the handshake fails.
	other := securitytest.Certs(t).Load(t, "node")
	for name, cfg := range map[string]*tls.Config{
		"no certificate": {InsecureSkipVerify: true}, //nolint:gosec // the server refuses first
		"another CA":     other.EtcdClientConfig(),
	} {
		_, err := cluster.New(testCtx(t), cluster.Config{Endpoints: eps, TLS: cfg, DialTimeout: 2 * time.Second})
		if err == nil {
			t.Errorf("New(%s) = nil error, want refused", name)
		}
	}
	// Still serving its users.
	if err := put(w.Etcd(), cluster.KeyRoot+"default/probe"); err != nil {
		t.Errorf("Put by a worker after the refusals = %v, want nil", err)
	}
}
