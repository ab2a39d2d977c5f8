// Package cuda is backend.Ops on an NVIDIA GPU, through a thin cgo layer that loads the CUDA driver API
// (libcuda.so.1), cuBLASLt and NVRTC at run time with dlopen. Nothing CUDA is needed to build it: the
// cgo code declares the few types and entry points it uses itself (shim.h) and calls the addresses dlsym
// returns. On a machine without the libraries or a GPU, New returns an error wrapping ErrUnavailable
// (which wraps backend.ErrUnavailable) that names what is missing, and the caller uses the cpu backend
// instead.
//
// # Registration
//
// The package registers itself with package backend as "cuda" (register.go): backend.Open("cuda", o)
// opens GPU o.Device with the settings of o.Config (those of Config.AddFlags but --cuda-device,
// through backend.BindFlags), backend.DeviceCount("cuda") is DeviceCount, and its TP groups join
// through NCCL. Binaries import it for that side effect only; callers use Backend through package
// backend's interfaces: Ops, StepRecorder, Sampler and the fused ops, and the capabilities
// Synchronizer, MemoryReporter, Describer, DeviceContext (MakeCurrent, Context, Stream: what an NCCL
// communicator needs), Profiler, GraphReporter, BandwidthMeter and QuantizedLoader. Its tests and
// scripts/gpu use the concrete type.
//
// # Libraries
//
// Each library is searched for (package internal/dl) in Config.LibDirs, then $TPFLEET_LIB_DIRS (colon-separated), then
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
// stay float32), unless they are loaded in a package quant format (LoadQuantized: fp8 or int4 codes and
// their scales, kept compact; quant.go says how Linear and Experts read them). Every op computes in float32: norms, softmax, RoPE angles (cos and sin in float64),
// routing sigmoid (float64). What an op stores depends on its role, as in HF's bf16 model but with the
// residual stream and the logits kept in float32: Linear, Add and Experts store float32, so the
// residual stream, the routing logits and the model's logits are float32. RMSNorm (and AddRMSNorm's norm)
// store float32 too: their output feeds both wide GEMMs and narrow ones (a MoE router), and Linear
// decides how precisely each reads it (below). The other ops whose output feeds a GEMM or attention
// (SiLUMul, RoPE, ScaleRows, Attention) store Config.Activations (bf16 by default), with one exception,
// the skinny-GEMM rule:
//
//   - At most 64 rows (tokens: decode, small batches, short prompts), a GEMM is memory-bound on its
//     weight, so float32 inputs cost nothing measurable. Those ops then store float32, and Linear feeds
//     the float32 x at float32 accuracy: for 1..2 rows the GEMV kernel (float32 math on bf16 weights,
//     one launch), for 3..64 rows one cuBLASLt GEMM on the hi/lo bf16 split of x (hi = bf16(x),
//     lo = bf16(x − hi), stacked as 2T rows so the weight is read once; the halves are added).
//     The decode experts (split-K GEMV) also compute on float32 inputs.
//   - More rows (prefill): bf16 storage and one bf16 GEMM per Linear (one grouped GEMM over the active
//     experts for the routed experts), at full tensor-core speed; a float32 x (a norm's output) is rounded to bf16 on
//     the way in, once for all the wide products of a LinearMulti. Narrow products (at most 128
//     outputs and an eighth of the input width: a MoE router) keep the hi/lo split at any row count,
//     since a rounding of the router's input can flip a token's expert (narrowProduct in ops.go).
//
// Activations F32 (a reference mode) stores every output as float32 and uses the float32 paths at any
// row count. The KV cache is bf16. FromFloat32 keeps its values as float32 and Embed returns the
// table's type, so gathers and host inputs are exact.
//
// # Kernels
//
// The kernels are CUDA C in package kernels, compiled by NVRTC at New for the device's architecture
// (sm_90 on H100 and H200) and cached on disk under os.UserCacheDir()/tpfleet/kernels, keyed by a hash
// of the source, the architecture and NVRTC's version. They include no header. Experts read the
// expert choice from device memory: moe_plan groups the routing slots by expert (counts and
// permutation) on the device. For at most 64 tokens a split-K GEMV per active expert reads only the
// chosen experts' weights, with no host round trip; for more tokens (prefill) two grouped tensor-core
// GEMMs (grouped.go, kernels/grouped.cu) run every active expert in one launch each, reading the plan on
// the device too (with that fusion off, the per-expert counts come to the host once per MoE layer and
// cuBLASLt runs one GEMM per active expert). Backend implements
// backend.Sampler (sample.cu): the next token is chosen on the device, one block a row, and only its id
// comes back.
//
// # Collectives
//
// AllReduce and AllGather run on the backend's stream through an NCCL communicator (nccl.Join,
// nccl.NewGroup of package comm/nccl, which package tpgroup calls; see Backend.MakeCurrent), given
// comm.DeviceBuffer values. A single-rank
// communicator of any kind (comm.Solo) is accepted too: its collectives are no-ops.
package cuda
