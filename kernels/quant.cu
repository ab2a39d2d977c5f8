// quant.cu: quantised weights (package quant's formats) kept in their compact form on the GPU: fp8
// (E4M3 codes, one float32 scale per output channel); int4's GEMVs and dequantisation are in
// quant_int4.cu, a unit of its own (this file keeps the device quantiser of both formats,
// quantize_bf16). The kernels dequantise in registers: every weight becomes exactly quant.Weight.Dequantize's value, q·scale in
// float32 (rounded to bf16 for QF_FP8_BF16, the compressed-tensors format), before it meets x. The
// scalar FP8 rules here (E4M3 decoding, rounding, FbgemmFp8's per-token activation quantisation,
// quant.FakeQuantFP8Rows) serve quant_fp8.cu too, whose kernels take the fp8 weights' decode paths and
// the activations' quantisation (fp8_act_rows).

// Weight format codes; they match backend/cuda's qformat codes.
#define QF_FP8 0      // q·s in float32 (fp8 rowwise, FbgemmFp8)
#define QF_FP8_BF16 1 // bf16(q·s) (compressed-tensors FP8, dequantised to bf16)
#define QF_INT4 2     // q·s, q in [-8, 7], s bf16-valued

#define FP8_MAX 448.0f
#define ACT_SCALE_UB 1200.0f // quant.ActivationScaleUB

// pow2f returns 2^e for -126 <= e <= 127 (exact).
__device__ __forceinline__ float pow2f(int e) { return __int_as_float((e + 127) << 23); }

// e4m3_to_f32 returns the value of an E4M3 code (OCP e4m3fn): 0x7F and 0xFF are NaN. Exact.
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
	u32 e = (b >> 3) & 15u, m = b & 7u;
	float v;
	if (e == 0) v = (float)m * pow2f(-9);
	else v = __uint_as_float(((e + 120u) << 23) | (m << 20)); // (1 + m/8)·2^(e-7)
	if ((b & 0x7fu) == 0x7fu) v = __int_as_float(0x7fc00000);
	return (b & 0x80u) ? -v : v;
}

// round_e4m3 rounds x to the nearest E4M3 value, ties to even, saturating at ±448 (quant.RoundE4M3).
// The products by powers of two are exact, so float32 gives Go's float64 result.
__device__ __forceinline__ float round_e4m3(float x) {
	if (x != x) return x;
	float a = fabsf(x);
	if (a >= FP8_MAX) return x < 0.0f ? -FP8_MAX : FP8_MAX;
	if (a == 0.0f) return x;
	int ex = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127; // floor(log2 a) for normal a
	int sh = ex < -6 ? -9 : ex - 3;                           // log2 of the step
	float r = rintf(a * pow2f(-sh)) * pow2f(sh);
	return x < 0.0f ? -r : r;
}

// e4m3_encode returns the code of x, which must be an E4M3 value (round_e4m3's result) or NaN.
__device__ __forceinline__ u32 e4m3_encode(float x) {
	u32 sign = (__float_as_uint(x) >> 31) ? 0x80u : 0u;
	if (x != x) return sign | 0x7fu;
	float a = fabsf(x);
	if (a == 0.0f) return sign;
	int ex = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;
	if (ex < -6) return sign | (u32)(a * pow2f(9)); // subnormal: m·2^-9
	u32 m = (__float_as_uint(a) >> 20) & 7u;
	return sign | ((u32)(ex + 7) << 3) | m;
}

// e4m3x2_rn returns the E4M3 codes of lo (low byte) and hi (high byte), values already clamped to ±448:
// e4m3_encode(round_e4m3(·)) of each (round to nearest, ties to even, subnormals at 2^-9), which sm_89
// and later do in one cvt.rn.satfinite instruction for both, where the software rule takes some forty
// instructions an element. The emulator (TPF_EMU) and older GPUs take the software rule.
__device__ __forceinline__ u32 e4m3x2_rn(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(TPF_EMU)
	unsigned short d;
	asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo)); // a to the upper byte
	return d;
#else
	return e4m3_encode(round_e4m3(lo)) | e4m3_encode(round_e4m3(hi)) << 8;
#endif
}

// fp8_code returns the E4M3 code of v/s clamped to ±448: FbgemmFp8's quantisation of one value.
__device__ __forceinline__ u32 fp8_code(float v, float s) { return e4m3x2_rn(fminf(fmaxf(v / s, -FP8_MAX), FP8_MAX), 0.0f) & 0xffu; }

