// quant_int4.cu: int4 weights (package quant's Int4: two's-complement nibbles, element 2j in the low
// nibble of byte j, one bf16 scale per output channel and group of gs input elements) without a format
// branch: the decode GEMVs on tensor cores and the prefill path's dequantisation to bf16.
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
// 16-byte load, four 16-byte stores, and the index arithmetic once per 32 elements.
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
// The SIMT emulator (scripts/gpu/emu/emu.h) stands in for the PTX: its fa_mma is flash.cu's mma.
__device__ __forceinline__ void q4_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
	u32 a[4] = {a0, a1, a2, a3};
	fa_mma(d, a, b0, b1);
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
// records of the T rows (xdt ignored). The block's W = blockDim.x / 32 warps (at most Q4_MAXW) split
// the K / 32 input blocks into W contiguous ranges; each warp covers all the block's rows (MT m16 tiles)
// with four blocks' codes in flight, and the warps' sums are added in warp order through shared memory
// (a fixed order). K % 32 == 0, gs % 32 == 0; x 16-byte aligned, w 4-byte aligned. Without WIDE a lane
// loads word c of each 16-byte block (four-byte loads: a step stays in a 32-input block, for groups of
// 32); WIDE (K % 128 == 0, gs % 128 == 0, w 16-byte aligned) loads the lane's 16 bytes of a 128-input
// tile at once, ranges in whole tiles.
template <int MT, int NT, bool PREP, bool WIDE>
__device__ __forceinline__ void q4gemv_rows(const void* __restrict__ x, int xdt, const unsigned char* __restrict__ w,
	const bf16_t* __restrict__ scales, int gs, float* __restrict__ y, int T, int K, int N, int n0) {
	__shared__ float red[Q4_MAXW][16 * MT][4 * NT];
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
	int g = lane >> 2, c = lane & 3;
	int nb = K >> 5, per = WIDE ? ((nb >> 2) + W - 1) / W * 4 : (nb + W - 1) / W;
	int b0 = q4_imin(nb, warp * per), b1 = q4_imin(nb, b0 + per);
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
	for (int i = threadIdx.x; i < 16 * MT * 4 * NT; i += blockDim.x) {
		int r = i / (4 * NT), t = i - r * (4 * NT);
		float v = 0.0f;
		for (int q = 0; q < W; q++) v += red[q][r][t];
		if (t < T && n0 + r < N) y[(long long)t * N + n0 + r] = v;
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
// q4gemv_Nw the same with WIDE loads (groups and K multiples of 128). Grid: ceil(N / (16·MT)) blocks of
// W <= Q4_MAXW warps (Q4_MAXW / 2 for q4gemv_4, whose registers would spill at 512 threads).
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_1(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<4, 1, false, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 64);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_2(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<2, 2, true, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 16)
q4gemv_4(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<2, 4, true, false>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_1w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<4, 1, false, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 64);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_2w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<2, 2, true, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 16)
q4gemv_4w(const void* x, int xdt, const unsigned char* w, const bf16_t* scales, int gs, float* y, int T, int K, int N) {
	PDL_PROLOGUE();
	q4gemv_rows<2, 4, true, true>(x, xdt, w, scales, gs, y, T, K, N, blockIdx.x * 32);
}

// q4gemv_multi_1 is q4gemv_1 for up to three weights of one x (T <= 4; the same K and group size): y_s
// [T, n_s] = x · w_sᵀ for s = 0, 1, 2 (n_2 may be 0), ceil(n_s / 64) blocks each in order, so that q, k
// and v (or the shared expert's gate and up) take one launch and the small products borrow the big
// one's blocks. q4gemv_multi_1w: WIDE.
template <bool WIDE>
__device__ __forceinline__ void q4gemv_multi(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0,
	const unsigned char* w1, const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs,
	int T, int K) {
	int b = blockIdx.x, b0 = (n0 + 63) / 64, b1 = (n1 + 63) / 64;
	const unsigned char* w = w0;
	const bf16_t* s = s0;
	float* y = y0;
	int n = n0;
	if (b >= b0 + b1) {
		w = w2, s = s2, y = y2, n = n2, b -= b0 + b1;
	} else if (b >= b0) {
		w = w1, s = s1, y = y1, n = n1, b -= b0;
	}
	q4gemv_rows<4, 1, false, WIDE>(x, xdt, w, s, gs, y, T, K, n, b * 64); // one copy of the loop
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_multi_1(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0, const unsigned char* w1,
	const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs, int T, int K) {
	PDL_PROLOGUE();
	q4gemv_multi<false>(x, xdt, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, gs, T, K);
}
extern "C" __global__ void __launch_bounds__(Q4_MAXW * 32)
q4gemv_multi_1w(const void* x, int xdt, const unsigned char* w0, const bf16_t* s0, float* y0, int n0, const unsigned char* w1,
	const bf16_t* s1, float* y1, int n1, const unsigned char* w2, const bf16_t* s2, float* y2, int n2, int gs, int T, int K) {
	PDL_PROLOGUE();
	q4gemv_multi<true>(x, xdt, w0, s0, y0, n0, w1, s1, y1, n1, w2, s2, y2, n2, gs, T, K);
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
