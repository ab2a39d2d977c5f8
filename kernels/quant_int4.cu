// quant_int4.cu: int4 weights (package quant's Int4: two's-complement nibbles, element 2j in the low
// nibble of byte j, one bf16 scale per output channel and group of gs input elements) without a format
// branch: the decode GEMVs on tensor cores, the prefill GEMMs on tensor cores (q4gemm, q4gemm_experts,
// q4gemm_experts_swiglu: the codes dequantised in registers, see "Prefill: q4gemm" below) and the
// dequantisation to bf16 that the prefill path takes with FuseQ4GEMM off.
//
// GEMVs (q4gemv_N for Linear's [N, K] weights, q4expert_gemv_N for the routed experts' input-major
// [E, K, N] weights): a warp multiplies 16 output channels × 16 inputs at a time on the tensor cores
// (mma.sync m16n8k16, bf16 operands, float32 accumulation), the weight as the A operand and the input
// rows as B:
//   - A: each code becomes its exact value q in bf16 in two instructions per pair of codes: a LOP3
//     puts nibbles 0 and 4 of a word (or the same nibble of two words) into the mantissas of the bf16
//     pair 0x4300 | (n ^ 8) = 136 + q, and one bf16x2 FMA subtracts 136 (exact: every value is an
//     integer of at most 8 bits). No integer-to-float conversions (a quarter-rate pipe), no scale per
//     weight.
//   - B: each float32 input x goes in as two bf16 columns, hi = x truncated to bf16 and lo = x - hi
//     rounded to bf16, so x·q is kept to 2^-16 relative (the bf16 path splits a float32 x into hi and
//     lo for the same reason, doc.go, Numerics); a bf16 input has lo = 0. Column 2t is token t's hi,
//     2t+1 its lo: one n8 tile holds 4 tokens, and the accumulator's two columns of a token are added
//     at the end.
//   - The products of one scale group are summed in a fresh accumulator, which is multiplied by the
//     group's scale once and added to the running sum (float32). The result differs from quant's
//     reference (q·s in float32, then x·w) only in rounding (x's hi + lo: at most 2^-16 of each product;
//     the sums: float32).
//   - A warp's k16 step never crosses a scale group. Dense weights: with groups of 32 or 64, lane c of
//     a row reads word c of each 16-byte (32-input) block, so a step takes its 16 inputs from one
//     block; with groups (and K) multiples of 128 (WIDE), lane c reads its 16 bytes of a 128-input tile
//     at once and a step spans the tile, which lies in one group. Experts: groups of a multiple of 16
//     rows, a step's 16 inputs being 16 K rows.
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16; g = lane/4, c = lane%4; as flash.cu):
//   A 16×16: a0 (row g, k 2c..2c+1), a1 (row g+8, k 2c..), a2 (row g, k 2c+8..), a3 (row g+8, k 2c+8..).
//   B 16×8: b0 (k 2c..2c+1, col g), b1 (k 2c+8..2c+9, col g). C/D 16×8 float: d0, d1 (row g, cols 2c,
//   2c+1), d2, d3 (row g+8, cols 2c, 2c+1). The sum over k is order-free, so the kernels map a step's
//   16 logical k to physical inputs as suits the loads, the same for A and B.
//
// dequant_int4_bf16 writes bf16(q·s) (quant.Weight.Dequantize rounded to bf16), 32 codes a thread: one
// 16-byte load, four 16-byte stores, and the index arithmetic once per 32 elements. q4gemm's fragments
// hold the same bf16(q·s).
//
// A unit of its own (kernels/units.txt): it uses only the prelude.

#define Q4_MAXW 16    // the most warps of a q4gemv block (host: q4MaxWarps)
#define Q4E_WARPS 4   // warps of a q4expert_gemv block, 64 output channels each
#define Q4E_COLS 256  // output channels of a q4expert_gemv block (host: q4eCols)
#define Q4E_KTILE 1024 // the most input rows of one q4expert_gemv block (one K split; host: q4eKTile)
#define Q4E_KP (Q4E_KTILE / 2 + 4) // input pairs per staged row, padded: the 8 rows a B load reads hit 8 bank groups

struct alignas(16) q4_u32x4 {
	u32 x, y, z, w;
};

struct alignas(16) q4_f32x4 {
	float x, y, z, w;
};

struct alignas(8) q4_f32x2 {
	float x, y;
};

#ifdef TPF_EMU
// The SIMT emulator (scripts/gpu/emu/emu.h) stands in for the PTX: its tc_mma is the prelude's mma.
__device__ __forceinline__ void q4_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
	u32 a[4] = {a0, a1, a2, a3};
	tc_mma(d, a, b0, b1);
}
__device__ __forceinline__ u32 q4_fma2(u32 a, u32 b, u32 c) { return emu_fma_bf16x2(a, b, c); }
__device__ __forceinline__ u32 q4_andxor(u32 a, u32 b, u32 c) { return (a & b) ^ c; }
#else
// q4_mma: d += a·b for one m16n8k16 tile (bf16 operands, float32 accumulation).
__device__ __forceinline__ void q4_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
	asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
		: "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		: "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// q4_fma2: a·b + c on bf16 pairs, rounded to nearest even.
