package shard

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
)

// HF's plans, verbatim from spec §4.1 and §4.3 (JSON form).
const (
	hfTP517 = `{
		"layers.*.self_attn.q_proj": "colwise",
		"layers.*.self_attn.k_proj": "colwise",
		"layers.*.self_attn.v_proj": "colwise",
		"layers.*.self_attn.o_proj": "rowwise",
		"layers.*.feed_forward.shared_expert.gate_proj": "colwise",
		"layers.*.feed_forward.shared_expert.up_proj": "colwise",
		"layers.*.feed_forward.shared_expert.down_proj": "rowwise",
		"layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
		"layers.*.feed_forward.experts.down_proj": "colwise",
		"layers.*.feed_forward.experts": "moe_tp_experts",
		"layers.*.feed_forward.gate_proj": "colwise",
		"layers.*.feed_forward.up_proj": "colwise",
		"layers.*.feed_forward.down_proj": "rowwise"
	}`
	hfEP517 = `{
		"layers.*.self_attn.q_proj": "colwise",
		"layers.*.self_attn.k_proj": "colwise",
		"layers.*.self_attn.v_proj": "colwise",
		"layers.*.self_attn.o_proj": "rowwise",
		"layers.*.feed_forward.experts.gate_up_proj": "grouped_gemm",
		"layers.*.feed_forward.experts.down_proj": "grouped_gemm",
		"layers.*.feed_forward.gate_proj": "colwise",
		"layers.*.feed_forward.up_proj": "colwise",
		"layers.*.feed_forward.down_proj": "rowwise",
		"layers.*.feed_forward.router": "ep_router"
	}`
	hfTPLegacy = `{
		"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
		"layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
		"layers.*.feed_forward.shared_expert.gate_proj": "local_colwise",
		"layers.*.feed_forward.shared_expert.up_proj": "local_colwise",
		"layers.*.feed_forward.shared_expert.down_proj": "local_rowwise",
		"layers.*.feed_forward.experts.gate_up_proj": "local_packed_rowwise",
		"layers.*.feed_forward.experts.down_proj": "local_colwise",
		"layers.*.feed_forward.experts": "local",
		"layers.*.feed_forward.gate_proj": "local_colwise",
		"layers.*.feed_forward.up_proj": "local_colwise",
		"layers.*.feed_forward.down_proj": "local_rowwise",
		"layers.*.feed_forward": "gather",
		"lm_head": "colwise_rep"
	}`
	hfEPLegacy = `{
		"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
		"layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
		"layers.*.feed_forward.experts.gate_up_proj": "grouped_gemm",
		"layers.*.feed_forward.experts.down_proj": "grouped_gemm",
		"layers.*.feed_forward.experts": "gather",
		"layers.*.feed_forward.gate_proj": "local_colwise", "layers.*.feed_forward.up_proj": "local_colwise",
		"layers.*.feed_forward.down_proj": "local_rowwise", "layers.*.feed_forward.router": "ep_router"
	}`
	// The earliest 4.51 plan also had the norms as sequence_parallel, and the assembled multimodal plan
	// carries the full module paths, the vision tower's entries and the projector's.
	hfAssembled = `{
		"language_model.model.layers.*.self_attn.q_proj": "colwise",
		"language_model.model.layers.*.self_attn.k_proj": "colwise",
		"language_model.model.layers.*.self_attn.v_proj": "colwise",
		"language_model.model.layers.*.self_attn.o_proj": "rowwise_rep",
		"language_model.model.layers.*.input_layernorm.weight": "sequence_parallel",
		"language_model.model.layers.*.post_attention_layernorm.weight": "sequence_parallel",
		"language_model.model.norm.weight": "sequence_parallel",
		"language_model.lm_head": "colwise_gather_output",
		"language_model.model.embed_tokens": "replicate",
		"vision_model.model.layers.*.self_attn.q_proj": "colwise",
		"vision_model.vision_adapter.mlp.fc1": "colwise",
		"vision_model.patch_embedding.linear": "colwise_gather_output",
		"multi_modal_projector.linear_1": "colwise_gather_output"
	}`
)

