package cuda

import (
	"cmp"
	"errors"
	"fmt"
	"github.com/tpfleet/tpfleet/internal/dl"
	"math"
	"os"
	"slices"
	"strings"
	"time"
	"unsafe"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Backend is backend.Ops on one NVIDIA GPU: its primary context, one stream, cuBLASLt for Linear and
// NVRTC-compiled kernels (package kernels) for the rest. Make one with New and Close it when done.
//
// Like every backend.Ops, a Backend is driven by one goroutine at a time. Ops enqueue work on the stream
// and return without waiting for the GPU; Float32, ReadRouting and Synchronize wait. Tensors, caches
// and routings free their device memory when they become unreachable.
type Backend struct {
	cfg     Config
	dev     *device
	stream  *stream
	module  *moduleSet // the kernels' compilation units (kernelcache.go)
	k       kernelSet
	enc     *encoderKernels // encoder.cu's kernels, nil until the first encoder op (encoder.go)
	gemm    *gemm
	pool    *pool
	staging *staging
	info    Info
	closed  bool
	counts  Counters
	phases  []phase.Phase // New's start-up phases (StartupPhases)
	// ctxStart is when New began: the CUDA context phase runs from it to the kernels' compile.
	ctxStart time.Time
	offload  OffloadStats // offloaded experts' copies (offload.go)
	off      *offloader   // the offloaded experts' copy stream and cache (offload.go), nil until then
	tallies  *tallyReader // the expert tallies' reads (expertcount.go), nil until the first tally

	rec   *recorder             // the Step being captured or replayed, nil otherwise (graph.go)
	steps map[string]*stepState // Step's recordings by key
	prof  *profiler             // Profile's events, kept for the next Profile
	// argBytes counts the bytes temp uploads (kernel arguments), so that Step knows how much room a
	// recording of a step needs for them.
	argBytes int64

	// fuse is the kernel fusions the ops make (Config.Unfuse; tests change it to compare).
	fuse fusionSet
	// fuseCtr is the split-K expert GEMVs' fused epilogues' counters (eg_last in gemv.cu): zeroed once,
	// and every launch leaves them zero again; nil until the first fused epilogue (moe.go).
	fuseCtr *buffer
	// groupedMaxRows is the most routing slots per local expert (T·k/E) a call may have to run on the
	// grouped expert kernels (groupedPays); 0: no limit.
	groupedMaxRows int
	// q4gemmMaxRows is the most rows of x a dense Linear on int4 weights runs on q4gemm (q4gemmOK); more
	// take the dequantised copy and cuBLASLt. 0: no limit.
	q4gemmMaxRows int
	// fp8ExpertGemvRows is the most tokens the fp8 routed experts (dynamic activations) run on the expert
	// GEMV before the grouped fp8 kernels (fp8ExpertGemvRows, the constant, by default).
	fp8ExpertGemvRows int
	// side are the fan-out's side streams (fanout.go), made at the first fan-out.
	side *sides
	// pendingRoutes are the routings whose route or count launch waits to be fused into the expert plan
	// (moe.go): flushRoutes launches what is left before the host can observe it.
	pendingRoutes []*routing

	// noFlash makes Attention skip the flash path (tests time the attention kernel against it).
	noFlash bool
	// noGEMVSplit makes Linear use the one-warp-a-row GEMV for small weights too (tests compare).
	noGEMVSplit bool
	// splitPerSM is the number of attention_decode blocks per SM (attentionDecode's grid).
	splitPerSM int
	// decodeMinTiles is the fewest 16-key tiles an attention_decode block takes (the kernel's minb;
	// defaultDecodeMinTiles; tests sweep it).
	decodeMinTiles int
	// noDecode makes decode attention take attention_split instead of attention_decode (tests compare).
	noDecode bool

	// gemvRows is the largest row count Linear runs on the GEMV kernel (gemvMaxRows; tests change it to
	// compare with cuBLASLt).
	gemvRows int
	// noQuantGEMV makes Linear and Experts on quantised weights take the dequantise-to-bf16 paths at any
	// row count (tests compare them with the GEMV kernels).
	noQuantGEMV bool
	// noFP8Gemm makes Linear on fp8 weights with dynamic activations take the dequantised path for
	// prefill instead of the FP8 GEMM (fp8gemm.go; tests compare them).
	noFP8Gemm bool
	// groupedShared: the grouped expert GEMMs (grouped.go) may use their GG_SMEM bytes of dynamic shared
	// memory (cuFuncSetAttribute took it); false keeps them off.
	groupedShared bool
	// fp8GroupedShared: the fp8 grouped expert GEMMs may run: an FP8 tensor core (sm_89 and later) and
	// their GF_SMEM bytes of dynamic shared memory granted; false keeps them off.
	fp8GroupedShared bool
	// fp8OuterVec: cuBLASLt applies the FP8 GEMM's row scales itself (outer-vector scaling), as New's
	// probe found it does on this device (fp8gemm.go); false runs fp8_scale_out after the product.
	fp8OuterVec bool
}

var _ backend.Ops = (*Backend)(nil)

// kernelSet is every kernel the ops launch.
type kernelSet struct {
	convert, embed, rmsnorm, add, siluMul, scaleRows, rope, linearSimple *kernel
	splitBF16, addHalves                                                 *kernel
	kvAppend, attention, route, expertGateUp, expertDown                 *kernel
	mapExperts                                                           *kernel
	countExperts                                                         *kernel
	attentionSplit, attentionCombine                                     *kernel
	attentionSplit128                                                    [5]*kernel // groups of at most 1, 2, 4, 5, 8
	attentionFlash, attentionDecode                                      *kernel
	gatherPermute, fillRandom                                            *kernel
	gemv                                                                 [4]*kernel // gemv_1, _2, _4, _8
	moePlan, expertGEMV1, expertGEMV8, expertAct, expertCombine          *kernel
	expertGather                                                         *kernel
	sampleArgmax, sampleRows                                             *kernel
	addRMSNorm, spin                                                     *kernel
	gemvMulti, gemvSplit                                                 [2]*kernel // _1, _2
	ropeQK                                                               *kernel
	dequantBF16, qexpertGEMV1, qexpertGEMV8, quantizeBF16                *kernel
	qgemv                                                                [4]*kernel // qgemv_1, _2, _4, _8
	qgemvSplit                                                           [2]*kernel // qgemv_split_1, _2
	fp8ScaleOut, transposeU8                                             *kernel
	fp8ActRows, fp8ActCodes, fp8DequantExperts                           *kernel
	fp8GEMV, fp8GEMVStaged                                               [4]*kernel    // fp8_gemv_1, _2, _4, _8 (fp8.go)
	fp8ExpertGEMV, fp8ExpertGEMVStaged                                   [2]*kernel    // fp8_expert_gemv_1, _4
	q4gemv                                                               [2][3]*kernel // q4gemv_1, _2, _4 and the WIDE q4gemv_1w, _2w, _4w (quant_int4.cu)
	q4expertGEMV                                                         [2]*kernel    // q4expert_gemv_1, _2
	q4expertSwiGLU, q4expertCombine                                      [2]*kernel    // q4expert_gemv_swiglu_1, _2; q4expert_gemv_combine_1, _2
	fp8ExpertSwiGLU, fp8ExpertCombine                                    [2][2]*kernel // [staged]: fp8_expert_gemv(_xs)_swiglu_1, _4; _combine_1, _4
	q4gemvMulti                                                          [2]*kernel    // q4gemv_multi_1, _1w
	dequantInt4, q4XPrep                                                 *kernel
	q4gemm, q4gemmExperts, q4gemmSwiGLU                                  *kernel // q4gemm, q4gemm_experts(_swiglu)

	// The fused kernels (Config.Unfuse).
	routePlan, qkAppend                   *kernel
	gemvGated                             [2]*kernel // _1, _2
	expertSwiGLU, expertCombineEpi        [2]*kernel // expert_gemv_swiglu_1, _8; expert_gemv_combine_1, _8
	convertV8, siluMulV8, splitBF16V8     *kernel
	addRMSNormV8                          *kernel
	expertGatherV8, expertActV8, expertV8 *kernel // expertV8: expert_combine_v8

	// The grouped expert GEMMs (grouped.cu, FuseGrouped and FuseFP8Grouped).
	groupedGateUp, groupedDown, groupedFill *kernel
	groupedFP8GateUp, groupedFP8Down        *kernel
}

// fused reports whether the backend makes fusion f (Fusions).
func (b *Backend) fused(f string) bool { return b.fuse[f] }

// Info describes what New found and did.
type Info struct {
	Device        string            // the GPU's name, e.g. "NVIDIA H100 80GB HBM3"
	Arch          string            // the kernels' target, e.g. "sm_90"
	Multiprocs    int               // streaming multiprocessors
	TotalMemory   int64             // bytes
	DriverVersion int               // e.g. 13000 for CUDA 13.0
	CublasLt      int               // cublasLtGetVersion, e.g. 130100
	NVRTC         string            // e.g. "13.0"
	Libraries     map[string]string // "cuda", "cublasLt", "nvrtc" → the path loaded
	KernelCache   string            // the cubin files' directory, "" when the cache is off
	CacheHit      bool              // every unit's cubin came from the cache
	CompileTime   time.Duration     // NVRTC compiles, in parallel (0 when every unit was a cache hit)
	CacheWarnings []string          // cache files that were corrupt or refused, and compiled again
	// FP8OuterVec reports that cuBLASLt applies the FP8 GEMM's per-row scales itself (outer-vector
	// scaling, checked by a small product at start-up); false: fp8_scale_out applies them after the GEMM.
	FP8OuterVec bool
	// FP8OuterVecNote is the check's outcome in words (what failed, where it did).
	FP8OuterVecNote string
	// PDL says whether kernels launch with programmatic dependent launch (Config.NoPDL; compute
	// capability 9.0 and a driver with cuLaunchKernelEx).
	PDL bool
	// Fusions are the kernel fusions the backend makes (Fusions less Config.Unfuse).
	Fusions []string
}

// Counters counts Linear's and Experts' paths.
type Counters struct {
	GEMV     int64 // Linear calls run by the GEMV kernel (at most gemvMaxRows rows)
	Gemm     int64 // Linear calls run by cuBLASLt
	Split    int64 // of which with a float32 x split into two bf16 halves
	Fallback int64 // Linear calls run by the simple kernel (shapes cuBLASLt declined)

	ExpertsGEMV    int64 // Experts calls run by the split-K GEMV (at most skinnyRows tokens)
	ExpertsGrouped int64 // Experts calls run as one cuBLASLt GEMM per active expert (prefill)
	ExpertsSimple  int64 // Experts calls run by the generic kernels (shapes the others do not take)

	QuantGEMV    int64 // Linear calls on a quantised weight run by the quantised GEMV (decode)
	QuantDequant int64 // Linear calls on a quantised weight run on a dequantised bf16 copy (prefill)
	QuantQ4GEMM  int64 // Linear calls on an int4 weight run by q4gemm (prefill, FuseQ4GEMM)
	Q4Split      int64 // q4gemv launches that split K over blocks too (FuseQ4Split)
	FanOuts      int64 // expert GEMM loops run on the side streams at once (FuseStreams, fanout.go)
	QuantFP8Gemm int64 // Linear calls on an fp8 weight run by the FP8 GEMM (prefill, fp8gemm.go)
	ExpertsFP8   int64 // of ExpertsGrouped, the calls on fp8 weights run on FP8 tensor cores (the FP8 GEMM per expert, or the grouped fp8 kernels)
	ExpertsQ4    int64 // of ExpertsGrouped, the calls on int4 weights run by q4gemm_experts(_swiglu)
	ExpertsMMA   int64 // of ExpertsGrouped, the calls run by the grouped tensor-core kernels (grouped.go; fp8 ones counted in ExpertsFP8 too)

	FP8ExpertGEMV int64 // expert GEMV launches (a projection each) on output-major fp8 experts (fp8.go)
	FP8Staged     int64 // fp8 GEMV products whose kernel staged (and quantised) its input itself
	FP8OuterVec   int64 // FP8 GEMMs whose scales cuBLASLt applied (outer-vector scaling)
}

// New loads the CUDA libraries, opens device cfg.Device and compiles the kernels. On a machine without
// a usable GPU it returns an error wrapping ErrUnavailable that names the missing library or device.
func New(cfg Config) (*Backend, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Workspace == 0 {
		cfg.Workspace = DefaultWorkspace
	}
	if cfg.Staging == 0 {
		cfg.Staging = DefaultStaging
	}
	if os.Getenv(EnvGraphs) == "0" {
		cfg.Eager = true
	}
	if os.Getenv(EnvPDL) == "0" {
		cfg.NoPDL = true
	}
	fuse, err := parseUnfuse(cfg.Unfuse, os.Getenv(EnvUnfuse))
	if err != nil {
		return nil, fmt.Errorf("$%s: %w", EnvUnfuse, err)
	}
	start := time.Now()
	if err := loadLibraries(dl.SearchDirs(cfg.LibDirs)); err != nil {
		return nil, err
	}
	dev, err := openDevice(cfg.Device)
	if err != nil {
		return nil, err
	}
	b := &Backend{cfg: cfg, dev: dev, gemvRows: gemvMaxRows, splitPerSM: defaultSplitPerSM, decodeMinTiles: defaultDecodeMinTiles,
		groupedMaxRows: groupedMaxRowsPerExpert, q4gemmMaxRows: q4gemmDenseMaxRows, fp8ExpertGemvRows: fp8ExpertGemvRows, ctxStart: start, fuse: fuse}
	if err := b.init(); err != nil {
		return nil, errors.Join(err, b.Close())
	}
	return b, nil
}

func (b *Backend) init() error {
	d := b.dev
	var err error
	if b.stream, err = d.newStream(); err != nil {
		return err
	}
	b.pool = newPool(d, b.stream.sync)
	h, err := d.allocPinned(b.cfg.Staging)
	if err != nil {
		return err
	}
	b.staging = &staging{h: h}
	if b.gemm, err = newGemm(d, b.cfg.Workspace); err != nil {
		return err
	}
	version, err := nvrtcVersion()
	if err != nil {
		return err
	}
	arch := fmt.Sprintf("sm_%d%d", d.ccMajor, d.ccMinor)
	b.info = Info{
		Device: d.name, Arch: arch, Multiprocs: d.multiprocessors, TotalMemory: d.totalMem,
		DriverVersion: d.driverVersion, CublasLt: cublasLtVersion(), NVRTC: version, Libraries: Libraries(),
	}
	b.phases = append(b.phases, phase.Phase{Name: phase.Context, Start: b.ctxStart, Took: time.Since(b.ctxStart),
		Detail: fmt.Sprintf("%s, %s, driver %d", d.name, arch, d.driverVersion)})
	if err := b.loadKernels(target{arch: arch, nvrtc: version, device: d.name, driver: d.driverVersion}); err != nil {
		return err
	}
	b.stream.pdl = !b.cfg.NoPDL && drv.launchEx != nil && d.ccMajor >= 9
	b.info.PDL, b.info.Fusions = b.stream.pdl, b.fuse.names()
	if n := len(b.phases); n > 0 { // the kernels' phase says how they will launch
		pdl := "off"
		if b.stream.pdl {
			pdl = "on"
		}
		b.phases[n-1].Detail += fmt.Sprintf("; programmatic dependent launch %s; fusions: %s", pdl, cmp.Or(strings.Join(b.info.Fusions, ","), "none"))
	}
	for _, k := range []struct {
		name string
		dst  **kernel
	}{
		{"convert", &b.k.convert}, {"embed", &b.k.embed}, {"rmsnorm", &b.k.rmsnorm}, {"add", &b.k.add},
		{"silu_mul", &b.k.siluMul}, {"scale_rows", &b.k.scaleRows}, {"rope", &b.k.rope},
		{"linear_simple", &b.k.linearSimple}, {"split_bf16", &b.k.splitBF16}, {"add_halves", &b.k.addHalves}, {"kv_append", &b.k.kvAppend}, {"attention", &b.k.attention},
		{"attention_split", &b.k.attentionSplit},
		{"attention_split_128_g1", &b.k.attentionSplit128[0]}, {"attention_split_128_g2", &b.k.attentionSplit128[1]},
		{"attention_split_128_g4", &b.k.attentionSplit128[2]}, {"attention_split_128_g5", &b.k.attentionSplit128[3]},
		{"attention_split_128_g8", &b.k.attentionSplit128[4]},
		{"attention_combine", &b.k.attentionCombine},
		{"attention_flash", &b.k.attentionFlash}, {"attention_decode", &b.k.attentionDecode},
		{"route", &b.k.route}, {"expert_gate_up", &b.k.expertGateUp}, {"expert_down", &b.k.expertDown},
		{"map_experts", &b.k.mapExperts},
		{"count_experts", &b.k.countExperts},
		{"gather_permute", &b.k.gatherPermute}, {"fill_random", &b.k.fillRandom},
		{"gemv_1", &b.k.gemv[0]}, {"gemv_2", &b.k.gemv[1]}, {"gemv_4", &b.k.gemv[2]}, {"gemv_8", &b.k.gemv[3]},
		{"moe_plan", &b.k.moePlan}, {"expert_gemv_1", &b.k.expertGEMV1}, {"expert_gemv_8", &b.k.expertGEMV8},
		{"expert_act", &b.k.expertAct}, {"expert_combine", &b.k.expertCombine}, {"expert_gather", &b.k.expertGather},
		{"sample_argmax", &b.k.sampleArgmax}, {"sample_rows", &b.k.sampleRows},
		{"add_rmsnorm", &b.k.addRMSNorm}, {"spin", &b.k.spin},
		{"gemv_multi_1", &b.k.gemvMulti[0]}, {"gemv_multi_2", &b.k.gemvMulti[1]},
		{"gemv_split_1", &b.k.gemvSplit[0]}, {"gemv_split_2", &b.k.gemvSplit[1]}, {"rope_qk", &b.k.ropeQK},
		{"dequant_bf16", &b.k.dequantBF16},
		{"qgemv_1", &b.k.qgemv[0]}, {"qgemv_2", &b.k.qgemv[1]}, {"qgemv_4", &b.k.qgemv[2]}, {"qgemv_8", &b.k.qgemv[3]},
		{"qgemv_split_1", &b.k.qgemvSplit[0]}, {"qgemv_split_2", &b.k.qgemvSplit[1]},
		{"qexpert_gemv_1", &b.k.qexpertGEMV1}, {"qexpert_gemv_8", &b.k.qexpertGEMV8}, {"quantize_bf16", &b.k.quantizeBF16},
		{"fp8_scale_out", &b.k.fp8ScaleOut}, {"transpose_u8", &b.k.transposeU8},
		{"fp8_act_rows", &b.k.fp8ActRows}, {"fp8_act_codes", &b.k.fp8ActCodes}, {"fp8_dequant_experts", &b.k.fp8DequantExperts},
		{"fp8_gemv_1", &b.k.fp8GEMV[0]}, {"fp8_gemv_2", &b.k.fp8GEMV[1]}, {"fp8_gemv_4", &b.k.fp8GEMV[2]}, {"fp8_gemv_8", &b.k.fp8GEMV[3]},
		{"fp8_gemv_xs_1", &b.k.fp8GEMVStaged[0]}, {"fp8_gemv_xs_2", &b.k.fp8GEMVStaged[1]},
		{"fp8_gemv_xs_4", &b.k.fp8GEMVStaged[2]}, {"fp8_gemv_xs_8", &b.k.fp8GEMVStaged[3]},
		{"fp8_expert_gemv_1", &b.k.fp8ExpertGEMV[0]}, {"fp8_expert_gemv_4", &b.k.fp8ExpertGEMV[1]},
		{"fp8_expert_gemv_xs_1", &b.k.fp8ExpertGEMVStaged[0]}, {"fp8_expert_gemv_xs_4", &b.k.fp8ExpertGEMVStaged[1]},
		{"q4gemv_1", &b.k.q4gemv[0][0]}, {"q4gemv_2", &b.k.q4gemv[0][1]}, {"q4gemv_4", &b.k.q4gemv[0][2]},
		{"q4gemv_1w", &b.k.q4gemv[1][0]}, {"q4gemv_2w", &b.k.q4gemv[1][1]}, {"q4gemv_4w", &b.k.q4gemv[1][2]},
		{"q4expert_gemv_1", &b.k.q4expertGEMV[0]}, {"q4expert_gemv_2", &b.k.q4expertGEMV[1]}, {"dequant_int4_bf16", &b.k.dequantInt4},
		{"q4expert_gemv_swiglu_1", &b.k.q4expertSwiGLU[0]}, {"q4expert_gemv_swiglu_2", &b.k.q4expertSwiGLU[1]},
		{"q4expert_gemv_combine_1", &b.k.q4expertCombine[0]}, {"q4expert_gemv_combine_2", &b.k.q4expertCombine[1]},
		{"fp8_expert_gemv_swiglu_1", &b.k.fp8ExpertSwiGLU[0][0]}, {"fp8_expert_gemv_swiglu_4", &b.k.fp8ExpertSwiGLU[0][1]},
		{"fp8_expert_gemv_xs_swiglu_1", &b.k.fp8ExpertSwiGLU[1][0]}, {"fp8_expert_gemv_xs_swiglu_4", &b.k.fp8ExpertSwiGLU[1][1]},
		{"fp8_expert_gemv_combine_1", &b.k.fp8ExpertCombine[0][0]}, {"fp8_expert_gemv_combine_4", &b.k.fp8ExpertCombine[0][1]},
		{"fp8_expert_gemv_xs_combine_1", &b.k.fp8ExpertCombine[1][0]}, {"fp8_expert_gemv_xs_combine_4", &b.k.fp8ExpertCombine[1][1]},
		{"q4_xprep", &b.k.q4XPrep}, {"q4gemv_multi_1", &b.k.q4gemvMulti[0]}, {"q4gemv_multi_1w", &b.k.q4gemvMulti[1]},
		{"q4gemm", &b.k.q4gemm}, {"q4gemm_experts", &b.k.q4gemmExperts}, {"q4gemm_experts_swiglu", &b.k.q4gemmSwiGLU},
		{"route_plan", &b.k.routePlan}, {"qk_append", &b.k.qkAppend},
		{"gemv_gated_1", &b.k.gemvGated[0]}, {"gemv_gated_2", &b.k.gemvGated[1]},
		{"expert_gemv_swiglu_1", &b.k.expertSwiGLU[0]}, {"expert_gemv_swiglu_8", &b.k.expertSwiGLU[1]},
		{"expert_gemv_combine_1", &b.k.expertCombineEpi[0]}, {"expert_gemv_combine_8", &b.k.expertCombineEpi[1]},
		{"convert_v8", &b.k.convertV8}, {"silu_mul_v8", &b.k.siluMulV8}, {"split_bf16_v8", &b.k.splitBF16V8},
		{"add_rmsnorm_v8", &b.k.addRMSNormV8},
		{"expert_gather_v8", &b.k.expertGatherV8}, {"expert_act_v8", &b.k.expertActV8}, {"expert_combine_v8", &b.k.expertV8},
		{"grouped_gate_up", &b.k.groupedGateUp}, {"grouped_down", &b.k.groupedDown}, {"grouped_fill", &b.k.groupedFill},
		{"grouped_fp8_gate_up", &b.k.groupedFP8GateUp}, {"grouped_fp8_down", &b.k.groupedFP8Down},
	} {
		if *k.dst, err = b.module.function(k.name); err != nil {
			return err
		}
	}
	b.groupedShared = b.allowShared(groupedSmem, b.k.groupedGateUp, b.k.groupedDown)
	if d.ccMajor*10+d.ccMinor >= 89 {
		b.fp8GroupedShared = b.allowShared(groupedFP8Smem, b.k.groupedFP8GateUp, b.k.groupedFP8Down)
		var why string
		b.fp8OuterVec, why = b.probeOuterVec()
		b.info.FP8OuterVec, b.info.FP8OuterVecNote = b.fp8OuterVec, why
		if n := len(b.phases); n > 0 {
			b.phases[n-1].Detail += "; fp8 GEMM scales: " + why
		}
	}
	return nil
}

// Close waits for the GPU, frees every allocation (tensors still reachable become unusable) and
// releases the device. It is idempotent.
func (b *Backend) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	var errs []error
	keep := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if b.stream != nil {
		keep(b.stream.sync())
	}
	b.closeGraphs()
	b.closeProfiler()
	b.closeOffload()
	b.closeSides()
	keep(b.closeTallies())
	if b.pool != nil {
		keep(b.pool.close())
	}
	if b.gemm != nil {
		keep(b.gemm.close())
	}
	if b.module != nil {
		keep(b.module.unload())
	}
	if b.staging != nil {
		keep(b.staging.h.free())
	}
	if b.stream != nil {
		keep(b.stream.destroy())
	}
	keep(b.dev.release())
	return errors.Join(errs...)
}

