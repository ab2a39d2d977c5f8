// grouped.cu: the routed experts of a prefill as two grouped GEMMs on the tensor cores (mma.sync
// m16n8k16, bf16 operands, float32 accumulation), over every active expert in one launch each, reading
// the expert plan moe_plan left in device memory (no host round trip, so no synchronisation per layer):
//
//   grouped_gate_up: act[r] = silu(s·g) ⊙ (s·u), [g | u] = x[perm[r] / k] · gu[e], s = scores[perm[r]],
//     for every permuted row r of every local expert e (gu [E, H, 2I] input-major, gate columns then
//     up). The token rows are gathered by index in the tile loader (no expert_gather pass) and SiLU·mul
//     is the epilogue (no float32 [rows, 2I] and no expert_act pass): act is bf16 [rows, I], rows in
//     moe_plan's packed order (align 1).
//   grouped_down: y[r] = act[r] · down[e] (down [E, I, H]). With top-k 1 the epilogue is the combine:
//     out[t] = y[row_of[t]] (+ add[t]), written straight to the token's row (grouped_fill writes the
//     tokens whose expert is elsewhere); with top-k > 1 it writes y [rows, H] float32 and expert_combine
//     sums each token's slots in routing order, as before (deterministic: no atomics anywhere).
//
// Router score. The unfused path multiplies x by the score and rounds to bf16 before its GEMM
// (expert_gather); here the score multiplies the float32 products of the unscaled row (x·W is linear,
// so s·(x·W) = (x·s)·W): one rounding fewer, nearer the cpu backend's float32 math. act is rounded to
// bf16 at the same point as expert_act's (silu in float32, one rounding of the product).
//
// Tiles. A block computes GG_BM = 128 rows × GG_BN = 256 columns with 8 warps (2 along M × 4 along N,
// 64 × 64 each: 4 m16 × 8 n8 accumulators, 128 floats a thread), stepping K by GG_BK = 32 through a
// GG_STAGES = 4 stage cp.async pipeline (A 128 × 40 and B 32 × 264 bf16 a stage, rows padded by 8 so
// that ldmatrix reads 8 rows on 8 different bank groups; 106 KiB of dynamic shared memory, above the
// default 48 KiB: the host raises the function's limit). In grouped_gate_up the 256 B columns are 128
// gate channels then the same 128 up channels, and warp n covers gate channels 32n..32n+31 and the same
// up channels, so every thread holds the gate and the up product of its channels and the epilogue needs
// no exchange. A's rows: thread t copies 16-byte chunk t%4 of tile rows t/4 and t/4 + 64, from the token
// row perm[r]/k of x (gate_up) or row r of act (down); rows past the expert's count are not copied
// (what shared memory holds there only reaches output rows that are not stored). K past its end is
// zero-filled in both operands; B columns past N are not copied (their outputs are not stored).
//
// Schedule. grid.x counts (expert, 128-row tile) pairs over the active experts in order (meta[0] of
// them in active[], seg[2e+1] rows each): at most ceil(R/128) + min(E, R) for R routing slots, so the
// host sizes the grid without knowing the counts, and blocks past the last tile exit at once. grid.y
// is the column tile. Blocks run x-fastest: the row tiles of one expert and column tile are neighbours,
// so a weight tile comes from DRAM once and from L2 for the expert's other row tiles; the tokens' rows
// (x: T·H bf16) stay in L2 across column tiles. Each warp maps its block's x to the tile with a
// shuffle prefix sum over the experts, 32 at a time (all warps compute the same answer). An m16 row
// slice with no valid row skips its ldmatrix and mma (warp-uniform), so an expert's partial last tile
// costs tensor time in proportion to its rows, to 16.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16; g = lane/4, c = lane%4; as flash.cu):
//   A 16×16 row-major: a0 (row g, k 2c..2c+1), a1 (row g+8), a2 (row g, k 2c+8..), a3 (row g+8, k 2c+8..),
//     by ldmatrix.x4 from A's shared rows (K contiguous): matrix i = lane/8 is rows 8(i%2).., k 8(i/2)...
//   B 16×8: b0 (k 2c..2c+1, n g), b1 (k 2c+8..), by ldmatrix.x4.trans from B's shared rows (N
//     contiguous): matrix i is k rows 8(i%2).., columns 8(i/2)..: b0, b1 of n tile j, then of j+1.
//   C/D 16×8 float: d0, d1 (row g, n 2c, 2c+1), d2, d3 (row g+8).
//
// A unit of its own (kernels/units.txt): it uses only the prelude. The host's groupedSmem and
// groupedBM/BN (backend/cuda/grouped.go) mirror GG_SMEM and GG_BM/GG_BN.

