// quant_fp8gemm.cu: around the FP8 GEMM (backend/cuda fp8gemm.go) of the fp8 format with dynamic
// activations (FbgemmFp8: --quantization fp8). cuBLASLt multiplies the E4M3 codes of the activations
// (fp8_act_codes, quant_fp8.cu) and of the weight with float32 accumulation; the per-token activation
// scales and the per-channel weight scales are applied by cuBLASLt's outer-vector scaling where it has it,
// else after the product:
//   fp8_scale_out: y[t][o] = acc[t][o]·sx[t]·sw[o], in place;
//   transpose_u8: [R, C] bytes to [C, R]: at load, a routed expert's codes [in, out] to the output-major
//     [out, in] every fp8 kernel reads (fp8.go), never in a step.
// This file sorts after quant.cu and quant_fp8.cu in the compilation unit and uses their helpers.

// transpose_u8 writes dst [C, R] = srcᵀ for src [R, C] bytes (an expert's E4M3 codes at load: the fp8
// kernels and cuBLASLt's FP8 GEMM take the weight output-major). A block moves a 64×64 tile through shared memory; blocks of 256
// threads, grid (ceil(C/64), ceil(R/64)).
extern "C" __global__ void transpose_u8(const unsigned char* src, long long R, long long C, unsigned char* dst) {
	PDL_PROLOGUE();
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

// fp8_scale_out scales y [T, N] (float32, the codes' product) in place: y[t][o] ·= sx[t]·sw[o]. Where
// cuBLASLt applies the scales itself (outer-vector scaling, fp8gemm.go) this pass does not run. Four
// columns a thread (N % 4 == 0, y 16-byte aligned: the FP8 GEMM's shapes), rows along the grid's y
// (grid-stride), no division; other shapes one element a thread.
extern "C" __global__ void fp8_scale_out(float* y, const float* sx, const float* sw, long long T, long long N) {
	PDL_PROLOGUE();
	if ((N & 3) == 0 && ((unsigned long long)y & 15) == 0 && ((unsigned long long)sw & 15) == 0) {
		const long long n4 = N >> 2;
		for (long long t = blockIdx.y; t < T; t += gridDim.y) {
			const float a = sx[t];
			f32x4* row = (f32x4*)(y + t * N);
			for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n4; j += (long long)gridDim.x * blockDim.x) {
				f32x4 v = row[j], s = ((const f32x4*)sw)[j];
				v.x *= a * s.x, v.y *= a * s.y, v.z *= a * s.z, v.w *= a * s.w;
				row[j] = v;
			}
		}
		return;
	}
	for (long long t = blockIdx.y; t < T; t += gridDim.y)
		for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < N; o += (long long)gridDim.x * blockDim.x)
			y[t * N + o] *= sx[t] * sw[o];
}