// fp8_row_scale is quant.FP8RowScale: amax/448 with amax clamped to ub when ub > 0; a zero row 1/448.
__device__ __forceinline__ float fp8_row_scale(float amax, float ub) {
	if (ub > 0.0f && amax > ub) amax = ub;
	if (amax == 0.0f) return 1.0f / FP8_MAX;
	return amax / FP8_MAX;
}

// fake_quant_fp8 is one element of quant.FakeQuantFP8Rows: RoundE4M3(clamp(v/s, ±448))·s, the rounding
// as a code (fp8_code) decoded exactly.
__device__ __forceinline__ float fake_quant_fp8(float v, float s) { return e4m3_to_f32(fp8_code(v, s)) * s; }

// deq applies the format's scale to a code's value q: q·s, rounded to bf16 for QF_FP8_BF16.
__device__ __forceinline__ float deq(float q, float s, int fmt) {
	float v = q * s;
	return fmt == QF_FP8_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	__syncthreads();
	if (lane == 0) scratch[warp] = v;
	__syncthreads();
	v = lane < warps ? scratch[lane] : 0.0f;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

// qweight_at returns element idx of an fp8 weight viewed as [outer, in, inner] (row-major, idx =
// (o·in + i)·inner + c): the dequantised value, as float32.
__device__ __forceinline__ float qweight_at(const unsigned char* w, const void* scales, int fmt, long long idx,
	long long in, long long inner, int gs, int G) {
	long long c = idx % inner, oi = idx / inner;
	long long o = oi / in;
	return deq(e4m3_to_f32(w[idx]), ((const float*)scales)[o * inner + c], fmt);
}

// dequant_bf16 writes elements [off, off + n) of an fp8 weight (see qweight_at) to out[0 .. n) as bf16:
// the prefill path's GEMM operand (one expert at a time for the routed experts). int4:
// dequant_int4_bf16 (quant_int4.cu).
extern "C" __global__ void dequant_bf16(const unsigned char* w, const void* scales, int fmt, long long in, long long inner,
	int gs, int G, long long off, long long n, bf16_t* out) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) out[i] = f32_to_bf16(qweight_at(w, scales, fmt, off + i, in, inner, gs, G));
}

// qgemv_acc8 adds to acc[r][t] the products of the 8 weights wf[r][0..8) with x[t][8c .. 8c+8).
template <int NT>
__device__ __forceinline__ void qgemv_acc8(const void* __restrict__ x, int xdt, long long xrow, int T, int c,
	float (&wf)[GEMV_ROWS][8], float (&acc)[GEMV_ROWS][NT]) {
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

// qgemv_accum adds to acc[r][t] this lane's share of the dot products of rows n0 .. n0+GEMV_ROWS-1 of
// an fp8 w [N, K] with the T <= NT rows of x [T, K], over the 16-byte chunks [cbeg, cend) of each row
// (16 codes a chunk): the lanes of a warp stride over the chunks, and each chunk is dequantised in
// registers (q·s, as quant.Weight.Dequantize) and multiplied by x (float32 or bf16, as stored) in
// float32. K is a multiple of 16; w and x 16-byte aligned. (int4: quant_int4.cu.)
template <int NT>
__device__ __forceinline__ void qgemv_accum(const void* __restrict__ x, int xdt, const unsigned char* __restrict__ w,
	const void* __restrict__ scales, int fmt, int gs, int T, int K, int N, int n0, int cbeg, int cend, float (&acc)[GEMV_ROWS][NT]) {
	int lane = threadIdx.x & 31;
	long long xrow = dt_size(xdt) * (long long)K;
	const u32x4* wr[GEMV_ROWS];
	float srow[GEMV_ROWS];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++) {
		int n = imin(n0 + r, N - 1);
		wr[r] = (const u32x4*)(w + (long long)n * K);
		srow[r] = ((const float*)scales)[n];
	}
	// Two chunks a row in flight (the loads do not depend on the sums, so the unrolled loop issues both
	// first).
#pragma unroll 2
	for (int ch = cbeg + lane; ch < cend; ch += 32) {
		u32x4 wv[GEMV_ROWS];
#pragma unroll
		for (int r = 0; r < GEMV_ROWS; r++) wv[r] = wr[r][ch];
#pragma unroll
		for (int j = 0; j < 2; j++) { // 8 codes a pair of words
			float wf[GEMV_ROWS][8];
#pragma unroll
			for (int r = 0; r < GEMV_ROWS; r++) {
				u32 lo = j == 0 ? wv[r].x : wv[r].z, hi = j == 0 ? wv[r].y : wv[r].w;
#pragma unroll
				for (int i = 0; i < 4; i++) {
					wf[r][i] = deq(e4m3_to_f32((lo >> (8 * i)) & 0xffu), srow[r], fmt);
					wf[r][4 + i] = deq(e4m3_to_f32((hi >> (8 * i)) & 0xffu), srow[r], fmt);
				}
			}
			qgemv_acc8<NT>(x, xdt, xrow, T, ch * 2 + j, wf, acc);
		}
	}
}