#define GG_BM 128
#define GG_BN 256
#define GG_BK 32
#define GG_STAGES 4
#define GG_THREADS 256
#define GG_AS (GG_BK + 8)                 // bf16 per shared A row
#define GG_BS (GG_BN + 8)                 // bf16 per shared B row
#define GG_A_STAGE (GG_BM * GG_AS)        // bf16 per A stage
#define GG_B_STAGE (GG_BK * GG_BS)        // bf16 per B stage
#define GG_SMEM (2 * GG_STAGES * (GG_A_STAGE + GG_B_STAGE)) // dynamic shared bytes: 108544

struct alignas(8) gg_f32x2 {
	float x, y;
};

__device__ __forceinline__ unsigned gg_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

#ifdef TPF_EMU
// The SIMT emulator (scripts/gpu/emu/emu.h) stands in for the PTX with flash.cu's helpers.
__device__ __forceinline__ void gg_cp16(unsigned dst, const void* src) { fa_cp16(dst, src); }
__device__ __forceinline__ unsigned long long gg_stream_policy() { return 0; }
__device__ __forceinline__ void gg_cp16_stream(unsigned dst, const void* src, unsigned long long) { fa_cp16(dst, src); }
__device__ __forceinline__ void gg_zero16(unsigned dst) { fa_zero16(dst); }
__device__ __forceinline__ void gg_commit() { fa_commit(); }
template <int N>
__device__ __forceinline__ void gg_wait() { fa_wait_pending<N>(); }
__device__ __forceinline__ void gg_ldsm(unsigned a, u32& r0, u32& r1, u32& r2, u32& r3) { fa_ldmatrix_x4(a, r0, r1, r2, r3); }
__device__ __forceinline__ void gg_ldsm_t(unsigned a, u32& r0, u32& r1, u32& r2, u32& r3) { fa_ldmatrix_x4_trans(a, r0, r1, r2, r3); }
__device__ __forceinline__ void gg_mma(float* d, const u32* a, u32 b0, u32 b1) { fa_mma(d, a, b0, b1); }
#else
__device__ __forceinline__ void gg_cp16(unsigned dst, const void* src) {
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// gg_stream_policy is an L2 policy that makes the lines a copy brings in the first to be evicted: for the
// weights, which a block streams once (its neighbours with the same expert and columns read them at about
// the same time), so that they do not push the tokens' rows (read again for every column tile) out of L2.
__device__ __forceinline__ unsigned long long gg_stream_policy() {
	unsigned long long p;
	asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
	return p;
}
// gg_cp16_stream is gg_cp16 under L2 policy p.
__device__ __forceinline__ void gg_cp16_stream(unsigned dst, const void* src, unsigned long long p) {
	asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(p) : "memory");
}
__device__ __forceinline__ void gg_zero16(unsigned dst) {
	asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
}
__device__ __forceinline__ void gg_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// gg_wait waits until at most N of this thread's cp.async groups are in flight.
template <int N>
__device__ __forceinline__ void gg_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void gg_ldsm(unsigned a, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(a));
}
__device__ __forceinline__ void gg_ldsm_t(unsigned a, u32& r0, u32& r1, u32& r2, u32& r3) {
	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
		: "r"(a));
}
// gg_mma: d += a·b for one m16n8k16 tile.
__device__ __forceinline__ void gg_mma(float* d, const u32* a, u32 b0, u32 b1) {
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
		: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// gg_tile maps block tile x to its expert e, the expert's first permuted row of the tile r0 and the
// tile's rows (1..GG_BM): the active experts, in order, own ceil(seg[2e+1] / GG_BM) consecutive tiles
// each. False when x is past the last tile. A warp computes it (32 experts a pass: a shuffle prefix sum
// of their tile counts, then the one lane whose range holds x); every lane gets the same answer.
__device__ __forceinline__ bool gg_tile(const int* __restrict__ seg, const int* __restrict__ active, const int* __restrict__ meta,
	int x, int& e, int& r0, int& nrows) {
	int na = meta[0], lane = threadIdx.x & 31, base = 0;
	for (int i0 = 0; i0 < na; i0 += 32) {
		int i = i0 + lane;
		int ex = i < na ? active[i] : 0;
		int cnt = i < na ? seg[2 * ex + 1] : 0;
		int tiles = (cnt + GG_BM - 1) / GG_BM;
		int incl = tiles;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			int v = __shfl_sync(0xffffffffu, incl, lane >= o ? lane - o : 0);
			if (lane >= o) incl += v;
		}
		int total = __shfl_sync(0xffffffffu, incl, 31);
		if (x < base + total) { // uniform over the warp
			int mine = x >= base + incl - tiles && x < base + incl ? lane : -1; // one lane's range holds x
#pragma unroll
			for (int o = 16; o > 0; o >>= 1) {
				int v = __shfl_xor_sync(0xffffffffu, mine, o);
				mine = v > mine ? v : mine;
			}
			int j = x - base - __shfl_sync(0xffffffffu, incl - tiles, mine); // the tile within the expert
			e = __shfl_sync(0xffffffffu, ex, mine);
			int c = __shfl_sync(0xffffffffu, cnt, mine) - j * GG_BM;
			r0 = seg[2 * e] + j * GG_BM;
			nrows = c < GG_BM ? c : GG_BM;
			return true;
		}
		base += total;
	}
	return false;
}

