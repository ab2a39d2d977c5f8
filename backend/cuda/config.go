package cuda

import (
	"flag"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
)

// DType is the storage type of a device tensor.
type DType int

const (
	// BF16 is bfloat16, the storage of weights and (by default) activations. Its value is the kernels'
	// DT_BF16 code.
	BF16 DType = iota
	// F32 is IEEE float32. Its value is the kernels' DT_F32 code.
	F32
)

// String returns "bf16" or "f32".
func (d DType) String() string {
	switch d {
	case BF16:
		return "bf16"
	case F32:
		return "f32"
	case quantized:
		return "quantized"
	}
	return fmt.Sprintf("DType(%d)", int(d))
}

// Set parses "bf16" or "f32" (flag.Value).
func (d *DType) Set(s string) error {
	switch strings.ToLower(s) {
	case "bf16", "bfloat16":
		*d = BF16
	case "f32", "float32":
		*d = F32
	default:
		return fmt.Errorf("cuda: dtype %q: want bf16 or f32", s)
	}
	return nil
}

// size is the number of bytes of one element.
func (d DType) size() int64 {
	if d == F32 {
		return 4
	}
	return 2
}

// Defaults of Config.
const (
	// DefaultWorkspace is cuBLASLt's workspace: 32 MiB, what cuBLAS itself uses on Hopper.
	DefaultWorkspace = 32 << 20
	// DefaultStaging is the pinned host buffer that host↔device copies go through: 8 MiB.
	DefaultStaging = 8 << 20
	// KernelCacheOff as Config.KernelCache disables the on-disk cubin cache.
	KernelCacheOff = "off"
)

// EnvGraphs, when set to 0, makes every Backend run steps eagerly (Config.Eager): like vLLM's
// --enforce-eager, for comparing and debugging without CUDA graphs.
const EnvGraphs = "TPFLEET_CUDA_GRAPHS"

// EnvPDL, when set to 0, turns programmatic dependent launch off for every Backend (Config.NoPDL).
const EnvPDL = "TPFLEET_CUDA_PDL"

// EnvUnfuse turns fusions off for every Backend, as Config.Unfuse does (the two lists are joined): "all",
// or a comma-separated list of the names in Fusions.
const EnvUnfuse = "TPFLEET_CUDA_UNFUSE"

// Fusions returns the names of the kernel fusions a Backend makes, each of which Config.Unfuse can turn
// off (a new slice each call: the list is not package state anyone can change). Every one but
// FuseGrouped, FuseQ4GEMM and FuseFP8Grouped gives the results of the kernels it replaces bit for bit;
// those replace cuBLASLt's GEMMs (FuseFP8Grouped at decode batches the fp8 expert GEMV), whose summation
// order is their own: FuseGrouped agrees with them to bf16 rounding, FuseQ4GEMM multiplies the same bf16
// weights and inputs and differs only in the order of its float32 sums, FuseFP8Grouped differs by the
// float32 rounding of its sums and the E4M3 rounding of the SwiGLU rows that follows (all are
// deterministic run to run all the same).
func Fusions() []string {
	return []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseGrouped,
		FuseQ4GEMM, FuseFP8Grouped, FuseQ4Split, FuseStreams}
}

