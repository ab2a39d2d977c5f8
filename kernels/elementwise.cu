// elementwise.cu: conversion, embedding gather, RMSNorm, add, SiLU·mul, row scaling and RoPE.
// Grid-stride loops, so any grid size covers n elements.

// convert copies n elements of x (dtype xdt) to y (dtype ydt).
extern "C" __global__ void convert(const void* x, int xdt, void* y, int ydt, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) st(y, ydt, i, ld(x, xdt, i));
}

// embed gathers rows of a table with H columns: out[i] = table[rows[i]] for rows[i] >= 0, else zeros (the
// host maps ids outside this rank's rows to -1). out has the table's dtype, so the gather is exact.
extern "C" __global__ void embed(const void* table, int dt, const int* rows, int H, void* out, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) {
		long long row = i / H, c = i - row * H;
		int r = rows[row];
		st(out, dt, i, r >= 0 ? ld(table, dt, (long long)r * H + c) : 0.0f);
	}
}

// NORM_UNROLL is how many elements each thread of a norm kernel loads before it uses them: a block owns a
// whole row, and in decode one block is all the work, so it should wait for memory once per NORM_UNROLL
// elements, not once per element.
#define NORM_UNROLL 4

// norm_sumsq returns the sum of squares of row x[off, off+n) over the block.
__device__ __forceinline__ float norm_sumsq(const void* x, int xdt, long long off, int n, float* scratch) {
	float ss = 0.0f;
	for (int i0 = threadIdx.x; i0 < n; i0 += NORM_UNROLL * blockDim.x) {
		float v[NORM_UNROLL];
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) {
			int i = i0 + u * blockDim.x;
			v[u] = i < n ? ld(x, xdt, off + i) : 0.0f;
		}
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) ss += v[u] * v[u];
	}
	return block_sum(ss, scratch);
}

// norm_store writes y = x * inv (* w) for row x[off, off+n).
__device__ __forceinline__ void norm_store(const void* x, int xdt, const void* w, int wdt, int has_w, void* y, int ydt,
	long long off, int n, float inv) {
	for (int i0 = threadIdx.x; i0 < n; i0 += NORM_UNROLL * blockDim.x) {
		float v[NORM_UNROLL], g[NORM_UNROLL];
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) {
			int i = i0 + u * blockDim.x;
			v[u] = i < n ? ld(x, xdt, off + i) : 0.0f;
			g[u] = i < n && has_w ? ld(w, wdt, i) : 1.0f;
		}
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) {
			int i = i0 + u * blockDim.x;
			if (i < n) st(y, ydt, off + i, has_w ? v[u] * inv * g[u] : v[u] * inv);
		}
	}
}

// rmsnorm normalises each of the rows of n elements: y = x * rsqrt(mean(x²) + eps) (* w). One block a row.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm(const void* x, int xdt, const void* w, int wdt, int has_w, void* y, int ydt, int n, float eps) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	long long off = (long long)blockIdx.x * n;
	float inv = norm_inv(norm_sumsq(x, xdt, off, n, scratch), n, eps);
	norm_store(x, xdt, w, wdt, has_w, y, ydt, off, n, inv);
}

// add_rmsnorm is add followed by rmsnorm in one kernel (the residual stream's update and the next norm):
// s = a + b is stored as float32, exactly as add stores it, and y is rmsnorm of s with the same
// arithmetic in the same order as rmsnorm. One block a row; s is written by one pass and read back by the
// threads that wrote it (the same indices), so no barrier is needed before the norm's passes.
extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm(const void* a, int adt, const void* b, int bdt, float* s,
	const void* w, int wdt, void* y, int ydt, int n, float eps) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	long long off = (long long)blockIdx.x * n;
	for (int i0 = threadIdx.x; i0 < n; i0 += NORM_UNROLL * blockDim.x) {
		float va[NORM_UNROLL], vb[NORM_UNROLL];
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) {
			int i = i0 + u * blockDim.x;
			va[u] = i < n ? ld(a, adt, off + i) : 0.0f;
			vb[u] = i < n ? ld(b, bdt, off + i) : 0.0f;
		}