// qgemv_chunks is the number of 16-byte chunks of a row of K fp8 codes.
__device__ __forceinline__ int qgemv_chunks(int fmt, int K) { return K / 16; }

// qgemv_rows computes output rows n0 .. n0+GEMV_ROWS-1 of y [T, N] (float32) = x [T, K] · w [N, K]ᵀ for a
// quantised w with one warp over all of K (qgemv_accum); a warp sum finishes each dot product.
template <int NT>
__device__ __forceinline__ void qgemv_rows(const void* __restrict__ x, int xdt, const unsigned char* __restrict__ w,
	const void* __restrict__ scales, int fmt, int gs, float* __restrict__ y, int T, int K, int N, int n0) {
	int lane = threadIdx.x & 31;
	if (n0 >= N) return; // uniform over the warp
	float acc[GEMV_ROWS][NT];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
	qgemv_accum<NT>(x, xdt, w, scales, fmt, gs, T, K, N, n0, 0, qgemv_chunks(fmt, K), acc);
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float v = warp_sum(acc[r][t]);
			if (lane == 0 && t < T && n0 + r < N) y[(long long)t * N + n0 + r] = v;
		}
}

// qgemv_split_rows is qgemv_rows for a whole block (as gemv_split_rows): its GEMV_WARPS warps share the
// rows n0 .. n0+GEMV_ROWS-1, each over a contiguous quarter of the chunks, and the partial sums are added
// in warp order (a fixed order). For small weights (few rows), which one warp a row pair leaves short of
// loads in flight.
template <int NT>
__device__ __forceinline__ void qgemv_split_rows(const void* __restrict__ x, int xdt, const unsigned char* __restrict__ w,
	const void* __restrict__ scales, int fmt, int gs, float* __restrict__ y, int T, int K, int N, int n0) {
	__shared__ float part[GEMV_WARPS][GEMV_ROWS][NT];
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	if (n0 >= N) return; // uniform over the block
	float acc[GEMV_ROWS][NT];
#pragma unroll
	for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
	int chunks = qgemv_chunks(fmt, K), per = (chunks + GEMV_WARPS - 1) / GEMV_WARPS;
	qgemv_accum<NT>(x, xdt, w, scales, fmt, gs, T, K, N, n0, imin(chunks, warp * per), imin(chunks, (warp + 1) * per), acc);
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

// qgemv_N: y [T, N] = x [T, K] · w [N, K]ᵀ for a quantised w and T <= N rows (grid: ceil(N /
// (GEMV_WARPS·GEMV_ROWS)) blocks of GEMV_WARPS warps).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_1(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_rows<1>(x, xdt, w, scales, fmt, gs, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_2(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_rows<2>(x, xdt, w, scales, fmt, gs, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_4(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_rows<4>(x, xdt, w, scales, fmt, gs, y, T, K, N, gemv_row0());
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_8(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_rows<8>(x, xdt, w, scales, fmt, gs, y, T, K, N, gemv_row0());
}

// qgemv_split_N: qgemv_N for T <= N rows with qgemv_split_rows (grid: ceil(N / GEMV_ROWS) blocks of
// GEMV_WARPS warps).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_split_1(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_split_rows<1>(x, xdt, w, scales, fmt, gs, y, T, K, N, blockIdx.x * GEMV_ROWS);
}
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)
qgemv_split_2(const void* x, int xdt, const unsigned char* w, const void* scales, int fmt, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	qgemv_split_rows<2>(x, xdt, w, scales, fmt, gs, y, T, K, N, blockIdx.x * GEMV_ROWS);
}

// qexpert_w8 dequantises the 8 weights [c0, c0+8) of row kk of expert e's [K, N] slice of an fp8
// [E, K, N] weight (N % 8 == 0). (int4: quant_int4.cu.)
__device__ __forceinline__ void qexpert_w8(const unsigned char* __restrict__ w, const void* __restrict__ scales, int fmt, int gs,
	int G, int e, int K, int N, int kk, int c0, float* wf) {
	long long idx = ((long long)e * K + kk) * N + c0;
	const u32* p = (const u32*)(w + idx); // 8 codes, 8-byte aligned
	u32 lo = p[0], hi = p[1];
	const float* s = (const float*)scales + (long long)e * N + c0;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		wf[i] = deq(e4m3_to_f32((lo >> (8 * i)) & 0xffu), s[i], fmt);
		wf[4 + i] = deq(e4m3_to_f32((hi >> (8 * i)) & 0xffu), s[4 + i], fmt);
	}
}

