// Package cuda is backend.Ops on an NVIDIA GPU, through a thin cgo layer that loads the CUDA driver API
// (libcuda.so.1), cuBLASLt and NVRTC at run time with dlopen. Nothing CUDA is needed to build it: the
// cgo code declares the few types and entry points it uses itself (shim.h) and calls the addresses dlsym
// returns. On a machine without the libraries or a GPU, New returns an error wrapping ErrUnavailable
// that names what is missing, and the caller uses the cpu backend instead.
//
// # Libraries
//
// Each library is searched for in Config.LibDirs, then $TPFLEET_CUDA_LIB_DIRS (colon-separated), then
// the usual places (pip wheels' nvidia/*/lib, /usr/local/cuda/lib64, the driver's directory), then by
// bare soname through ld.so: libcuda.so.1, libcublasLt.so.13 or .12, libnvrtc.so.13 or .12. dlopen and
// dlerror run on a locked OS thread; a failure lists every path tried with dlerror's text.
//
// # Device, stream and memory
//
// A Backend uses the primary context of Config.Device (the one the CUDA runtime inside cuBLASLt and a
// future NCCL communicator use) and one stream. Every driver, cuBLASLt and NVRTC call is checked; errors
// are *Error values naming the library, the entry point and the code. Loaded weights and KV caches get
// their own cuMemAlloc; activations come from a pool of free lists by power-of-two size class, so a
// steady decode step allocates nothing. Device memory returns to the backend when its tensor becomes
// unreachable (runtime.AddCleanup): this is safe without waiting for the GPU because all work runs on
// the one stream, in order. Host↔device copies go through a pinned staging buffer. Memory reports the
// bytes held and the peak.
//
// # Numerics (DESIGN §6)
//
// Weights keep their checkpoint's type: bf16 for Llama 4 (F8 is widened to bf16 exactly, F32 and F16
// stay float32). Every op computes in float32: norms, softmax, RoPE angles (cos and sin in float64),
// router sigmoid (float64). What an op stores depends on its role, as in HF's bf16 model but with the
// residual stream and the logits kept in float32: ops whose output feeds a GEMM or attention (RMSNorm,
// SiLUMul, RoPE, ScaleRows, Attention) store Config.Activations, bf16 by default; Linear (a cuBLASLt
// GEMM with bf16 inputs, float32 accumulation and a float32 output), Add and Experts store float32, so
// the residual stream, the router's logits and the model's logits are float32. Prefill does one GEMM per
// Linear and every weight is read once. Activations F32 (a reference mode) stores every output as
// float32 and splits float32 GEMM inputs into two bf16 halves: near-float32 results for twice the GEMM
// work. The KV cache is bf16. FromFloat32 keeps its values as float32 and Embed returns the table's
// type, so gathers and host inputs are exact.
//
// # Kernels
//
// The kernels are CUDA C in package kernels, compiled by NVRTC at New for the device's architecture
// (sm_90 on H100 and H200) and cached on disk under os.UserCacheDir()/tpfleet/kernels, keyed by a hash
// of the source, the architecture and NVRTC's version. They include no header. Experts read the
// router's choice from device memory, so a MoE layer makes no host round trip.
//
// # Collectives
//
// AllReduce and AllGather run on the backend's stream through an NCCL communicator (nccl.NewNCCL,
// nccl.NewNCCLGroup; see Backend.MakeCurrent), given nccl.DeviceBuffer values. A single-rank
// communicator of any kind (nccl.Solo) is accepted too: its collectives are no-ops.
package cuda
