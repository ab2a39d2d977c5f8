package cuda

// The grouped expert GEMMs (kernels/grouped.cu): the routed experts above the GEMVs' rows after moe_plan,
// none of whose launches waits for the host, in two formats that share the kernels' tiles, pipeline and
// epilogues:
//
//   - bf16 (FuseGrouped, prefill):
//     moe_plan (packed rows) → grouped_gate_up (x gathered by the plan, SiLU·mul in the epilogue, bf16 act)
//   - fp8 with dynamic activations (FuseFP8Grouped, prefill and decode batches of more than fp8GemvRows
//     tokens; W8A8: E4M3 codes and their scales, sm_89 and later):
//     moe_plan → fp8_act_codes (the gathered, score-scaled rows to E4M3 codes and a scale each, as the
//     unfused path and the cpu backend quantise them) → grouped_fp8_gate_up (SiLU·mul in the epilogue,
//     float32 act) → fp8_act_codes (act per token, for down)
//
// then, for both:
//
//   - top-k 1: grouped_fill (tokens whose expert is elsewhere) and the down kernel with the combine in its
//     epilogue (out = (0 + (0 + y)) + add, expert_combine's arithmetic)
//   - top-k > 1: the down kernel into y [rows, H] float32, then expert_combine(_v8) as before.
//
// The grids are sized from the routing's slot count, not from the per-expert counts: grid.x is an upper
// bound of the (expert, 128-row) tiles, and blocks past the plan's last tile exit. So nothing comes back
// to the host (expertsGrouped and expertsFP8Grouped download the counts once per MoE layer to launch one
// cuBLASLt GEMM per expert), a prefill's MoE layer could be captured in a graph, and a decode step's is
// (fp8 batches). Every output element is written by one thread in a fixed order: the results are the same
// run to run.
//
// Formats the fp8 kernels do not serve exactly keep their paths (expertsQuant): weight-only fp8 and the
// compressed-tensors format multiply bf16 activations by q·s or bf16(q·s) (the dequantised grouped GEMMs),
// and int4 has its own kernels.

// Launch geometry of the grouped kernels (GG_BM, GG_BN, GG_THREADS, GG_SMEM and GF_SMEM in grouped.cu).
const (
	groupedBM      = 128    // rows of a tile
	groupedBN      = 256    // columns of a grouped_down tile; grouped_gate_up's hold groupedBN/2 channels
	groupedThreads = 256    // 8 warps
	groupedSmem    = 108544 // dynamic shared memory: 4 stages of 128×40 + 32×264 bf16
	groupedFP8Smem = 122880 // the fp8 kernels': 4 stages of 128×80 + 256×80 bytes (GF_SMEM)
)

// allowShared raises the dynamic shared memory limit of kernels ks to bytes and reports whether the driver
// took it (it cannot where the device has less shared memory a block, or the driver no
// cuFuncSetAttribute: Experts then keeps the unfused paths).
func (b *Backend) allowShared(bytes int, ks ...*kernel) bool {
	for _, k := range ks {
		if err := b.dev.allowShared(k, bytes); err != nil {
			return false
		}
	}
	return true
}

// groupedOK reports whether Experts call e (bf16 weights, prefill) runs on the grouped kernels: the
// fusion on, the shared memory granted, H and I multiples of 8 and the operands 16-byte aligned (the
// tile loaders copy 16 bytes, 8 elements, at a time), few rows an expert (groupedPays). x may be float32:
// it is rounded to bf16 first.
func (b *Backend) groupedOK(e *expertsCall) bool {
	return b.fused(FuseGrouped) && b.groupedShared && b.groupedPays(e) && e.gu.q == nil && e.down.q == nil &&
		e.gu.dt == BF16 && e.down.dt == BF16 && e.H%8 == 0 && e.I%8 == 0 &&
		e.gu.ptr()%16 == 0 && e.down.ptr()%16 == 0 && (e.x.dt == F32 || e.x.dt == BF16)
}

// groupedTiles is grid.x of the grouped kernels for e: the (expert, 128-row) tiles are at most
// ceil(R/128) + (active experts) <= ceil(R/128) + min(E, R) for R routing slots.
func groupedTiles(e *expertsCall) uint32 {
	return uint32(ceilDiv(e.slots(), groupedBM) + min(e.E, e.slots()))
}