// The fusions (Fusions).
const (
	// FuseRoute: a decode step's router top-k, expert counts and expert plan in one kernel (route_plan).
	FuseRoute = "route"
	// FuseSwiGLU: SiLU·mul in the GEMV of a gated MLP's gate and up (gemv_gated_N; with the router's
	// product for a MoE), at most two rows.
	FuseSwiGLU = "swiglu"
	// FuseExpertAct: the routed experts' SiLU·mul in their gate_up GEMV at decode, for bf16
	// (expert_gemv_swiglu_N), int4 (q4expert_gemv_swiglu_N) and output-major fp8 experts
	// (fp8_expert_gemv(_xs)_swiglu_N), at most 8 routing slots: no expert_act launch.
	FuseExpertAct = "act"
	// FuseExpertCombine: the routed experts' combine (and the shared expert's add) in their down GEMV
	// (expert_gemv_combine_N, q4expert_gemv_combine_N, fp8_expert_gemv(_xs)_combine_N), decode steps of at
	// most 4 routing slots: no expert_combine launch. The input-major quantised experts (qexpert_gemv_N)
	// keep both separate kernels.
	FuseExpertCombine = "combine"
	// FuseQKV: RoPE, qk-norm or the NoPE temperature and the KV cache append in one kernel (qk_append),
	// decode.
	FuseQKV = "qkv"
	// FuseVec: 16-byte loads and stores in the large elementwise kernels (the *_v8 kernels).
	FuseVec = "vec"
	// FusePack: a prefill's expert blocks unpadded where every row offset keeps cuBLASLt's alignment, so
	// the elementwise expert kernels touch no gap rows.
	FusePack = "pack"
	// FusePrefetch: the dense GEMVs (bf16, fp8 and int4 Linear) ask L2 for the start of their weight rows
	// before they wait for the kernel ahead (PDL_PROLOGUE_L2, kernels/prelude.cuh). A compile-time switch: turned off, the kernels
	// are compiled without it (a cache entry of their own); it changes timing only.
	FusePrefetch = "prefetch"
	// FuseGrouped: a prefill's bf16 routed experts as two grouped tensor-core GEMMs over every active
	// expert (kernels/grouped.cu: the tokens gathered in the tile loader, SiLU·mul and, at top-k 1, the
	// combine in the epilogues), reading the expert plan on the device; off, one cuBLASLt GEMM per active
	// expert after a host read of the counts, with expert_gather, expert_act and expert_combine.
	FuseGrouped = "grouped"
	// FuseQ4GEMM: int4 weights above the GEMVs' rows (prefill) on q4gemm, a tensor-core GEMM that turns the
	// codes into bf16(q·s) in registers (kernels/quant_int4.cu; the routed experts in one launch with SiLU·mul
	// in gate_up's epilogue), instead of dequant_int4_bf16 writing each weight as bf16 for cuBLASLt; dense
	// weights only up to q4gemmDenseMaxRows rows of x, above which cuBLASLt on the bf16 copy is faster. The
	// same bf16 products; the float32 sums in another order.
	FuseQ4GEMM = "q4gemm"
	// FuseFP8Grouped: the routed experts on fp8 weights with dynamic activations (--quantization fp8)
	// above 32 tokens (fp8ExpertGemvRows: prefill, and decode batches of 33 to 64 sequences) as the two grouped
	// tensor-core GEMMs on E4M3 codes (kernels/grouped.cu, W8A8, sm_89 and later), reading the expert plan
	// on the device; off, prefill runs one cuBLASLt FP8 GEMM per active expert after a host read of the
	// counts (fp8gemm.go) and decode batches the fp8 expert GEMV (fp8.go).
	FuseFP8Grouped = "fp8grouped"
	// FuseQ4Split: an int4 GEMV (q4gemv_N, q4gemv_multi_1) whose 64-row blocks are too few for the SMs
	// (Scout's 5120-row o_proj and shared down: 80 blocks on 132 SMs) also splits K over the blocks, whose
	// partial sums the last block of each row tile adds in split order; off, one block a row tile, its
	// warps splitting K. The same products; the float32 sums in another order (deterministic).
	FuseQ4Split = "q4split"
	// FuseStreams: a prefill's routed experts on cuBLASLt (one GEMM per active expert: bf16 weights, and fp8
	// with dynamic activations) run their GEMMs on four side streams at once (fanout.go), where one after
	// another on the compute stream each small grid leaves most SMs idle; off, on the compute stream. The
	// same GEMMs: the same results bit for bit.
	FuseStreams = "streams"
)

// Config configures a Backend.
type Config struct {
	// Device is the ordinal of the GPU to use (0 is the first CUDA sees).
	Device int `json:"cuda-device"`
	// Activations is the storage type of the ops' outputs that feed GEMMs and attention (RMSNorm,
	// SiLUMul, RoPE, ScaleRows, Attention): BF16 (the zero value; DESIGN §6), or F32, a reference mode
	// that also splits float32 GEMM inputs into two bf16 halves (twice the GEMM work, near-float32
	// results). Linear, Add and Experts always store float32 (residual stream, logits). Weights keep their
	// checkpoint's type (bf16 for every Llama 4 checkpoint) and the KV cache is always bf16.
	Activations DType `json:"cuda-activations"`
	// Poison fills every newly allocated activation with NaN before the op writes it, so elements an op
	// fails to write show up. It costs a memset per allocation: for tests and debugging.
	Poison bool `json:"cuda-poison"`
	// KernelCache is the directory where compiled kernels are kept between runs (one cubin per
	// compilation unit, keyed by source, options, architecture, device name, driver and NVRTC version).
	// Empty means $TPFLEET_KERNEL_CACHE (EnvKernelCache), else os.UserCacheDir()/tpfleet/kernels;
	// KernelCacheOff disables the cache.
	KernelCache string `json:"cuda-kernel-cache"`
	// LibDirs are directories searched for libcuda, cuBLASLt and NVRTC before $TPFLEET_LIB_DIRS and
	// the default places (pip wheels' nvidia/*/lib, /usr/local/cuda/lib64, ...).
	LibDirs []string `json:"cuda-lib-dirs"`
	// Workspace is cuBLASLt's workspace in bytes. 0 means DefaultWorkspace.
	Workspace int64 `json:"cuda-workspace"`
	// Staging is the size in bytes of the pinned host buffer used for copies. 0 means DefaultStaging.
	Staging int64 `json:"cuda-staging"`
	// Eager turns CUDA graphs off: Step runs every step's ops one by one (for comparisons and debugging).
	// The environment variable EnvGraphs=0 does the same for any Config.
	Eager bool `json:"cuda-eager"`
	// NoPDL turns programmatic dependent launch off: every kernel then starts only after the one before
	// it has finished (as on GPUs before Hopper, where it is always off). With it on (the default on
	// compute capability 9.0 and later when the driver has cuLaunchKernelEx), a kernel's launch and
	// start-up overlap the tail of the kernel before it, in graphs too. EnvPDL=0 does the same for any
	// Config. The results are the same either way.
	NoPDL bool `json:"cuda-no-pdl"`
	// Unfuse turns kernel fusions off, for comparing and debugging: "all", or a comma-separated list of
	// names from Fusions (route, swiglu, act, combine, qkv, vec, pack, prefetch, grouped, q4gemm,
	// fp8grouped, q4split, streams); empty keeps every fusion. The ops then launch the kernels the fusion replaces,
	// with the same results (grouped, q4gemm, fp8grouped and q4split: to the rounding of their sums). EnvUnfuse adds to it.
	Unfuse string `json:"cuda-unfuse"`
}

