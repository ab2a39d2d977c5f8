package rpcstatus

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var (
	errA = errors.New("pkg: a")
	errB = errors.New("pkg: b")
)

func TestTable(t *testing.T) {
	tab := Table{Domain: "test.v1", Rules: []Rule{
		{Err: errA, Code: codes.InvalidArgument, Reason: "A"},
		{Err: errB, Code: codes.Unavailable},
	}}
	for _, tc := range []struct {
		err    error
		ok     bool
		code   codes.Code
		reason string
	}{
		{fmt.Errorf("op: %w", errA), true, codes.InvalidArgument, "A"},
		{fmt.Errorf("op: %w: %w", errB, errA), true, codes.InvalidArgument, "A"}, // first rule wins
		{fmt.Errorf("op: %w", errB), true, codes.Unavailable, ""},
		{errors.New("other"), false, codes.OK, ""},
		{nil, false, codes.OK, ""},
	} {
		r, ok := tab.Match(tc.err)
		if ok != tc.ok || r.Code != tc.code {
			t.Errorf("Match(%v) = %v, %v, want %v, %v", tc.err, r.Code, ok, tc.code, tc.ok)
			continue
		}
		if !ok {
			continue
		}
		st := tab.Status(r, tc.err.Error())
		if status.Code(st) != tc.code || status.Convert(st).Message() != tc.err.Error() || Reason(st, "test.v1") != tc.reason {
			t.Errorf("Status(%v) = %v (reason %q), want %v with reason %q", tc.err, st, Reason(st, "test.v1"), tc.code, tc.reason)
		}
		if got := Reason(st, "other.v1"); got != "" {
			t.Errorf("Reason(%v, other.v1) = %q, want \"\"", st, got)
		}
	}
}
