// gemv.cu: memory-bound kernels for skinny products (decode): a GEMV for Linear at a few rows, and the
// routed experts' split-K GEMV that reads only the chosen experts' weights, plus the routing plan (counts
// and permutation by expert) that the decode and the prefill expert paths share.
//
// Weights are read with 16-byte loads (8 bf16; u32x4, bf16x8 and load8 are in prelude.cuh), so these
// kernels need rows of a multiple of 8 elements and 16-byte aligned weights; the host checks both and uses
// the generic kernels otherwise.

__device__ __forceinline__ long long dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

#define GEMV_WARPS 4
#define GEMV_ROWS 2 // output rows per warp: each x chunk read from L1 serves two weight rows

// gemv_accum adds to acc[r][t] this lane's share of the dot products of rows n0 .. n0+GEMV_ROWS-1 of
// w [N, K] with the T <= NT rows of x [T, K], over the 16-byte chunks [cbeg, cend) of K: the lanes of a
// warp stride over the chunks, four chunks per row in flight, with float32 math (an f32 x is used as it
// is, not rounded to bf16). K % 8 == 0; w and x 16-byte aligned.
template <int NT>
__device__ __forceinline__ void gemv_accum_rows(const void* __restrict__ x, int xdt, const u32x4* const (&wr)[GEMV_ROWS],
	int T, int K, int cbeg, int cend, float (&acc)[GEMV_ROWS][NT]);

template <int NT>
__device__ __forceinline__ void gemv_accum(const void* __restrict__ x, int xdt, const bf16_t* __restrict__ w,
	int T, int K, int N, int n0, int cbeg, int cend, float (&acc)[GEMV_ROWS][NT]) {
	const u32x4* wr[GEMV_ROWS];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++) wr[r] = (const u32x4*)(w + (long long)imin(n0 + r, N - 1) * K);
	gemv_accum_rows<NT>(x, xdt, wr, T, K, cbeg, cend, acc);
}

// gemv_accum_rows is gemv_accum over the GEMV_ROWS weight rows wr (of K elements each, anywhere): each
// row's sum is the same whatever the other rows are.
template <int NT>
__device__ __forceinline__ void gemv_accum_rows(const void* __restrict__ x, int xdt, const u32x4* const (&wr)[GEMV_ROWS],
	int T, int K, int cbeg, int cend, float (&acc)[GEMV_ROWS][NT]) {
	int lane = threadIdx.x & 31;
	long long xrow = dt_size(xdt) * (long long)K;
	int c = cbeg + lane;
	for (; c + 96 < cend; c += 128) {
		u32x4 wv[4][GEMV_ROWS];
#pragma unroll
		for (int v = 0; v < 4; v++)
#pragma unroll
			for (int r = 0; r < GEMV_ROWS; r++) wv[v][r] = wr[r][c + 32 * v];
#pragma unroll
		for (int v = 0; v < 4; v++) {
			float wf[GEMV_ROWS][8];
#pragma unroll
			for (int r = 0; r < GEMV_ROWS; r++) bf16x8(wv[v][r], wf[r]);
#pragma unroll
			for (int t = 0; t < NT; t++) {
				if (t < T) {
					float xv[8];
					load8((const char*)x + t * xrow, xdt, c + 32 * v, xv);
#pragma unroll
					for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
						for (int i = 0; i < 8; i++) acc[r][t] += xv[i] * wf[r][i];
				}
			}
		}
	}
	for (; c < cend; c += 32) {
		float wf[GEMV_ROWS][8];
#pragma unroll
		for (int r = 0; r < GEMV_ROWS; r++) bf16x8(wr[r][c], wf[r]);
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t < T) {
				float xv[8];
				load8((const char*)x + t * xrow, xdt, c, xv);
#pragma unroll
				for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
					for (int i = 0; i < 8; i++) acc[r][t] += xv[i] * wf[r][i];
			}
		}
	}
}

// gemv_rows computes output rows n0 .. n0+GEMV_ROWS-1 of y [T, N] (float32) = x [T, K] · w [N, K]ᵀ with
// one warp over all of K, and a warp sum finishes each dot product (a fixed order: the result does not
// depend on timing).
template <int NT>
__device__ __forceinline__ void gemv_rows(const void* __restrict__ x, int xdt,
	const bf16_t* __restrict__ w, float* __restrict__ y, int T, int K, int N, int n0) {
	int lane = threadIdx.x & 31;
	if (n0 >= N) return; // uniform over the warp
	float acc[GEMV_ROWS][NT];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
	gemv_accum<NT>(x, xdt, w, T, K, N, n0, 0, K >> 3, acc);
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float s = warp_sum(acc[r][t]);
			if (lane == 0 && t < T && n0 + r < N) y[(long long)t * N + n0 + r] = s;
		}
}

