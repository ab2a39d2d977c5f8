package llama4_test

import (
	"errors"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4"
)

func TestLoadConfigFixtures(t *testing.T) {
	for _, tc := range []struct {
		fixture   string
		prefix    string
		rope      llama4.Rope
		layers    int
		moe       []bool
		useRoPE   []bool
		qkNorm    bool
		tuning    bool
		topK      int
		kvHeads   int
		chunkSize int
	}{
		{"moe-top1", "", llama4.Rope{Type: "llama3", Theta: 10000, Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEm: 32},
			4, []bool{true, true, true, true}, []bool{true, true, true, false}, true, true, 1, 2, 16},
		{"dense-moe-mm", llama4.TextPrefix, llama4.Rope{Type: "default", Theta: 500000},
			4, []bool{false, true, false, true}, []bool{true, true, true, false}, false, true, 1, 2, 16},
		{"moe-top2", "", llama4.Rope{Type: "llama3", Theta: 10000, Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEm: 32},
			6, []bool{true, true, true, true, true, true}, []bool{true, true, true, false, true, true}, true, true, 2, 1, 16},
	} {
		cfg, err := llama4.LoadConfig(filepath.Join(fixturesDir, tc.fixture))
		if err != nil {
			t.Fatalf("LoadConfig(%s) = %v", tc.fixture, err)
		}
		if cfg.Prefix != tc.prefix || cfg.Rope != tc.rope || cfg.NumLayers != tc.layers ||
			!slices.Equal(cfg.MoE, tc.moe) || !slices.Equal(cfg.UseRoPE, tc.useRoPE) || !slices.Equal(cfg.Chunked, tc.useRoPE) ||
			cfg.UseQKNorm != tc.qkNorm || cfg.TemperatureTuning != tc.tuning || cfg.TopK != tc.topK ||
			cfg.NumKVHeads != tc.kvHeads || cfg.AttentionChunkSize != tc.chunkSize {
			t.Errorf("LoadConfig(%s) = %+v\nwant prefix %q rope %+v layers %d moe %v rope layers %v qk-norm %v tuning %v top-k %d kv %d chunk %d",
				tc.fixture, cfg, tc.prefix, tc.rope, tc.layers, tc.moe, tc.useRoPE, tc.qkNorm, tc.tuning, tc.topK, tc.kvHeads, tc.chunkSize)
		}
		if cfg.HiddenSize != 64 || cfg.VocabSize != 512 || cfg.HeadDim != 16 || cfg.NumExperts != 4 || cfg.RMSNormEps != 1e-5 {
			t.Errorf("LoadConfig(%s) sizes = %+v", tc.fixture, cfg)
		}
	}
}

// minimal is a llama4_text config with only the required fields; everything else takes HF's defaults.
const minimal = `{"model_type": "llama4_text", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
 "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2 %s}`

func TestParseConfigDerivesLayers(t *testing.T) {
	for _, tc := range []struct {
		extra   string
		moe     []int
		noRoPE  []int
		chunked []int
	}{
		{``, []int{0, 1, 2, 3, 4, 5, 6, 7}, []int{3, 7}, []int{0, 1, 2, 4, 5, 6}},
		{`, "interleave_moe_layer_step": 2`, []int{1, 3, 5, 7}, []int{3, 7}, []int{0, 1, 2, 4, 5, 6}},
		{`, "no_rope_layers": [], "no_rope_layer_interval": 2`, []int{0, 1, 2, 3, 4, 5, 6, 7}, []int{1, 3, 5, 7}, []int{0, 2, 4, 6}},
		{`, "moe_layers": [5], "no_rope_layers": [1,1,1,1,1,1,1,0]`, []int{5}, []int{7}, []int{0, 1, 2, 3, 4, 5, 6}},
		{`, "layer_types": ["full_attention","chunked_attention","full_attention","chunked_attention","full_attention","full_attention","full_attention","full_attention"]`,
			[]int{0, 1, 2, 3, 4, 5, 6, 7}, []int{3, 7}, []int{1, 3}},
	} {
		cfg, err := llama4.ParseConfig([]byte(strings.Replace(minimal, "%s", tc.extra, 1)))
		if err != nil {
			t.Fatalf("ParseConfig(%s) = %v", tc.extra, err)
		}
		if got := indices(cfg.MoE, true); !slices.Equal(got, tc.moe) {
			t.Errorf("ParseConfig(%s) moe layers = %v, want %v", tc.extra, got, tc.moe)
		}
		if got := indices(cfg.UseRoPE, false); !slices.Equal(got, tc.noRoPE) {
			t.Errorf("ParseConfig(%s) NoPE layers = %v, want %v", tc.extra, got, tc.noRoPE)
		}
		if got := indices(cfg.Chunked, true); !slices.Equal(got, tc.chunked) {
			t.Errorf("ParseConfig(%s) chunked layers = %v, want %v", tc.extra, got, tc.chunked)
		}
		if cfg.HeadDim != 8 || cfg.Rope.Type != "default" || cfg.Rope.Theta != 500000 || cfg.AttentionChunkSize != 8192 || cfg.FloorScale != 8192 {
			t.Errorf("ParseConfig(%s) defaults = %+v", tc.extra, cfg)
		}
	}
}

