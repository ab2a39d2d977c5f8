package coordinator

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/gateway"
)

// startProxyGateway serves the gateway over a Proxy of addrs and returns its base URL.
func startProxyGateway(t *testing.T, addrs ...string) (*Proxy, string) {
	t.Helper()
	p, err := NewProxy(ProxyConfig{Coordinators: addrs, Model: fixture})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	g, err := gateway.New(gateway.Config{Generator: p})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	return p, srv.URL
}

// TestProxy: the gateway over a Proxy of an unreachable address, a standby and the leader serves as
// the leader's own gateway does: it turns away from the first two (unreachable, NOT_LEADER) and keeps
// to the leader; /health is 200 while one coordinator serves; a request the leader refuses keeps its
// status.
func TestProxy(t *testing.T) {
	cl := clusterClient(t)
	startWorkers(t, cl, 2)
	cfgA, cfgB := testConfig(t), testConfig(t)
	cfgA.ID, cfgB.ID = "a", "b"
	a, _ := startCoordinator(t, cfgA)
	waitReady(t, a)
	b, _ := startCoordinator(t, cfgB)
	p, base := startProxyGateway(t, "127.0.0.1:1", b.Addr(), a.Addr())

	if err := p.Serving(); err != nil {
		t.Errorf("Serving() = %v, want nil (a leads)", err)
	}
	if code, _, data := call(t, testCtx(t), http.MethodGet, base+"/health", ""); code != http.StatusOK {
		t.Errorf("GET /health = %d %s, want 200", code, data)
	}
	for range 2 {
		code, data := post(t, base, "/v1/completions", `{"prompt":[10,11],"max_tokens":4,"temperature":0,"ignore_eos":true,"return_token_ids":true}`)
		res := decode[gateway.CompletionResponse](t, data)
		if code != http.StatusOK || len(res.Choices) != 1 || !slices.Equal(res.Choices[0].TokenIDs, echo([]int{10, 11}, 4)) {
			t.Fatalf("POST /v1/completions through the proxy = %d %s, want 200 and %v", code, data, echo([]int{10, 11}, 4))
		}
	}
	p.mu.Lock()
	last := p.last
	p.mu.Unlock()
	if last != 2 {
		t.Errorf("the proxy's coordinator after two requests = %d, want 2 (the leader)", last)
	}
	code, data := post(t, base, "/v1/completions", `{"prompt":[10,11],"max_tokens":100000,"stream":true}`)
	if code != http.StatusBadRequest || !strings.Contains(string(data), "max_tokens") {
		t.Errorf("POST /v1/completions with max_tokens past the context = %d %s, want 400 naming max_tokens", code, data)
	}

	// Without a leader: 503 after the take-over wait, naming why.
	_, base = startProxyGateway(t, "127.0.0.1:1", b.Addr())
	code, data = post(t, base, "/v1/completions", `{"prompt":[10,11],"max_tokens":2}`)
	if code != http.StatusServiceUnavailable || !strings.Contains(string(data), "not_leader") {
		t.Errorf("POST /v1/completions with no leader among the coordinators = %d %s, want 503 not_leader", code, data)
	}
	if err := p.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	if _, err := NewProxy(ProxyConfig{Model: fixture}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("NewProxy without coordinators = %v, want ErrInvalidConfig", err)
	}
}