#pragma unroll
		for (int u = 0; u < NORM_UNROLL; u++) {
			int i = i0 + u * blockDim.x;
			if (i < n) s[off + i] = va[u] + vb[u];
		}
	}
	float inv = norm_inv(norm_sumsq(s, DT_F32, off, n, scratch), n, eps);
	norm_store(s, DT_F32, w, wdt, 1, y, ydt, off, n, inv);
}

// spin keeps one thread busy for about `cycles` SM clock cycles. Profile launches it first so that the
// operations after it queue up behind it: their events then time the GPU's work back to back, not the
// host's launches.
extern "C" __global__ void spin(long long cycles) {
	PDL_PROLOGUE();
	long long start = clock64();
	while (clock64() - start < cycles) {
	}
}

// binary_n applies op to ELEM_UNROLL elements of a and b per pass (GRID_STRIDE_N).
template <typename Op>
__device__ __forceinline__ void binary_n(const void* a, int adt, const void* b, int bdt, void* y, int ydt, long long n, Op op) {
	GRID_STRIDE_N(i0, n) {
		float va[ELEM_UNROLL], vb[ELEM_UNROLL];
#pragma unroll
		for (int u = 0; u < ELEM_UNROLL; u++) {
			long long i = i0 + (long long)u * blockDim.x;
			va[u] = i < n ? ld(a, adt, i) : 0.0f;
			vb[u] = i < n ? ld(b, bdt, i) : 0.0f;
		}
#pragma unroll
		for (int u = 0; u < ELEM_UNROLL; u++) {
			long long i = i0 + (long long)u * blockDim.x;
			if (i < n) st(y, ydt, i, op(va[u], vb[u]));
		}
	}
}

struct add_op {
	__device__ float operator()(float a, float b) const { return a + b; }
};
struct silu_mul_op {
	__device__ float operator()(float g, float u) const { return silu(g) * u; }
};

extern "C" __global__ void add(const void* a, int adt, const void* b, int bdt, void* y, int ydt, long long n) {
	PDL_PROLOGUE();
	binary_n(a, adt, b, bdt, y, ydt, n, add_op());
}

extern "C" __global__ void silu_mul(const void* g, int gdt, const void* u, int udt, void* y, int ydt, long long n) {
	PDL_PROLOGUE();
	binary_n(g, gdt, u, udt, y, ydt, n, silu_mul_op());
}

// scale_rows multiplies row r (row elements each) of x by s[r].
extern "C" __global__ void scale_rows(const void* x, int xdt, const float* s, void* y, int ydt, long long row, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) st(y, ydt, i, ld(x, xdt, i) * s[i / row]);
}

// rope rotates the interleaved pairs of x [T, heads, 2·half] by θ = float32(pos[t])·inv_freq[i] (a float32
// product, not fused), with cos and sin evaluated in float64 and rounded to float32.
extern "C" __global__ void rope(const void* x, int xdt, const int* pos, const float* inv_freq, void* y, int ydt, int heads, int half, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE(j, n) { // j indexes pairs: ((t·heads) + h)·half + i
		int i = (int)(j % half);
		long long t = j / ((long long)half * heads);
		float y0, y1;
		rope_pair(pos[t], inv_freq[i], ld(x, xdt, 2 * j), ld(x, xdt, 2 * j + 1), &y0, &y1);
		st(y, ydt, 2 * j, y0);
		st(y, ydt, 2 * j + 1, y1);
	}
}

