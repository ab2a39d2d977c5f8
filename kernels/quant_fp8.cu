// quant_fp8.cu: the fp8 decode kernels (backend/cuda fp8.go) and the fp8 activation quantisation.
//
// An fp8 weight's codes are kept output-major on the GPU: [out, in] for Linear (the checkpoint's own
// layout) and [E, out, in] for the routed experts (transposed once at load, fp8.go), so an output
// channel's codes are K contiguous bytes, the layout cuBLASLt's FP8 GEMM takes ("TN") as well. The GEMVs
// here give each warp FP8_ROWS output rows over all of K: lanes stride over the rows' 16-byte chunks,
// FP8_UNROLL chunks of each row in flight a lane (the loads do not wait for the sums), the codes widened
// to float32 in hardware on sm_89+ (cvt.rn.f16x2.e4m3x2, exact; the emulator and older GPUs run the
// exact software decode of quant.cu), and a row's float32 scale is applied once to its sum:
// y = (Σ_k x_k·q_k)·s, which differs from the reference Σ_k x_k·(q_k·s) by float32 rounding only (about
// 1e-7 relative). QF_FP8_BF16 (compressed-tensors) keeps the reference's weights, bf16(q·s) one by one.
//
// The GEMVs read their input rows as float32 in "word-major" order (fp8_wm): a row of K = 16·chunks is
// stored as four runs of chunks float4s, run q holding elements [16c + 4q, 16c + 4q + 4) of every chunk
// c, so that the lanes of a warp, each on its own chunk, read 16 consecutive bytes each (no bank
// conflicts in shared memory, four L1 wavefronts a warp-wide load) where the row-major order would put
// them 64 bytes apart.
//
// Dynamic activations (FbgemmFp8): the staged ("xs") kernels quantise their input rows themselves
// (fp8_quant_row: quant.FakeQuantFP8Rows, the values fp8_act_rows writes) into shared memory before
// their products, so that decode runs no separate quantisation launch; their grids are capped (fp8.go)
// and each block loops over row groups, so that few blocks repeat the staging. The other kernels read
// rows quantised (or, for weight-only formats, just converted) beforehand by fp8_act_rows, once for
// every weight of the same input.
//
// This file sorts after gemv.cu and quant.cu in its compilation unit and uses their helpers.

#define FP8_ROWS 2     // output rows a warp
#define FP8_UNROLL 4   // 16-byte chunks of each output row a lane has in flight
#define FP8_XS 8192    // floats of input rows a staged block holds in shared memory (32 KiB)
#define FP8_THREADS 256

struct alignas(8) u32x2 {
	u32 x, y;
};

// fp8x4 widens the four E4M3 codes of w (code i in byte i) to float32, exactly; 0x7F and 0xFF give NaN.
__device__ __forceinline__ void fp8x4(u32 w, float (&f)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
	asm("{\n\t.reg .b16 fp8lo, fp8hi, fp8a, fp8b, fp8c, fp8d;\n\t.reg .b32 fp8p, fp8q;\n\t"
	    "mov.b32 {fp8lo, fp8hi}, %4;\n\t"
	    "cvt.rn.f16x2.e4m3x2 fp8p, fp8lo;\n\t"
	    "cvt.rn.f16x2.e4m3x2 fp8q, fp8hi;\n\t"
	    "mov.b32 {fp8a, fp8b}, fp8p;\n\t"
	    "mov.b32 {fp8c, fp8d}, fp8q;\n\t"
	    "cvt.f32.f16 %0, fp8a;\n\t"
	    "cvt.f32.f16 %1, fp8b;\n\t"
	    "cvt.f32.f16 %2, fp8c;\n\t"
	    "cvt.f32.f16 %3, fp8d;\n\t}"
	    : "=f"(f[0]), "=f"(f[1]), "=f"(f[2]), "=f"(f[3])
	    : "r"(w));
#else
#pragma unroll
	for (int i = 0; i < 4; i++) f[i] = e4m3_to_f32((w >> (8 * i)) & 0xffu);
#endif
}

// bf16r2 rounds a and b to bf16 (to nearest, ties to even), as f32_to_bf16 does, in one instruction on sm_80+.
__device__ __forceinline__ void bf16r2(float& a, float& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
	u32 p;
	asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p) : "f"(a), "f"(b)); // a to the upper half
	a = __uint_as_float(p & 0xffff0000u);
	b = __uint_as_float(p << 16);
