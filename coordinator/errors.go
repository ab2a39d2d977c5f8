package coordinator

import (
	"context"
	"errors"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/cluster"
)

// Sentinel errors, tested with errors.Is. Errors the package returns wrap one of them, or a context
// error, with the operation's details.
var (
	// ErrInvalidConfig means a Config that fails Validate, or a model directory whose configs do not
	// load or do not fit the TP size.
	ErrInvalidConfig = errors.New("coordinator: invalid config")
	// ErrInvalidRequest means a request the coordinator will never serve as sent: an empty prompt, ids
	// outside the vocabulary, max_tokens not positive or past the context, an unknown model, bad
	// sampling parameters.
	ErrInvalidRequest = errors.New("coordinator: invalid request")
	// ErrNoTokenizer means a text prompt or a Tokenize call on a model without a tokenizer (no
	// tokenizer.json in its directory): FAILED_PRECONDITION, as no retry helps until the model directory
	// has one and the coordinator restarts.
	ErrNoTokenizer = errors.New("coordinator: no tokenizer")
	// ErrQueueFull means MaxQueue requests are already waiting for a place in a batch.
	ErrQueueFull = errors.New("coordinator: queue full")
	// ErrNotLeader means this coordinator is a standby: another one leads and serves.
	ErrNotLeader = errors.New("coordinator: not the leader")
	// ErrNoPlan means no plan with a TP group is in force: too few workers for one group.
	ErrNoPlan = errors.New("coordinator: no plan is serving")
	// ErrWorkerLost means a worker's Step stream broke (the process died or the network failed); the
	// requests of its group fail and the group reconnects.
	ErrWorkerLost = errors.New("coordinator: worker lost")
	// ErrStepFailed means a worker answered a step with an error.
	ErrStepFailed = errors.New("coordinator: step failed")
	// ErrClosed means the coordinator was closed before or during the call.
	ErrClosed = errors.New("coordinator: closed")
)

// ErrorDomain is the domain of the google.rpc.ErrorInfo detail that the coordinator's gRPC errors
// carry; its reason names the sentinel (QUEUE_FULL, NOT_LEADER, ...).
const ErrorDomain = "tpfleet.v1"

// statusTable maps errors to gRPC status codes and ErrorInfo reasons; the first entry that errors.Is
// matches wins, so more specific errors come first.
var statusTable = []struct {
	err    error
	code   codes.Code
	reason string
}{
	{ErrNoTokenizer, codes.FailedPrecondition, "NO_TOKENIZER"},
	{ErrInvalidRequest, codes.InvalidArgument, "INVALID_REQUEST"},
	{ErrQueueFull, codes.ResourceExhausted, "QUEUE_FULL"},
	{ErrNotLeader, codes.Unavailable, "NOT_LEADER"},
	{ErrNoPlan, codes.Unavailable, "NO_PLAN"},
	{ErrWorkerLost, codes.Unavailable, "WORKER_LOST"},
	{ErrClosed, codes.Unavailable, "CLOSED"},
	{ErrStepFailed, codes.Internal, "STEP_FAILED"},
	{cluster.ErrInvalid, codes.InvalidArgument, "INVALID_REQUEST"},
	{cluster.ErrConflict, codes.Aborted, "PLAN_CONFLICT"},
	{cluster.ErrNotLeader, codes.Unavailable, "NOT_LEADER"},
	{cluster.ErrUnavailable, codes.Unavailable, "ETCD_UNAVAILABLE"},
	{cluster.ErrClosed, codes.Unavailable, "CLOSED"},
	{context.Canceled, codes.Canceled, "CANCELLED"},
	{context.DeadlineExceeded, codes.DeadlineExceeded, "DEADLINE_EXCEEDED"},
}

// toStatus turns err into a gRPC status error with err's message and an ErrorInfo detail naming the
// reason; errors that match nothing in statusTable keep the code of a gRPC status they wrap, else are
// INTERNAL. A nil err stays nil.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	for _, e := range statusTable {
		if errors.Is(err, e.err) {
			st := status.New(e.code, err.Error())
			if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: e.reason, Domain: ErrorDomain}); derr == nil {
				st = d
			}
			return st.Err()
		}
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
func Reason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetDomain() == ErrorDomain {
			return info.GetReason()
		}
	}
	return ""
}