// Context returns the device's primary context (a CUcontext), for nccl.NewGroup.
func (b *Backend) Context() uintptr { return uintptr(unsafe.Pointer(b.dev.ctx)) }

// Stream returns the backend's stream (a CUstream): comm.DeviceBuffer values of this backend's
// collectives name it.
func (b *Backend) Stream() uintptr { return uintptr(unsafe.Pointer(b.stream.s)) }

// MakeCurrent makes the device's primary context current on the calling OS thread, as nccl.New
// requires. Call it on a goroutine locked to its thread (runtime.LockOSThread).
func (b *Backend) MakeCurrent() error { return b.dev.makeCurrent() }

// Name returns "cuda:N" for device N.
func (b *Backend) Name() string { return fmt.Sprintf("cuda:%d", b.cfg.Device) }

// Info describes the device, the libraries and the kernels' compilation.
func (b *Backend) Info() Info {
	i := b.info
	i.PDL = b.stream != nil && b.stream.pdl // off for good if the driver refused a launch with it
	return i
}

// Config returns the configuration in effect (defaults filled in).
func (b *Backend) Config() Config { return b.cfg }

// Memory reports the device memory the backend holds.
func (b *Backend) Memory() MemoryStats { return b.pool.snapshot() }

var _ backend.HostReporter = (*Backend)(nil)

