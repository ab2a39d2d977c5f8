package coordinator

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
)

// secureClient dials the coordinator at addr with tlsCfg and token.
func secureClient(t *testing.T, addr string, tlsCfg *tls.Config, token string) *client.Client {
	t.Helper()
	cli, err := client.Dial(addr, client.WithTLS(tlsCfg), client.WithToken(token))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// noCertificate is a TLS client configuration that trusts the coordinator but presents no certificate.
func noCertificate(t *testing.T, certs securitytest.Set) *tls.Config {
	c := certs.Load(t, "client").ClientConfig(security.RoleCoordinator)
	c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	return c
}

// TestSecurity is issue 16's acceptance on the coordinator: with TLS, API keys and admin keys, every
// wrong credential is refused with its code (a client without a certificate, one of another CA, a
// worker's certificate on Admin, a missing, wrong or non-admin token on the Generation API, the Admin
// API and HTTP), and the coordinator goes on serving the right ones.
func TestSecurity(t *testing.T) {
	cfg := testConfig(t)
	certs := securitytest.CertsFor(t, cfg.Etcd.Cluster)
	cl := clusterClient(t)
	workerTLS := certs.Load(t, "worker")
	for i := range 2 {
		w := startFakeWorker(t, fmt.Sprintf("w%d", i), grpc.Creds(credentials.NewTLS(workerTLS.ServerConfig(true))))
		w.follow(t, cl)
	}
	cfg.TLS = certs.Load(t, "coordinator")
	cfg.APIKeys = []string{"sk-one-5f3a", "sk-two-91c2"}
	cfg.AdminKeys = []string{"adm-77e1"}
	cfg.HTTPAddr = "127.0.0.1:0"
	core, logs := observer.New(zap.DebugLevel)
	cfg.Logger = zap.New(core)
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	waitReady(t, c)
	addr := c.Addr()
	ctx := testCtx(t)
	req := client.GenerateRequest{PromptIDs: []int{5}, MaxTokens: 3, Sampling: greedy()}
	clientTLS := certs.Load(t, "client").ClientConfig(security.RoleCoordinator)

	serves := func(when string) {
		t.Helper()
		for _, key := range cfg.APIKeys {
			res, err := secureClient(t, addr, clientTLS, key).Generate(ctx, req, nil)
			if err != nil || len(res.IDs) != 3 {
				t.Fatalf("%s: Generate with a client certificate and an API key = %+v, %v; want 3 ids", when, res, err)
			}
		}
	}
	serves("before the refusals")

	other := securitytest.CertsFor(t, cfg.Etcd.Cluster)
	for _, tc := range []struct {
		name  string
		tls   *tls.Config
		token string
		code  codes.Code
	}{
		{"no certificate", noCertificate(t, certs), "sk-one-5f3a", codes.Unavailable},
		{"another CA", other.Load(t, "client").ClientConfig(), "sk-one-5f3a", codes.Unavailable},
		{"plaintext", nil, "sk-one-5f3a", codes.Unavailable},
		{"no token", clientTLS, "", codes.Unauthenticated},
		{"wrong token", clientTLS, "sk-three-0000", codes.Unauthenticated},
		{"worker certificate", workerTLS.ClientConfig(security.RoleCoordinator), "sk-one-5f3a", codes.PermissionDenied},
	} {
		_, err := secureClient(t, addr, tc.tls, tc.token).Generate(ctx, req, nil)
		if status.Code(err) != tc.code {
			t.Errorf("Generate with %s = %v, want %v", tc.name, err, tc.code)
		}
	}

	adminTLS := certs.Load(t, "admin").ClientConfig(security.RoleCoordinator)
	for _, tc := range []struct {
		name  string
		tls   *tls.Config
		token string
		code  codes.Code
	}{
		{"admin certificate", adminTLS, "", codes.OK},
		{"client certificate and admin key", clientTLS, "adm-77e1", codes.OK},
		{"client certificate, no token", clientTLS, "", codes.PermissionDenied},
		{"client certificate and a non-admin token", clientTLS, "sk-one-5f3a", codes.PermissionDenied},
		{"client certificate and a wrong token", clientTLS, "nope-4242", codes.Unauthenticated},
		{"worker certificate", workerTLS.ClientConfig(security.RoleCoordinator), "", codes.PermissionDenied},
		{"no certificate and admin key", noCertificate(t, certs), "adm-77e1", codes.Unavailable},
		{"another CA's admin", other.Load(t, "admin").ClientConfig(), "", codes.Unavailable},
	} {
		_, err := secureClient(t, addr, tc.tls, tc.token).Shards(ctx)
		if status.Code(err) != tc.code {
			t.Errorf("Admin Shards with %s = %v, want %v", tc.name, err, tc.code)
		}
	}
	// HTTP: HTTPS; /health open; /v1 needs one of the API keys.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: noCertificate(t, certs)}, Timeout: 10 * time.Second}
	get := func(path, token string) int {
		t.Helper()
		r, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+c.HTTPAddr()+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			r.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(r)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		path, token string
		code        int
	}{
		{"/health", "", http.StatusOK},
		{"/v1/models", "", http.StatusUnauthorized},
		{"/v1/models", "sk-three-0000", http.StatusUnauthorized},
		{"/v1/models", "adm-77e1", http.StatusUnauthorized},
		{"/v1/models", "sk-two-91c2", http.StatusOK},
	} {
		if got := get(tc.path, tc.token); got != tc.code {
			t.Errorf("GET %s with token %q = %d, want %d", tc.path, tc.token, got, tc.code)
		}
	}
	if resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + c.HTTPAddr() + "/v1/models"); err == nil {
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain HTTP to the HTTPS gateway = %d, want 400 (an HTTP request to an HTTPS server)", resp.StatusCode)
		}
	}
	serves("after the refusals")

	// Secrets stay out of the logs.
	for _, e := range logs.All() {
		line := fmt.Sprint(e.Message, e.ContextMap())
		for _, secret := range []string{"sk-one-5f3a", "sk-two-91c2", "adm-77e1"} {
			if strings.Contains(line, secret) {
				t.Errorf("log %q shows a key", line)
			}
		}
	}
}

// TestInsecureListen: a listener on a non-loopback address without TLS is refused unless Insecure, and
// then every start warns.
func TestInsecureListen(t *testing.T) {
	cfg := testConfig(t)
	cfg.ListenAddr = "0.0.0.0:0"
	if err := cfg.Validate(); !errors.Is(err, ErrInvalidConfig) || !errors.Is(err, security.ErrInsecure) {
		t.Fatalf("Validate(listen 0.0.0.0 without TLS) = %v, want ErrInsecure", err)
	}
	cfg.Gossip.BindAddr = "127.0.0.1"
	cfg.Insecure = true
	core, logs := observer.New(zap.WarnLevel)
	cfg.Logger = zap.New(core)
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if n := logs.FilterMessage(security.InsecureWarning).Len(); n != 1 {
		t.Errorf("Start with --insecure logged the warning %d times, want 1", n)
	}
}
