// shim.c: the trampolines declared in shim.h. Each casts a dlsym'd pointer to the entry point's
// signature and calls it.
#include <dlfcn.h>
#include <string.h>
#include "shim.h"

void* tp_dlopen(const char* path) { return dlopen(path, RTLD_NOW | RTLD_GLOBAL); }
void* tp_dlsym(void* h, const char* name) { return dlsym(h, name); }
const char* tp_dlerror(void) { return dlerror(); }

static void* ctx_setter; // cuCtxSetCurrent
static __thread CUcontext bound; // the context made current on this thread by bind

void tp_set_ctx_setter(void* f) { ctx_setter = f; }

static CUresult bind(CUcontext c) {
	if (c == bound) return 0;
	CUresult r = ((CUresult(*)(CUcontext))ctx_setter)(c);
	if (r == 0) bound = c;
	return r;
}

CUresult tp_make_current(CUcontext c) {
	CUresult r = ((CUresult(*)(CUcontext))ctx_setter)(c);
	bound = r == 0 ? c : 0;
	return r;
}

#define BIND(c) do { CUresult r_ = bind(c); if (r_) return r_; } while (0)

CUresult tp_cuInit(void* f, unsigned flags) { return ((CUresult(*)(unsigned))f)(flags); }
CUresult tp_cuDriverGetVersion(void* f, int* v) { return ((CUresult(*)(int*))f)(v); }
CUresult tp_cuDeviceGetCount(void* f, int* n) { return ((CUresult(*)(int*))f)(n); }
CUresult tp_cuDeviceGet(void* f, CUdevice* d, int o) { return ((CUresult(*)(CUdevice*, int))f)(d, o); }
CUresult tp_cuDeviceGetName(void* f, char* s, int n, CUdevice d) { return ((CUresult(*)(char*, int, CUdevice))f)(s, n, d); }
CUresult tp_cuDeviceGetAttribute(void* f, int* v, int a, CUdevice d) { return ((CUresult(*)(int*, int, CUdevice))f)(v, a, d); }
CUresult tp_cuDeviceTotalMem(void* f, size_t* b, CUdevice d) { return ((CUresult(*)(size_t*, CUdevice))f)(b, d); }
CUresult tp_cuDevicePrimaryCtxRetain(void* f, CUcontext* c, CUdevice d) { return ((CUresult(*)(CUcontext*, CUdevice))f)(c, d); }
CUresult tp_cuDevicePrimaryCtxRelease(void* f, CUdevice d) { return ((CUresult(*)(CUdevice))f)(d); }
CUresult tp_cuGetErrorName(void* f, CUresult r, const char** s) { return ((CUresult(*)(CUresult, const char**))f)(r, s); }
CUresult tp_cuGetErrorString(void* f, CUresult r, const char** s) { return ((CUresult(*)(CUresult, const char**))f)(r, s); }

