package kernels

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestSource checks that every file is embedded, in order, with #line directives.
func TestSource(t *testing.T) {
	files := Files()
	for _, want := range []string{"attention.cu", "elementwise.cu", "expert_map.cu", "gemv.cu", "moe.cu", "quant.cu", "sample.cu"} {
		if !slices.Contains(files, want) {
			t.Errorf("Files() = %v, want it to contain %s", files, want)
		}
	}
	src := Source()
	if !strings.HasPrefix(src, "#line 1 \"prelude.cuh\"\n") {
		t.Errorf("Source() starts with %.40q, want the prelude's #line directive", src)
	}
	last := -1
	for _, f := range files {
		i := strings.Index(src, "#line 1 \""+f+"\"\n")
		if i < last {
			t.Errorf("Source(): %s at offset %d, want after %d", f, i, last)
		}
		last = i
	}
	if strings.Contains(src, "#include") {
		t.Errorf("Source() has an #include: the kernels must stay header-free for NVRTC")
	}
}

// TestEntries checks the kernels the backend looks up exist, once each.
func TestEntries(t *testing.T) {
	got := Entries(Source())
	want := []string{"kv_append", "attention", "attention_split", "attention_split_128_g1", "attention_split_128_g2", "attention_split_128_g4", "attention_split_128_g5", "attention_split_128_g8", "attention_combine", "convert", "embed", "rmsnorm", "add_rmsnorm", "spin", "add", "silu_mul",
		"scale_rows", "rope", "rope_qk", "linear_simple", "split_bf16", "add_halves", "gather_permute", "fill_random",
		"convert_v8", "silu_mul_v8", "split_bf16_v8", "add_rmsnorm_v8",
		"layernorm", "add_bias", "gelu", "rotate_pairs", "full_attention", "count_experts", "map_experts", "attention_flash", "attention_decode",
		"gemv_1", "gemv_2", "gemv_4", "gemv_8", "gemv_split_1", "gemv_split_2", "gemv_multi_1", "gemv_multi_2", "gemv_gated_1", "gemv_gated_2", "moe_plan", "expert_gemv_1", "expert_gemv_8",
		"expert_gemv_swiglu_1", "expert_gemv_swiglu_8", "expert_gemv_combine_1", "expert_gemv_combine_8", "expert_act", "expert_combine",
		"expert_gather", "expert_gather_v8", "expert_act_v8", "expert_combine_v8",
		"grouped_gate_up", "grouped_down", "grouped_fp8_gate_up", "grouped_fp8_down", "grouped_fill",
		"route", "route_plan", "expert_gate_up", "expert_down", "qk_append",
		"dequant_bf16", "qgemv_1", "qgemv_2", "qgemv_4", "qgemv_8", "qgemv_split_1", "qgemv_split_2", "qexpert_gemv_1", "qexpert_gemv_8", "quantize_bf16",
		"fp8_act_rows", "fp8_act_codes", "fp8_gemv_1", "fp8_gemv_2", "fp8_gemv_4", "fp8_gemv_8", "fp8_gemv_xs_1", "fp8_gemv_xs_2", "fp8_gemv_xs_4", "fp8_gemv_xs_8",
		"fp8_expert_gemv_1", "fp8_expert_gemv_4", "fp8_expert_gemv_xs_1", "fp8_expert_gemv_xs_4",
		"fp8_expert_gemv_swiglu_1", "fp8_expert_gemv_swiglu_4", "fp8_expert_gemv_xs_swiglu_1", "fp8_expert_gemv_xs_swiglu_4",
		"fp8_expert_gemv_combine_1", "fp8_expert_gemv_combine_4", "fp8_expert_gemv_xs_combine_1", "fp8_expert_gemv_xs_combine_4", "fp8_dequant_experts", "transpose_u8", "fp8_scale_out",
		"q4_xprep", "q4gemv_1", "q4gemv_2", "q4gemv_4", "q4gemv_1w", "q4gemv_2w", "q4gemv_4w", "q4gemv_multi_1", "q4gemv_multi_1w", "q4expert_gemv_1", "q4expert_gemv_2",
		"q4expert_gemv_swiglu_1", "q4expert_gemv_swiglu_2", "q4expert_gemv_combine_1", "q4expert_gemv_combine_2", "dequant_int4_bf16",
		"q4gemm", "q4gemm_experts", "q4gemm_experts_swiglu",
		"sample_argmax", "sample_rows"}
	if !slices.Equal(got, want) {
		t.Errorf("Entries(Source()) = %v, want %v", got, want)
	}
	if got := Entries(`extern "C" __global__ void __launch_bounds__(128) f(int x) {}`); !slices.Equal(got, []string{"f"}) {
		t.Errorf("Entries(launch bounds) = %v, want [f]", got)
	}
}

