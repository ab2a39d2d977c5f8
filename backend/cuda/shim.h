// shim.h: our own minimal declarations of the CUDA driver API, cuBLASLt and NVRTC (no CUDA header is
// needed to build), and the trampolines that call the entry points dlsym found. Every trampoline takes
// the function pointer first. Those that need a context take it second and make it current on the
// calling thread first (once per thread: goroutines may move between threads).
#ifndef TPFLEET_CUDA_SHIM_H
#define TPFLEET_CUDA_SHIM_H

#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef unsigned long long CUdeviceptr;

// dlfcn
void* tp_dlopen(const char* path);
void* tp_dlsym(void* h, const char* name);
const char* tp_dlerror(void);

// Driver API. tp_set_ctx_setter registers cuCtxSetCurrent for the binding of contexts.
void tp_set_ctx_setter(void* f);
// tp_make_current makes c current on the calling thread, whatever the thread had (and records it).
CUresult tp_make_current(CUcontext c);
CUresult tp_cuInit(void* f, unsigned flags);
CUresult tp_cuDriverGetVersion(void* f, int* v);
CUresult tp_cuDeviceGetCount(void* f, int* n);
CUresult tp_cuDeviceGet(void* f, CUdevice* d, int ordinal);
CUresult tp_cuDeviceGetName(void* f, char* name, int len, CUdevice d);
CUresult tp_cuDeviceGetAttribute(void* f, int* v, int attr, CUdevice d);
CUresult tp_cuDeviceTotalMem(void* f, size_t* bytes, CUdevice d);
CUresult tp_cuDevicePrimaryCtxRetain(void* f, CUcontext* c, CUdevice d);
CUresult tp_cuDevicePrimaryCtxRelease(void* f, CUdevice d);
CUresult tp_cuGetErrorName(void* f, CUresult r, const char** s);
CUresult tp_cuGetErrorString(void* f, CUresult r, const char** s);
CUresult tp_cuMemAlloc(void* f, CUcontext c, CUdeviceptr* p, size_t n);
CUresult tp_cuMemFree(void* f, CUcontext c, CUdeviceptr p);
CUresult tp_cuMemAllocHost(void* f, CUcontext c, void** p, size_t n);
CUresult tp_cuMemFreeHost(void* f, CUcontext c, void* p);
CUresult tp_cuMemGetInfo(void* f, CUcontext c, size_t* free, size_t* total);
CUresult tp_cuMemcpyHtoDAsync(void* f, CUcontext c, CUdeviceptr dst, const void* src, size_t n, CUstream s);
CUresult tp_cuMemcpyDtoHAsync(void* f, CUcontext c, void* dst, CUdeviceptr src, size_t n, CUstream s);
CUresult tp_cuMemcpyDtoDAsync(void* f, CUcontext c, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s);
CUresult tp_cuMemsetD8Async(void* f, CUcontext c, CUdeviceptr dst, unsigned char v, size_t n, CUstream s);
CUresult tp_cuModuleLoadData(void* f, CUcontext c, CUmodule* m, const void* image);
CUresult tp_cuModuleUnload(void* f, CUcontext c, CUmodule m);
CUresult tp_cuModuleGetFunction(void* f, CUcontext c, CUfunction* fn, CUmodule m, const char* name);
CUresult tp_cuFuncSetAttribute(void* f, CUcontext c, CUfunction fn, int attr, int v);
CUresult tp_cuStreamCreate(void* f, CUcontext c, CUstream* s, unsigned flags);
CUresult tp_cuStreamDestroy(void* f, CUcontext c, CUstream s);
CUresult tp_cuStreamSynchronize(void* f, CUcontext c, CUstream s);
// tp_cuLaunchKernel passes nargs kernel arguments, each in an 8-byte slot of args (4-byte arguments in
// the low half). nargs <= TP_MAX_ARGS.
#define TP_MAX_ARGS 32
CUresult tp_cuLaunchKernel(void* f, CUcontext c, CUfunction fn, unsigned gx, unsigned gy, unsigned gz,
	unsigned bx, unsigned by, unsigned bz, unsigned shmem, CUstream s, uint64_t* args, int nargs);
