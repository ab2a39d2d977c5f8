// attention.cu: the paged KV cache append and attention over it.
//
// The cache of one layer is paged: blocks of bs positions, each [2][bs][kvHeads][D] bf16 (the keys of its
// positions, then their values), anywhere in device memory, and a block table per cache: table[p / bs]
// is the address of the block holding position p (int64). Keys of position p are at
// table[p / bs] + (p % bs)·kvHeads·D, their values bs·kvHeads·D elements further (kv_key, kv_val).

// KV_ROW is the number of int64 words per row in the rows arrays kv_append and attention_split read
// (kvRow in attention.go): [0] the cache's block table, [1] its block size, [2] its first kept position,
// [3] the row's position, [4] the block that holds that position (kv_append writes it into the table).
// Reading them from device memory lets one launch serve rows of several sequences, and keeps the
// launches the same from step to step, so a recorded decode step (a CUDA graph) replays for any
// sequences, positions and blocks.
#define KV_ROW 5

// kv_key returns the key row of position j (stride = kvHeads·D elements) through the block table.
__device__ __forceinline__ const bf16_t* kv_key(const long long* table, int bs, int j, long long stride) {
	return (const bf16_t*)table[j / bs] + (long long)(j % bs) * stride;
}

// kv_val returns the value row of position j.
__device__ __forceinline__ const bf16_t* kv_val(const long long* table, int bs, int j, long long stride) {
	return kv_key(table, bs, j, stride) + (long long)bs * stride;
}

// kv_append converts n = T·stride elements of k and v (T rows of stride = kvHeads·D) into the caches:
// row t goes to position rows[t] of its own cache, in the block rows[t] names, and the block's address
// goes into the cache's table (the same value from every row of the block).
extern "C" __global__ void kv_append(const void* k, int kdt, const void* v, int vdt, const long long* rows, long long stride, long long n) {
	PDL_PROLOGUE();
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
		long long t = i / stride, j = i - t * stride;
		const long long* r = rows + KV_ROW * t;
		long long bs = r[1], p = r[3];
		bf16_t* blk = (bf16_t*)r[4];
		long long dst = (p % bs) * stride + j;
		blk[dst] = f32_to_bf16(ld(k, kdt, i));
		blk[bs * stride + dst] = f32_to_bf16(ld(v, vdt, i));
		if (j == 0) ((long long*)r[0])[p / bs] = r[4];
	}
}

#define ATT_WARPS 4
#define ATT_MAXD 256
#define ATT_PER_LANE (ATT_MAXD / 32)

