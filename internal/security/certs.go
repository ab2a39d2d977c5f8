package security

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Defaults of the certificates CreateCA and CreateCert make.
const (
	// DefaultCALifetime is a development CA's validity.
	DefaultCALifetime = 10 * 365 * 24 * time.Hour
	// DefaultCertLifetime is a certificate's validity.
	DefaultCertLifetime = 365 * 24 * time.Hour
	// CACertFile and CAKeyFile are the names of the CA's files in a certificates directory.
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// CA is a certificate authority that signs certificates: its certificate and key.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// CreateCA makes a self-signed CA named name, valid for lifetime (zero: DefaultCALifetime).
func CreateCA(name string, lifetime time.Duration) (*CA, error) {
	if lifetime == 0 {
		lifetime = DefaultCALifetime
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("security: CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"tpfleet"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(lifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("security: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// CertRequest describes a certificate for CA.Issue.
type CertRequest struct {
	// Name is the common name: the etcd user name when etcd's authentication is on.
	Name string
	// Cluster and Roles make the role URIs (RoleURI).
	Cluster string
	Roles   []Role
	// Hosts are the DNS names and IP addresses the certificate is valid for as a server (etcd's
	// clients verify them; tpfleet's processes verify roles instead).
	Hosts []string
	// Lifetime is the validity; zero means DefaultCertLifetime.
	Lifetime time.Duration
}

// Issue makes a certificate for req, signed by ca, and its new key. It is valid for both server and
// client authentication.
func (ca *CA) Issue(req CertRequest) (*x509.Certificate, crypto.Signer, error) {
	if req.Name == "" {
		return nil, nil, fmt.Errorf("%w: certificate without a name", ErrInvalid)
	}
	if len(req.Roles) > 0 && req.Cluster == "" {
		return nil, nil, fmt.Errorf("%w: certificate %q: roles need a cluster", ErrInvalid, req.Name)
	}
	if req.Lifetime == 0 {
		req.Lifetime = DefaultCertLifetime
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("security: key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: req.Name, Organization: []string{"tpfleet"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(req.Lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, r := range req.Roles {
		tmpl.URIs = append(tmpl.URIs, RoleURI(req.Cluster, r))
	}
	for _, h := range req.Hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("security: certificate %q: %w", req.Name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// serial is a random 128-bit serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n
}

// WriteCert writes cert to path in PEM (mode 0644) and key, when not nil, to keyPath (mode 0600).
// Existing files are replaced atomically (a watcher never reads half a file).
func WriteCert(path string, cert *x509.Certificate, keyPath string, key crypto.Signer) error {
	if err := writeAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return err
	}
	if key == nil {
		return nil
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("security: encode key: %w", err)
	}
	return writeAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return fmt.Errorf("security: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	err = errors.Join(err, f.Chmod(mode), f.Close())
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("security: write %s: %w", path, err)
	}
	return nil
}

// LoadCA reads a CA's certificate and key (PEM, as WriteCert writes them).
func LoadCA(certPath, keyPath string) (*CA, error) {
	cpem, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("security: %w", err)
	}
	kpem, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("security: %w", err)
	}
	cb, _ := pem.Decode(cpem)
	kb, _ := pem.Decode(kpem)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("%w: %s or %s is not PEM", ErrInvalid, certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("security: %s: %w", certPath, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("security: %s: %w", keyPath, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok || !cert.IsCA {
		return nil, fmt.Errorf("%w: %s is not a CA", ErrInvalid, certPath)
	}
	return &CA{Cert: cert, Key: signer}, nil
}

// DevCert is a certificate `tpfleet certs` writes into a directory: its file name, common name and
// roles.
type DevCert struct {
	File  string // <File>.crt and <File>.key
	Name  string
	Roles []Role
}

// DevCertSet is the certificates of a development cluster: one per role, and "node", with both the
// coordinator and the worker role, for processes that are both (tpfleet serve, tpfleet launch
// --standalone).
var DevCertSet = []DevCert{
	{"coordinator", "coordinator", []Role{RoleCoordinator}},
	{"worker", "worker", []Role{RoleWorker}},
	{"node", "node", []Role{RoleCoordinator, RoleWorker}},
	{"client", "client", []Role{RoleClient}},
	{"admin", "admin", []Role{RoleAdmin}},
}

// CreateDevCerts writes a new CA (unless dir has one, which is reused) and DevCertSet into dir for
// cluster, valid for hosts (plus localhost, 127.0.0.1 and ::1). It returns the files it wrote.
func CreateDevCerts(dir, cluster string, hosts []string, lifetime time.Duration) ([]string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("security: %w", err)
	}
	caCert, caKey := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	var written []string
	ca, err := LoadCA(caCert, caKey)
	if errors.Is(err, os.ErrNotExist) {
		if ca, err = CreateCA("tpfleet development CA", 0); err != nil {
			return nil, err
		}
		if err := WriteCert(caCert, ca.Cert, caKey, ca.Key); err != nil {
			return nil, err
		}
		written = append(written, caCert, caKey)
	} else if err != nil {
		return nil, err
	}
	hosts = append([]string{"localhost", "127.0.0.1", "::1"}, hosts...)
	for _, c := range DevCertSet {
		cert, key, err := ca.Issue(CertRequest{Name: c.Name, Cluster: cluster, Roles: c.Roles, Hosts: hosts, Lifetime: lifetime})
		if err != nil {
			return nil, err
		}
		crt, k := filepath.Join(dir, c.File+".crt"), filepath.Join(dir, c.File+".key")
		if err := WriteCert(crt, cert, k, key); err != nil {
			return nil, err
		}
		written = append(written, crt, k)
	}
	return written, nil
}
