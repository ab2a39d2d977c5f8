// Package securitytest makes certificates for tests: a development CA and its certificates in a test's
// temporary directory (security.CreateDevCerts), and a stranger's from another CA.
package securitytest

import (
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/internal/security"
)

// Cluster is the cluster name of the certificates Certs makes.
const Cluster = "default"

// Set is the certificates of one development cluster in Dir.
type Set struct {
	// Dir holds ca.crt and, for each of security.DevCertSet, <file>.crt and <file>.key.
	Dir string
}

// Certs writes a development CA and its certificates for Cluster (security.CreateDevCerts) into a new
// temporary directory of t.
func Certs(t testing.TB) Set {
	t.Helper()
	return CertsFor(t, Cluster)
}

// CertsFor is Certs for the named cluster.
func CertsFor(t testing.TB, cluster string) Set {
	t.Helper()
	dir := t.TempDir()
	if _, err := security.CreateDevCerts(dir, cluster, nil, 0); err != nil {
		t.Fatalf("CreateDevCerts: %v", err)
	}
	return Set{Dir: dir}
}

// Config returns the security.Config of certificate file (coordinator, worker, node, client, admin).
func (s Set) Config(file string) security.Config {
	return security.Config{
		CertFile: filepath.Join(s.Dir, file+".crt"),
		KeyFile:  filepath.Join(s.Dir, file+".key"),
		CAFile:   filepath.Join(s.Dir, security.CACertFile),
	}
}

// Load loads certificate file's TLS.
func (s Set) Load(t testing.TB, file string) *security.TLS {
	t.Helper()
	tl, err := security.Load(s.Config(file))
	if err != nil {
		t.Fatalf("Load(%s): %v", file, err)
	}
	return tl
}

// Args returns the --tls-cert, --tls-key and --tls-ca flags of certificate file.
func (s Set) Args(file string) []string {
	c := s.Config(file)
	return []string{"--tls-cert", c.CertFile, "--tls-key", c.KeyFile, "--tls-ca", c.CAFile}
}

// Env returns the TPFLEET_TLS_* environment variables of certificate file.
func (s Set) Env(file string) []string {
	c := s.Config(file)
	return []string{security.EnvCert + "=" + c.CertFile, security.EnvKey + "=" + c.KeyFile, security.EnvCA + "=" + c.CAFile}
}
