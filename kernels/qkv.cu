// qkv.cu: a decode step's queries and keys prepared and its keys and values appended to the paged KV
// cache in one launch (compiled with attention.cu, whose cache layout, KV_ROW, it writes).

#define QKA_PAIRS 4 // pairs of a head per lane: heads of at most 256 elements (ATT_MAXD)

// qk_append is rope_qk (or scale_rows) followed by kv_append, with the values those kernels store. Block
// (t, h) takes head h of row t, one warp a head: q's heads first, then k's heads, each with v's head of the
// same index. With rope, every pair is rotated at the position rows[t] names, as rope_qk rotates it and
// rounded to ydt as it stores it; with norm (and rope) each head is then divided by its root mean square
// (+ eps) as rope_qk's qk-norm does; with qscale (not null) q's head is then multiplied by qscale[t] as
// scale_rows does. q's heads go to qo (ydt, [T, qheads, 2·half]); k's (after the same) and v's go, as
// kv_append converts them, into the cache at the position and block rows[t] names, the block's address
// into the cache's table. 2·half <= 256.
extern "C" __global__ void __launch_bounds__(32) qk_append(const void* q, int qdt, const void* k, int kdt, const void* v,
	int vdt, const long long* rows, const float* inv_freq, int rope, int norm, float eps, const float* qscale, void* qo,
	int ydt, int qheads, int kheads, int half) {
	PDL_PROLOGUE();
	__shared__ float scratch[32];
	int t = blockIdx.x, h = blockIdx.y;
	bool isq = h < qheads;
	const void* x = isq ? q : k;
	int xdt = isq ? qdt : kdt, heads = isq ? qheads : kheads;
	if (!isq) h -= qheads;
	const long long* r = rows + KV_ROW * t;
	int pos = (int)r[3];
	long long off = ((long long)t * heads + h) * 2 * half;
	float y[QKA_PAIRS][2];
	float ss = 0.0f;
#pragma unroll
	for (int j = 0; j < QKA_PAIRS; j++) {
		int i = threadIdx.x + 32 * j;
		y[j][0] = y[j][1] = 0.0f;
		if (i < half) {
			float y0 = ld(x, xdt, off + 2 * i), y1 = ld(x, xdt, off + 2 * i + 1);
			if (rope) {
				rope_pair(pos, inv_freq[i], y0, y1, &y0, &y1);
				y0 = as_dt(y0, ydt);
				y1 = as_dt(y1, ydt);
				ss += y0 * y0 + y1 * y1;
			}
			y[j][0] = y0;
			y[j][1] = y1;
		}
	}
	if (rope && norm) {
		float inv = norm_inv(block_sum(ss, scratch), 2 * half, eps);
#pragma unroll
		for (int j = 0; j < QKA_PAIRS; j++) {
			y[j][0] = as_dt(y[j][0] * inv, ydt);
			y[j][1] = as_dt(y[j][1] * inv, ydt);
		}
	}
	if (isq) {
		float s = qscale ? qscale[t] : 1.0f;
#pragma unroll
		for (int j = 0; j < QKA_PAIRS; j++) {
			int i = threadIdx.x + 32 * j;
			if (i < half) {
				st(qo, ydt, off + 2 * i, qscale ? y[j][0] * s : y[j][0]);
				st(qo, ydt, off + 2 * i + 1, qscale ? y[j][1] * s : y[j][1]);
			}
		}
		return;
	}
	long long bs = r[1], p = r[3];
	long long stride = (long long)kheads * 2 * half;
	bf16_t* blk = (bf16_t*)r[4] + (p % bs) * stride + (long long)h * 2 * half;
#pragma unroll
	for (int j = 0; j < QKA_PAIRS; j++) {
		int i = threadIdx.x + 32 * j;
		if (i < half) {
			blk[2 * i] = f32_to_bf16(y[j][0]);
			blk[2 * i + 1] = f32_to_bf16(y[j][1]);
			blk[bs * stride + 2 * i] = f32_to_bf16(ld(v, vdt, off + 2 * i));
			blk[bs * stride + 2 * i + 1] = f32_to_bf16(ld(v, vdt, off + 2 * i + 1));
		}
	}
	if (h == 0 && threadIdx.x == 0) ((long long*)r[0])[p / bs] = r[4];
}
