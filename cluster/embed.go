package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Defaults of EmbedConfig.
const (
	// DefaultEmbedName is the etcd member name when EmbedConfig.Name is empty.
	DefaultEmbedName = "tpfleet"
	// DefaultEmbedClientAddr is where the embedded etcd serves clients when EmbedConfig.ClientAddr is
	// empty: etcd's usual port, on loopback only.
	DefaultEmbedClientAddr = "127.0.0.1:2379"
	// DefaultEmbedPeerAddr is the embedded etcd's peer address when EmbedConfig.PeerAddr is empty.
	DefaultEmbedPeerAddr = "127.0.0.1:2380"
	// DefaultReadyTimeout bounds StartEmbedded's wait for the server to be ready when
	// EmbedConfig.ReadyTimeout is zero.
	DefaultReadyTimeout = 30 * time.Second
	// DefaultCompactionRetention is how many revisions the embedded etcd keeps: older ones are
	// compacted automatically, so a long `serve` does not grow without bound.
	DefaultCompactionRetention = 10000
)

// bindRetries is how many times StartEmbedded picks fresh ports when a port 0 it resolved was taken
// before etcd could bind it.
const bindRetries = 5

// EmbedConfig configures a single-member etcd run inside the process (`tpfleet serve`).
type EmbedConfig struct {
	// Dir holds etcd's data (write-ahead log and snapshots). Required. An existing directory is
	// reused, with its keys.
	Dir string `json:"etcd-dir"`
	// ClientAddr is the host:port clients connect to; port 0 picks a free port (see Endpoints).
	// Empty means DefaultEmbedClientAddr.
	ClientAddr string `json:"etcd-client-addr"`
	// PeerAddr is the host:port of etcd's peer listener (unused by a single member but required by
	// etcd); port 0 picks a free port. Empty means DefaultEmbedPeerAddr.
	PeerAddr string `json:"etcd-peer-addr"`
	// Name is the etcd member name. Empty means DefaultEmbedName.
	Name string `json:"etcd-name"`
	// Logger receives etcd's logs at warn level and above. Nil means zap.NewNop().
	Logger *zap.Logger `json:"-"`
	// ReadyTimeout bounds the wait for the server to be ready. Zero means DefaultReadyTimeout.
	ReadyTimeout time.Duration `json:"etcd-ready-timeout"`
	// HeartbeatInterval and ElectionTimeout are etcd's raft timings. Zero means etcd's defaults
	// (100 ms, 1 s). The shortest lease etcd grants is 1.5 election timeouts rounded up to a second,
	// so tests that need 1 s leases set ElectionTimeout to at most 600 ms.
	HeartbeatInterval time.Duration `json:"etcd-heartbeat-interval"`
	ElectionTimeout   time.Duration `json:"etcd-election-timeout"`
	// UnsafeNoFsync skips fsync: faster, and loses data on a crash. For tests only.
	UnsafeNoFsync bool `json:"-"`
	// TLS, when set, makes the server speak TLS to clients and peers (https:// endpoints) and require
	// client certificates of its CA. Nil means plaintext.
	TLS *EmbedTLS `json:"-"`
}

// EmbedTLS is the TLS of an embedded etcd.
type EmbedTLS struct {
	// CertFile and KeyFile are the server's PEM certificate and key, CAFile the PEM CA that clients'
	// certificates must chain to. etcd reads them at every handshake, so renewed files take effect
	// without a restart.
	CertFile, KeyFile, CAFile string
	// Users, when not empty, turns etcd's authentication on at the first start (a data directory
	// whose etcd already has it on is left as it is): the certificates whose common names are listed
	// may read and write the keys under KeyRoot, and no other client may read or write anything
	// (root has no password and no certificate is issued for it). Empty leaves authentication off:
	// any certificate of the CA may read and write.
	Users []string
	// ClientTLS is the client configuration StartEmbedded uses to turn authentication on: it must
	// present a certificate of the CA and accept the server's (host name 127.0.0.1 or the client
	// address's host). Required with Users.
	ClientTLS *tls.Config
}