// fusionSet is the fusions a Backend makes.
type fusionSet map[string]bool

// parseUnfuse returns the fusions left on when those listed (comma-separated, or "all") are turned off.
func parseUnfuse(lists ...string) (fusionSet, error) {
	on := fusionSet{}
	for _, f := range Fusions() {
		on[f] = true
	}
	for _, list := range lists {
		for _, name := range strings.Split(list, ",") {
			name = strings.TrimSpace(strings.ToLower(name))
			switch {
			case name == "":
			case name == "all":
				clear(on)
			case slices.Contains(Fusions(), name):
				delete(on, name)
			default:
				return nil, fmt.Errorf("cuda: unfuse %q: no fusion %q (have all, %s)", list, name, strings.Join(Fusions(), ", "))
			}
		}
	}
	return on, nil
}

// defines are the preprocessor lines that compile the kernels without the compile-time fusions s lacks
// (compileUnits puts them before every unit's source).
func (s fusionSet) defines() string {
	if s[FusePrefetch] {
		return ""
	}
	return "#define TPFLEET_NO_L2_PREFETCH\n"
}

// names lists the fusions in s in the order of Fusions.
func (s fusionSet) names() []string {
	var out []string
	for _, f := range Fusions() {
		if s[f] {
			out = append(out, f)
		}
	}
	return out
}

// Validate reports a Config that New would refuse.
func (c Config) Validate() error {
	switch {
	case c.Device < 0:
		return fmt.Errorf("cuda: Device = %d, want >= 0", c.Device)
	case c.Activations != BF16 && c.Activations != F32:
		return fmt.Errorf("cuda: Activations = %v, want bf16 or f32", c.Activations)
	case c.Workspace < 0:
		return fmt.Errorf("cuda: Workspace = %d, want >= 0", c.Workspace)
	case c.Staging < 0:
		return fmt.Errorf("cuda: Staging = %d, want >= 0", c.Staging)
	}
	_, err := parseUnfuse(c.Unfuse)
	return err
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&c.Device, "cuda-device", c.Device, "ordinal of the GPU to use")
	fs.Var(&c.Activations, "cuda-activations", "storage of activations: bf16 or f32")
	fs.BoolVar(&c.Poison, "cuda-poison", c.Poison, "fill new activations with NaN first (debugging)")
	fs.StringVar(&c.KernelCache, "cuda-kernel-cache", c.KernelCache, "directory for compiled kernels (empty: $TPFLEET_KERNEL_CACHE, else the user cache dir; off: none)")
	fs.Func("cuda-lib-dirs", "colon-separated directories searched first for the CUDA libraries", func(s string) error {
		c.LibDirs = filepath.SplitList(s)
		return nil
	})
	fs.Int64Var(&c.Workspace, "cuda-workspace", c.Workspace, "cuBLASLt workspace in bytes (0: 32 MiB)")
	fs.Int64Var(&c.Staging, "cuda-staging", c.Staging, "pinned staging buffer in bytes (0: 8 MiB)")
	fs.BoolVar(&c.NoPDL, "cuda-no-pdl", c.NoPDL, "launch kernels without programmatic dependent launch (also $"+EnvPDL+"=0)")
	fs.StringVar(&c.Unfuse, "cuda-unfuse", c.Unfuse, "kernel fusions to turn off, for comparison: all, or a comma-separated list of "+
		strings.Join(Fusions(), ", ")+" (also $"+EnvUnfuse+")")
}