// gg_step runs one GG_BK slice of a warp's 64 × 64 tile from a stage (ast: this lane's A ldmatrix address
// in it; bb[p] + bst: its B address for column pair p) on the warp's first MV m16 row slices. Every
// fragment of the slice is loaded before the first mma, so the loads overlap.
template <int MV>
__device__ __forceinline__ void gg_step(float (&acc)[4][8][4], unsigned ast, const unsigned (&bb)[4], unsigned bst) {
	u32 af[GG_BK / 16][MV][4], bfr[GG_BK / 16][8][2];
#pragma unroll
	for (int kk = 0; kk < GG_BK / 16; kk++) {
#pragma unroll
		for (int mi = 0; mi < MV; mi++) gg_ldsm(ast + (mi * 16 * GG_AS + kk * 16) * 2, af[kk][mi][0], af[kk][mi][1], af[kk][mi][2], af[kk][mi][3]);
#pragma unroll
		for (int p = 0; p < 4; p++)
			gg_ldsm_t(bb[p] + bst + kk * 16 * GG_BS * 2, bfr[kk][2 * p][0], bfr[kk][2 * p][1], bfr[kk][2 * p + 1][0], bfr[kk][2 * p + 1][1]);
	}
#pragma unroll
	for (int kk = 0; kk < GG_BK / 16; kk++)
#pragma unroll
		for (int mi = 0; mi < MV; mi++)
#pragma unroll
			for (int j = 0; j < 8; j++) gg_mma(acc[mi][j], af[kk][mi], bfr[kk][j][0], bfr[kk][j][1]);
}