// qexpert_gemv_rows is expert_gemv_rows (gemv.cu) for quantised expert weights: the same split-K plan,
// inputs and output P, each lane dequantising 8 columns of a K row in registers (qexpert_w8). The
// input row is x[perm[r] / topk]·scores[perm[r]] (mode 0) or x[r] (mode 1).
template <int NS>
__device__ __forceinline__ void qexpert_gemv_rows(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const unsigned char* __restrict__ w, const void* __restrict__ scales, int fmt, int gs,
	int K, int N, int ksplit, float* __restrict__ P, int R) {
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
	int G = 1;
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
			// Four K rows a warp in flight (expert_gemv_rows keeps eight: unmeasured here).
#pragma unroll 4
			for (int kk = k0 + warp; kk < k1; kk += EG_WARPS) {
				float wf[8];
				qexpert_w8(w, scales, fmt, gs, G, e, K, N, kk, c8 * 8, wf);
				eg_fma<NS>(acc, xs, kk - k0, ng, wf);
			}
		}
		eg_store_rows<NS>(acc, red, ng, N, P + ((long long)split * R + r0 + g) * N);
	}
}

// qexpert_gemv_1 and qexpert_gemv_8 are expert_gemv_1 and expert_gemv_8 for quantised weights.
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
qexpert_gemv_1(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const unsigned char* w, const void* scales, int fmt, int gs, int K, int N, int ksplit,
	float* P, int R) {
	PDL_PROLOGUE();
	qexpert_gemv_rows<1>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, fmt, gs, K, N, ksplit, P, R);
}
extern "C" __global__ void __launch_bounds__(EG_WARPS * 32)
qexpert_gemv_8(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const unsigned char* w, const void* scales, int fmt, int gs, int K, int N, int ksplit,
	float* P, int R) {
	PDL_PROLOGUE();
	qexpert_gemv_rows<8>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, fmt, gs, K, N, ksplit, P, R);
}

// quantize_bf16 quantises a bf16 weight v viewed as [outer, in, inner] (quant.Quantize's rules, on the
// values as they are): one thread a scale, nscales = outer·G·inner of them, scale s = (o·G + g)·inner + c
// over input rows [g·gs, min((g+1)·gs, in)). fp8 (QF_FP8 or QF_FP8_BF16): s = FP8RowScale(max|w|, 0),
// code = E4M3(clamp(w/s, ±448)), scales float32. int4: s = bf16(max|w|/7), q = clamp(rint(w/s), -8, 7)
// (0 where s = 0), scales bf16; the nibbles are or-ed into codes, which the host zeroes first. For
// benchmarks' random quantised weights, made on the device.
extern "C" __global__ void quantize_bf16(const bf16_t* v, long long in, long long inner, int fmt, int gs, int G,
	long long nscales, unsigned char* codes, void* scales) {
	PDL_PROLOGUE();
	GRID_STRIDE(s, nscales) {
		long long c = s % inner, og = s / inner;
		long long g = og % G, o = og / G;
		long long lo = g * gs, hi = lo + gs < in ? lo + gs : in;
		float amax = 0.0f;
		for (long long i = lo; i < hi; i++) amax = fmaxf(amax, fabsf(bf16_to_f32(v[(o * in + i) * inner + c])));
		if (fmt == QF_INT4) {
			float sc = bf16_to_f32(f32_to_bf16(amax / 7.0f));
			((bf16_t*)scales)[s] = f32_to_bf16(sc);
			for (long long i = lo; i < hi; i++) {
				long long idx = (o * in + i) * inner + c;
				int q = 0;
				if (sc != 0.0f) q = (int)fminf(fmaxf(rintf(bf16_to_f32(v[idx]) / sc), -8.0f), 7.0f);
				u32 nib = ((u32)q & 15u) << (4 * (int)(idx & 1));
				atomicOr((u32*)(codes + ((idx >> 1) & ~3ll)), nib << (8 * (int)((idx >> 1) & 3)));
			}
		} else {
			float sc = fp8_row_scale(amax, 0.0f);
			((float*)scales)[s] = sc;
			for (long long i = lo; i < hi; i++) {
				long long idx = (o * in + i) * inner + c;
				codes[idx] = (unsigned char)fp8_code(bf16_to_f32(v[idx]), sc);
			}
		}
	}
}
