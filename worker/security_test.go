package worker_test

import (
	"crypto/tls"
	"errors"
	"io"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/internal/security"
	"github.com/tpfleet/tpfleet/internal/security/securitytest"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/worker"
)

// dialTLS connects to a worker's gRPC server with cfg.
func dialTLS(t *testing.T, addr string, cfg *tls.Config) tpfleetv1.WorkerClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return tpfleetv1.NewWorkerClient(conn)
}

// stepCode opens a Step stream, sends an empty step and returns the code the stream ends with.
func stepCode(t *testing.T, c tpfleetv1.WorkerClient) codes.Code {
	t.Helper()
	s, err := c.Step(testCtx(t))
	if err != nil {
		return status.Code(err)
	}
	if err := s.Send(&tpfleetv1.StepRequest{Step: 1, Epoch: 1}); err != nil && err != io.EOF {
		return status.Code(err)
	}
	_, err = s.Recv()
	return status.Code(err)
}

// TestSecurity is issue 16's acceptance on the worker: two workers with TLS form a TP group over a TCP
// ring in TLS and generate the fixture's greedy ids for a coordinator's certificate; Step from a
// client's certificate, a worker's, one of another CA and none is refused with its code, and the
// workers go on serving their coordinator.
func TestSecurity(t *testing.T) {
	gold := readGolden(t)
	certs := securitytest.Certs(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	cfg0, cfg1 := testConfig(t, e, "w0"), testConfig(t, e, "w1")
	cfg0.TLS, cfg1.TLS = certs.Load(t, "worker"), certs.Load(t, "worker")
	w0, w1 := startWorker(t, cfg0), startWorker(t, cfg1)
	coord := certs.Load(t, "coordinator").ClientConfig(security.RoleWorker)
	c0, c1 := dialTLS(t, w0.Addr(), coord), dialTLS(t, w1.Addr(), coord)
	putPlan(t, cli, plan(1, w0, w1), c0, c1)
	g := newGroup(t, 1, c0, c1)
	if got := g.generate(1, gold.Prompt, len(gold.Greedy)); !equalIDs(got, gold.Greedy) {
		t.Fatalf("TP=2 over TLS: greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy))
	}

	noCert := certs.Load(t, "client").ClientConfig(security.RoleWorker)
	noCert.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	other := securitytest.Certs(t)
	for _, tc := range []struct {
		name string
		tls  *tls.Config
		code codes.Code
	}{
		{"a client certificate", certs.Load(t, "client").ClientConfig(security.RoleWorker), codes.PermissionDenied},
		{"an admin certificate", certs.Load(t, "admin").ClientConfig(security.RoleWorker), codes.PermissionDenied},
		{"a worker certificate", certs.Load(t, "worker").ClientConfig(security.RoleWorker), codes.PermissionDenied},
		{"no certificate", noCert, codes.Unavailable},
		{"another CA's coordinator", other.Load(t, "coordinator").ClientConfig(), codes.Unavailable},
	} {
		if got := stepCode(t, dialTLS(t, w0.Addr(), tc.tls)); got != tc.code {
			t.Errorf("Step with %s = %v, want %v", tc.name, got, tc.code)
		}
		_, err := dialTLS(t, w0.Addr(), tc.tls).LoadPlan(testCtx(t), &tpfleetv1.LoadPlanRequest{Epoch: 1})
		if status.Code(err) != tc.code {
			t.Errorf("LoadPlan with %s = %v, want %v", tc.name, err, tc.code)
		}
	}
	// An admin may read the status; the group still serves its coordinator.
	if _, err := dialTLS(t, w0.Addr(), certs.Load(t, "admin").ClientConfig(security.RoleWorker)).Status(testCtx(t), &tpfleetv1.StatusRequest{}); err != nil {
		t.Errorf("Status with an admin certificate = %v, want nil", err)
	}
	if got := g.generate(2, gold.Prompt, len(gold.Greedy)); !equalIDs(got, gold.Greedy) {
		t.Errorf("after the refusals: greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy))
	}

	// A worker does not start with a certificate that is not a worker's, or of another cluster.
	for name, tl := range map[string]*security.TLS{"a client's": certs.Load(t, "client"), "another cluster's": securitytest.CertsFor(t, "other").Load(t, "worker")} {
		cfg := testConfig(t, e, "w9")
		cfg.TLS = tl
		w, err := worker.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Start(testCtx(t)); !errors.Is(err, worker.ErrInvalidConfig) {
			t.Errorf("Start with %s certificate = %v, want ErrInvalidConfig", name, err)
		}
		_ = w.Close()
	}
}
