package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

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
		{[]string{"worker", "--etcd", "127.0.0.1:1", "--metrics-listen", "0.0.0.0:0"}, 2, "--metrics-listen 0.0.0.0:0"},
		{[]string{"gateway", "--coordinators", "127.0.0.1:1", "--model", model, "--http-listen", "0.0.0.0:0"}, 2, "--http-listen 0.0.0.0:0"},
		{[]string{"worker", "--etcd", "127.0.0.1:1", "--tls-cert", certs.Config("worker").CertFile}, 2, "missing --tls-key, --tls-ca"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("tpfleet %s = exit %d, %q; want %d with %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}

// TestGatewayTLS: `tpfleet gateway` in front of a `tpfleet serve` with TLS and an API key serves HTTPS
// with its own API key, and reaches the coordinator over mTLS with the coordinator's key (--token,
// here from TPFLEET_TOKEN): a completion returns the fixture's greedy ids; a request without the
// gateway's key is refused with 401.
func TestGatewayTLS(t *testing.T) {
	g := readGolden(t, "moe-top1")
	certs := withTLS(t)
	model := filepath.Join(fixtures, "moe-top1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, _ := startServe(t, ctx, append([]string{"--model", model, "--tp", "1", "--http-listen", "", "--listen", "127.0.0.1:0",
		"--log-level", "warn", "--api-key", testAPIKey}, certs.Args("node")...)...)
	waitCoordinator(t, addr)
	lines, gwCode, gwErr := runInProcess(ctx, append([]string{"gateway", "--coordinators", addr, "--model", model, "--http-listen", "127.0.0.1:0",
		"--api-key", "gw-key-31f0", "--log-level", "warn"}, certs.Args("client")...)...)
	var base string
	select {
	case a := <-lines:
		base = "https://" + a
	case c := <-gwCode:
		t.Fatalf("gateway exited %d: %s", c, gwErr)
	case <-time.After(30 * time.Second):
		t.Fatal("gateway printed no address within 30s")
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: certs.Load(t, "client").ClientConfig()}, Timeout: 30 * time.Second}
	post := func(key string) (int, []byte) {
		t.Helper()
		body := fmt.Sprintf(`{"prompt":[%s],"max_tokens":%d,"temperature":0,"ignore_eos":true,"return_token_ids":true}`, joinIDs(g.prompt), len(g.greedy))
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, data
	}
	if c, body := post(""); c != http.StatusUnauthorized {
		t.Errorf("completion without the gateway's key = %d %s, want 401", c, body)
	}
	c, body := post("gw-key-31f0")
	var out struct {
		Choices []struct {
			TokenIDs []int `json:"token_ids"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &out); c != http.StatusOK || err != nil || len(out.Choices) != 1 || !slices.Equal(out.Choices[0].TokenIDs, g.greedy) {
		t.Errorf("completion through the TLS gateway = %d %s, want the greedy ids %v", c, body, g.greedy)
	}
	cancel()
	<-gwCode
	<-code
}