func TestParsePlanHF(t *testing.T) {
	tests := []struct {
		name, json string
		n          int
		first      Rule
		last       Rule
	}{
		{"tp 5.17", hfTP517, 13, Rule{"layers.*.self_attn.q_proj", Colwise}, Rule{"layers.*.feed_forward.down_proj", Rowwise}},
		{"ep 5.17", hfEP517, 10, Rule{"layers.*.self_attn.q_proj", Colwise}, Rule{"layers.*.feed_forward.router", EPRouter}},
		{"tp legacy", hfTPLegacy, 15, Rule{"layers.*.self_attn.q_proj", Colwise}, Rule{"lm_head", ColwiseRep}},
		{"ep legacy", hfEPLegacy, 11, Rule{"layers.*.self_attn.q_proj", Colwise}, Rule{"layers.*.feed_forward.router", EPRouter}},
		{"assembled", hfAssembled, 13, Rule{"language_model.model.layers.*.self_attn.q_proj", Colwise}, Rule{"multi_modal_projector.linear_1", ColwiseGatherOutput}},
		{"empty", `{}`, 0, Rule{}, Rule{}},
	}
	for _, tt := range tests {
		p, err := ParsePlan([]byte(tt.json))
		if err != nil {
			t.Errorf("ParsePlan(%s) error: %v", tt.name, err)
			continue
		}
		rules := p.Rules()
		if len(rules) != tt.n {
			t.Errorf("ParsePlan(%s) = %d rules, want %d", tt.name, len(rules), tt.n)
			continue
		}
		if tt.n > 0 && (rules[0] != tt.first || rules[tt.n-1] != tt.last) {
			t.Errorf("ParsePlan(%s) = first %v last %v, want %v and %v (order kept)", tt.name, rules[0], rules[tt.n-1], tt.first, tt.last)
		}
		// Round trip through HF's JSON form keeps the order.
		data, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		q, err := ParsePlan(data)
		if err != nil || !slices.Equal(q.Rules(), rules) {
			t.Errorf("ParsePlan(Marshal(%s)) = %v, %v, want %v", tt.name, q.Rules(), err, rules)
		}
	}
}

func TestBuiltinPlans(t *testing.T) {
	hf, err := ParsePlan([]byte(hfTP517))
	if err != nil {
		t.Fatal(err)
	}
	want := append(hf.Rules(), Rule{"embed_tokens", EmbeddingRowwise}, Rule{"lm_head", ColwiseGatherOutput})
	if got := DefaultPlan(llama4Family).Rules(); !slices.Equal(got, want) {
		t.Errorf("DefaultPlan(llama4Family) = %v, want %v", got, want)
	}
	hf, err = ParsePlan([]byte(hfEP517))
	if err != nil {
		t.Fatal(err)
	}
	want = append(hf.Rules(), Rule{"embed_tokens", EmbeddingRowwise}, Rule{"lm_head", ColwiseGatherOutput})
	if got := ExpertParallelPlan(llama4Family).Rules(); !slices.Equal(got, want) {
		t.Errorf("ExpertParallelPlan(llama4Family) = %v, want %v", got, want)
	}
	for _, name := range []string{"tp", "default", "ep"} {
		if _, ok := NamedPlan(llama4Family, name); !ok {
			t.Errorf("NamedPlan(llama4Family, %q) = _, false, want true", name)
		}
	}
	if _, ok := NamedPlan(llama4Family, "plan.json"); ok {
		t.Errorf("NamedPlan(llama4Family, %q) = _, true, want false", "plan.json")
	}
}

