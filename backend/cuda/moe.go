package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"

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
	choices int // the experts the router chose among (its logits' columns); 0 when unknown
	experts *buffer
	scores  *buffer
	// logits, while not nil, are the router's logits whose route kernel Route deferred (FuseRoute), so
	// that planExperts can route them in its plan's launch (route_plan); count, while not nil, is a tally's
	// count of the choices deferred the same way. materialize launches whatever is left, before anything
	// else reads the choices.
	logits *tensor
	count  *pendingCount
}

// pendingCount is an expertTally.Add waiting to be fused: n counters at ptr.
type pendingCount struct {
	ptr devptr
	n   int
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
	r := &routing{b: b, tokens: T, k: k, choices: E}
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
	if b.fused(FuseRoute) && b.off == nil && T <= skinnyRows {
		// Decode: the choice is routed by the expert plan's launch (planExperts), or by materialize if
		// something else reads it first.
		r.logits = lt
		b.pendingRoutes = append(b.pendingRoutes, r)
		return r, nil
	}
	if err := b.launchRoute(lt, r); err != nil {
		return nil, err
	}
	b.offloadRouted(r) // offload.go: an event Experts on offloaded weights can wait for
	return r, nil
}

// launchRoute enqueues the route kernel over lt for r.
func (b *Backend) launchRoute(lt *tensor, r *routing) error {
	err := b.stream.launch(b.k.route, dim3{uint32((r.tokens + 127) / 128), 1, 1}, dim3{128, 1, 1}, 0,
		lt, int(lt.dt), r.tokens, r.choices, r.k, r.experts, r.scores)
	if err != nil {
		return fmt.Errorf("cuda: route: %w", err)
	}
	return nil
}

// materialize launches what Route and expertTally.Add deferred for r (the route kernel, count_experts),
// in that order: before anything but planExperts' fused launch reads r's choices.
func (b *Backend) materialize(r *routing) error {
	if lt := r.logits; lt != nil {
		r.logits = nil
		if err := b.launchRoute(lt, r); err != nil {
			return err
		}
	}
	if c := r.count; c != nil {
		r.count = nil
		if err := b.launchCount(r, c.ptr, c.n); err != nil {
			return err
		}
	}
	return nil
}