__device__ __forceinline__ u32 q4_fma2(u32 a, u32 b, u32 c) {
	u32 d;
	asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
	return d;
}
// q4_andxor: (a & b) ^ c in one LOP3 (written as C, with two constants, it compiles to two).
__device__ __forceinline__ u32 q4_andxor(u32 a, u32 b, u32 c) {
	u32 d;
	asm("lop3.b32 %0, %1, %2, %3, 0x6a;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
	return d;
}
#endif

#define Q4_ONE2 0x3f803f80u   // bf16 pair (1, 1)
#define Q4_M136 0xc308c308u   // bf16 pair (-136, -136)
#define Q4_NIB2 0x000f000fu   // the low nibble of each half
#define Q4_MAGIC 0x43084308u  // bf16 128 in each half, xor 8 on the nibble: 0x4300 | (n ^ 8)

// q4_pair returns the bf16 pair of the codes in bits 0..3 (low half) and 16..19 (high half) of v:
// exactly (q_lo, q_hi).
__device__ __forceinline__ u32 q4_pair(u32 v) { return q4_fma2(q4_andxor(v, Q4_NIB2, Q4_MAGIC), Q4_ONE2, Q4_M136); }

__device__ __forceinline__ int q4_imin(int a, int b) { return a < b ? a : b; }

// q4_hi and q4_lo are the halves of x = hi + lo (see above), as bit patterns whose upper 16 bits are
// the bf16 value (the lower bits are junk that q4_pack drops): hi truncates, lo rounds x - hi.
__device__ __forceinline__ u32 q4_hi(float x) { return __float_as_uint(x); }
__device__ __forceinline__ u32 q4_lo(float x) {
	float r = x - __uint_as_float(__float_as_uint(x) & 0xffff0000u); // exact
	return __float_as_uint(r) + 0x8000u;                              // round half away from zero
}

// q4_pack packs the bf16 values in the upper halves of lo and hi into one pair, lo in the low half.
__device__ __forceinline__ u32 q4_pack(u32 lo, u32 hi) { return __byte_perm(lo, hi, 0x7632); }

// q4_bpair is one B register: the pair (x0, x1) of one input row, its hi half (lo false) or its lo half.
__device__ __forceinline__ u32 q4_bpair(float x0, float x1, bool lo) {
	return lo ? q4_pack(q4_lo(x0), q4_lo(x1)) : q4_pack(q4_hi(x0), q4_hi(x1));
}

// ---- Linear: y [T, N] = x [T, K] · w [N, K]ᵀ, T <= 4·NT ----

// q4_xblock sets this lane's B registers for one 32-input block from the 8 inputs at p (float32 or
// bf16: k0 .. k0+7 of one row of x), in the order the dense A fragments use (see q4gemv_block): out[0],
// out[1] are b0, b1 of the block's first step (inputs k0+{0,4} and k0+{1,5}), out[2], out[3] of its
// second (k0+{2,6}, k0+{3,7}). lo selects the lo column.
__device__ __forceinline__ void q4_xblock(const void* __restrict__ p, int xdt, bool lo, u32 (&out)[4]) {
	if (xdt == DT_F32) {
		q4_f32x4 a = ((const q4_f32x4*)p)[0], b = ((const q4_f32x4*)p)[1];
		out[0] = q4_bpair(a.x, b.x, lo);
		out[1] = q4_bpair(a.y, b.y, lo);
		out[2] = q4_bpair(a.z, b.z, lo);
		out[3] = q4_bpair(a.w, b.w, lo);
	} else {
		q4_u32x4 v = *(const q4_u32x4*)p; // x0x1 x2x3 x4x5 x6x7
		out[0] = lo ? 0u : __byte_perm(v.x, v.z, 0x5410); // (x0, x4)
		out[1] = lo ? 0u : __byte_perm(v.x, v.z, 0x7632); // (x1, x5)
		out[2] = lo ? 0u : __byte_perm(v.y, v.w, 0x5410); // (x2, x6)
		out[3] = lo ? 0u : __byte_perm(v.y, v.w, 0x7632); // (x3, x7)
	}
}

// q4gemv_block runs one word of codes a lane, 32 inputs × 16·MT rows a warp: wv[m][h] is this lane's word
// in row 16m + 8h + g, 8 codes for inputs k0 + e (e = 0..7), where k0 = 8·xo plus the lane's share of
// the 32 (8c: word c of the 16-byte block b; WIDE: 32c, word u of the lane's 16 bytes of a 128-input
// tile, xo = 4b + u). Step 0 takes e = 0, 4 (a0, a1: k 2c, 2c+1) and 1, 5 (a2, a3: k 2c+8, 2c+9); step
// 1 takes e = 2, 6 and 3, 7. A step's 16 inputs (4 from each of a row's 4 lanes) lie in one 32-input
// block (a 128-input tile when WIDE), so in one scale group. xp[nt] is this lane's B row (token 4nt + g/2 from its share's
// first input) or null past T; with PREP it points at the lane's q4_xprep records (one 16-byte load).
// When block b ends a scale group (or the warp's range), the group's sums d are scaled into acc; grp is
// b's group and gend the first block of the next.
template <int MT, int NT, bool PREP>
__device__ __forceinline__ void q4gemv_block(int b, int xo, const u32 (&wv)[MT][2], const char* const (&xp)[NT], int xdt,
	const bf16_t* (&sp)[MT][2], int bpg, bool last, int& grp, int& gend, float (&d)[MT][NT][4], float (&acc)[MT][NT][4]) {
	int lane = threadIdx.x & 31, g = lane >> 2;
	long long xoff = (long long)(8 * xo) * (xdt == DT_F32 ? 4 : 2);
	u32 bf[NT][4];
#pragma unroll
	for (int nt = 0; nt < NT; nt++) {
		if (xp[nt] && PREP) {
			q4_u32x4 v = ((const q4_u32x4*)xp[nt])[xo];
			bf[nt][0] = v.x;
			bf[nt][1] = v.y;
			bf[nt][2] = v.z;
			bf[nt][3] = v.w;
		} else if (xp[nt]) {
			q4_xblock(xp[nt] + xoff, xdt, g & 1, bf[nt]);
		} else {
#pragma unroll
			for (int i = 0; i < 4; i++) bf[nt][i] = 0u;
		}
	}
#pragma unroll
	for (int m = 0; m < MT; m++) {
		u32 r0 = wv[m][0], r1 = wv[m][1];
		u32 p00 = q4_pair(r0), p01 = q4_pair(r0 >> 4), p02 = q4_pair(r0 >> 8), p03 = q4_pair(r0 >> 12);
		u32 p10 = q4_pair(r1), p11 = q4_pair(r1 >> 4), p12 = q4_pair(r1 >> 8), p13 = q4_pair(r1 >> 12);
#pragma unroll
		for (int nt = 0; nt < NT; nt++) {
			q4_mma(d[m][nt], p00, p10, p01, p11, bf[nt][0], bf[nt][1]);
			q4_mma(d[m][nt], p02, p12, p03, p13, bf[nt][2], bf[nt][3]);
		}
	}
	if (b + 1 == gend || last) { // uniform over the warp
#pragma unroll
		for (int m = 0; m < MT; m++) {
			float s0 = bf16_to_f32(sp[m][0][grp]), s1 = bf16_to_f32(sp[m][1][grp]);
#pragma unroll
			for (int nt = 0; nt < NT; nt++) {
				acc[m][nt][0] += d[m][nt][0] * s0;
				acc[m][nt][1] += d[m][nt][1] * s0;
				acc[m][nt][2] += d[m][nt][2] * s1;
				acc[m][nt][3] += d[m][nt][3] * s1;
#pragma unroll
				for (int i = 0; i < 4; i++) d[m][nt][i] = 0.0f;
			}
		}
		if (b + 1 == gend) {
			grp++;
			gend += bpg;
		}
	}
}

// q4gemv_rows computes rows n0 .. n0+16·MT-1 (the block's; n0 < N) of y [T, N] (float32) = x [T, K] ·
// w [N, K]ᵀ for an int4 w with scales [N, G] (G = ceil(K / gs)), T <= 4·NT; with PREP, x is q4_xprep's
// records of the T rows (xdt ignored). The launch's gridDim.y splits cut the K / 32 input blocks into
// contiguous ranges (q4_range), and the block's W = blockDim.x / 32 warps (at most Q4_MAXW) cut its
// range again; each warp covers all the block's rows (MT m16 tiles) with four blocks' codes in flight,
// and the warps' sums are added in warp order through shared memory (a fixed order). With one split the
// block stores its rows of y. With S splits (small N: 64-row blocks alone would leave SMs idle) each block
// stores its sums in its slab of part ([S][gridDim.x][16·MT][4·NT] float32), and the last of a row tile's
// S blocks (eg_last on ctr[blockIdx.x], zero between launches) adds the S slabs in split order into y:
// the result depends on S, which depends only on the shapes, never on timing. K % 32 == 0, gs % 32 == 0;
// x 16-byte aligned, w 4-byte aligned. Without WIDE a lane loads word c of each 16-byte block (four-byte
// loads: a step stays in a 32-input block, for groups of 32); WIDE (K % 128 == 0, gs % 128 == 0, w
// 16-byte aligned) loads the lane's 16 bytes of a 128-input tile at once, ranges in whole tiles.
//
// q4_range sets [b0, b1), the 32-input blocks of K (nb of them) this warp takes: split blockIdx.y of
// gridDim.y takes a contiguous share of the units (WIDE: 128-input tiles, else 32-input blocks), and the
// block's warps share that out again, ceil-sized, so that the last warps may take fewer or none.
template <bool WIDE>
__device__ __forceinline__ void q4_range(int nb, int& b0, int& b1) {
	const int U = WIDE ? 4 : 1;
	int W = blockDim.x >> 5, warp = threadIdx.x >> 5, S = gridDim.y;
	int units = nb / U, us = (units + S - 1) / S;
	int u0 = q4_imin(units, (int)blockIdx.y * us), u1 = q4_imin(units, u0 + us);
	int uw = (u1 - u0 + W - 1) / W;
	int w0 = q4_imin(u1, u0 + warp * uw), w1 = q4_imin(u1, w0 + uw);
	b0 = w0 * U;
	b1 = w1 * U;
}

// q4gemv_prefetch asks L2 for the line where each of the block's 16·MT rows (from n0, w [N, K]) starts
// in this warp's range of K: what q4gemv_rows reads first, for PDL_PROLOGUE_L2.
template <int MT, bool WIDE>
__device__ __forceinline__ void q4gemv_prefetch(const unsigned char* w, int K, int N, int n0) {
	int b0, b1;
	q4_range<WIDE>(K >> 5, b0, b1);
	if (b0 >= b1 || n0 >= N) return;
	for (int r = threadIdx.x & 31; r < 16 * MT; r += 32) prefetch_l2(w + (long long)q4_imin(n0 + r, N - 1) * (K >> 1) + 16 * b0);
}

template <int MT, int NT, bool PREP, bool WIDE>
__device__ __forceinline__ void q4gemv_rows(const void* __restrict__ x, int xdt, const unsigned char* __restrict__ w,
	const bf16_t* __restrict__ scales, int gs, float* __restrict__ y, int T, int K, int N, int n0, float* __restrict__ part, int* ctr) {
	__shared__ float red[Q4_MAXW][16 * MT][4 * NT];
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
	int g = lane >> 2, c = lane & 3;
	int nb = K >> 5, b0, b1;
	q4_range<WIDE>(nb, b0, b1);
	int G = (K + gs - 1) / gs, bpg = gs >> 5;
	const u32* wp[MT][2];
	const bf16_t* sp[MT][2];
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int h = 0; h < 2; h++) {
			int n = q4_imin(n0 + 16 * m + 8 * h + g, N - 1);
			wp[m][h] = (const u32*)(w + (long long)n * (K >> 1)) + c; // block b's word: wp + 4b
			sp[m][h] = scales + (long long)n * G;
		}
	const char* xp[NT];
#pragma unroll
	for (int nt = 0; nt < NT; nt++) {
		int t = 4 * nt + (g >> 1);
		int cx = WIDE ? 4 * c : c; // the lane's first 8 inputs of a block (WIDE: of a tile), in 8s
		long long off = PREP ? ((long long)(2 * t + (g & 1)) * (K >> 3) + cx) * 16 : ((long long)t * K + 8 * cx) * (xdt == DT_F32 ? 4 : 2);
		xp[nt] = t < T ? (const char*)x + off : nullptr;
	}
	float d[MT][NT][4], acc[MT][NT][4];
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int nt = 0; nt < NT; nt++)
#pragma unroll
			for (int i = 0; i < 4; i++) d[m][nt][i] = acc[m][nt][i] = 0.0f;
	int b = b0, grp = b0 / bpg, gend = (grp + 1) * bpg;
	for (; b + 4 <= b1; b += 4) {
		u32 wv[4][MT][2];
		if (WIDE) { // the lane's 16 bytes of tile b/4: bytes 16b + 16c, word u for inputs 32b + 32c + 8u
#pragma unroll
			for (int m = 0; m < MT; m++)
#pragma unroll
				for (int h = 0; h < 2; h++) {
					q4_u32x4 v = *(const q4_u32x4*)(wp[m][h] + 3 * c + 4 * b); // wp is word c: 4b + 4c words in
					wv[0][m][h] = v.x;
					wv[1][m][h] = v.y;
					wv[2][m][h] = v.z;
					wv[3][m][h] = v.w;
				}
		} else {
#pragma unroll
			for (int u = 0; u < 4; u++)
#pragma unroll
				for (int m = 0; m < MT; m++)
#pragma unroll
					for (int h = 0; h < 2; h++) wv[u][m][h] = wp[m][h][4 * (b + u)];
		}
#pragma unroll
		for (int u = 0; u < 4; u++)
			q4gemv_block<MT, NT, PREP>(b + u, WIDE ? 4 * b + u : 4 * (b + u), wv[u], xp, xdt, sp, bpg, b + u + 1 == b1, grp, gend, d, acc);
	}
	for (; b < b1; b++) {
		u32 wv[MT][2];
#pragma unroll
		for (int m = 0; m < MT; m++)
#pragma unroll
			for (int h = 0; h < 2; h++) wv[m][h] = wp[m][h][4 * b];
		q4gemv_block<MT, NT, PREP>(b, 4 * b, wv, xp, xdt, sp, bpg, b + 1 == b1, grp, gend, d, acc); // never WIDE
	}
	// Lane (g, c) holds, for token 4nt + c, rows 16m + g (hi + lo: acc 0 + 1) and 16m + 8 + g (2 + 3).
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int nt = 0; nt < NT; nt++) {
			red[warp][16 * m + g][4 * nt + c] = acc[m][nt][0] + acc[m][nt][1];
			red[warp][16 * m + 8 + g][4 * nt + c] = acc[m][nt][2] + acc[m][nt][3];
		}
	__syncthreads();
	const int SLAB = 16 * MT * 4 * NT;
	int S = gridDim.y;
	float* slab = S > 1 ? part + ((long long)blockIdx.y * gridDim.x + blockIdx.x) * SLAB : nullptr;
	for (int i = threadIdx.x; i < SLAB; i += blockDim.x) {
		int r = i / (4 * NT), t = i - r * (4 * NT);
		float v = 0.0f;
		for (int q = 0; q < W; q++) v += red[q][r][t];
		if (t >= T) continue; // columns past the rows of x: neither stored nor added
		if (S > 1) slab[i] = v;
		else if (n0 + r < N) y[(long long)t * N + n0 + r] = v;
	}
	if (S == 1 || !eg_last(ctr + blockIdx.x, S)) return;
	const float* first = part + (long long)blockIdx.x * SLAB;
	for (int i = threadIdx.x; i < SLAB; i += blockDim.x) {
		int r = i / (4 * NT), t = i - r * (4 * NT);
		if (t < T && n0 + r < N) y[(long long)t * N + n0 + r] = eg_sum8(first + i, (long long)gridDim.x * SLAB, S);
	}
}

