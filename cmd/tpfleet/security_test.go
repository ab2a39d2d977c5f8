package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
)

// testAPIKey is the API key of the tests that run with TLS.
const testAPIKey = "sk-test-6d1f"

// withTLS makes a development CA, the cluster's certificates and a gossip key (tpfleet certs) for the
// test and sets, for the commands it runs in this process and the processes it starts, the
// TPFLEET_TLS_* variables of the admin's certificate (a client of the Generation and Admin APIs, and an
// etcd user), TPFLEET_TOKEN (the client side of the test) and TPFLEET_GOSSIP_KEY_FILE (every gossip
// node's). Servers get their own certificates by flags (Set.Args), which win.
func withTLS(t *testing.T) securitytest.Set {
	t.Helper()
	certs := securitytest.Certs(t)
	if code, _, stderr := tpfleet(t, "certs", "--dir", certs.Dir); code != 0 {
		t.Fatalf("tpfleet certs: %s", stderr)
	}
	t.Setenv(cluster.EnvGossipKeyFile, filepath.Join(certs.Dir, gossipKeyFile))
	for _, kv := range certs.Env("admin") {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	t.Setenv(EnvToken, testAPIKey)
	return certs
}

// clientOptions are the client.Dial options of the environment withTLS set: none without it.
func clientOptions(t *testing.T) []client.Option {
	t.Helper()
	cfg := security.FromEnv(os.Getenv)
	if !cfg.Enabled() {
		return nil
	}
	tl, err := security.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return []client.Option{client.WithTLS(tl.ClientConfig(security.RoleCoordinator)), client.WithToken(os.Getenv(EnvToken))}
}

// TestCertsCommand: tpfleet certs writes the CA, the role certificates and a gossip key; a second run
// keeps the CA and the gossip key.
func TestCertsCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	code, stdout, stderr := tpfleet(t, "certs", "--dir", dir, "--cluster", "prod", "--host", "10.0.0.7,node7")
	if code != 0 || !strings.Contains(stdout, "ca.key") || !strings.Contains(stdout, gossipKeyFile) {
		t.Fatalf("certs = %d, %q (%s); want the files listed", code, stdout, stderr)
	}
	for _, c := range security.DevCertSet {
		tl, err := security.Load(security.Config{CertFile: filepath.Join(dir, c.File+".crt"), KeyFile: filepath.Join(dir, c.File+".key"),
			CAFile: filepath.Join(dir, security.CACertFile)})
		if err != nil {
			t.Fatalf("%s: %v", c.File, err)
		}
		if id := tl.Identity(); id.Cluster != "prod" || !id.Has(c.Roles...) {
			t.Errorf("%s: identity %+v, want roles %v of prod", c.File, id, c.Roles)
		}
	}
	code, stdout, _ = tpfleet(t, "certs", "--dir", dir, "--cluster", "prod")
	if code != 0 || strings.Contains(stdout, "ca.key") || strings.Contains(stdout, gossipKeyFile) {
		t.Errorf("second certs = %d, %q; want new certificates of the same CA and gossip key", code, stdout)
	}
	if code, _, stderr := tpfleet(t, "certs", "--dir", dir, "--cluster", "bad name"); code != 2 || !strings.Contains(stderr, "not a cluster name") {
		t.Errorf("certs --cluster 'bad name' = %d, %q; want 2", code, stderr)
	}
}

// TestInsecureListen: a non-loopback listener without TLS refuses to start unless --insecure, naming
// the flag; half the TLS flags is a usage error.
func TestInsecureListen(t *testing.T) {
	model := filepath.Join(fixtures, "moe-top1")
	certs := securitytest.Certs(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"coordinator", "--etcd", "127.0.0.1:1", "--model", model, "--listen", "0.0.0.0:0"}, 1, "refusing to listen without TLS on a non-loopback address"},
		{[]string{"serve", model, "--host", "0.0.0.0", "--listen", "127.0.0.1:0"}, 1, "--http-listen 0.0.0.0:8000"},
		{[]string{"etcd", "--listen", "0.0.0.0:0"}, 2, "--listen 0.0.0.0:0"},
		{[]string{"worker", "--etcd", "127.0.0.1:1", "--ring-host", "0.0.0.0"}, 2, "--ring-host 0.0.0.0"},
		{[]string{"worker", "--etcd", "127.0.0.1:1", "--tls-cert", certs.Config("worker").CertFile}, 2, "missing --tls-key, --tls-ca"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("tpfleet %s = exit %d, %q; want %d with %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}