// gemv_split_rows is gemv_rows for a whole block: its GEMV_WARPS warps share the rows n0 ..
// n0+GEMV_ROWS-1, each over a contiguous quarter of K, and the partial sums are added in warp order (a
// fixed order). A small product (decode's attention and MLP weights) is bound by how many dependent
// loads each warp waits for, not by bandwidth: this gives it four times the warps, each waiting a
// quarter as often.
template <int NT>
__device__ __forceinline__ void gemv_split_rows(const void* __restrict__ x, int xdt,
	const bf16_t* __restrict__ w, float* __restrict__ y, int T, int K, int N, int n0) {
	__shared__ float part[GEMV_WARPS][GEMV_ROWS][NT];
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	if (n0 >= N) return; // uniform over the block
	float acc[GEMV_ROWS][NT];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
	int K8 = K >> 3, per = (K8 + GEMV_WARPS - 1) / GEMV_WARPS;
	gemv_accum<NT>(x, xdt, w, T, K, N, n0, imin(K8, warp * per), imin(K8, (warp + 1) * per), acc);
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float v = warp_sum(acc[r][t]);
			if (lane == 0) part[warp][r][t] = v;
		}
	__syncthreads();
	if (warp == 0 && lane < GEMV_ROWS * NT) {
		int r = lane / NT, t = lane - r * NT;
		float v = 0.0f;
#pragma unroll
		for (int q = 0; q < GEMV_WARPS; q++) v += part[q][r][t];
		if (t < T && n0 + r < N) y[(long long)t * N + n0 + r] = v;
	}
}

// gemv_row0 is the first output row of this warp: each warp owns GEMV_ROWS consecutive rows.
__device__ __forceinline__ int gemv_row0() { return (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * GEMV_ROWS; }

// gemv_l2 is the weight span a gemv_N warp reads first: the starts of its two rows (clamped as
// gemv_accum clamps them; none past N).
__device__ __forceinline__ l2span gemv_l2(const bf16_t* w, int K, int N) {
	int n0 = gemv_row0();
	if (n0 >= N) return l2span{nullptr, nullptr, 0};
	const char* p0 = (const char*)(w + (long long)n0 * K);
	const char* p1 = (const char*)(w + (long long)imin(n0 + 1, N - 1) * K);
	return l2span{p0, p1, imin(2 * K, L2_PREFETCH_ROW)};
}

// gemv_split_l2 is the weight span a gemv_split_rows warp of the block at rows n0 .. n0+1 of w reads
// first: the start of its quarter of K in both rows (the second row, a pair: the other product's first
// row where gemv_gated_row passes the pair; p1 == p0 past N).
__device__ __forceinline__ l2span gemv_split_l2(const bf16_t* r0, const bf16_t* r1, int K) {
	int warp = threadIdx.x >> 5, K8 = K >> 3, per = (K8 + GEMV_WARPS - 1) / GEMV_WARPS;
	int beg = imin(K8, warp * per), end = imin(K8, (warp + 1) * per);
	return l2span{(const char*)(r0 + beg * 8), (const char*)(r1 + beg * 8), imin((end - beg) * 16, L2_PREFETCH_ROW)};
}

// gemv_rows_l2 is gemv_split_l2 for the block of rows n0, n0+1 of w [N, K] (nothing past N).
__device__ __forceinline__ l2span gemv_rows_l2(const bf16_t* w, int K, int N, int n0) {
	if (n0 >= N) return l2span{nullptr, nullptr, 0};
	return gemv_split_l2(w + (long long)n0 * K, w + (long long)imin(n0 + 1, N - 1) * K, K);
}

// gemv_N: y [T, N] = x [T, K] · w [N, K]ᵀ for T <= N rows (grid: ceil(N / (GEMV_WARPS·GEMV_ROWS))
// blocks of GEMV_WARPS warps).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_1(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_l2(w, K, N)));
	gemv_rows<1>(x, xdt, w, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_2(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_l2(w, K, N)));
	gemv_rows<2>(x, xdt, w, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_4(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_l2(w, K, N)));
	gemv_rows<4>(x, xdt, w, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_8(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_l2(w, K, N)));
	gemv_rows<8>(x, xdt, w, y, T, K, N, gemv_row0());
}