// q4_xprep writes x [T, K] (float32 or bf16, K % 8 == 0) as the B operand of q4gemv_2 and q4gemv_4: for
// row t, column half h (0 hi, 1 lo) and group j of 8 inputs, the 16-byte record xq[(2t + h)·K/8 + j]
// holds q4_xblock's registers for inputs 8j .. 8j+7. At 8 and 16 rows converting x in every block of
// the GEMV would take about as many instructions as the codes' own; converted once, a block loads it.
extern "C" __global__ void q4_xprep(const void* x, int xdt, int T, int K, q4_u32x4* xq) {
	PDL_PROLOGUE();
	long long groups = K >> 3, n = (long long)T * groups;
	GRID_STRIDE(i, n) {
		long long t = i / groups, j = i - t * groups;
		const char* p = (const char*)x + (t * K + 8 * j) * (xdt == DT_F32 ? 4 : 2);
		u32 hi[4], lo[4];
		q4_xblock(p, xdt, false, hi);
		q4_xblock(p, xdt, true, lo);
		q4_u32x4 a, b;
		a.x = hi[0], a.y = hi[1], a.z = hi[2], a.w = hi[3];
		b.x = lo[0], b.y = lo[1], b.z = lo[2], b.w = lo[3];
		xq[2 * t * groups + j] = a;
		xq[(2 * t + 1) * groups + j] = b;
	}
}

// q4gemv_N: y [T, N] = x [T, K] · w [N, K]ᵀ: q4gemv_1 for up to 4 rows of x as it is (64 weight rows a
// block), q4gemv_2 up to 8 and q4gemv_4 up to 16 rows of q4_xprep's records (32 weight rows a block);
// q4gemv_Nw the same with WIDE loads (groups and K multiples of 128). Grid: ceil(N / (16·MT)) × S blocks of
// W <= Q4_MAXW warps (Q4_MAXW / 2 for q4gemv_4, whose registers would spill at 512 threads); with S > 1,
// part and ctr as q4gemv_rows says (null otherwise).
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_1(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<4, false>(w, K, N, blockIdx.x * 64)));
	q4gemv_rows<4, 1, false, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 64, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_2(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<2, false>(w, K, N, blockIdx.x * 32)));
	q4gemv_rows<2, 2, true, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 16)
q4gemv_4(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<2, false>(w, K, N, blockIdx.x * 32)));
	q4gemv_rows<2, 4, true, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_1w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<4, true>(w, K, N, blockIdx.x * 64)));
	q4gemv_rows<4, 1, false, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 64, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_2w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<2, true>(w, K, N, blockIdx.x * 32)));
	q4gemv_rows<2, 2, true, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 16)
q4gemv_4w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N,
	float* part, int* ctr) {
	PDL_PROLOGUE_L2((q4gemv_prefetch<2, true>(w, K, N, blockIdx.x * 32)));
	q4gemv_rows<2, 4, true, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32, part, ctr);
}

// q4gemv_multi_1 is q4gemv_1 for up to three weights of one x (T <= 4; the same K and group size): y_s
// [T, n_s] = x · w_sᵀ for s = 0, 1, 2 (n_2 may be 0), ceil(n_s / 64) blocks each in order, so that q, k
// and v (or the shared expert's gate and up) take one launch and the small products borrow the big
// one's blocks. q4gemv_multi_1w: WIDE.
// q4gemv_multi_pick selects the weight of q4gemv_multi's block b (64 rows a block, the products in order):
// its codes w, scales s, output y and rows n; it returns the block's first row in it.
__device__ __forceinline__ int q4gemv_multi_pick(int b, const unsigned char* w0, const bf16_t* s0, float* y0, int n0,
	const unsigned char* w1, const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2,
	const unsigned char*& w, const bf16_t*& s, float*& y, int& n) {
	int b0 = (n0 + 63) / 64, b1 = (n1 + 63) / 64;
	w = w0, s = s0, y = y0, n = n0;
	if (b >= b0 + b1) {
		w = w2, s = s2, y = y2, n = n2, b -= b0 + b1;
	} else if (b >= b0) {
		w = w1, s = s1, y = y1, n = n1, b -= b0;
	}
	return b * 64;
}