// rope_qk rotates the heads of q [T, qheads, 2·half] and k [T, kheads, 2·half] exactly as rope does
// and, with norm, then divides each head by its root mean square (+ eps), as rmsnorm without a weight
// does (the rotated values rounded to ydt first, as the two ops would store them). One warp a head:
// block (t, head), heads of q first, then those of k.
extern "C" __global__ void rope_qk(const void* q, int qdt, const void* k, int kdt, const int* pos, const float* inv_freq,
	void* qo, void* ko, int ydt, int qheads, int kheads, int half, int norm, float eps) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	int t = blockIdx.x, h = blockIdx.y;
	const void* x = q;
	void* y = qo;
	int xdt = qdt, heads = qheads;
	if (h >= qheads) {
		x = k, y = ko, xdt = kdt, heads = kheads, h -= qheads;
	}
	long long off = ((long long)t * heads + h) * 2 * half;
	float ss = 0.0f;
	for (int i = threadIdx.x; i < half; i += blockDim.x) {
		float y0, y1;
		rope_pair(pos[t], inv_freq[i], ld(x, xdt, off + 2 * i), ld(x, xdt, off + 2 * i + 1), &y0, &y1);
		y0 = as_dt(y0, ydt);
		y1 = as_dt(y1, ydt);
		st(y, ydt, off + 2 * i, y0);
		st(y, ydt, off + 2 * i + 1, y1);
		ss += y0 * y0 + y1 * y1;
	}
	if (!norm) return;
	ss = block_sum(ss, scratch);
	float inv = norm_inv(ss, 2 * half, eps);
	for (int i = threadIdx.x; i < 2 * half; i += blockDim.x) st(y, ydt, off + i, ld(y, ydt, off + i) * inv);
}

// linear_simple is the fallback for shapes cuBLASLt declines: y [T, out] = x [T, in] · w [out, in]ᵀ, one
// thread an output element, float32 accumulation.
extern "C" __global__ void linear_simple(const void* x, int xdt, const void* w, int wdt, void* y, int ydt, int T, int in, int out) {
	PDL_PROLOGUE();
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
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) {
		float v = ld(x, xdt, i);
		bf16_t hi = f32_to_bf16(v);
		out[i] = hi;
		out[n + i] = f32_to_bf16(v - bf16_to_f32(hi));
	}
}

// add_halves sets y[i] = d[i] + d[n + i] for the two halves of a split GEMM's float32 output.
extern "C" __global__ void add_halves(const float* d, void* y, int ydt, long long n) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) st(y, ydt, i, d[i] + d[n + i]);
}

// gather_permute turns an all-gather's [size, T, n] blocks (rank r's [T, n] at r) into [T, size·n]: each
// row is the ranks' rows side by side in rank order. Same dtype in and out (exact).
extern "C" __global__ void gather_permute(const void* g, int dt, void* y, int T, int n, int size, long long total) {
	PDL_PROLOGUE();
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
	PDL_PROLOGUE();
	GRID_STRIDE(i, n) {
		unsigned long long h = splitmix64(seed ^ splitmix64((unsigned long long)i));
		float u1 = (float)((h >> 40) + 1) * 5.9604645e-8f; // (0, 1]
		float u2 = (float)(h & 0xffffffull) * 5.9604645e-8f;
		float z = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
		y[i] = f32_to_bf16(mean + std * z);
	}
}

// The elementwise kernels with 16-byte accesses (prefill moves tens of megabytes through each): a thread
// handles 8 consecutive elements, so a warp moves 512 contiguous bytes an instruction. The host takes them
// when the element counts (the row lengths for add_rmsnorm_v8) are multiples of 8 and every operand is
// 16-byte aligned. Each element gets the arithmetic of the kernel it replaces, in the same order, so the
// results are the same bit for bit.

// convert_v8 is convert over n8 chunks of 8.
extern "C" __global__ void convert_v8(const void* x, int xdt, void* y, int ydt, long long n8) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n8) {
		float v[8];
		load8(x, xdt, i, v);
		store8(y, ydt, i, v);
	}
}