#else
	a = bf16_to_f32(f32_to_bf16(a));
	b = bf16_to_f32(f32_to_bf16(b));
#endif
}

// ld_stream loads 16 bytes of weight codes, read once a step: no L1 allocation, which stays for x.
__device__ __forceinline__ u32x4 ld_stream(const u32x4* p) {
#if defined(__CUDA_ARCH__)
	u32x4 v;
	asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
	return v;
#else
	return *p;
#endif
}

// x4 reads elements [4j, 4j+4) of a float32 or bf16 row (16- or 8-byte aligned) as float32.
__device__ __forceinline__ void x4(const void* row, int dt, int j, float (&f)[4]) {
	if (dt == DT_F32) {
		f32x4 a = ((const f32x4*)row)[j];
		f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
	} else {
		u32x2 a = ((const u32x2*)row)[j];
		f[0] = __uint_as_float(a.x << 16), f[1] = __uint_as_float(a.x & 0xffff0000u);
		f[2] = __uint_as_float(a.y << 16), f[3] = __uint_as_float(a.y & 0xffff0000u);
	}
}

// st4 writes elements [4j, 4j+4) of a float32 or bf16 row (16- or 8-byte aligned).
__device__ __forceinline__ void st4(void* row, int dt, int j, const float (&f)[4]) {
	if (dt == DT_F32) {
		f32x4 a;
		a.x = f[0], a.y = f[1], a.z = f[2], a.w = f[3];
		((f32x4*)row)[j] = a;
	} else {
		u32x2 a;
		a.x = (u32)f32_to_bf16(f[0]) | ((u32)f32_to_bf16(f[1]) << 16);
		a.y = (u32)f32_to_bf16(f[2]) | ((u32)f32_to_bf16(f[3]) << 16);
		((u32x2*)row)[j] = a;
	}
}

// fp8_wm returns where float4 j of a row of n elements (n % 16 == 0) goes in word-major order.
__device__ __forceinline__ int fp8_wm(int j, int n) { return (j & 3) * (n >> 4) + (j >> 2); }

// fp8_wm1 returns where element i of a row of n elements (n % 16 == 0) goes in word-major order.
__device__ __forceinline__ int fp8_wm1(int i, int n) { return fp8_wm(i >> 2, n) * 4 + (i & 3); }

// fp8_quant_row writes one row of n values src[i]·mul (float32 or bf16) to dst (float32 or bf16),
// quantised per token when dyn (quant.FakeQuantFP8Rows: scale FP8RowScale(max|row|, 1200), each value
// RoundE4M3(clamp(v/s, ±448))·s) and returns the scale (1 without dyn). A thread reads and writes the same
// elements, so dst may be src (not with wm). With wm (float32 dst, n % 16 == 0) dst is in the GEMVs'
// word-major order. All the block's threads call it; scratch holds 32 floats of shared memory. Rows of
// n % 4 == 0 with aligned ends move four elements a load; others one.
__device__ __forceinline__ float fp8_quant_row(const void* src, int sdt, float mul, int n, int dyn, void* dst, int ddt, int wm,
	float* scratch) {
	const bool vec = (n & 3) == 0 && ((unsigned long long)src & (sdt == DT_F32 ? 15 : 7)) == 0 &&
		((unsigned long long)dst & (ddt == DT_F32 ? 15 : 7)) == 0;
	const int n4 = n >> 2;
	float s = 1.0f;
	if (dyn) {
		float amax = 0.0f;
		if (vec) {
#pragma unroll 4
			for (int j = threadIdx.x; j < n4; j += blockDim.x) {
				float v[4];
				x4(src, sdt, j, v);
#pragma unroll
				for (int i = 0; i < 4; i++) amax = fmaxf(amax, fabsf(v[i] * mul));
			}
		} else {
			for (int i = threadIdx.x; i < n; i += blockDim.x) amax = fmaxf(amax, fabsf(ld(src, sdt, i) * mul));
		}
		s = fp8_row_scale(block_max(amax, scratch), ACT_SCALE_UB);
	}
	if (vec) {
#pragma unroll 4
		for (int j = threadIdx.x; j < n4; j += blockDim.x) {
			float v[4];
			x4(src, sdt, j, v);
#pragma unroll
			for (int i = 0; i < 4; i++) {
				v[i] *= mul;
				if (dyn) v[i] = fake_quant_fp8(v[i], s);
			}
			st4(dst, ddt, wm ? fp8_wm(j, n) : j, v);
		}
	} else {
		for (int i = threadIdx.x; i < n; i += blockDim.x) {
			float v = ld(src, sdt, i) * mul;
			st(dst, ddt, wm ? fp8_wm1(i, n) : i, dyn ? fake_quant_fp8(v, s) : v);
		}
	}
	return s;
}