// HostStats reports the host's waits for the device, the pool's cuMemAlloc calls and the collections it
// forced (backend.HostReporter).
func (b *Backend) HostStats() backend.HostStats {
	m := b.pool.snapshot()
	return backend.HostStats{Syncs: b.dev.waits.Load(), Allocs: m.Allocs, Collections: m.Collections, CollectionTime: m.CollectionTime}
}

// Counters reports how Linear calls ran.
func (b *Backend) Counters() Counters { return b.counts }

// DeviceMemory returns the device's free and total memory, as the driver sees it (all processes).
func (b *Backend) DeviceMemory() (free, total int64, err error) { return b.dev.memInfo() }

// Synchronize waits for all work enqueued so far and frees the memory of unreachable weights and
// caches. An error from an earlier asynchronous op (an illegal address, say) surfaces here.
func (b *Backend) Synchronize() error {
	if b.closed {
		return ErrClosed
	}
	if err := b.flushRoutes(); err != nil {
		return err
	}
	if err := b.stream.sync(); err != nil {
		return err
	}
	b.staging.off = 0
	return b.pool.flush()
}

// tensor is a device array: dtype elements, row-major, at buf.ptr + off.
type tensor struct {
	b     *Backend
	buf   *buffer
	off   int64 // bytes
	shape []int
	dt    DType
	q     *qweight    // a quantised weight's format and scales (dt is quantized), nil otherwise
	host  *hostWeight // an offloaded experts weight (offload.go): buf is nil, only Experts reads it
}