// gemv_split_N: y [T, N] = x [T, K] · w [N, K]ᵀ for T <= N rows with gemv_split_rows (grid:
// ceil(N / GEMV_ROWS) blocks of GEMV_WARPS warps).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_split_1(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_rows_l2(w, K, N, blockIdx.x * GEMV_ROWS)));
	gemv_split_rows<1>(x, xdt, w, y, T, K, N, blockIdx.x * GEMV_ROWS);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_split_2(const void* x, int xdt, const bf16_t* w, float* y, int T, int K, int N) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_rows_l2(w, K, N, blockIdx.x * GEMV_ROWS)));
	gemv_split_rows<2>(x, xdt, w, y, T, K, N, blockIdx.x * GEMV_ROWS);
}

// gemv_multi_N computes up to three products of one x in one launch: y_s [T, N_s] = x · w_sᵀ for s = 0,
// 1, 2 (N_s even, so that no block's rows straddle two products; N_2 may be 0), over N_0 + N_1 + N_2
// rows, GEMV_ROWS a block (gemv_split_rows: these are the small products).
template <int NT>
__device__ __forceinline__ void gemv_multi(const void* x, int xdt, const bf16_t* w0, float* y0, int n0,
	const bf16_t* w1, float* y1, int n1, const bf16_t* w2, float* y2, int n2, int T, int K) {
	int n = blockIdx.x * GEMV_ROWS;
	if (n < n0) {
		gemv_split_rows<NT>(x, xdt, w0, y0, T, K, n0, n);
	} else if (n < n0 + n1) {
		gemv_split_rows<NT>(x, xdt, w1, y1, T, K, n1, n - n0);
	} else {
		gemv_split_rows<NT>(x, xdt, w2, y2, T, K, n2, n - n0 - n1);
	}
}
// gemv_multi_l2 is the weight span of a gemv_multi_N warp: its block's rows of the product it falls in.
__device__ __forceinline__ l2span gemv_multi_l2(const bf16_t* w0, int n0, const bf16_t* w1, int n1, const bf16_t* w2, int n2, int K) {
	int n = blockIdx.x * GEMV_ROWS;
	if (n < n0) return gemv_rows_l2(w0, K, n0, n);
	if (n < n0 + n1) return gemv_rows_l2(w1, K, n1, n - n0);
	return gemv_rows_l2(w2, K, n2, n - n0 - n1);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_multi_1(const void* x, int xdt, const bf16_t* w0, float* y0, int n0, const bf16_t* w1, float* y1, int n1,
	const bf16_t* w2, float* y2, int n2, int T, int K) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_multi_l2(w0, n0, w1, n1, w2, n2, K)));
	gemv_multi<1>(x, xdt, w0, y0, n0, w1, y1, n1, w2, y2, n2, T, K);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_multi_2(const void* x, int xdt, const bf16_t* w0, float* y0, int n0, const bf16_t* w1, float* y1, int n1,
	const bf16_t* w2, float* y2, int n2, int T, int K) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_multi_l2(w0, n0, w1, n1, w2, n2, K)));
	gemv_multi<2>(x, xdt, w0, y0, n0, w1, y1, n1, w2, y2, n2, T, K);
}

// gemv_gated_row computes row i of a gated MLP's activation, act [T, I] (adt) = silu(x · gateᵀ) ⊙
// (x · upᵀ), in one block: gemv_split_rows over the pair (gate row i, up row i), each product summed in
// the order gemv_split_rows sums it, then silu_mul's arithmetic on the two sums. So the activation is
// bit for bit what a GEMV of gate and up and silu_mul store.
template <int NT>
__device__ __forceinline__ void gemv_gated_row(const void* __restrict__ x, int xdt, const bf16_t* __restrict__ gate,
	const bf16_t* __restrict__ up, void* act, int adt, int T, int K, int I, int i) {
	__shared__ float part[GEMV_WARPS][GEMV_ROWS][NT];
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	float acc[GEMV_ROWS][NT];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
	const u32x4* wr[GEMV_ROWS] = {(const u32x4*)(gate + (long long)i * K), (const u32x4*)(up + (long long)i * K)};
	int K8 = K >> 3, per = (K8 + GEMV_WARPS - 1) / GEMV_WARPS;
	gemv_accum_rows<NT>(x, xdt, wr, T, K, imin(K8, warp * per), imin(K8, (warp + 1) * per), acc);
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float v = warp_sum(acc[r][t]);
			if (lane == 0) part[warp][r][t] = v;
		}
	__syncthreads();
	if (warp == 0 && lane < NT) {
		int t = lane;
		float g = 0.0f, u = 0.0f;
#pragma unroll
		for (int q = 0; q < GEMV_WARPS; q++) g += part[q][0][t];
#pragma unroll
		for (int q = 0; q < GEMV_WARPS; q++) u += part[q][1][t];
		if (t < T) st(act, adt, (long long)t * I + i, silu(g) * u);
	}
}