// fp8_act_rows writes the activation rows FbgemmFp8 multiplies, a block a row, four elements a load, the
// row read once for its maximum and once for the writes: row r = blockIdx.x of out [rows, n] (odt) is the
// input row, quantised per token when dyn; the input row is x[r] (perm null) or, gathered for the routed
// experts, x[perm[r] / k]·scores[perm[r]] (zeros where perm[r] < 0: a gap row). With nrows not null,
// blocks at or past *nrows (moe_plan's meta[1]) return. out may be x (same dtype, perm null, not wm).
// With wm (float32 out, n % 16 == 0) the rows are written in the fp8 GEMVs' word-major order. Blocks of a
// multiple of 32 threads.
extern "C" __global__ void fp8_act_rows(const void* x, int xdt, const int* perm, const float* scores, int k, int n, int dyn,
	void* out, int odt, const int* nrows, int wm) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	const int r = blockIdx.x;
	if (nrows && r >= *nrows) return; // uniform over the block
	void* dst = (char*)out + (long long)r * n * dt_size(odt);
	long long src = r;
	float sc = 1.0f;
	if (perm) {
		int sl = perm[r];
		if (sl < 0) {
			for (int i = threadIdx.x; i < n; i += blockDim.x) st(dst, odt, i, 0.0f);
			return;
		}
		src = sl / k;
		sc = scores[sl];
	}
	fp8_quant_row((const char*)x + src * n * dt_size(xdt), xdt, sc, n, dyn, dst, odt, wm, scratch);
}

// fp8_act_codes is fp8_act_rows for the FP8 GEMM (same rows, gaps and nrows): each row's E4M3 codes and
// its float32 scale (a gap row: zero codes, scale 0), so that a decoded code times its scale is
// fp8_act_rows' value bit for bit.
extern "C" __global__ void fp8_act_codes(const void* x, int xdt, const int* perm, const float* scores, int k, int n,
	unsigned char* codes, float* scales, const int* nrows) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	const int r = blockIdx.x;
	if (nrows && r >= *nrows) return; // uniform over the block
	unsigned char* dst = codes + (long long)r * n;
	long long src = r;
	float sc = 1.0f;
	if (perm) {
		int sl = perm[r];
		if (sl < 0) {
			for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = 0;
			if (threadIdx.x == 0) scales[r] = 0.0f;
			return;
		}
		src = sl / k;
		sc = scores[sl];
	}
	const void* row = (const char*)x + src * n * dt_size(xdt);
	const bool vec = (n & 3) == 0 && ((unsigned long long)row & (xdt == DT_F32 ? 15 : 7)) == 0 && ((unsigned long long)dst & 3) == 0;
	float amax = 0.0f;
	if (vec) {
#pragma unroll 4
		for (int j = threadIdx.x; j < n >> 2; j += blockDim.x) {
			float v[4];
			x4(row, xdt, j, v);
#pragma unroll
			for (int i = 0; i < 4; i++) amax = fmaxf(amax, fabsf(v[i] * sc));
		}
	} else {
		for (int i = threadIdx.x; i < n; i += blockDim.x) amax = fmaxf(amax, fabsf(ld(row, xdt, i) * sc));
	}
	const float s = fp8_row_scale(block_max(amax, scratch), ACT_SCALE_UB);
	if (vec) {
#pragma unroll 4
		for (int j = threadIdx.x; j < n >> 2; j += blockDim.x) {
			float v[4];
			x4(row, xdt, j, v);
			float c[4];
#pragma unroll
			for (int i = 0; i < 4; i++) c[i] = fminf(fmaxf(v[i] * sc / s, -FP8_MAX), FP8_MAX);
			((u32*)dst)[j] = e4m3x2_rn(c[0], c[1]) | e4m3x2_rn(c[2], c[3]) << 16;
		}
	} else {
		for (int i = threadIdx.x; i < n; i += blockDim.x)
			dst[i] = (unsigned char)fp8_code(ld(row, xdt, i) * sc, s);
	}
	if (threadIdx.x == 0) scales[r] = s;
}

