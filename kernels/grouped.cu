// grouped.cu: the routed experts of a prefill as two grouped GEMMs on the tensor cores, over every active
// expert in one launch each, reading the expert plan moe_plan left in device memory (no host round trip,
// so no synchronisation per layer), in two operand formats that share the tile schedule, the cp.async
// pipeline, the fragment loads and the epilogues (gg_body):
//
// bf16 (mma.sync m16n8k16, bf16 operands, float32 accumulation; backend/cuda FuseGrouped):
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
// fp8, W8A8 (E4M3 × E4M3 with float32 accumulation, FuseFP8Grouped; the MMA below): the fp8 format with
// dynamic activations (FbgemmFp8). Its operands are codes with one float32 scale a row: the activations'
// per token (fp8_act_codes, quant_fp8.cu: the gathered, score-scaled rows, and later the SwiGLU rows) and
// the weights' per output channel. The expert codes are output-major, [E, out, in] (backend/cuda fp8.go):
// an output channel's K codes are contiguous, the "col" B operand mma .row.col takes as it is.
//   grouped_fp8_gate_up: act[r] = silu(g) ⊙ u, g = sx[r]·sg[c]·Σ_k qx[r][k]·qg[c][k] (u likewise with the
//     up channel I + c), qx the codes of row r (already gathered and scaled by the router score, one row a
//     routing slot), act float32 [rows, I]: what expert_act gives from the FP8 GEMM's float32 [rows, 2I],
//     for fp8_act_codes to quantise again per token before down.
//   grouped_fp8_down: y[r] = sa[r]·sd[h]·Σ_i qa[r][i]·qd[h][i], into y [rows, H] or, at top-k 1, combined
//     into out as grouped_down does.
// Every product of two E4M3 values is exact in float32, so the sums are the reference's Σ (qx·sx)(qw·sw)
// but for the accumulation order and float32 rounding; the scales multiply once, acc·(sx·sw), as
// fp8_scale_out applies them.
//
// Router score (bf16). The unfused path multiplies x by the score and rounds to bf16 before its GEMM
// (expert_gather); here the score multiplies the float32 products of the unscaled row (x·W is linear,
// so s·(x·W) = (x·s)·W): one rounding fewer, nearer the cpu backend's float32 math. act is rounded to
// bf16 at the same point as expert_act's (silu in float32, one rounding of the product). fp8 quantises
// the score-scaled row, as the cpu backend and the unfused fp8 path do (the scale depends on the score).
//
// Tiles. A block computes GG_BM = 128 rows × GG_BN = 256 columns with 8 warps (2 along M × 4 along N,
// 64 × 64 each: 4 m16 × 8 n8 accumulators, 128 floats a thread), stepping K by 64 bytes of a row (GG_BK =
// 32 bf16, or 64 codes) through a GG_STAGES = 4 stage cp.async pipeline. A stage's A is 128 rows of 80
// bytes in both formats (64 + 16 of padding, so that ldmatrix reads 8 rows on 8 different bank groups).
// B: bf16 32 k rows × 264 (106 KiB of dynamic shared memory in all, GG_SMEM); fp8 256 output channels ×
// 80 bytes (120 KiB, GF_SMEM). Both are above the default 48 KiB: the host raises the functions' limits.
// In the gate_up kernels the 256 B columns are 128 gate channels then the same 128 up channels, and warp
// n covers gate channels 32n..32n+31 and the same up channels, so every thread holds the gate and the up
// product of its channels and the epilogue needs no exchange. A's rows: thread t copies 16-byte chunk
// t%4 of tile rows t/4 and t/4 + 64, from the token row perm[r]/k of x (bf16 gate_up) or row r of the
// operand (the others); rows past the expert's count are not copied (what shared memory holds there only
// reaches output rows that are not stored). K past its end is zero-filled in both operands; B columns
// past N are not copied (their outputs are not stored). bf16 B: thread t copies 8-column chunk t%32 of k
// rows t/32 + 8i; fp8 B: 16-byte chunk t%4 of output channels t/4 + 64i (i < 4).
//
// Schedule. grid.x counts (expert, 128-row tile) pairs over the active experts in order (meta[0] of
// them in active[], seg[2e+1] rows each): at most ceil(R/128) + min(E, R) for R routing slots, so the
// host sizes the grid without knowing the counts, and blocks past the last tile exit at once. grid.y
// is the column tile. Blocks run x-fastest: the row tiles of one expert and column tile are neighbours,
// so a weight tile comes from DRAM once and from L2 for the expert's other row tiles; the tokens' rows
// stay in L2 across column tiles. Each warp maps its block's x to the tile with a shuffle prefix sum over
// the experts, 32 at a time (all warps compute the same answer). An m16 row slice with no valid row skips
// its ldmatrix and mma (warp-uniform), so an expert's partial last tile costs tensor time in proportion to
// its rows, to 16 (decode batches of 9 to 64 tokens, an expert's one or few rows, take the fp8 kernels too).
//
// Fragment layouts (PTX ISA; g = lane/4, c = lane%4; bf16 as flash.cu):
//   bf16 m16n8k16: A 16×16 row-major: a0 (row g, k 2c..2c+1), a1 (row g+8), a2 (row g, k 2c+8..), a3
//     (row g+8, k 2c+8..), by ldmatrix.x4 from A's shared rows (K contiguous): matrix i = lane/8 is rows
//     8(i%2).., k 8(i/2)... B 16×8: b0 (k 2c..2c+1, n g), b1 (k 2c+8..), by ldmatrix.x4.trans from B's
//     shared rows (N contiguous): matrix i is k rows 8(i%2).., columns 8(i/2)..: b0, b1 of n tile j, then
//     of j+1.
//   e4m3 m16n8k32 (byte b of a register holds the b-th of its 4 k): a0 (row g, k 4c..4c+3), a1 (row g+8), a2 (row
//     g, k 16+4c..), a3 (row g+8, k 16+4c..): ldmatrix.x4 (b16: a thread gets bytes 4c..4c+3 of its row)
//     over the same shared addresses as bf16's A, 32 bytes a k step. B 32×8: b0 (k 4c..4c+3, n g), b1 (k
//     16+4c..): ldmatrix.x4 without .trans from B's shared rows (K contiguous, one output channel a row):
//     matrix i is channels 8(i/2).., bytes 16(i%2)..: b0, b1 of n tile j, then of j+1.
//   C/D 16×8 float: d0, d1 (row g, n 2c, 2c+1), d2, d3 (row g+8).
//
// The FP8 MMA (gg_step8). mma.sync m16n8k32 .e4m3 is native on sm_89 (Ada) only: Hopper has no e4m3
// mma.sync (its FP8 tensor-core path is wgmma), and ptxas would emulate it by converting the operands to
// f16 for HMMA at every instruction. So on sm_89 (with NVRTC 12.4+, whose ptxas knows the instruction)
// the kernels issue it, each 64-code slice summed apart and added to acc in float32 (its accumulator keeps
// about 13 bits of mantissa); everywhere else (sm_90: H100, H200; older NVRTC, such as this repository's
// nvrtc-check host) they widen each fragment to f16 once (cvt.rn.f16x2.e4m3x2, exact: E4M3 values are
// binary16 values) and run m16n8k16 f16 mmas, which accumulate in float32: the same products. The codes
// halve the bytes read against bf16; the tensor work is bf16's (f16 mma at bf16's rate on Hopper) plus one
// conversion per f16 mma at 4 row slices (the A fragments serve 8 n tiles, the B fragments 4 m tiles).
//
// A unit of its own (kernels/units.txt): it uses only the prelude. The host's groupedSmem, groupedFP8Smem
// and groupedBM/BN (backend/cuda/grouped.go) mirror GG_SMEM, GF_SMEM and GG_BM/GG_BN.

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
#define GG_ROW (2 * GG_AS)                // bytes per shared A row, both formats: a stage's 64 bytes and 16 of padding
#define GF_BS GG_ROW                      // bytes per shared fp8 B row (an output channel's 64 codes, padded)
#define GF_B_STAGE (GG_BN * GF_BS)        // bytes per fp8 B stage
#define GF_SMEM (GG_STAGES * (2 * GG_A_STAGE + GF_B_STAGE)) // fp8 dynamic shared bytes: 122880

