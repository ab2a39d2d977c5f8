package cuda

import (
	"errors"
	"flag"
	"github.com/tpfleet/tpfleet/internal/dl"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/kernels"
	"github.com/tpfleet/tpfleet/quant"
)

// These tests need no GPU: they run everywhere, CI included.

// TestNewWithoutCUDA runs only where libcuda is absent (CI): New must fail cleanly, naming the library.
func TestNewWithoutCUDA(t *testing.T) {
	if _, err := dl.Open([]string{"libcuda.so.1"}, nil, ErrUnavailable); err == nil {
		t.Skip("libcuda.so.1 is present")
	}
	_, err := New(Config{LibDirs: []string{t.TempDir()}})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "libcuda.so.1") {
		t.Errorf("New without libcuda error = %v, want one wrapping ErrUnavailable naming libcuda.so.1", err)
	}
}

func TestErrorFormat(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{check("cuMemAlloc(64 bytes)", cuResult(2)), "cuda: cuMemAlloc(64 bytes): cuda error 2 CUDA_ERROR_OUT_OF_MEMORY"},
		{check("cublasLtMatmul", ltStatus(15)), "cuda: cublasLtMatmul: cublasLt error 15 CUBLAS_STATUS_NOT_SUPPORTED"},
		{check("nvrtcCompileProgram", rtcResult(6)), "cuda: nvrtcCompileProgram: nvrtc error 6 NVRTC_ERROR_COMPILATION"},
	} {
		if tc.err == nil || !strings.HasPrefix(tc.err.Error(), tc.want) {
			t.Errorf("error = %v, want prefix %q", tc.err, tc.want)
		}
	}
	if err := check("cuInit", cuResult(0)); err != nil {
		t.Errorf("check(success) = %v, want nil", err)
	}
	if err := check("cuInit", cuResult(100)); !errors.Is(err, ErrUnavailable) {
		t.Errorf("check(cuInit, NO_DEVICE) = %v, want it to match ErrUnavailable", err)
	}
	if err := check("cuMemAlloc", cuResult(2)); errors.Is(err, ErrUnavailable) {
		t.Errorf("check(OUT_OF_MEMORY) matches ErrUnavailable, want not")
	}
	ce := &CompileError{Name: "k.cu", Err: check("nvrtcCompileProgram", rtcResult(6)), Log: "k.cu(3): error: x"}
	if !strings.Contains(ce.Error(), "k.cu(3): error: x") || !errors.Is(ce, ce.Err) {
		t.Errorf("CompileError = %v, want the log and the wrapped error", ce)
	}
}

