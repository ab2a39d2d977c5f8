// emu.h: a tiny SIMT emulator for checking kernels on a machine without a GPU (scripts/gpu/emu-quant.sh):
// one block at a time, one std::thread per CUDA thread, std::barrier for __syncthreads and warp shuffles.
// __shared__ becomes static, so blocks must run one at a time (launch does). Only what gemv.cu and
// quant.cu use is here; moe_plan (__match_any_sync) is compiled but not run.
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
float g_shfl[1024];
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
typedef unsigned int u32_;
static inline float __uint_as_float(unsigned u){float f; memcpy(&f,&u,4); return f;}
static inline float __int_as_float(int u){float f; memcpy(&f,&u,4); return f;}
static inline unsigned __float_as_uint(float f){unsigned u; memcpy(&u,&f,4); return u;}
static inline void __syncthreads() { g_block->arrive_and_wait(); }
static inline void __syncwarp(unsigned = 0) {}
static inline float __shfl_xor_sync(unsigned, float v, int o) {
	int t = threadIdx.x, w = t >> 5;
	g_shfl[t] = v;
	g_warp[w]->arrive_and_wait();
	float r = g_shfl[t ^ o];
	g_warp[w]->arrive_and_wait();
	return r;
}
static inline float __shfl_sync(unsigned, float v, int src) {
	int t = threadIdx.x, w = t >> 5;
	g_shfl[t] = v;
	g_warp[w]->arrive_and_wait();
	float r = g_shfl[(w << 5) + (src & 31)];
	g_warp[w]->arrive_and_wait();
	return r;
}
static inline unsigned __match_any_sync(unsigned, int) { abort(); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
	unsigned long long v = (unsigned long long)y << 32 | x, r = 0;
	for (int i = 0; i < 4; i++) r |= ((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
	return (unsigned)r;
}
// What quant_int4.cu's PTX does (it calls these where TPFLEET_EMU is defined): mma.sync m16n8k16 with
// bf16 operands and float32 accumulation, its fragments exchanged through per-thread slots and the warp
// barrier, and fma.rn.bf16x2.
#define TPFLEET_EMU 1
static unsigned g_mma_a[1024][4], g_mma_b[1024][2];
static inline float emu_bf16(unsigned v, int half) { return __uint_as_float(half ? v & 0xffff0000u : v << 16); }
static inline unsigned emu_to_bf16(float f) {
	unsigned u = __float_as_uint(f);
	if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
	return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static inline void emu_mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
	int t = threadIdx.x, w = t >> 5, l = t & 31, g = l >> 2, c = l & 3;
	g_mma_a[t][0] = a0; g_mma_a[t][1] = a1; g_mma_a[t][2] = a2; g_mma_a[t][3] = a3;
	g_mma_b[t][0] = b0; g_mma_b[t][1] = b1;
	g_warp[w]->arrive_and_wait();
	float out[4];
	for (int i = 0; i < 4; i++) {
		int m = g + (i >= 2 ? 8 : 0), n = 2 * c + (i & 1);
		float s = d[i];
		for (int k = 0; k < 16; k++) {
			int la = (w << 5) + (m & 7) * 4 + ((k & 7) >> 1), lb = (w << 5) + n * 4 + ((k & 7) >> 1);
			float a = emu_bf16(g_mma_a[la][(m < 8 ? 0 : 1) + (k < 8 ? 0 : 2)], k & 1);
			float b = emu_bf16(g_mma_b[lb][k < 8 ? 0 : 1], k & 1);
			s += a * b;
		}
		out[i] = s;
	}
	g_warp[w]->arrive_and_wait();
	for (int i = 0; i < 4; i++) d[i] = out[i];
}
static inline unsigned emu_fma_bf16x2(unsigned a, unsigned b, unsigned c) {
	unsigned lo = emu_to_bf16(std::fma(emu_bf16(a, 0), emu_bf16(b, 0), emu_bf16(c, 0)));
	unsigned hi = emu_to_bf16(std::fma(emu_bf16(a, 1), emu_bf16(b, 1), emu_bf16(c, 1)));
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