// q4gemv_multi_prefetch is q4gemv_prefetch for q4gemv_multi's block.
template <bool WIDE>
__device__ __forceinline__ void q4gemv_multi_prefetch(const unsigned char* w0, int n0, const unsigned char* w1, int n1,
	const unsigned char* w2, int n2, int K) {
	const unsigned char* w;
	const bf16_t* s;
	float* y;
	int n, r0 = q4gemv_multi_pick(blockIdx.x, w0, nullptr, nullptr, n0, w1, nullptr, nullptr, n1, w2, nullptr, nullptr, n2, w, s, y, n);
	q4gemv_prefetch<4, WIDE>(w, K, n, r0);
}

template <bool WIDE>
__device__ __forceinline__ void q4gemv_multi(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0,
	const unsigned char* w1, const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs,
	int T, int K, float* part, int* ctr) {
	const unsigned char* w;
	const bf16_t* s;
	float* y;
	int n, r0 = q4gemv_multi_pick(blockIdx.x, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, w, s, y, n);
	q4gemv_rows<4, 1, false, WIDE>(x, xdt, w, s, gs, y, T, K, n, r0, part, ctr); // one copy of the loop
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_multi_1(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0, const unsigned char* w1,
	const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs, int T, int K, float* part,
	int* ctr) {
	PDL_PROLOGUE_L2(q4gemv_multi_prefetch<false>(w0, n0, w1, n1, w2, n2, K));
	q4gemv_multi<false>(x, xdt, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, gs, T, K, part, ctr);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_multi_1w(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0, const unsigned char* w1,
	const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs, int T, int K, float* part,
	int* ctr) {
	PDL_PROLOGUE_L2(q4gemv_multi_prefetch<true>(w0, n0, w1, n1, w2, n2, K));
	q4gemv_multi<true>(x, xdt, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, gs, T, K, part, ctr);
}

// ---- The routed experts: P[split][r] = in[r] · W_e over one K split, W_e [K, N] input-major ----

// q4e_stage puts inputs [k0, k0+kn) of the ng permuted rows r, r+1, ... into xs as B registers: xs[2j][p]
// is the hi pair of inputs k0 + 2p, k0 + 2p + 1 of row r + j, xs[2j+1][p] its lo pair. The row is
// x[perm[r] / topk]·scores[perm[r]] (mode 0: gate_up, the router's score scales the input, in float32)
// or x[r] (mode 1: down), as gemv.cu's eg_stage_rows. kn is even.
template <int NR>
__device__ __forceinline__ void q4e_stage(u32 (&xs)[2 * NR][Q4E_KP], const void* __restrict__ x, int xdt, int mode,
	const int* __restrict__ perm, const float* __restrict__ scores, int topk, int K, int k0, int kn, int r, int ng) {
	int np = kn >> 1;
	for (int i = threadIdx.x; i < ng * np; i += blockDim.x) {
		int j = i / np, p = i - j * np;
		long long src;
		float sc = 1.0f;
		if (mode == 0) {
			int sl = perm[r + j];
			src = (long long)(sl / topk) * K + k0 + 2 * p;
			sc = scores[sl];
		} else {
			src = (long long)(r + j) * K + k0 + 2 * p;
		}
		float v0 = ld(x, xdt, src), v1 = ld(x, xdt, src + 1);
		if (mode == 0) {
			v0 *= sc;
			v1 *= sc;
		}
		xs[2 * j][p] = q4_bpair(v0, v1, false);
		xs[2 * j + 1][p] = q4_bpair(v0, v1, true);
	}
}

// q4e_sel is PRMT's selector that puts byte m of a in byte 0 (and 1) and byte m of b in byte 2 (and 3).
__device__ __forceinline__ u32 q4e_sel(int m) { return (u32)(m | m << 4 | (4 + m) << 8 | (4 + m) << 12); }

// q4expert_gemv_rows: block (x, y, z) takes the z-th active expert e (blocks past meta[0] return), the
// K rows [y·ksplit, min(K, (y+1)·ksplit)) of W_e = codes of expert e of w [E, K, N] (scales [E, G, N],
// G = ceil(K / gs)), and output channels [256x, 256x+256), 64 a warp, and writes P[y][r][n] = Σ_k
// in[r][k]·W_e[k][n] for the expert's permuted rows r (input rows as q4e_stage), 4·NT rows a pass.
// Lane (g, c) of warp w reads word n/8 = (256x + 64w)/8 + g (channels n .. n+7) of the K rows 2c, 2c+1,
// 2c+8 and 2c+9 of each k16 step, four steps in flight; its 8 channels are rows g and g+8 of the four
// m16 tiles: tile m's row g is channel n + 2m, row g+8 channel n + 2m + 1 (nibbles 2m and 2m+1 of a
// word; a PRMT brings byte m of two K rows' words together). K % 16 == 0, gs % 16 == 0, ksplit % 16
// == 0 and ksplit <= Q4E_KTILE; N % 8 == 0; scales 16-byte aligned.
template <int NT>
__device__ __forceinline__ void q4expert_gemv_rows(const void* __restrict__ x, int xdt, int mode, const int* __restrict__ perm,
	const float* __restrict__ scores, int topk, const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, const unsigned char* __restrict__ w, const bf16_t* __restrict__ scales, int gs, int K, int N,
	int ksplit, float* __restrict__ P, int R) {
	__shared__ u32 xs[8 * NT][Q4E_KP];
	if ((int)blockIdx.z >= meta[0]) return; // uniform over the block
	int e = active[blockIdx.z];
	int r0 = seg[2 * e], nr = seg[2 * e + 1];
	int k0 = blockIdx.y * ksplit, k1 = q4_imin(K, k0 + ksplit);
	if (k0 >= K) return;
	int kn = k1 - k0, steps = kn >> 4;
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
	int nw = blockIdx.x * Q4E_COLS + 64 * warp, n = nw + 8 * g; // this lane's 8 channels n .. n+7
	bool colok = n < N; // mma.sync needs the whole warp: lanes past N multiply zero codes
	int G = (K + gs - 1) / gs, spg = gs >> 4; // k16 steps a group
	// This lane's words of the split's first step: K rows k0 + 2c, +1, +8, +9; the next step's are 16
	// rows further.
	const u32* wp = (const u32*)(w + (((long long)e * K + k0 + 2 * c) * N + (colok ? n : 0)) / 2);
	long long rowWords = N / 8;
	const bf16_t* sp = scales + (long long)e * G * N + (colok ? n : 0);
	for (int gt = 0; gt < nr; gt += 4 * NT) {
		int ng = q4_imin(4 * NT, nr - gt);
		__syncthreads(); // the previous pass is done with xs
		q4e_stage<4 * NT>(xs, x, xdt, mode, perm, scores, topk, K, k0, kn, r0 + gt, ng);
		__syncthreads();
		float d[4][NT][4], acc[4][NT][4];
#pragma unroll
		for (int m = 0; m < 4; m++)
#pragma unroll
			for (int nt = 0; nt < NT; nt++)
#pragma unroll
				for (int i = 0; i < 4; i++) d[m][nt][i] = acc[m][nt][i] = 0.0f;
		if (nw < N) { // uniform over the warp
			int grp = (k0 >> 4) / spg, gend = (grp + 1) * spg; // the step's group, the next group's first step
			for (int s0 = 0; s0 < steps; s0 += 4) {
				int ns = q4_imin(4, steps - s0);
				u32 wv[4][4];
#pragma unroll
				for (int u = 0; u < 4; u++) {
					if (u < ns) {
						const u32* p = wp + (long long)(16 * (s0 + u)) * rowWords;
						wv[u][0] = colok ? p[0] : 0u;
						wv[u][1] = colok ? p[rowWords] : 0u;
						wv[u][2] = colok ? p[8 * rowWords] : 0u;
						wv[u][3] = colok ? p[9 * rowWords] : 0u;
					}
				}
#pragma unroll
				for (int u = 0; u < 4; u++) {
					if (u < ns) {
						int s = s0 + u;
						// B: token t = 4nt + g/2 (hi or lo by g's parity), inputs 16s + 2c, +1 and +8, +9.
						u32 bf[NT][2];
#pragma unroll
						for (int nt = 0; nt < NT; nt++) {
							int t = 4 * nt + (g >> 1);
							bf[nt][0] = bf[nt][1] = 0u;
							if (t < ng) {
								const u32* xr = &xs[8 * nt + g][8 * s + c];
								bf[nt][0] = xr[0];
								bf[nt][1] = xr[4];
							}
						}
#pragma unroll
						for (int m = 0; m < 4; m++) {
							u32 sel = q4e_sel(m);
							u32 v01 = __byte_perm(wv[u][0], wv[u][1], sel), v89 = __byte_perm(wv[u][2], wv[u][3], sel);
							u32 a0 = q4_pair(v01), a1 = q4_pair(v01 >> 4), a2 = q4_pair(v89), a3 = q4_pair(v89 >> 4);
#pragma unroll
							for (int nt = 0; nt < NT; nt++) q4_mma(d[m][nt], a0, a1, a2, a3, bf[nt][0], bf[nt][1]);
						}
						int ks = (k0 >> 4) + s; // the absolute step
						if (ks + 1 == gend || s + 1 == steps) {
							q4_u32x4 sv = {0u, 0u, 0u, 0u};
							if (colok) sv = *(const q4_u32x4*)(sp + (long long)grp * N);
							u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
							for (int m = 0; m < 4; m++) {
								float s0f = __uint_as_float(sw[m] << 16), s1f = __uint_as_float(sw[m] & 0xffff0000u);
#pragma unroll
								for (int nt = 0; nt < NT; nt++) {
									acc[m][nt][0] += d[m][nt][0] * s0f;
									acc[m][nt][1] += d[m][nt][1] * s0f;
									acc[m][nt][2] += d[m][nt][2] * s1f;
									acc[m][nt][3] += d[m][nt][3] * s1f;
#pragma unroll
									for (int i = 0; i < 4; i++) d[m][nt][i] = 0.0f;
								}
							}
							if (ks + 1 == gend) {
								grp++;
								gend += spg;
							}
						}
					}
				}
			}
			// Token 4nt + c: channel n + 2m is acc 0 + 1 (hi + lo), channel n + 2m + 1 acc 2 + 3.
			float* out = P + ((long long)blockIdx.y * R + r0 + gt) * N + n;
#pragma unroll
			for (int nt = 0; nt < NT; nt++) {
				int t = 4 * nt + c;
				if (t < ng && colok) {
#pragma unroll
					for (int m = 0; m < 4; m++) {
						q4_f32x2 v;
						v.x = acc[m][nt][0] + acc[m][nt][1];
						v.y = acc[m][nt][2] + acc[m][nt][3];
						*(q4_f32x2*)(out + (long long)t * N + 2 * m) = v;
					}
				}
			}
		}
	}
}

// q4expert_gemv_1 takes up to 4 rows of an expert a pass (decode of a few tokens), q4expert_gemv_2 up
// to 8. Blocks of Q4E_WARPS warps; grid (ceil(N / Q4E_COLS), splits, active experts bound).
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_1(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const unsigned char* w, const bf16_t* scales, int gs, int K, int N, int ksplit,
	float* P, int R) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<1>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, gs, K, N, ksplit, P, R);
}
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_2(const void* x, int xdt, int mode, const int* perm, const float* scores, int topk, const int* seg,
	const int* active, const int* meta, const unsigned char* w, const bf16_t* scales, int gs, int K, int N, int ksplit,
	float* P, int R) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<2>(x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, gs, K, N, ksplit, P, R);
}

