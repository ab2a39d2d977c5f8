// emu.h: a tiny SIMT emulator for checking kernels on a machine without a GPU (scripts/gpu/emu-quant.sh):
// one block at a time, one std::thread per CUDA thread, std::barrier for __syncthreads and warp shuffles.
// __shared__ becomes static, so blocks must run one at a time (launch does). Only what the checked kernels
// use is here. __syncwarp and __match_any_sync are barriers of the warp, so every lane of a warp must reach
// them together (moe_plan's do). It also defines TPF_EMU and C++ versions of the prelude's PTX helpers
// (tc_*) and the kernels' own (cp.async, ldmatrix, mma.sync: m16n8k16 bf16 and f16, m16n8k32 E4M3; cvt
// bf16x2, ld.global.cg): each
// lane gets exactly the fragment the PTX ISA gives it, exchanged through the warp's barrier, so kernels
// built on them (attention_flash, attention_decode, the grouped expert GEMMs) run here too.
#define TPF_EMU 1
#include <cstdio>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <vector>
#include <thread>
#include <barrier>
#include <functional>
#include <memory>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* g_block;
std::vector<std::unique_ptr<std::barrier<>>> g_warp;
uint64_t g_shfl[1024];
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
typedef unsigned int u32_;
static inline float __uint_as_float(unsigned u){float f; memcpy(&f,&u,4); return f;}
static inline float __int_as_float(int u){float f; memcpy(&f,&u,4); return f;}
static inline unsigned __float_as_uint(float f){unsigned u; memcpy(&u,&f,4); return u;}
static inline void __syncthreads() { g_block->arrive_and_wait(); }
static inline void __syncwarp(unsigned = 0) { g_warp[threadIdx.x >> 5]->arrive_and_wait(); }
// emu_shfl returns lane src's v (src within this thread's warp), for any 4- or 8-byte type.
template <class T>
static inline T emu_shfl(T v, int src) {
	static_assert(sizeof(T) <= 8, "shuffle of a type over 8 bytes");
	int t = threadIdx.x, w = t >> 5;
	uint64_t u = 0;
	memcpy(&u, &v, sizeof(T));
	g_shfl[t] = u;
	g_warp[w]->arrive_and_wait();
	u = g_shfl[(w << 5) + (src & 31)];
	g_warp[w]->arrive_and_wait();
	T r;
	memcpy(&r, &u, sizeof(T));
	return r;
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, (threadIdx.x & 31) ^ o); }
template <class T> static inline T __shfl_sync(unsigned, T v, int src) { return emu_shfl(v, src); }
int g_match[1024];
static inline unsigned __match_any_sync(unsigned, int v) {
	int t = threadIdx.x, w = t >> 5, n = std::min(32, (int)blockDim.x - 32 * w);
	g_match[t] = v;
	g_warp[w]->arrive_and_wait();
	unsigned m = 0;
	for (int i = 0; i < n; i++)
		if (g_match[32 * w + i] == v) m |= 1u << i;
	g_warp[w]->arrive_and_wait();
	return m;
}
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline float __fmul_rn(float a, float b) { return a * b; } // compiled with -ffp-contract=off
static inline long long clock64() { return 0; }

// Shared-memory addresses (__cvta_generic_to_shared) are offsets from an anchor in the same static data as
// the kernels' __shared__ arrays, so they fit the 32 bits PTX gives them.
static char emu_anchor;
// (Integer arithmetic: the pointers are not into emu_anchor, which the compiler must not assume.)
static inline unsigned __cvta_generic_to_shared(const void* p) { return (unsigned)(uint32_t)((uintptr_t)p - (uintptr_t)&emu_anchor); }
static inline char* emu_smem(unsigned a) { return (char*)((uintptr_t)&emu_anchor + (uintptr_t)(intptr_t)(int32_t)a); }