// Shape returns the tensor's dimensions, outermost first. The caller must not modify the slice.
func (t *tensor) Shape() []int { return t.shape }

func (t *tensor) ptr() devptr { return t.buf.ptr + devptr(t.off) }

func (t *tensor) numel() int {
	n, _ := numel(t.shape)
	return n
}

// DTypeOf returns the storage type of a tensor made by a cuda Backend.
func DTypeOf(t backend.Tensor) (DType, error) {
	tt, ok := t.(*tensor)
	if !ok || tt == nil {
		return 0, fmt.Errorf("cuda: dtype of a %T: %w", t, ErrForeign)
	}
	return tt.dt, nil
}

// numel returns the number of elements of shape; ok is false for a negative dimension or an overflow.
func numel(shape []int) (n int, ok bool) {
	n = 1
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		if d != 0 && n > math.MaxInt32*64/d {
			return 0, false
		}
		n *= d
	}
	return n, true
}

// asTensor returns t as one of this backend's tensors, or an error naming op and the operand.
func (b *Backend) asTensor(op, name string, t backend.Tensor) (*tensor, error) {
	if b.closed {
		return nil, fmt.Errorf("cuda: %s: %w", op, ErrClosed)
	}
	if t == nil {
		return nil, fmt.Errorf("cuda: %s: %s is nil: %w", op, name, backend.ErrShape)
	}
	tt, ok := t.(*tensor)
	if !ok || tt == nil || tt.b != b {
		return nil, fmt.Errorf("cuda: %s: %s is a %T of another backend: %w", op, name, t, ErrForeign)
	}
	if tt.host != nil && op != "experts" && op != "offload experts" {
		return nil, fmt.Errorf("cuda: %s: %s%v is an offloaded experts weight: only Experts reads it: %w", op, name, tt.shape, backend.ErrShape)
	}
	return tt, nil
}