// q4expert_gemv_swiglu_N is q4expert_gemv_N over a gate_up weight (N = 2I, I % Q4E_COLS == 0) followed by
// gemv.cu's expert_act in one launch, and q4expert_gemv_combine_N q4expert_gemv_N over a down weight (N =
// H) followed by expert_combine: the split-K epilogues of the bf16 expert_gemv_swiglu_N and
// expert_gemv_combine_N (eg_swiglu_epilogue, eg_combine_epilogue in prelude.cuh; the grids have the same
// shape, 256-column tiles), so the results equal the separate kernels' bit for bit. ctr: counters, zero
// between launches (the backend zeroes them once; each epilogue leaves them zero).
#define Q4E_PARAMS                                                                                                      \
	const void *x, int xdt, int mode, const int *perm, const float *scores, int topk, const int *seg, const int *active, \
		const int *meta, const unsigned char *w, const bf16_t *scales, int gs, int K, int N, int ksplit, float *P, int R
#define Q4E_ARGS x, xdt, mode, perm, scores, topk, seg, active, meta, w, scales, gs, K, N, ksplit, P, R
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_swiglu_1(Q4E_PARAMS, int* ctr, void* act, int adt) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<1>(Q4E_ARGS);
	eg_swiglu_epilogue(ctr, seg, active, meta, N, P, R, Q4E_COLS, act, adt);
}
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_swiglu_2(Q4E_PARAMS, int* ctr, void* act, int adt) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<2>(Q4E_ARGS);
	eg_swiglu_epilogue(ctr, seg, active, meta, N, P, R, Q4E_COLS, act, adt);
}
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_combine_1(Q4E_PARAMS, int* ctr, const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<1>(Q4E_ARGS);
	eg_combine_epilogue(ctr, topk, N, P, R, Q4E_COLS, row_of, T, out, odt, add, adt);
}
extern "C" __global__ void __launch_bounds__(Q4E_WARPS * 32)
q4expert_gemv_combine_2(Q4E_PARAMS, int* ctr, const int* row_of, int T, void* out, int odt, const void* add, int adt) {
	PDL_PROLOGUE();
	q4expert_gemv_rows<2>(Q4E_ARGS);
	eg_combine_epilogue(ctr, topk, N, P, R, Q4E_COLS, row_of, T, out, odt, add, adt);
}

// ---- Prefill: the weight dequantised to bf16 for cuBLASLt ----

// q4_val returns code i (0..7) of word v as a float, exactly: 2^23 + (n ^ 8) as a float bit pattern,
// minus 2^23 + 8 (an integer-to-float conversion is a quarter-rate instruction).
__device__ __forceinline__ float q4_val(u32 v, int i) {
	return __uint_as_float(((v >> (4 * i)) & 15u) ^ 0x4b000008u) - 8388616.0f;
}

// dequant_int4_bf16 writes elements [off, off + n) of an int4 weight viewed as [outer, in, inner]
// (row-major, element (o·in + i)·inner + c, scales [outer, G, inner] with G groups of gs along in) to
// out[0 .. n) as bf16(q·s), 32 elements a thread. With vec, the host guarantees off % 32 == 0, n % 32
// == 0, 32 | in when inner == 1 and 32 | inner otherwise, and 16-byte aligned codes, scales and out:
// a thread's 32 elements then share o and i (and, for inner == 1, the scale), one 16-byte load brings
// their codes and four 16-byte stores write them. Without vec, each element is indexed alone (shapes
// those conditions exclude).
extern "C" __global__ void dequant_int4_bf16(const unsigned char* w, const bf16_t* scales, long long in, long long inner, int gs,
	int G, long long off, long long n, int vec, bf16_t* out) {
	PDL_PROLOGUE();
	long long chunks = (n + 31) / 32;
	GRID_STRIDE(j, chunks) {
		long long e0 = off + 32 * j; // first element
		if (vec) {
			q4_u32x4 q = ((const q4_u32x4*)w)[e0 / 32];
			u32 qw[4] = {q.x, q.y, q.z, q.w};
			q4_u32x4* dst = (q4_u32x4*)(out + 32 * j);
			if (inner == 1) {
				long long o = e0 / in, i = e0 - o * in;
				float s = bf16_to_f32(scales[o * G + i / gs]);
#pragma unroll
				for (int k = 0; k < 4; k++) {
					u32 h[8];
#pragma unroll
					for (int v = 0; v < 8; v++) h[v] = f32_to_bf16(q4_val(qw[k], v) * s);
					q4_u32x4 o4;
					o4.x = h[0] | h[1] << 16;
					o4.y = h[2] | h[3] << 16;
					o4.z = h[4] | h[5] << 16;
					o4.w = h[6] | h[7] << 16;
					dst[k] = o4;
				}
			} else {
				long long oi = e0 / inner, cc = e0 - oi * inner;
				long long o = oi / in, i = oi - o * in;
				const q4_u32x4* sp = (const q4_u32x4*)(scales + (o * G + i / gs) * inner + cc);
#pragma unroll
				for (int k = 0; k < 4; k++) {
					q4_u32x4 sv = sp[k];
					u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
					u32 h[8];
#pragma unroll
					for (int v = 0; v < 8; v++) {
						float s = __uint_as_float(v & 1 ? sw[v >> 1] & 0xffff0000u : sw[v >> 1] << 16);
						h[v] = f32_to_bf16(q4_val(qw[k], v) * s);
					}
					q4_u32x4 o4;
					o4.x = h[0] | h[1] << 16;
					o4.y = h[2] | h[3] << 16;
					o4.z = h[4] | h[5] << 16;
					o4.w = h[6] | h[7] << 16;
					dst[k] = o4;
				}
			}
		} else {
			for (int v = 0; v < 32; v++) {
				long long idx = e0 + v;
				if (idx >= off + n) break;
				long long cc = idx % inner, oi = idx / inner;
				long long i = oi % in, o = oi / in;
				u32 b = w[idx >> 1];
				float q = (float)((int)(b << (28 - 4 * (int)(idx & 1))) >> 28);
				out[idx - off] = f32_to_bf16(q * bf16_to_f32(scales[(o * G + i / gs) * inner + cc]));
			}
		}
	}
}

