// emu.h: a tiny SIMT emulator for checking kernels on a machine without a GPU (scripts/gpu/emu-quant.sh):
// one block at a time, one std::thread per CUDA thread, std::barrier for __syncthreads and warp shuffles.
// __shared__ becomes static, so blocks must run one at a time (launch does). Only what the checked kernels
// use is here. __syncwarp and __match_any_sync are barriers of the warp, so every lane of a warp must
// reach them together (moe_plan's do).
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
static inline void __syncwarp(unsigned = 0) { g_warp[threadIdx.x >> 5]->arrive_and_wait(); }
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