// newTensor allocates an activation of shape (already validated) and dtype dt from the pool, poisoned
// with NaN when the Config says so.
func (b *Backend) newTensor(dt DType, shape ...int) (*tensor, error) {
	n, _ := numel(shape)
	buf, err := b.pool.get(int64(n) * dt.size())
	if err != nil {
		return nil, err
	}
	buf = b.pool.owned(buf)
	if b.cfg.Poison {
		if err := b.stream.memset(buf.ptr, 0xff, buf.size); err != nil {
			return nil, err
		}
	}
	return &tensor{b: b, buf: buf, shape: shape, dt: dt}, nil
}

// act allocates the output of an op whose consumer is a GEMM or attention (SiLUMul, RoPE, ScaleRows,
// Attention), of type actType(shape). Linear, Add and Experts, whose outputs are the residual stream and
// the logits, and the norms, whose output also feeds narrow products (narrowProduct), always store
// float32.
func (b *Backend) act(shape ...int) (*tensor, error) { return b.newTensor(b.actType(shape), shape...) }

// skinnyRows is the most rows (tokens) for which a GEMM is memory-bound on the weight: decode steps and
// small batches. There, keeping GEMM inputs in float32 costs nothing measurable (the weight is read once
// either way), so the default mode does.
const skinnyRows = 64