// ---- Prefill: q4gemm, a tensor-core GEMM that dequantises the codes in registers ----
//
// y = x · W for many rows of x (bf16) and an int4 W, the weight read as its codes (½ byte a weight) and
// turned into bf16 A fragments in registers; nothing is written back but the result. A block of
// Q4G_WARPS warps computes 8·NT rows of x × 64·MT output channels; each warp takes all the block's rows
// and 16·MT channels: MT m16 tiles of channels (the A operand) × NT n8 tiles of rows (the B operand),
// 128 float accumulators a lane for either shape, and a weight is decoded once a block. K advances
// Q4G_BK a stage through Q4G_STAGES stages of shared memory filled by cp.async (16-byte copies, no
// register staging); x's rows are read as B fragments by ldmatrix (rows of 64 bytes, their 16-byte chunks
// swizzled by (row / 2) % 4, so that the 8 rows of a matrix hit 8 bank groups).
//
// The A fragment is bf16(q·s), exactly the weight dequant_int4_bf16 writes (the prefill path it replaces):
// q exact as in the GEMVs (LOP3 + fma.rn.bf16x2), then one more bf16x2 fma by the (channel, group) scale
// with -0 added, a single rounding of the exact q·s. The scale goes into the fragment rather than onto a
// per-group partial sum as in the GEMVs: a second set of 128 accumulators would not fit the registers. So
// the result differs from the dequantised path's cuBLASLt GEMM only in the order of the float32 sums. The
// groups are multiples of Q4G_BK (K too), so a stage lies in one group; a lane holds its channels' scale
// pairs for the current group and loads the next group's a stage or more ahead.
//
// The cost is the decoding: mma.sync reaches about 65 % of Hopper's tensor peak and leaves some six issue
// slots of a sub-partition per m16n8k16, of which the other instructions must take few. A fragment's 4
// pairs serve NT mma, so the warp's rows are what amortise them:
//   - dense [N, K] (Linear; q4gemm: MT 2, NT 16, a warp 32 channels × 128 rows, a block 128 × 128): a
//     channel's codes run along K, two to a byte. mma pairs two consecutive k of one channel in a register,
//     and ldmatrix gives lane c the pair at k 2c, 2c+1 of each 8-k block, so lane c takes byte c of its
//     channels' 4-byte words: a PRMT brings that byte and the same byte of the word shifted by 4 into the
//     halves' low bytes, and q4_pair's LOP3 takes the low nibble of each half (codes 2c and 2c+1). Five
//     instructions a pair, 1.25 an mma. Stage: 128 channel rows of 16 bytes.
//   - experts [E, K, N] (input-major; MT 4, NT 8, a warp 64 channels × 64 rows, a block 256 × 64: the
//     experts' rows come in runs of about T·k/E, so shorter tiles waste less): a word holds 8 channels of
//     one K row. As in q4expert_gemv, lane g of a warp reads word g (channels 8g .. 8g+7 of the warp's 64)
//     of the K rows 2c, 2c+1, 2c+8 and 2c+9 of a k16 step and a PRMT pairs byte m of two rows; tile m's
//     row g is channel 2m of the word, row g+8 channel 2m+1. Four instructions a pair, 2 an mma. Stage:
//     Q4G_BK K rows of 256 channels (128 bytes, padded to Q4G_WRS so that the 4 rows a load touches hit
//     distinct banks).
//     The routed experts' rows come grouped by expert (moe_plan with align 1: expert e's rows are seg[2e]
//     .. seg[2e] + seg[2e+1] - 1 of x); one launch covers every active expert: blockIdx.y counts row tiles
//     over the active experts in order (a warp's prefix sum over their tile counts finds the block's expert
//     and tile; slots past the last tile return at once), blockIdx.x the channel tiles. gate_up's SwiGLU
//     runs in the epilogue (q4gemm_experts_swiglu): a block takes 128 columns of gate and the same 128 of up
//     (32-column chunks alternating gate, up in the staged rows), so lane g < 4 of a warp holds gate and
//     lane g + 4 (lane + 16) up for the same columns; they swap half their sums with a shuffle each, and
//     each stores bf16(silu(gate) · up) for its half, as expert_act_v8 does.

#define Q4G_WARPS 4
#define Q4G_BK 32     // K a stage
#define Q4G_STAGES 4
#define Q4G_DMT 2     // q4gemm: m16 tiles (channels) and n8 tiles (rows) a warp (host: q4gDenseBN, q4gDenseBM)
#define Q4G_DNT 16
#define Q4G_EMT 4     // q4gemm_experts(_swiglu) (host: q4gExpertBN, q4gExpertBM)
#define Q4G_ENT 8
#define Q4G_EBM (8 * Q4G_ENT) // rows of an experts' tile

struct alignas(8) q4_u32x2 {
	u32 x, y;
};


#define Q4_NEG0 0x80008000u // bf16 pair (-0, -0): x·s + (-0) is x·s, rounded once

// q4_scaled is bf16(q·s) for the exact code pair p and the scale pair s.
__device__ __forceinline__ u32 q4_scaled(u32 p, u32 s) { return q4_fma2(p, s, Q4_NEG0); }

// q4_bytepair is the exact bf16 pair of the two codes of byte c of w (code 2c low), sel = q4e_sel(c):
// byte c of w and of w >> 4 go to the low bytes of the halves.
__device__ __forceinline__ u32 q4_bytepair(u32 w, u32 sel) { return q4_pair(__byte_perm(w, w >> 4, sel)); }

// q4_dup is the bf16 pair (s, s) of the bf16 in the low (hi false) or high half of v.
__device__ __forceinline__ u32 q4_dup(u32 v, bool hi) { return __byte_perm(v, 0u, hi ? 0x3232u : 0x1010u); }

// Q4G_DENSE, Q4G_EXPERTS and Q4G_SWIGLU are q4gemm_rows' modes: Linear's [N, K] weight into float32 y;
// the experts' [K, N] weight into float32 y; the experts' gate_up [K, 2I] into bf16 silu(gate)·up.
#define Q4G_DENSE 0
#define Q4G_EXPERTS 1
#define Q4G_SWIGLU 2