func TestParsePlanErrors(t *testing.T) {
	tests := []struct {
		json     string
		sentinel error
		contains []string
	}{
		{`{"layers.*.self_attn.q_proj": "colwize"}`, ErrUnknownStyle, []string{`"colwize"`, `"layers.*.self_attn.q_proj"`}},
		{`{"lm_head": "megamoe_experts"}`, ErrUnknownStyle, []string{`"megamoe_experts"`, `"lm_head"`}},
		{`{"lm_head": ""}`, ErrUnknownStyle, []string{`""`, `"lm_head"`}},
		{`{"lm_head": 3}`, ErrPlan, []string{`"lm_head"`, "string"}},
		{`["colwise"]`, ErrPlan, []string{"JSON object"}},
		{`{"lm_head": "colwise"`, ErrPlan, nil},
		{`{"lm_head": "colwise"} {}`, ErrPlan, []string{"after"}},
		{`{"lm_head": "colwise", "lm_head": "rowwise"}`, ErrPlan, []string{"twice"}},
		{`{"lm_head": "colwise", "language_model.lm_head": "rowwise"}`, ErrPlan, []string{"twice"}},
		{`{"": "colwise"}`, ErrPlan, []string{"empty pattern"}},
		{`{"layers..q_proj": "colwise"}`, ErrPlan, []string{"empty component"}},
		{`{"layers.*.q_*": "colwise"}`, ErrPlan, []string{"whole component"}},
	}
	for _, tt := range tests {
		_, err := ParsePlan([]byte(tt.json))
		if !errors.Is(err, tt.sentinel) {
			t.Errorf("ParsePlan(%s) = %v, want an error wrapping %v", tt.json, err, tt.sentinel)
			continue
		}
		for _, s := range tt.contains {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("ParsePlan(%s) = %q, want it to mention %s", tt.json, err, s)
			}
		}
	}
}

func TestPlanUnmarshalJSON(t *testing.T) {
	var cfg struct {
		Plan Plan `json:"tp_plan"`
	}
	if err := json.Unmarshal([]byte(`{"tp_plan": {"lm_head": "colwise_rep", "embed_tokens": "embedding_rowwise"}}`), &cfg); err != nil {
		t.Fatal(err)
	}
	want := []Rule{{"lm_head", ColwiseRep}, {"embed_tokens", EmbeddingRowwise}}
	if got := cfg.Plan.Rules(); !slices.Equal(got, want) {
		t.Errorf("Unmarshal(tp_plan) = %v, want %v", got, want)
	}
	if err := json.Unmarshal([]byte(`{"tp_plan": {"lm_head": "nope"}}`), &cfg); !errors.Is(err, ErrUnknownStyle) {
		t.Errorf("Unmarshal(unknown style) = %v, want ErrUnknownStyle", err)
	}
}

func TestMatch(t *testing.T) {
	plan, err := ParsePlan([]byte(`{
		"layers.*.self_attn.q_proj": "colwise",
		"layers.*.feed_forward.experts": "moe_tp_experts",
		"layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
		"layers.*.feed_forward": "gather",
		"feed_forward.router": "ep_router",
		"layers.1.self_attn.q_proj": "replicate",
		"model.layers.*.input_layernorm.weight": "sequence_parallel",
		"lm_head": "colwise_gather_output",
		"language_model.model.embed_tokens": "embedding_rowwise"
	}`))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		pattern string // "" for no match
	}{
		{"model.layers.0.self_attn.q_proj.weight", "layers.*.self_attn.q_proj"},
		{"language_model.model.layers.12.self_attn.q_proj.weight", "layers.*.self_attn.q_proj"},
		{"layers.3.self_attn.q_proj.weight", "layers.*.self_attn.q_proj"},
		{"model.layers.1.self_attn.q_proj.weight", "layers.1.self_attn.q_proj"}, // fewer wildcards win
		{"model.layers.0.self_attn.k_proj.weight", ""},
		{"model.layers.0.feed_forward.experts.gate_up_proj", "layers.*.feed_forward.experts.gate_up_proj"},
		{"model.layers.0.feed_forward.experts.down_proj", "layers.*.feed_forward.experts"}, // module match
		{"model.layers.0.feed_forward.router.weight", "feed_forward.router"},
		// HF matches a parameter and its own module only: "layers.*.feed_forward" (gather) is a module
		// style on the grandparent of gate_proj.weight and decides no parameter.
		{"model.layers.0.feed_forward.gate_proj.weight", ""},
		{"model.layers.0.input_layernorm.weight", "model.layers.*.input_layernorm.weight"},
		{"model.layers.0.post_attention_layernorm.weight", ""},
		{"lm_head.weight", "lm_head"},
		{"language_model.lm_head.weight", "lm_head"},
		{"model.embed_tokens.weight", "language_model.model.embed_tokens"},
		{"language_model.model.embed_tokens.weight", "language_model.model.embed_tokens"},
		{"model.layers.x.self_attn.q_proj.weight", ""}, // "*" is a number
		{"model.xlayers.0.self_attn.q_proj.weight", ""},
	}
	for _, tt := range tests {
		r, ok := plan.Match(tt.name)
		if ok != (tt.pattern != "") || r.Pattern != tt.pattern {
			t.Errorf("Match(%q) = %q, %v, want %q", tt.name, r.Pattern, ok, tt.pattern)
		}
	}
}

