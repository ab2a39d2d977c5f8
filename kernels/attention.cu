// attention.cu: the KV cache append and attention over it.
//
// The cache of one layer is two bf16 arrays [capacity, kvHeads, D] indexed by absolute position.

// kv_append converts n = T·kvHeads·D elements of k and v into the caches, starting at element offset.
extern "C" __global__ void kv_append(const void* k, int kdt, const void* v, int vdt, bf16_t* kc, bf16_t* vc, long long offset, long long n) {
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
		kc[offset + i] = f32_to_bf16(ld(k, kdt, i));
		vc[offset + i] = f32_to_bf16(ld(v, vdt, i));
	}
}

#define ATT_WARPS 4
#define ATT_MAXD 256
#define ATT_PER_LANE (ATT_MAXD / 32)

// attention computes, for query t (at position pos[t]) and head h (block (t, h)), softmax(q·kᵀ·scale)·v
// over the cached keys j in [from, pos[t]], where from is the start of pos[t]'s chunk (chunk > 0) or 0,
// but not below first_kept. Query head h reads kv head h / (heads / kv_heads). Each of the block's 4
// warps runs an online softmax (float32) over every 4th key; the warps' partial results are merged at
// the end. D <= ATT_MAXD.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention(const void* q, int qdt, const bf16_t* kc, const bf16_t* vc, const int* pos, void* out, int odt,
	int heads, int kv_heads, int D, int chunk, int first_kept, float scale) {
	__shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS];
	__shared__ float sm_acc[ATT_WARPS][ATT_MAXD];
	int t = blockIdx.x, h = blockIdx.y;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	int kvh = h / (heads / kv_heads);
	int p = pos[t];
	int from = chunk > 0 ? p - p % chunk : 0;
	if (from < first_kept) from = first_kept;
	long long qoff = ((long long)t * heads + h) * D;
	float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
	for (int i = 0; i < ATT_PER_LANE; i++) {
		int d = lane + 32 * i;
		qr[i] = d < D ? ld(q, qdt, qoff + d) : 0.0f;
		acc[i] = 0.0f;
	}
	float m = NEG_INF, l = 0.0f;
	long long stride = (long long)kv_heads * D;
	for (int j = from + warp; j <= p; j += ATT_WARPS) {
		const bf16_t* kr = kc + j * stride + (long long)kvh * D;
		const bf16_t* vr = vc + j * stride + (long long)kvh * D;
		float s = 0.0f;
#pragma unroll
		for (int i = 0; i < ATT_PER_LANE; i++) {
			int d = lane + 32 * i;
			if (d < D) s += qr[i] * bf16_to_f32(kr[d]);
		}
		s = warp_sum(s) * scale;
		float mn = fmaxf(m, s);
		float corr = expf(m - mn);
		float e = expf(s - mn);
		l = l * corr + e;
#pragma unroll
		for (int i = 0; i < ATT_PER_LANE; i++) {
			int d = lane + 32 * i;
			if (d < D) acc[i] = acc[i] * corr + e * bf16_to_f32(vr[d]);
		}
		m = mn;
	}
	if (lane == 0) {
		sm_m[warp] = m;
		sm_l[warp] = l;
	}
#pragma unroll
	for (int i = 0; i < ATT_PER_LANE; i++) {
		int d = lane + 32 * i;
		if (d < D) sm_acc[warp][d] = acc[i];
	}
	__syncthreads();
	float M = NEG_INF;
	for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
	float L = 0.0f, f[ATT_WARPS];
	for (int w = 0; w < ATT_WARPS; w++) {
		f[w] = sm_m[w] == NEG_INF ? 0.0f : expf(sm_m[w] - M);
		L += sm_l[w] * f[w];
	}
	for (int d = threadIdx.x; d < D; d += blockDim.x) {
		float o = 0.0f;
		for (int w = 0; w < ATT_WARPS; w++) o += sm_acc[w][d] * f[w];
		st(out, odt, qoff + d, o / L);
	}
}