// actType is the storage type of a GEMM or attention input of shape: Config.Activations, except that
// in the default (bf16) mode an input of at most skinnyRows rows (its first dimension) stays float32,
// and Linear then feeds it to the GEMM at float32 accuracy (the GEMV kernel, or the hi/lo bf16 split).
// Prefill (more rows) stores bf16 and runs bf16 GEMMs at full tensor-core speed.
func (b *Backend) actType(shape []int) DType {
	if b.cfg.Activations == BF16 && len(shape) > 0 && shape[0] <= skinnyRows {
		return F32
	}
	return b.cfg.Activations
}

// Load copies a checkpoint tensor to the device without losing precision: BF16 stays bf16, F8_E4M3 and
// F8_E5M2 become bf16 (exactly), F32 stays float32 and every other type safetensors.ToFloat32 accepts
// becomes float32. Llama 4's checkpoints are bf16, so their weights are stored in bf16. Loaded tensors
// get dedicated device memory (cuMemAlloc) rather than pool blocks.
func (b *Backend) Load(dt safetensors.DType, shape []int, data []byte) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	n, ok := numel(shape)
	if !ok {
		return nil, fmt.Errorf("cuda: load %s%v: %w", dt, shape, backend.ErrShape)
	}
	size := dt.Size()
	if size == 0 {
		return nil, fmt.Errorf("cuda: load %s%v: invalid dtype", dt, shape)
	}
	if len(data) != n*size {
		return nil, fmt.Errorf("cuda: load %s%v from %d bytes, want %d: %w", dt, shape, len(data), n*size, backend.ErrShape)
	}
	var host []byte
	var st DType
	switch dt {
	case safetensors.BF16:
		host, st = data, BF16
	case safetensors.F32:
		host, st = data, F32
	default:
		f := make([]float32, n)
		if err := safetensors.ToFloat32(dt, data, f); err != nil {
			return nil, fmt.Errorf("cuda: load %s%v: %w", dt, shape, err)
		}
		if dt == safetensors.F8_E4M3 || dt == safetensors.F8_E5M2 {
			host, st = bf16Bytes(f), BF16
		} else {
			host, st = float32Bytes(f), F32
		}
	}
	buf, err := b.pool.getDedicated(int64(len(host)))
	if err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", dt, shape, err)
	}
	buf = b.pool.owned(buf)
	if err := b.upload(buf.ptr, host); err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", dt, shape, err)
	}
	return &tensor{b: b, buf: buf, shape: slices.Clone(shape), dt: st}, nil
}

