// encoder.cu: the ops of a bidirectional transformer encoder (backend.EncoderOps: an image tower's
// layers): LayerNorm with weight and bias, a bias added to every row, the exact (erf) GELU, rotation of
// interleaved pairs by per-row angle tables (RoPE at any positions), and attention without a mask within
// fixed-length sequences. Every operand comes with its dtype code; arithmetic is float32.

// layernorm normalises each row of n elements: (x − mean) · 1/sqrt(var + eps) · w + b, the mean and the
// biased variance summed in float32 over the block (two passes over the row), the root in float64. One
// block a row.
extern "C" __global__ void __launch_bounds__(1024) layernorm(const void* x, int xdt, const void* w, int wdt, const void* b, int bdt,
	void* y, int ydt, int n, float eps) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	long long off = (long long)blockIdx.x * n;
	float s = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) s += ld(x, xdt, off + i);
	float mean = block_sum(s, scratch) / (float)n;
	float ss = 0.0f;
	for (int i = threadIdx.x; i < n; i += blockDim.x) {
		float d = ld(x, xdt, off + i) - mean;
		ss += d * d;
	}
	float var = block_sum(ss, scratch) / (float)n;
	float inv = (float)(1.0 / sqrt((double)var + (double)eps));
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		st(y, ydt, off + i, (ld(x, xdt, off + i) - mean) * inv * ld(w, wdt, i) + ld(b, bdt, i));
}

// add_bias sets y[i] = x[i] + bias[i mod n] for the total elements of rows of n.
extern "C" __global__ void add_bias(const void* x, int xdt, const void* bias, int bdt, void* y, int ydt, int n, long long total) {
	PDL_PROLOGUE();
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
		st(y, ydt, i, ld(x, xdt, i) + ld(bias, bdt, i % n));
}

// gelu sets y = 0.5·x·(1 + erf(x/√2)) elementwise (nn.GELU()'s exact form).
extern "C" __global__ void gelu(const void* x, int xdt, void* y, int ydt, long long total) {
	PDL_PROLOGUE();
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
		float v = ld(x, xdt, i);
		st(y, ydt, i, 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
	}
}

// rotate_pairs rotates pair p (elements 2p, 2p+1) of every head of row t of x [T, heads, 2·half] by the
// angle whose cosine and sine are cs[t·half + p] and sn[t·half + p] (float32 tables). One thread a pair.
extern "C" __global__ void rotate_pairs(const void* x, int xdt, const float* cs, const float* sn, void* y, int ydt,
	int heads, int half, long long pairs) {
	PDL_PROLOGUE();
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += (long long)gridDim.x * blockDim.x) {
		long long t = i / ((long long)heads * half);
		long long a = t * half + i % half;
		float c = cs[a], s = sn[a];
		float x0 = ld(x, xdt, 2 * i), x1 = ld(x, xdt, 2 * i + 1);
		st(y, ydt, 2 * i, x0 * c - x1 * s);
		st(y, ydt, 2 * i + 1, x0 * s + x1 * c);
	}
}

// Geometry of full_attention: ENC_WARPS warps a block, each owning ENC_QPW queries; keys and values go
// through shared memory ENC_KB (one per lane) at a time. D (head width) is at most ENC_MAXD.
#define ENC_WARPS 4
#define ENC_QPW 4
#define ENC_QB (ENC_WARPS * ENC_QPW)
#define ENC_KB 32
#define ENC_MAXD 128