// emu_xch is each thread's exchange slots for the warp-wide matrix operations below.
uint32_t emu_xch[1024][8];
static inline void emu_warp_wait() { g_warp[threadIdx.x >> 5]->arrive_and_wait(); }
static inline float emu_bf16(uint32_t h) { uint32_t u = h << 16; float f; memcpy(&f, &u, 4); return f; }

// cp.async: the copy happens at once (commit and wait have nothing left to do).
static inline void tc_cp16(unsigned dst, const void* src) { memcpy(emu_smem(dst), src, 16); }
static inline void tc_zero16(unsigned dst) { memset(emu_smem(dst), 0, 16); }
static inline void tc_commit() {}
static inline void tc_wait_all() {}
template <int N> static inline void tc_wait() {}
static inline float fa_ldcg(const float* p) { return *p; }

// ldmatrix.m8n8.x4 (.trans): lanes 8i..8i+7 give the row addresses of matrix i; register i of lane (g, c)
// = (lane/4, lane%4) gets row g, columns 2c, 2c+1 of matrix i (.trans: rows 2c, 2c+1 of column g).
static inline void emu_ldmatrix(unsigned addr, bool trans, u32_& r0, u32_& r1, u32_& r2, u32_& r3) {
	int t = threadIdx.x, w0 = t & ~31, lane = t & 31, g = lane >> 2, c = lane & 3;
	emu_xch[t][0] = addr;
	emu_warp_wait();
	u32_ r[4];
	for (int i = 0; i < 4; i++) {
		if (!trans) memcpy(&r[i], emu_smem(emu_xch[w0 + 8 * i + g][0]) + 4 * c, 4);
		else {
			uint16_t lo, hi;
			memcpy(&lo, emu_smem(emu_xch[w0 + 8 * i + 2 * c][0]) + 2 * g, 2);
			memcpy(&hi, emu_smem(emu_xch[w0 + 8 * i + 2 * c + 1][0]) + 2 * g, 2);
			r[i] = lo | (u32_)hi << 16;
		}
	}
	emu_warp_wait();
	r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
static inline void tc_ldsm4(unsigned a, u32_& r0, u32_& r1, u32_& r2, u32_& r3) { emu_ldmatrix(a, false, r0, r1, r2, r3); }
static inline void tc_ldsm4_t(unsigned a, u32_& r0, u32_& r1, u32_& r2, u32_& r3) { emu_ldmatrix(a, true, r0, r1, r2, r3); }

// emu_mma is mma.sync.m16n8k16 (EPR = 2 elements of 16 bits a register) or m16n8k32 (EPR = 4 of 8 bits)
// .row.col with float32 accumulation: d += a·b with the fragments of the PTX ISA (g = lane/4, c = lane%4,
// KH = 4·EPR, half of K): A a0 (row g, k EPR·c ..), a1 (row g+8), a2 (row g, k KH + EPR·c ..), a3 (row g+8,
// k KH + EPR·c ..); B b0 (k EPR·c .., n g), b1 (k KH + EPR·c ..); C/D d0,d1 (row g, n 2c, 2c+1), d2,d3
// (row g+8). Element i of a register is its bits [i·32/EPR, (i+1)·32/EPR), the lower k first; dec gives
// its value. Products are exact in float (bf16, f16 and E4M3 alike); the sum runs in float in k order.
template <int EPR, class Dec>
static inline void emu_mma(float* d, const u32_* a, u32_ b0, u32_ b1, Dec dec) {
	constexpr int KH = 4 * EPR, BITS = 32 / EPR;
	int t = threadIdx.x, w0 = t & ~31, lane = t & 31, g = lane >> 2, c = lane & 3;
	for (int i = 0; i < 4; i++) emu_xch[t][i] = a[i];
	emu_xch[t][4] = b0;
	emu_xch[t][5] = b1;
	emu_warp_wait();
	auto elem = [&](uint32_t v, int k) { return dec((v >> (BITS * (k % EPR))) & ((1u << BITS) - 1)); };
	auto A = [&](int row, int k) { return elem(emu_xch[w0 + (row & 7) * 4 + (k % KH) / EPR][(row >= 8) + 2 * (k >= KH)], k); };
	auto B = [&](int k, int n) { return elem(emu_xch[w0 + n * 4 + (k % KH) / EPR][4 + (k >= KH)], k); };
	float r[4];
	for (int e = 0; e < 4; e++) {
		int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
		float acc = d[e];
		for (int k = 0; k < 2 * KH; k++) acc += A(row, k) * B(k, col);
		r[e] = acc;
	}
	emu_warp_wait();
	for (int e = 0; e < 4; e++) d[e] = r[e];
}

// emu_f16 is the value of binary16 bits h (exact in float).
static inline float emu_f16(uint32_t h) {
	int e = (h >> 10) & 31, m = h & 1023;
	float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(1024 + m), e - 25);
	return h & 0x8000u ? -v : v;
}
// emu_e4m3 is the value of E4M3 code b (OCP e4m3fn: 0x7F and 0xFF are NaN), computed independently of the
// kernels' decoders.
static inline float emu_e4m3(uint32_t b) {
	int e = (b >> 3) & 15, m = b & 7;
	float v = (b & 0x7f) == 0x7f ? NAN : e == 0 ? std::ldexp((float)m, -9) : std::ldexp((float)(8 + m), e - 10);
	return b & 0x80u ? -v : v;
}