struct alignas(8) gg_f32x2 {
	float x, y;
};

// gg_e4m3_h returns the binary16 bits of E4M3 code b (exact: every E4M3 value is a normal binary16 or
// zero; 0x7F and 0xFF give NaN).
__device__ __forceinline__ u32 gg_e4m3_h(u32 b) {
	u32 s = (b & 0x80u) << 8, e = (b >> 3) & 15u, m = b & 7u;
	if ((b & 0x7fu) == 0x7fu) return s | 0x7e00u;
	if (e) return s | ((e + 8u) << 10) | (m << 7); // (1 + m/8)·2^(e-7)
	if (!m) return s;
	u32 p = m >= 4u ? 2u : m >= 2u ? 1u : 0u; // a subnormal m·2^-9 = (m / 2^p)·2^(p-9), normal in binary16
	return s | ((p + 6u) << 10) | ((m - (1u << p)) << (10u - p));
}

#ifdef TPF_EMU
// The SIMT emulator (scripts/gpu/emu/emu.h) stands in for the PTX: the prelude's tc_* helpers and these.
__device__ __forceinline__ unsigned long long gg_stream_policy() { return 0; }
__device__ __forceinline__ void gg_cp16_stream(unsigned dst, const void* src, unsigned long long) { tc_cp16(dst, src); }
__device__ __forceinline__ void gg_mma_f16(float* d, const u32* a, u32 b0, u32 b1) { emu_mma_f16(d, a, b0, b1); }
#ifndef GG_E4M3_VIA_F16 // emu-grouped.sh checks both ways
#define GG_E4M3_MMA 1
template <bool Z>
__device__ __forceinline__ void gg_mma_e4m3(float* d, const u32* a, u32 b0, u32 b1) {
	if (Z) d[0] = d[1] = d[2] = d[3] = 0.0f;
	emu_mma_e4m3(d, a, b0, b1);
}
#endif
// gg_h2 widens bytes 2h and 2h+1 of v to two binary16 values, byte 2h in the low half.
__device__ __forceinline__ u32 gg_h2(u32 v, int h) { return gg_e4m3_h((v >> (16 * h)) & 0xffu) | gg_e4m3_h((v >> (16 * h + 8)) & 0xffu) << 16; }
#else
// gg_stream_policy is an L2 policy that makes the lines a copy brings in the first to be evicted: for the
// weights, which a block streams once (its neighbours with the same expert and columns read them at about
// the same time), so that they do not push the tokens' rows (read again for every column tile) out of L2.
__device__ __forceinline__ unsigned long long gg_stream_policy() {
	unsigned long long p;
	asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
	return p;
}
// gg_cp16_stream is tc_cp16 under L2 policy p.
__device__ __forceinline__ void gg_cp16_stream(unsigned dst, const void* src, unsigned long long p) {
	asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(p) : "memory");
}
// gg_mma_f16: d += a·b for one m16n8k16 tile of binary16 operands (the FP8 kernels' widened codes).
__device__ __forceinline__ void gg_mma_f16(float* d, const u32* a, u32 b0, u32 b1) {
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
		: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// GG_CUDA(v) is true where the compiler (NVRTC) is CUDA v (major·100 + minor) or later: PTX features
// arrived for sm_89 in later versions than for sm_90.
#define GG_CUDA(v) (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= (v))
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 890 && GG_CUDA(1204)
#define GG_E4M3_MMA 1
// gg_mma_e4m3: d += a·b for one m16n8k32 tile of E4M3 codes (PTX ISA 8.4; native on sm_89 only: see
// gg_step); with Z, d = a·b.
template <bool Z>
__device__ __forceinline__ void gg_mma_e4m3(float* d, const u32* a, u32 b0, u32 b1) {
	if (Z)
		asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
			: "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
			: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
	else
		asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
			: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
			: "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif
// gg_h2 widens bytes 2h and 2h+1 of v to two binary16 values, byte 2h in the low half (exact).
__device__ __forceinline__ u32 gg_h2(u32 v, int h) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900 || (__CUDA_ARCH__ == 890 && GG_CUDA(1201)))
	u32 r;
	unsigned short p = (unsigned short)(v >> (16 * h));
	asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(p));
	return r;