__device__ __forceinline__ float enc_warp_max(float v) {
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

// full_attention computes softmax(q·kᵀ·scale)·v for head blockIdx.y of queries [blockIdx.x·ENC_QB, +ENC_QB)
// of sequence blockIdx.z: q, k, v, out are [S·seq, heads, D] and the rows of a sequence attend to all of
// that sequence's rows and no others. Online softmax over chunks of ENC_KB keys: lane j scores key j of
// the chunk for each of its warp's queries, then each lane accumulates output elements lane, lane+32, …
// Dynamic shared memory: (ENC_QB·D + ENC_KB·(D+1) + ENC_KB·D) floats.
extern "C" __global__ void __launch_bounds__(ENC_WARPS * 32) full_attention(const void* q, int qdt, const void* k, int kdt,
	const void* v, int vdt, void* out, int odt, int heads, int D, int seq, float scale) {
	PDL_PROLOGUE();
	extern __shared__ float enc_smem[];
	float* qs = enc_smem;              // [ENC_QB][D]
	float* ks = qs + ENC_QB * D;       // [ENC_KB][D+1]: the odd stride keeps the lanes' rows in distinct banks
	float* vs = ks + ENC_KB * (D + 1); // [ENC_KB][D]
	int h = blockIdx.y, q0 = blockIdx.x * ENC_QB;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	long long base = (long long)blockIdx.z * seq, rs = (long long)heads * D, hoff = (long long)h * D;
	for (int i = threadIdx.x; i < ENC_QB * D; i += blockDim.x) {
		int r = i / D, d = i - r * D;
		qs[i] = q0 + r < seq ? ld(q, qdt, (base + q0 + r) * rs + hoff + d) : 0.0f;
	}
	float m[ENC_QPW], l[ENC_QPW], o[ENC_QPW][ENC_MAXD / 32];
#pragma unroll
	for (int j = 0; j < ENC_QPW; j++) {
		m[j] = NEG_INF;
		l[j] = 0.0f;
#pragma unroll
		for (int u = 0; u < ENC_MAXD / 32; u++) o[j][u] = 0.0f;
	}
	for (int k0 = 0; k0 < seq; k0 += ENC_KB) {
		__syncthreads(); // the previous chunk is used up (and, the first time, qs is written)
		for (int i = threadIdx.x; i < ENC_KB * D; i += blockDim.x) {
			int r = i / D, d = i - r * D;
			bool in = k0 + r < seq;
			long long g = (base + k0 + r) * rs + hoff + d;
			ks[r * (D + 1) + d] = in ? ld(k, kdt, g) : 0.0f;
			vs[r * D + d] = in ? ld(v, vdt, g) : 0.0f;
		}
		__syncthreads();
		bool valid = k0 + lane < seq; // lane 0 always is: k0 < seq
#pragma unroll
		for (int j = 0; j < ENC_QPW; j++) {
			const float* qr = qs + (warp * ENC_QPW + j) * D;
			const float* kr = ks + lane * (D + 1);
			float sc = 0.0f;
			for (int d = 0; d < D; d++) sc += qr[d] * kr[d];
			sc = valid ? sc * scale : NEG_INF;
			float mnew = fmaxf(m[j], enc_warp_max(sc));
			float p = valid ? expf(sc - mnew) : 0.0f;
			float corr = expf(m[j] - mnew); // 0 the first time (m = −∞, mnew finite)
			l[j] = l[j] * corr + warp_sum(p);
#pragma unroll
			for (int u = 0; u < ENC_MAXD / 32; u++) o[j][u] *= corr;
			for (int jj = 0; jj < ENC_KB; jj++) {
				float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
				for (int u = 0; u < ENC_MAXD / 32; u++) {
					int d = lane + 32 * u;
					if (d < D) o[j][u] += pj * vs[jj * D + d];
				}
			}
			m[j] = mnew;
		}
	}
#pragma unroll
	for (int j = 0; j < ENC_QPW; j++) {
		int row = q0 + warp * ENC_QPW + j;
		if (row >= seq) continue;
		float inv = 1.0f / l[j];
#pragma unroll
		for (int u = 0; u < ENC_MAXD / 32; u++) {
			int d = lane + 32 * u;
			if (d < D) st(out, odt, (base + row) * rs + hoff + d, o[j][u] * inv);
		}
	}
}