// expertsMMA enqueues e on the grouped kernels of its format, fp8 (fp8GroupedOK holds) or bf16
// (groupedOK holds): moe_plan (packed rows), the format's gate_up, then groupedFinish with its down kernel.
func (b *Backend) expertsMMA(e *expertsCall, fp8 bool) error {
	p, err := b.planExperts(e, 1)
	if err != nil {
		return err
	}
	defer p.release(b)
	var bufs []*buffer
	defer func() { b.releaseAll(bufs...) }()
	keep := func(buf *buffer) {
		if buf != nil {
			bufs = append(bufs, buf)
		}
	}
	gateUp := b.bf16GateUp
	if fp8 {
		gateUp = b.fp8GateUp
	}
	down, err := gateUp(e, p, keep)
	if err != nil {
		return err
	}
	return b.groupedFinish(e, p, down)
}

// groupedDown launches a format's down kernel with y (0: the combine into out, top-k 1) and out's
// pointer, dtype and addend.
type groupedDown func(y devptr, out any, odt int, add devptr, adt int) error

// scratch returns a pooled block of n bytes, given to keep (released after the call is enqueued).
func (b *Backend) scratch(n int64, keep func(*buffer)) (devptr, error) {
	buf, err := b.pool.get(n)
	if err != nil {
		return 0, err
	}
	keep(buf)
	return buf.ptr, nil
}

// bf16GateUp enqueues grouped_gate_up for e on plan p (x rounded to bf16 first where it is float32) and
// returns its down launch; pooled blocks go to keep.
func (b *Backend) bf16GateUp(e *expertsCall, p *expertPlan, keep func(*buffer)) (groupedDown, error) {
	H, I, k, E, R := e.H, e.I, e.r.k, e.E, e.slots()
	x := e.x.ptr()
	if e.x.dt != BF16 || x%16 != 0 {
		xb, tmp, err := b.bf16Operand(e.x)
		if err != nil {
			return nil, err
		}
		keep(tmp)
		x = xb
	}
	act, err := b.scratch(int64(R)*int64(I)*2, keep)
	if err != nil {
		return nil, err
	}
	tiles := groupedTiles(e)
	if err := b.stream.launch(b.k.groupedGateUp, dim3{tiles, uint32(ceilDiv(I, groupedBN/2)), 1}, dim3{groupedThreads, 1, 1}, groupedSmem,
		x, p.perm, e.scores(), k, p.seg(), p.active(E), p.meta(E), e.gu, H, I, act); err != nil {
		return nil, err
	}
	return func(y devptr, out any, odt int, add devptr, adt int) error {
		return b.stream.launch(b.k.groupedDown, dim3{tiles, uint32(ceilDiv(H, groupedBN)), 1}, dim3{groupedThreads, 1, 1}, groupedSmem,
			act, p.perm, p.seg(), p.active(E), p.meta(E), e.down, I, H, y, out, odt, add, adt)
	}, nil
}

// groupedFinish enqueues what follows a grouped gate_up launch of e on plan p: at top-k 1 grouped_fill
// and down with the combine in its epilogue (y = 0, out e's output), else down into y [R, H] float32
// (out 0) and expert_combine(_v8). down launches the format's down kernel with those operands.
func (b *Backend) groupedFinish(e *expertsCall, p *expertPlan, down groupedDown) error {
	H, k, R := e.H, e.r.k, e.slots()
	ap, adt := e.addend()
	if k == 1 {
		// The combine in the down kernel's epilogue; grouped_fill writes the tokens whose expert is elsewhere.
		if err := b.stream.launch(b.k.groupedFill, dim3{uint32(min(e.T, maxBlocks)), 1, 1}, dim3{groupedThreads, 1, 1}, 0,
			p.rowOf, k, e.T, H, e.out, int(e.out.dt), ap, adt); err != nil {
			return err
		}
		return down(0, e.out, int(e.out.dt), ap, adt)
	}
	y, err := b.pool.get(int64(R) * int64(H) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*y)
	if err := down(y.ptr, devptr(0), int(F32), 0, int(F32)); err != nil {
		return err
	}
	if b.vec8(H, ap) {
		return b.stream.launch(b.k.expertV8, elemGrid(e.T*H/8), elemBlockDim, 0, y, 1, R, H, p.rowOf, k,
			e.out, int(e.out.dt), int64(e.T*H/8), ap, adt)
	}
	return b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, R, H, p.rowOf, k,
		e.out, int(e.out.dt), int64(e.T*H), ap, adt)
}

