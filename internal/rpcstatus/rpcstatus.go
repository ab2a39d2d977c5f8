// Package rpcstatus turns a package's errors into gRPC status errors through one table, the way each
// gRPC service of tpfleet answers (house rule 5): the first rule whose error errors.Is matches gives the
// code, and, when the table has a domain, a google.rpc.ErrorInfo detail naming the reason. Each service
// keeps its own table and decides what an error no rule matches becomes.
//
// It imports only gRPC's status packages, so the coordinator and the worker share it without cgo.
package rpcstatus

import (
	"errors"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Rule maps the errors that wrap Err (errors.Is) to Code.
type Rule struct {
	Err  error
	Code codes.Code
	// Reason is the ErrorInfo reason ("QUEUE_FULL"); empty adds no detail.
	Reason string
}

// Table is a service's rules, first match wins: more specific errors come first.
type Table struct {
	// Domain is the ErrorInfo domain of the reasons; empty adds no details.
	Domain string
	Rules  []Rule
}

// Match returns the first rule that err matches, and false when none does (or err is nil).
func (t Table) Match(err error) (Rule, bool) {
	if err == nil {
		return Rule{}, false
	}
	for _, r := range t.Rules {
		if errors.Is(err, r.Err) {
			return r, true
		}
	}
	return Rule{}, false
}

// Status returns a status error of r's code with message msg, and an ErrorInfo detail of r's reason
// when r has one and t a domain (the plain status when the detail cannot be attached).
func (t Table) Status(r Rule, msg string) error {
	st := status.New(r.Code, msg)
	if r.Reason != "" && t.Domain != "" {
		if d, err := st.WithDetails(&errdetails.ErrorInfo{Reason: r.Reason, Domain: t.Domain}); err == nil {
			st = d
		}
	}
	return st.Err()
}

// Reason returns the ErrorInfo reason of domain that a status error carries, or "" when it carries
// none.
func Reason(err error, domain string) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == domain {
			return info.GetReason()
		}
	}
	return ""
}
