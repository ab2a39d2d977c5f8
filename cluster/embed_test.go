package cluster_test

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
)

func TestEmbedConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  cluster.EmbedConfig
		ok   bool
	}{
		{"minimal", cluster.EmbedConfig{Dir: "/tmp/x"}, true},
		{"ports 0", cluster.EmbedConfig{Dir: "/tmp/x", ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0"}, true},
		{"no dir", cluster.EmbedConfig{}, false},
		{"no port", cluster.EmbedConfig{Dir: "/tmp/x", ClientAddr: "127.0.0.1"}, false},
		{"bad port", cluster.EmbedConfig{Dir: "/tmp/x", PeerAddr: "127.0.0.1:99999"}, false},
		{"negative timeout", cluster.EmbedConfig{Dir: "/tmp/x", ReadyTimeout: -time.Second}, false},
		{"election below 5 heartbeats", cluster.EmbedConfig{Dir: "/tmp/x", HeartbeatInterval: 100 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond}, false},
	}
	for _, tt := range tests {
		err := tt.cfg.Validate()
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, cluster.ErrInvalid)) {
			t.Errorf("%s: Validate() = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestEmbedded(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	eps := e.Endpoints()
	if len(eps) != 1 || !strings.HasPrefix(eps[0], "http://127.0.0.1:") || strings.HasSuffix(eps[0], ":0") {
		t.Fatalf("Endpoints() = %v, want one http://127.0.0.1:<port>", eps)
	}
	c := newClient(t, e, "embed")
	if _, _, err := c.Members(testCtx(t)); err != nil {
		t.Fatalf("Members: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	if conn, err := net.Dial("tcp", strings.TrimPrefix(eps[0], "http://")); err == nil {
		_ = conn.Close()
		t.Errorf("%s still accepts connections after Close", eps[0])
	}
}

func TestEmbeddedPortTaken(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer l.Close()
	_, err = cluster.StartEmbedded(testCtx(t), cluster.EmbedConfig{
		Dir: t.TempDir(), ClientAddr: l.Addr().String(), PeerAddr: "127.0.0.1:0", Logger: zap.NewNop(),
	})
	if err == nil || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Errorf("StartEmbedded on taken port %s = %v, want an error naming it", l.Addr(), err)
	}
}