// fp8_chunk adds to acc[r][t] (t < min(T, NT)) the products of 16-byte chunk c of the output rows' codes
// (a for row 0, b for row 1) with elements [16c, 16c+16) of input row t, a float32 row of K in word-major
// order (fp8_wm) at x + t·K (xs in shared memory, or x in global memory). With r16 (QF_FP8_BF16) each
// weight is bf16(q·s) with its row's scale s0 or s1, as quant.Weight.Dequantize; otherwise q, the row's
// scale applied to the sum later.
template <int NT>
__device__ __forceinline__ void fp8_chunk(u32x4 a, u32x4 b, float s0, float s1, bool r16, const float* x, int K, int T, int c,
	float (&acc)[FP8_ROWS][NT]) {
	const int chunks = K >> 4;
#pragma unroll
	for (int q = 0; q < 4; q++) {
		const u32 wa = q == 0 ? a.x : q == 1 ? a.y : q == 2 ? a.z : a.w;
		const u32 wb = q == 0 ? b.x : q == 1 ? b.y : q == 2 ? b.z : b.w;
		float fa[4], fb[4];
		fp8x4(wa, fa);
		fp8x4(wb, fb);
		if (r16) {
#pragma unroll
			for (int i = 0; i < 4; i++) fa[i] *= s0, fb[i] *= s1;
			bf16r2(fa[0], fa[1]);
			bf16r2(fa[2], fa[3]);
			bf16r2(fb[0], fb[1]);
			bf16r2(fb[2], fb[3]);
		}
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t < T) {
				const f32x4 v = ((const f32x4*)(x + (long long)t * K))[q * chunks + c]; // elements [16c + 4q, +4)
				const float xv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
				for (int i = 0; i < 4; i++) {
					acc[0][t] += xv[i] * fa[i]; // one FMA (--fmad)
					acc[1][t] += xv[i] * fb[i];
				}
			}
		}
	}
}

// fp8_pair adds to acc this lane's share of the dot products of the output rows w0 and w1 (K codes each,
// 16-byte aligned, K % 16 == 0) with the input rows x (fp8_chunk): lanes stride over the chunks, with
// FP8_UNROLL chunks of each row loaded before any is used.
template <int NT>
__device__ __forceinline__ void fp8_pair(const unsigned char* w0, const unsigned char* w1, float s0, float s1, bool r16,
	const float* x, int K, int T, float (&acc)[FP8_ROWS][NT]) {
	const int lane = threadIdx.x & 31, chunks = K >> 4;
	const u32x4* p0 = (const u32x4*)w0;
	const u32x4* p1 = (const u32x4*)w1;
	int c = lane;
	for (; c + 32 * (FP8_UNROLL - 1) < chunks; c += 32 * FP8_UNROLL) {
		u32x4 a[FP8_UNROLL], b[FP8_UNROLL];
#pragma unroll
		for (int u = 0; u < FP8_UNROLL; u++) {
			a[u] = ld_stream(p0 + c + 32 * u);
			b[u] = ld_stream(p1 + c + 32 * u);
		}
#pragma unroll
		for (int u = 0; u < FP8_UNROLL; u++) fp8_chunk<NT>(a[u], b[u], s0, s1, r16, x, K, T, c + 32 * u, acc);
	}
	for (; c < chunks; c += 32) fp8_chunk<NT>(ld_stream(p0 + c), ld_stream(p1 + c), s0, s1, r16, x, K, T, c, acc);
}

// fp8_finish sums each lane's acc over the warp and has lane 0 store row t's results y[t·ystride + n + r]
// (r < FP8_ROWS, n + r < N, t < T): the sum times the row's scale, or as it is for r16.
template <int NT>
__device__ __forceinline__ void fp8_finish(float (&acc)[FP8_ROWS][NT], float s0, float s1, bool r16, float* y, long long ystride,
	int n, int N, int T) {
	const int lane = threadIdx.x & 31;
#pragma unroll
	for (int r = 0; r < FP8_ROWS; r++)
#pragma unroll
		for (int t = 0; t < NT; t++) {
			float v = warp_sum(acc[r][t]);
			if (!r16) v *= r == 0 ? s0 : s1;
			if (lane == 0 && t < T && n + r < N) y[t * ystride + n + r] = v;
		}
}