// gemv_gated_N computes y0 [T, n0] = x · w0ᵀ (n0 even, maybe 0: gemv_split_rows, GEMV_ROWS rows a block)
// and a gated MLP's activation act [T, I] = silu(x · gateᵀ) ⊙ (x · upᵀ) (gemv_gated_row, a row a block)
// in one launch: grid n0 / GEMV_ROWS + I blocks. Decode's MoE passes its router as w0 (the products of one
// x), a dense MLP none.
template <int NT>
__device__ __forceinline__ void gemv_gated(const void* x, int xdt, const bf16_t* w0, float* y0, int n0, const bf16_t* gate,
	const bf16_t* up, void* act, int adt, int I, int T, int K) {
	int b0 = n0 / GEMV_ROWS;
	if ((int)blockIdx.x < b0) {
		gemv_split_rows<NT>(x, xdt, w0, y0, T, K, n0, blockIdx.x * GEMV_ROWS);
	} else {
		gemv_gated_row<NT>(x, xdt, gate, up, act, adt, T, K, I, blockIdx.x - b0);
	}
}
// gemv_gated_l2 is the weight span of a gemv_gated_N warp: the block's rows of w0, or its gate and up
// rows.
__device__ __forceinline__ l2span gemv_gated_l2(const bf16_t* w0, int n0, const bf16_t* gate, const bf16_t* up, int I, int K) {
	int b0 = n0 / GEMV_ROWS;
	if ((int)blockIdx.x < b0) return gemv_rows_l2(w0, K, n0, blockIdx.x * GEMV_ROWS);
	int i = blockIdx.x - b0;
	if (i >= I) return l2span{nullptr, nullptr, 0};
	return gemv_split_l2(gate + (long long)i * K, up + (long long)i * K, K);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_gated_1(const void* x, int xdt, const bf16_t* w0, float* y0, int n0, const bf16_t* gate, const bf16_t* up,
	void* act, int adt, int I, int T, int K) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_gated_l2(w0, n0, gate, up, I, K)));
	gemv_gated<1>(x, xdt, w0, y0, n0, gate, up, act, adt, I, T, K);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_gated_2(const void* x, int xdt, const bf16_t* w0, float* y0, int n0, const bf16_t* gate, const bf16_t* up,
	void* act, int adt, int I, int T, int K) {
	PDL_PROLOGUE_L2(l2_prefetch(gemv_gated_l2(w0, n0, gate, up, I, K)));
	gemv_gated<2>(x, xdt, w0, y0, n0, gate, up, act, adt, I, T, K);
}