#else
	return gg_e4m3_h((v >> (16 * h)) & 0xffu) | gg_e4m3_h((v >> (16 * h + 8)) & 0xffu) << 16;
#endif
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

// gg_step8 is gg_step's FP8 products: acc[mi][j] += the products of a 64-code slice's fragments af (the
// MV m16 row slices' A, two k32 steps) and bfr (the 8 n8 tiles' B).
template <int MV>
__device__ __forceinline__ void gg_step8(float (&acc)[4][8][4], const u32 (&af)[2][MV][4], const u32 (&bfr)[2][8][2]) {
#ifdef GG_E4M3_MMA
	// The slice's two k32 products of a tile are summed apart and added to acc by the CUDA cores: the
	// e4m3 mma's accumulator keeps fewer bits than float32 (about 13 of mantissa), so adding every product
	// into acc on the tensor cores would lose them on each of K/32 adds.
#pragma unroll
	for (int mi = 0; mi < MV; mi++)
#pragma unroll
		for (int j = 0; j < 8; j++) {
			float t[4];
			gg_mma_e4m3<true>(t, af[0][mi], bfr[0][j][0], bfr[0][j][1]);
			gg_mma_e4m3<false>(t, af[1][mi], bfr[1][j][0], bfr[1][j][1]);
#pragma unroll
			for (int q = 0; q < 4; q++) acc[mi][j][q] += t[q];
		}
#else
	// Each k32 as two m16n8k16 f16 mmas on the codes widened to f16 (exact), each fragment widened once
	// (A for the 8 n tiles, B for the MV m tiles): the thread's k 4c, 4c+1 stand as the f16 tile's k 2c,
	// 2c+1 and its k 4c+2, 4c+3 as 2c+8, 2c+9 (a0, a1 and b0 in the first; a2, a3 and b1, k + 16, in the
	// second), the same renaming of k in A and in B, so each sum has the same products. f16 mmas
	// accumulate in float32.
#pragma unroll
	for (int kk = 0; kk < 2; kk++) {
		u32 ah[MV][2][4];
#pragma unroll
		for (int mi = 0; mi < MV; mi++)
#pragma unroll
			for (int hk = 0; hk < 2; hk++) {
				const u32* a = af[kk][mi] + 2 * hk;
				ah[mi][hk][0] = gg_h2(a[0], 0), ah[mi][hk][1] = gg_h2(a[1], 0), ah[mi][hk][2] = gg_h2(a[0], 1), ah[mi][hk][3] = gg_h2(a[1], 1);
			}
#pragma unroll
		for (int j = 0; j < 8; j++) {
			const u32 bh[4] = {gg_h2(bfr[kk][j][0], 0), gg_h2(bfr[kk][j][0], 1), gg_h2(bfr[kk][j][1], 0), gg_h2(bfr[kk][j][1], 1)};
#pragma unroll
			for (int mi = 0; mi < MV; mi++) {
				gg_mma_f16(acc[mi][j], ah[mi][0], bh[0], bh[1]);
				gg_mma_f16(acc[mi][j], ah[mi][1], bh[2], bh[3]);
			}
		}
	}
#endif
}

