// prelude.cuh: definitions shared by every kernel file. The kernels are compiled by NVRTC at run time
// with no CUDA headers: bfloat16 is handled as its bit pattern (the upper half of a float32), and each
// tensor operand comes with a dtype code so one kernel serves bf16 and float32 storage. All arithmetic
// is float32 (float64 where noted).

typedef unsigned short bf16_t;
typedef unsigned int u32;

// PDL_PROLOGUE is the first statement of every kernel (kernels.Prologued finds it; a kernel without it is
// launched without programmatic dependent launch). The backend launches the kernels that have it with
// programmatic stream serialization (backend/cuda driver.go, stream.enqueue), so their blocks may be
// scheduled before the kernel ahead of them in the stream has finished: griddepcontrol.wait holds them
// until that kernel has completed and its memory operations are visible, so no kernel touches memory
// before its predecessor is done, and since every kernel waits, the stream's order holds transitively.
// griddepcontrol.launch_dependents then lets the next kernel's blocks be scheduled as soon as every block
// of this one has passed it (they in turn wait for this kernel to complete). Both are no-ops for a kernel
// launched without the attribute, and before sm_90 the prologue is empty.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_PROLOGUE() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_PROLOGUE() \
	do { \
	} while (0)
#endif

// prefetch_l2 asks for the 128-byte line at p in L2 without waiting for it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
	asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
	(void)p;
#endif
}

// l2span is a part of a kernel's input that no kernel before it in the stream writes (its weights), in
// two streams of bytes bytes each (p1 may equal p0): what l2_prefetch asks L2 for.
struct l2span {
	const char* p0;
	const char* p1;
	int bytes;
};

// l2_prefetch asks L2 for span s, a warp's share: one 128-byte line a lane and stream at a time.
__device__ __forceinline__ void l2_prefetch(l2span s) {
	for (int o = (threadIdx.x & 31) * 128; o < s.bytes; o += 32 * 128) {
		prefetch_l2(s.p0 + o);
		if (s.p1 != s.p0) prefetch_l2(s.p1 + o);
	}
}

// L2_PREFETCH_ROW is the most bytes of a weight row a warp prefetches: a GEMV warp's first pass over a
// row (32 lanes × 4 loads of 16 bytes). A block waiting at griddepcontrol.wait holds a slot of its SM, so
// at most a few MB are prefetched by all the blocks resident early: they stay in L2 until they are read.
#define L2_PREFETCH_ROW 2048

// PDL_PROLOGUE_L2(prefetch) is PDL_PROLOGUE for a kernel whose weights are not written by the kernels
// before it: each warp first runs prefetch, a call that asks L2 for the weight it reads first (the start
// of its rows: l2_prefetch of an l2span, or the kernel's own), then waits. Programmatic dependent launch schedules its blocks while the kernel ahead
// still runs (a norm, an attention, the tail of a GEMV), so the weight stream starts then instead of after
// it: the GPU's gap at a kernel boundary is spent reading. A prefetch is a hint (it writes nothing and
// changes no result); TPFLEET_NO_L2_PREFETCH (the backend's fusion "prefetch" turned off) leaves it out.
// kernels.Prologued accepts it as the first statement.
// L2_PREFETCH_EARLY is 1 where PDL_PROLOGUE_L2 prefetches: a kernel that prefetched after its wait before
// does so only where it is 0.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(TPFLEET_NO_L2_PREFETCH)
#define L2_PREFETCH_EARLY 1
#define PDL_PROLOGUE_L2(prefetch) \
	do { \
		prefetch; \
		PDL_PROLOGUE(); \
	} while (0)
#else
#define L2_PREFETCH_EARLY 0
#define PDL_PROLOGUE_L2(prefetch) PDL_PROLOGUE()
#endif

// GRID_STRIDE loops i over [0, n) across the whole grid, so any grid size covers n elements.
#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// Storage dtype codes; they match backend/cuda's kernel dtype codes.
#define DT_BF16 0
#define DT_F32 1

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// f32_to_bf16 rounds to nearest, ties to even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
	u32 u = __float_as_uint(f);
	if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
	u += 0x7fffu + ((u >> 16) & 1u);
	return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float ld(const void* p, int dt, long long i) {
	return dt == DT_BF16 ? bf16_to_f32(((const bf16_t*)p)[i]) : ((const float*)p)[i];
}

