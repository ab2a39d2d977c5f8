package cuda

// The grouped expert GEMMs (kernels/grouped.cu, FuseGrouped): a prefill's bf16 routed experts in three
// to four launches after moe_plan, none of which waits for the host:
//
//	moe_plan (packed rows) → grouped_gate_up (x gathered by the plan, SiLU·mul in the epilogue, bf16 act)
//	  → top-k 1: grouped_fill (tokens whose expert is elsewhere) and grouped_down (the combine in the
//	    epilogue: out = (0 + (0 + y)) + add, expert_combine's arithmetic)
//	  → top-k > 1: grouped_down into y [rows, H] float32, then expert_combine(_v8) as before.
//
// The grids are sized from the routing's slot count, not from the per-expert counts: grid.x is an upper
// bound of the (expert, 128-row) tiles, and blocks past the plan's last tile exit. So nothing comes back
// to the host (expertsGrouped downloads the counts once per MoE layer to launch one cuBLASLt GEMM per
// expert), and a prefill's MoE layer could be captured in a graph. Every output element is written by one
// thread in a fixed order: the results are the same run to run.

// Launch geometry of the grouped kernels (GG_BM, GG_BN, GG_THREADS and GG_SMEM in grouped.cu).
const (
	groupedBM      = 128    // rows of a tile
	groupedBN      = 256    // columns of a grouped_down tile; grouped_gate_up's hold groupedBN/2 channels
	groupedThreads = 256    // 8 warps
	groupedSmem    = 108544 // dynamic shared memory: 4 stages of 128×40 + 32×264 bf16
)

// allowGroupedShared raises the grouped kernels' dynamic shared memory limit to groupedSmem and reports
// whether the driver took it (it cannot where the device has less shared memory a block, or the driver no
// cuFuncSetAttribute: Experts then keeps the cuBLASLt path).
func (b *Backend) allowGroupedShared() bool {
	for _, k := range []*kernel{b.k.groupedGateUp, b.k.groupedDown} {
		if err := b.dev.allowShared(k, groupedSmem); err != nil {
			return false
		}
	}
	return true
}

// groupedOK reports whether Experts call e (bf16 weights, prefill) runs on the grouped kernels: the
// fusion on, the shared memory granted, H and I multiples of 8 and the operands 16-byte aligned (the
// tile loaders copy 16 bytes, 8 elements, at a time). x may be float32: it is rounded to bf16 first.
func (b *Backend) groupedOK(e *expertsCall) bool {
	return b.fused(FuseGrouped) && b.groupedShared && e.gu.q == nil && e.down.q == nil &&
		e.gu.dt == BF16 && e.down.dt == BF16 && e.H%8 == 0 && e.I%8 == 0 &&
		e.gu.ptr()%16 == 0 && e.down.ptr()%16 == 0 && (e.x.dt == F32 || e.x.dt == BF16)
}

// expertsMMA enqueues e on the grouped kernels (groupedOK holds).
func (b *Backend) expertsMMA(e *expertsCall) error {
	p, err := b.planExperts(e, 1)
	if err != nil {
		return err
	}
	defer p.release(b)
	H, I, k, E, R := e.H, e.I, e.r.k, e.E, e.slots()
	x := e.x.ptr()
	if e.x.dt != BF16 || x%16 != 0 {
		xb, tmp, err := b.bf16Operand(e.x)
		if err != nil {
			return err
		}
		if tmp != nil {
			defer b.pool.release(*tmp)
		}
		x = xb
	}
	act, err := b.pool.get(int64(R) * int64(I) * 2)
	if err != nil {
		return err
	}
	defer b.pool.release(*act)
	// The tiles: sum over the active experts of ceil(rows/128) <= ceil(R/128) + (active experts).
	tiles := uint32(ceilDiv(R, groupedBM) + min(E, R))
	block := dim3{groupedThreads, 1, 1}
	if err := b.stream.launch(b.k.groupedGateUp, dim3{tiles, uint32(ceilDiv(I, groupedBN/2)), 1}, block, groupedSmem,
		x, p.perm, e.scores(), k, p.seg(), p.active(E), p.meta(E), e.gu, H, I, act); err != nil {
		return err
	}
	ap, adt := e.addend()
	down := dim3{tiles, uint32(ceilDiv(H, groupedBN)), 1}
	if k == 1 {
		// The combine in grouped_down's epilogue; grouped_fill writes the tokens whose expert is elsewhere.
		if err := b.stream.launch(b.k.groupedFill, dim3{uint32(min(e.T, maxBlocks)), 1, 1}, block, 0,
			p.rowOf, k, e.T, H, e.out, int(e.out.dt), ap, adt); err != nil {
			return err
		}
		return b.stream.launch(b.k.groupedDown, down, block, groupedSmem,
			act, p.perm, p.seg(), p.active(E), p.meta(E), e.down, I, H, devptr(0), e.out, int(e.out.dt), ap, adt)
	}
	y, err := b.pool.get(int64(R) * int64(H) * 4)
	if err != nil {
		return err
	}
	defer b.pool.release(*y)
	if err := b.stream.launch(b.k.groupedDown, down, block, groupedSmem,
		act, p.perm, p.seg(), p.active(E), p.meta(E), e.down, I, H, y, devptr(0), int(F32), devptr(0), int(F32)); err != nil {
		return err
	}
	if b.vec8(H, ap) {
		return b.stream.launch(b.k.expertV8, elemGrid(e.T*H/8), elemBlockDim, 0, y, 1, R, H, p.rowOf, k,
			e.out, int(e.out.dt), int64(e.T*H/8), ap, adt)
	}
	return b.stream.launch(b.k.expertCombine, elemGrid(e.T*H), elemBlockDim, 0, y, 1, R, H, p.rowOf, k,
		e.out, int(e.out.dt), int64(e.T*H), ap, adt)
}