// gg_body is both kernels: GATED, gate_up (a = x [T, K = H] gathered through perm, w [E, K, 2N] with
// N = I, act [rows, N] bf16); else down (a = act [rows, K = I], w [E, K, N] with N = H, into y [rows, N]
// float32 when y is not null, else into out's token rows as expert_combine would, top-k 1).
template <bool GATED>
__device__ __forceinline__ void gg_body(const bf16_t* __restrict__ a, const int* __restrict__ perm, const float* __restrict__ scores,
	int topk, const int* __restrict__ seg, const int* __restrict__ active, const int* __restrict__ meta, const bf16_t* __restrict__ w,
	int K, int N, bf16_t* __restrict__ act, float* __restrict__ y, void* __restrict__ out, int odt, const void* __restrict__ add, int adt) {
	extern __shared__ u32x4 gg_sh[];
	int e, r0, nrows;
	if (!gg_tile(seg, active, meta, blockIdx.x, e, r0, nrows)) return; // uniform over the block
	bf16_t* sa = (bf16_t*)gg_sh;
	bf16_t* sb = sa + GG_STAGES * GG_A_STAGE;
	const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
	const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, c = lane & 3;
	const long long ldw = GATED ? 2LL * N : (long long)N; // elements per weight row
	const bf16_t* we = w + (long long)e * K * ldw;

	// The A rows this thread copies (null: past the expert's rows), already at its 16-byte chunk.
	const int ac = tid & 3;
	const bf16_t* arow[2];
#pragma unroll
	for (int i = 0; i < 2; i++) {
		int r = (tid >> 2) + 64 * i;
		arow[i] = 0;
		if (r < nrows) {
			long long src = GATED ? (long long)(perm[r0 + r] / topk) : (long long)(r0 + r);
			arow[i] = a + src * K + ac * 8;
		}
	}
	// The B chunk this thread copies: 8 columns (chunk bc of the tile's 256) of K rows tid/32 + 8i.
	const int bc = tid & 31, bk = tid >> 5;
	int col;
	bool bok;
	if (GATED) {
		int ch = blockIdx.y * (GG_BN / 2) + (bc & 15) * 8;
		bok = ch < N;
		col = (bc < 16 ? 0 : N) + ch;
	} else {
		col = blockIdx.y * GG_BN + bc * 8;
		bok = col < N;
	}
	const bf16_t* bcol = we + col;
	const unsigned long long wpol = gg_stream_policy();
	const int nk = (K + GG_BK - 1) / GG_BK;

	// load issues the cp.async copies of K slice kt into stage st.
	auto load = [&](int st, int kt) {
		int k0 = kt * GG_BK;
		bf16_t* da = sa + st * GG_A_STAGE;
		bf16_t* db = sb + st * GG_B_STAGE;
		bool kin = k0 + ac * 8 < K;
#pragma unroll
		for (int i = 0; i < 2; i++) {
			if (!arow[i]) continue;
			unsigned d = gg_smem(da + ((tid >> 2) + 64 * i) * GG_AS + ac * 8);
			if (kin) gg_cp16(d, arow[i] + k0);
			else gg_zero16(d);
		}
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int kr = bk + 8 * i;
			unsigned d = gg_smem(db + kr * GG_BS + bc * 8);
			if (k0 + kr < K) {
				if (bok) gg_cp16_stream(d, bcol + (long long)(k0 + kr) * ldw, wpol);
			} else gg_zero16(d);
		}
	};

	float acc[4][8][4];
#pragma unroll
	for (int mi = 0; mi < 4; mi++)
#pragma unroll
		for (int j = 0; j < 8; j++) acc[mi][j][0] = acc[mi][j][1] = acc[mi][j][2] = acc[mi][j][3] = 0.0f;

	// Per-lane ldmatrix byte offsets within a stage (see the fragment layouts above).
	const int lr = (lane & 7) + ((lane >> 3) & 1) * 8, lc = (lane >> 4) * 8;
	const unsigned abase = gg_smem(sa) + ((wm * 64 + lr) * GG_AS + lc) * 2;
	unsigned bbase[4]; // the warp's column pairs p: n tiles 2p and 2p+1
#pragma unroll
	for (int p = 0; p < 4; p++) {
		int cb = GATED ? (p >> 1) * (GG_BN / 2) + wn * 32 + (p & 1) * 16 : wn * 64 + p * 16;
		bbase[p] = gg_smem(sb) + (lr * GG_BS + cb + lc) * 2;
	}

	// The warp's m16 row slices that hold a valid row: the others skip their ldmatrix and mma.
	int mv = (nrows - wm * 64 + 15) / 16;
	mv = mv < 0 ? 0 : mv > 4 ? 4 : mv;

#pragma unroll
	for (int s = 0; s < GG_STAGES - 1; s++) {
		if (s < nk) load(s, s);
		gg_commit();
	}
	for (int kt = 0; kt < nk; kt++) {
		gg_wait<GG_STAGES - 2>(); // slice kt has landed (for this thread's copies)
		__syncthreads();          // for every thread's; and every warp is done with slice kt - 1's stage
		int nt = kt + GG_STAGES - 1;
		if (nt < nk) load(nt % GG_STAGES, nt);
		gg_commit();
		int st = kt % GG_STAGES;
		unsigned ast = abase + st * GG_A_STAGE * 2, bst = st * GG_B_STAGE * 2;
		switch (mv) { // uniform over the warp; each case is one basic block, which ptxas schedules freely
		case 4: gg_step<4>(acc, ast, bbase, bst); break;
		case 3: gg_step<3>(acc, ast, bbase, bst); break;
		case 2: gg_step<2>(acc, ast, bbase, bst); break;
		case 1: gg_step<1>(acc, ast, bbase, bst); break;
		default: break;
		}
	}
	gg_wait<0>();

	// Epilogue: rows wm·64 + 16mi + g (+8), columns 2c, 2c+1 of each n8 tile.