// attention computes, for query t (at position pos[t]) and head h (block (t, h)), softmax(q·kᵀ·scale)·v
// over the cached keys j in [from, pos[t]] (through the block table of bs positions a block), where from is the start of pos[t]'s chunk (chunk > 0) or 0,
// but not below first_kept. Query head h reads kv head h / (heads / kv_heads). Each of the block's 4
// warps runs an online softmax (float32) over every 4th key; the warps' partial results are merged at
// the end. D <= ATT_MAXD.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention(const void* q, int qdt, const long long* table, int bs, const int* pos, void* out, int odt,
	int heads, int kv_heads, int D, int chunk, int first_kept, float scale) {
	PDL_PROLOGUE();
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
		const bf16_t* kr = kv_key(table, bs, j, stride) + (long long)kvh * D;
		const bf16_t* vr = kv_val(table, bs, j, stride) + (long long)kvh * D;
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

// Split-K decode attention (flash-decoding) for a few queries: attention_split computes partial
// softmax results over key chunks, attention_combine merges them with the log-sum-exp rule.
#define ATTS_MAXG 8
#define ATTS_PAIRS (ATT_MAXD / 64)

// attention_split: block (s, kvh, t) covers split s of query t's visible keys [lo, pos[t]], where lo is
// the first key pos[t] may see (as in attention), for all G = heads / kv_heads query heads of kv head
// kvh, so each K/V row is read once per group. The keys are cut into `splits` spans of
// max(ceil(n / splits), ATTS_MINSPAN) keys, n the number of visible keys, so the grid depends only on
// the shapes and a recorded step replays at any context length; later splits may be empty. Query t's
// cache and position are row t of rows (KV_ROW), so the queries may belong to different sequences.
// Each of the 4 warps runs an online softmax (float32) per query head over every 4th key of the split
// (lane L holds elements 64i + 2L, +1); the warps merge in shared memory and the block writes, per query
// head, the split's max m, sum l and unnormalised Σ e·v to part_ml [T, heads, splits, 2] and part_acc
// [T, heads, splits, D]. An empty split writes m = -inf, l = 0 and zeros. D is even and at most
// ATT_MAXD, G at most ATTS_MAXG.
#define ATTS_MINSPAN 32

// att_load_kv loads lane's bf16 pairs (elements 64i + 2·lane, +1) of key j's K and V rows of one kv head
// (offset head_off) when j <= hi and the pair is inside D; the others are left as they are.
template <int PAIRS>
__device__ __forceinline__ void att_load_kv(const long long* table, int bs, int j, int hi, long long stride,
	long long head_off, int D, int lane, unsigned int* kw, unsigned int* vw) {
	if (j > hi) return;
	const bf16_t* kr = kv_key(table, bs, j, stride) + head_off;
	const bf16_t* vr = kv_val(table, bs, j, stride) + head_off;
#pragma unroll
	for (int i = 0; i < PAIRS; i++) {
		int d = 64 * i + 2 * lane;
		if (d < D) {
			kw[i] = *(const unsigned int*)(kr + d);
			vw[i] = *(const unsigned int*)(vr + d);
		}
	}
}
template <int PAIRS, int WARPS, int MG>
__device__ __forceinline__ void attention_split_body(const void* q, int qdt, const long long* rows,
	float* part_ml, float* part_acc, int heads, int kv_heads, int D, int chunk, float scale, int splits) {
	__shared__ float sm_m[WARPS][MG], sm_l[WARPS][MG];
	__shared__ float sm_acc[WARPS][MG][64 * PAIRS];
	int s = blockIdx.x, kvh = blockIdx.y, t = blockIdx.z;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	int G = heads / kv_heads;
	const long long* r = rows + KV_ROW * t;
	const long long* table = (const long long*)r[0];
	int bs = (int)r[1];
	int first_kept = (int)r[2];
	int p = (int)r[3];
	int from = chunk > 0 ? p - p % chunk : 0;
	if (from < first_kept) from = first_kept;
	int span = (p - from + splits) / splits; // ceil(n / splits), n = p - from + 1
	if (span < ATTS_MINSPAN) span = ATTS_MINSPAN;
	int lo = from + s * span;
	int hi = lo + span - 1 < p ? lo + span - 1 : p;
	float qr[MG][PAIRS][2], acc[MG][PAIRS][2], m[MG], l[MG];
#pragma unroll
	for (int g = 0; g < MG; g++) {
		long long qoff = ((long long)t * heads + (long long)kvh * G + g) * D;
#pragma unroll
		for (int i = 0; i < PAIRS; i++) {
			int d = 64 * i + 2 * lane;
			bool in = g < G && d < D;
			qr[g][i][0] = in ? ld(q, qdt, qoff + d) : 0.0f;
			qr[g][i][1] = in ? ld(q, qdt, qoff + d + 1) : 0.0f;
			acc[g][i][0] = acc[g][i][1] = 0.0f;
		}
		m[g] = NEG_INF;
		l[g] = 0.0f;
	}
	long long stride = (long long)kv_heads * D;
	// The key and value words of this warp's next key are loaded before the current key is used, so a
	// warp's walk waits for memory about once, not once per key.
	unsigned int kn[PAIRS], vn[PAIRS];
#pragma unroll
	for (int i = 0; i < PAIRS; i++) kn[i] = vn[i] = 0;
	att_load_kv<PAIRS>(table, bs, lo + warp, hi, stride, (long long)kvh * D, D, lane, kn, vn);
	for (int j = lo + warp; j <= hi; j += WARPS) {
		unsigned int kcur[PAIRS], vcur[PAIRS];
#pragma unroll
		for (int i = 0; i < PAIRS; i++) {
			kcur[i] = kn[i];
			vcur[i] = vn[i];
		}
		att_load_kv<PAIRS>(table, bs, j + WARPS, hi, stride, (long long)kvh * D, D, lane, kn, vn);
		float kf[PAIRS][2], vf[PAIRS][2];
#pragma unroll
		for (int i = 0; i < PAIRS; i++) {
			unsigned int kw = kcur[i], vw = vcur[i];
			kf[i][0] = __uint_as_float(kw << 16);
			kf[i][1] = __uint_as_float(kw & 0xffff0000u);
			vf[i][0] = __uint_as_float(vw << 16);
			vf[i][1] = __uint_as_float(vw & 0xffff0000u);
		}
		float dot[MG];
#pragma unroll
		for (int g = 0; g < MG; g++) {
			dot[g] = 0.0f;
#pragma unroll
			for (int i = 0; i < PAIRS; i++) dot[g] += qr[g][i][0] * kf[i][0] + qr[g][i][1] * kf[i][1];
		}
		// The heads' warp sums interleaved (warp_sum's order, so the same values): their shuffles overlap
		// instead of waiting for one another.
#pragma unroll
		for (int o = 16; o > 0; o >>= 1)
#pragma unroll
			for (int g = 0; g < MG; g++) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
#pragma unroll
		for (int g = 0; g < MG; g++) {
			if (g < G) {
				float sc = dot[g] * scale;
				float mn = fmaxf(m[g], sc);
				float corr = expf(m[g] - mn);
				float e = expf(sc - mn);
				l[g] = l[g] * corr + e;
#pragma unroll
				for (int i = 0; i < PAIRS; i++) {
					acc[g][i][0] = acc[g][i][0] * corr + e * vf[i][0];
					acc[g][i][1] = acc[g][i][1] * corr + e * vf[i][1];
				}
				m[g] = mn;
			}
		}
	}
#pragma unroll
	for (int g = 0; g < MG; g++) {
		if (g < G) {
			if (lane == 0) {
				sm_m[warp][g] = m[g];
				sm_l[warp][g] = l[g];
			}
#pragma unroll
			for (int i = 0; i < PAIRS; i++) {
				int d = 64 * i + 2 * lane;
				if (d < D) {
					sm_acc[warp][g][d] = acc[g][i][0];
					sm_acc[warp][g][d + 1] = acc[g][i][1];
				}
			}
		}
	}
	__syncthreads();
	for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
		int g = x / D, d = x - g * D;
		float M = NEG_INF;
		for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w][g]);
		float L = 0.0f, o = 0.0f;
		for (int w = 0; w < WARPS; w++) {
			float f = sm_m[w][g] == NEG_INF ? 0.0f : expf(sm_m[w][g] - M);
			L += sm_l[w][g] * f;
			o += sm_acc[w][g][d] * f;
		}
		long long row = ((long long)t * heads + (long long)kvh * G + g) * splits + s;
		part_acc[row * D + d] = o;
		if (d == 0) {
			part_ml[2 * row] = M;
			part_ml[2 * row + 1] = L;
		}
	}
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_split(const void* q, int qdt, const long long* rows,
	float* part_ml, float* part_acc, int heads, int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<ATTS_PAIRS, ATT_WARPS, ATTS_MAXG>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}

