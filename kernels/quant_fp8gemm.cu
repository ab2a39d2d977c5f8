// quant_fp8gemm.cu: the two ends of the FP8 prefill GEMM (backend/cuda fp8gemm.go) of the fp8 format
// with dynamic activations (FbgemmFp8: --quantization fp8). cuBLASLt multiplies the E4M3 codes of the
// activations and of the weight with float32 accumulation and unit scales (Hopper's cuBLASLt takes one
// scale a tensor); the per-token activation scales and the per-channel weight scales are applied after:
//   act_quant_fp8: each row of x to E4M3 codes and one float32 scale, quant.FakeQuantFP8Rows' rule, so a
//     decoded code times its scale is act_quant_rows' value bit for bit;
//   fp8_scale_out: y[t][o] = acc[t][o]·sx[t]·sw[o], in place.
// This file sorts after quant.cu in the compilation unit and uses its helpers.

// act_quant_fp8 quantises row r = blockIdx.x of x [rows, n] (xdt) to codes[r][0..n) and scales[r].
// Blocks of a multiple of 32 threads.
extern "C" __global__ void act_quant_fp8(const void* x, int xdt, int n, unsigned char* codes, float* scales) {
	__shared__ float scratch[32];
	const long long base = (long long)blockIdx.x * n;
	float amax = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) amax = fmaxf(amax, fabsf(ld(x, xdt, base + i)));
	const float s = fp8_row_scale(block_max(amax, scratch), ACT_SCALE_UB);
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float v = ld(x, xdt, base + i);
		codes[base + i] = (unsigned char)e4m3_encode(round_e4m3(fminf(fmaxf(v / s, -FP8_MAX), FP8_MAX)));
	}
	if (threadIdx.x == 0) scales[blockIdx.x] = s;
}

// fp8_scale_out scales y [T, N] (float32, the codes' product) in place: y[t][o] ·= sx[t]·sw[o].
extern "C" __global__ void fp8_scale_out(float* y, const float* sx, const float* sw, long long T, long long N) {
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < T * N; i += (long long)gridDim.x * blockDim.x) {
		long long t = i / N, o = i - t * N;
		y[i] = y[i] * (sx[t] * sw[o]);
	}
}
