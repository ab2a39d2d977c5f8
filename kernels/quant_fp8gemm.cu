// quant_fp8gemm.cu: the two ends of the FP8 prefill GEMM (backend/cuda fp8gemm.go) of the fp8 format
// with dynamic activations (FbgemmFp8: --quantization fp8). cuBLASLt multiplies the E4M3 codes of the
// activations and of the weight with float32 accumulation and unit scales (Hopper's cuBLASLt takes one
// scale a tensor); the per-token activation scales and the per-channel weight scales are applied after:
//   act_quant_fp8: each row of x to E4M3 codes and one float32 scale, quant.FakeQuantFP8Rows' rule, so a
//     decoded code times its scale is act_quant_rows' value bit for bit;
//   fp8_scale_out: y[t][o] = acc[t][o]·sx[t]·sw[o], in place;
//   transpose_u8: a routed expert's codes [in, out] to [out, in], the layout cuBLASLt's FP8 takes.
// This file sorts after quant.cu in the compilation unit and uses its helpers.

// act_quant_fp8 quantises row r = blockIdx.x of x [rows, n] (xdt) to codes[r][0..n) and scales[r]. With
// perm (the routed experts' gathered rows, as act_quant_rows): the row is x[perm[r] / k]·scores[perm[r]],
// a gap row (perm[r] < 0) gets zero codes and a zero scale, and blocks at or past *nrows return (nrows
// not null). Blocks of a multiple of 32 threads.
extern "C" __global__ void act_quant_fp8(const void* x, int xdt, const int* perm, const float* scores, int k, int n,
	unsigned char* codes, float* scales, const int* nrows) {
	__shared__ float scratch[32];
	const int r = blockIdx.x;
	if (nrows && r >= *nrows) return; // uniform over the block
	const long long out = (long long)r * n;
	long long src = r;
	float sc = 1.0f;
	if (perm) {
		int sl = perm[r];
		if (sl < 0) {
			for (int i = threadIdx.x; i < n; i += blockDim.x) codes[out + i] = 0;
			if (threadIdx.x == 0) scales[r] = 0.0f;
			return;
		}
		src = sl / k;
		sc = scores[sl];
	}
	const long long base = src * n;
	float amax = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(x, xdt, base + i);
		if (perm) v *= sc;
		amax = fmaxf(amax, fabsf(v));
	}
	const float s = fp8_row_scale(block_max(amax, scratch), ACT_SCALE_UB);
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(x, xdt, base + i);
		if (perm) v *= sc;
		codes[out + i] = (unsigned char)e4m3_encode(round_e4m3(fminf(fmaxf(v / s, -FP8_MAX), FP8_MAX)));
	}
	if (threadIdx.x == 0) scales[r] = s;
}

// transpose_u8 writes dst [C, R] = srcᵀ for src [R, C] bytes (an expert's E4M3 codes: cuBLASLt's FP8 GEMM
// takes the weight output-major). A block moves a 64×64 tile through shared memory; blocks of 256
// threads, grid (ceil(C/64), ceil(R/64)).
extern "C" __global__ void transpose_u8(const unsigned char* src, long long R, long long C, unsigned char* dst) {
	__shared__ unsigned char tile[64][65];
	const long long r0 = (long long)blockIdx.y * 64, c0 = (long long)blockIdx.x * 64;
	const int tx = threadIdx.x & 63, ty = threadIdx.x >> 6, ny = blockDim.x >> 6;
	for (int i = ty; i < 64; i += ny) {
		long long r = r0 + i, c = c0 + tx;
		if (r < R && c < C) tile[i][tx] = src[r * C + c];
	}
	__syncthreads();
	for (int i = ty; i < 64; i += ny) {
		long long c = c0 + i, r = r0 + tx;
		if (c < C && r < R) dst[c * R + r] = tile[tx][i];
	}
}

// fp8_scale_out scales y [T, N] (float32, the codes' product) in place: y[t][o] ·= sx[t]·sw[o].
extern "C" __global__ void fp8_scale_out(float* y, const float* sx, const float* sw, long long T, long long N) {
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < T * N; i += (long long)gridDim.x * blockDim.x) {
		long long t = i / N, o = i - t * N;
		y[i] = y[i] * (sx[t] * sw[o]);
	}
}