func TestSizeClass(t *testing.T) {
	for _, tc := range []struct{ n, want int64 }{{0, 256}, {1, 256}, {256, 256}, {257, 512}, {4096, 4096}, {4097, 8192}, {3 << 20, 4 << 20}} {
		if got := sizeClass(tc.n); got != tc.want {
			t.Errorf("sizeClass(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

func TestPackArgs(t *testing.T) {
	slots := make([]uint64, 8)
	if err := packArgs(slots, []any{devptr(0x1000), 7, int32(-1), int64(-2), float32(1.5), true, false}); err != nil {
		t.Fatal(err)
	}
	want := []uint64{0x1000, 7, 0xffffffff, math.MaxUint64 - 1, uint64(math.Float32bits(1.5)), 1, 0, 0}
	if !slices.Equal(slots, want) {
		t.Errorf("packArgs = %#x, want %#x", slots, want)
	}
	for _, bad := range [][]any{{"x"}, {1 << 40}, make([]any, 9)} {
		if err := packArgs(slots, bad); err == nil {
			t.Errorf("packArgs(%v) error = nil, want an error", bad)
		}
	}
}

func TestInt32Bytes(t *testing.T) {
	b, err := int32Bytes("ids", []int{1, -2})
	if err != nil || !slices.Equal(b, []byte{1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff}) {
		t.Errorf("int32Bytes([1 -2]) = %v, %v", b, err)
	}
	if _, err := int32Bytes("ids", []int{1 << 33}); err == nil {
		t.Errorf("int32Bytes([1<<33]) error = nil, want an overflow error")
	}
}

// TestKernelCache checks the key depends on source, arch, NVRTC, device and driver, and that
// compileUnits compiles the units in parallel into an empty cache, takes every unit from a filled one
// without compiling, and compiles a corrupt file again with a warning. It needs no NVRTC (a fake
// compiler).
func TestKernelCache(t *testing.T) {
	base := target{arch: "sm_90", nvrtc: "13.0", device: "NVIDIA H100 80GB HBM3", driver: 13000}
	k := cacheKey("src", base)
	for _, other := range []string{cacheKey("src2", base), cacheKey("src", target{"sm_80", "13.0", base.device, 13000}),
		cacheKey("src", target{"sm_90", "12.9", base.device, 13000}), cacheKey("src", target{"sm_90", "13.0", "NVIDIA H200", 13000}),
		cacheKey("src", target{"sm_90", "13.0", base.device, 12080})} {
		if other == k {
			t.Errorf("cacheKey collision: %s", k)
		}
	}
	units := kernels.Units()
	var mu sync.Mutex
	running, most, calls := 0, 0, 0
	compile := func(src, name, arch string) ([]byte, error) {
		mu.Lock()
		running++
		calls++
		most = max(most, running)
		mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		running--
		mu.Unlock()
		return []byte("CUBIN " + name), nil
	}
	dir := filepath.Join(t.TempDir(), "kernels")
	res, err := compileUnits(dir, units, "", base, compile)
	if err != nil {
		t.Fatal(err)
	}
	if calls != len(units) || most < 2 {
		t.Errorf("empty cache: %d compiles, at most %d at once; want %d, in parallel", calls, most, len(units))
	}
	for _, r := range res {
		if r.hit || string(r.cubin) != "CUBIN "+r.unit.Name+".cu" || r.warn != "" {
			t.Errorf("empty cache: unit %s = hit %v, %q, warning %q", r.unit.Name, r.hit, r.cubin, r.warn)
		}
	}
	calls = 0
	res, err = compileUnits(dir, units, "", base, compile)
	if err != nil || calls != 0 {
		t.Fatalf("filled cache: %d compiles, error %v; want none", calls, err)
	}
	for _, r := range res {
		if !r.hit || string(r.cubin) != "CUBIN "+r.unit.Name+".cu" {
			t.Errorf("filled cache: unit %s = hit %v, %q", r.unit.Name, r.hit, r.cubin)
		}
	}
	// Another driver misses; a damaged file is compiled again with a warning naming it.
	if _, err := compileUnits(dir, units[:1], "", target{"sm_90", "13.0", base.device, 13010}, compile); err != nil || calls != 1 {
		t.Errorf("other driver: %d compiles, error %v; want 1", calls, err)
	}
	damaged := res[1].path
	b, _ := os.ReadFile(damaged)
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(damaged, b, 0o644); err != nil {
		t.Fatal(err)
	}
	calls = 0
	res, err = compileUnits(dir, units, "", base, compile)
	if err != nil || calls != 1 {
		t.Fatalf("damaged file: %d compiles, error %v; want 1", calls, err)
	}
	if r := res[1]; r.hit || !strings.Contains(r.warn, damaged) || !strings.Contains(r.warn, "corrupt") {
		t.Errorf("damaged file: hit %v, warning %q; want a compile and a warning naming %s", r.hit, r.warn, damaged)
	}
	if got, err := readCache(damaged); err != nil || string(got) != "CUBIN "+res[1].unit.Name+".cu" {
		t.Errorf("damaged file after the compile = %q, %v; want it stored again", got, err)
	}
	// A compile error is returned; no cache at all compiles every unit.
	fail := func(src, name, arch string) ([]byte, error) {
		return nil, &CompileError{Name: name, Err: errors.New("boom")}
	}
	if _, err := compileUnits("", units, "", base, fail); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("compile error: %v, want boom", err)
	}
	if d := defaultKernelCache(); d != "" && !strings.HasSuffix(d, filepath.Join("tpfleet", "kernels")) {
		t.Errorf("defaultKernelCache() = %q, want .../tpfleet/kernels", d)
	}
	t.Setenv(EnvKernelCache, "/cache/kernels")
	for _, c := range []struct{ configured, want string }{{"", "/cache/kernels"}, {"/x", "/x"}, {KernelCacheOff, ""}} {
		if got := KernelCacheDir(c.configured); got != c.want {
			t.Errorf("KernelCacheDir(%q) with $%s = %q, want %q", c.configured, EnvKernelCache, got, c.want)
		}
	}
	t.Setenv(EnvKernelCache, KernelCacheOff)
	if got := KernelCacheDir(""); got != "" {
		t.Errorf("KernelCacheDir() with $%s=off = %q, want none", EnvKernelCache, got)
	}
}

func TestConfig(t *testing.T) {
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("Config{}.Validate() = %v, want nil", err)
	}
	for _, c := range []Config{{Device: -1}, {Activations: 7}, {Workspace: -1}, {Staging: -1}} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v.Validate() = nil, want an error", c)
		}
	}
	var c Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.AddFlags(fs)
	if err := fs.Parse([]string{"-cuda-device=2", "-cuda-activations=f32", "-cuda-poison", "-cuda-lib-dirs=/a:/b", "-cuda-kernel-cache=off"}); err != nil {
		t.Fatal(err)
	}
	if c.Device != 2 || c.Activations != F32 || !c.Poison || !slices.Equal(c.LibDirs, []string{"/a", "/b"}) || c.KernelCache != KernelCacheOff {
		t.Errorf("after flags: %+v", c)
	}
	if err := fs.Parse([]string{"-cuda-activations=fp64"}); err == nil {
		t.Errorf("-cuda-activations=fp64: error = nil, want an error")
	}
	if BF16.String() != "bf16" || F32.String() != "f32" {
		t.Errorf("DType strings = %s, %s", BF16, F32)
	}
	if err := fs.Parse([]string{"-cuda-no-pdl", "-cuda-unfuse=act,qkv"}); err != nil || !c.NoPDL || c.Unfuse != "act,qkv" {
		t.Errorf("-cuda-no-pdl -cuda-unfuse=act,qkv: %v, %+v", err, c)
	}
	if err := (Config{Unfuse: "act,nope"}).Validate(); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Config{Unfuse: act,nope}.Validate() = %v, want an error naming nope", err)
	}
}

