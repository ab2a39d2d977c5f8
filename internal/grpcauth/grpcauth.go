package grpcauth

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/internal/security"
)

// Rule says who may call the gRPC methods whose full name starts with Prefix.
type Rule struct {
	// Prefix is a full method name ("/pkg.Service/Method") or a prefix of one ("/pkg.Service/").
	Prefix string
	// Open lets anyone call (health, reflection).
	Open bool
	// Roles are the certificate roles that may call (with TLS on).
	Roles []security.Role
	// Tokens are bearer tokens that may call. When it holds tokens, a caller must send one of them
	// (or, when TokenOrRole, have one of Roles instead).
	Tokens security.Tokens
	// TokenOrRole lets a caller in with either one of Tokens or one of Roles (the Admin API); else a
	// caller needs both when both are configured (the Generation API: a client certificate and an API
	// key).
	TokenOrRole bool
	// Known are tokens that are valid elsewhere but not here (the client API keys on the Admin API):
	// they are refused with PERMISSION_DENIED rather than UNAUTHENTICATED.
	Known security.Tokens
}

// Authorizer checks gRPC calls against Rules: the first rule whose Prefix matches the method applies;
// a method no rule matches is refused. With TLS (a non-nil TLS), peers' certificates were verified
// against the CA by the handshake, and their identity must also name TLS's cluster. Without TLS, roles
// cannot be checked: a rule lets in callers with its tokens, or anyone when it has none.
type Authorizer struct {
	TLS   *security.TLS
	Rules []Rule
}

// Authorize returns nil when the caller of method (its context, from a server handler or
// interceptor) may call it, else a status error: UNAUTHENTICATED for a missing or wrong token,
// PERMISSION_DENIED for a caller known by its certificate or token without the right to call.
func (a *Authorizer) Authorize(ctx context.Context, method string) error {
	var rule *Rule
	for i := range a.Rules {
		if strings.HasPrefix(method, a.Rules[i].Prefix) {
			rule = &a.Rules[i]
			break
		}
	}
	switch {
	case rule == nil:
		return status.Errorf(codes.PermissionDenied, "%s: no caller may call it", method)
	case rule.Open:
		return nil
	}
	token := ""
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("authorization"); len(v) > 0 {
			token = security.BearerToken(v[0])
		}
	}
	tokenOK := rule.Tokens.Len() > 0 && rule.Tokens.Valid(token)
	var id *security.Identity
	if a.TLS != nil {
		if got, ok := peerIdentity(ctx); ok {
			id = &got
		}
	}
	roleOK := id != nil && id.Cluster == a.TLS.Identity().Cluster && id.Has(rule.Roles...)

	if rule.TokenOrRole {
		switch {
		case tokenOK || roleOK:
			return nil
		case token != "" && rule.Known.Valid(token):
			return status.Errorf(codes.PermissionDenied, "%s: this token may not call it", method)
		case token != "":
			return status.Errorf(codes.Unauthenticated, "%s: wrong token", method)
		case id != nil:
			return status.Errorf(codes.PermissionDenied, "%s: certificate %q (roles %v, cluster %q) may not call it; it needs one of %v or a token",
				method, id.Name, id.Roles, id.Cluster, rule.Roles)
		case a.TLS == nil && rule.Tokens.Len() == 0:
			return nil // no TLS and no tokens: nothing to check (loopback, or --insecure)
		default:
			return status.Errorf(codes.Unauthenticated, "%s: send a token (authorization: Bearer TOKEN)", method)
		}
	}
	if a.TLS != nil {
		if id == nil {
			return status.Errorf(codes.Unauthenticated, "%s: no client certificate", method)
		}
		if !roleOK {
			return status.Errorf(codes.PermissionDenied, "%s: certificate %q (roles %v, cluster %q) may not call it; it needs one of %v",
				method, id.Name, id.Roles, id.Cluster, rule.Roles)
		}
	}
	if rule.Tokens.Len() > 0 && !tokenOK {
		if token == "" {
			return status.Errorf(codes.Unauthenticated, "%s: send an API key (authorization: Bearer KEY)", method)
		}
		return status.Errorf(codes.Unauthenticated, "%s: wrong API key", method)
	}
	return nil
}

// peerIdentity is the identity of the verified client certificate of ctx's peer.
func peerIdentity(ctx context.Context) (security.Identity, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return security.Identity{}, false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return security.Identity{}, false
	}
	return security.IdentityOf(info.State.VerifiedChains[0][0]), true
}

// UnaryInterceptor checks every unary call with Authorize.
func (a *Authorizer) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if err := a.Authorize(ctx, info.FullMethod); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
}

// StreamInterceptor checks every streaming call with Authorize.
func (a *Authorizer) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if err := a.Authorize(ss.Context(), info.FullMethod); err != nil {
			return err
		}
		return h(srv, ss)
	}
}

// ServerOptions returns the options of a gRPC server under a: its TLS credentials (mTLS: a client
// certificate is required) when a.TLS is set, and the interceptors.
func (a *Authorizer) ServerOptions() []grpc.ServerOption {
	opts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(a.UnaryInterceptor()),
		grpc.ChainStreamInterceptor(a.StreamInterceptor()),
	}
	if a.TLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(a.TLS.ServerConfig(true))))
	}
	return opts
}

// DialCredentials returns the transport credentials of a gRPC client of a tpfleet server whose
// certificate has one of roles: mTLS with t, or plaintext when t is nil.
func DialCredentials(t *security.TLS, roles ...security.Role) credentials.TransportCredentials {
	if t == nil {
		return insecure.NewCredentials()
	}
	return credentials.NewTLS(t.ClientConfig(roles...))
}

// Bearer is a gRPC PerRPCCredentials that sends a bearer token with every call. It is sent over
// plaintext too (loopback, --insecure).
type Bearer string

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (b Bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (Bearer) RequireTransportSecurity() bool { return false }

// String hides the token from logs and errors.
func (Bearer) String() string { return "Bearer <redacted>" }

var _ credentials.PerRPCCredentials = Bearer("")