// moe_plan groups the n = T·k routing slots by expert. experts[s] is slot s's expert id; only the E
// experts first .. first+E-1 are held here. For local expert e, seg[2e] is the first row of its block
// in the permuted order and seg[2e+1] its slot count; blocks are in expert order, each starting at a
// multiple of align (1 for decode; 128 for prefill, so that every block's rows are 256-byte aligned for
// cuBLASLt). perm[row] = the slot of a permuted row (rows in gaps are left as they are); row_of[s] = the
// permuted row of slot s, or -1 when its expert is elsewhere; active[0 .. meta[0]) lists the local
// experts with slots, ascending; meta[1] is the number of rows including gaps. Within an expert, slots
// keep their order. One warp; dynamic shared memory holds 2E ints.
extern "C" __global__ void moe_plan(const int* experts, int n, int first, int E, int align,
	int* seg, int* perm, int* row_of, int* active, int* meta) {
	PDL_PROLOGUE();
	extern __shared__ int plan_sh[];
	int* cnt = plan_sh;
	int* cur = plan_sh + E;
	int lane = threadIdx.x;
	for (int e = lane; e < E; e += 32) cnt[e] = 0;
	__syncwarp();
	for (int base = 0; base < n; base += 32) {
		int s = base + lane;
		int e = s < n ? experts[s] - first : -1;
		bool ok = s < n && e >= 0 && e < E;
		unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
		if (ok && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
		__syncwarp();
	}
	if (lane == 0) {
		int off = 0, na = 0;
		for (int e = 0; e < E; e++) {
			seg[2 * e] = off;
			seg[2 * e + 1] = cnt[e];
			cur[e] = off;
			if (cnt[e] > 0) {
				active[na++] = e;
				off += (cnt[e] + align - 1) / align * align;
			}
		}
		meta[0] = na;
		meta[1] = off;
	}
	__syncwarp();
	for (int base = 0; base < n; base += 32) {
		int s = base + lane;
		int e = s < n ? experts[s] - first : -1;
		bool ok = s < n && e >= 0 && e < E;
		unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
		int r = -1;
		if (ok) {
			r = cur[e] + __popc(peers & ((1u << lane) - 1u));
			perm[r] = s;
		}
		if (s < n) row_of[s] = r;
		__syncwarp();
		if (ok && lane == __ffs(peers) - 1) cur[e] += __popc(peers);
		__syncwarp();
	}
}

#define EG_WARPS 8
#define EG_COLS 256  // columns per block: 32 lanes × 8
#define EG_KTILE 1024 // the most K rows one block (one split) covers

// eg_stage_rows puts K columns [k0, k0+kn) of the ng input rows r, r+1, ... of an expert GEMV into
// xs as float: row r is x[perm[r] / topk] · scores[perm[r]] (mode 0: gate_up, the router's score
// scales the input as in Llama 4) or x[r] (mode 1: down). Shared by the bf16 and quantised kernels.
template <int NS>
__device__ __forceinline__ void eg_stage_rows(float (&xs)[NS][EG_KTILE], const void* __restrict__ x, int xdt, int mode,
	const int* __restrict__ perm, const float* __restrict__ scores, int topk, int K, int k0, int kn, int r, int ng) {
	for (int i = threadIdx.x; i < ng * kn; i += blockDim.x) {
		int j = i / kn, kk = i - j * kn;
		float v;
		if (mode == 0) {
			int sl = perm[r + j];
			v = ld(x, xdt, (long long)(sl / topk) * K + k0 + kk) * scores[sl];
		} else {
			v = ld(x, xdt, (long long)(r + j) * K + k0 + kk);
		}
		xs[j][kk] = v;
	}
}

// eg_fma adds input value xs[j][kx] times one lane's 8 weight columns wf to acc[j], for the ng rows.
template <int NS>
__device__ __forceinline__ void eg_fma(float (&acc)[NS][8], const float (&xs)[NS][EG_KTILE], int kx, int ng, const float (&wf)[8]) {
#pragma unroll
	for (int j = 0; j < NS; j++) {
		if (j < ng) {
			float xv = xs[j][kx];
#pragma unroll
			for (int i = 0; i < 8; i++) acc[j][i] += xv * wf[i];
		}
	}
}

// eg_store_rows adds the warps' partial sums acc (each lane 8 columns of its warp's K rows) in a fixed
// order through shared memory and writes row j's 256 columns of the block to out[j·N + col].
template <int NS>
__device__ __forceinline__ void eg_store_rows(const float (&acc)[NS][8], float (&red)[EG_WARPS][EG_COLS], int ng, int N,
	float* __restrict__ out) {
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
	for (int j = 0; j < NS; j++) {
		if (j < ng) { // uniform over the block
			__syncthreads(); // red is free
#pragma unroll
			for (int i = 0; i < 8; i++) red[warp][lane * 8 + i] = acc[j][i];
			__syncthreads();
			int col = blockIdx.x * EG_COLS + threadIdx.x;
			if (col < N) {
				float s = 0.0f;
#pragma unroll
				for (int v = 0; v < EG_WARPS; v++) s += red[v][threadIdx.x];
				out[(long long)j * N + col] = s;
			}
		}
	}
}

// expert_gemv_rows is the split-K GEMV of the routed experts for a few rows each. Block (x, y, z) takes
// the z-th active expert e (blocks past meta[0] return), columns [256x, 256x+256) and K rows
// [y·ksplit, (y+1)·ksplit) of W_e = w + e·K·N (input-major [K, N], bf16), and writes
// P[y][r][c] = Σ_{k in split} in[r][k] · W_e[k][c] for the expert's rows r, NS rows at a time. The
// input row r is x[perm[r] / topk] · scores[perm[r]] (mode 0: gate_up, the router's score scales the
// input as in Llama 4) or x[r] (mode 1: down, x holding one row per permuted row). Each warp walks every
// 8th K row with one 16-byte load a lane, four rows in flight; the warps' sums are added in a fixed
// order through shared memory, so results do not depend on timing.
template <int NS>
__device__ __forceinline__ void expert_gemv_rows(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const bf16_t* __restrict__ w, int K, int N, int ksplit, float* __restrict__ P, int R) {
	__shared__ float xs[NS][EG_KTILE];
	__shared__ float red[EG_WARPS][EG_COLS];
	if ((int)blockIdx.z >= meta[0]) return;
	int e = active[blockIdx.z];
	int r0 = seg[2 * e], nr = seg[2 * e + 1];
	int split = blockIdx.y;
	int k0 = split * ksplit, k1 = imin(K, k0 + ksplit);
	if (k0 >= K) return;
	int kn = k1 - k0;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	int c8 = blockIdx.x * 32 + lane; // this lane's chunk of 8 columns
	bool colok = c8 * 8 < N;
	const bf16_t* we = w + (long long)e * K * N + c8 * 8;
	for (int g = 0; g < nr; g += NS) {
		int ng = imin(NS, nr - g);
		__syncthreads(); // the previous group is done with xs
		eg_stage_rows<NS>(xs, x, xdt, mode, perm, scores, topk, K, k0, kn, r0 + g, ng);
		__syncthreads();
		float acc[NS][8];
#pragma unroll
		for (int j = 0; j < NS; j++)
#pragma unroll
			for (int i = 0; i < 8; i++) acc[j][i] = 0.0f;
		if (colok) {
			int kk = k0 + warp;
			// Eight weight rows in flight a warp (Nsight Compute: with four, the warps waited on memory
			// 70 % of the time at 65 % of the DRAM bandwidth).
			for (; kk + 7 * EG_WARPS < k1; kk += 8 * EG_WARPS) {
				u32x4 wv[8];
#pragma unroll
				for (int u = 0; u < 8; u++) wv[u] = *(const u32x4*)(we + (long long)(kk + u * EG_WARPS) * N);
#pragma unroll
				for (int u = 0; u < 8; u++) {
					float wf[8];
					bf16x8(wv[u], wf);
					eg_fma<NS>(acc, xs, kk + u * EG_WARPS - k0, ng, wf);
				}
			}
			for (; kk < k1; kk += EG_WARPS) {
				float wf[8];
				bf16x8(*(const u32x4*)(we + (long long)kk * N), wf);
				eg_fma<NS>(acc, xs, kk - k0, ng, wf);
			}
		}
		eg_store_rows<NS>(acc, red, ng, N, P + ((long long)split * R + r0 + g) * N);
	}
}

// expert_gemv_1 serves decode at one token (an expert then has at most one row); expert_gemv_8 any row
// count, 8 rows a pass. Blocks of EG_WARPS warps (256 threads).
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_1(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R) {
	PDL_PROLOGUE();
	expert_gemv_rows<1>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_8(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R) {
	PDL_PROLOGUE();
	expert_gemv_rows<8>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R);
}

// expert_gemv_swiglu_N is expert_gemv_N over a gate_up weight (N = 2I, I % EG_COLS == 0) followed by
// expert_act, in one launch: the last block of the 2·gridDim.y blocks of expert blockIdx.z that wrote gate
// columns [256j, 256j+256) or the matching up columns (counter ctr[z·(I/256) + j]) sums their splits and
// stores act[r][c] = silu(g) · u for the expert's rows, as expert_act computes it (eg_swiglu_epilogue in
// prelude.cuh, shared with the int4 experts' q4expert_gemv_swiglu_N).
template <int NS>
__device__ __forceinline__ void expert_gemv_swiglu(const void* x, int xdt, int mode, const int* perm, const float* scores,
	int topk, const int* seg, const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P,
	int R, int* ctr, void* act, int adt) {
	expert_gemv_rows<NS>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R);
	eg_swiglu_epilogue(ctr, seg, active, meta, N, P, R, EG_COLS, act, adt);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_swiglu_1(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R, int* ctr, void* act, int adt) {
	PDL_PROLOGUE();
	expert_gemv_swiglu<1>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R, ctr, act, adt);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_swiglu_8(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R, int* ctr, void* act, int adt) {
	PDL_PROLOGUE();
	expert_gemv_swiglu<8>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R, ctr, act, adt);
}