// bf16Bytes rounds v to bfloat16 (exact for values that have a bf16 form, such as fp8's).
func bf16Bytes(v []float32) []byte {
	out := make([]byte, 2*len(v))
	for i, f := range v {
		h := safetensors.Float32ToBF16(f)
		out[2*i], out[2*i+1] = byte(h), byte(h>>8)
	}
	return out
}

// FromFloat32 copies values to a new float32 tensor of the given shape. Values are kept exactly; ops
// that read the tensor compute in float32 and store their outputs as the configured activation type.
func (b *Backend) FromFloat32(shape []int, values []float32) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	n, ok := numel(shape)
	if !ok || n != len(values) {
		return nil, fmt.Errorf("cuda: from float32 %v with %d values: %w", shape, len(values), backend.ErrShape)
	}
	t, err := b.newTensor(F32, slices.Clone(shape)...)
	if err != nil {
		return nil, err
	}
	if err := b.upload(t.ptr(), float32Bytes(values)); err != nil {
		return nil, err
	}
	return t, nil
}

// Float32 waits for the work that computes t and returns its values as float32, row-major.
func (b *Backend) Float32(t backend.Tensor) ([]float32, error) {
	tt, err := b.asTensor("float32", "t", t)
	if err != nil {
		return nil, err
	}
	if err := notQuantized("float32", tt); err != nil {
		return nil, err
	}
	n := tt.numel()
	raw := make([]byte, int64(n)*tt.dt.size())
	if err := b.download(raw, tt.ptr()); err != nil {
		return nil, fmt.Errorf("cuda: float32 of %v: %w", tt.shape, err)
	}
	out := make([]float32, n)
	if tt.dt == F32 {
		for i := range out {
			out[i] = math.Float32frombits(uint32(raw[4*i]) | uint32(raw[4*i+1])<<8 | uint32(raw[4*i+2])<<16 | uint32(raw[4*i+3])<<24)
		}
	} else {
		for i := range out {
			out[i] = safetensors.BF16ToFloat32(uint16(raw[2*i]) | uint16(raw[2*i+1])<<8)
		}
	}
	return out, nil
}