// fp8GroupedOK reports whether Experts call e runs on the fp8 grouped kernels: the fusion on, an FP8
// tensor core (sm_89+) and the shared memory granted (fp8GroupedShared), few rows an expert
// (groupedPays), the FP8 paths not turned off (SetFP8Gemm), both weights fp8 with dynamic activations,
// output-major, H and I multiples of 16 and aligned operands (fp8DynKMajor), x float32 or bf16.
// expertsQuant asks it above Backend.fp8ExpertGemvRows tokens.
func (b *Backend) fp8GroupedOK(e *expertsCall) bool {
	return b.fused(FuseFP8Grouped) && b.fp8GroupedShared && b.groupedPays(e) && !b.noFP8Gemm && fp8DynKMajor(e) &&
		(e.x.dt == F32 || e.x.dt == BF16)
}

// groupedMaxRowsPerExpert is the default Backend.groupedMaxRows. The grouped kernels' mma.sync tiles win
// where the experts have few rows each and lose to cuBLASLt's GEMM per expert where they have many (H100,
// Scout's H 5120 I 8192, bf16 / fp8 µs: 32 rows an expert 1586 / 1290 grouped against 1755 / 1685; 128
// rows 2952 / 2329 against 1918 / 1796; Maverick's 128 experts at 16 rows 1717 / 1471 against 3323 /
// 6524; 512 rows at E 8 k 2 1438 / 1276 against 752 / 909).
const groupedMaxRowsPerExpert = 64

// groupedPays reports whether e has few enough rows per local expert for the grouped kernels
// (groupedMaxRows; the rows counted over all the experts of the routing, as the host knows them
// without reading the plan).
func (b *Backend) groupedPays(e *expertsCall) bool {
	return b.groupedMaxRows <= 0 || e.slots() <= b.groupedMaxRows*e.E
}

// fp8GateUp enqueues the fp8 kernels' first half for e on plan p (fp8GroupedOK holds): the rows quantised
// per routing slot (fp8_act_codes: x[perm[r] / k]·scores[perm[r]] to codes and a scale), then
// grouped_fp8_gate_up, then act quantised per row; it returns grouped_fp8_down's launch. Pooled blocks go
// to keep.
func (b *Backend) fp8GateUp(e *expertsCall, p *expertPlan, keep func(*buffer)) (groupedDown, error) {
	H, I, k, E, R := e.H, e.I, e.r.k, e.E, e.slots()
	var xc, xs, act, ac, as devptr
	for _, a := range []struct {
		dst *devptr
		n   int64
	}{{&xc, int64(R) * int64(H)}, {&xs, int64(R) * 4}, {&act, int64(R) * int64(I) * 4}, {&ac, int64(R) * int64(I)}, {&as, int64(R) * 4}} {
		var err error
		if *a.dst, err = b.scratch(a.n, keep); err != nil {
			return nil, err
		}
	}
	// Only the plan's rows (meta[1]): the blocks past them return, and no kernel reads their rows.
	if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(R), 1, 1}, actQuantBlock, 0, e.x, int(e.x.dt), p.perm, e.scores(), k, H,
		xc, xs, p.rowsOf(E)); err != nil {
		return nil, err
	}
	tiles := groupedTiles(e)
	if err := b.stream.launch(b.k.groupedFP8GateUp, dim3{tiles, uint32(ceilDiv(I, groupedBN/2)), 1}, dim3{groupedThreads, 1, 1}, groupedFP8Smem,
		xc, xs, p.seg(), p.active(E), p.meta(E), e.gu, e.gu.q.scales, H, I, act); err != nil {
		return nil, err
	}
	if err := b.stream.launch(b.k.fp8ActCodes, dim3{uint32(R), 1, 1}, actQuantBlock, 0, act, int(F32), devptr(0), devptr(0), 1, I,
		ac, as, p.rowsOf(E)); err != nil {
		return nil, err
	}
	return func(y devptr, out any, odt int, add devptr, adt int) error {
		return b.stream.launch(b.k.groupedFP8Down, dim3{tiles, uint32(ceilDiv(H, groupedBN)), 1}, dim3{groupedThreads, 1, 1}, groupedFP8Smem,
			ac, as, p.perm, p.seg(), p.active(E), p.meta(E), e.down, e.down.q.scales, I, H, y, out, odt, add, adt)
	}, nil
}
