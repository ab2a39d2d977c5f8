package coordinator

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/rpcstatus"
)

// ErrorDomain is the domain of the google.rpc.ErrorInfo detail that the coordinator's gRPC errors
// carry; its reason names the sentinel (QUEUE_FULL, NOT_LEADER, ...).
const ErrorDomain = "tpfleet.v1"

// statusTable maps errors to gRPC status codes and ErrorInfo reasons; the first entry that errors.Is
// matches wins, so more specific errors come first.
var statusTable = rpcstatus.Table{Domain: ErrorDomain, Rules: []rpcstatus.Rule{
	{Err: ErrNoTokenizer, Code: codes.FailedPrecondition, Reason: "NO_TOKENIZER"},
	{Err: ErrInvalidRequest, Code: codes.InvalidArgument, Reason: "INVALID_REQUEST"},
	{Err: ErrQueueFull, Code: codes.ResourceExhausted, Reason: "QUEUE_FULL"},
	{Err: ErrKVCapacity, Code: codes.InvalidArgument, Reason: "KV_CAPACITY"},
	{Err: ErrNotLeader, Code: codes.Unavailable, Reason: "NOT_LEADER"},
	{Err: ErrNoPlan, Code: codes.Unavailable, Reason: "NO_PLAN"},
	{Err: ErrNotPlaced, Code: codes.Unavailable, Reason: "NOT_PLACED"}, // before the cause it wraps
	{Err: ErrStepTimeout, Code: codes.Unavailable, Reason: "STEP_TIMEOUT"},
	{Err: ErrWorkerLost, Code: codes.Unavailable, Reason: "WORKER_LOST"},
	{Err: ErrClosed, Code: codes.Unavailable, Reason: "CLOSED"},
	{Err: ErrStepFailed, Code: codes.Internal, Reason: "STEP_FAILED"},
	{Err: cluster.ErrInvalid, Code: codes.InvalidArgument, Reason: "INVALID_REQUEST"},
	{Err: cluster.ErrConflict, Code: codes.Aborted, Reason: "PLAN_CONFLICT"},
	{Err: cluster.ErrNotLeader, Code: codes.Unavailable, Reason: "NOT_LEADER"},
	{Err: cluster.ErrUnavailable, Code: codes.Unavailable, Reason: "ETCD_UNAVAILABLE"},
	{Err: cluster.ErrClosed, Code: codes.Unavailable, Reason: "CLOSED"},
	{Err: context.Canceled, Code: codes.Canceled, Reason: "CANCELLED"},
	{Err: context.DeadlineExceeded, Code: codes.DeadlineExceeded, Reason: "DEADLINE_EXCEEDED"},
}}

// toStatus turns err into a gRPC status error with err's message and an ErrorInfo detail naming the
// reason; errors that match nothing in statusTable keep the code of a gRPC status they wrap, else are
// INTERNAL. A nil err stays nil.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if r, ok := statusTable.Match(err); ok {
		return statusTable.Status(r, err.Error())
	}
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	return status.Error(codes.Internal, err.Error())
}

// Code returns the gRPC code that the coordinator's services answer err with.
func Code(err error) codes.Code { return status.Code(toStatus(err)) }

// Reason returns the ErrorInfo reason of a status error from a coordinator ("QUEUE_FULL", ...), or ""
// when it carries none.
func Reason(err error) string { return rpcstatus.Reason(err, ErrorDomain) }