// TestParseUnfuse: Config.Unfuse and $TPFLEET_CUDA_UNFUSE turn off the fusions they list (or all), and
// name an unknown one.
func TestParseUnfuse(t *testing.T) {
	for _, tt := range []struct {
		lists []string
		want  []string
	}{
		{nil, Fusions()},
		{[]string{""}, Fusions()},
		{[]string{"all"}, nil},
		{[]string{"route, Vec", ""}, []string{FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FusePack, FusePrefetch, FuseGrouped, FuseQ4GEMM, FuseFP8Grouped, FuseQ4Split, FuseStreams}},
		{[]string{"act", "combine,qkv"}, []string{FuseRoute, FuseSwiGLU, FuseVec, FusePack, FusePrefetch, FuseGrouped, FuseQ4GEMM, FuseFP8Grouped, FuseQ4Split, FuseStreams}},
		{[]string{"grouped"}, []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseQ4GEMM, FuseFP8Grouped, FuseQ4Split, FuseStreams}},
		{[]string{"q4gemm"}, []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseGrouped, FuseFP8Grouped, FuseQ4Split, FuseStreams}},
		{[]string{"FP8Grouped"}, []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseGrouped, FuseQ4GEMM, FuseQ4Split, FuseStreams}},
		{[]string{"Q4Split"}, []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseGrouped, FuseQ4GEMM, FuseFP8Grouped, FuseStreams}},
		{[]string{"streams"}, []string{FuseRoute, FuseSwiGLU, FuseExpertAct, FuseExpertCombine, FuseQKV, FuseVec, FusePack, FusePrefetch, FuseGrouped, FuseQ4GEMM, FuseFP8Grouped, FuseQ4Split}},
		{[]string{"", "all"}, nil},
	} {
		got, err := parseUnfuse(tt.lists...)
		if err != nil || !slices.Equal(got.names(), tt.want) {
			t.Errorf("parseUnfuse(%q) = %v, %v; want %v", tt.lists, got.names(), err, tt.want)
		}
	}
	// prefetch is a compile-time fusion: turned off, the kernels are compiled with a define (and so
	// cached apart), and only then.
	on, _ := parseUnfuse("")
	off, _ := parseUnfuse("prefetch")
	if on.defines() != "" || off.defines() != "#define TPFLEET_NO_L2_PREFETCH\n" {
		t.Errorf("defines: all on %q, prefetch off %q; want none, then TPFLEET_NO_L2_PREFETCH", on.defines(), off.defines())
	}
	if _, err := parseUnfuse("route,fast"); err == nil || !strings.Contains(err.Error(), `"fast"`) {
		t.Errorf("parseUnfuse(route,fast) = %v, want an error naming fast", err)
	}
}

