package security

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// Environment variables that give the defaults of Config's flags, for processes started by others
// (tpfleet launch's children, containers).
const (
	EnvCert     = "TPFLEET_TLS_CERT"
	EnvKey      = "TPFLEET_TLS_KEY"
	EnvCA       = "TPFLEET_TLS_CA"
	EnvInsecure = "TPFLEET_INSECURE"
)

// DefaultReloadInterval is how often Watch looks at the certificate files when Config.ReloadInterval
// is zero.
const DefaultReloadInterval = 10 * time.Second

// ErrInvalid reports a Config that cannot be used.
var ErrInvalid = errors.New("security: invalid config")

// ErrInsecure reports a listener on a non-loopback address without TLS and without Config.Insecure.
var ErrInsecure = errors.New("security: refusing to listen without TLS on a non-loopback address (give --tls-cert, --tls-key and --tls-ca, or --insecure)")

// InsecureWarning is what a process logs at every start when it listens without TLS on a
// non-loopback address because Config.Insecure allows it.
const InsecureWarning = "serving without TLS on a non-loopback address (--insecure): anyone on the network can call every API and read every token"

// Config says where a process's certificate, key and CA are. Either all three files are set (TLS on)
// or none (TLS off).
type Config struct {
	// CertFile is the PEM certificate (chain) this process presents, with its roles (RoleURI).
	CertFile string `json:"tls-cert"`
	// KeyFile is the certificate's PEM private key.
	KeyFile string `json:"tls-key"`
	// CAFile holds the PEM CA certificates that peers' certificates must chain to.
	CAFile string `json:"tls-ca"`
	// Insecure allows listening without TLS on a non-loopback address (CheckListen).
	Insecure bool `json:"insecure"`
	// ReloadInterval is how often Watch looks for changed files. Zero means DefaultReloadInterval.
	ReloadInterval time.Duration `json:"tls-reload-interval"`
}

// FromEnv returns a Config with the files and Insecure of the environment variables, read through
// getenv (os.Getenv).
func FromEnv(getenv func(string) string) Config {
	ins := strings.ToLower(getenv(EnvInsecure))
	return Config{
		CertFile: getenv(EnvCert), KeyFile: getenv(EnvKey), CAFile: getenv(EnvCA),
		Insecure: ins == "1" || ins == "true" || ins == "yes",
	}
}

// AddFlags binds c's fields to --tls-cert, --tls-key, --tls-ca and --insecure in fs, with c's current
// values, else the environment's (FromEnv), as defaults.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	env := FromEnv(os.Getenv)
	def := func(cur, env string) string {
		if cur != "" {
			return cur
		}
		return env
	}
	c.CertFile, c.KeyFile, c.CAFile = def(c.CertFile, env.CertFile), def(c.KeyFile, env.KeyFile), def(c.CAFile, env.CAFile)
	c.Insecure = c.Insecure || env.Insecure
	fs.StringVar(&c.CertFile, "tls-cert", c.CertFile, "PEM certificate of this process, with its roles (env "+EnvCert+"; tpfleet certs makes one)")
	fs.StringVar(&c.KeyFile, "tls-key", c.KeyFile, "PEM private key of --tls-cert (env "+EnvKey+")")
	fs.StringVar(&c.CAFile, "tls-ca", c.CAFile, "PEM CA certificates that peers' certificates must chain to (env "+EnvCA+")")
	fs.BoolVar(&c.Insecure, "insecure", c.Insecure, "allow listening on non-loopback addresses without TLS (env "+EnvInsecure+"=1); logs a warning at every start")
}

// Enabled reports whether TLS is configured.
func (c Config) Enabled() bool { return c.CertFile != "" || c.KeyFile != "" || c.CAFile != "" }

// Validate reports a Config with some but not all of its files.
func (c Config) Validate() error {
	if !c.Enabled() {
		return nil
	}
	var missing []string
	for _, f := range []struct{ flag, v string }{{"--tls-cert", c.CertFile}, {"--tls-key", c.KeyFile}, {"--tls-ca", c.CAFile}} {
		if f.v == "" {
			missing = append(missing, f.flag)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: TLS needs --tls-cert, --tls-key and --tls-ca; missing %s", ErrInvalid, strings.Join(missing, ", "))
	}
	if c.ReloadInterval < 0 {
		return fmt.Errorf("%w: negative reload interval %v", ErrInvalid, c.ReloadInterval)
	}
	return nil
}

// CheckListen reports ErrInsecure when addr (host:port) is not a loopback address, tlsOn is false and
// insecure is not set. An empty host, an unspecified address (0.0.0.0, ::) and host names other than
// localhost count as non-loopback. It returns whether the caller must log InsecureWarning: a
// non-loopback address without TLS allowed by insecure.
func CheckListen(what, addr string, tlsOn, insecure bool) (warn bool, err error) {
	if tlsOn || addr == "" || Loopback(addr) {
		return false, nil
	}
	if insecure {
		return true, nil
	}
	return false, fmt.Errorf("%w: %s %s", ErrInsecure, what, addr)
}

// Listener is one address a process listens on, for CheckListeners: what names its flag, Secure says
// whether it serves TLS (or gossip under a key).
type Listener struct {
	What, Addr string
	Secure     bool
}

// CheckListeners applies CheckListen to each listener and returns the addresses the caller must warn
// about, or the first refusal.
func CheckListeners(ls []Listener, insecure bool) ([]string, error) {
	var open []string
	for _, l := range ls {
		warn, err := CheckListen(l.What, l.Addr, l.Secure, insecure)
		if err != nil {
			return nil, err
		}
		if warn {
			open = append(open, l.Addr)
		}
	}
	return open, nil
}

// Loopback reports whether addr, a host:port or a bare host, names only loopback interfaces.
func Loopback(addr string) bool {
	host := addr
	if h, _, err := net.SplitHostPort(addr); err == nil {
		host = h
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