func TestStyles(t *testing.T) {
	// Every name of spec §4.2/§4.3 that the brief lists is known, with the dimension it splits.
	tests := []struct {
		style  Style
		ndim   int
		embed  bool
		dim    int
		packed bool
	}{
		{Colwise, 2, false, 0, false},
		{Colwise, 3, false, 1, false}, // experts.down_proj [E, I, H]: Shard(ndim-2)
		{Colwise, 1, false, 0, false}, // bias
		{Colwise, 2, true, 1, false},  // embedding: hidden dim
		{ColwiseGatherOutput, 2, false, 0, false},
		{ColwiseRep, 2, false, 0, false},
		{LocalColwise, 2, false, 0, false},
		{Rowwise, 2, false, 1, false},
		{Rowwise, 3, false, 2, false},
		{Rowwise, 1, false, -1, false}, // bias stays whole
		{Rowwise, 2, true, 0, false},   // embedding: vocabulary rows
		{RowwiseSplitInput, 2, false, 1, false},
		{RowwiseRep, 2, false, 1, false},
		{LocalRowwise, 2, false, 1, false},
		{EmbeddingRowwise, 2, true, 0, false},
		{PackedRowwise, 3, false, 2, true},
		{LocalPackedRowwise, 3, false, 2, true},
		{PackedColwise, 2, false, 0, true},
		{PackedColwise, 3, false, 1, true},
		{GroupedGEMM, 3, false, 0, false},
		{MoETPExperts, 3, false, -1, false},
		{Local, 3, false, -1, false},
		{Gather, 2, false, -1, false},
		{EPRouter, 2, false, -1, false},
		{Replicate, 2, false, -1, false},
		{SequenceParallel, 1, false, -1, false},
		{AllReduce, 2, false, -1, false},
		{ReplicatedWithGradAllreduce, 2, false, -1, false},
		{Colwise, 0, false, -1, false}, // a scalar stays whole
	}
	for _, tt := range tests {
		if !tt.style.Known() {
			t.Errorf("%q.Known() = false, want true", tt.style)
		}
		dim, packed := tt.style.dim(tt.ndim, tt.embed)
		if dim != tt.dim || packed != tt.packed {
			t.Errorf("%q.dim(%d, embedding %v) = %d, %v, want %d, %v", tt.style, tt.ndim, tt.embed, dim, packed, tt.dim, tt.packed)
		}
		if got := tt.style.SplitsParameters(); tt.ndim == 2 && !tt.embed && got != (tt.dim >= 0) {
			t.Errorf("%q.SplitsParameters() = %v, want %v", tt.style, got, tt.dim >= 0)
		}
	}
	if n := len(Styles()); n != 21 {
		t.Errorf("len(Styles()) = %d, want 21", n)
	}
}
