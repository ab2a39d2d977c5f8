package security_test

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
)

func TestTokens(t *testing.T) {
	tok := security.NewTokens("sk-a", "", "sk-bb")
	for _, tc := range []struct {
		token string
		want  bool
	}{{"sk-a", true}, {"sk-bb", true}, {"sk-b", false}, {"", false}, {"sk-a ", false}} {
		if got := tok.Valid(tc.token); got != tc.want {
			t.Errorf("Valid(%q) = %v, want %v", tc.token, got, tc.want)
		}
	}
	if tok.Len() != 2 {
		t.Errorf("Len() = %d, want 2 (the empty key dropped)", tok.Len())
	}
	if (security.Tokens{}).Valid("") {
		t.Errorf("the zero Tokens accepts the empty token")
	}
	for in, want := range map[string]string{"Bearer x": "x", "bearer  y ": "y", "Basic x": "", "Bearer": "", "x": ""} {
		if got := security.BearerToken(in); got != want {
			t.Errorf("BearerToken(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCheckListen(t *testing.T) {
	for _, tc := range []struct {
		addr            string
		tls, insecure   bool
		wantWarn, wantE bool
	}{
		{"127.0.0.1:80", false, false, false, false},
		{"[::1]:80", false, false, false, false},
		{"localhost:80", false, false, false, false},
		{"0.0.0.0:80", false, false, false, true},
		{":80", false, false, false, true},
		{"10.1.2.3:80", false, false, false, true},
		{"10.1.2.3:80", true, false, false, false},
		{"0.0.0.0:80", false, true, true, false},
		{"", false, false, false, false},
	} {
		warn, err := security.CheckListen("--listen", tc.addr, tc.tls, tc.insecure)
		if warn != tc.wantWarn || (err != nil) != tc.wantE || (err != nil && !errors.Is(err, security.ErrInsecure)) {
			t.Errorf("CheckListen(%q, tls %v, insecure %v) = %v, %v; want %v, error %v", tc.addr, tc.tls, tc.insecure, warn, err, tc.wantWarn, tc.wantE)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (security.Config{CertFile: "a"}).Validate(); !errors.Is(err, security.ErrInvalid) || !strings.Contains(err.Error(), "--tls-key, --tls-ca") {
		t.Errorf("Validate(cert only) = %v, want ErrInvalid naming the missing flags", err)
	}
	if err := (security.Config{}).Validate(); err != nil {
		t.Errorf("Validate(no TLS) = %v", err)
	}
	env := map[string]string{security.EnvCert: "c", security.EnvKey: "k", security.EnvCA: "a", security.EnvInsecure: "1"}
	if got := security.FromEnv(func(k string) string { return env[k] }); got != (security.Config{CertFile: "c", KeyFile: "k", CAFile: "a", Insecure: true}) {
		t.Errorf("FromEnv = %+v", got)
	}
}

// TestDevCerts: the development certificates carry their roles and cluster, and a second run reuses
// the CA.
func TestDevCerts(t *testing.T) {
	set := securitytest.CertsFor(t, "prod")
	for _, c := range security.DevCertSet {
		id := set.Load(t, c.File).Identity()
		if id.Name != c.Name || id.Cluster != "prod" || !slices.Equal(id.Roles, sorted(c.Roles)) {
			t.Errorf("%s: Identity() = %+v, want %s of prod with %v", c.File, id, c.Name, c.Roles)
		}
	}
	ca, err := os.ReadFile(filepath.Join(set.Dir, security.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	written, err := security.CreateDevCerts(set.Dir, "prod", []string{"node1.example"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := os.ReadFile(filepath.Join(set.Dir, security.CACertFile))
	if string(ca) != string(again) || slices.Contains(written, filepath.Join(set.Dir, security.CACertFile)) {
		t.Errorf("a second CreateDevCerts replaced the CA")
	}
	if st, err := os.Stat(filepath.Join(set.Dir, "worker.key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("worker.key: %v, mode %v; want 0600", err, st.Mode())
	}
}

func sorted(r []security.Role) []security.Role {
	r = slices.Clone(r)
	slices.Sort(r)
	return r
}

// TestReload: new files are picked up by Reload (and not before they change); a broken file keeps the
// previous certificate.
func TestReload(t *testing.T) {
	set := securitytest.Certs(t)
	cfg := set.Config("client")
	tl, err := security.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := tl.Reload(); ok || err != nil {
		t.Errorf("Reload of unchanged files = %v, %v; want false, nil", ok, err)
	}
	// Replace the client's certificate by the admin's.
	admin := set.Config("admin")
	for _, f := range [][2]string{{admin.CertFile, cfg.CertFile}, {admin.KeyFile, cfg.KeyFile}} {
		data, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f[1], data, 0o600); err != nil {
			t.Fatal(err)
		}
		later := time.Now().Add(time.Second)
		_ = os.Chtimes(f[1], later, later)
	}
	if ok, err := tl.Reload(); !ok || err != nil || !tl.Identity().Has(security.RoleAdmin) {
		t.Errorf("Reload after a new certificate = %v, %v, %+v; want the admin's", ok, err, tl.Identity())
	}
	if err := os.WriteFile(cfg.CertFile, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := tl.Reload(); err == nil || !tl.Identity().Has(security.RoleAdmin) {
		t.Errorf("Reload of a broken certificate = %v, %+v; want an error and the previous certificate", err, tl.Identity())
	}
}

// TestWatchServesNewCertificate: a server's configuration from ServerConfig presents the certificate
// Watch last loaded, so a renewed certificate reaches new connections without a restart.
func TestWatchServesNewCertificate(t *testing.T) {
	set := securitytest.Certs(t)
	cfg := set.Config("worker")
	cfg.ReloadInterval = 10 * time.Millisecond
	server, err := security.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	wg.Go(func() { server.Watch(ctx, nil) })
	defer func() { cancel(); wg.Wait() }()

	l, err := tls.Listen("tcp", "127.0.0.1:0", server.ServerConfig(true))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			_ = c.Close()
		}
	})
	client := set.Load(t, "client")
	peerName := func() string {
		c, err := tls.Dial("tcp", l.Addr().String(), client.ClientConfig())
		if err != nil {
			t.Fatalf("Dial: %v", err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if got := peerName(); got != "worker" {
		t.Fatalf("server certificate %q, want worker", got)
	}
	node := set.Config("node")
	for _, f := range [][2]string{{node.CertFile, cfg.CertFile}, {node.KeyFile, cfg.KeyFile}} {
		data, err := os.ReadFile(f[0])
		if err != nil {
			t.Fatal(err)
		}
		tmp := f[1] + ".new"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, f[1]); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for peerName() != "node" {
		if time.Now().After(deadline) {
			t.Fatal("the server still presents the old certificate 10s after the files changed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
