package main

import (
	"context"
	"crypto/tls"
	"flag"
	"os"
	"sync"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/security"
)

// EnvToken is the environment variable that gives the client commands' --token.
const EnvToken = "TPFLEET_TOKEN"

// tlsFlags are every command's --tls-cert, --tls-key, --tls-ca and --insecure (security.Config), and,
// for the commands that run coordinators and workers in their own process (serve, launch --standalone),
// the gossip key file.
type tlsFlags struct {
	cfg       security.Config
	gossipKey string
}

func (f *tlsFlags) add(fs *flag.FlagSet) { f.cfg.AddFlags(fs) }

// addGossipKey adds --gossip-key-file, defaulting to $TPFLEET_GOSSIP_KEY_FILE.
func (f *tlsFlags) addGossipKey(fs *flag.FlagSet) {
	fs.StringVar(&f.gossipKey, "gossip-key-file", os.Getenv(cluster.EnvGossipKeyFile),
		"file of base64 gossip keys of the coordinator and workers, one a line, the first encrypting (env "+cluster.EnvGossipKeyFile+"; empty: plaintext gossip)")
}

// start loads the certificates (nil without TLS) and reloads them when their files change, until ctx
// ends or stop is called; stop also waits for that goroutine.
func (f *tlsFlags) start(ctx context.Context, log *zap.Logger) (t *security.TLS, stop func(), err error) {
	t, err = security.LoadIfEnabled(f.cfg)
	if err != nil {
		return nil, nil, usagef("%v", err)
	}
	if t == nil {
		return nil, func() {}, nil
	}
	id := t.Identity()
	log.Info("TLS on", zap.String("tls-cert", f.cfg.CertFile), zap.String("tls-ca", f.cfg.CAFile),
		zap.String("name", id.Name), zap.String("cluster", id.Cluster), zap.Any("roles", id.Roles))
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { t.Watch(ctx, log.Named("tls")) })
	return t, func() { cancel(); wg.Wait() }, nil
}

// env returns the TPFLEET_TLS_* variables of the flags, for child processes (tpfleet launch's
// workers), so that they use the same certificates unless their own flags say otherwise.
func (f *tlsFlags) env() []string {
	var env []string
	for _, kv := range [][2]string{{security.EnvCert, f.cfg.CertFile}, {security.EnvKey, f.cfg.KeyFile}, {security.EnvCA, f.cfg.CAFile}} {
		if kv[1] != "" {
			env = append(env, kv[0]+"="+kv[1])
		}
	}
	if f.cfg.Insecure {
		env = append(env, security.EnvInsecure+"=1")
	}
	if f.gossipKey != "" {
		env = append(env, cluster.EnvGossipKeyFile+"="+f.gossipKey)
	}
	return env
}

// clientTLS returns the TLS configuration of a client of a coordinator (any certificate with the
// coordinator role of the client's cluster), or nil without TLS.
func (f *tlsFlags) clientTLS() (*tls.Config, error) {
	t, err := security.LoadIfEnabled(f.cfg)
	if err != nil || t == nil {
		return nil, err
	}
	return t.ClientConfig(security.RoleCoordinator), nil
}

// etcdTLS returns the TLS configuration of a client of etcd, or nil without TLS.
func (f *tlsFlags) etcdTLS() (*tls.Config, error) {
	t, err := security.LoadIfEnabled(f.cfg)
	if err != nil || t == nil {
		return nil, err
	}
	return t.EtcdClientConfig(), nil
}

// tokenFlag adds --token, the bearer token of a client command, defaulting to $TPFLEET_TOKEN.
func tokenFlag(fs *flag.FlagSet, p *string, what string) {
	fs.StringVar(p, "token", os.Getenv(EnvToken), what+" (env "+EnvToken+"; prefer the variable: ps shows flags)")
}

// keysFlag adds a repeatable flag of secret keys (also comma-separated) to *p; its default is never
// printed.
func keysFlag(fs *flag.FlagSet, p *[]string, name, usage string) {
	fs.Func(name, usage, func(v string) error {
		*p = append(*p, splitList(v)...)
		return nil
	})
}

// defaultEtcdUsers are the etcd users of an embedded etcd with TLS: the common names of the
// certificates tpfleet certs makes for the cluster's processes and its administrators (a client
// certificate is no etcd user).
var defaultEtcdUsers = []string{"coordinator", "worker", "node", "admin"}

// embedTLS is the TLS of an embedded etcd served with the flags' certificate, with authentication by
// certificate common name for users (none: authentication off), or nil without TLS.
func (f *tlsFlags) embedTLS(t *security.TLS, users []string) *cluster.EmbedTLS {
	if t == nil {
		return nil
	}
	return &cluster.EmbedTLS{CertFile: f.cfg.CertFile, KeyFile: f.cfg.KeyFile, CAFile: f.cfg.CAFile,
		Users: users, ClientTLS: t.EtcdClientConfig()}
}
