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

// fa_ldcg is what the SIMT emulator (scripts/gpu/emu/emu.h, which defines TPF_EMU) replaces with a plain
// load; the prelude's tc_* helpers are replaced the same way.
#ifndef TPF_EMU
// fa_ldcg loads a float through L2 only (ld.global.cg): data other blocks of the same launch wrote, which
// a stale L1 line must not hide.
__device__ __forceinline__ float fa_ldcg(const float* p) {
	float v;
	asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
	return v;
}
#endif // TPF_EMU

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
		unsigned s = tc_smem(dst + r * (D + FA_PAD) + c * 8);
		int key = k0 + r;
		if (key <= kmax) {
			long long stride = (long long)kv_heads * D;
			const bf16_t* row = (const bf16_t*)table[key / bs] + ((long long)(key % bs) + (long long)half * bs) * stride;
			tc_cp16(s, row + (long long)kvh * D + c * 8);
		}
		else tc_zero16(s);
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
	unsigned skb = tc_smem(sk), svb = tc_smem(sv);

	fa_load_tile<D>(sk, table, bs, 0, kmin, kmax, kv_heads, kvh);
	tc_commit();
	for (int k0 = kmin; k0 <= kmax; k0 += FA_BN) {
		tc_wait_all();
		__syncthreads(); // K(k0) visible to all; every warp is done with the previous V
		fa_load_tile<D>(sv, table, bs, 1, k0, kmax, kv_heads, kvh);
		tc_commit();
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
					tc_ldsm4(skb + koff + np * 16 * RB + k * 32, b0, b1, b2, b3);
					tc_mma(s[2 * np], qa[k], b0, b1);
					tc_mma(s[2 * np + 1], qa[k], b2, b3);
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
		tc_wait_all();
		__syncthreads(); // V(k0) visible to all; every warp is done with K(k0)
		if (k0 + FA_BN <= kmax) {
			fa_load_tile<D>(sk, table, bs, 0, k0 + FA_BN, kmax, kv_heads, kvh);
			tc_commit();
		}
		if (active) {
#pragma unroll
			for (int k = 0; k < FA_BN / 16; k++) {
				u32 pa[4];
				pa[0] = tc_pack(s[2 * k][0], s[2 * k][1]);
				pa[1] = tc_pack(s[2 * k][2], s[2 * k][3]);
				pa[2] = tc_pack(s[2 * k + 1][0], s[2 * k + 1][1]);
				pa[3] = tc_pack(s[2 * k + 1][2], s[2 * k + 1][3]);
#pragma unroll
				for (int dp = 0; dp < D / 16; dp++) {
					u32 b0, b1, b2, b3;
					tc_ldsm4_t(svb + voff + k * 16 * RB + dp * 32, b0, b1, b2, b3);
					tc_mma(o[2 * dp], pa, b0, b1);
					tc_mma(o[2 * dp + 1], pa, b2, b3);
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

// ---------------------------------------------------------------------------------------------------
// attention_decode: decode attention for a batch of queries, each of its own sequence (or of the same one),
// over the paged KV cache (attention.cu: rows of KV_ROW words, kv_key), on tensor cores, with the keys split
// over the blocks by the total work.
//
// Work. Query t's visible keys [from, p] (the attention kernel's window) are cut into tiles of AD_TK keys
// counted from `from`; a segment is one (query, kv head) pair, c_t tiles long (all kv heads of a query see
// the same keys). The launch's W = kv_heads · Σ c_t tiles, in the order (t, kv head, tile), are dealt to
// B = min(gridDim.x, W / max(minb, AD_MINT)) blocks as contiguous ranges of ⌊W/B⌋ or ⌈W/B⌉ tiles (blocks
// past B return at once), so every block reads the same number of K/V bytes whatever the mix of short and
// long sequences, and a 128 k-token context is read by every block of the grid. minb (the host's
// decodeMinTiles) keeps a short batch's pieces long: a cut segment's pieces are merged one after another
// by one block, so 64 pieces of 4 tiles cost more than reading them (1×4096 on an H100: 82 µs against
// attention_split's 29 µs). A block boundary that falls
// inside a short segment (at most AD_MINT tiles) moves back to the segment's start: short segments are
// never cut, so their results do not depend on the rest of the batch. The grid depends only on the
// shapes: every block computes W and the ranges from the rows it reads (device memory), so a recorded
// decode step replays at any context lengths.
//
// A block (4 warps) walks its range tile by tile through an AD_ST-stage cp.async pipeline that runs across
// segment boundaries. For each tile, every warp computes Sᵀ = K·Qᵀ (16 keys × 8 query heads: the mma's M is
// the keys, its N the G ≤ 8 query heads of the kv head, so no tensor-core rows are wasted on padding
// heads), the online softmax per head in float32 (log2 units), and Oᵀ += Vᵀ·Pᵀ for its quarter of the
// head dimension (the warps share the softmax: they compute the same S, bit for bit). q and P enter the
// mma as bf16 hi + lo pairs when q is float32 (decode keeps float32 activations), so the products keep
// about 16 bits; a bf16 q is exact and P is then rounded to bf16, as in attention_flash.
//
// A segment whole inside a block is normalised and stored. A cut segment's pieces write their partial
// (m, l, unnormalised O) to the block's slot in part (2 slots a block: its first and its last segment,
// ss floats each: [G][D] O, then [G] (m, l)); the block that finishes a segment's last piece (a counter per
// segment, cnt: zero at launch) merges the pieces in block order with the log-sum-exp rule and stores the
// result. Every reduction has a fixed order, so a launch's results depend only on its inputs and grid.
#define AD_WARPS 4
#define AD_TK 16    // keys per tile: the unit of the split and of the pipeline
#define AD_ST 4     // pipeline stages
#define AD_MAXT 512 // queries per launch (the prefix sums live in shared memory)
#define AD_MINT 4   // segments of at most AD_MINT tiles are never cut, and no block takes fewer (minb)
#define AD_MAXG 8   // query heads per kv head (the mma's N)
#define AD_MAXD 128
#define AD_STAGE (AD_TK * (AD_MAXD + FA_PAD)) // bf16 elements of one stage's K (or V) tile
#define AD_MU 4     // pieces whose partial sums the merge loads at once
#define AD_WCH 64   // pieces whose merge weights sit in shared memory at once

// ad_row is what a block needs of query t's row: its cache's block table and block size, its window [from,
// p] and the window's tiles c.
struct ad_row {
	const long long* table;
	int bs, from, p, c;
};

__device__ __forceinline__ ad_row ad_load_row(const long long* rows, int t, int chunk) {
	const long long* r = rows + KV_ROW * t;
	ad_row a;
	a.table = (const long long*)r[0];
	a.bs = (int)r[1];
	int first_kept = (int)r[2];
	a.p = (int)r[3];
	int from = chunk > 0 ? a.p - a.p % chunk : 0;
	a.from = from < first_kept ? first_kept : from;
	a.c = (a.p - a.from + AD_TK) / AD_TK; // ceil((p - from + 1) / AD_TK)
	return a;
}

// ad_cur is a position in the launch's tile order: query t, kv head kvh, tile of the segment, and t's row.
struct ad_cur {
	int t, kvh, tile;
	ad_row r;
};

// ad_find returns the query whose segments hold tile x: the last t with kv_heads·pref[t] <= x.
__device__ __forceinline__ int ad_find(const int* pref, int T, int kv_heads, long long x) {
	int lo = 0, hi = T - 1;
	while (lo < hi) {
		int mid = (lo + hi + 1) >> 1;
		if ((long long)kv_heads * pref[mid] <= x) lo = mid;
		else hi = mid - 1;
	}
	return lo;
}

// ad_snap returns the start of the block range at ideal boundary x (< W): x, or the start of x's segment
// when that segment is short (never cut).
__device__ __forceinline__ long long ad_snap(const int* pref, int T, int kv_heads, long long x, long long W) {
	if (x >= W) return W;
	int t = ad_find(pref, T, kv_heads, x);
	int c = pref[t + 1] - pref[t];
	long long s0 = (long long)kv_heads * pref[t];
	long long seg = s0 + (x - s0) / c * c;
	return c <= AD_MINT ? seg : x;
}

__device__ __forceinline__ ad_cur ad_at(const long long* rows, const int* pref, int T, int kv_heads, int chunk, long long x) {
	ad_cur a;
	a.t = ad_find(pref, T, kv_heads, x);
	int c = pref[a.t + 1] - pref[a.t];
	long long off = x - (long long)kv_heads * pref[a.t];
	a.kvh = (int)(off / c);
	a.tile = (int)(off - (long long)a.kvh * c);
	a.r = ad_load_row(rows, a.t, chunk);
	return a;
}

// ad_next moves a to the next tile of the order (reading the next query's row when it gets there).
__device__ __forceinline__ void ad_next(ad_cur& a, const long long* rows, int T, int kv_heads, int chunk) {
	if (++a.tile < a.r.c) return;
	a.tile = 0;
	if (++a.kvh < kv_heads) return;
	a.kvh = 0;
	if (++a.t < T) a.r = ad_load_row(rows, a.t, chunk);
}

// ad_addr returns, for each of this thread's 16-byte chunks of a tile (x = threadIdx.x + 128·j: key x / CH,
// chunk x % CH of the row), the address of its key's K row chunk, or null for keys past the window and
// chunks past the tile. It reads the block table; the addresses are used an iteration later, so the
// table's latency hides behind a tile's compute.
template <int D>
__device__ __forceinline__ void ad_addr(const ad_cur& a, int kv_heads, const bf16_t** addr) {
	const int CH = D / 8, NJ = (AD_TK * CH + AD_WARPS * 32 - 1) / (AD_WARPS * 32);
	long long stride = (long long)kv_heads * D;
	int k0 = a.r.from + AD_TK * a.tile;
#pragma unroll
	for (int j = 0; j < NJ; j++) {
		int x = threadIdx.x + j * AD_WARPS * 32;
		int key = k0 + x / CH;
		addr[j] = x < AD_TK * CH && key <= a.r.p ? kv_key(a.r.table, a.r.bs, key, stride) + (long long)a.kvh * D + (x % CH) * 8 : 0;
	}
}

// ad_load issues the cp.async copies of one tile's K and V (V rows bs·stride after K's) into a stage; keys
// past the window are zero-filled (their blocks may not exist; masked scores still multiply V).
template <int D>
__device__ __forceinline__ void ad_load(bf16_t* dk, bf16_t* dv, const bf16_t* const* addr, int bs, long long stride) {
	const int CH = D / 8, NJ = (AD_TK * CH + AD_WARPS * 32 - 1) / (AD_WARPS * 32);
#pragma unroll
	for (int j = 0; j < NJ; j++) {
		int x = threadIdx.x + j * AD_WARPS * 32;
		if (x < AD_TK * CH) {
			int off = (x / CH) * (D + FA_PAD) + (x % CH) * 8;
			unsigned sk = tc_smem(dk + off), sv = tc_smem(dv + off);
			if (addr[j]) {
				tc_cp16(sk, addr[j]);
				tc_cp16(sv, addr[j] + (long long)bs * stride);
			} else {
				tc_zero16(sk);
				tc_zero16(sv);
			}
		}
	}
}

__device__ __forceinline__ float ad_lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float ad_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

// ad_half returns the bf16 in half h (0: low) of v, in the low half.
__device__ __forceinline__ u32 ad_half(u32 v, int h) { return h ? v >> 16 : v & 0xffffu; }

// ad_transpose turns Pᵀ's accumulator layout (this lane: keys g and g+8, heads 2c and 2c+1, packed as u01 =
// key g and u23 = key g+8, head 2c in the low half) into the mma's B operand (keys 2c, 2c+1 and 2c+8, 2c+9 of
// head g), by shuffles.
__device__ __forceinline__ void ad_transpose(u32 u01, u32 u23, int g, int c, u32& b0, u32& b1) {
	int sa = 8 * c + (g >> 1), sb = sa + 4, h = g & 1;
	u32 a01 = __shfl_sync(0xffffffffu, u01, sa), b01 = __shfl_sync(0xffffffffu, u01, sb);
	u32 a23 = __shfl_sync(0xffffffffu, u23, sa), b23 = __shfl_sync(0xffffffffu, u23, sb);
	b0 = ad_half(a01, h) | (ad_half(b01, h) << 16);
	b1 = ad_half(a23, h) | (ad_half(b23, h) << 16);
}

// ad_merge is the merge of a cut segment by the block that finished its last piece: the np pieces' partials
// (the first in block bf's first slot when f0, else its last slot; piece k in the first slot of block bf + k)
// combined in piece order with the log-sum-exp rule and stored, normalised, at out + obase ([G][D]).
// It is rare (a segment end) and needs a few dozen registers of its own, so it stays out of line.
template <int D>
__device__ __noinline__ void ad_merge(const float* part, int ss, int bf, int np, int f0, int G, void* out, int odt,
	long long obase, float* sml, float* sw) {
	int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
	__threadfence();
	// Piece k's slot: block bf's first or last segment, then the first segment of bf + k.
	const float* ps = part + (long long)(f0 ? 2 * bf : 2 * bf + 1) * ss;
	const float* pk = part + (long long)(2 * bf + 2) * ss; // piece 1; piece k at pk + 2(k-1)ss
	for (int h = warp; h < G; h += AD_WARPS) {
		float mx = NEG_INF;
		for (int k = lane; k < np; k += 32) {
			const float* sp = k == 0 ? ps : pk + (long long)(k - 1) * 2 * ss;
			mx = fmaxf(mx, fa_ldcg(sp + G * D + 2 * h));
		}
#pragma unroll
		for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
		float ls = 0.0f;
		for (int k = lane; k < np; k += 32) {
			const float* sp = k == 0 ? ps : pk + (long long)(k - 1) * 2 * ss;
			ls += fa_ldcg(sp + G * D + 2 * h + 1) * exp2f(fa_ldcg(sp + G * D + 2 * h) - mx);
		}
		ls = warp_sum(ls);
		if (lane == 0) {
			sml[2 * h] = mx;
			sml[2 * h + 1] = ls;
		}
	}
	__syncthreads();
	// Σ_k O_k·2^(m_k − M), in piece order, for this thread's elements e = tid + 128·j of the
	// segment's [G][D]: the weights of AD_WCH pieces at a time in shared memory, the sums of
	// AD_MU pieces loaded before any is used.
	const int EPT = AD_MAXG * D / (AD_WARPS * 32);
	float acc[EPT];
#pragma unroll
	for (int j = 0; j < EPT; j++) acc[j] = 0.0f;
	for (int c0 = 0; c0 < np; c0 += AD_WCH) {
		int nc = np - c0 < AD_WCH ? np - c0 : AD_WCH;
		__syncthreads(); // the previous chunk's weights are used up
		for (int x = tid; x < nc * G; x += AD_WARPS * 32) {
			int k = c0 + x / G, h = x % G;
			const float* sp = k == 0 ? ps : pk + (long long)(k - 1) * 2 * ss;
			sw[x] = exp2f(fa_ldcg(sp + G * D + 2 * h) - sml[2 * h]);
		}
		__syncthreads();
		for (int k0 = 0; k0 < nc; k0 += AD_MU) {
			float a[AD_MU][EPT];
#pragma unroll
			for (int u = 0; u < AD_MU; u++) {
				int k = c0 + k0 + u;
				const float* sp = k == 0 ? ps : pk + (long long)(k - 1) * 2 * ss;
#pragma unroll
				for (int j = 0; j < EPT; j++) {
					int e = tid + j * AD_WARPS * 32;
					a[u][j] = k0 + u < nc && e < G * D ? fa_ldcg(sp + e) : 0.0f;
				}
			}
#pragma unroll
			for (int u = 0; u < AD_MU; u++)
#pragma unroll
				for (int j = 0; j < EPT; j++) {
					int e = tid + j * AD_WARPS * 32;
					if (k0 + u < nc && e < G * D) acc[j] += a[u][j] * sw[(k0 + u) * G + e / D];
				}
		}
	}
#pragma unroll
	for (int j = 0; j < EPT; j++) {
		int e = tid + j * AD_WARPS * 32;
		if (e < G * D) st(out, odt, obase + e, acc[j] / sml[2 * (e / D) + 1]);
	}
}

template <int D>
__device__ __forceinline__ void ad_body(const void* q, int qdt, const long long* rows, int* cnt, int T, int t0,
	float* part, int ss, void* out, int odt, int heads, int kv_heads, int chunk, float scale, int minb,
	bf16_t* sk, bf16_t* sv, u32* sq, int* pref, int* sred, float* sml, float* sw) {
	const int RB = (D + FA_PAD) * 2;                   // bytes per shared row
	const int KS = D / 16;                             // k-steps of Sᵀ = K·Qᵀ (and m-tiles of Oᵀ)
	const int MTW = KS >= AD_WARPS ? KS / AD_WARPS : 1; // m-tiles of Oᵀ (16 dims) per warp
	const int NJ = (AD_TK * (D / 8) + AD_WARPS * 32 - 1) / (AD_WARPS * 32);
	int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
	int G = heads / kv_heads;
	int mt0 = warp * MTW;
	bool pv = mt0 < KS; // warps past the head dimension (D < 64) only help load and compute S
	bool qf32 = qdt == DT_F32;
	long long stride = (long long)kv_heads * D;

	// Tiles per query (per kv head) and their exclusive prefix sums pref[0..T]: 4 queries a thread, a
	// warp scan, the warps' totals.
	{
		int loc[4], sum = 0;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int t = 4 * tid + i;
			loc[i] = sum;
			sum += t < T ? ad_load_row(rows, t, chunk).c : 0;
		}
		int inc = sum;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			int v = __shfl_sync(0xffffffffu, inc, (lane - o) & 31);
			if (lane >= o) inc += v;
		}
		if (lane == 31) sred[warp] = inc;
		__syncthreads();
		int ex = inc - sum;
		for (int w = 0; w < warp; w++) ex += sred[w];
#pragma unroll
		for (int i = 0; i < 4; i++)
			if (4 * tid + i < T) pref[4 * tid + i] = ex + loc[i];
		if (tid == AD_WARPS * 32 - 1) pref[T] = ex + sum;
		__syncthreads();
	}
	long long W = (long long)kv_heads * pref[T];
	long long nb = W / (minb > AD_MINT ? minb : AD_MINT);
	int B = nb < 1 ? 1 : (nb < (long long)gridDim.x ? (int)nb : (int)gridDim.x);
	int b = blockIdx.x;
	if (b >= B) return;
	long long lo = ad_snap(pref, T, kv_heads, (long long)b * W / B, W);
	long long hi = ad_snap(pref, T, kv_heads, (long long)(b + 1) * W / B, W);
	long long n = hi - lo;

	// The loader runs AD_ST - 1 tiles ahead of the compute; addr holds the next tile's chunk addresses.
	ad_cur L = ad_at(rows, pref, T, kv_heads, chunk, lo), C = L;
	const bf16_t* addr[NJ];
	for (int s = 0; s < AD_ST - 1; s++) {
		if (s < n) {
			ad_addr<D>(L, kv_heads, addr);
			ad_load<D>(sk + s * AD_STAGE, sv + s * AD_STAGE, addr, L.r.bs, stride);
			ad_next(L, rows, T, kv_heads, chunk);
		}
		tc_commit();
	}
	int lbs = L.r.bs;
	if (AD_ST - 1 < n) ad_addr<D>(L, kv_heads, addr);

	// Per-lane ldmatrix byte offsets within a stage. K as the A operand (no trans): matrix i = lane/8 holds
	// keys 8·(i%2).. and dims 8·(i/2)..; V as Vᵀ (trans): keys 8·(i/2).., dims 8·(i%2)...
	int koff = ((lane & 7) + ((lane >> 3) & 1) * 8) * RB + (lane >> 4) * 16;
	int voff = ((lane & 7) + (lane >> 4) * 8) * RB + ((lane >> 3) & 1) * 16;
	const float sl2 = scale * 1.4426950408889634f;

	// Qᵀ as B operands, this lane's words of k-step k at sq[4(32k + lane)]: dims 16k+2c.. and 16k+2c+8.. of
	// head g, hi, then lo. They live in shared memory, not registers (32 of them at D = 128), which the tile
	// loop needs: every warp writes the same words (the same q, the same code) after the loop's barrier.
	float m[2], l[2], o[MTW][4];
	int piece0 = C.tile; // the current piece's first tile
	bool first = true;   // the compute is in the block's first segment
	int stage = 0;       // tile i's stage (i % AD_ST); tile i + AD_ST - 1 loads into the previous one
	for (long long i = 0; i < n; i++, stage = stage == AD_ST - 1 ? 0 : stage + 1) {
		tc_wait<AD_ST - 2>();
		__syncthreads(); // tile i is in place; every warp is done with tile i - 1, whose stage is reloaded now
		if (i + AD_ST - 1 < n) {
			int s = stage == 0 ? AD_ST - 1 : stage - 1;
			ad_load<D>(sk + s * AD_STAGE, sv + s * AD_STAGE, addr, lbs, stride);
			ad_next(L, rows, T, kv_heads, chunk);
			lbs = L.r.bs;
			if (i + AD_ST < n) ad_addr<D>(L, kv_heads, addr);
		}
		tc_commit();

		if (C.tile == piece0) { // a piece starts: its query's q, a fresh softmax
			long long qrow = ((long long)(t0 + C.t) * heads + (long long)C.kvh * G + g) * D;
#pragma unroll
			for (int k = 0; k < KS; k++) {
				int d = 16 * k + 2 * c;
				float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f;
				if (g < G) {
					x0 = ld(q, qdt, qrow + d);
					x1 = ld(q, qdt, qrow + d + 1);
					x2 = ld(q, qdt, qrow + d + 8);
					x3 = ld(q, qdt, qrow + d + 9);
				}
				u32* qs = sq + 4 * (32 * k + lane);
				u32 h0 = tc_pack(x0, x1), h1 = tc_pack(x2, x3);
				qs[0] = h0;
				qs[1] = h1;
				qs[2] = tc_pack(x0 - ad_lo(h0), x1 - ad_hi(h0));
				qs[3] = tc_pack(x2 - ad_lo(h1), x3 - ad_hi(h1));
			}
			__syncwarp();
			m[0] = m[1] = NEG_INF;
			l[0] = l[1] = 0.0f;
#pragma unroll
			for (int j = 0; j < MTW; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
		}

		unsigned kb = tc_smem(sk + stage * AD_STAGE), vb = tc_smem(sv + stage * AD_STAGE);
		// Sᵀ: s0,s1 key g, heads 2c, 2c+1; s2,s3 key g+8. The hi and lo products accumulate apart.
		float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sl[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
		for (int k = 0; k < KS; k++) {
			u32 a[4];
			tc_ldsm4(kb + koff + k * 32, a[0], a[1], a[2], a[3]);
			const u32* qs = sq + 4 * (32 * k + lane);
			tc_mma(s, a, qs[0], qs[1]);
			if (qf32) tc_mma(sl, a, qs[2], qs[3]);
		}
		int k0 = C.r.from + AD_TK * C.tile;
		bool v0 = k0 + g <= C.r.p, v1 = k0 + g + 8 <= C.r.p;
		float x[4];
#pragma unroll
		for (int e = 0; e < 4; e++) x[e] = ((e < 2 ? v0 : v1) ? (s[e] + sl[e]) * sl2 : NEG_INF);
		// Online softmax per head j (2c + j): the max over the tile's 16 keys (lanes of the same c), and
		// key 0 of a tile is always visible, so it is finite.
#pragma unroll
		for (int j = 0; j < 2; j++) {
			float mx = fmaxf(x[j], x[2 + j]);
			mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
			mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
			mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
			float mn = fmaxf(m[j], mx);
			float corr = m[j] == NEG_INF ? 0.0f : exp2f(m[j] - mn);
			float p0 = exp2f(x[j] - mn), p1 = exp2f(x[2 + j] - mn);
			l[j] = l[j] * corr + (p0 + p1);
			m[j] = mn;
			x[j] = p0;
			x[2 + j] = p1;
#pragma unroll
			for (int jj = 0; jj < MTW; jj++) {
				o[jj][j] *= corr;
				o[jj][2 + j] *= corr;
			}
		}
		if (pv) {
			u32 h01 = tc_pack(x[0], x[1]), h23 = tc_pack(x[2], x[3]);
			u32 bh0, bh1, bl0 = 0, bl1 = 0;
			ad_transpose(h01, h23, g, c, bh0, bh1);
			if (qf32) {
				u32 l01 = tc_pack(x[0] - ad_lo(h01), x[1] - ad_hi(h01)), l23 = tc_pack(x[2] - ad_lo(h23), x[3] - ad_hi(h23));
				ad_transpose(l01, l23, g, c, bl0, bl1);
			}
#pragma unroll
			for (int j = 0; j < MTW; j++) {
				u32 a[4];
				tc_ldsm4_t(vb + voff + (mt0 + j) * 32, a[0], a[1], a[2], a[3]);
				tc_mma(o[j], a, bh0, bh1);
				if (qf32) tc_mma(o[j], a, bl0, bl1);
			}
		}

		bool last = C.tile == C.r.c - 1 || i == n - 1;
		if (last) {
			float Ls[2];
#pragma unroll
			for (int j = 0; j < 2; j++) {
				float v = l[j];
				v += __shfl_xor_sync(0xffffffffu, v, 4);
				v += __shfl_xor_sync(0xffffffffu, v, 8);
				v += __shfl_xor_sync(0xffffffffu, v, 16);
				Ls[j] = v;
			}
			long long obase = ((long long)(t0 + C.t) * heads + (long long)C.kvh * G) * D; // [G][D] of this segment
			if (piece0 == 0 && C.tile == C.r.c - 1) { // the whole segment: normalise and store
				if (pv) {
#pragma unroll
					for (int j = 0; j < MTW; j++)
#pragma unroll
						for (int e = 0; e < 4; e++) {
							int h = 2 * c + (e & 1), d = 16 * (mt0 + j) + g + 8 * (e >> 1);
							if (h < G) st(out, odt, obase + (long long)h * D + d, o[j][e] / Ls[e & 1]);
						}
				}
			} else { // a piece: its partial into the block's slot, then the last piece's block merges
				float* slot = part + (long long)(2 * b + (first ? 0 : 1)) * ss;
				if (pv) {
#pragma unroll
					for (int j = 0; j < MTW; j++)
#pragma unroll
						for (int e = 0; e < 4; e++) {
							int h = 2 * c + (e & 1), d = 16 * (mt0 + j) + g + 8 * (e >> 1);
							if (h < G) slot[h * D + d] = o[j][e];
						}
				}
				if (warp == 0 && g == 0) {
#pragma unroll
					for (int j = 0; j < 2; j++)
						if (2 * c + j < G) {
							slot[G * D + 2 * (2 * c + j)] = m[j];
							slot[G * D + 2 * (2 * c + j) + 1] = Ls[j];
						}
				}
				__threadfence();
				__syncthreads();
				if (tid == 0) {
					long long P0 = (long long)kv_heads * pref[C.t] + (long long)C.kvh * C.r.c; // the segment's first tile
					int bf = (int)(((P0 + 1) * B - 1) / W), bl = (int)(((P0 + C.r.c) * B - 1) / W);
					int done = atomicAdd(&cnt[C.t * kv_heads + C.kvh], 1);
					sred[0] = done == bl - bf;
					sred[1] = bf;
					sred[2] = bl - bf + 1;
					sred[3] = (long long)bf * W / B == P0; // the segment is block bf's first
				}
				__syncthreads();
				if (sred[0]) // the last piece: merge (out of line, so its registers do not weigh on the tile loop)
					ad_merge<D>(part, ss, sred[1], sred[2], sred[3], G, out, odt, obase, sml, sw);
			}
			first = false;
			piece0 = 0;
		}
		ad_next(C, rows, T, kv_heads, chunk);
	}
	tc_wait_all();
}

// attention_decode: see above. q [t0 + T, heads, D] (bf16 or float32; rows t0.. are this launch's), rows
// [T][KV_ROW] (the queries' caches and positions), cnt [T·kv_heads] zeroed ints, part [2·gridDim.x][ss]
// floats (ss >= G·(D + 2)), out like q, minb the fewest tiles a block takes (AD_MINT at least). Block 128
// threads; T <= AD_MAXT, G = heads / kv_heads <= AD_MAXG, D 16, 32, 64 or 128.
extern "C" __global__ void __launch_bounds__(AD_WARPS * 32, 4)
attention_decode(const void* q, int qdt, const long long* rows, int* cnt, int T, int t0, float* part, int ss,
	void* out, int odt, int heads, int kv_heads, int D, int chunk, float scale, int minb) {
	PDL_PROLOGUE();
	__shared__ __attribute__((aligned(16))) bf16_t sk[AD_ST * AD_STAGE];
	__shared__ __attribute__((aligned(16))) bf16_t sv[AD_ST * AD_STAGE];
	__shared__ int pref[AD_MAXT + 1];
	__shared__ int sred[AD_WARPS];
	__shared__ float sml[2 * AD_MAXG];
	__shared__ float sw[AD_WCH * AD_MAXG];
	__shared__ __attribute__((aligned(16))) u32 sq[4 * 32 * (AD_MAXD / 16)];
	switch (D) {
	case 128: ad_body<128>(q, qdt, rows, cnt, T, t0, part, ss, out, odt, heads, kv_heads, chunk, scale, minb, sk, sv, sq, pref, sred, sml, sw); break;
	case 64: ad_body<64>(q, qdt, rows, cnt, T, t0, part, ss, out, odt, heads, kv_heads, chunk, scale, minb, sk, sv, sq, pref, sred, sml, sw); break;
	case 32: ad_body<32>(q, qdt, rows, cnt, T, t0, part, ss, out, odt, heads, kv_heads, chunk, scale, minb, sk, sv, sq, pref, sred, sml, sw); break;
	default: ad_body<16>(q, qdt, rows, cnt, T, t0, part, ss, out, odt, heads, kv_heads, chunk, scale, minb, sk, sv, sq, pref, sred, sml, sw); break;
	}
}
