package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Defaults of Config.
const (
	// DefaultCluster is the cluster name used when Config.Cluster is empty.
	DefaultCluster = "default"
	// DefaultDialTimeout bounds New's first contact with etcd when Config.DialTimeout is zero.
	DefaultDialTimeout = 5 * time.Second
	// KeyRoot is the root of every key this package writes: keys live under KeyRoot + "<cluster>/".
	KeyRoot = "/tpfleet/"
)

// Key names under a Client's prefix; see the package doc for the layout.
const (
	keyMembers = "members/"
	keyPlan    = "plan"
	keyRdzv    = "rdzv/"
	keyNCCL    = "nccl/"
	keyLeader  = "leader" // concurrency.Election appends "/"
)

// retryWait is how long a watch loop waits before it lists and watches again after an error.
const retryWait = 250 * time.Millisecond

// namePattern is what cluster names and member IDs may look like: one etcd key segment that reads
// well in etcdctl and needs no escaping.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@-]*$`)

// maxNameLen bounds cluster names and member IDs.
const maxNameLen = 253

func validName(s string) bool { return len(s) <= maxNameLen && namePattern.MatchString(s) }

// Config configures a client of the cluster's etcd.
type Config struct {
	// Endpoints are etcd client URLs such as "http://127.0.0.1:2379". At least one is required.
	Endpoints []string `json:"etcd-endpoints"`
	// Cluster names the cluster; its keys live under /tpfleet/<Cluster>/. Empty means DefaultCluster.
	// Letters, digits and ". _ : @ -", starting with a letter or digit.
	Cluster string `json:"cluster"`
	// DialTimeout bounds New: if etcd has not answered a read within it, New fails with
	// ErrUnavailable naming the endpoints. Zero means DefaultDialTimeout.
	DialTimeout time.Duration `json:"etcd-dial-timeout"`
	// TLS, when set, is the client's TLS configuration for https:// endpoints (and bare host:port
	// ones): its certificate authenticates this process to etcd, whose user, with etcd's
	// authentication on and no Username, is the certificate's common name. http:// endpoints stay
	// plaintext. Nil means plaintext.
	TLS *tls.Config `json:"-"`
	// Username and Password log in to an etcd with authentication on (etcd's --auth); empty Username:
	// no login (the TLS certificate's common name is the user, if etcd asks). The password comes from
	// the TPFLEET_ETCD_PASSWORD environment variable with AddFlags: never a flag, which ps shows.
	Username string `json:"etcd-user"`
	Password string `json:"-"`
	// Logger receives the package's logs and, at warn level and above, the etcd client's. Nil means
	// zap.NewNop().
	Logger *zap.Logger `json:"-"`
}

// EnvEtcdPassword is the environment variable AddFlags reads Config.Password from.
const EnvEtcdPassword = "TPFLEET_ETCD_PASSWORD"

// Validate reports a Config that New cannot use.
func (c Config) Validate() error {
	if len(c.Endpoints) == 0 {
		return fmt.Errorf("%w: config: no etcd endpoints", ErrInvalid)
	}
	for i, ep := range c.Endpoints {
		if strings.TrimSpace(ep) == "" {
			return fmt.Errorf("%w: config: etcd endpoint %d is empty", ErrInvalid, i)
		}
	}
	if c.Cluster != "" && !validName(c.Cluster) {
		return fmt.Errorf("%w: config: cluster name %q: want letters, digits and . _ : @ -", ErrInvalid, c.Cluster)
	}
	if c.DialTimeout < 0 {
		return fmt.Errorf("%w: config: negative dial timeout %v", ErrInvalid, c.DialTimeout)
	}
	if c.Password != "" && c.Username == "" {
		return fmt.Errorf("%w: config: an etcd password without a user (--etcd-user)", ErrInvalid)
	}
	return nil
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.Var((*listFlag)(&c.Endpoints), "etcd-endpoints", "etcd client URLs, comma-separated")
	fs.StringVar(&c.Cluster, "cluster", c.Cluster, "cluster name; keys live under /tpfleet/<cluster>/ (empty: "+DefaultCluster+")")
	fs.DurationVar(&c.DialTimeout, "etcd-dial-timeout", c.DialTimeout, "how long to wait for etcd at start-up (0: 5s)")
	fs.StringVar(&c.Username, "etcd-user", c.Username, "etcd user, for an etcd with authentication on; the password comes from $"+EnvEtcdPassword+" (empty: none, or the TLS certificate's common name)")
	if c.Password == "" {
		c.Password = os.Getenv(EnvEtcdPassword)
	}
}

// listFlag is a comma-separated list flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	*l = (*l)[:0]
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			*l = append(*l, e)
		}
	}
	return nil
}