// tp_cuLaunchKernelEx is tp_cuLaunchKernel through cuLaunchKernelEx with one launch attribute:
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION set to 1 (programmatic dependent launch: the
// kernel may start while the one before it in the stream runs, and waits for it with griddepcontrol.wait).
CUresult tp_cuLaunchKernelEx(void* f, CUcontext c, CUfunction fn, unsigned gx, unsigned gy, unsigned gz,
	unsigned bx, unsigned by, unsigned bz, unsigned shmem, CUstream s, uint64_t* args, int nargs);

// CUDA graphs and events (driver API, CUDA 12+ ABI names: cuStreamBeginCapture_v2,
// cuGraphInstantiateWithFlags, cuEventDestroy_v2).
typedef void* CUgraph;
typedef void* CUgraphExec;
typedef void* CUevent;
CUresult tp_cuStreamBeginCapture(void* f, CUcontext c, CUstream s, int mode);
CUresult tp_cuStreamEndCapture(void* f, CUcontext c, CUstream s, CUgraph* g);
CUresult tp_cuGraphInstantiate(void* f, CUcontext c, CUgraphExec* e, CUgraph g, unsigned long long flags);
CUresult tp_cuGraphLaunch(void* f, CUcontext c, CUgraphExec e, CUstream s);
CUresult tp_cuGraphExecDestroy(void* f, CUcontext c, CUgraphExec e);
CUresult tp_cuGraphDestroy(void* f, CUcontext c, CUgraph g);
CUresult tp_cuEventCreate(void* f, CUcontext c, CUevent* e, unsigned flags);
CUresult tp_cuEventDestroy(void* f, CUcontext c, CUevent e);
CUresult tp_cuEventRecord(void* f, CUcontext c, CUevent e, CUstream s);
CUresult tp_cuEventSynchronize(void* f, CUcontext c, CUevent e);
CUresult tp_cuEventElapsedTime(void* f, CUcontext c, float* ms, CUevent a, CUevent b);
CUresult tp_cuStreamWaitEvent(void* f, CUcontext c, CUstream s, CUevent e, unsigned flags);

// cuBLASLt (cublasLt.h values, unchanged from CUDA 11 to 13).
typedef int cublasStatus_t;
typedef void* cublasLtHandle_t;
typedef void* cublasLtMatmulDesc_t;
typedef void* cublasLtMatrixLayout_t;
typedef void* cublasLtMatmulPreference_t;
typedef struct { uint64_t data[8]; } cublasLtMatmulAlgo_t;
typedef struct {
	cublasLtMatmulAlgo_t algo;
	size_t workspaceSize;
	cublasStatus_t state;
	float wavesCount;
	int reserved[4];
} cublasLtMatmulHeuristicResult_t;

size_t tp_ltGetVersion(void* f);
const char* tp_ltGetStatusString(void* f, cublasStatus_t s);
const char* tp_ltGetStatusName(void* f, cublasStatus_t s);
cublasStatus_t tp_ltCreate(void* f, CUcontext c, cublasLtHandle_t* h);
cublasStatus_t tp_ltDestroy(void* f, CUcontext c, cublasLtHandle_t h);
cublasStatus_t tp_ltMatmulDescCreate(void* f, cublasLtMatmulDesc_t* d, int compute, int scale);
cublasStatus_t tp_ltMatmulDescDestroy(void* f, cublasLtMatmulDesc_t d);
cublasStatus_t tp_ltMatmulDescSetAttribute(void* f, cublasLtMatmulDesc_t d, int attr, const void* buf, size_t n);
cublasStatus_t tp_ltMatrixLayoutCreate(void* f, cublasLtMatrixLayout_t* l, int type, uint64_t rows, uint64_t cols, int64_t ld);
cublasStatus_t tp_ltMatrixLayoutDestroy(void* f, cublasLtMatrixLayout_t l);
cublasStatus_t tp_ltMatmulPreferenceCreate(void* f, cublasLtMatmulPreference_t* p);
cublasStatus_t tp_ltMatmulPreferenceDestroy(void* f, cublasLtMatmulPreference_t p);
cublasStatus_t tp_ltMatmulPreferenceSetAttribute(void* f, cublasLtMatmulPreference_t p, int attr, const void* buf, size_t n);
cublasStatus_t tp_ltMatmulAlgoGetHeuristic(void* f, CUcontext c, cublasLtHandle_t h, cublasLtMatmulDesc_t d,
	cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t cl, cublasLtMatrixLayout_t dl,
	cublasLtMatmulPreference_t p, cublasLtMatmulHeuristicResult_t* res, int* nres);
cublasStatus_t tp_ltMatmul(void* f, CUcontext c, cublasLtHandle_t h, cublasLtMatmulDesc_t d, const float* alpha,
	CUdeviceptr A, cublasLtMatrixLayout_t al, CUdeviceptr B, cublasLtMatrixLayout_t bl, const float* beta,
	CUdeviceptr C, cublasLtMatrixLayout_t cl, CUdeviceptr D, cublasLtMatrixLayout_t dl,
	const cublasLtMatmulAlgo_t* algo, CUdeviceptr ws, size_t wsSize, CUstream s);

// NVRTC.
typedef int nvrtcResult;
typedef void* nvrtcProgram;
nvrtcResult tp_nvrtcVersion(void* f, int* major, int* minor);
const char* tp_nvrtcGetErrorString(void* f, nvrtcResult r);
nvrtcResult tp_nvrtcCreateProgram(void* f, nvrtcProgram* p, const char* src, const char* name);
nvrtcResult tp_nvrtcCompileProgram(void* f, nvrtcProgram p, int n, char** opts);
nvrtcResult tp_nvrtcGetSize(void* f, nvrtcProgram p, size_t* n);
nvrtcResult tp_nvrtcGetData(void* f, nvrtcProgram p, char* out);
nvrtcResult tp_nvrtcDestroyProgram(void* f, nvrtcProgram* p);

#endif