// Validate reports an EmbedConfig that StartEmbedded cannot use.
func (c EmbedConfig) Validate() error {
	if c.Dir == "" {
		return fmt.Errorf("%w: embedded etcd: no data directory", ErrInvalid)
	}
	for _, a := range []struct{ name, addr string }{{"client", c.ClientAddr}, {"peer", c.PeerAddr}} {
		if a.addr == "" {
			continue
		}
		if _, port, err := net.SplitHostPort(a.addr); err != nil {
			return fmt.Errorf("%w: embedded etcd: %s address %q: %v", ErrInvalid, a.name, a.addr, err)
		} else if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			return fmt.Errorf("%w: embedded etcd: %s address %q: bad port", ErrInvalid, a.name, a.addr)
		}
	}
	switch {
	case c.ReadyTimeout < 0:
		return fmt.Errorf("%w: embedded etcd: negative ready timeout %v", ErrInvalid, c.ReadyTimeout)
	case c.HeartbeatInterval < 0 || c.ElectionTimeout < 0:
		return fmt.Errorf("%w: embedded etcd: negative raft timing", ErrInvalid)
	case c.HeartbeatInterval > 0 && c.ElectionTimeout > 0 && c.ElectionTimeout < 5*c.HeartbeatInterval:
		return fmt.Errorf("%w: embedded etcd: election timeout %v below 5 heartbeats of %v", ErrInvalid, c.ElectionTimeout, c.HeartbeatInterval)
	case c.TLS != nil && (c.TLS.CertFile == "" || c.TLS.KeyFile == "" || c.TLS.CAFile == ""):
		return fmt.Errorf("%w: embedded etcd: TLS needs a certificate, a key and a CA file", ErrInvalid)
	case c.TLS != nil && len(c.TLS.Users) > 0 && c.TLS.ClientTLS == nil:
		return fmt.Errorf("%w: embedded etcd: authentication needs a client TLS configuration", ErrInvalid)
	}
	return nil
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults.
func (c *EmbedConfig) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.Dir, "etcd-dir", c.Dir, "data directory of the embedded etcd")
	fs.StringVar(&c.ClientAddr, "etcd-client-addr", c.ClientAddr, "host:port of the embedded etcd's clients (port 0: any; empty: "+DefaultEmbedClientAddr+")")
	fs.StringVar(&c.PeerAddr, "etcd-peer-addr", c.PeerAddr, "host:port of the embedded etcd's peer listener (port 0: any; empty: "+DefaultEmbedPeerAddr+")")
	fs.StringVar(&c.Name, "etcd-name", c.Name, "member name of the embedded etcd (empty: "+DefaultEmbedName+")")
	fs.DurationVar(&c.ReadyTimeout, "etcd-ready-timeout", c.ReadyTimeout, "how long to wait for the embedded etcd to be ready (0: 30s)")
	fs.DurationVar(&c.HeartbeatInterval, "etcd-heartbeat-interval", c.HeartbeatInterval, "embedded etcd raft heartbeat (0: 100ms)")
	fs.DurationVar(&c.ElectionTimeout, "etcd-election-timeout", c.ElectionTimeout, "embedded etcd raft election timeout (0: 1s)")
}

// Embedded is an etcd server running in this process. Make one with StartEmbedded.
type Embedded struct {
	etcd      *embed.Etcd
	endpoints []string
	quiet     *atomic.Bool
	lg        *zap.Logger
	closeOnce sync.Once
}