func TestFile(t *testing.T) {
	if _, err := File("nope.cu"); err == nil {
		t.Errorf("File(nope.cu) error = nil, want an error")
	}
	if s, err := File(Prelude); err != nil || !strings.Contains(s, "f32_to_bf16") {
		t.Errorf("File(%s) = %.30q, %v; want the prelude", Prelude, s, err)
	}
}

// TestUnits checks that the units cover every file once and every kernel once, and that each unit starts
// with the prelude.
func TestUnits(t *testing.T) {
	var files, entries []string
	for _, u := range Units() {
		files = append(files, u.Files...)
		src := u.Source()
		if !strings.HasPrefix(src, "#line 1 \"prelude.cuh\"\n") {
			t.Errorf("unit %s starts with %.40q, want the prelude", u.Name, src)
		}
		entries = append(entries, Entries(src)...)
	}
	slices.Sort(files)
	if !slices.Equal(files, Files()) {
		t.Errorf("Units() files = %v, want each of %v once", files, Files())
	}
	want := Entries(Source())
	slices.Sort(want)
	slices.Sort(entries)
	if !slices.Equal(entries, want) {
		t.Errorf("Units() kernels = %v, want each of %v once", entries, want)
	}
	if len(Units()) < 4 {
		t.Errorf("%d units, want several to compile in parallel", len(Units()))
	}
}

// TestPrologue checks that every kernel begins with PDL_PROLOGUE (so that the backend may launch it with
// programmatic dependent launch: a kernel without it would not wait for the one before it), and that
// Prologued finds exactly those.
func TestPrologue(t *testing.T) {
	for _, f := range Files() {
		src, err := File(f)
		if err != nil {
			t.Fatal(err)
		}
		entries, pro := Entries(src), Prologued(src)
		if !slices.Equal(pro, entries) {
			t.Errorf("%s: kernels %v begin with %s, want all of %v", f, pro, Prologue, entries)
		}
	}
	for _, tt := range []struct {
		src  string
		want []string
	}{
		{`extern "C" __global__ void f(int x) { PDL_PROLOGUE(); x++; }`, []string{"f"}},
		{"extern \"C\" __global__ void __launch_bounds__(128)\ng(const int* a,\n\tint n) {\n\tPDL_PROLOGUE();\n}", []string{"g"}},
		{`extern "C" __global__ void h(int x) { x++; PDL_PROLOGUE(); }`, nil},
		{`extern "C" __global__ void k(const bf16_t* w) { PDL_PROLOGUE_L2(l2_prefetch(gemv_l2(w, K, N))); }`, []string{"k"}},
		{`extern "C" __global__ void l(int x) { PDL_PROLOGUE_L2; }`, nil},
		{`extern "C" __global__ void i(int x) { } extern "C" __global__ void j(int x) { PDL_PROLOGUE(); }`, []string{"j"}},
	} {
		if got := Prologued(tt.src); !slices.Equal(got, tt.want) {
			t.Errorf("Prologued(%q) = %v, want %v", tt.src, got, tt.want)
		}
	}
}

// TestWideBlocksBounded: the kernels the backend launches with up to 1024 threads (the norms'
// normBlock, the samplers' SAMPLE_THREADS) declare __launch_bounds__ for it, so that ptxas keeps them
// within 64 registers a thread. Unbounded, add_rmsnorm_v8 took 78 and every 1024-thread launch failed
// with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES.
func TestWideBlocksBounded(t *testing.T) {
	src := Source()
	for _, name := range []string{"rmsnorm", "add_rmsnorm", "add_rmsnorm_v8", "layernorm", "sample_rows", "sample_argmax"} {
		re := regexp.MustCompile(`__global__\s+void\s+__launch_bounds__\((1024|SAMPLE_THREADS)\)\s+` + name + `\s*\(`)
		if !re.MatchString(src) {
			t.Errorf("kernel %s: no __launch_bounds__(1024) (or SAMPLE_THREADS) on its declaration", name)
		}
	}
}