// q4gemm_rows computes the block's tile, rows m0 .. m0+8·NT-1 of rows (x [rows, K] bf16, 16-byte aligned
// rows) × channels n0 .. n0+64·MT-1, of y [rows, N] (float32) = x · W for an int4 W: MODE Q4G_DENSE w
// [N, K] with scales [N, G]; Q4G_EXPERTS (MT 4) w [K, N], scales [G, N]; Q4G_SWIGLU (MT 4) w [K, N = 2I],
// scales [G, N], n0 a column of act [rows, I] (bf16): the tile is act columns n0 .. n0+127, from gate's
// and up's. G = ceil(K / gs); K % Q4G_BK == 0, gs % Q4G_BK == 0; codes 16-byte aligned; experts: N % 32
// == 0 (SWIGLU: I % 32 == 0), scales 16-byte aligned. Rows and channels past the ends are read clamped
// (rows >= 1) and not written.
template <int MODE, int MT, int NT>
__device__ __forceinline__ void q4gemm_rows(const bf16_t* __restrict__ x, const unsigned char* __restrict__ w,
	const bf16_t* __restrict__ scales, int gs, int rows, int K, int N, int m0, int n0, float* __restrict__ y, int I,
	bf16_t* __restrict__ act) {
	constexpr int BM = 8 * NT, BN = 64 * MT, THREADS = 32 * Q4G_WARPS;
	constexpr int XB = BM * Q4G_BK * 2;                                 // bytes of x a stage
	constexpr int WRS = BN / 2 + 16;                                    // experts: bytes of a staged K row (padded)
	constexpr int WB = MODE == Q4G_DENSE ? BN * Q4G_BK / 2 : Q4G_BK * WRS; // bytes of codes a stage
	constexpr int SB = XB + WB;                                         // bytes a stage
	constexpr int XC = BM * 4 / THREADS, WC = BN / THREADS;             // 16-byte copies a thread a stage
	static_assert(MODE == Q4G_DENSE || MT == 4, "the experts' lanes read a word of 8 channels: 4 m16 tiles");
	static_assert(XC * THREADS == BM * 4 && WC * THREADS == BN && SB % 16 == 0, "q4gemm_rows: tile shape");
	__shared__ q4_u32x4 q4g_sm[Q4G_STAGES * SB / 16];
	int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
	int KT = K / Q4G_BK;
	unsigned sm = tc_smem(q4g_sm);
	const char* smp = (const char*)q4g_sm;
	// cp.async: x chunk tid + THREADS·i (row chunk / 4, 16-byte chunk chunk % 4 of its 64 bytes a stage);
	// codes chunk tid + THREADS·i (dense: the 16 bytes of channel row n0 + chunk; experts: K row chunk / 8
	// of the stage, 32-channel chunk chunk % 8 of the staged row).
	const bf16_t* xs[XC];
	unsigned xd[XC];
#pragma unroll
	for (int i = 0; i < XC; i++) {
		int r = (tid + THREADS * i) >> 2, j = tid & 3;
		xs[i] = x + (long long)q4_imin(m0 + r, rows - 1) * K + 8 * j;
		xd[i] = r * 64 + 16 * (j ^ ((r >> 1) & 3));
	}
	const unsigned char* ws[WC];
	unsigned wd[WC];
	long long wstep; // bytes of codes a stage further along K
	if (MODE == Q4G_DENSE) {
#pragma unroll
		for (int i = 0; i < WC; i++) {
			ws[i] = w + (long long)q4_imin(n0 + tid + THREADS * i, N - 1) * (K >> 1);
			wd[i] = XB + 16 * (tid + THREADS * i);
		}
		wstep = Q4G_BK / 2;
	} else {
		int j = tid & 7, col;
		if (MODE == Q4G_EXPERTS) {
			col = n0 + 32 * j;
			if (col >= N) col = 0;
		} else {
			col = n0 + 32 * (j >> 1);
			col = col < I ? col + (j & 1) * I : 0;
		}
#pragma unroll
		for (int i = 0; i < WC; i++) {
			int kr = (tid + THREADS * i) >> 3;
			ws[i] = w + ((long long)kr * N + col) / 2;
			wd[i] = XB + kr * WRS + 16 * j;
		}
		wstep = (long long)Q4G_BK * N / 2;
	}
	// The lane's scales: dense, channel rows 16·MT·warp + 16m + 8h + g (sc[2m + h]); experts, the 8
	// channels of its word from column scol (sc[m] = channel 2m's pair, sc[4 + m] channel 2m+1's).
	int scol = 0;
	if (MODE == Q4G_EXPERTS) {
		scol = n0 + 64 * warp + 8 * g;
		if (scol >= N) scol = 0;
	} else if (MODE == Q4G_SWIGLU) {
		scol = n0 + 32 * warp + 8 * (g & 3);
		scol = scol < I ? scol + (g >> 2) * I : 0;
	}
	constexpr int NS = MODE == Q4G_DENSE ? 2 * MT : 8;
	u32 sc[NS], sn[NS];
	int G = (K + gs - 1) / gs;
#define Q4G_LOAD_SCALES(grp)                                                                                      \
	do {                                                                                                          \
		if (MODE == Q4G_DENSE) {                                                                                  \
			_Pragma("unroll") for (int i = 0; i < NS; i++) {                                                      \
				int ch = q4_imin(n0 + 16 * MT * warp + 16 * (i >> 1) + 8 * (i & 1) + g, N - 1);                   \
				sn[i] = scales[(long long)ch * G + (grp)];                                                        \
			}                                                                                                     \
		} else {                                                                                                  \
			q4_u32x4 v = *(const q4_u32x4*)(scales + (long long)(grp) * N + scol);                                \
			sn[0] = v.x, sn[1] = v.y, sn[2] = v.z, sn[3] = v.w;                                                   \
		}                                                                                                         \
	} while (0)
	Q4G_LOAD_SCALES(0);
	// The stages ahead: tiles 0 .. Q4G_STAGES-2 (a group committed for each, empty past KT).
#pragma unroll
	for (int s = 0; s < Q4G_STAGES - 1; s++) {
		if (s < KT) {
			unsigned b = sm + s * SB;
#pragma unroll
			for (int i = 0; i < XC; i++) tc_cp16(b + xd[i], xs[i] + s * Q4G_BK);
#pragma unroll
			for (int i = 0; i < WC; i++) tc_cp16(b + wd[i], ws[i] + s * wstep);
		}
		tc_commit();
	}
	float acc[MT][NT][4];
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int nt = 0; nt < NT; nt++)
#pragma unroll
			for (int i = 0; i < 4; i++) acc[m][nt][i] = 0.0f;
	u32 csel = q4e_sel(c);
	int gnext = 0, grp = 0; // the K of the next group's first stage, and that group
	for (int kt = 0; kt < KT; kt++) {
		tc_wait<Q4G_STAGES - 2>(); // this thread's copies of tile kt have landed
		__syncthreads();           // everyone's have, and everyone is done with tile kt-1's stage
		int nk = kt + Q4G_STAGES - 1;
		if (nk < KT) {
			unsigned b = sm + (nk % Q4G_STAGES) * SB;
#pragma unroll
			for (int i = 0; i < XC; i++) tc_cp16(b + xd[i], xs[i] + (long long)nk * Q4G_BK);
#pragma unroll
			for (int i = 0; i < WC; i++) tc_cp16(b + wd[i], ws[i] + nk * wstep);
		}
		tc_commit();
		if (kt * Q4G_BK == gnext) { // uniform: a new scale group starts with this tile
			if (MODE == Q4G_DENSE) {
#pragma unroll
				for (int i = 0; i < NS; i++) sc[i] = q4_dup(sn[i], false);
			} else {
#pragma unroll
				for (int m = 0; m < 4; m++) {
					sc[m] = q4_dup(sn[m], false);
					sc[4 + m] = q4_dup(sn[m], true);
				}
			}
			gnext += gs;
			grp++;
			if (grp < G) Q4G_LOAD_SCALES(grp); // needed a stage or more from now
		}
		unsigned xsm = sm + (kt % Q4G_STAGES) * SB;
		const char* wsm = smp + (kt % Q4G_STAGES) * SB + XB;
#pragma unroll
		for (int s = 0; s < Q4G_BK / 16; s++) {
			// A: the warp's MT tiles of channels for k 16s .. 16s+15 of the stage.
			u32 a[MT][4];
			if (MODE == Q4G_DENSE) { // channel rows 16m + g and + 8: words 2s (k 0-7) and 2s+1 (k 8-15)
#pragma unroll
				for (int m = 0; m < MT; m++) {
					const char* wr = wsm + (16 * MT * warp + 16 * m + g) * 16 + 8 * s;
					q4_u32x2 lo = *(const q4_u32x2*)wr, hi = *(const q4_u32x2*)(wr + 128);
					a[m][0] = q4_scaled(q4_bytepair(lo.x, csel), sc[2 * m]);
					a[m][1] = q4_scaled(q4_bytepair(hi.x, csel), sc[2 * m + 1]);
					a[m][2] = q4_scaled(q4_bytepair(lo.y, csel), sc[2 * m]);
					a[m][3] = q4_scaled(q4_bytepair(hi.y, csel), sc[2 * m + 1]);
				}
			} else { // K rows 16s + 2c, +1, +8, +9: the lane's word of the warp's 32 bytes
				const char* wr = wsm + (16 * s + 2 * c) * WRS + 32 * warp + 4 * g;
				u32 w0 = *(const u32*)wr, w1 = *(const u32*)(wr + WRS), w8 = *(const u32*)(wr + 8 * WRS),
				    w9 = *(const u32*)(wr + 9 * WRS);
#pragma unroll
				for (int m = 0; m < MT; m++) {
					u32 sel = q4e_sel(m);
					u32 v01 = __byte_perm(w0, w1, sel), v89 = __byte_perm(w8, w9, sel);
					a[m][0] = q4_scaled(q4_pair(v01), sc[m]);
					a[m][1] = q4_scaled(q4_pair(v01 >> 4), sc[4 + m]);
					a[m][2] = q4_scaled(q4_pair(v89), sc[m]);
					a[m][3] = q4_scaled(q4_pair(v89 >> 4), sc[4 + m]);
				}
			}
			// B: rows 16p .. 16p+15 of the tile (chunks 2s, 2s+1 of their 64 bytes), then the mma.
#pragma unroll
			for (int p = 0; p < NT / 2; p++) {
				int row = 16 * p + (lane & 7) + ((lane >> 4) << 3), ch = 2 * s + ((lane >> 3) & 1);
				u32 b0, b1, b2, b3;
				tc_ldsm4(xsm + row * 64 + 16 * (ch ^ ((row >> 1) & 3)), b0, b1, b2, b3);
#pragma unroll
				for (int m = 0; m < MT; m++) {
					q4_mma(acc[m][2 * p], a[m][0], a[m][1], a[m][2], a[m][3], b0, b1);
					q4_mma(acc[m][2 * p + 1], a[m][0], a[m][1], a[m][2], a[m][3], b2, b3);
				}
			}
		}
	}