// fp8_pick selects pair p's weight w, scales s, output y, its row count N and the pair's first row n
// among fp8_gemv's up to three weights (q0, q1: the pairs of the first two).
__device__ __forceinline__ void fp8_pick(int p, int q0, int q1, const unsigned char* w0, const float* s0, float* y0, int n0,
	const unsigned char* w1, const float* s1, float* y1, int n1, const unsigned char* w2, const float* s2, float* y2, int n2,
	const unsigned char*& w, const float*& s, float*& y, int& N, int& n) {
	if (p < q0) w = w0, s = s0, y = y0, N = n0, n = 2 * p;
	else if (p < q0 + q1) w = w1, s = s1, y = y1, N = n1, n = 2 * (p - q0);
	else w = w2, s = s2, y = y2, N = n2, n = 2 * (p - q0 - q1);
}

// fp8_gemv_l2 is the span of codes a fp8_gemv warp reads first, its first pair's two rows, for
// PDL_PROLOGUE_L2: whole rows where the block stages x first (XS: the codes come while it quantises the
// input), else their first L2_PREFETCH_ROW bytes.
__device__ __forceinline__ l2span fp8_gemv_l2(bool xs, int K, const unsigned char* w0, int n0, const unsigned char* w1, int n1,
	const unsigned char* w2, int n2) {
	const int warps = blockDim.x >> 5, p = blockIdx.x * warps + (threadIdx.x >> 5);
	const int q0 = (n0 + 1) >> 1, q1 = (n1 + 1) >> 1;
	if (p >= q0 + q1 + ((n2 + 1) >> 1)) return l2span{nullptr, nullptr, 0};
	const unsigned char* w;
	const float* s;
	float* y;
	int N, n;
	fp8_pick(p, q0, q1, w0, nullptr, nullptr, n0, w1, nullptr, nullptr, n1, w2, nullptr, nullptr, n2, w, s, y, N, n);
	return l2span{(const char*)(w + (long long)n * K), (const char*)(w + (long long)imin(n + 1, N - 1) * K),
		xs ? K : imin(K, L2_PREFETCH_ROW)};
}

// fp8_gemv computes y_s [T, N_s] = x [T, K] · w_sᵀ for up to three fp8 weights w_s [N_s, K] of one format
// (fmt: QF_FP8 or QF_FP8_BF16) sharing x (q, k and v; gate and up), N_2 = 0 (and N_1) where absent; every
// N_s but the last present even, so that no warp's rows straddle two weights. T <= NT. A warp computes
// FP8_ROWS rows; the blocks loop over groups of their warps' row pairs (grid-stride). XS: x (float32 or
// bf16, row-major) is staged in shared memory first, quantised per token when dyn (T·K <= FP8_XS);
// otherwise x is float32 in word-major order, quantised before (fp8_act_rows) where the format says so.
template <int NT, bool XS>
__device__ __forceinline__ void fp8_gemv(const void* __restrict__ x, int xdt, int dyn, int fmt, int T, int K,
	const unsigned char* w0, const float* s0, float* y0, int n0, const unsigned char* w1, const float* s1, float* y1, int n1,
	const unsigned char* w2, const float* s2, float* y2, int n2) {
	__shared__ f32x4 xs4[XS ? FP8_XS / 4 : 1];
	__shared__ float scratch[32];
	const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	const int q0 = (n0 + 1) >> 1, q1 = (n1 + 1) >> 1, pairs = q0 + q1 + ((n2 + 1) >> 1);
	const long long xrow = dt_size(xdt) * (long long)K;
	const bool r16 = fmt == QF_FP8_BF16;
	// pick selects pair p's weight and first row.
	auto pick = [&](int p, const unsigned char*& w, const float*& s, float*& y, int& N, int& n) {
		fp8_pick(p, q0, q1, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, w, s, y, N, n);
	};
	if (XS) {
		if (!L2_PREFETCH_EARLY) l2_prefetch(fp8_gemv_l2(true, K, w0, n0, w1, n1, w2, n2)); // the codes come while x is staged
		for (int t = 0; t < T; t++)
			fp8_quant_row((const char*)x + t * xrow, xdt, 1.0f, K, dyn, (float*)xs4 + (long long)t * K, DT_F32, 1, scratch);
		__syncthreads();
	}
	for (int p = blockIdx.x * warps + warp; p < pairs; p += gridDim.x * warps) {
		const unsigned char* w;
		const float* s;
		float* y;
		int N, n;
		pick(p, w, s, y, N, n);
		const int m = imin(n + 1, N - 1);
		const float sa = s[n], sb = s[m];
		float acc[FP8_ROWS][NT];
#pragma unroll
		for (int r = 0; r < FP8_ROWS; r++)
#pragma unroll
			for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
		fp8_pair<NT>(w + (long long)n * K, w + (long long)m * K, sa, sb, r16, XS ? (const float*)xs4 : (const float*)x, K, T, acc);
		fp8_finish<NT>(acc, sa, sb, r16, y, N, n, N, T);
	}
}