// gg_step runs one 64-byte K slice of a warp's 64 × 64 tile from a stage (ast: this lane's A ldmatrix
// address in it; bb[p] + bst: its B address for column pair p) on the warp's first MV m16 row slices, in
// two k steps (bf16 k16, or FP8 k32). Every fragment of the slice is loaded before the first mma, so the
// loads overlap.
template <int MV, bool FP8>
__device__ __forceinline__ void gg_step(float (&acc)[4][8][4], unsigned ast, const unsigned (&bb)[4], unsigned bst) {
	u32 af[2][MV][4], bfr[2][8][2];
#pragma unroll
	for (int kk = 0; kk < 2; kk++) {
#pragma unroll
		for (int mi = 0; mi < MV; mi++) tc_ldsm4(ast + mi * 16 * GG_ROW + kk * 32, af[kk][mi][0], af[kk][mi][1], af[kk][mi][2], af[kk][mi][3]);
#pragma unroll
		for (int p = 0; p < 4; p++) {
			if (FP8) tc_ldsm4(bb[p] + bst + kk * 32, bfr[kk][2 * p][0], bfr[kk][2 * p][1], bfr[kk][2 * p + 1][0], bfr[kk][2 * p + 1][1]);
			else tc_ldsm4_t(bb[p] + bst + kk * 16 * GG_BS * 2, bfr[kk][2 * p][0], bfr[kk][2 * p][1], bfr[kk][2 * p + 1][0], bfr[kk][2 * p + 1][1]);
		}
	}
	if (!FP8) {
#pragma unroll
		for (int kk = 0; kk < 2; kk++)
#pragma unroll
			for (int mi = 0; mi < MV; mi++)
#pragma unroll
				for (int j = 0; j < 8; j++) tc_mma(acc[mi][j], af[kk][mi], bfr[kk][j][0], bfr[kk][j][1]);
	} else {
		gg_step8<MV>(acc, af, bfr);
	}
}

