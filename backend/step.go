package backend

// StepRecorder is implemented by backends that can record the ops of one model step and replay the
// recording for later steps of the same shapes (CUDA graphs), instead of issuing the ops one by one.
//
// Step runs f, which issues one step's ops and returns its result. Steps given the same key must issue
// the same ops on operands of the same shapes (a decode step over a batch of B sequences, say); their
// host arguments (token ids, positions) may differ. f may run more than once within one Step (a replay
// that turns out different is undone and run again), so it must have no effect besides its ops; ops
// undo their own host bookkeeping (KV cache positions). The result is valid until the next Step with the
// same key, which may reuse its memory.
type StepRecorder interface {
	Step(key string, f func() (Tensor, error)) (Tensor, error)
}

// AddNormer is implemented by backends that fuse the residual add with the RMSNorm that follows it:
// AddRMSNorm returns sum = x + y (as Add) and RMSNorm(sum, weight, eps) (as RMSNorm), with the same
// values as the two ops.
type AddNormer interface {
	AddRMSNorm(x, y, weight Tensor, eps float32) (sum, normed Tensor, err error)
}

// AttendSpan is one sequence's share of a batched attention: rows [Start, End) of q, k and v, at the
// absolute positions Pos (End - Start of them), against the sequence's Cache.
type AttendSpan struct {
	Cache      KVCache
	Start, End int
	Pos        []int
}

// BatchAttender is implemented by backends that append and attend the rows of several sequences in one
// call. AttendBatch does, for each span in order, Cache.Append(k rows, v rows, Pos) and then
// Attention(q rows, Cache, Pos, window, scale), and returns the outputs in row order ([T, heads, D]): the
// values of those calls, in fewer launches. The spans must cover the rows in order, each cache once.
type BatchAttender interface {
	AttendBatch(q, k, v Tensor, spans []AttendSpan, window Window, scale float32) (Tensor, error)
}

// QKRotator is implemented by backends that rotate queries and keys in one op: RoPEQK(q, k, pos,
// invFreq, norm, eps) returns RoPE(q, pos, invFreq) and RoPE(k, pos, invFreq), each followed, when norm is
// set, by the weightless RMSNorm(·, nil, eps) of every head (Llama 4's qk-norm), with the values of those
// ops up to float32 summation order in the norm.
type QKRotator interface {
	RoPEQK(q, k Tensor, pos []int, invFreq []float32, norm bool, eps float32) (Tensor, Tensor, error)
}

// MultiLinear is implemented by backends that compute several products of one input in one go:
// LinearMulti(x, w0, w1, ...) returns Linear(x, w0), Linear(x, w1), ... with the same values (attention's
// q, k and v; a gated MLP's gate and up).
type MultiLinear interface {
	LinearMulti(x Tensor, ws ...Tensor) ([]Tensor, error)
}

// ExpertsAdder is implemented by backends that add a tensor to the routed experts' output in the same
// pass: ExpertsAdd(x, r, gateUp, down, first, add) returns Add(Experts(x, r, gateUp, down, first), add)
// with the same values (Llama 4 adds the shared expert's output).
type ExpertsAdder interface {
	ExpertsAdd(x Tensor, r Routing, gateUp, down Tensor, first int, add Tensor) (Tensor, error)
}

// GatedLinear is implemented by backends that compute a gated MLP's activation in the pass that computes
// the products it comes from: LinearGated(x, gate, up, ws...) returns SiLUMul(Linear(x, gate), Linear(x,
// up)) and Linear(x, w) for each of ws (the other products of the same x a layer needs: a MoE's router),
// with the same values as those ops.
type GatedLinear interface {
	LinearGated(x, gate, up Tensor, ws ...Tensor) (act Tensor, ys []Tensor, err error)
}

// QKTransform is what an attention's queries and keys go through before it: with InvFreq (not nil),
// RoPE(·, pos, InvFreq) of q and k at the rows' positions, then with Norm the weightless RMSNorm(·, nil,
// Eps) of every head (QKRotator's RoPEQK); then, with QScale (not nil, one factor a row), ScaleRows(q,
// QScale).
type QKTransform struct {
	InvFreq []float32
	Norm    bool
	Eps     float32
	QScale  []float32
}

// QKAttender is implemented by backends that transform the queries and keys of a batched attention in
// the pass that appends its keys and values to the caches: AttendBatchQK(q, k, v, spans, window, scale,
// tr) returns AttendBatch(q', k', v, spans, window, scale), where q' and k' are q and k under tr at the
// spans' positions, with the same values (and the same effect on the caches).
type QKAttender interface {
	AttendBatchQK(q, k, v Tensor, spans []AttendSpan, window Window, scale float32, tr QKTransform) (Tensor, error)
}
