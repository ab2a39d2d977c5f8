package worker

import "errors"

// Sentinel errors, tested with errors.Is. A StepResponse.error is the text of an error that wraps one of
// them, so its prefix ("worker: epoch mismatch", …) tells the coordinator what happened; the package
// doc lists which ones leave the stream and the worker usable.
var (
	// ErrInvalidConfig means a Config fails Validate.
	ErrInvalidConfig = errors.New("worker: invalid config")
	// ErrDeviceUnavailable means Start could not open Config.Device on this host (for a GPU backend,
	// its driver, a library or device Config.DeviceIndex is missing). The error also wraps the backend's
	// error, which names what is missing and wraps backend.ErrUnavailable.
	ErrDeviceUnavailable = errors.New("worker: device unavailable")
	// ErrProtocol means a StepRequest carries a StepProtocol other than STEP_PROTOCOL_V1.
	ErrProtocol = errors.New("worker: unsupported step protocol")
	// ErrEpochMismatch means a StepRequest names another plan epoch than the one the worker is on.
	ErrEpochMismatch = errors.New("worker: epoch mismatch")
	// ErrNotServing means the worker holds no model for its epoch yet (loading, or building its
	// communicator), or holds none at all (idle: this member has no assignment in the plan).
	ErrNotServing = errors.New("worker: not serving")
	// ErrUnknownSequence means a SequenceWork without start names a sequence the worker does not hold:
	// never started, released, or dropped when the epoch changed.
	ErrUnknownSequence = errors.New("worker: unknown sequence")
	// ErrInvalidRequest means a SequenceWork the model cannot run: no ids, ids outside the vocabulary, a
	// capacity outside [1, max_position_embeddings], more tokens than the sequence's capacity, invalid
	// sampling parameters.
	ErrInvalidRequest = errors.New("worker: invalid request")
	// ErrKVCacheFull means a step would start sequences whose KV blocks, reserved at their capacity, exceed
	// the rank's memory plan: the coordinator admits by the plans, so it overcommitted.
	ErrKVCacheFull = errors.New("worker: KV cache full")
	// ErrFailed means the worker failed in its current epoch: its weights did not load, its
	// communicator could not be built, or a step's forward pass failed (a peer died, a collective timed
	// out). The worker stays failed until a new plan epoch arrives.
	ErrFailed = errors.New("worker: failed")
	// ErrSuperseded means LoadPlan waited for an epoch that a newer plan replaced before it was
	// loaded.
	ErrSuperseded = errors.New("worker: epoch superseded")
	// ErrStaleLeader means a StepRequest came from a coordinator whose leadership is older
	// (StepRequest.leader_rev) than one that has already stepped this worker: a deposed leader that has
	// not noticed yet. It is refused so that two coordinators never drive one TP group.
	ErrStaleLeader = errors.New("worker: step from a deposed leader")
	// ErrClosed means the worker was closed, or is closing.
	ErrClosed = errors.New("worker: closed")
)