func indices(v []bool, want bool) []int {
	var out []int
	for i, b := range v {
		if b == want {
			out = append(out, i)
		}
	}
	return out
}

func TestParseConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		json, field string
	}{
		{`{"model_type": "llama4_text", "vocab_size": 100, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}`, "hidden_size"},
		{`{"model_type": "llama4", "vision_config": {}}`, "text_config"},
		{`{"model_type": "llama4", "text_config": {"vocab_size": 100}}`, "hidden_size"},
		{strings.Replace(minimal, "%s", `, "hidden_size": "big"`, 1), "hidden_size"},
		{strings.Replace(minimal, "%s", `, "num_key_value_heads": 3`, 1), "num_key_value_heads"},
		{strings.Replace(minimal, "%s", `, "no_rope_layers": [1, 0]`, 1), "no_rope_layers"},
		{strings.Replace(minimal, "%s", `, "moe_layers": [9]`, 1), "moe_layers"},
		{strings.Replace(minimal, "%s", `, "num_experts_per_tok": 17`, 1), "num_experts_per_tok"},
		{strings.Replace(minimal, "%s", `, "rope_scaling": {"rope_type": "yarn", "factor": 2}`, 1), "rope_type"},
		{strings.Replace(minimal, "%s", `, "rope_scaling": {"rope_type": "llama3", "factor": 8}`, 1), "rope_scaling"},
		{strings.Replace(minimal, "%s", `, "rope_scaling": {"factor": "x"}`, 1), "rope_scaling.factor"},
		{strings.Replace(minimal, "%s", `, "attn_temperature_tuning": "yes"`, 1), "attn_temperature_tuning"},
		{strings.Replace(minimal, "%s", `, "layer_types": ["sliding"]`, 1), "layer_types"},
		{`{"model_type": "llama", "hidden_size": 1}`, "model_type"},
		{`[1, 2]`, "JSON object"},
	} {
		_, err := llama4.ParseConfig([]byte(tc.json))
		if !errors.Is(err, llama4.ErrConfig) || !strings.Contains(err.Error(), tc.field) || strings.Contains(err.Error(), "\n") {
			t.Errorf("ParseConfig(%s) error = %v, want one line wrapping ErrConfig naming %q", tc.json, err, tc.field)
		}
	}
}