// Reshape returns a view of t with a new shape of the same element count. It shares t's memory.
func (b *Backend) Reshape(t backend.Tensor, shape ...int) (backend.Tensor, error) {
	tt, err := b.asTensor("reshape", "t", t)
	if err != nil {
		return nil, err
	}
	if err := notQuantized("reshape", tt); err != nil {
		return nil, err
	}
	n, ok := numel(shape)
	if !ok || n != tt.numel() {
		return nil, fmt.Errorf("cuda: reshape %v to %v: %w", tt.shape, shape, backend.ErrShape)
	}
	return &tensor{b: b, buf: tt.buf, off: tt.off, shape: slices.Clone(shape), dt: tt.dt}, nil
}

// Rows returns a view of rows [start, end) of t along its first dimension. It shares t's memory.
func (b *Backend) Rows(t backend.Tensor, start, end int) (backend.Tensor, error) {
	tt, err := b.asTensor("rows", "t", t)
	if err != nil {
		return nil, err
	}
	if err := notQuantized("rows", tt); err != nil {
		return nil, err
	}
	if len(tt.shape) == 0 || start < 0 || end < start || end > tt.shape[0] {
		return nil, fmt.Errorf("cuda: rows [%d, %d) of %v: %w", start, end, tt.shape, backend.ErrShape)
	}
	row, _ := numel(tt.shape[1:])
	shape := slices.Clone(tt.shape)
	shape[0] = end - start
	return &tensor{b: b, buf: tt.buf, off: tt.off + int64(start)*int64(row)*tt.dt.size(), shape: shape, dt: tt.dt}, nil
}

// RandomBF16 makes a bf16 tensor of shape whose values are mean + std·z, z ~ N(0, 1), generated on the
// device from a counter-based hash of seed and the element index (the same seed gives the same values).
// It gets dedicated memory like a loaded weight. Benchmarks use it for random models: nothing crosses
// the PCIe bus, so a 20 GB model is ready in well under a second.
func (b *Backend) RandomBF16(shape []int, mean, std float32, seed uint64) (backend.Tensor, error) {
	if b.closed {
		return nil, ErrClosed
	}
	n, ok := numel(shape)
	if !ok {
		return nil, fmt.Errorf("cuda: random bf16%v: %w", shape, backend.ErrShape)
	}
	buf, err := b.pool.getDedicated(int64(n) * 2)
	if err != nil {
		return nil, fmt.Errorf("cuda: random bf16%v: %w", shape, err)
	}
	buf = b.pool.owned(buf)
	t := &tensor{b: b, buf: buf, shape: slices.Clone(shape), dt: BF16}
	if n == 0 {
		return t, nil
	}
	err = b.stream.launch(b.k.fillRandom, elemGrid(n), elemBlockDim, 0, t, int64(n), int64(seed), mean, std)
	return b.result("random bf16", t, err)
}

// DeviceCount loads the CUDA libraries (see New) and returns the number of GPUs the driver sees.
func DeviceCount() (int, error) {
	if err := loadLibraries(dl.SearchDirs(nil)); err != nil {
		return 0, err
	}
	return deviceCount()
}

// DeviceBuffer describes t's device memory for an NCCL collective on the backend's stream. t must stay
// reachable until the collective has been enqueued.
func (b *Backend) DeviceBuffer(t backend.Tensor) (comm.DeviceBuffer, error) {
	tt, err := b.asTensor("device buffer", "t", t)
	if err != nil {
		return comm.DeviceBuffer{}, err
	}
	return b.commBuffer(tt), nil
}
