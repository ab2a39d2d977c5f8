package grpcauth_test

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
)

// TestAuthorizeWithoutTLS: without TLS only tokens decide (a loopback or --insecure server): the
// coordinator's rules refuse a missing or wrong key with UNAUTHENTICATED and an API key on Admin with
// PERMISSION_DENIED; a rule without tokens is open; an unknown method is refused. (With TLS, the
// coordinator's and worker's TestSecurity cover roles.)
func TestAuthorizeWithoutTLS(t *testing.T) {
	api, admin := security.NewTokens("sk-api"), security.NewTokens("sk-admin")
	rules := func(adminKeys security.Tokens) *grpcauth.Authorizer {
		return &grpcauth.Authorizer{Rules: []grpcauth.Rule{
			{Prefix: "/grpc.health.v1.Health/", Open: true},
			{Prefix: "/tpfleet.v1.Generation/", Roles: []security.Role{security.RoleClient}, Tokens: api},
			{Prefix: "/tpfleet.v1.Admin/", Roles: []security.Role{security.RoleAdmin}, Tokens: adminKeys, TokenOrRole: true, Known: api},
		}}
	}
	withToken := func(tok string) context.Context {
		if tok == "" {
			return context.Background()
		}
		return metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+tok))
	}
	for _, tc := range []struct {
		name      string
		adminKeys security.Tokens
		method    string
		token     string
		want      codes.Code
	}{
		{"health", admin, "/grpc.health.v1.Health/Check", "", codes.OK},
		{"generate, key", admin, "/tpfleet.v1.Generation/Generate", "sk-api", codes.OK},
		{"generate, no key", admin, "/tpfleet.v1.Generation/Generate", "", codes.Unauthenticated},
		{"generate, wrong key", admin, "/tpfleet.v1.Generation/Generate", "sk-nope", codes.Unauthenticated},
		{"generate, admin key", admin, "/tpfleet.v1.Generation/Generate", "sk-admin", codes.Unauthenticated},
		{"admin, admin key", admin, "/tpfleet.v1.Admin/Rebalance", "sk-admin", codes.OK},
		{"admin, no key", admin, "/tpfleet.v1.Admin/Rebalance", "", codes.Unauthenticated},
		{"admin, API key", admin, "/tpfleet.v1.Admin/Rebalance", "sk-api", codes.PermissionDenied},
		{"admin, wrong key", admin, "/tpfleet.v1.Admin/Rebalance", "sk-nope", codes.Unauthenticated},
		{"admin without admin keys", security.Tokens{}, "/tpfleet.v1.Admin/Rebalance", "", codes.OK},
		{"unknown method", admin, "/tpfleet.v1.Worker/Step", "sk-admin", codes.PermissionDenied},
	} {
		err := rules(tc.adminKeys).Authorize(withToken(tc.token), tc.method)
		if got := status.Code(err); got != tc.want {
			t.Errorf("%s: Authorize(%s) = %v, want %v", tc.name, tc.method, err, tc.want)
		}
		if err != nil && tc.token != "" && strings.Contains(err.Error(), tc.token) {
			t.Errorf("%s: the error %q shows the token", tc.name, err)
		}
	}
}
