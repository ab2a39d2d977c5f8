package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/tpfleet/tpfleet/coordinator"
	"github.com/tpfleet/tpfleet/gateway"
	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
)

// gatewayShutdownGrace is how long a stopping gateway lets its streams finish before it cuts them.
const gatewayShutdownGrace = 5 * time.Second

// runGateway serves the OpenAI-compatible HTTP API in a process of its own, over the coordinators'
// gRPC API (coordinator.Proxy): a coordinator's death then cuts its streams with an SSE error event
// instead of a bare connection reset, and new requests go to the standby that takes over. It prints
// the address it listens on to stdout.
//
//	tpfleet gateway --coordinators HOST:7070,HOST2:7070 --model DIR [--http-listen ADDR] [--api-key KEY]
//
// With --tls-cert (a certificate with the client role) it serves HTTPS and dials the coordinators with
// mTLS; --token is the coordinators' API key it sends them.
func runGateway(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		coords, model, listen, servedName, origins, logLevel, token string
		apiKeys                                                     []string
		maxModelLen                                                 int
		tf                                                          tlsFlags
	)
	fs := flag.NewFlagSet("gateway", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&coords, "coordinators", "", "comma-separated gRPC addresses of the cluster's coordinators (leader and standbys)")
	fs.StringVar(&model, "model", "", "the checkpoint directory the coordinators serve (its configs and tokenizer are read, not its weights)")
	fs.StringVar(&listen, "http-listen", coordinator.DefaultHTTPAddr, "host:port of the OpenAI-compatible HTTP API (port 0: any)")
	keysFlag(fs, &apiKeys, "api-key", "bearer token the /v1 routes require; repeat for several (none: no token)")
	tokenFlag(fs, &token, "the API key the coordinators require, sent with every call")
	tf.add(fs)
	fs.StringVar(&servedName, "served-model-name", "", "the model's name in the API, as the coordinators' (empty: the checkpoint directory's name)")
	fs.IntVar(&maxModelLen, "max-model-len", 0, "context of a request, as the coordinators' (0: max_position_embeddings)")
	fs.StringVar(&origins, "allowed-origins", "", `comma-separated origins CORS allows ("*": any; empty: no CORS)`)
	var media gateway.MediaConfig
	media.AddFlags(fs)
	fs.StringVar(&logLevel, "log-level", "info", "log level on stderr: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case model == "":
		return usagef("--model is required")
	case len(splitList(coords)) == 0:
		return usagef("--coordinators is required (e.g. --coordinators 127.0.0.1:7070)")
	}
	log, err := newLogger(stderr, logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr
	tl, stopTLS, err := tf.start(ctx, log)
	if err != nil {
		return err
	}
	defer stopTLS()
	if warn, err := security.CheckListen("--http-listen", listen, tl != nil, tf.cfg.Insecure); err != nil {
		return usagef("%v", err)
	} else if warn {
		log.Warn(security.InsecureWarning, zap.String("http-listen", listen))
	}
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(grpcauth.DialCredentials(tl, security.RoleCoordinator))}
	if token != "" {
		dopts = append(dopts, grpc.WithPerRPCCredentials(grpcauth.Bearer(token)))
	}
	p, err := coordinator.NewProxy(coordinator.ProxyConfig{Coordinators: splitList(coords), Model: model,
		ServedModelName: servedName, MaxModelLen: maxModelLen, Logger: log,
		Dial: func(addr string) (*grpc.ClientConn, error) { return grpc.NewClient(addr, dopts...) }})
	if err != nil {
		return err
	}
	defer p.Close()
	g, err := gateway.New(gateway.Config{Generator: p, Logger: log, AllowedOrigins: splitList(origins), APIKeys: apiKeys, Media: media})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("gateway: listen: %w", err)
	}
	if tl != nil {
		lis = tls.NewListener(lis, tl.ServerConfig(false))
	}
	srv := g.NewServer()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	if _, err := fmt.Fprintln(stdout, lis.Addr().String()); err != nil {
		_ = srv.Close()
		return err
	}
	log.Info("gateway serving; stop with Ctrl-C", zap.String("http-addr", lis.Addr().String()), zap.Strings("coordinators", splitList(coords)))
	select {
	case err := <-errc:
		return fmt.Errorf("gateway: serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), gatewayShutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("gateway: serve: %w", err)
	}
	return nil
}