// expert_gemv_combine_N is expert_gemv_N over a down weight (N = H) followed by expert_combine, in one
// launch: the last of the gridDim.y·gridDim.z blocks that wrote columns [256x, 256x+256) (counter
// ctr[blockIdx.x]) sums, for each of the T tokens, its slots' splits in routing order, adds add (not null)
// and stores out[t][h], as expert_combine does (eg_combine_epilogue in prelude.cuh).
template <int NS>
__device__ __forceinline__ void expert_gemv_combine(const void* x, int xdt, int mode, const int* perm, const float* scores,
	int topk, const int* seg, const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P,
	int R, int* ctr, const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	expert_gemv_rows<NS>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R);
	eg_combine_epilogue(ctr, topk, N, P, R, EG_COLS, row_of, T, out, odt, add, adt);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_combine_1(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R, int* ctr,
	const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	expert_gemv_combine<1>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R, ctr, row_of, T, out, odt, add, adt);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
expert_gemv_combine_8(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const bf16_t* w, int K, int N, int ksplit, float* P, int R, int* ctr,
	const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	expert_gemv_combine<8>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, K, N, ksplit, P, R, ctr, row_of, T, out, odt, add, adt);
}

// expert_act sets act[r][c] = silu(g) · u for the first meta[1] of R permuted rows, where g and u are
// the sums over the S splits of P[s][r][c] and P[s][r][I + c] (P [S, R, 2I], gate columns then up).
// ELEM_UNROLL elements a thread per pass; R·I < 2^31 (the host checks), so the index math is 32-bit.
extern "C" __global__ void expert_act(const float* P, int S, int R, int I, const int* meta, void* act, int adt) {
	PDL_PROLOGUE();
	int rows = meta[1];
	long long n = (long long)R * I;
	GRID_STRIDE_N(i0, n) {
		float g[ELEM_UNROLL], u[ELEM_UNROLL];
#pragma unroll
		for (int v = 0; v < ELEM_UNROLL; v++) {
			int i = (int)i0 + v * (int)blockDim.x;
			int r = i / I, c = i - r * I;
			g[v] = u[v] = 0.0f;
			if (i < n && r < rows) {
				for (int s = 0; s < S; s++) {
					const float* p = P + ((long long)s * R + r) * 2 * I;
					g[v] += p[c];
					u[v] += p[I + c];
				}
			}
		}
#pragma unroll
		for (int v = 0; v < ELEM_UNROLL; v++) {
			int i = (int)i0 + v * (int)blockDim.x;
			if (i < n && i / I < rows) st(act, adt, i, silu(g[v]) * u[v]);
		}
	}
}