#undef Q4G_LOAD_SCALES
	// Lane (g, c) holds, for rows m0 + 8nt + 2c (acc 0, 2) and + 1 (acc 1, 3), tile m's rows g (acc 0, 1)
	// and g + 8 (acc 2, 3).
	if (MODE == Q4G_DENSE) {
#pragma unroll
		for (int m = 0; m < MT; m++) {
			int ch = n0 + 16 * MT * warp + 16 * m + g;
#pragma unroll
			for (int nt = 0; nt < NT; nt++)
#pragma unroll
				for (int i = 0; i < 4; i++) {
					int t = m0 + 8 * nt + 2 * c + (i & 1), n = ch + 8 * (i >> 1);
					if (t < rows && n < N) y[(long long)t * N + n] = acc[m][nt][i];
				}
		}
	} else if (MODE == Q4G_EXPERTS) {
		int ch = n0 + 64 * warp + 8 * g; // channels ch + 2m (acc 0, 1) and ch + 2m + 1 (acc 2, 3)
		if (ch < N) {
#pragma unroll
			for (int nt = 0; nt < NT; nt++)
#pragma unroll
				for (int h = 0; h < 2; h++) {
					int t = m0 + 8 * nt + 2 * c + h;
					if (t < rows) {
#pragma unroll
						for (int m = 0; m < MT; m++) {
							q4_f32x2 v;
							v.x = acc[m][nt][h];
							v.y = acc[m][nt][2 + h];
							*(q4_f32x2*)(y + (long long)t * N + ch + 2 * m) = v;
						}
					}
				}
		}
	} else {
		// Gate lanes (g < 4) keep tiles 0, 1 (columns col + 0..3) and take up's from lane + 16; up lanes keep
		// tiles 2, 3 (col + 4..7) and take gate's.
		bool gate = g < 4;
		int col = n0 + 32 * warp + 8 * (g & 3) + (gate ? 0 : 4);
#pragma unroll
		for (int mm = 0; mm < 2; mm++)
#pragma unroll
			for (int nt = 0; nt < NT; nt++) {
				float h[4];
#pragma unroll
				for (int i = 0; i < 4; i++) {
					float keep = gate ? acc[mm][nt][i] : acc[2 + mm][nt][i];
					float other = __shfl_xor_sync(0xffffffffu, gate ? acc[2 + mm][nt][i] : acc[mm][nt][i], 16);
					float gv = gate ? keep : other, uv = gate ? other : keep;
					h[i] = silu(gv) * uv;
				}
				int n = col + 2 * mm;
				if (n < I) {
#pragma unroll
					for (int hh = 0; hh < 2; hh++) {
						int t = m0 + 8 * nt + 2 * c + hh;
						if (t < rows) *(u32*)(act + (long long)t * I + n) = (u32)f32_to_bf16(h[hh]) | (u32)f32_to_bf16(h[2 + hh]) << 16;
					}
				}
			}
	}
}

// q4gemm: y [T, N] (float32) = x [T, K] (bf16) · w [N, K]ᵀ for an int4 w with scales [N, ceil(K / gs)].
// Grid (ceil(N / (64·Q4G_DMT)), ceil(T / (8·Q4G_DNT))), Q4G_WARPS warps. K % 32 == 0, gs % 32 == 0; x
// and w 16-byte aligned.
extern "C" __global__ void __launch_bounds__(Q4G_WARPS * 32)
q4gemm(const bf16_t* x, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemm_rows<Q4G_DENSE, Q4G_DMT, Q4G_DNT>(x, w, scales, gs, T, K, N, blockIdx.y * 8 * Q4G_DNT, blockIdx.x * 64 * Q4G_DMT, y,
		0, nullptr);
}

// q4g_expert_tile finds the row tile slot blockIdx.y among the active experts' tiles (ceil(rows /
// Q4G_EBM) each, in active order): the expert and its tile, or false past the last tile. Every warp
// computes the same answer: 32 experts a round, a prefix sum over the lanes.
__device__ __forceinline__ bool q4g_expert_tile(const int* __restrict__ seg, const int* __restrict__ active,
	const int* __restrict__ meta, int& e, int& tile) {
	int lane = threadIdx.x & 31, na = meta[0], want = blockIdx.y, base = 0;
	for (int i0 = 0; i0 < na; i0 += 32) { // uniform
		int i = i0 + lane, ex = 0, nt = 0;
		if (i < na) {
			ex = active[i];
			nt = (seg[2 * ex + 1] + Q4G_EBM - 1) / Q4G_EBM;
		}
		int inc = nt;
#pragma unroll
		for (int o = 1; o < 32; o <<= 1) {
			int v = __shfl_sync(0xffffffffu, inc, (lane - o) & 31);
			if (lane >= o) inc += v;
		}
		int total = __shfl_sync(0xffffffffu, inc, 31);
		if (want < base + total) {
			int first = base + inc > want ? lane : 32;
#pragma unroll
			for (int o = 16; o > 0; o >>= 1) first = q4_imin(first, __shfl_xor_sync(0xffffffffu, first, o));
			e = __shfl_sync(0xffffffffu, ex, first);
			tile = want - base - __shfl_sync(0xffffffffu, inc - nt, first);
			return true;
		}
		base += total;
	}
	return false;
}

// q4gemm_experts: for each active expert e (moe_plan's seg, active and meta, align 1), y[r] (float32, N
// columns) = x[r] · W_e for its rows r = seg[2e] .. seg[2e] + seg[2e+1] - 1 of x [R, K] (bf16), W_e = the
// codes of expert e of w [E, K, N] (scales [E, ceil(K / gs), N]). Grid (ceil(N / (64·Q4G_EMT)), ceil(R /
// Q4G_EBM) + min(E, R)), Q4G_WARPS warps. K % 32 == 0, gs % 32 == 0, N % 32 == 0; x, w and scales
// 16-byte aligned.
extern "C" __global__ void __launch_bounds__(Q4G_WARPS * 32)
q4gemm_experts(const bf16_t* x, const int* seg, const int* active, const int* meta, const unsigned char* w, const bf16_t* scales,
	int gs, int K, int N, float* y) {
	PDL_PROLOGUE();
	int e, tile;
	if (!q4g_expert_tile(seg, active, meta, e, tile)) return; // uniform over the block
	long long r0 = seg[2 * e];
	q4gemm_rows<Q4G_EXPERTS, Q4G_EMT, Q4G_ENT>(x + r0 * K, w + (long long)e * K * N / 2, scales + (long long)e * ((K + gs - 1) / gs) * N,
		gs, seg[2 * e + 1], K, N, tile * Q4G_EBM, blockIdx.x * 64 * Q4G_EMT, y + r0 * N, 0, nullptr);
}

// q4gemm_experts_swiglu is q4gemm_experts over gate_up (w [E, K, 2I], gate columns then up) with SiLU·mul
// in the epilogue: act[r][j] (bf16, I columns) = bf16(silu(gate) · up), gate = x[r] · W_e[:, j] and up
// = x[r] · W_e[:, I + j]. Grid (ceil(I / (32·Q4G_EMT)), as q4gemm_experts). I % 32 == 0.
extern "C" __global__ void __launch_bounds__(Q4G_WARPS * 32)
q4gemm_experts_swiglu(const bf16_t* x, const int* seg, const int* active, const int* meta, const unsigned char* w,
	const bf16_t* scales, int gs, int K, int I, bf16_t* act) {
	PDL_PROLOGUE();
	int e, tile;
	if (!q4g_expert_tile(seg, active, meta, e, tile)) return; // uniform over the block
	long long r0 = seg[2 * e], N = 2LL * I;
	q4gemm_rows<Q4G_SWIGLU, Q4G_EMT, Q4G_ENT>(x + r0 * K, w + (long long)e * K * N / 2, scales + (long long)e * ((K + gs - 1) / gs) * N,
		gs, seg[2 * e + 1], K, (int)N, tile * Q4G_EBM, blockIdx.x * 32 * Q4G_EMT, nullptr, I, act + r0 * I);
}
