package cluster

import (
	"flag"
	"log"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestTTLSeconds(t *testing.T) {
	for _, tt := range []struct {
		in   time.Duration
		want int64
	}{{time.Millisecond, 1}, {time.Second, 1}, {1500 * time.Millisecond, 2}, {10 * time.Second, 10}} {
		if got := ttlSeconds(tt.in); got != tt.want {
			t.Errorf("ttlSeconds(%v) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestStdLogWriter(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	l := log.New(stdLogWriter{zap.New(core)}, "", 0)
	l.Printf("[DEBUG] memberlist: Stream connection from=%s", "127.0.0.1:1")
	l.Printf("[WARN] memberlist: Refuting a suspect message")
	l.Printf("[ERR] memberlist: Failed to send")
	l.Printf("[ERR] memberlist: Failed fallback TCP ping: timeout 250ms: i/o timeout")
	l.Printf("no prefix")
	var got []string
	for _, e := range logs.All() {
		got = append(got, e.Level.String()+" "+e.Message)
	}
	want := []string{
		"debug Stream connection from=127.0.0.1:1",
		"warn Refuting a suspect message",
		"error Failed to send",
		"warn Failed fallback TCP ping: timeout 250ms: i/o timeout",
		"info no prefix",
	}
	if !slices.Equal(got, want) {
		t.Errorf("logged %q, want %q", got, want)
	}
}

func TestAddFlags(t *testing.T) {
	var c Config
	var e EmbedConfig
	var g GossipConfig
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	c.AddFlags(fs)
	e.AddFlags(fs)
	g.AddFlags(fs)
	err := fs.Parse([]string{
		"-etcd-endpoints", "http://a:2379, http://b:2379",
		"-cluster", "prod",
		"-etcd-dial-timeout", "2s",
		"-etcd-dir", "/var/lib/tpfleet",
		"-etcd-client-addr", "127.0.0.1:0",
		"-gossip-join", "10.0.0.1:7946,10.0.0.2:7946",
		"-gossip-probe-interval", "300ms",
	})
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if !slices.Equal(c.Endpoints, []string{"http://a:2379", "http://b:2379"}) || c.Cluster != "prod" || c.DialTimeout != 2*time.Second {
		t.Errorf("Config after flags = %+v", c)
	}
	if e.Dir != "/var/lib/tpfleet" || e.ClientAddr != "127.0.0.1:0" {
		t.Errorf("EmbedConfig after flags = %+v", e)
	}
	if !slices.Equal(g.Join, []string{"10.0.0.1:7946", "10.0.0.2:7946"}) || g.ProbeInterval != 300*time.Millisecond {
		t.Errorf("GossipConfig after flags = %+v", g)
	}
}
