package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// ErrPeer reports a peer whose certificate does not chain to the CA, or lacks the role or cluster
// the connection needs.
var ErrPeer = errors.New("security: peer refused")

// TLS holds a process's certificate, key and CA, reloaded when their files change. Its configurations
// (ServerConfig, ClientConfig, EtcdClientConfig) read the current files at every handshake. Its
// methods are safe for concurrent use.
type TLS struct {
	cfg Config

	mu    sync.RWMutex
	cert  *tls.Certificate
	id    Identity
	pool  *x509.CertPool
	stamp string // the files' sizes and modification times when last read
}

// Load reads cfg's files. cfg must have TLS enabled.
func Load(cfg Config) (*TLS, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if !cfg.Enabled() {
		return nil, fmt.Errorf("%w: no certificate files", ErrInvalid)
	}
	t := &TLS{cfg: cfg}
	if _, err := t.Reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// LoadIfEnabled is Load for a Config with TLS enabled, and nil, nil for one without.
func LoadIfEnabled(cfg Config) (*TLS, error) {
	if !cfg.Enabled() {
		return nil, cfg.Validate()
	}
	return Load(cfg)
}

// Config returns the Config t was loaded from.
func (t *TLS) Config() Config { return t.cfg }

// stamp describes the files' sizes and modification times.
func (t *TLS) fileStamp() (string, error) {
	var b strings.Builder
	for _, f := range []string{t.cfg.CertFile, t.cfg.KeyFile, t.cfg.CAFile} {
		st, err := os.Stat(f)
		if err != nil {
			return "", fmt.Errorf("security: %w", err)
		}
		fmt.Fprintf(&b, "%d/%d;", st.Size(), st.ModTime().UnixNano())
	}
	return b.String(), nil
}

// Reload reads the files again when their sizes or modification times changed since they were last
// read, and reports whether it did. On an error the previous certificate stays in use.
func (t *TLS) Reload() (bool, error) {
	stamp, err := t.fileStamp()
	if err != nil {
		return false, err
	}
	t.mu.RLock()
	same := stamp == t.stamp
	t.mu.RUnlock()
	if same {
		return false, nil
	}
	cert, err := tls.LoadX509KeyPair(t.cfg.CertFile, t.cfg.KeyFile)
	if err != nil {
		// The message names the files only: crypto/tls never puts key material in its errors.
		return false, fmt.Errorf("security: load %s and %s: %w", t.cfg.CertFile, t.cfg.KeyFile, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return false, fmt.Errorf("security: parse %s: %w", t.cfg.CertFile, err)
	}
	cert.Leaf = leaf
	pem, err := os.ReadFile(t.cfg.CAFile)
	if err != nil {
		return false, fmt.Errorf("security: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return false, fmt.Errorf("%w: %s holds no PEM certificate", ErrInvalid, t.cfg.CAFile)
	}
	t.mu.Lock()
	t.cert, t.id, t.pool, t.stamp = &cert, IdentityOf(leaf), pool, stamp
	t.mu.Unlock()
	return true, nil
}

// Watch calls Reload every Config.ReloadInterval until ctx ends, logging reloads and failures.
func (t *TLS) Watch(ctx context.Context, lg *zap.Logger) {
	if lg == nil {
		lg = zap.NewNop()
	}
	every := t.cfg.ReloadInterval
	if every == 0 {
		every = DefaultReloadInterval
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		switch ok, err := t.Reload(); {
		case err != nil:
			lg.Warn("certificate reload failed; keeping the previous one", zap.Error(err))
		case ok:
			id := t.Identity()
			lg.Info("certificate reloaded", zap.String("tls-cert", t.cfg.CertFile), zap.String("name", id.Name),
				zap.Any("roles", id.Roles), zap.Time("not-after", t.current().Leaf.NotAfter))
		}
	}
}

// Identity returns the identity of this process's certificate.
func (t *TLS) Identity() Identity {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.id
}

func (t *TLS) current() *tls.Certificate {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.cert
}

func (t *TLS) roots() *x509.CertPool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.pool
}

// ServerConfig returns the configuration of a TLS server. With requireClientCert, clients must
// present a certificate that chains to the CA (mTLS); else a certificate is verified if given. Roles
// are checked per call (Authorizer) or by VerifyPeer.
func (t *TLS) ServerConfig(requireClientCert bool) *tls.Config {
	auth := tls.VerifyClientCertIfGiven
	if requireClientCert {
		auth = tls.RequireAndVerifyClientCert
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return &tls.Config{
				MinVersion:   tls.VersionTLS12,
				Certificates: []tls.Certificate{*t.current()},
				ClientCAs:    t.roots(),
				ClientAuth:   auth,
				NextProtos:   []string{"h2", "http/1.1"},
			}, nil
		},
	}
}

// PeerServerConfig is ServerConfig(true) that also refuses, during the handshake, clients without one
// of roles in this process's cluster: for listeners that serve only tpfleet's own processes (the TCP
// ring).
func (t *TLS) PeerServerConfig(roles ...Role) *tls.Config {
	c := t.ServerConfig(true)
	get := c.GetConfigForClient
	c.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		cc, err := get(h)
		if err != nil {
			return nil, err
		}
		cc.NextProtos = nil
		cc.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%w: no client certificate", ErrPeer)
			}
			return t.checkRole(IdentityOf(cs.PeerCertificates[0]), roles)
		}
		return cc, nil
	}
	return c
}

// ClientConfig returns the configuration of a TLS client of another tpfleet process: it presents
// this process's certificate and accepts a server whose certificate chains to the CA and carries one
// of roles in this process's cluster (any role when roles is empty); the host name is not checked.
func (t *TLS) ClientConfig(roles ...Role) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return t.current(), nil
		},
		// The chain, role and cluster are verified in VerifyConnection instead of by host name.
		InsecureSkipVerify: true, //nolint:gosec // verified below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := t.verifyChain(cs.PeerCertificates, ""); err != nil {
				return err
			}
			if len(roles) == 0 {
				return nil
			}
			return t.checkRole(IdentityOf(cs.PeerCertificates[0]), roles)
		},
	}
}

// EtcdClientConfig returns the configuration of a client of etcd: it presents this process's
// certificate (whose common name is the etcd user) and verifies the server's chain and host name as
// usual.
func (t *TLS) EtcdClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return t.current(), nil
		},
		InsecureSkipVerify: true, //nolint:gosec // verified below, with the host name
		VerifyConnection: func(cs tls.ConnectionState) error {
			return t.verifyChain(cs.PeerCertificates, cs.ServerName)
		},
	}
}

// verifyChain verifies that chain[0] chains to the CA (through chain[1:]), and has host name dnsName
// unless it is empty.
func (t *TLS) verifyChain(chain []*x509.Certificate, dnsName string) error {
	if len(chain) == 0 {
		return fmt.Errorf("%w: no certificate", ErrPeer)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots: t.roots(), Intermediates: inter, DNSName: dnsName,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPeer, err)
	}
	return nil
}

// checkRole reports a peer without one of roles in this process's cluster.
func (t *TLS) checkRole(peer Identity, roles []Role) error {
	own := t.Identity().Cluster
	if peer.Cluster != own {
		return fmt.Errorf("%w: %q is a certificate of cluster %q, not %q", ErrPeer, peer.Name, peer.Cluster, own)
	}
	if !peer.Has(roles...) {
		return fmt.Errorf("%w: %q has roles %v, needs one of %v", ErrPeer, peer.Name, peer.Roles, roles)
	}
	return nil
}