// TestCompactRouting: offloaded Experts copies the chosen local experts in id order and renumbers the
// routing into them; experts held elsewhere (expert parallelism) become -1, which the kernels skip.
func TestCompactRouting(t *testing.T) {
	for _, tt := range []struct {
		ids         []int
		first, E    int
		wantChosen  []int
		wantCompact []int32
	}{
		{[]int{5}, 0, 8, []int{5}, []int32{0}},
		{[]int{6, 2, 2, 6, 0, 7}, 0, 8, []int{0, 2, 6, 7}, []int32{2, 1, 1, 2, 0, 3}},
		{[]int{1, 5, 4, 7, 3, 4}, 4, 4, []int{0, 1, 3}, []int32{-1, 1, 0, 2, -1, 0}},
		{[]int{0, 1}, 4, 4, nil, []int32{-1, -1}},
		{nil, 0, 4, nil, []int32{}},
	} {
		chosen, compact := compactRouting(tt.ids, tt.first, tt.E)
		if !slices.Equal(chosen, tt.wantChosen) || !slices.Equal(compact, tt.wantCompact) {
			t.Errorf("compactRouting(%v, first %d, E %d) = %v, %v; want %v, %v", tt.ids, tt.first, tt.E, chosen, compact, tt.wantChosen, tt.wantCompact)
		}
	}
}

// TestFP8StagedBlocks: a capped staged fp8 grid gives every block the same number of row groups (the
// last may have fewer) and never more blocks than the cap.
func TestFP8StagedBlocks(t *testing.T) {
	for _, tt := range []struct{ groups, limit, want int }{
		{1, 264, 1}, {264, 264, 264}, {448, 264, 224}, {1024, 264, 256}, {265, 264, 133}, {7, 1, 1},
	} {
		got := fp8StagedBlocks(tt.groups, tt.limit)
		per := ceilDiv(tt.groups, got)
		if got != tt.want || got > max(tt.limit, 1) || (got-1)*per >= tt.groups {
			t.Errorf("fp8StagedBlocks(%d, %d) = %d, want %d (≤ the cap, %d groups a block, none idle)", tt.groups, tt.limit, got, tt.want, per)
		}
	}
}

// TestFP8SwiGLUBlocks: the grid of the fused fp8 gate_up GEMV divides the gate chunks (so a block owns
// the up chunks of its gate chunks) and is the largest such grid within the cap.
func TestFP8SwiGLUBlocks(t *testing.T) {
	for _, tt := range []struct{ chunks, limit, want int }{
		{512, 1024, 512}, {512, 264, 256}, {512, 4, 4}, {6, 5, 3}, {7, 6, 1}, {1, 264, 1}, {12, 0, 1},
	} {
		got := fp8SwiGLUBlocks(tt.chunks, tt.limit)
		if got != tt.want || tt.chunks%got != 0 || got > max(tt.limit, 1) {
			t.Errorf("fp8SwiGLUBlocks(%d, %d) = %d, want %d (a divisor, within the cap)", tt.chunks, tt.limit, got, tt.want)
		}
	}
}

// TestFP8KMajor: the fp8 experts weights with in and out multiples of 16 are kept output-major; Linear
// weights, int4 and other shapes keep package quant's layout.
func TestFP8KMajor(t *testing.T) {
	fp8, act, ct := quant.Format{Kind: quant.FP8}, quant.Format{Kind: quant.FP8, DynamicActivations: true}, quant.CompressedTensorsFP8()
	for _, tt := range []struct {
		f     quant.Format
		shape []int
		want  bool
	}{
		{act, []int{16, 5120, 16384}, true}, {fp8, []int{3, 256, 192}, true}, {ct, []int{128, 5120, 8192}, true},
		{act, []int{5120, 5120}, false}, {act, []int{4, 100, 104}, false}, {act, []int{4, 256, 120}, false},
		{quant.Format{Kind: quant.Int4, GroupSize: 128}, []int{16, 5120, 16384}, false}, {act, []int{0, 16, 16}, false},
	} {
		if got := fp8KMajor(tt.f, tt.shape); got != tt.want {
			t.Errorf("fp8KMajor(%s, %v) = %v, want %v", tt.f, tt.shape, got, tt.want)
		}
	}
}