// silu_mul_v8 is silu_mul over n8 chunks of 8.
extern "C" __global__ void silu_mul_v8(const void* g, int gdt, const void* u, int udt, void* y, int ydt, long long n8) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n8) {
		float a[8], b[8];
		load8(g, gdt, i, a);
		load8(u, udt, i, b);
#pragma unroll
		for (int e = 0; e < 8; e++) a[e] = silu(a[e]) * b[e];
		store8(y, ydt, i, a);
	}
}

// split_bf16_v8 is split_bf16 over n8 chunks of 8 (n = 8·n8 elements).
extern "C" __global__ void split_bf16_v8(const void* x, int xdt, bf16_t* out, long long n8) {
	PDL_PROLOGUE();
	GRID_STRIDE(i, n8) {
		float v[8], lo[8];
		load8(x, xdt, i, v);
#pragma unroll
		for (int e = 0; e < 8; e++) {
			float hi = bf16_to_f32(f32_to_bf16(v[e]));
			lo[e] = v[e] - hi;
		}
		store8(out, DT_BF16, i, v); // rounds each to hi
		store8(out + 8 * n8, DT_BF16, i, lo);
	}
}

// NORM_V8 is the most 8-element chunks of its row a thread of add_rmsnorm_v8 holds (in registers), and
// NORM_V8_MAXN the longest row (its sums go through shared memory).
#define NORM_V8 4
#define NORM_V8_MAXN 8192

// add_rmsnorm_v8 is add_rmsnorm with 16-byte accesses and the row kept on chip between the sum and the
// norm (n % 8 == 0, n <= NORM_V8_MAXN, n/8 <= NORM_V8·blockDim.x), bit for bit at the same block size: s = a
// + b is stored as float32, its squares are summed in add_rmsnorm's order (each thread over the elements
// congruent to it modulo the block, read back from shared memory), and y = s · inv · w. One block a row,
// up to 1024 threads (normBlock): the bound keeps it within 64 registers a thread, where it took 78 and
// its 1024-thread launches failed (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES on an H100).
extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_v8(const void* a, int adt, const void* b, int bdt, float* s,
	const void* w, int wdt, void* y, int ydt, int n, float eps) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	__shared__ float srow[NORM_V8_MAXN];
	long long row = blockIdx.x;
	int n8 = n >> 3;
	const char* ar = (const char*)a + row * n * (adt == DT_F32 ? 4 : 2);
	const char* br = (const char*)b + row * n * (bdt == DT_F32 ? 4 : 2);
	float* sr = s + row * n;
	char* yr = (char*)y + row * n * (ydt == DT_F32 ? 4 : 2);
	float va[NORM_V8][8];
#pragma unroll
	for (int j = 0; j < NORM_V8; j++) {
		int c = threadIdx.x + j * blockDim.x;
		if (c < n8) {
			float vb[8];
			load8(ar, adt, c, va[j]);
			load8(br, bdt, c, vb);
#pragma unroll
			for (int e = 0; e < 8; e++) va[j][e] = va[j][e] + vb[e];
		}
	}
#pragma unroll
	for (int j = 0; j < NORM_V8; j++) {
		int c = threadIdx.x + j * blockDim.x;
		if (c < n8) {
#pragma unroll
			for (int e = 0; e < 8; e++) srow[8 * c + e] = va[j][e];
			store8(sr, DT_F32, c, va[j]);
		}
	}
	__syncthreads();
	float inv = norm_inv(norm_sumsq(srow, DT_F32, 0, n, scratch), n, eps);
#pragma unroll
	for (int j = 0; j < NORM_V8; j++) {
		int c = threadIdx.x + j * blockDim.x;
		if (c < n8) {
			float g[8];
			load8(w, wdt, c, g);
#pragma unroll
			for (int e = 0; e < 8; e++) g[e] = va[j][e] * inv * g[e];
			store8(yr, ydt, c, g);
		}
	}
}