// StartEmbedded starts a single-member etcd and waits until it is ready to serve, for at most
// cfg.ReadyTimeout or until ctx ends; on failure it stops what it started. Ports 0 are resolved to
// free ports first (etcd needs concrete URLs), and StartEmbedded picks again, a few times, if another
// process takes one before etcd binds it.
func StartEmbedded(ctx context.Context, cfg EmbedConfig) (*Embedded, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = DefaultEmbedName
	}
	if cfg.ClientAddr == "" {
		cfg.ClientAddr = DefaultEmbedClientAddr
	}
	if cfg.PeerAddr == "" {
		cfg.PeerAddr = DefaultEmbedPeerAddr
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = DefaultReadyTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	quiet := new(atomic.Bool)
	etcdLog := atLeast(cfg.Logger.Named("etcd"), zapcore.WarnLevel).WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core {
		return quietCore{Core: c, quiet: quiet}
	}))
	pickPorts := portIsZero(cfg.ClientAddr) || portIsZero(cfg.PeerAddr)

	for attempt := 1; ; attempt++ {
		e, err := startEmbedded(ctx, cfg, etcdLog, quiet)
		if err == nil {
			return e, nil
		}
		if !pickPorts || attempt >= bindRetries || !isAddrInUse(err) || ctx.Err() != nil {
			return nil, err
		}
		cfg.Logger.Debug("embedded etcd port taken; picking again", zap.Int("attempt", attempt), zap.Error(err))
		quiet.Store(false)
	}
}

func startEmbedded(ctx context.Context, cfg EmbedConfig, etcdLog *zap.Logger, quiet *atomic.Bool) (_ *Embedded, err error) {
	clientAddr, err := resolvePort(cfg.ClientAddr)
	if err != nil {
		return nil, fmt.Errorf("cluster: embedded etcd: client address: %w", err)
	}
	peerAddr, err := resolvePort(cfg.PeerAddr)
	if err != nil {
		return nil, fmt.Errorf("cluster: embedded etcd: peer address: %w", err)
	}
	scheme := "http"
	if cfg.TLS != nil {
		scheme = "https"
	}
	clientURL := url.URL{Scheme: scheme, Host: clientAddr}
	peerURL := url.URL{Scheme: scheme, Host: peerAddr}

	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.Dir
	ec.ListenClientUrls = []url.URL{clientURL}
	ec.AdvertiseClientUrls = []url.URL{clientURL}
	ec.ListenPeerUrls = []url.URL{peerURL}
	ec.AdvertisePeerUrls = []url.URL{peerURL}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(etcdLog)
	ec.AutoCompactionMode = embed.CompactorModeRevision
	ec.AutoCompactionRetention = strconv.Itoa(DefaultCompactionRetention)
	ec.UnsafeNoFsync = cfg.UnsafeNoFsync
	if cfg.HeartbeatInterval > 0 {
		ec.TickMs = uint(cfg.HeartbeatInterval.Milliseconds())
	}
	if cfg.ElectionTimeout > 0 {
		ec.ElectionMs = uint(cfg.ElectionTimeout.Milliseconds())
	}
	if t := cfg.TLS; t != nil {
		info := transport.TLSInfo{CertFile: t.CertFile, KeyFile: t.KeyFile, TrustedCAFile: t.CAFile, ClientCertAuth: true}
		ec.ClientTLSInfo, ec.PeerTLSInfo = info, info
	}
	cfg.Logger.Info("starting embedded etcd",
		zap.String("etcd-name", cfg.Name),
		zap.String("etcd-dir", cfg.Dir),
		zap.String("etcd-client-url", clientURL.String()),
		zap.String("etcd-peer-url", peerURL.String()),
		zap.Uint("etcd-heartbeat-ms", ec.TickMs),
		zap.Uint("etcd-election-ms", ec.ElectionMs),
		zap.Duration("etcd-ready-timeout", cfg.ReadyTimeout),
		zap.Bool("etcd-unsafe-no-fsync", cfg.UnsafeNoFsync),
		zap.Bool("etcd-tls", cfg.TLS != nil))

	etcd, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("cluster: start embedded etcd at %s: %w", clientURL.String(), err)
	}
	e := &Embedded{etcd: etcd, quiet: quiet, lg: cfg.Logger}
	defer func() {
		if err != nil {
			etcd.Server.Stop()
			e.Close()
		}
	}()
	timer := time.NewTimer(cfg.ReadyTimeout)
	defer timer.Stop()
	select {
	case <-etcd.Server.ReadyNotify():
	case err := <-etcd.Err():
		return nil, fmt.Errorf("cluster: embedded etcd at %s: %w", clientURL.String(), err)
	case <-timer.C:
		return nil, fmt.Errorf("cluster: embedded etcd at %s not ready within %v", clientURL.String(), cfg.ReadyTimeout)
	case <-ctx.Done():
		return nil, fmt.Errorf("cluster: start embedded etcd: %w", ctx.Err())
	}
	for _, l := range etcd.Clients {
		e.endpoints = append(e.endpoints, scheme+"://"+l.Addr().String())
	}
	if cfg.TLS != nil && len(cfg.TLS.Users) > 0 {
		if err := enableAuth(ctx, e.endpoints, cfg.TLS, cfg.ReadyTimeout, cfg.Logger); err != nil {
			return nil, fmt.Errorf("cluster: embedded etcd at %s: %w", clientURL.String(), err)
		}
	}
	cfg.Logger.Info("embedded etcd ready", zap.Strings("etcd-endpoints", e.endpoints))
	return e, nil
}