// The mma shapes the kernels use: bf16 and f16 m16n8k16, E4M3 m16n8k32.
static inline void tc_mma(float* d, const u32_* a, u32_ b0, u32_ b1) { emu_mma<2>(d, a, b0, b1, emu_bf16); }
static inline void emu_mma_f16(float* d, const u32_* a, u32_ b0, u32_ b1) { emu_mma<2>(d, a, b0, b1, emu_f16); }
static inline void emu_mma_e4m3(float* d, const u32_* a, u32_ b0, u32_ b1) { emu_mma<4>(d, a, b0, b1, emu_e4m3); }

// cvt.rn.bf16x2.f32: lo and hi to bf16, round to nearest even (NaN to the canonical NaN), lo in the low half.
static inline uint32_t emu_rn_bf16(float f) {
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
	u += 0x7fffu + ((u >> 16) & 1u);
	return u >> 16;
}
static inline u32_ tc_pack(float lo, float hi) { return emu_rn_bf16(lo) | emu_rn_bf16(hi) << 16; }

// quant_int4.cu's other PTX (its mma is tc_mma above): byte permutes (PRMT) and fma.rn.bf16x2.
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
	unsigned long long v = (unsigned long long)y << 32 | x, r = 0;
	for (int i = 0; i < 4; i++) r |= ((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
	return (unsigned)r;
}
static inline unsigned emu_fma_bf16x2(unsigned a, unsigned b, unsigned c) {
	unsigned lo = emu_rn_bf16(std::fma(emu_bf16(a & 0xffff), emu_bf16(b & 0xffff), emu_bf16(c & 0xffff)));
	unsigned hi = emu_rn_bf16(std::fma(emu_bf16(a >> 16), emu_bf16(b >> 16), emu_bf16(c >> 16)));
	return lo | hi << 16;
}
template <class F>
void launch(dim3 grid, dim3 block, F f) {
	gridDim = grid; blockDim = block;
	for (unsigned z = 0; z < grid.z; z++) for (unsigned y = 0; y < grid.y; y++) for (unsigned x = 0; x < grid.x; x++) {
		std::barrier<> bb(block.x);
		g_block = &bb;
		g_warp.clear();
		for (unsigned w = 0; w < (block.x + 31) / 32; w++) g_warp.emplace_back(new std::barrier<>(std::min(32u, block.x - 32 * w)));
		std::vector<std::thread> ts;
		for (unsigned t = 0; t < block.x; t++) ts.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; f(); });
		for (auto& th : ts) th.join();
	}
}
