package coordinator

import "errors"

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
	// ErrKVCapacity means a request whose prompt and max_tokens need more KV blocks (at their worst case)
	// than the largest serving group's workers hold: it could never run, so it is refused at once
	// (INVALID_ARGUMENT, HTTP 400) with the numbers.
	ErrKVCapacity = errors.New("coordinator: request exceeds the KV cache")
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
	// ErrStepTimeout means a rank did not answer a step within its deadline (Config.StepTimeout and
	// StepTokenTimeout): a hung or partially-addressed group. The group is failed and its requests resume
	// elsewhere.
	ErrStepTimeout = errors.New("coordinator: step timed out")
	// ErrNotPlaced means a request handed back by a group that stopped or failed found no other group
	// within Config.ResumeTimeout. The error also wraps the failure that handed it back, if any.
	ErrNotPlaced = errors.New("coordinator: request not placed again")
	// ErrClosed means the coordinator was closed before or during the call.
	ErrClosed = errors.New("coordinator: closed")
)