// TestRopeForms: the hub's rope_scaling + rope_theta and transformers 5's rope_parameters parse alike.
func TestRopeForms(t *testing.T) {
	legacy := `, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}`
	params := `, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}`
	a, err := llama4.ParseConfig([]byte(strings.Replace(minimal, "%s", legacy, 1)))
	if err != nil {
		t.Fatal(err)
	}
	b, err := llama4.ParseConfig([]byte(strings.Replace(minimal, "%s", params, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if a.Rope != b.Rope {
		t.Errorf("legacy rope %+v != rope_parameters %+v", a.Rope, b.Rope)
	}
}

// TestInvFreq checks the llama3 scaling branches (spec §1.5: with factor 16 and low = high = 1, Scout-Instruct
// divides frequency indices >= 35 of 64 by 16 and leaves the rest).
func TestInvFreq(t *testing.T) {
	cfg := llama4.Config{HeadDim: 128, Rope: llama4.Rope{Type: "llama3", Theta: 500000, Factor: 16, LowFreqFactor: 1, HighFreqFactor: 1, OriginalMaxPositionEm: 8192}}
	got := cfg.InvFreq()
	for i, f := range got {
		base := 1 / math.Pow(500000, float64(2*i)/128)
		want := base
		if i >= 35 {
			want = base / 16
		}
		if math.Abs(float64(f)-want) > 1e-6*want || math.IsNaN(float64(f)) {
			t.Errorf("InvFreq()[%d] = %g, want %g", i, f, want)
		}
	}
	// The fixtures' setting (theta 10000, head_dim 16, factor 8, low 1, high 4, original 32) hits all three
	// branches: pair 0 unchanged, pair 1 smoothed, pairs >= 2 divided by 8.
	cfg = llama4.Config{HeadDim: 16, Rope: llama4.Rope{Type: "llama3", Theta: 10000, Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEm: 32}}
	got = cfg.InvFreq()
	base1 := 1 / math.Pow(10000, 2.0/16)
	smooth := (32/(2*math.Pi/base1) - 1) / 3
	want := []float64{1, (1-smooth)*base1/8 + smooth*base1, 1 / math.Pow(10000, 4.0/16) / 8}
	for i, w := range want {
		if math.Abs(float64(got[i])-w) > 1e-6*w {
			t.Errorf("InvFreq()[%d] = %g, want %g", i, got[i], w)
		}
	}
}

func TestAttnTemperature(t *testing.T) {
	cfg := llama4.Config{FloorScale: 8192, AttnScale: 0.1}
	for _, tc := range []struct {
		t    int
		want float64
	}{{0, 1}, {8190, 1}, {8191, 1 + 0.1*math.Log(2)}, {3*8192 - 1, 1 + 0.1*math.Log(4)}} {
		if got := cfg.AttnTemperature(tc.t); math.Abs(float64(got)-tc.want) > 1e-7 {
			t.Errorf("AttnTemperature(%d) = %v, want %v", tc.t, got, tc.want)
		}
	}
}

func TestLoadGeneration(t *testing.T) {
	dir := filepath.Join(fixturesDir, "moe-top1")
	cfg, err := llama4.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	g, err := llama4.LoadGeneration(dir, cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := llama4.Generation{BOS: 1, EOS: []int{2, 3}, Pad: 0, DoSample: true, Temperature: 0.6, TopP: 0.9}
	if g.BOS != want.BOS || !slices.Equal(g.EOS, want.EOS) || g.DoSample != want.DoSample || g.Temperature != want.Temperature || g.TopP != want.TopP {
		t.Errorf("LoadGeneration = %+v, want %+v", g, want)
	}
	g, err = llama4.LoadGeneration(t.TempDir(), cfg)
	if err != nil || g.DoSample || !slices.Equal(g.EOS, []int{2}) {
		t.Errorf("LoadGeneration(no file) = %+v, %v; want greedy with config eos [2]", g, err)
	}
}

// TestTensorsMatchCheckpoints: Config.Tensors lists exactly the text tensors each fixture checkpoint holds.
func TestTensorsMatchCheckpoints(t *testing.T) {
	for _, f := range fixtures(t) {
		want := map[string][]int{}
		for _, name := range f.ckpt.Names() {
			if strings.HasPrefix(name, f.cfg.Prefix) && !strings.HasPrefix(name, "vision_model.") && !strings.HasPrefix(name, "multi_modal_projector.") {
				info, _ := f.ckpt.Info(name)
				want[strings.TrimPrefix(name, f.cfg.Prefix)] = info.Shape
			}
		}
		specs := f.cfg.Tensors()
		if len(specs) != len(want) {
			t.Errorf("%s: Tensors() lists %d tensors, checkpoint has %d", f.name, len(specs), len(want))
		}
		for _, s := range specs {
			if shape, ok := want[s.Name]; !ok || !slices.Equal(shape, s.Shape) {
				t.Errorf("%s: Tensors() has %s %v, checkpoint %v (present %v)", f.name, s.Name, s.Shape, shape, ok)
			}
		}
	}
}
