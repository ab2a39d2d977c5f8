// cucheck.h: just enough of CUDA's device-side declarations for clang to check the syntax and types of
// kernels/*.cu without the CUDA toolkit (the kernels are compiled by NVRTC, header-free, at run time).
// Used by scripts/gpu/cucheck.sh only; nothing here is compiled into tpfleet.
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...) __attribute__((launch_bounds(__VA_ARGS__)))
#define __restrict__ __restrict
struct cucheck_uint3 { unsigned x, y, z; };
extern const __device__ cucheck_uint3 threadIdx, blockIdx, blockDim, gridDim;
__device__ float expf(float); __device__ float fmaxf(float, float); __device__ float fminf(float, float);
__device__ float logf(float); __device__ float cosf(float); __device__ float sinf(float);
__device__ float rsqrtf(float); __device__ float sqrtf(float); __device__ float __expf(float);
__device__ float exp2f(float); __device__ float floorf(float); __device__ float fabsf(float);
__device__ float rintf(float); __device__ float erff(float);
__device__ double exp(double); __device__ double sqrt(double); __device__ double log(double);
__device__ void sincos(double, double*, double*); __device__ float __fmul_rn(float, float);
__device__ float __uint_as_float(unsigned); __device__ float __int_as_float(int);
__device__ unsigned __float_as_uint(float); __device__ int __float_as_int(float);
__device__ float __shfl_xor_sync(unsigned, float, int); __device__ int __shfl_xor_sync(unsigned, int, int);
__device__ unsigned __shfl_xor_sync(unsigned, unsigned, int);
__device__ float __shfl_sync(unsigned, float, int); __device__ int __shfl_sync(unsigned, int, int);
__device__ unsigned __shfl_sync(unsigned, unsigned, int);
__device__ float __shfl_down_sync(unsigned, float, int); __device__ int __shfl_down_sync(unsigned, int, int);
__device__ void __syncthreads(); __device__ void __syncwarp(unsigned m = 0xffffffffu);
__device__ void __threadfence();
__device__ int __popc(unsigned); __device__ int __ffs(int); __device__ int __clz(int);
__device__ unsigned __byte_perm(unsigned, unsigned, unsigned);
__device__ unsigned __match_any_sync(unsigned, int); __device__ unsigned __ballot_sync(unsigned, int);
__device__ unsigned __activemask();
__device__ float atomicAdd(float*, float); __device__ int atomicAdd(int*, int);
__device__ unsigned atomicAdd(unsigned*, unsigned); __device__ int atomicMax(int*, int);
__device__ unsigned atomicOr(unsigned*, unsigned);
__device__ unsigned long long atomicAdd(unsigned long long*, unsigned long long);
__device__ unsigned __cvta_generic_to_shared(const void*);
__device__ long long clock64();
