package cuda

import (
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/backend"
)

// maxSharedFloats bounds H and I in Experts: the kernels keep one row of H (or I) floats in shared
// memory, within the default 48 KiB.
const maxSharedFloats = 48 << 10 / 4

// routing is the cuda Routing: for T tokens, k expert ids (int32) and their scores (float32) in device
// memory, token-major, in the order Route chose them.
type routing struct {
	b       *Backend
	tokens  int
	k       int
	experts *buffer
	scores  *buffer
}

var _ backend.Routing = (*routing)(nil)

// TopK returns the number of experts chosen per token.
func (r *routing) TopK() int { return r.k }

// Route picks, for each row of logits [T, E], the k largest raw logits (ties to the lower index, a NaN
// never larger than a number) and scores them with sigmoid, evaluated in float64 and rounded. The
// choice stays in device memory.
func (b *Backend) Route(logits backend.Tensor, k int) (backend.Routing, error) {
	lt, err := b.asTensor("route", "logits", logits)
	if err != nil {
		return nil, err
	}
	if len(lt.shape) != 2 || k < 1 || k > lt.shape[1] {
		return nil, fmt.Errorf("cuda: route logits%v k=%d: %w", lt.shape, k, backend.ErrShape)
	}
	T, E := lt.shape[0], lt.shape[1]
	r := &routing{b: b, tokens: T, k: k}
	n := int64(T) * int64(k) * 4
	if r.experts, err = b.pool.get(n); err != nil {
		return nil, err
	}
	r.experts = b.pool.owned(r.experts)
	if r.scores, err = b.pool.get(n); err != nil {
		return nil, err
	}
	r.scores = b.pool.owned(r.scores)
	if T == 0 {
		return r, nil
	}
	err = b.stream.launch(b.k.route, dim3{uint32((T + 127) / 128), 1, 1}, dim3{128, 1, 1}, 0,
		lt, int(lt.dt), T, E, k, r.experts, r.scores)
	if err != nil {
		return nil, fmt.Errorf("cuda: route: %w", err)
	}
	return r, nil
}

func (b *Backend) asRouting(op string, r backend.Routing) (*routing, error) {
	rt, ok := r.(*routing)
	if !ok || rt == nil || rt.b != b {
		return nil, fmt.Errorf("cuda: %s: routing is a %T of another backend: %w", op, r, ErrForeign)
	}
	return rt, nil
}

// ReadRouting copies the choice r holds to the host (backendtest.RoutingReader): experts[t·k + j] is
// token t's j-th expert and scores[t·k + j] its score. It waits for the GPU.
func (b *Backend) ReadRouting(r backend.Routing) (experts []int, scores []float32, err error) {
	rt, err := b.asRouting("read routing", r)
	if err != nil {
		return nil, nil, err
	}
	n := rt.tokens * rt.k
	raw := make([]byte, 4*n)
	if err := b.download(raw, rt.experts.ptr); err != nil {
		return nil, nil, err
	}
	experts = make([]int, n)
	for i := range experts {
		experts[i] = int(int32(uint32(raw[4*i]) | uint32(raw[4*i+1])<<8 | uint32(raw[4*i+2])<<16 | uint32(raw[4*i+3])<<24))
	}
	if err := b.download(raw, rt.scores.ptr); err != nil {
		return nil, nil, err
	}
	scores = make([]float32, n)
	for i := range scores {
		scores[i] = math.Float32frombits(uint32(raw[4*i]) | uint32(raw[4*i+1])<<8 | uint32(raw[4*i+2])<<16 | uint32(raw[4*i+3])<<24)
	}
	return experts, scores, nil
}

// Experts computes, for each row t of x [T, H], the sum over its chosen experts e (those among first ..
// first+E-1, in routing order) of (up ⊙ silu(gate))·down[e], where [gate | up] = (x[t]·s)·gateUp[e];
// gateUp is [E, H, 2I] and down [E, I, H]. Two kernels, both reading the expert ids from device memory:
// a GEMV per routing slot for gate|up with SiLU·mul (float32 activations in a temporary buffer), then a
// GEMV per token summing its slots' down projections. Returns [T, H].
func (b *Backend) Experts(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int) (backend.Tensor, error) {
	xt, err := b.asTensor("experts", "x", x)
	if err != nil {
		return nil, err
	}
	rt, err := b.asRouting("experts", r)
	if err != nil {
		return nil, err
	}
	gt, err := b.asTensor("experts", "gateUp", gateUp)
	if err != nil {
		return nil, err
	}
	dt, err := b.asTensor("experts", "down", down)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 2 || len(gt.shape) != 3 || len(dt.shape) != 3 || rt.tokens != xt.shape[0] ||
		gt.shape[0] != dt.shape[0] || gt.shape[1] != xt.shape[1] || gt.shape[2] != 2*dt.shape[1] || dt.shape[2] != xt.shape[1] {
		return nil, fmt.Errorf("cuda: experts x%v routing[%d×%d] gateUp%v down%v: %w",
			xt.shape, rt.tokens, rt.k, gt.shape, dt.shape, backend.ErrShape)
	}
	T, H := xt.shape[0], xt.shape[1]
	E, I := gt.shape[0], dt.shape[1]
	k := rt.k
	if H > maxSharedFloats || I > maxSharedFloats {
		return nil, fmt.Errorf("cuda: experts H=%d I=%d: at most %d each: %w", H, I, maxSharedFloats, backend.ErrShape)
	}
	if first < math.MinInt32/2 || first > math.MaxInt32/2 {
		first = math.MaxInt32 / 2 // no expert id reaches it: every slot is elsewhere
	}
	out, err := b.newTensor(F32, T, H) // a residual-stream update
	if err != nil {
		return nil, err
	}
	if T == 0 || H == 0 {
		return out, nil
	}
	act, err := b.pool.get(int64(T) * int64(k) * int64(max(I, 1)) * 4)
	if err != nil {
		return nil, err
	}
	defer b.pool.release(*act)
	if I > 0 {
		if err := b.stream.launch(b.k.expertGateUp, dim3{uint32(T * k), uint32((I + 127) / 128), 1}, dim3{128, 1, 1}, H*4,
			xt, int(xt.dt), rt.experts, rt.scores, k, gt, int(gt.dt), first, E, H, I, act); err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
	}
	err = b.stream.launch(b.k.expertDown, dim3{uint32(T), uint32((H + 127) / 128), 1}, dim3{128, 1, 1}, I*4,
		act, rt.experts, k, dt, int(dt.dt), first, E, H, I, out, int(out.dt))
	return b.result("experts", out, err)
}