#pragma unroll
	for (int mi = 0; mi < 4; mi++) {
#pragma unroll
		for (int h = 0; h < 2; h++) {
			int r = wm * 64 + mi * 16 + g + 8 * h;
			if (r >= nrows) continue;
			long long row = r0 + r;
			if (GATED) {
				float s = scores[perm[row]];
				bf16_t* dst = act + row * N;
#pragma unroll
				for (int j = 0; j < 4; j++) {
					int ch = blockIdx.y * (GG_BN / 2) + wn * 32 + j * 8 + 2 * c;
					if (ch >= N) continue;
					float g0 = acc[mi][j][2 * h] * s, g1 = acc[mi][j][2 * h + 1] * s;
					float u0 = acc[mi][j + 4][2 * h] * s, u1 = acc[mi][j + 4][2 * h + 1] * s;
					*(u32*)(dst + ch) = (u32)f32_to_bf16(silu(g0) * u0) | (u32)f32_to_bf16(silu(g1) * u1) << 16;
				}
			} else if (y) {
				float* dst = y + row * N;
#pragma unroll
				for (int j = 0; j < 8; j++) {
					int col = blockIdx.y * GG_BN + wn * 64 + j * 8 + 2 * c;
					if (col >= N) continue;
					gg_f32x2 v;
					v.x = acc[mi][j][2 * h];
					v.y = acc[mi][j][2 * h + 1];
					*(gg_f32x2*)(dst + col) = v;
				}
			} else {
				// expert_combine's arithmetic for a token's one slot: (0 + (0 + y)) + add.
				long long t = perm[row];
#pragma unroll
				for (int j = 0; j < 8; j++) {
					int col = blockIdx.y * GG_BN + wn * 64 + j * 8 + 2 * c;
					if (col >= N) continue;
#pragma unroll
					for (int u = 0; u < 2; u++) {
						long long i = t * N + col + u;
						float sum = 0.0f;
						sum += 0.0f + acc[mi][j][2 * h + u];
						if (add) sum += ld(add, adt, i);
						st(out, odt, i, sum);
					}
				}
			}
		}
	}
}

// grouped_gate_up: grid (tiles ≤ ceil(R/128) + min(E, R), ceil(I/128)), GG_THREADS threads, GG_SMEM bytes
// of dynamic shared memory. x [T, H] bf16 (H % 8 == 0, 16-byte aligned rows); gu [E, H, 2I] bf16
// (I % 8 == 0); act [rows, I] bf16.
extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)
grouped_gate_up(const bf16_t* x, const int* perm, const float* scores, int topk, const int* seg, const int* active,
	const int* meta, const bf16_t* gu, int H, int I, bf16_t* act) {
	PDL_PROLOGUE();
	gg_body<true>(x, perm, scores, topk, seg, active, meta, gu, H, I, act, 0, 0, 0, 0, 0);
}

// grouped_down: grid (tiles as grouped_gate_up's, ceil(H/256)), GG_THREADS threads, GG_SMEM bytes of
// dynamic shared memory. act [rows, I] bf16 (I % 8 == 0); down [E, I, H] bf16 (H % 8 == 0). y not null:
// y [rows, H] float32 for expert_combine; y null (top-k 1 only): out[t] = (0 + (0 + y)) + add[t] for each
// token t whose expert is held here, expert_combine's sum of one slot (grouped_fill writes the others).
extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)
grouped_down(const bf16_t* act, const int* perm, const int* seg, const int* active, const int* meta, const bf16_t* down,
	int I, int H, float* y, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	gg_body<false>(act, perm, 0, 1, seg, active, meta, down, I, H, 0, y, out, odt, add, adt);
}

// grouped_fill writes expert_combine's result for the tokens none of whose k slots has its expert held
// here (row_of < 0 for all): out[t] = 0 + add[t], or zeros without add. A block per token (grid-stride);
// tokens with a local slot are left to grouped_down.
extern "C" __global__ void grouped_fill(const int* row_of, int k, int T, int H, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	for (int t = blockIdx.x; t < T; t += gridDim.x) {
		bool local = false;
		for (int j = 0; j < k; j++) local |= row_of[(long long)t * k + j] >= 0;
		if (local) continue; // uniform over the block
		for (int h = threadIdx.x; h < H; h += blockDim.x) {
			long long i = (long long)t * H + h;
			float sum = 0.0f;
			if (add) sum += ld(add, adt, i);
			st(out, odt, i, sum);
		}
	}
}
