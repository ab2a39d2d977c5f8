// flash.cu: FlashAttention-2 style prefill attention on tensor cores (mma.sync m16n8k16, bf16 operands,
// float32 accumulation), the same semantics as attention in attention.cu.
//
// Block (query tile, head): 4 warps, 16 query rows each, 64 rows in all. The Q fragments (pre-scaled in
// float32 after the product, not before) stay in registers for the whole block; the block walks the
// keys its rows may see in tiles of FA_BN keys, staged in shared memory by cp.async (V of tile i loads
// while S = Q·Kᵀ of tile i runs, K of tile i+1 while O += P·V of tile i runs). Each thread owns two rows
// of its warp (g and g+8, g = lane/4) and keeps their running max and partial sum in registers; P goes
// from the S accumulators straight into bf16 A fragments.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane/4, c = lane%4):
//   A 16×16 row-major, 4 regs of 2 bf16: a0 (row g, k 2c..2c+1), a1 (row g+8, k 2c..), a2 (row g,
//     k 2c+8..), a3 (row g+8, k 2c+8..); the lower k in the low half.
//   B 16×8 "col": b0 (k 2c..2c+1, n g), b1 (k 2c+8..2c+9, n g).
//   C/D 16×8 float: d0,d1 (row g, n 2c, 2c+1), d2,d3 (row g+8, n 2c, 2c+1).
//   ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; register i receives, of matrix i,
//     row g, columns 2c, 2c+1 (with .trans: rows 2c, 2c+1 of column g).

#define FA_WARPS 4
#define FA_BM (16 * FA_WARPS) // query rows per block
#define FA_BN 64              // keys per tile
#define FA_MAXD 128
#define FA_PAD 8 // bf16 elements of padding per shared row: 16-byte aligned rows, conflict-free ldmatrix

__device__ __forceinline__ unsigned fa_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void fa_cp16(unsigned dst, const void* src) {
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void fa_zero16(unsigned dst) {
	asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
}

__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

__device__ __forceinline__ void fa_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void fa_ldmatrix_x4(unsigned addr, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(addr));
}

__device__ __forceinline__ void fa_ldmatrix_x4_trans(unsigned addr, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(addr));
}

// fa_mma: d += a·b for one m16n8k16 tile.
__device__ __forceinline__ void fa_mma(float* d, const u32* a, u32 b0, u32 b1) {
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
		: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fa_pack converts lo and hi to bf16 (round to nearest even) in one register, lo in the low half.
__device__ __forceinline__ u32 fa_pack(float lo, float hi) {
	u32 r;
	asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
	return r;
}

__device__ __forceinline__ int fa_wmin(int v) {
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) {
		int w = __shfl_xor_sync(0xffffffffu, v, o);
		v = w < v ? w : v;
	}
	return v;
}

__device__ __forceinline__ int fa_wmax(int v) {
#pragma unroll
	for (int o = 16; o > 0; o >>= 1) {
		int w = __shfl_xor_sync(0xffffffffu, v, o);
		v = w > v ? w : v;
	}
	return v;
}

// fa_load_tile copies keys [k0, k0 + FA_BN) of kv head kvh from the paged cache (block table of bs
// positions a block, see attention.cu; half 0 the keys, half 1 the values) into the shared tile dst (rows
// of D + FA_PAD), by cp.async; keys above kmax are zero-filled instead (their blocks may not exist, and
// masked scores still multiply V: its rows must be finite).
template <int D>
__device__ __forceinline__ void fa_load_tile(bf16_t* dst, const long long* table, int bs, int half, int k0, int kmax, int kv_heads, int kvh) {
	const int CH = D / 8; // 16-byte chunks per row
#pragma unroll
	for (int i = 0; i < FA_BN * CH / (FA_WARPS * 32); i++) {
		int x = threadIdx.x + i * FA_WARPS * 32;
		int r = x / CH, c = x % CH;
		unsigned s = fa_smem(dst + r * (D + FA_PAD) + c * 8);
		int key = k0 + r;
		if (key <= kmax) {
			long long stride = (long long)kv_heads * D;
			const bf16_t* row = (const bf16_t*)table[key / bs] + ((long long)(key % bs) + (long long)half * bs) * stride;
			fa_cp16(s, row + (long long)kvh * D + c * 8);
		}
		else fa_zero16(s);
	}
}