// Endpoints returns the client URLs of the server, with the ports it actually listens on.
func (e *Embedded) Endpoints() []string { return append([]string(nil), e.endpoints...) }

// Err returns a channel that delivers errors of the running server's listeners; etcd closes it
// when the server stops.
func (e *Embedded) Err() <-chan error { return e.etcd.Err() }

// Close stops the server and waits for it. It is idempotent, and quiet: etcd's complaints about its
// own listeners closing are not logged.
func (e *Embedded) Close() error {
	e.closeOnce.Do(func() {
		e.quiet.Store(true)
		e.etcd.Close()
		e.lg.Info("embedded etcd stopped")
	})
	return nil
}

// authRole is the etcd role of the users of EmbedTLS: read and write under KeyRoot.
const authRole = "tpfleet"

// enableAuth turns etcd's authentication on, unless it is on already: root (no password: nobody can
// log in as root) and users without passwords, named after certificates' common names, with read and
// write under KeyRoot.
func enableAuth(ctx context.Context, endpoints []string, t *EmbedTLS, timeout time.Duration, lg *zap.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, TLS: t.ClientTLS, DialTimeout: timeout, Context: ctx,
		Logger: atLeast(lg.Named("etcd-client"), zapcore.ErrorLevel)})
	if err != nil {
		return fmt.Errorf("enable authentication: %w", err)
	}
	defer cli.Close()
	st, err := cli.AuthStatus(ctx)
	if err != nil {
		return fmt.Errorf("enable authentication: status: %w", err)
	}
	if st.Enabled {
		lg.Info("embedded etcd authentication already on")
		return nil
	}
	noPassword := &clientv3.UserAddOptions{NoPassword: true}
	type step struct {
		what string
		do   func() error
	}
	steps := []step{
		{"add root", func() error { _, err := cli.UserAddWithOptions(ctx, "root", "", noPassword); return err }},
		{"grant root", func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err }},
		{"add role " + authRole, func() error { _, err := cli.RoleAdd(ctx, authRole); return err }},
		{"grant " + KeyRoot, func() error {
			_, err := cli.RoleGrantPermission(ctx, authRole, KeyRoot, clientv3.GetPrefixRangeEnd(KeyRoot), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		}},
	}
	for _, u := range t.Users {
		steps = append(steps,
			step{"add user " + u, func() error { _, err := cli.UserAddWithOptions(ctx, u, "", noPassword); return err }},
			step{"grant user " + u, func() error { _, err := cli.UserGrantRole(ctx, u, authRole); return err }})
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("enable authentication: %s: %w", s.what, err)
		}
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		return fmt.Errorf("enable authentication: %w", err)
	}
	lg.Info("embedded etcd authentication on", zap.Strings("etcd-users", t.Users))
	return nil
}

// portIsZero reports whether a host:port asks for any free port.
func portIsZero(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	return err == nil && port == "0"
}

// resolvePort replaces port 0 in addr by a port that was free a moment ago.
func resolvePort(addr string) (string, error) {
	if !portIsZero(addr) {
		return addr, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	a := l.Addr().String()
	if err := l.Close(); err != nil {
		return "", err
	}
	return a, nil
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}