// expert_combine sets out[t][h] (n = T·H elements) to the sum, over token t's k slots in routing order
// whose expert is held here (row_of >= 0), of the slot's down projection: the sum over the S splits of
// P[s][row][h] (P [S, R, H]). Tokens with no local expert get zeros. With add (not null), add[t][h] is
// added to the sum last (the shared expert's output: Add(routed, shared) in one pass).
extern "C" __global__ void expert_combine(const float* P, int S, int R, int H, const int* row_of, int k, void* out, int odt, long long n,
	const void* add, int adt) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) {
		long long t = i / H, h = i - t * H;
		float sum = 0.0f;
		for (int j = 0; j < k; j++) {
			int r = row_of[t * k + j];
			if (r < 0) continue;
			float y = 0.0f;
			for (int s = 0; s < S; s++) y += P[((long long)s * R + r) * H + h];
			sum += y;
		}
		if (add) sum += ld(add, adt, i);
		st(out, odt, i, sum);
	}
}

// expert_gather writes the prefill experts' GEMM input: row r of xp [R, H] (bf16) is
// x[perm[r] / k] · scores[perm[r]], or zeros for a gap row (perm[r] < 0: the host fills perm with -1
// first). n = R·H < 2^31 (the host checks); ELEM_UNROLL elements a thread per pass.
extern "C" __global__ void expert_gather(const void* x, int xdt, const int* perm, const float* scores, int k, int H, bf16_t* xp, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE_N(i0, n) {
		float v[ELEM_UNROLL];
#pragma unroll
		for (int u = 0; u < ELEM_UNROLL; u++) {
			int i = (int)i0 + u * (int)blockDim.x;
			v[u] = 0.0f;
			if (i < n) {
				int r = i / H, h = i - r * H;
				int sl = perm[r];
				if (sl >= 0) v[u] = ld(x, xdt, (long long)(sl / k) * H + h) * scores[sl];
			}
		}
#pragma unroll
		for (int u = 0; u < ELEM_UNROLL; u++) {
			int i = (int)i0 + u * (int)blockDim.x;
			if (i < n) xp[i] = f32_to_bf16(v[u]);
		}
	}
}

