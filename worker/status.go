package worker

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/rpcstatus"
)

// statusCodes maps the package's errors (and the context's) to gRPC codes, first match wins. It is the
// one table of the service; see toStatus.
var statusCodes = rpcstatus.Table{Rules: []rpcstatus.Rule{
	{Err: ErrClosed, Code: codes.Unavailable},
	{Err: cluster.ErrClosed, Code: codes.Unavailable},
	{Err: cluster.ErrUnavailable, Code: codes.Unavailable},
	{Err: ErrSuperseded, Code: codes.Aborted},
	{Err: ErrFailed, Code: codes.Unavailable},
	{Err: ErrInvalidRequest, Code: codes.InvalidArgument},
	{Err: ErrKVCacheFull, Code: codes.ResourceExhausted},
	{Err: ErrEpochMismatch, Code: codes.FailedPrecondition},
	{Err: ErrStaleLeader, Code: codes.FailedPrecondition},
	{Err: ErrNotServing, Code: codes.Unavailable},
	{Err: ErrUnknownSequence, Code: codes.NotFound},
	{Err: ErrProtocol, Code: codes.InvalidArgument},
	{Err: context.DeadlineExceeded, Code: codes.DeadlineExceeded},
	{Err: context.Canceled, Code: codes.Canceled},
}}

// toStatus turns err into a gRPC status error through statusCodes, its text on one line; a status
// error stays as it is and unknown errors become Internal.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	if r, ok := statusCodes.Match(err); ok {
		code = r.Code
	}
	return status.Error(code, oneLine(err.Error()))
}

// oneLine keeps an error's text on one line, as StepResponse.error and logs want it.
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	return strings.Join(strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }), "; ")
}