// attention_split_128_gM is attention_split for D <= 128 and at most M query heads a kv head, with
// ATTS_WARPS_128 warps: half the registers for q and the accumulators, half the keys a warp, and no
// work for heads a group does not have (Llama 4's 40/8 heads are groups of 5). (Nsight Compute on an
// H200: the 4-warp, 8-head kernel issued an instruction every 3 cycles per warp at 6 % achieved
// occupancy, bound by each warp's serial walk over its keys.)
#define ATTS_WARPS_128 8
extern "C" __global__ void __launch_bounds__(ATTS_WARPS_128 * 32)
attention_split_128_g1(const void* q, int qdt, const long long* rows, float* part_ml, float* part_acc, int heads,
	int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<2, ATTS_WARPS_128, 1>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}
extern "C" __global__ void __launch_bounds__(ATTS_WARPS_128 * 32)
attention_split_128_g2(const void* q, int qdt, const long long* rows, float* part_ml, float* part_acc, int heads,
	int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<2, ATTS_WARPS_128, 2>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}
extern "C" __global__ void __launch_bounds__(ATTS_WARPS_128 * 32)
attention_split_128_g4(const void* q, int qdt, const long long* rows, float* part_ml, float* part_acc, int heads,
	int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<2, ATTS_WARPS_128, 4>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}
extern "C" __global__ void __launch_bounds__(ATTS_WARPS_128 * 32)
attention_split_128_g5(const void* q, int qdt, const long long* rows, float* part_ml, float* part_acc, int heads,
	int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<2, ATTS_WARPS_128, 5>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}
extern "C" __global__ void __launch_bounds__(ATTS_WARPS_128 * 32)
attention_split_128_g8(const void* q, int qdt, const long long* rows, float* part_ml, float* part_acc, int heads,
	int kv_heads, int D, int chunk, float scale, int splits) {
	PDL_PROLOGUE();
	attention_split_body<2, ATTS_WARPS_128, 8>(q, qdt, rows, part_ml, part_acc, heads, kv_heads, D, chunk, scale, splits);
}

// attention_combine: block (t, h) merges the splits' partials of query t, head h (attention_split) with
// the log-sum-exp rule, in split order, and stores the normalised result. splits <= ATTC_MAXSPLITS.
#define ATTC_MAXSPLITS 1024
extern "C" __global__ void attention_combine(const float* part_ml, const float* part_acc, void* out, int odt,
	int heads, int D, int splits) {
	PDL_PROLOGUE();
	__shared__ float sm_w[ATTC_MAXSPLITS];
	__shared__ float sm_red[32];
	int t = blockIdx.x, h = blockIdx.y;
	long long row0 = ((long long)t * heads + h) * splits;
	float mx = NEG_INF;
	for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, part_ml[2 * (row0 + s)]);
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	if (lane == 0) sm_red[warp] = mx;
	__syncthreads();
	float M = NEG_INF;
	for (int w = 0; w < warps; w++) M = fmaxf(M, sm_red[w]);
	for (int s = threadIdx.x; s < splits; s += blockDim.x) {
		float m = part_ml[2 * (row0 + s)];
		sm_w[s] = m == NEG_INF ? 0.0f : expf(m - M);
	}
	__syncthreads();
	float L = 0.0f;
	for (int s = 0; s < splits; s++) L += sm_w[s] * part_ml[2 * (row0 + s) + 1];
	for (int d = threadIdx.x; d < D; d += blockDim.x) {
		float o = 0.0f;
#pragma unroll 8
		for (int s = 0; s < splits; s++) o += sm_w[s] * part_acc[(row0 + s) * D + d];
		st(out, odt, ((long long)t * heads + h) * D + d, o / L);
	}
}