// gg_args are gg_body's operands (the kernels below say each one's layout).
struct gg_args {
	const void* a;     // A rows: x [T, K] bf16 (bf16 gate_up, gathered through perm), act [rows, K] bf16, or codes [rows, K]
	const float* as;   // fp8: A's row scales [rows]
	const int* perm;   // moe_plan's permutation: routing slot of each permuted row
	const float* scores;
	int topk;
	const int* seg;    // moe_plan's segments, active experts and meta
	const int* active;
	const int* meta;
	const void* w;     // bf16 [E, K, NW] input-major, or codes [E, NW, K] output-major (NW = 2N for gate_up, else N)
	const float* ws;   // fp8: the weight's channel scales [E, NW]
	int K, N;
	void* act;         // gate_up's SiLU·mul [rows, N]: bf16, or float32 for fp8
	float* y;          // down: [rows, N] float32, or null for the combine into out
	void* out;
	int odt;
	const void* add;
	int adt;
};

// gg_body is every kernel: GATED, gate_up (K = H, N = I, into act); else down (K = I, N = H, into y when it
// is not null, else into out's token rows as expert_combine would, top-k 1). FP8: E4M3 operands with their
// scales; else bf16.
template <bool GATED, bool FP8>
__device__ __forceinline__ void gg_body(const gg_args op) {
	extern __shared__ u32x4 gg_sh[];
	int e, r0, nrows;
	if (!gg_tile(op.seg, op.active, op.meta, blockIdx.x, e, r0, nrows)) return; // uniform over the block
	constexpr int ES = FP8 ? 1 : 2;                                   // bytes an element
	constexpr int B_STAGE = FP8 ? GF_B_STAGE : 2 * GG_B_STAGE;        // bytes a B stage
	char* sa = (char*)gg_sh;
	char* sb = sa + GG_STAGES * 2 * GG_A_STAGE;
	const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
	const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, c = lane & 3;
	const int K = op.K, N = op.N, KB = K * ES; // KB: bytes of a row
	const long long NW = GATED ? 2LL * N : (long long)N;              // the weight's output channels
	const char* we = (const char*)op.w + (long long)e * K * NW * ES;

	// The A rows this thread copies (null: past the expert's rows), already at its 16-byte chunk.
	const int ac = tid & 3;
	const char* arow[2];
#pragma unroll
	for (int i = 0; i < 2; i++) {
		int r = (tid >> 2) + 64 * i;
		arow[i] = 0;
		if (r < nrows) {
			long long src = GATED && !FP8 ? (long long)(op.perm[r0 + r] / op.topk) : (long long)(r0 + r);
			arow[i] = (const char*)op.a + src * KB + ac * 16;
		}
	}
	// The B chunks this thread copies. bf16: 8 columns (chunk bc of the tile's 256) of K rows tid/32 + 8i,
	// from bcol. fp8: 16 bytes (chunk bc of a stage's 64) of output channels tid/4 + 64i (i < 4) of the
	// tile, those with bit i of bmask (not past N), from brow + boff(i).
	const int bc = FP8 ? tid & 3 : tid & 31, bk = tid >> 5;
	const char* bcol = 0;
	const char* brow = 0;
	unsigned bmask = 0;
	// boff is the offset of chunk row i from the first: gate_up's rows 0..127 are gate channels, 128..255
	// the same up channels (N channels on).
	auto boff = [&](int i) { return (long long)(GATED ? (i & 1) * 64 + (i >> 1) * N : 64 * i) * KB; };
	if (FP8) {
		int ch0 = blockIdx.y * (GATED ? GG_BN / 2 : GG_BN) + (tid >> 2); // the tile's first channel of this thread
		brow = we + (long long)ch0 * KB + bc * 16;
#pragma unroll
		for (int i = 0; i < 4; i++)
			if (ch0 + (GATED ? (i & 1) * 64 : 64 * i) < N) bmask |= 1u << i;
	} else {
		int ch = GATED ? blockIdx.y * (GG_BN / 2) + (bc & 15) * 8 : blockIdx.y * GG_BN + bc * 8;
		if (ch < N) bcol = we + ((GATED && bc >= 16 ? N : 0) + ch) * 2LL;
	}
	const unsigned long long wpol = gg_stream_policy();
	const int nk = (KB + 63) / 64;

	// load issues the cp.async copies of K slice kt (bytes 64kt .. 64kt + 63 of a row) into stage st.
	auto load = [&](int st, int kt) {
		int k0 = kt * 64;
		char* da = sa + st * 2 * GG_A_STAGE;
		char* db = sb + st * B_STAGE;
		bool kin = k0 + ac * 16 < KB;
#pragma unroll
		for (int i = 0; i < 2; i++) {
			if (!arow[i]) continue;
			unsigned d = tc_smem(da + ((tid >> 2) + 64 * i) * GG_ROW + ac * 16);
			if (kin) tc_cp16(d, arow[i] + k0);
			else tc_zero16(d);
		}
#pragma unroll
		for (int i = 0; i < 4; i++) {
			if (FP8) {
				if (!(bmask >> i & 1u)) continue;
				unsigned d = tc_smem(db + ((tid >> 2) + 64 * i) * GF_BS + bc * 16);
				if (k0 + bc * 16 < KB) gg_cp16_stream(d, brow + boff(i) + k0, wpol);
				else tc_zero16(d);
			} else {
				int kr = bk + 8 * i;
				unsigned d = tc_smem(db + (kr * GG_BS + bc * 8) * 2);
				if (k0 / 2 + kr < K) {
					if (bcol) gg_cp16_stream(d, bcol + (long long)(k0 / 2 + kr) * NW * 2, wpol);
				} else tc_zero16(d);
			}
		}
	};

	float acc[4][8][4];
#pragma unroll
	for (int mi = 0; mi < 4; mi++)
#pragma unroll
		for (int j = 0; j < 8; j++) acc[mi][j][0] = acc[mi][j][1] = acc[mi][j][2] = acc[mi][j][3] = 0.0f;

	// Per-lane ldmatrix byte offsets within a stage (see the fragment layouts above).
	const int lr = (lane & 7) + ((lane >> 3) & 1) * 8, lc = (lane >> 4) * 16;
	const unsigned abase = tc_smem(sa) + (wm * 64 + lr) * GG_ROW + lc;
	unsigned bbase[4]; // the warp's column pairs p: n tiles 2p and 2p+1
#pragma unroll
	for (int p = 0; p < 4; p++) {
		int cb = GATED ? (p >> 1) * (GG_BN / 2) + wn * 32 + (p & 1) * 16 : wn * 64 + p * 16;
		if (FP8) bbase[p] = tc_smem(sb) + (cb + (lane & 7) + (lane >> 4) * 8) * GF_BS + ((lane >> 3) & 1) * 16;
		else bbase[p] = tc_smem(sb) + (lr * GG_BS + cb) * 2 + lc;
	}

	// The warp's m16 row slices that hold a valid row: the others skip their ldmatrix and mma.
	int mv = (nrows - wm * 64 + 15) / 16;
	mv = mv < 0 ? 0 : mv > 4 ? 4 : mv;

#pragma unroll
	for (int s = 0; s < GG_STAGES - 1; s++) {
		if (s < nk) load(s, s);
		tc_commit();
	}
	for (int kt = 0; kt < nk; kt++) {
		tc_wait<GG_STAGES - 2>(); // slice kt has landed (for this thread's copies)
		__syncthreads();          // for every thread's; and every warp is done with slice kt - 1's stage
		int nt = kt + GG_STAGES - 1;
		if (nt < nk) load(nt % GG_STAGES, nt);
		tc_commit();
		int st = kt % GG_STAGES;
		unsigned ast = abase + st * 2 * GG_A_STAGE, bst = st * B_STAGE;
		switch (mv) { // uniform over the warp; each case is one basic block, which ptxas schedules freely
		case 4: gg_step<4, FP8>(acc, ast, bbase, bst); break;
		case 3: gg_step<3, FP8>(acc, ast, bbase, bst); break;
		case 2: gg_step<2, FP8>(acc, ast, bbase, bst); break;
		case 1: gg_step<1, FP8>(acc, ast, bbase, bst); break;
		default: break;
		}
	}
	tc_wait<0>();

	// Epilogue: rows wm·64 + 16mi + g (+8), columns 2c, 2c+1 of each n8 tile. A product is acc·(rs·cs):
	// rs the row's factor (fp8: the row's scale; bf16 gate_up: the router score; else 1), cs the column's
	// (fp8: the channel's scale; else 1, so that bf16 keeps acc·s and acc exactly).
	const float* cs = FP8 ? op.ws + (long long)e * NW : 0;
	auto colScale = [&](long long ch) {
		gg_f32x2 v = {1.0f, 1.0f};
		if (FP8) v = *(const gg_f32x2*)(cs + ch);
		return v;
	};
#pragma unroll
	for (int mi = 0; mi < 4; mi++) {
#pragma unroll
		for (int h = 0; h < 2; h++) {
			int r = wm * 64 + mi * 16 + g + 8 * h;
			if (r >= nrows) continue;
			long long row = r0 + r;
			const float rs = FP8 ? op.as[row] : GATED ? op.scores[op.perm[row]] : 1.0f;
			if (GATED) {
#pragma unroll
				for (int j = 0; j < 4; j++) {
					int ch = blockIdx.y * (GG_BN / 2) + wn * 32 + j * 8 + 2 * c;
					if (ch >= N) continue;
					gg_f32x2 sg = colScale(ch), su = colScale(N + ch);
					float g0 = acc[mi][j][2 * h] * (rs * sg.x), g1 = acc[mi][j][2 * h + 1] * (rs * sg.y);
					float u0 = acc[mi][j + 4][2 * h] * (rs * su.x), u1 = acc[mi][j + 4][2 * h + 1] * (rs * su.y);
					gg_f32x2 v = {silu(g0) * u0, silu(g1) * u1};
					if (FP8) *(gg_f32x2*)((float*)op.act + row * N + ch) = v;
					else *(u32*)((bf16_t*)op.act + row * N + ch) = (u32)f32_to_bf16(v.x) | (u32)f32_to_bf16(v.y) << 16;
				}
			} else {
#pragma unroll
				for (int j = 0; j < 8; j++) {
					int col = blockIdx.y * GG_BN + wn * 64 + j * 8 + 2 * c;
					if (col >= N) continue;
					gg_f32x2 sc = colScale(col);
					gg_f32x2 v = {acc[mi][j][2 * h] * (rs * sc.x), acc[mi][j][2 * h + 1] * (rs * sc.y)};
					if (op.y) {
						*(gg_f32x2*)(op.y + row * N + col) = v;
						continue;
					}
					// expert_combine's arithmetic for a token's one slot: (0 + (0 + y)) + add.
					long long t = op.perm[row];
#pragma unroll
					for (int u = 0; u < 2; u++) {
						long long i = t * N + col + u;
						float sum = 0.0f;
						sum += 0.0f + (u ? v.y : v.x);
						if (op.add) sum += ld(op.add, op.adt, i);
						st(op.out, op.odt, i, sum);
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
	gg_body<true, false>(gg_args{x, 0, perm, scores, topk, seg, active, meta, gu, 0, H, I, act, 0, 0, 0, 0, 0});
}

// grouped_down: grid (tiles as grouped_gate_up's, ceil(H/256)), GG_THREADS threads, GG_SMEM bytes of
// dynamic shared memory. act [rows, I] bf16 (I % 8 == 0); down [E, I, H] bf16 (H % 8 == 0). y not null:
// y [rows, H] float32 for expert_combine; y null (top-k 1 only): out[t] = (0 + (0 + y)) + add[t] for each
// token t whose expert is held here, expert_combine's sum of one slot (grouped_fill writes the others).
extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)
grouped_down(const bf16_t* act, const int* perm, const int* seg, const int* active, const int* meta, const bf16_t* down,
	int I, int H, float* y, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	gg_body<false, false>(gg_args{act, 0, perm, 0, 1, seg, active, meta, down, 0, I, H, 0, y, out, odt, add, adt});
}

// grouped_fp8_gate_up: grid and block as grouped_gate_up's, GF_SMEM bytes of dynamic shared memory.
// xc [rows, H] E4M3 codes of the permuted rows (x[perm[r] / k]·scores[perm[r]] quantised per row by
// fp8_act_codes) with their scales xs [rows]; gu [E, 2I, H] output-major codes (gate channels, then up)
// with scales gus [E, 2I]; H and I multiples of 16, 16-byte aligned operands; act [rows, I] float32.
extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)
grouped_fp8_gate_up(const unsigned char* xc, const float* xs, const int* seg, const int* active, const int* meta,
	const unsigned char* gu, const float* gus, int H, int I, float* act) {
	PDL_PROLOGUE();
	gg_body<true, true>(gg_args{xc, xs, 0, 0, 1, seg, active, meta, gu, gus, H, I, act, 0, 0, 0, 0, 0});
}

// grouped_fp8_down: grid and block as grouped_down's, GF_SMEM bytes of dynamic shared memory. ac [rows, I]
// E4M3 codes of act (fp8_act_codes) with scales as [rows]; down [E, H, I] output-major codes with scales
// ds [E, H]; y, out, add as grouped_down's.
extern "C" __global__ void __launch_bounds__(GG_THREADS, 1)
grouped_fp8_down(const unsigned char* ac, const float* as, const int* perm, const int* seg, const int* active, const int* meta,
	const unsigned char* down, const float* ds, int I, int H, float* y, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	gg_body<false, true>(gg_args{ac, as, perm, 0, 1, seg, active, meta, down, ds, I, H, 0, y, out, odt, add, adt});
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