CUresult tp_cuMemAlloc(void* f, CUcontext c, CUdeviceptr* p, size_t n) { BIND(c); return ((CUresult(*)(CUdeviceptr*, size_t))f)(p, n); }
CUresult tp_cuMemFree(void* f, CUcontext c, CUdeviceptr p) { BIND(c); return ((CUresult(*)(CUdeviceptr))f)(p); }
CUresult tp_cuMemAllocHost(void* f, CUcontext c, void** p, size_t n) { BIND(c); return ((CUresult(*)(void**, size_t))f)(p, n); }
CUresult tp_cuMemFreeHost(void* f, CUcontext c, void* p) { BIND(c); return ((CUresult(*)(void*))f)(p); }
CUresult tp_cuMemGetInfo(void* f, CUcontext c, size_t* fr, size_t* t) { BIND(c); return ((CUresult(*)(size_t*, size_t*))f)(fr, t); }
CUresult tp_cuMemcpyHtoDAsync(void* f, CUcontext c, CUdeviceptr d, const void* s, size_t n, CUstream st) {
	BIND(c);
	return ((CUresult(*)(CUdeviceptr, const void*, size_t, CUstream))f)(d, s, n, st);
}
CUresult tp_cuMemcpyDtoHAsync(void* f, CUcontext c, void* d, CUdeviceptr s, size_t n, CUstream st) {
	BIND(c);
	return ((CUresult(*)(void*, CUdeviceptr, size_t, CUstream))f)(d, s, n, st);
}
CUresult tp_cuMemcpyDtoDAsync(void* f, CUcontext c, CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st) {
	BIND(c);
	return ((CUresult(*)(CUdeviceptr, CUdeviceptr, size_t, CUstream))f)(d, s, n, st);
}
CUresult tp_cuMemsetD8Async(void* f, CUcontext c, CUdeviceptr d, unsigned char v, size_t n, CUstream st) {
	BIND(c);
	return ((CUresult(*)(CUdeviceptr, unsigned char, size_t, CUstream))f)(d, v, n, st);
}
CUresult tp_cuModuleLoadData(void* f, CUcontext c, CUmodule* m, const void* img) { BIND(c); return ((CUresult(*)(CUmodule*, const void*))f)(m, img); }
CUresult tp_cuModuleUnload(void* f, CUcontext c, CUmodule m) { BIND(c); return ((CUresult(*)(CUmodule))f)(m); }
CUresult tp_cuModuleGetFunction(void* f, CUcontext c, CUfunction* fn, CUmodule m, const char* name) {
	BIND(c);
	return ((CUresult(*)(CUfunction*, CUmodule, const char*))f)(fn, m, name);
}
CUresult tp_cuFuncSetAttribute(void* f, CUcontext c, CUfunction fn, int attr, int v) {
	BIND(c);
	return ((CUresult(*)(CUfunction, int, int))f)(fn, attr, v);
}
CUresult tp_cuStreamCreate(void* f, CUcontext c, CUstream* s, unsigned fl) { BIND(c); return ((CUresult(*)(CUstream*, unsigned))f)(s, fl); }
CUresult tp_cuStreamDestroy(void* f, CUcontext c, CUstream s) { BIND(c); return ((CUresult(*)(CUstream))f)(s); }
CUresult tp_cuStreamSynchronize(void* f, CUcontext c, CUstream s) { BIND(c); return ((CUresult(*)(CUstream))f)(s); }

CUresult tp_cuLaunchKernel(void* f, CUcontext c, CUfunction fn, unsigned gx, unsigned gy, unsigned gz,
		unsigned bx, unsigned by, unsigned bz, unsigned shmem, CUstream s, uint64_t* args, int nargs) {
	void* params[TP_MAX_ARGS];
	BIND(c);
	if (nargs < 0 || nargs > TP_MAX_ARGS) return 1; // CUDA_ERROR_INVALID_VALUE
	for (int i = 0; i < nargs; i++) params[i] = &args[i];
	return ((CUresult(*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
		CUstream, void**, void**))f)(fn, gx, gy, gz, bx, by, bz, shmem, s, params, NULL);
}

// The driver's launch configuration (cuda.h, CUDA 11.8 and later): a CUlaunchAttribute is a 4-byte id,
// 4 bytes of padding and a 64-byte value union whose int members start at its first byte.
typedef struct {
	int id;
	char pad[4];
	union {
		char raw[64];
		int programmaticStreamSerializationAllowed;
	} value;
} tp_launchAttribute;

typedef struct {
	unsigned gridDimX, gridDimY, gridDimZ;
	unsigned blockDimX, blockDimY, blockDimZ;
	unsigned sharedMemBytes;
	CUstream hStream;
	tp_launchAttribute* attrs;
	unsigned numAttrs;
} tp_launchConfig;

// The layout cuda.h gives these (on LP64): checked here, since no CUDA header is at hand.
_Static_assert(sizeof(tp_launchAttribute) == 72, "CUlaunchAttribute is 72 bytes");
_Static_assert(offsetof(tp_launchAttribute, value) == 8, "CUlaunchAttribute's value at byte 8");
_Static_assert(offsetof(tp_launchConfig, hStream) == 32, "CUlaunchConfig's hStream at byte 32");
_Static_assert(offsetof(tp_launchConfig, attrs) == 40, "CUlaunchConfig's attrs at byte 40");
_Static_assert(offsetof(tp_launchConfig, numAttrs) == 48, "CUlaunchConfig's numAttrs at byte 48");

#define TP_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION 6