// The prefill experts' elementwise kernels with 16-byte accesses (the host takes them when the rows are a
// multiple of 8 elements and every operand 16-byte aligned): a thread handles 8 consecutive elements of
// a row, each with the arithmetic of the kernel above it, so the results are the same bit for bit.

// expert_gather_v8 is expert_gather, n8 = R·H/8 chunks of 8.
extern "C" __global__ void expert_gather_v8(const void* x, int xdt, const int* perm, const float* scores, int k, int H,
	bf16_t* xp, long long n8) {
	PDL_PROLOGUE();
	int H8 = H >> 3;
	GRID_STRIDE(i, n8) {
		long long r = i / H8, c = i - r * H8;
		int sl = perm[r];
		float v[8];
		if (sl >= 0) {
			float s = scores[sl];
			load8((const char*)x + (long long)(sl / k) * H * (xdt == DT_F32 ? 4 : 2), xdt, c, v);
#pragma unroll
			for (int u = 0; u < 8; u++) v[u] *= s;
		} else {
#pragma unroll
			for (int u = 0; u < 8; u++) v[u] = 0.0f;
		}
		store8(xp, DT_BF16, i, v);
	}
}

// expert_act_v8 is expert_act, over R·I/8 chunks of 8 (I % 8 == 0).
extern "C" __global__ void expert_act_v8(const float* P, int S, int R, int I, const int* meta, void* act, int adt) {
	PDL_PROLOGUE();
	int rows = meta[1], I8 = I >> 3;
	long long n8 = (long long)R * I8;
	GRID_STRIDE(i, n8) {
		long long r = i / I8, c = i - r * I8;
		if (r >= rows) continue;
		float g[8], u[8];
#pragma unroll
		for (int e = 0; e < 8; e++) g[e] = u[e] = 0.0f;
		for (int s = 0; s < S; s++) {
			const float* p = P + ((long long)s * R + r) * 2 * I;
			float a[8], b[8];
			load8(p, DT_F32, c, a);
			load8(p + I, DT_F32, c, b);
#pragma unroll
			for (int e = 0; e < 8; e++) {
				g[e] += a[e];
				u[e] += b[e];
			}
		}
#pragma unroll
		for (int e = 0; e < 8; e++) g[e] = silu(g[e]) * u[e];
		store8((char*)act + r * I * (adt == DT_F32 ? 4 : 2), adt, c, g);
	}
}

// expert_combine_v8 is expert_combine, over T·H/8 chunks of 8 (H % 8 == 0).
extern "C" __global__ void expert_combine_v8(const float* P, int S, int R, int H, const int* row_of, int k, void* out, int odt,
	long long n8, const void* add, int adt) {
	PDL_PROLOGUE();
	int H8 = H >> 3;
	GRID_STRIDE(i, n8) {
		long long t = i / H8, c = i - t * H8;
		float sum[8];
#pragma unroll
		for (int e = 0; e < 8; e++) sum[e] = 0.0f;
		for (int j = 0; j < k; j++) {
			int r = row_of[t * k + j];
			if (r < 0) continue;
			float y[8];
#pragma unroll
			for (int e = 0; e < 8; e++) y[e] = 0.0f;
			for (int s = 0; s < S; s++) {
				float a[8];
				load8(P + ((long long)s * R + r) * H, DT_F32, c, a);
#pragma unroll
				for (int e = 0; e < 8; e++) y[e] += a[e];
			}
#pragma unroll
			for (int e = 0; e < 8; e++) sum[e] += y[e];
		}
		if (add) {
			float a[8];
			load8(add, adt, i, a);
#pragma unroll
			for (int e = 0; e < 8; e++) sum[e] += a[e];
		}
		store8(out, odt, i, sum);
	}
}