template <int D>
__device__ __forceinline__ void fa_body(const bf16_t* q, const long long* table, int bs, const int* pos,
	void* out, int odt, int T, int heads, int kv_heads, int chunk, int first_kept, float scale,
	bf16_t* sk, bf16_t* sv, int* sred) {
	const int KS = D / 16; // k-steps of Q·Kᵀ
	const int NT = D / 8;  // n-tiles of O
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	int g = lane >> 2, c = lane & 3;
	int h = blockIdx.y;
	int kvh = h / (heads / kv_heads);
	// Heavy (late) query tiles first: under a causal mask they see the most keys.
	int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BM + warp * 16;

	// The visible key range of this thread's two rows; rows past T see nothing.
	int rfrom[2], rlast[2];
#pragma unroll
	for (int i = 0; i < 2; i++) {
		int t = q0 + g + 8 * i;
		if (t < T) {
			int p = pos[t];
			int from = chunk > 0 ? p - p % chunk : 0;
			if (from < first_kept) from = first_kept;
			rfrom[i] = from;
			rlast[i] = p;
		} else {
			rfrom[i] = 0x7fffffff;
			rlast[i] = -1;
		}
	}
	// The warp's union (wlo..whi) and intersection (wmaskfree_lo..wmaskfree_hi: a tile inside it needs no mask).
	int wlo = fa_wmin(rfrom[0] < rfrom[1] ? rfrom[0] : rfrom[1]);
	int whi = fa_wmax(rlast[0] > rlast[1] ? rlast[0] : rlast[1]);
	int wfree_lo = fa_wmax(rfrom[0] > rfrom[1] ? rfrom[0] : rfrom[1]);
	int wfree_hi = fa_wmin(rlast[0] < rlast[1] ? rlast[0] : rlast[1]);
	if (lane == 0) {
		sred[warp] = wlo;
		sred[FA_WARPS + warp] = whi;
	}
	__syncthreads();
	int kmin = sred[0], kmax = sred[FA_WARPS];
#pragma unroll
	for (int w = 1; w < FA_WARPS; w++) {
		kmin = sred[w] < kmin ? sred[w] : kmin;
		kmax = sred[FA_WARPS + w] > kmax ? sred[FA_WARPS + w] : kmax;
	}

	// Q A-fragments straight from global memory (rows past T are zero).
	u32 qa[KS][4];
	{
		const bf16_t* r0 = q + ((long long)(q0 + g) * heads + h) * D;
		const bf16_t* r1 = q + ((long long)(q0 + g + 8) * heads + h) * D;
		bool in0 = q0 + g < T, in1 = q0 + g + 8 < T;
#pragma unroll
		for (int k = 0; k < KS; k++) {
			int d = 16 * k + 2 * c;
			qa[k][0] = in0 ? *(const u32*)(r0 + d) : 0u;
			qa[k][1] = in1 ? *(const u32*)(r1 + d) : 0u;
			qa[k][2] = in0 ? *(const u32*)(r0 + d + 8) : 0u;
			qa[k][3] = in1 ? *(const u32*)(r1 + d + 8) : 0u;
		}
	}

	float o[NT][4];
#pragma unroll
	for (int n = 0; n < NT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
	float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f}; // m in log2 units (scores · scale · log2 e)
	const float sl2 = scale * 1.4426950408889634f;

	// Per-lane ldmatrix offsets (bytes) within a tile. K (no trans): matrix i = lane/8 covers keys
	// 8·(i/2).. and dims 8·(i%2)..; V (trans): keys 8·(i%2).., dims 8·(i/2)...
	const int RB = (D + FA_PAD) * 2; // bytes per shared row
	int koff = ((lane & 7) + ((lane >> 4) << 3)) * RB + ((lane >> 3) & 1) * 16;
	int voff = ((lane & 7) + (((lane >> 3) & 1) << 3)) * RB + (lane >> 4) * 16;
	unsigned skb = fa_smem(sk), svb = fa_smem(sv);

	fa_load_tile<D>(sk, table, bs, 0, kmin, kmax, kv_heads, kvh);
	fa_commit();
	for (int k0 = kmin; k0 <= kmax; k0 += FA_BN) {
		fa_wait_all();
		__syncthreads(); // K(k0) visible to all; every warp is done with the previous V
		fa_load_tile<D>(sv, table, bs, 1, k0, kmax, kv_heads, kvh);
		fa_commit();
		bool active = k0 <= whi && k0 + FA_BN - 1 >= wlo; // some row of this warp sees a key of the tile
		float s[FA_BN / 8][4];
		if (active) {
#pragma unroll
			for (int n = 0; n < FA_BN / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
			for (int k = 0; k < KS; k++) {
#pragma unroll
				for (int np = 0; np < FA_BN / 16; np++) {
					u32 b0, b1, b2, b3;
					fa_ldmatrix_x4(skb + koff + np * 16 * RB + k * 32, b0, b1, b2, b3);
					fa_mma(s[2 * np], qa[k], b0, b1);
					fa_mma(s[2 * np + 1], qa[k], b2, b3);
				}
			}
			bool mask = !(k0 >= wfree_lo && k0 + FA_BN - 1 <= wfree_hi);
#pragma unroll
			for (int n = 0; n < FA_BN / 8; n++) {
#pragma unroll
				for (int e = 0; e < 4; e++) {
					int i = e >> 1;
					int key = k0 + 8 * n + 2 * c + (e & 1);
					float v = s[n][e] * sl2;
					if (mask && (key < rfrom[i] || key > rlast[i])) v = NEG_INF;
					s[n][e] = v;
				}
			}
			// Online softmax for rows g (i = 0) and g+8 (i = 1); the 4 lanes of a quad share a row.
#pragma unroll
			for (int i = 0; i < 2; i++) {
				float mx = NEG_INF;
#pragma unroll
				for (int n = 0; n < FA_BN / 8; n++) mx = fmaxf(mx, fmaxf(s[n][2 * i], s[n][2 * i + 1]));
				mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
				mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
				float mn = fmaxf(m[i], mx);
				// Fully masked so far: l and o are 0, and exp2(-inf - -inf) must not make a NaN.
				float corr = m[i] == NEG_INF ? 0.0f : exp2f(m[i] - mn);
				float mu = mn == NEG_INF ? 0.0f : mn;
				float sum = 0.0f;
#pragma unroll
				for (int n = 0; n < FA_BN / 8; n++) {
					float p0 = exp2f(s[n][2 * i] - mu), p1 = exp2f(s[n][2 * i + 1] - mu);
					s[n][2 * i] = p0;
					s[n][2 * i + 1] = p1;
					sum += p0 + p1;
				}
				l[i] = l[i] * corr + sum;
				m[i] = mn;
#pragma unroll
				for (int n = 0; n < NT; n++) {
					o[n][2 * i] *= corr;
					o[n][2 * i + 1] *= corr;
				}
			}
		}
		fa_wait_all();
		__syncthreads(); // V(k0) visible to all; every warp is done with K(k0)
		if (k0 + FA_BN <= kmax) {
			fa_load_tile<D>(sk, table, bs, 0, k0 + FA_BN, kmax, kv_heads, kvh);
			fa_commit();
		}
		if (active) {
#pragma unroll
			for (int k = 0; k < FA_BN / 16; k++) {
				u32 pa[4];
				pa[0] = fa_pack(s[2 * k][0], s[2 * k][1]);
				pa[1] = fa_pack(s[2 * k][2], s[2 * k][3]);
				pa[2] = fa_pack(s[2 * k + 1][0], s[2 * k + 1][1]);
				pa[3] = fa_pack(s[2 * k + 1][2], s[2 * k + 1][3]);
#pragma unroll
				for (int dp = 0; dp < D / 16; dp++) {
					u32 b0, b1, b2, b3;
					fa_ldmatrix_x4_trans(svb + voff + k * 16 * RB + dp * 32, b0, b1, b2, b3);
					fa_mma(o[2 * dp], pa, b0, b1);
					fa_mma(o[2 * dp + 1], pa, b2, b3);
				}
			}
		}
	}

#pragma unroll
	for (int i = 0; i < 2; i++) {
		float L = l[i];
		L += __shfl_xor_sync(0xffffffffu, L, 1);
		L += __shfl_xor_sync(0xffffffffu, L, 2);
		float inv = L > 0.0f ? 1.0f / L : 0.0f;
		int t = q0 + g + 8 * i;
		if (t < T) {
			long long off = ((long long)t * heads + h) * D + 2 * c;
#pragma unroll
			for (int n = 0; n < NT; n++) {
				st(out, odt, off + 8 * n, o[n][2 * i] * inv);
				st(out, odt, off + 8 * n + 1, o[n][2 * i + 1] * inv);
			}
		}
	}
}

// attention_flash: the attention kernel's result (see attention.cu) for a bf16 q [T, heads, D], D 64 or
// 128, by tensor cores. Grid (ceil(T / 64), heads), block 128 threads, static shared memory only
// (2·64·(128+8)·2 bytes for K and V tiles). heads is a multiple of kv_heads.
extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
attention_flash(const bf16_t* q, const long long* table, int bs, const int* pos, void* out, int odt,
	int T, int heads, int kv_heads, int D, int chunk, int first_kept, float scale) {
	PDL_PROLOGUE();
	__shared__ __attribute__((aligned(16))) bf16_t sk[FA_BN * (FA_MAXD + FA_PAD)];
	__shared__ __attribute__((aligned(16))) bf16_t sv[FA_BN * (FA_MAXD + FA_PAD)];
	__shared__ int sred[2 * FA_WARPS];
	if (D == 128) fa_body<128>(q, table, bs, pos, out, odt, T, heads, kv_heads, chunk, first_kept, scale, sk, sv, sred);
	else fa_body<64>(q, table, bs, pos, out, odt, T, heads, kv_heads, chunk, first_kept, scale, sk, sv, sred);
}