CUresult tp_cuLaunchKernelEx(void* f, CUcontext c, CUfunction fn, unsigned gx, unsigned gy, unsigned gz,
		unsigned bx, unsigned by, unsigned bz, unsigned shmem, CUstream s, uint64_t* args, int nargs) {
	void* params[TP_MAX_ARGS];
	BIND(c);
	if (nargs < 0 || nargs > TP_MAX_ARGS) return 1; // CUDA_ERROR_INVALID_VALUE
	for (int i = 0; i < nargs; i++) params[i] = &args[i];
	tp_launchAttribute attr;
	memset(&attr, 0, sizeof attr);
	attr.id = TP_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
	attr.value.programmaticStreamSerializationAllowed = 1;
	tp_launchConfig cfg = {gx, gy, gz, bx, by, bz, shmem, s, &attr, 1};
	return ((CUresult(*)(const tp_launchConfig*, CUfunction, void**, void**))f)(&cfg, fn, params, NULL);
}

CUresult tp_cuStreamBeginCapture(void* f, CUcontext c, CUstream s, int mode) { BIND(c); return ((CUresult(*)(CUstream, int))f)(s, mode); }
CUresult tp_cuStreamEndCapture(void* f, CUcontext c, CUstream s, CUgraph* g) { BIND(c); return ((CUresult(*)(CUstream, CUgraph*))f)(s, g); }
CUresult tp_cuGraphInstantiate(void* f, CUcontext c, CUgraphExec* e, CUgraph g, unsigned long long flags) {
	BIND(c);
	return ((CUresult(*)(CUgraphExec*, CUgraph, unsigned long long))f)(e, g, flags);
}
CUresult tp_cuGraphLaunch(void* f, CUcontext c, CUgraphExec e, CUstream s) { BIND(c); return ((CUresult(*)(CUgraphExec, CUstream))f)(e, s); }
CUresult tp_cuGraphExecDestroy(void* f, CUcontext c, CUgraphExec e) { BIND(c); return ((CUresult(*)(CUgraphExec))f)(e); }
CUresult tp_cuGraphDestroy(void* f, CUcontext c, CUgraph g) { BIND(c); return ((CUresult(*)(CUgraph))f)(g); }
CUresult tp_cuEventCreate(void* f, CUcontext c, CUevent* e, unsigned flags) { BIND(c); return ((CUresult(*)(CUevent*, unsigned))f)(e, flags); }
CUresult tp_cuEventDestroy(void* f, CUcontext c, CUevent e) { BIND(c); return ((CUresult(*)(CUevent))f)(e); }
CUresult tp_cuEventRecord(void* f, CUcontext c, CUevent e, CUstream s) { BIND(c); return ((CUresult(*)(CUevent, CUstream))f)(e, s); }
CUresult tp_cuEventSynchronize(void* f, CUcontext c, CUevent e) { BIND(c); return ((CUresult(*)(CUevent))f)(e); }
CUresult tp_cuStreamWaitEvent(void* f, CUcontext c, CUstream s, CUevent e, unsigned flags) {
	BIND(c);
	return ((CUresult(*)(CUstream, CUevent, unsigned))f)(s, e, flags);
}
CUresult tp_cuEventElapsedTime(void* f, CUcontext c, float* ms, CUevent a, CUevent b) {
	BIND(c);
	return ((CUresult(*)(float*, CUevent, CUevent))f)(ms, a, b);
}

