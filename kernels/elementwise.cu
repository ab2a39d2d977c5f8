// elementwise.cu: conversion, embedding gather, RMSNorm, add, SiLU·mul, row scaling and RoPE.
// Grid-stride loops, so any grid size covers n elements.

#define GRID_STRIDE(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// convert copies n elements of x (dtype xdt) to y (dtype ydt).
extern "C" __global__ void convert(const void* x, int xdt, void* y, int ydt, long long n) {
	GRID_STRIDE(i, n) st(y, ydt, i, ld(x, xdt, i));
}

// embed gathers rows of a table with H columns: out[i] = table[rows[i]] for rows[i] >= 0, else zeros (the
// host maps ids outside this rank's rows to -1). out has the table's dtype, so the gather is exact.
extern "C" __global__ void embed(const void* table, int dt, const int* rows, int H, void* out, long long n) {
	GRID_STRIDE(i, n) {
		long long row = i / H, c = i - row * H;
		int r = rows[row];
		st(out, dt, i, r >= 0 ? ld(table, dt, (long long)r * H + c) : 0.0f);
	}
}

// rmsnorm normalises each of the rows of n elements: y = x * rsqrt(mean(x²) + eps) (* w). One block a row.
extern "C" __global__ void rmsnorm(const void* x, int xdt, const void* w, int wdt, int has_w, void* y, int ydt, int n, float eps) {
	__shared__ float scratch[32];
	long long off = (long long)blockIdx.x * n;
	float ss = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(x, xdt, off + i);
		ss += v * v;
	}
	ss = block_sum(ss, scratch);
	float inv = (float)(1.0 / sqrt((double)ss / (double)n + (double)eps));
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(x, xdt, off + i) * inv;
		if (has_w) v *= ld(w, wdt, i);
		st(y, ydt, off + i, v);
	}
}

// add_rmsnorm is add followed by rmsnorm in one pass over the row (the residual stream's update and the
// next norm): s = a + b is stored as float32, exactly as add stores it, and y = s * rsqrt(mean(s²) + eps)
// * w as rmsnorm computes it. One block a row; each thread rereads only the sums it wrote itself.
extern "C" __global__ void add_rmsnorm(const void* a, int adt, const void* b, int bdt, float* s,
	const void* w, int wdt, void* y, int ydt, int n, float eps) {
	__shared__ float scratch[32];
	long long off = (long long)blockIdx.x * n;
	float ss = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(a, adt, off + i) + ld(b, bdt, off + i);
		s[off + i] = v;
		ss += v * v;
	}
	ss = block_sum(ss, scratch);
	float inv = (float)(1.0 / sqrt((double)ss / (double)n + (double)eps));
	for (int i = threadIdx.x; i < n; i += blockDim.x) st(y, ydt, off + i, s[off + i] * inv * ld(w, wdt, i));
}

extern "C" __global__ void add(const void* a, int adt, const void* b, int bdt, void* y, int ydt, long long n) {
	GRID_STRIDE(i, n) st(y, ydt, i, ld(a, adt, i) + ld(b, bdt, i));
}

extern "C" __global__ void silu_mul(const void* g, int gdt, const void* u, int udt, void* y, int ydt, long long n) {
	GRID_STRIDE(i, n) st(y, ydt, i, silu(ld(g, gdt, i)) * ld(u, udt, i));
}

// scale_rows multiplies row r (row elements each) of x by s[r].
extern "C" __global__ void scale_rows(const void* x, int xdt, const float* s, void* y, int ydt, long long row, long long n) {
	GRID_STRIDE(i, n) st(y, ydt, i, ld(x, xdt, i) * s[i / row]);
}

// rope rotates the interleaved pairs of x [T, heads, 2·half] by θ = float32(pos[t])·inv_freq[i] (a float32
// product, not fused), with cos and sin evaluated in float64 and rounded to float32.
extern "C" __global__ void rope(const void* x, int xdt, const int* pos, const float* inv_freq, void* y, int ydt, int heads, int half, long long n) {
	GRID_STRIDE(j, n) { // j indexes pairs: ((t·heads) + h)·half + i
		int i = (int)(j % half);
		long long t = j / ((long long)half * heads);
		float theta = __fmul_rn((float)pos[t], inv_freq[i]);
		double sd, cd;
		sincos((double)theta, &sd, &cd);
		float s = (float)sd, c = (float)cd;
		float x0 = ld(x, xdt, 2 * j), x1 = ld(x, xdt, 2 * j + 1);
		st(y, ydt, 2 * j, x0 * c - x1 * s);
		st(y, ydt, 2 * j + 1, x0 * s + x1 * c);
	}
}

// linear_simple is the fallback for shapes cuBLASLt declines: y [T, out] = x [T, in] · w [out, in]ᵀ, one
// thread an output element, float32 accumulation.
extern "C" __global__ void linear_simple(const void* x, int xdt, const void* w, int wdt, void* y, int ydt, int T, int in, int out) {
	GRID_STRIDE(i, (long long)T * out) {
		long long t = i / out, o = i - t * out;
		float acc = 0.0f;
		for (int c = 0; c < in; c++) acc += ld(x, xdt, t * in + c) * ld(w, wdt, o * in + c);
		st(y, ydt, i, acc);
	}
}

// split_bf16 writes x (n elements) as two bf16 arrays: hi = bf16(x) in out[0, n) and lo = bf16(x − hi) in
// out[n, 2n), so that hi + lo carries about 16 significant bits. A GEMM of the stacked [hi; lo] rows
// against bf16 weights (products exact in float32) gives float32-input accuracy for one weight read.
extern "C" __global__ void split_bf16(const void* x, int xdt, bf16_t* out, long long n) {
	GRID_STRIDE(i, n) {
		float v = ld(x, xdt, i);
		bf16_t hi = f32_to_bf16(v);
		out[i] = hi;
		out[n + i] = f32_to_bf16(v - bf16_to_f32(hi));
	}
}

// add_halves sets y[i] = d[i] + d[n + i] for the two halves of a split GEMM's float32 output.
extern "C" __global__ void add_halves(const float* d, void* y, int ydt, long long n) {
	GRID_STRIDE(i, n) st(y, ydt, i, d[i] + d[n + i]);
}

// gather_permute turns an all-gather's [size, T, n] blocks (rank r's [T, n] at r) into [T, size·n]: each
// row is the ranks' rows side by side in rank order. Same dtype in and out (exact).
extern "C" __global__ void gather_permute(const void* g, int dt, void* y, int T, int n, int size, long long total) {
	GRID_STRIDE(i, total) { // i indexes y
		long long row = (long long)n * size;
		long long t = i / row, c = i - t * row;
		long long r = c / n, j = c - r * n;
		st(y, dt, i, ld(g, dt, (r * T + t) * n + j));
	}
}

// splitmix64 is a counter-based hash: fill_random's generator.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

// fill_random sets n bf16 values to mean + std·z, z ~ N(0, 1) by Box–Muller on a hash of (seed, i): the
// same seed gives the same values. For benchmarks' random weights.
extern "C" __global__ void fill_random(bf16_t* y, long long n, unsigned long long seed, float mean, float std) {
	GRID_STRIDE(i, n) {
		unsigned long long h = splitmix64(seed ^ splitmix64((unsigned long long)i));
		float u1 = (float)((h >> 40) + 1) * 5.9604645e-8f; // (0, 1]
		float u2 = (float)(h & 0xffffffull) * 5.9604645e-8f;
		float z = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
		y[i] = f32_to_bf16(mean + std * z);
	}
}