__device__ __forceinline__ void st(void* p, int dt, long long i, float v) {
	if (dt == DT_BF16) ((bf16_t*)p)[i] = f32_to_bf16(v);
	else ((float*)p)[i] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

// block_sum returns the sum of v over the block (blockDim.x a multiple of 32, at most 1024) to every
// thread. scratch holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	v = warp_sum(v);
	__syncthreads();
	if (lane == 0) scratch[warp] = v;
	__syncthreads();
	v = lane < warps ? scratch[lane] : 0.0f;
	return warp_sum(v);
}

// norm_inv is RMSNorm's factor for a row of n elements whose squares sum to ss: 1/sqrt(mean + eps), the
// root in float64.
__device__ __forceinline__ float norm_inv(float ss, int n, float eps) {
	return (float)(1.0 / sqrt((double)ss / (double)n + (double)eps));
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ELEM_UNROLL is how many elements a thread of the large elementwise kernels handles per pass: their
// loads are all issued before any is used, so that each thread keeps several in flight (with one load a
// thread, too few bytes are in flight to use the memory's bandwidth). Pass k of the thread handles
// element i0 + k·blockDim.x, so each pass is coalesced. The host sizes their grids with elemGridN.
#define ELEM_UNROLL 4
#define GRID_STRIDE_N(i0, n) \
	for (long long i0 = (long long)blockIdx.x * blockDim.x * ELEM_UNROLL + threadIdx.x; i0 < (n); \
		i0 += (long long)gridDim.x * blockDim.x * ELEM_UNROLL)

// NEG_INF is float32 -∞ (no math.h here).
#define NEG_INF __int_as_float(0xff800000)

// 16-byte vectors: 8 bf16 (u32x4) or 4 float32 (f32x4), for the kernels that load and store 16 bytes a
// thread (a warp then moves 512 contiguous bytes an instruction).
struct alignas(16) u32x4 {
	u32 x, y, z, w;
};

struct alignas(16) f32x4 {
	float x, y, z, w;
};

// bf16x8 widens the 8 bf16 values of v to float32 (exact).
__device__ __forceinline__ void bf16x8(u32x4 v, float* f) {
	f[0] = __uint_as_float(v.x << 16);
	f[1] = __uint_as_float(v.x & 0xffff0000u);
	f[2] = __uint_as_float(v.y << 16);
	f[3] = __uint_as_float(v.y & 0xffff0000u);
	f[4] = __uint_as_float(v.z << 16);
	f[5] = __uint_as_float(v.z & 0xffff0000u);
	f[6] = __uint_as_float(v.w << 16);
	f[7] = __uint_as_float(v.w & 0xffff0000u);
}

// load8 reads elements [8c, 8c+8) of row (a float32 or bf16 array, 16-byte aligned) as float32: as ld
// reads each.
__device__ __forceinline__ void load8(const void* row, int dt, long long c, float* f) {
	if (dt == DT_F32) {
		f32x4 a = ((const f32x4*)row)[2 * c], b = ((const f32x4*)row)[2 * c + 1];
		f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
		f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
	} else {
		bf16x8(((const u32x4*)row)[c], f);
	}
}

// store8 writes f to elements [8c, 8c+8) of row (float32 or bf16, 16-byte aligned): as st writes each.
__device__ __forceinline__ void store8(void* row, int dt, long long c, const float* f) {
	if (dt == DT_F32) {
		f32x4 a, b;
		a.x = f[0]; a.y = f[1]; a.z = f[2]; a.w = f[3];
		b.x = f[4]; b.y = f[5]; b.z = f[6]; b.w = f[7];
		((f32x4*)row)[2 * c] = a;
		((f32x4*)row)[2 * c + 1] = b;
	} else {
		u32x4 v;
		v.x = (u32)f32_to_bf16(f[0]) | (u32)f32_to_bf16(f[1]) << 16;
		v.y = (u32)f32_to_bf16(f[2]) | (u32)f32_to_bf16(f[3]) << 16;
		v.z = (u32)f32_to_bf16(f[4]) | (u32)f32_to_bf16(f[5]) << 16;
		v.w = (u32)f32_to_bf16(f[6]) | (u32)f32_to_bf16(f[7]) << 16;
		((u32x4*)row)[c] = v;
	}
}

// The tensor-core and asynchronous-copy helpers every unit with mma.sync tiles uses (flash.cu,
// grouped.cu, quant_int4.cu): the shared-memory address of p, cp.async of 16 bytes and its groups,
// ldmatrix.x4 (plain and transposed), mma.m16n8k16 on bf16 with float32 accumulation, and a bf16 pair.
// The SIMT emulator (scripts/gpu/emu/emu.h, which defines TPF_EMU) has C++ versions of the same
// warp-level semantics, so that these kernels can be checked without a GPU.
__device__ __forceinline__ unsigned tc_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
#ifndef TPF_EMU
// tc_cp16 copies 16 bytes from global memory to shared address dst, asynchronously (cp.async.cg).
__device__ __forceinline__ void tc_cp16(unsigned dst, const void* src) {
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void tc_zero16(unsigned dst) {
	asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
}
__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void tc_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// tc_wait waits until at most N of this thread's cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void tc_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
// tc_ldsm4: ldmatrix.x4 (lanes 8i .. 8i+7 give the row addresses of matrix i; register i gets row g,
// columns 2c, 2c+1 of matrix i); tc_ldsm4_t the transposed load.
__device__ __forceinline__ void tc_ldsm4(unsigned addr, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(addr));
}
__device__ __forceinline__ void tc_ldsm4_t(unsigned addr, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(addr));
}
// tc_mma: d += a·b for one m16n8k16 tile (bf16 operands, float32 accumulators).
__device__ __forceinline__ void tc_mma(float* d, const u32* a, u32 b0, u32 b1) {
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
		: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// tc_pack converts lo and hi to bf16 (round to nearest even) in one register, lo in the low half.
__device__ __forceinline__ u32 tc_pack(float lo, float hi) {
	u32 r;
	asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
	return r;
}
#endif // TPF_EMU

// as_dt is v as a tensor of dtype dt holds it: rounded to bf16, or itself.
__device__ __forceinline__ float as_dt(float v, int dt) { return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

// ld_cg reads a float32 past the SM's L1 (ld.global.cg): for data other blocks of the same launch wrote
// and published with __threadfence, which a stale L1 line must not hide. Volatile, so the compiler keeps
// it after the synchronisation that precedes it (issue several before using any: they then overlap).
__device__ __forceinline__ float ld_cg(const float* p) {
#ifdef __CUDA_ARCH__
	float v;
	asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
	return v;
#else
	return *(const volatile float*)p;
#endif
}

// eg_last is the split-K GEMVs' fused epilogue's hand-off: every block of the launch calls it once, after
// writing its partial sums, and it returns true in the last of the `expected` blocks that count on *ctr,
// which it also resets to zero for the next launch (counters start zeroed: the backend zeroes them once).
// The __threadfence before the count publishes each block's writes device-wide; the last block reads them
// with ld_cg (past its L1). Which block is last varies; what it computes does not, so the results do not
// depend on timing.
__device__ __forceinline__ bool eg_last(int* ctr, int expected) {
	__shared__ int last;
	__threadfence();
	__syncthreads(); // every thread's writes fenced
	if (threadIdx.x == 0) {
		int prev = atomicAdd(ctr, 1);
		last = prev == expected - 1;
		if (last) *ctr = 0; // every block has counted: no one else uses it in this launch
	}
	__syncthreads();
	if (last) __threadfence();
	return last;
}

// eg_sum8 adds the S split partials p[0], p[stride], ... p[(S-1)·stride] in split order, as a loop from
// 0.0f does, with eight loads in flight at a time.
__device__ __forceinline__ float eg_sum8(const float* p, long long stride, int S) {
	float y = 0.0f;
	for (int s0 = 0; s0 < S; s0 += 8) {
		float v[8];
#pragma unroll
		for (int u = 0; u < 8; u++) v[u] = s0 + u < S ? ld_cg(p + (s0 + u) * stride) : 0.0f;
#pragma unroll
		for (int u = 0; u < 8; u++)
			if (s0 + u < S) y += v[u];
	}
	return y;
}

// eg_act_at stores act[r][c] = silu(g)·u, g and u the sums over the S splits of P[s][r][c] and
// P[s][r][I + c] (P [S, R, 2I], gate columns then up), in split order from 0.0f as expert_act adds them.
__device__ __forceinline__ void eg_act_at(const float* P, int S, int R, int I, int r, int c, void* act, int adt) {
	long long N = 2LL * I, stride = (long long)R * N;
	float g = eg_sum8(P + r * N + c, stride, S);
	float u = eg_sum8(P + r * N + I + c, stride, S);
	st(act, adt, (long long)r * I + c, silu(g) * u);
}

// eg_combine_at stores out[t][h] as expert_combine computes it: the sum, over token t's topk slots in
// routing order whose row r = row_of[t·topk + j] is held here (r >= 0), of the sum over the S splits of
// P[s][r][h] (P [S, R, H]), plus add[t][h] last where add is not null.
__device__ __forceinline__ void eg_combine_at(const float* P, int S, int R, int H, const int* row_of, int topk, int t, int h,
	void* out, int odt, const void* add, int adt) {
	long long stride = (long long)R * H;
	float sum = 0.0f;
	for (int j = 0; j < topk; j++) {
		int r = row_of[t * topk + j];
		if (r < 0) continue;
		sum += eg_sum8(P + (long long)r * H + h, stride, S);
	}
	long long i = (long long)t * H + h;
	if (add) sum += ld(add, adt, i);
	st(out, odt, i, sum);
}

// The split-K expert GEMVs' fused epilogues (expert_gemv_N in gemv.cu, bf16; q4expert_gemv_N in
// quant_int4.cu, int4): grid (N / cols column tiles, S splits, active experts bound), every block of the
// launch calling the epilogue once after writing its partials P [S, R, N].
//
// eg_swiglu_epilogue (gate_up, N = 2I, I % cols == 0): the last block of the 2S blocks of expert
// blockIdx.z that wrote gate columns [cols·j, cols·j + cols) or the matching up columns (counter
// ctr[z·(I/cols) + j]) stores act[r][c] = silu(g)·u for the expert's rows (eg_act_at).
__device__ __forceinline__ void eg_swiglu_epilogue(int* ctr, const int* seg, const int* active, const int* meta, int N,
	const float* P, int R, int cols, void* act, int adt) {
	int I = N / 2, tiles = I / cols, j = blockIdx.x % tiles, S = gridDim.y;
	if (!eg_last(ctr + blockIdx.z * tiles + j, 2 * S)) return;
	if ((int)blockIdx.z >= meta[0]) return;
	int e = active[blockIdx.z];
	int r0 = seg[2 * e], nr = seg[2 * e + 1];
	for (int r = r0; r < r0 + nr; r++)
		for (int c = j * cols + threadIdx.x; c < (j + 1) * cols; c += blockDim.x) eg_act_at(P, S, R, I, r, c, act, adt);
}

// eg_combine_epilogue (down, N = H): the last of the S·gridDim.z blocks that wrote columns [cols·x,
// cols·x + cols) (counter ctr[blockIdx.x]) stores out[t][h] for the T tokens (eg_combine_at).
__device__ __forceinline__ void eg_combine_epilogue(int* ctr, int topk, int N, const float* P, int R, int cols,
	const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	if (!eg_last(ctr + blockIdx.x, gridDim.y * gridDim.z)) return;
	int h1 = (int)(blockIdx.x + 1) * cols < N ? (int)(blockIdx.x + 1) * cols : N;
	for (int t = 0; t < T; t++)
		for (int h = blockIdx.x * cols + threadIdx.x; h < h1; h += blockDim.x)
			eg_combine_at(P, gridDim.y, R, N, row_of, topk, t, h, out, odt, add, adt);
}

// rope_pair rotates the pair (x0, x1) at position pos by θ = float32(pos)·inv_freq (a float32 product,
// not fused), with cos and sin evaluated in float64 and rounded to float32.
__device__ __forceinline__ void rope_pair(int pos, float inv_freq, float x0, float x1, float* y0, float* y1) {
	float theta = __fmul_rn((float)pos, inv_freq);
	double sd, cd;
	sincos((double)theta, &sd, &cd);
	float s = (float)sd, c = (float)cd;
	*y0 = x0 * c - x1 * s;
	*y1 = x0 * s + x1 * c;
}