size_t tp_ltGetVersion(void* f) { return ((size_t(*)(void))f)(); }
const char* tp_ltGetStatusString(void* f, cublasStatus_t s) { return ((const char*(*)(cublasStatus_t))f)(s); }
const char* tp_ltGetStatusName(void* f, cublasStatus_t s) { return ((const char*(*)(cublasStatus_t))f)(s); }
cublasStatus_t tp_ltCreate(void* f, CUcontext c, cublasLtHandle_t* h) { BIND(c); return ((cublasStatus_t(*)(cublasLtHandle_t*))f)(h); }
cublasStatus_t tp_ltDestroy(void* f, CUcontext c, cublasLtHandle_t h) { BIND(c); return ((cublasStatus_t(*)(cublasLtHandle_t))f)(h); }
cublasStatus_t tp_ltMatmulDescCreate(void* f, cublasLtMatmulDesc_t* d, int compute, int scale) {
	return ((cublasStatus_t(*)(cublasLtMatmulDesc_t*, int, int))f)(d, compute, scale);
}
cublasStatus_t tp_ltMatmulDescDestroy(void* f, cublasLtMatmulDesc_t d) { return ((cublasStatus_t(*)(cublasLtMatmulDesc_t))f)(d); }
cublasStatus_t tp_ltMatmulDescSetAttribute(void* f, cublasLtMatmulDesc_t d, int attr, const void* buf, size_t n) {
	return ((cublasStatus_t(*)(cublasLtMatmulDesc_t, int, const void*, size_t))f)(d, attr, buf, n);
}
cublasStatus_t tp_ltMatrixLayoutCreate(void* f, cublasLtMatrixLayout_t* l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
	return ((cublasStatus_t(*)(cublasLtMatrixLayout_t*, int, uint64_t, uint64_t, int64_t))f)(l, type, rows, cols, ld);
}
cublasStatus_t tp_ltMatrixLayoutDestroy(void* f, cublasLtMatrixLayout_t l) { return ((cublasStatus_t(*)(cublasLtMatrixLayout_t))f)(l); }
cublasStatus_t tp_ltMatmulPreferenceCreate(void* f, cublasLtMatmulPreference_t* p) { return ((cublasStatus_t(*)(cublasLtMatmulPreference_t*))f)(p); }
cublasStatus_t tp_ltMatmulPreferenceDestroy(void* f, cublasLtMatmulPreference_t p) { return ((cublasStatus_t(*)(cublasLtMatmulPreference_t))f)(p); }
cublasStatus_t tp_ltMatmulPreferenceSetAttribute(void* f, cublasLtMatmulPreference_t p, int attr, const void* buf, size_t n) {
	return ((cublasStatus_t(*)(cublasLtMatmulPreference_t, int, const void*, size_t))f)(p, attr, buf, n);
}
cublasStatus_t tp_ltMatmulAlgoGetHeuristic(void* f, CUcontext c, cublasLtHandle_t h, cublasLtMatmulDesc_t d,
		cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t cl, cublasLtMatrixLayout_t dl,
		cublasLtMatmulPreference_t p, cublasLtMatmulHeuristicResult_t* res, int* nres) {
	BIND(c);
	return ((cublasStatus_t(*)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
		cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatmulPreference_t, int, cublasLtMatmulHeuristicResult_t*, int*))f)(
		h, d, a, b, cl, dl, p, 1, res, nres);
}
cublasStatus_t tp_ltMatmul(void* f, CUcontext c, cublasLtHandle_t h, cublasLtMatmulDesc_t d, const float* alpha,
		CUdeviceptr A, cublasLtMatrixLayout_t al, CUdeviceptr B, cublasLtMatrixLayout_t bl, const float* beta,
		CUdeviceptr C, cublasLtMatrixLayout_t cl, CUdeviceptr D, cublasLtMatrixLayout_t dl,
		const cublasLtMatmulAlgo_t* algo, CUdeviceptr ws, size_t wsSize, CUstream s) {
	BIND(c);
	return ((cublasStatus_t(*)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void*, const void*, cublasLtMatrixLayout_t,
		const void*, cublasLtMatrixLayout_t, const void*, const void*, cublasLtMatrixLayout_t, void*, cublasLtMatrixLayout_t,
		const cublasLtMatmulAlgo_t*, void*, size_t, CUstream))f)(
		h, d, alpha, (const void*)A, al, (const void*)B, bl, beta, (const void*)C, cl, (void*)D, dl, algo, (void*)ws, wsSize, s);
}

nvrtcResult tp_nvrtcVersion(void* f, int* a, int* b) { return ((nvrtcResult(*)(int*, int*))f)(a, b); }
const char* tp_nvrtcGetErrorString(void* f, nvrtcResult r) { return ((const char*(*)(nvrtcResult))f)(r); }
nvrtcResult tp_nvrtcCreateProgram(void* f, nvrtcProgram* p, const char* src, const char* name) {
	return ((nvrtcResult(*)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*))f)(p, src, name, 0, NULL, NULL);
}
nvrtcResult tp_nvrtcCompileProgram(void* f, nvrtcProgram p, int n, char** opts) {
	return ((nvrtcResult(*)(nvrtcProgram, int, const char* const*))f)(p, n, (const char* const*)opts);
}
nvrtcResult tp_nvrtcGetSize(void* f, nvrtcProgram p, size_t* n) { return ((nvrtcResult(*)(nvrtcProgram, size_t*))f)(p, n); }
nvrtcResult tp_nvrtcGetData(void* f, nvrtcProgram p, char* out) { return ((nvrtcResult(*)(nvrtcProgram, char*))f)(p, out); }
nvrtcResult tp_nvrtcDestroyProgram(void* f, nvrtcProgram* p) { return ((nvrtcResult(*)(nvrtcProgram*))f)(p); }
