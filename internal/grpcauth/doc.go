// Package grpcauth applies tpfleet's authorisation to gRPC: per-method rules over the caller's
// certificate roles (package internal/security) and bearer tokens, as server interceptors
// (Authorizer), and the client side's credentials (DialCredentials, Bearer).
//
// A missing or wrong token is UNAUTHENTICATED; a caller known by its certificate or its token that may
// not call the method is PERMISSION_DENIED. With TLS, a caller without a certificate of the CA never
// gets as far as a method: the handshake fails, and its client reports UNAVAILABLE.
package grpcauth