// flushRoutes materializes every routing whose work is still deferred: at the end of a Step and before a
// synchronisation, so that nothing Route or a tally's Add promised is left unlaunched when the host looks.
func (b *Backend) flushRoutes() error {
	list := b.pendingRoutes
	b.pendingRoutes = nil
	var first error
	for _, r := range list {
		if err := b.materialize(r); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// unpend removes r from the routings flushRoutes would materialize (its work was fused).
func (b *Backend) unpend(r *routing) {
	b.pendingRoutes = slices.DeleteFunc(b.pendingRoutes, func(x *routing) bool { return x == r })
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
	if err := b.materialize(rt); err != nil {
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
// gateUp is [E, H, 2I] and down [E, I, H]. Returns [T, H] (float32). The expert ids stay on the device
// (moe_plan groups the routing slots by expert there). Three paths:
//   - T <= skinnyRows (decode): a split-K GEMV per active expert (gemv.cu) that reads only the chosen
//     experts' weights with 16-byte loads, float32 math on x as stored; 5 launches, no host round trip.
//   - larger T (prefill) in the default mode: the grouped tensor-core GEMMs of grouped.go (FuseGrouped:
//     one launch for gate_up and one for down over every active expert, the plan read on the device);
//     with that fusion off, one cuBLASLt GEMM per active expert for gate_up and for down, on the tokens
//     gathered by expert (bf16 inputs, float32 accumulation), the per-expert counts brought to the host
//     (one synchronization per MoE layer). Activations F32 keeps the GEMV path.
//   - shapes those kernels do not take (H or I not a multiple of 8 and 4, weights not bf16): the
//     generic per-slot kernels of moe.cu.
func (b *Backend) Experts(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int) (backend.Tensor, error) {
	return b.experts(x, r, gateUp, down, first, nil)
}

var _ backend.ExpertsAdder = (*Backend)(nil)

// ExpertsAdd returns Add(Experts(x, r, gateUp, down, first), add) (backend.ExpertsAdder): the fast paths
// add it in the kernel that sums the experts' outputs, saving a launch and a pass over [T, H].
func (b *Backend) ExpertsAdd(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int, add backend.Tensor) (backend.Tensor, error) {
	at, err := b.asTensor("experts add", "add", add)
	if err != nil {
		return nil, err
	}
	return b.experts(x, r, gateUp, down, first, at)
}

// experts is Experts, plus add when it is not nil.
func (b *Backend) experts(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int, add *tensor) (backend.Tensor, error) {
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
	if gt.host != nil || dt.host != nil {
		return b.expertsOffloaded(xt, rt, gt, dt, first, add)
	}
	if len(xt.shape) != 2 || len(gt.shape) != 3 || len(dt.shape) != 3 || rt.tokens != xt.shape[0] ||
		gt.shape[0] != dt.shape[0] || gt.shape[1] != xt.shape[1] || gt.shape[2] != 2*dt.shape[1] || dt.shape[2] != xt.shape[1] {
		return nil, fmt.Errorf("cuda: experts x%v routing[%d×%d] gateUp%v down%v: %w",
			xt.shape, rt.tokens, rt.k, gt.shape, dt.shape, backend.ErrShape)
	}
	T, H := xt.shape[0], xt.shape[1]
	E, I := gt.shape[0], dt.shape[1]
	if add != nil && (len(add.shape) != 2 || add.shape[0] != T || add.shape[1] != H) {
		return nil, fmt.Errorf("cuda: experts add%v to [%d %d]: %w", add.shape, T, H, backend.ErrShape)
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
	e := &expertsCall{x: xt, r: rt, gu: gt, down: dt, out: out, add: add, first: first, T: T, H: H, E: E, I: I}
	// The fast paths' elementwise kernels index rows × width with 32-bit math.
	small := int64(T*rt.k+E*128)*int64(max(H, 2*I)) < math.MaxInt32
	if gt.q != nil || dt.q != nil {
		fast := small && E > 0 && I > 0 && H%8 == 0 && I%4 == 0 && gt.ptr()%16 == 0 && dt.ptr()%16 == 0 && E <= maxPlanExperts
		return b.expertsQuant(e, fast)
	}
	fast := small && E > 0 && I > 0 && H%8 == 0 && I%4 == 0 && gt.dt == BF16 && dt.dt == BF16 && gt.ptr()%16 == 0 && dt.ptr()%16 == 0 &&
		E <= maxPlanExperts
	switch {
	case fast && T > skinnyRows && b.cfg.Activations == BF16 && b.groupedOK(e): // grouped.go
		b.counts.ExpertsGrouped++
		b.counts.ExpertsMMA++
		if err := b.expertsMMA(e, false); err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
		return out, nil
	case fast && T > skinnyRows && b.cfg.Activations == BF16 && H*I%128 == 0 && gt.ptr()%alignment == 0 && dt.ptr()%alignment == 0:
		done, err := b.expertsGrouped(e)
		if err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
		if done {
			b.counts.ExpertsGrouped++
			return out, nil
		}
		// cuBLASLt had no algorithm for one of the shapes: the GEMV path takes any T.
		fallthrough
	case fast:
		b.counts.ExpertsGEMV++
		if err := b.expertsGEMV(e); err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
		return out, nil
	}
	b.counts.ExpertsSimple++
	if err := b.materialize(rt); err != nil {
		return nil, fmt.Errorf("cuda: experts: %w", err)
	}
	k := rt.k
	if H > maxSharedFloats || I > maxSharedFloats {
		return nil, fmt.Errorf("cuda: experts H=%d I=%d: at most %d each: %w", H, I, maxSharedFloats, backend.ErrShape)
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
	if err != nil || add == nil {
		return b.result("experts", out, err)
	}
	return b.Add(out, add)
}

// expertsQuant is Experts on quantised weights (both must be): the decode GEMV reading the compact
// weights (qexpert_gemv_N; q4expert_gemv_N for int4), or for prefill the FP8 GEMM per active expert
// (fp8gemm.go), q4gemm_experts over every active int4 expert (quant_int4.go, FuseQ4GEMM), else the
// grouped GEMMs on each active expert dequantised to bf16; inputs quantised per token where the formats
// say so. fp8 with dynamic activations above fp8ExpertGemvRows tokens (prefill and decode batches) takes the
// fp8 grouped kernels before those (grouped.go, FuseFP8Grouped). Shapes the fast paths do not take run
// the generic kernels on bf16 copies of the whole weights (weight-only formats only).
func (b *Backend) expertsQuant(e *expertsCall, fast bool) (backend.Tensor, error) {
	gt, dt := e.gu, e.down
	if gt.q == nil || dt.q == nil {
		return nil, fmt.Errorf("cuda: experts gateUp %v (%s) down %v (%s): both quantised or neither: %w",
			gt.shape, formatOf(gt), dt.shape, formatOf(dt), backend.ErrShape)
	}
	if gt.q.code == qfInt4 || dt.q.code == qfInt4 {
		// int4 has its own GEMV (quant_int4.go); the shapes it does not take use the bf16 copies.
		fast = fast && b.q4ExpertsOK(e)
	}
	if !fast {
		if gt.q.dyn() || dt.q.dyn() {
			return nil, fmt.Errorf("cuda: experts x%v gateUp%v down%v (%s): dynamic activations need H %% 8 == 0 and I %% 4 == 0: %w",
				e.x.shape, gt.shape, dt.shape, gt.q.format, errors.ErrUnsupported)
		}
		gb, err := b.dequant(gt, 0, int64(gt.numel()))
		if err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
		defer b.pool.release(*gb)
		db, err := b.dequant(dt, 0, int64(dt.numel()))
		if err != nil {
			return nil, fmt.Errorf("cuda: experts: %w", err)
		}
		defer b.pool.release(*db)
		return b.experts(e.x, e.r, &tensor{b: b, buf: gb, shape: gt.shape, dt: BF16}, &tensor{b: b, buf: db, shape: dt.shape, dt: BF16}, e.first, e.add)
	}
	if e.T > b.fp8ExpertGemvRows && b.cfg.Activations == BF16 && b.fp8GroupedOK(e) { // grouped.go: the fp8 grouped GEMMs
		if err := b.expertsMMA(e, true); err != nil {
			return nil, fmt.Errorf("cuda: experts (%s, fp8 grouped): %w", gt.q.format, err)
		}
		b.counts.ExpertsGrouped++
		b.counts.ExpertsMMA++
		b.counts.ExpertsFP8++
		return e.out, nil
	}
	if (e.T > skinnyRows || b.noQuantGEMV) && b.cfg.Activations == BF16 {
		if b.fp8ExpertsOK(e) { // fp8gemm.go: the FP8 GEMM per active expert
			done, err := b.expertsFP8Grouped(e)
			if err != nil {
				return nil, fmt.Errorf("cuda: experts (%s, fp8 gemm): %w", gt.q.format, err)
			}
			if done {
				b.counts.ExpertsGrouped++
				return e.out, nil
			}
		}
		if b.q4ExpertsGEMMOK(e) { // quant_int4.go: int4 experts on q4gemm, every active expert in one launch
			if err := b.expertsQ4GEMM(e); err != nil {
				return nil, fmt.Errorf("cuda: experts (%s, q4gemm): %w", gt.q.format, err)
			}
			b.counts.ExpertsGrouped++
			b.counts.ExpertsQ4++
			return e.out, nil
		}
		done, err := b.expertsGrouped(e)
		if err != nil {
			return nil, fmt.Errorf("cuda: experts (%s): %w", gt.q.format, err)
		}
		if done {
			b.counts.ExpertsGrouped++
			return e.out, nil
		}
	}
	b.counts.ExpertsGEMV++
	if err := b.expertsGEMV(e); err != nil {
		return nil, fmt.Errorf("cuda: experts (%s): %w", gt.q.format, err)
	}
	return e.out, nil
}

// formatOf names t's weight format for messages.
func formatOf(t *tensor) string {
	if t.q == nil {
		return t.dt.String()
	}
	return t.q.format.String()
}

// launchExpertGEMV enqueues the split-K expert GEMV (expert_gemv_N, qexpert_gemv_N for an fp8 w or
// q4expert_gemv_N for an int4 one) over w [E, K, N] for plan p's active experts; one selects the one-row
// kernel (decode of one token). ks and splits come from expertSplitK. With epi (not nil: bf16 and int4 w
// only, fusedEpilogue) the kernel ends with that epilogue (expert_gemv_swiglu_N, expert_gemv_combine_N).
func (b *Backend) launchExpertGEMV(one bool, e *expertsCall, p *expertPlan, x any, xdt, mode int, w *tensor, K, N, ks, splits int, P *buffer, R int,
	epi *expertEpi) error {
	if w.q != nil && w.q.code == qfInt4 {
		return b.launchQ4Expert(e, p, x, xdt, mode, w, K, N, ks, splits, P, R, epi)
	}
	grid := dim3{uint32(ceilDiv(N, egCols)), uint32(splits), uint32(e.expertBound())}
	if w.q == nil {
		args := []any{x, xdt, mode, p.perm, e.scores(), e.r.k, p.seg(), p.active(e.E), p.meta(e.E), w, K, N, ks, P, R}
		kern := b.k.expertGEMV8
		if one {
			kern = b.k.expertGEMV1
		}
		if epi != nil {
			kern = epi.pick(b.k.expertSwiGLU, b.k.expertCombineEpi)[boolIndex(!one)]
			args = append(args, epi.args(e, p)...)
		}
		return b.stream.launch(kern, grid, dim3{egThreads, 1, 1}, 0, args...)
	}
	if epi != nil {
		return fmt.Errorf("cuda: no fused expert epilogue for a %s weight", formatOf(w))
	}
	kern := b.k.qexpertGEMV8
	if one {
		kern = b.k.qexpertGEMV1
	}
	return b.stream.launch(kern, grid, dim3{egThreads, 1, 1}, 0,
		x, xdt, mode, p.perm, e.scores(), e.r.k, p.seg(), p.active(e.E), p.meta(e.E), w, w.q.scales, w.q.code, w.q.gs, K, N, ks, P, R)
}

// expertEpi is a fused epilogue of the decode expert GEMVs (FuseExpertAct, FuseExpertCombine): with act,
// SiLU·mul of the gate_up partials into act [R, I] float32 (expert_act's work); without, the down
// partials summed per token into e.out plus e's addend (expert_combine's). ctr: fuseCounters.
type expertEpi struct {
	ctr, act *buffer
}

// pick returns swiglu for a SiLU·mul epilogue, else combine.
func (epi *expertEpi) pick(swiglu, combine [2]*kernel) [2]*kernel {
	if epi.act != nil {
		return swiglu
	}
	return combine
}

// args are the epilogue's kernel arguments after the GEMV's: ctr, act, its dtype (SiLU·mul) or ctr,
// row_of, T, out, its dtype, the addend and its dtype (combine).
func (epi *expertEpi) args(e *expertsCall, p *expertPlan) []any {
	if epi.act != nil {
		return []any{epi.ctr, epi.act, int(F32)}
	}
	ap, adt := e.addend()
	return []any{epi.ctr, p.rowOf, e.T, e.out, int(e.out.dt), ap, adt}
}

// fusedEpilogue reports whether the decode expert GEMV on w has the fused epilogues: bf16
// (expert_gemv_swiglu_N, _combine_N), int4 (q4expert_gemv_swiglu_N, _combine_N) and output-major fp8
// (fp8_expert_gemv(_xs)_swiglu_N, _combine_N). The input-major quantised experts (qexpert_gemv_N) have
// none.
func fusedEpilogue(w *tensor) bool {
	return w.q == nil || w.q.code == qfInt4 || w.q.kmajor
}

// rowsOf is the address of moe_plan's meta[1], the number of permuted rows (fp8_act_rows' nrows).
func (p *expertPlan) rowsOf(E int) devptr { return p.meta(E) + 4 }

// maxPlanExperts bounds E for moe_plan, which keeps 2E ints in shared memory.
const maxPlanExperts = 4096

// routePlanThreads is route_plan's block: threads stride over a decode step's tokens, choices and local
// experts.
const routePlanThreads = 256

// Launch geometry of the expert GEMV (EG_WARPS, EG_COLS and EG_KTILE in gemv.cu).
const (
	egThreads = 256
	egCols    = 256
	egKTile   = 1024
)

// expertsCall is one Experts call's operands and sizes.
type expertsCall struct {
	x, gu, down, out *tensor
	add              *tensor // added to the output by expert_combine (ExpertsAdd), or nil
	r                *routing
	first            int
	T, H, E, I       int
}

// addend is expert_combine's add and adt arguments: e.add, or a null pointer.
func (e *expertsCall) addend() (devptr, int) {
	if e.add == nil {
		return 0, int(F32)
	}
	return e.add.ptr(), int(e.add.dt)
}

// expertPlan is moe_plan's output in device memory: ctl holds seg [2E], meta [2] and active [E] (int32);
// perm [rows] and rowOf [T·k].
type expertPlan struct {
	ctl, perm, rowOf *buffer
	rows             int // capacity of the permuted order
}

// segments downloads the plan's control block (a wait for the GPU) and returns its reader: at(2e) and
// at(2e+1) are expert e's first permuted row and row count, at(2E+1) the rows in all.
func (p *expertPlan) segments(b *Backend, E int) (at func(i int) int, err error) {
	raw := make([]byte, 4*(2*E+2))
	if err := b.download(raw, p.ctl.ptr); err != nil {
		return nil, err
	}
	return func(i int) int { return int(int32(binary.LittleEndian.Uint32(raw[4*i:]))) }, nil
}

func (p *expertPlan) release(b *Backend) {
	b.pool.release(*p.ctl)
	b.pool.release(*p.perm)
	b.pool.release(*p.rowOf)
}

func (p *expertPlan) seg() devptr         { return p.ctl.ptr }
func (p *expertPlan) meta(E int) devptr   { return p.ctl.ptr + devptr(8*E) }
func (p *expertPlan) active(E int) devptr { return p.ctl.ptr + devptr(8*E+8) }
func (e *expertsCall) slots() int         { return e.T * e.r.k }
func (e *expertsCall) expertBound() int   { return min(e.slots(), e.E) }
func (e *expertsCall) scores() devptr     { return e.r.scores.ptr }
func ceilDiv(a, b int) int                { return (a + b - 1) / b }
func (b *Backend) releaseAll(bufs ...*buffer) { // release pool blocks after their last use is enqueued
	for _, x := range bufs {
		b.pool.release(*x)
	}
}

// planExperts enqueues moe_plan for e's routing with blocks aligned to align rows. With align > 1 the
// permutation is first filled with -1, so gap rows are recognisable.
func (b *Backend) planExperts(e *expertsCall, align int) (*expertPlan, error) {
	return b.planExpertsFill(e, align, align > 1)
}

// planExpertsFill is planExperts, the permutation filled with -1 first where fill is set (always with
// align > 1): then the rows past the local slots (meta[1] .. slots, which a kernel sized by the slots
// without reading meta[1] reaches) are gap rows too.
func (b *Backend) planExpertsFill(e *expertsCall, align int, fill bool) (*expertPlan, error) {
	fill = fill || align > 1
	n := e.slots()
	rows := n
	if align > 1 {
		rows = n + (align-1)*e.expertBound()
	}
	p := &expertPlan{rows: rows}
	var err error
	if p.ctl, err = b.pool.get(int64(3*e.E+2) * 4); err != nil {
		return nil, err
	}
	if p.perm, err = b.pool.get(int64(max(rows, 1)) * 4); err != nil {
		b.pool.release(*p.ctl)
		return nil, err
	}
	if p.rowOf, err = b.pool.get(int64(n) * 4); err != nil {
		b.releaseAll(p.ctl, p.perm)
		return nil, err
	}
	if r := e.r; align == 1 && !fill && (r.logits != nil || r.count != nil) && b.fused(FuseRoute) && n+e.E <= maxSharedFloats {
		// route_plan: Route's kernel and a tally's count, deferred until now, and the plan in one launch.
		var logits any = devptr(0)
		dt := int(F32)
		if r.logits != nil {
			logits, dt = r.logits, int(r.logits.dt)
		}
		var counts devptr
		countN := 0
		if r.count != nil {
			counts, countN = r.count.ptr, r.count.n
		}
		err := b.stream.launch(b.k.routePlan, dim3{1, 1, 1}, dim3{routePlanThreads, 1, 1}, 4*(n+e.E),
			logits, dt, r.tokens, r.choices, r.k, r.logits != nil, r.experts, r.scores, counts, countN,
			e.first, e.E, p.seg(), p.perm, p.rowOf, p.active(e.E), p.meta(e.E))
		if err != nil {
			p.release(b)
			return nil, fmt.Errorf("route plan: %w", err)
		}
		r.logits, r.count = nil, nil
		b.unpend(r)
		return p, nil
	}
	if err := b.materialize(e.r); err != nil {
		p.release(b)
		return nil, err
	}
	if fill {
		if err := b.stream.memset(p.perm.ptr, 0xff, int64(rows)*4); err != nil {
			p.release(b)
			return nil, err
		}
	}
	if err := b.stream.launch(b.k.moePlan, dim3{1, 1, 1}, dim3{32, 1, 1}, 8*e.E,
		e.r.experts, n, e.first, e.E, align, p.seg(), p.perm, p.rowOf, p.active(e.E), p.meta(e.E)); err != nil {
		p.release(b)
		return nil, err
	}
	return p, nil
}

// splitK picks the K rows per block (a multiple of 32, at most egKTile) for the expert GEMV over
// [K, N] weights with z expert blocks, aiming at egBlocksPerSM blocks per SM, and returns it with the
// number of splits.
// egBlocksPerSM is how many expert GEMV blocks an SM holds at once (256 threads at 39 registers: 6 by the
// register file, Nsight Compute on an H200): aiming at exactly that many makes one wave. Aiming at 8 made
// 1.31 waves, the last third of the time with most SMs idle.
const egBlocksPerSM = 6

func (b *Backend) splitK(K, N, z int) (ksplit, splits int) {
	blocks := ceilDiv(N, egCols) * z
	target := egBlocksPerSM * max(b.dev.multiprocessors, 1)
	s := max(target/blocks, 1) // rounded down, and ksplit up: the blocks stay within one wave
	ksplit = ceilDiv(K, s)
	ksplit = min(max(ceilDiv(ksplit, 32)*32, 64), egKTile)
	return ksplit, ceilDiv(K, ksplit)
}

// expertsGEMV is the decode path: moe_plan, gate_up GEMV (partials per K split), SiLU·mul summing the
// splits, down GEMV, and a combine that sums each token's slots in routing order. Each projection on an
// output-major fp8 weight runs fp8_expert_gemv (fp8.go: one split, its inputs quantised by the kernel
// itself where they fit); the others the split-K expert GEMV (gemv.cu, quant.cu, quant_int4.cu). For bf16,
// int4 and output-major fp8 weights (fusedEpilogue) the SiLU·mul and the combine run in the GEMVs'
// epilogues where FuseExpertAct, FuseExpertCombine and the slot limits allow.
func (b *Backend) expertsGEMV(e *expertsCall) error {
	p, err := b.planExperts(e, 1)
	if err != nil {
		return err
	}
	defer p.release(b)
	R, H, I, k := e.slots(), e.H, e.I, e.r.k
	var bufs []*buffer
	defer func() { b.releaseAll(bufs...) }()
	keep := func(buf *buffer) {
		if buf != nil {
			bufs = append(bufs, buf)
		}
	}
	// The fused epilogues: SiLU·mul in the gate_up GEMV, the combine in the down GEMV (fusedEpilogue).
	z := e.expertBound()
	swiglu := b.fused(FuseExpertAct) && fusedEpilogue(e.gu) && I%egCols == 0 && R <= fuseActMaxSlots
	combine := b.fused(FuseExpertCombine) && fusedEpilogue(e.down) && R <= fuseCombineMaxSlots
	var ctr *buffer
	if swiglu || combine {
		n := max(z*(I/egCols), ceilDiv(H, egCols))
		if kmajor(e.down) {
			n = max(n, ceilDiv(H, fp8Chunk)) // fp8_expert_gemv_combine_N: a counter a block
		}
		if ctr, err = b.fuseCounters(n); err != nil {
			return err
		}
		swiglu, combine = swiglu && ctr != nil, combine && ctr != nil
	}
	act, err := b.pool.get(int64(R) * int64(I) * 4)
	if err != nil {
		return err
	}
	keep(act)
	var epi *expertEpi
	if swiglu {
		epi = &expertEpi{ctr: ctr, act: act}
	}
	p1, s1, err := b.expertProj(e, p, e.gu, e.x, int(e.x.dt), 0, H, 2*I, keep, epi)
	if err != nil {
		return err
	}
	if !swiglu {
		// One element a thread (its GRID_STRIDE_N pass guards the rest): decode has a few rows, and each
		// element sums all the splits, so spreading them over more SMs is what matters.
		if err := b.stream.launch(b.k.expertAct, elemGrid(R*I), elemBlockDim, 0, p1, s1, R, I, p.meta(e.E), act, int(F32)); err != nil {
			return err
		}
	}
	epi = nil
	if combine {
		epi = &expertEpi{ctr: ctr}
	}
	p2, s2, err := b.expertProj(e, p, e.down, act, int(F32), 1, I, H, keep, epi)
	if err != nil || combine {
		return err
	}
	ap, adt := e.addend()
	return b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, p2, s2, R, H, p.rowOf, k, e.out, int(e.out.dt), int64(e.T*H),
		ap, adt)
}

// expertProj enqueues one projection of expertsGEMV: the rows of each active expert (mode 0: x[perm[r] /
// k]·scores[perm[r]], gate_up; mode 1: x [R, K] float32, down) times w [E, K, N], quantised per token
// where w's format says so, into partial sums P [S, R, N] (returned with S). Pooled blocks go to keep,
// which releases them after the whole call is enqueued. epi (not nil where fusedEpilogue(w)) is the fused
// epilogue the GEMV ends with.
func (b *Backend) expertProj(e *expertsCall, p *expertPlan, w *tensor, x any, xdt, mode, K, N int, keep func(*buffer),
	epi *expertEpi) (P *buffer, S int, err error) {
	R, k := e.slots(), e.r.k
	if w.q != nil && w.q.kmajor { // fp8.go
		if P, err = b.pool.get(int64(R) * int64(N) * 4); err != nil {
			return nil, 0, err
		}
		keep(P)
		tmp, err := b.fp8ExpertGEMV(e, p, w, x, xdt, mode, K, N, P, epi)
		keep(tmp)
		return P, 1, err
	}
	ks, S := b.expertSplitK(w, K, N, e.expertBound()) // q4SplitK for int4
	if P, err = b.pool.get(int64(S) * int64(R) * int64(N) * 4); err != nil {
		return nil, 0, err
	}
	keep(P)
	if q := w.q; q != nil && q.dyn() {
		// The rows (mode 0: score-scaled, gathered by expert) quantised per token into [R, K] float32, read
		// as mode 1; mode 1 rows in place.
		xq := x
		var perm, scores devptr
		kk := 1
		if mode == 0 {
			buf, err := b.pool.get(int64(R) * int64(K) * 4)
			if err != nil {
				return nil, 0, err
			}
			keep(buf)
			xq, perm, scores, kk = buf, p.perm.ptr, e.scores(), k
		}
		if err := b.stream.launch(b.k.fp8ActRows, dim3{uint32(R), 1, 1}, actQuantBlock, 0,
			x, xdt, perm, scores, kk, K, true, xq, int(F32), p.rowsOf(e.E), false); err != nil {
			return nil, 0, err
		}
		x, xdt, mode = xq, int(F32), 1
	}
	return P, S, b.launchExpertGEMV(e.T == 1, e, p, x, xdt, mode, w, K, N, ks, S, P, R, epi)
}

// The fused epilogues' limits (FuseExpertAct, FuseExpertCombine): the last block of a column tile does
// the reduction the separate kernel spreads over many, for every row of the tile, so they pay only where a
// step routes a few tokens. At one token (batch-1 decode) each is a few hundred nanoseconds of tail
// against a launch of its own.
const (
	fuseActMaxSlots     = 8 // routing slots (tokens · top-k) for SiLU·mul in the gate_up GEMV
	fuseCombineMaxSlots = 4 // and for the combine in the down GEMV
)

func boolIndex(v bool) int {
	if v {
		return 1
	}
	return 0
}

// fuseCounters returns the fused epilogues' counters, at least n ints, all zero between launches: made
// once (zeroed on the stream) and kept, since graphs record their address; a larger need outside a
// recorded step makes a larger buffer (the old one stays allocated for the graphs that use it, until
// Close). Inside a recorded step, where no memory can be allocated, a need larger than the buffer gives
// nil: the caller runs the unfused kernels.
func (b *Backend) fuseCounters(n int) (*buffer, error) {
	if b.fuseCtr != nil && b.fuseCtr.size >= int64(n)*4 {
		return b.fuseCtr, nil
	}
	if b.rec != nil {
		return nil, nil
	}
	size := max(int64(n)*4, fuseCountersMin)
	buf, err := b.pool.getDedicated(size)
	if err != nil {
		return nil, err
	}
	if err := b.stream.memset(buf.ptr, 0, size); err != nil {
		return nil, err
	}
	b.fuseCtr = buf
	return buf, nil
}

// fuseCountersMin is the fused epilogues' first counter buffer: 16 Ki counters, more than a decode step
// of Scout or Maverick uses (local experts × I/256 for SwiGLU: 64 × 32 at batch 64 of Maverick).
const fuseCountersMin = 64 << 10

// expertsGrouped is the prefill path: moe_plan with 128-row aligned blocks, the per-expert counts to the
// host, the tokens gathered by expert (scaled, bf16), one cuBLASLt GEMM per active expert for gate_up
// into a float32 [rows, 2I], SiLU·mul to bf16, one GEMM per active expert for down into a float32
// [rows, H], and the combine. It returns false, having enqueued nothing that writes the output, when
// cuBLASLt has no algorithm for one of the shapes.
func (b *Backend) expertsGrouped(e *expertsCall) (bool, error) {
	// Every expert's block of rows must start 256-byte aligned in each buffer (cuBLASLt): 128 rows do it
	// for any H and I; where H and I are multiples of 128 every row does (FusePack), and the blocks are
	// packed, so the gather and SiLU·mul kernels touch no gap rows.
	align := 128
	if b.fused(FusePack) && e.H%128 == 0 && e.I%128 == 0 {
		align = 1
	}
	p, err := b.planExperts(e, align)
	if err != nil {
		return false, err
	}
	defer p.release(b)
	H, I, k, E := e.H, e.I, e.r.k, e.E
	at, err := p.segments(b, E)
	if err != nil {
		return false, err
	}
	rows := at(2*E + 1)
	type job struct{ e, r0, n int }
	var jobs []job
	for x := range E {
		if n := at(2*x + 1); n > 0 {
			jobs = append(jobs, job{x, at(2 * x), n})
		}
	}
	keys := make([][2]gemmKey, len(jobs))
	plans := make([][2]*gemmPlan, len(jobs))
	for i, j := range jobs {
		// Input-major weights ([E, K, N]: bf16, int4, fp8 of other shapes) or output-major fp8 experts.
		keys[i] = [2]gemmKey{{m: j.n, n: 2 * I, k: H, out: F32, wIn: !kmajor(e.gu)}, {m: j.n, n: H, k: I, out: F32, wIn: !kmajor(e.down)}}
		for h := range 2 {
			if plans[i][h], err = b.gemm.plan(keys[i][h]); err != nil {
				return false, err
			}
			if !plans[i][h].ok {
				return false, nil
			}
		}
	}
	xp, err := b.pool.get(int64(rows) * int64(H) * 2)
	if err != nil {
		return false, err
	}
	defer b.pool.release(*xp)
	switch {
	case rows == 0:
	case e.gu.q != nil && e.gu.q.dyn(): // gathered, scaled and quantised per token, then bf16
		if err := b.stream.launch(b.k.fp8ActRows, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			e.x, int(e.x.dt), p.perm, e.scores(), k, H, true, xp, int(BF16), devptr(0), false); err != nil {
			return false, err
		}
	case b.vec8(H, e.x.ptr()):
		if err := b.stream.launch(b.k.expertGatherV8, elemGrid(rows*H/8), elemBlockDim, 0,
			e.x, int(e.x.dt), p.perm, e.scores(), k, H, xp, int64(rows)*int64(H)/8); err != nil {
			return false, err
		}
	default:
		if err := b.stream.launch(b.k.expertGather, elemGridN(rows*H), elemBlockDim, 0,
			e.x, int(e.x.dt), p.perm, e.scores(), k, H, xp, int64(rows)*int64(H)); err != nil {
			return false, err
		}
	}
	g, err := b.pool.get(int64(rows) * int64(2*I) * 4)
	if err != nil {
		return false, err
	}
	defer b.pool.release(*g)
	// gemms runs projection h of every job, each expert's weight x w [E, K, N]: on the side streams at
	// once where the weights need no temporary copy (bf16; fanout.go), else one after another.
	gemms := func(h int, w *tensor, K, N int, in, out devptr, inSize int64) error {
		var fo *fanOut
		if w.q == nil && len(jobs) > 1 {
			var err error
			if fo, err = b.startFanOut(); err != nil {
				return err
			}
		}
		for i, j := range jobs {
			wp, tmp, err := b.expertWeight(w, j.e, K, N)
			if err != nil {
				return errors.Join(err, fo.join())
			}
			s, err := b.jobStream(fo)
			if err == nil {
				err = b.gemm.run(plans[i][h], keys[i][h], in+devptr(int64(j.r0)*int64(K)*inSize), wp, out+devptr(int64(j.r0)*int64(N)*4), s)
			}
			if tmp != nil { // only without a fan-out: the compute stream orders its reuse
				b.pool.release(*tmp)
			}
			if err != nil {
				return errors.Join(err, fo.join())
			}
		}
		return fo.join()
	}
	if err := gemms(0, e.gu, H, 2*I, xp.ptr, g.ptr, 2); err != nil {
		return false, err
	}
	act, err := b.pool.get(int64(rows) * int64(I) * 2)
	if err != nil {
		return false, err
	}
	defer b.pool.release(*act)
	switch {
	case rows == 0:
	case e.down.q != nil && e.down.q.dyn(): // SwiGLU in float32, quantised per token, then bf16
		a32, err := b.pool.get(int64(rows) * int64(I) * 4)
		if err != nil {
			return false, err
		}
		defer b.pool.release(*a32)
		if err := b.stream.launch(b.k.expertAct, elemGridN(rows*I), elemBlockDim, 0, g, 1, rows, I, p.meta(E), a32, int(F32)); err != nil {
			return false, err
		}
		if err := b.stream.launch(b.k.fp8ActRows, dim3{uint32(rows), 1, 1}, actQuantBlock, 0,
			a32, int(F32), devptr(0), devptr(0), 1, I, true, act, int(BF16), devptr(0), false); err != nil {
			return false, err
		}
	case b.vec8(I):
		if err := b.stream.launch(b.k.expertActV8, elemGrid(rows*I/8), elemBlockDim, 0, g, 1, rows, I, p.meta(E), act, int(BF16)); err != nil {
			return false, err
		}
	default:
		if err := b.stream.launch(b.k.expertAct, elemGridN(rows*I), elemBlockDim, 0, g, 1, rows, I, p.meta(E), act, int(BF16)); err != nil {
			return false, err
		}
	}
	y, err := b.pool.get(int64(rows) * int64(H) * 4)
	if err != nil {
		return false, err
	}
	defer b.pool.release(*y)
	if err := gemms(1, e.down, I, H, act.ptr, y.ptr, 2); err != nil {
		return false, err
	}
	ap, adt := e.addend()
	if b.vec8(H, ap) {
		if err := b.stream.launch(b.k.expertV8, elemGrid(e.T*H/8), elemBlockDim, 0, y, 1, max(rows, 1), H, p.rowOf, k,
			e.out, int(e.out.dt), int64(e.T*H/8), ap, adt); err != nil {
			return false, err
		}
	} else if err := b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, max(rows, 1), H, p.rowOf, k,
		e.out, int(e.out.dt), int64(e.T*H), ap, adt); err != nil {
		return false, err
	}
	runtime.KeepAlive(e)
	return true, nil
}

// expertWeight returns the address of expert x's bf16 slice of w [E, K, N]: in w itself ([K, N]), or for
// a quantised w in a dequantised bf16 copy (tmp, which the caller releases after enqueuing its use; stream
// order lets the next expert reuse the block), [K, N] or, for output-major fp8 experts (kmajor), [N, K]
// as the codes are stored.
func (b *Backend) expertWeight(w *tensor, x, K, N int) (ptr devptr, tmp *buffer, err error) {
	n := int64(K) * int64(N)
	switch {
	case w.q == nil:
		return w.ptr() + devptr(int64(x)*n*2), nil, nil
	case w.q.kmajor: // the stored [E·N, K] rows, dequant_bf16's plain rows
		tmp, err = b.pool.get(n * 2)
		if err == nil {
			err = b.stream.launch(b.k.dequantBF16, elemGrid(int(min(n, 1<<30))), elemBlockDim, 0,
				w, w.q.scales, w.q.code, int64(K), int64(1), K, 1, int64(x)*n, n, tmp)
		}
	default:
		tmp, err = b.dequant(w, int64(x)*n, n)
	}
	if err != nil {
		if tmp != nil {
			b.pool.release(*tmp)
		}
		return 0, nil, err
	}
	return tmp.ptr, tmp, nil
}

// kmajor reports whether w is an output-major fp8 experts weight.
func kmajor(w *tensor) bool { return w.q != nil && w.q.kmajor }