#define FP8_GEMV_PARAMS                                                                                                  \
	const void *x, int xdt, int dyn, int fmt, int T, int K, const unsigned char *w0, const float *s0, float *y0, int n0, \
		const unsigned char *w1, const float *s1, float *y1, int n1, const unsigned char *w2, const float *s2, float *y2, int n2
#define FP8_GEMV_ARGS x, xdt, dyn, fmt, T, K, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2

// fp8_gemv_N: fp8_gemv for T <= N rows of x prepared by fp8_act_rows; fp8_gemv_xs_N stages x itself.
// Blocks of FP8_THREADS threads, registers capped for two of them an SM (the staged grids' cap, fp8.go).
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_1(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(false, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<1, false>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_2(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(false, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<2, false>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_4(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(false, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<4, false>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_8(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(false, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<8, false>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_xs_1(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(true, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<1, true>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_xs_2(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(true, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<2, true>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_xs_4(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(true, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<4, true>(FP8_GEMV_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_gemv_xs_8(FP8_GEMV_PARAMS) {
	PDL_PROLOGUE_L2(l2_prefetch(fp8_gemv_l2(true, K, w0, n0, w1, n1, w2, n2)));
	fp8_gemv<8, true>(FP8_GEMV_ARGS);
}

// fp8_expert_gemv is the routed experts' decode GEMV on output-major fp8 codes w [E, N, K] (scales [E,
// N]): block (x, 0, z) takes the z-th active expert e (blocks past meta[0] return) and its warps loop over
// row pairs of W_e (grid-stride over x), each computing P[r][n] = Σ_k in[r][k]·W_e[n][k] for all the
// expert's rows r (seg[2e] .. seg[2e]+seg[2e+1]), NS rows a pass. P is [R, N] (one split). XS: the block
// first stages the expert's rows (at most FP8_XS / K) in shared memory, x[perm[r] / topk]·scores[perm[r]]
// (mode 0: gate_up) or x[r] (mode 1: down), quantised per token when dyn. Otherwise the rows are x[r]
// (mode 1), float32 in word-major order, gathered and quantised beforehand (fp8_act_rows).
template <int NS, bool XS>
__device__ __forceinline__ void fp8_expert_gemv(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const unsigned char* __restrict__ w, const float* __restrict__ scales, int fmt, int dyn, int K,
	int N, float* __restrict__ P) {
	__shared__ f32x4 xs4[XS ? FP8_XS / 4 : 1];
	__shared__ float scratch[32];
	if ((int)blockIdx.z >= meta[0]) return; // uniform over the block
	const int e = active[blockIdx.z];
	const int r0 = seg[2 * e];
	// Route's k experts of a token are distinct, so an expert has at most T rows and the host's T·K <=
	// FP8_XS bounds the staged rows; the clamp only keeps a malformed routing inside xs.
	const int nr = XS ? imin(seg[2 * e + 1], FP8_XS / K) : seg[2 * e + 1];
	const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, pairs = (N + 1) >> 1;
	const unsigned char* we = w + (long long)e * N * K;
	const float* se = scales + (long long)e * N;
	const long long xrow = dt_size(xdt) * (long long)K;
	const bool r16 = fmt == QF_FP8_BF16;
	float* xs = (float*)xs4;
	if (XS) {
		int p = blockIdx.x * warps + warp;
		if (p < pairs) // the codes come while the block stages its rows
			l2_prefetch(l2span{(const char*)(we + (long long)2 * p * K), (const char*)(we + (long long)imin(2 * p + 1, N - 1) * K), K});
		for (int t = 0; t < nr; t++) {
			const char* src;
			float mul = 1.0f;
			if (mode == 0) {
				int sl = perm[r0 + t];
				src = (const char*)x + (long long)(sl / topk) * xrow;
				mul = scores[sl];
			} else {
				src = (const char*)x + (long long)(r0 + t) * xrow;
			}
			fp8_quant_row(src, xdt, mul, K, dyn, xs + (long long)t * K, DT_F32, 1, scratch);
		}
		__syncthreads();
	}
	for (int p = blockIdx.x * warps + warp; p < pairs; p += gridDim.x * warps) {
		const int n = 2 * p, m = imin(n + 1, N - 1);
		const float sa = se[n], sb = se[m];
		for (int g = 0; g < nr; g += NS) {
			const int ng = imin(NS, nr - g);
			float acc[FP8_ROWS][NS];
#pragma unroll
			for (int r = 0; r < FP8_ROWS; r++)
#pragma unroll
				for (int t = 0; t < NS; t++) acc[r][t] = 0.0f;
			const float* in = XS ? xs + (long long)g * K : (const float*)x + (long long)(r0 + g) * K;
			fp8_pair<NS>(we + (long long)n * K, we + (long long)m * K, sa, sb, r16, in, K, ng, acc);
			fp8_finish<NS>(acc, sa, sb, r16, P + (long long)(r0 + g) * N, N, n, N, ng);
		}
	}
}

#define FP8_EXPERT_PARAMS                                                                                                       \
	const void *x, int xdt, int mode, const int *perm, const float *scores, int topk, const int *seg, const int *active,        \
		const int *meta, const unsigned char *w, const float *scales, int fmt, int dyn, int K, int N, float *P
#define FP8_EXPERT_ARGS x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, fmt, dyn, K, N, P

// fp8_expert_gemv_N: rows of x as stored, N a pass; fp8_expert_gemv_xs_N: staged. Blocks of FP8_THREADS.
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_1(FP8_EXPERT_PARAMS) {
	PDL_PROLOGUE();
	fp8_expert_gemv<1, false>(FP8_EXPERT_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_4(FP8_EXPERT_PARAMS) {
	PDL_PROLOGUE();
	fp8_expert_gemv<4, false>(FP8_EXPERT_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_1(FP8_EXPERT_PARAMS) {
	PDL_PROLOGUE();
	fp8_expert_gemv<1, true>(FP8_EXPERT_ARGS);
}
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_4(FP8_EXPERT_PARAMS) {
	PDL_PROLOGUE();
	fp8_expert_gemv<4, true>(FP8_EXPERT_ARGS);
}

// The fused epilogues of fp8_expert_gemv (FuseExpertAct, FuseExpertCombine; one split, so P [R, N] is the
// sum expert_act and expert_combine read with S = 1). Block x's warps take row pairs p = 8x + warp, then
// p + 8·gridDim.x, ...: the block writes the column chunks q = x, x + gridDim.x, ... of FP8_CHUNK = 16
// columns (with FP8_THREADS threads), which fp8_chunk_col enumerates.
#define FP8_CHUNK (2 * (FP8_THREADS / 32))

// fp8_chunk_col returns the l-th column of the chunks q = blockIdx.x + i·gridDim.x below chunks (l <
// FP8_CHUNK·(number of them)), or -1 past the last.
__device__ __forceinline__ int fp8_chunk_col(int l, int chunks) {
	int q = blockIdx.x + (l / FP8_CHUNK) * gridDim.x;
	return q < chunks ? q * FP8_CHUNK + l % FP8_CHUNK : -1;
}

// fp8_expert_gemv_swiglu_N (gate_up, N = 2I): fp8_expert_gemv_N followed by expert_act. The host launches
// it with I % FP8_CHUNK == 0 and gridDim.x dividing I / FP8_CHUNK, so that gate chunk q and up chunk q +
// I / FP8_CHUNK (the same columns of up) belong to the same block: each block, once its own warps are done,
// stores act[r][c] = silu(g)·u (eg_act_at) for the columns c of its gate chunks and its expert's rows. No
// counters: nothing another block writes is read.
template <int NS, bool XS>
__device__ __forceinline__ void fp8_expert_gemv_swiglu(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const unsigned char* __restrict__ w, const float* __restrict__ scales, int fmt, int dyn, int K,
	int N, float* __restrict__ P, void* act, int adt) {
	fp8_expert_gemv<NS, XS>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, fmt, dyn, K, N, P);
	if ((int)blockIdx.z >= meta[0]) return; // uniform over the block
	__threadfence();
	__syncthreads(); // the block's P written (ld_cg reads past L1)
	const int e = active[blockIdx.z];
	const int r0 = seg[2 * e], nr = XS ? imin(seg[2 * e + 1], FP8_XS / K) : seg[2 * e + 1]; // the rows fp8_expert_gemv wrote
	const int I = N / 2, R = 0; // S = 1: the split stride is never used
	for (int l = threadIdx.x;; l += blockDim.x) {
		int c = fp8_chunk_col(l, I / FP8_CHUNK);
		if (c < 0) break;
		for (int r = r0; r < r0 + nr; r++) eg_act_at(P, 1, R, I, r, c, act, adt);
	}
}

#define FP8_SWIGLU_PARAMS FP8_EXPERT_PARAMS, void *act, int adt
#define FP8_SWIGLU_ARGS FP8_EXPERT_ARGS, act, adt
// Blocks of FP8_THREADS; _xs_: the rows staged, as fp8_expert_gemv_xs_N.
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_swiglu_1(FP8_SWIGLU_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_swiglu<1, false>(FP8_SWIGLU_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_swiglu_4(FP8_SWIGLU_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_swiglu<4, false>(FP8_SWIGLU_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_swiglu_1(FP8_SWIGLU_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_swiglu<1, true>(FP8_SWIGLU_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_swiglu_4(FP8_SWIGLU_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_swiglu<4, true>(FP8_SWIGLU_ARGS); }

// fp8_expert_gemv_combine_N (down, N = H): fp8_expert_gemv_N followed by expert_combine. The last of the
// gridDim.z blocks of column chunks blockIdx.x (counter ctr[blockIdx.x], eg_last: zero between launches)
// stores out[t][h] (eg_combine_at) for the T tokens and the columns of its chunks.
template <int NS, bool XS>
__device__ __forceinline__ void fp8_expert_gemv_combine(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const unsigned char* __restrict__ w, const float* __restrict__ scales, int fmt, int dyn, int K,
	int N, float* __restrict__ P, int* ctr, const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	fp8_expert_gemv<NS, XS>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, fmt, dyn, K, N, P);
	if (!eg_last(ctr + blockIdx.x, gridDim.z)) return;
	const int chunks = (N + FP8_CHUNK - 1) / FP8_CHUNK;
	for (int l = threadIdx.x;; l += blockDim.x) {
		int h = fp8_chunk_col(l, chunks);
		if (h < 0) break;
		if (h < N)
			for (int t = 0; t < T; t++) eg_combine_at(P, 1, 0, N, row_of, topk, t, h, out, odt, add, adt);
	}
}

#define FP8_COMBINE_PARAMS FP8_EXPERT_PARAMS, int *ctr, const int *row_of, int T, void *out, int odt, const void *add, int adt
#define FP8_COMBINE_ARGS FP8_EXPERT_ARGS, ctr, row_of, T, out, odt, add, adt
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_combine_1(FP8_COMBINE_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_combine<1, false>(FP8_COMBINE_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_combine_4(FP8_COMBINE_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_combine<4, false>(FP8_COMBINE_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_combine_1(FP8_COMBINE_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_combine<1, true>(FP8_COMBINE_ARGS); }
extern "C" __global__ void __launch_bounds__(FP8_THREADS, 2) fp8_expert_gemv_xs_combine_4(FP8_COMBINE_PARAMS) { PDL_PROLOGUE(); fp8_expert_gemv_combine<4, true>(FP8_COMBINE_ARGS); }

// fp8_dequant_experts writes elements [off, off + n) of an output-major fp8 experts weight (logical [E,
// K, N], stored [E, N, K]) in logical order as bf16: the generic experts kernels' operand (shapes the
// fast paths do not take), quant.Weight.Dequantize's values rounded to bf16.
extern "C" __global__ void fp8_dequant_experts(const unsigned char* w, const float* scales, int fmt, long long K, long long N,
	long long off, long long n, bf16_t* out) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) {
		const long long idx = off + i, c = idx % N, ek = idx / N, kk = ek % K, e = ek / K;
		out[i] = f32_to_bf16(deq(e4m3_to_f32(w[(e * N + c) * K + kk]), scales[e * N + c], fmt));
	}
}