// withDefaults returns c with zero fields replaced by their defaults.
func (c Config) withDefaults() Config {
	if c.Cluster == "" {
		c.Cluster = DefaultCluster
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	c.Endpoints = append([]string(nil), c.Endpoints...)
	return c
}

// Client is a connection to the cluster's etcd, scoped to one cluster's keys. It is safe for
// concurrent use. Registrations, leaderships and watches made through it end when it is closed.
type Client struct {
	cfg    Config
	cli    *clientv3.Client
	prefix string
	lg     *zap.Logger

	// ctx is the client's lifetime: Close cancels it, which ends every watch, keep-alive and
	// leadership goroutine; wg waits for them.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex // guards closed against wg.Add racing Close's wg.Wait
	closed bool

	closeOnce sync.Once
	closeErr  error
}

// New connects to etcd and checks that it answers a read (which needs a leader) within
// cfg.DialTimeout. It fails with ErrUnavailable, naming the endpoints, when it does not, or with ctx's
// error when ctx ends first.
func New(ctx context.Context, cfg Config) (*Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	lg := cfg.Logger.With(zap.String("cluster", cfg.Cluster))
	lg.Info("starting etcd client",
		zap.Strings("etcd-endpoints", cfg.Endpoints),
		zap.Duration("etcd-dial-timeout", cfg.DialTimeout),
		zap.Bool("etcd-tls", cfg.TLS != nil),
		zap.String("etcd-user", cfg.Username))

	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: cfg.DialTimeout,
		TLS:         cfg.TLS,
		Username:    cfg.Username,
		Password:    cfg.Password,
		Logger:      atLeast(cfg.Logger.Named("etcd-client"), zapcore.WarnLevel),
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrUnavailable, strings.Join(cfg.Endpoints, ","), err)
	}
	c := &Client{
		cfg:    cfg,
		cli:    cli,
		prefix: KeyRoot + cfg.Cluster + "/",
		lg:     lg,
	}
	pctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	_, err = cli.Get(pctx, c.prefix+keyPlan, clientv3.WithCountOnly())
	cancel()
	if err != nil {
		_ = cli.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("cluster: connect to etcd %s: %w", strings.Join(cfg.Endpoints, ","), ctx.Err())
		}
		return nil, fmt.Errorf("%w: no answer from %s within %v: %w",
			ErrUnavailable, strings.Join(cfg.Endpoints, ","), cfg.DialTimeout, err)
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// Close ends every watch, keep-alive and leadership of the client, without revoking leases (a
// Registration or Leadership not closed first expires after its TTL, as if the process had died), and
// closes the connection. It is idempotent.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		c.mu.Unlock()
		c.cancel()
		c.wg.Wait()
		if err := c.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
			c.closeErr = fmt.Errorf("cluster: close etcd client: %w", err)
		}
	})
	return c.closeErr
}

// Prefix returns the prefix of every key of the client's cluster, "/tpfleet/<cluster>/".
func (c *Client) Prefix() string { return c.prefix }

// Etcd returns the underlying etcd client, for reads and writes this package does not offer. Do not
// close it; Close does.
func (c *Client) Etcd() *clientv3.Client { return c.cli }

// key returns the full key of name under the client's prefix.
func (c *Client) key(name string) string { return c.prefix + name }

// bind returns a context that ends when ctx ends or the client is closed (with cause ErrClosed), and
// its cancel function.
func (c *Client) bind(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(c.ctx, func() { cancel(ErrClosed) })
	return ctx, func() {
		stop()
		cancel(context.Canceled)
	}
}

// ctxErr returns the error to report when a call under ctx failed with err: ctx's error (or
// ErrClosed when the client was closed) if ctx has ended, else err.
func (c *Client) ctxErr(ctx context.Context, err error) error {
	if c.ctx.Err() != nil {
		return ErrClosed
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// goWatch runs f in a goroutine owned by the client: f's context ends when ctx ends or the client is
// closed, and Close waits for f to return.
func (c *Client) goWatch(ctx context.Context, f func(ctx context.Context)) {
	wctx, cancel := c.bind(ctx)
	if !c.track() {
		defer cancel()
		f(wctx) // the client is closed, so wctx has ended and f returns at once
		return
	}
	go func() {
		defer c.wg.Done()
		defer cancel()
		f(wctx)
	}()
}

// track adds one goroutine to the client's wait group, unless the client is closed; it reports
// whether it did. The goroutine calls c.wg.Done when it returns.
func (c *Client) track() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.wg.Add(1)
	return true
}

// ttlSeconds converts a TTL to etcd's whole seconds, rounding up, at least 1.
func ttlSeconds(ttl time.Duration) int64 {
	s := int64((ttl + time.Second - 1) / time.Second)
	return max(s, 1)
}
