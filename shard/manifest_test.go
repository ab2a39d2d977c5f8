package shard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

var builtins = []struct {
	name string
	plan Plan
}{
	{"tp", DefaultPlan(llama4Family)},
	{"ep", ExpertParallelPlan(llama4Family)},
}

// TestManifestReassembles loads every rank's part of every tensor through RankWeights and checks that the
// parts put back together are exactly the checkpoint's bytes: each byte of a plain split written by one
// rank, each byte of a whole tensor or of a replicated kv head by Replicas ranks.
func TestManifestReassembles(t *testing.T) {
	ctx := context.Background()
	for _, fx := range fixtures {
		cfg, ckpt := openFixture(t, fx)
		for _, pl := range builtins {
			for _, tp := range []int{1, 2, 4} {
				ms, err := NewManifests(cfg, ckpt, pl.plan, tp)
				if err != nil {
					t.Errorf("NewManifests(%s, %s, tp %d) error: %v", fx, pl.name, tp, err)
					continue
				}
				asm := map[string]*assembly{}
				for _, m := range ms {
					w := NewRankWeights(ckpt, fakeOps{}, m)
					var sum int64
					for _, s := range m.Tensors {
						name := strings.TrimPrefix(s.Name, cfg.Prefix)
						got, lay, err := w.Load(ctx, name)
						if err != nil {
							t.Fatalf("%s %s tp %d rank %d: Load(%q) error: %v", fx, pl.name, tp, m.Rank, name, err)
						}
						ft := got.(*fakeTensor)
						if !slices.Equal(ft.shape, s.LocalShape) || int64(len(ft.data)) != s.Bytes {
							t.Errorf("%s %s tp %d rank %d: Load(%q) = %v (%d bytes), want %v (%d bytes)", fx, pl.name, tp, m.Rank, name, ft.shape, len(ft.data), s.LocalShape, s.Bytes)
						}
						wantLay := llama4.Replicated
						if s.Split() {
							wantLay = llama4.Layout{Dim: s.Dim, Part: m.Rank, Parts: tp}
						}
						if !reflect.DeepEqual(lay, wantLay) {
							t.Errorf("%s %s tp %d rank %d: Load(%q) layout = %+v, want %+v", fx, pl.name, tp, m.Rank, name, lay, wantLay)
						}
						a := asm[s.Name]
						if a == nil {
							info, _ := ckpt.Info(s.Name)
							a = newAssembly(info)
							asm[s.Name] = a
						}
						dim, ranges := s.Dim, s.Ranges
						if !s.Split() {
							dim, ranges = 0, []safetensors.Range{{Start: 0, End: s.Shape[0]}}
						}
						if len(s.Shape) == 0 {
							continue
						}
						if err := a.place(dim, ranges, ft.data); err != nil {
							t.Errorf("%s %s tp %d rank %d: %s: %v", fx, pl.name, tp, m.Rank, s.Name, err)
						}
						sum += s.Bytes
					}
					if sum != m.Bytes || m.SplitBytes+m.ReplicatedBytes != m.Bytes {
						t.Errorf("%s %s tp %d rank %d: Bytes %d = split %d + whole %d, tensors sum to %d", fx, pl.name, tp, m.Rank, m.Bytes, m.SplitBytes, m.ReplicatedBytes, sum)
					}
				}
				for name, a := range asm {
					full, err := ckpt.ReadAll(name)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(a.data, full) {
						t.Errorf("%s %s tp %d: %s reassembled differs from the checkpoint", fx, pl.name, tp, name)
					}
					s, _ := ms[0].Lookup(name)
					for i, c := range a.count {
						if c != s.Replicas {
							t.Errorf("%s %s tp %d: %s byte %d read by %d ranks, want %d", fx, pl.name, tp, name, i, c, s.Replicas)
							break
						}
					}
				}
			}
		}
	}
}

// TestManifestSplits pins what the built-in plans do to each kind of tensor.
func TestManifestSplits(t *testing.T) {
	type want struct {
		style    Style
		dim      int
		ranges   []safetensors.Range
		local    []int
		replicas int
	}
	r := func(pairs ...int) []safetensors.Range {
		var out []safetensors.Range
		for i := 0; i < len(pairs); i += 2 {
			out = append(out, safetensors.Range{Start: pairs[i], End: pairs[i+1]})
		}
		return out
	}
	tests := []struct {
		fixture, plan string
		tp, rank      int
		tensor        string
		want          want
	}{
		{"moe-top1", "tp", 2, 1, "model.layers.0.self_attn.q_proj.weight", want{Colwise, 0, r(32, 64), []int{32, 64}, 1}},
		{"moe-top1", "tp", 2, 1, "model.layers.0.self_attn.k_proj.weight", want{Colwise, 0, r(16, 32), []int{16, 64}, 1}},
		{"moe-top1", "tp", 2, 1, "model.layers.0.self_attn.o_proj.weight", want{Rowwise, 1, r(32, 64), []int{64, 32}, 1}},
		{"moe-top1", "tp", 2, 1, "model.layers.0.feed_forward.experts.gate_up_proj", want{PackedRowwise, 2, r(32, 64, 96, 128), []int{4, 64, 64}, 1}},
		{"moe-top1", "tp", 4, 2, "model.layers.0.feed_forward.experts.gate_up_proj", want{PackedRowwise, 2, r(32, 48, 96, 112), []int{4, 64, 32}, 1}},
		{"moe-top1", "tp", 4, 3, "model.layers.0.feed_forward.experts.down_proj", want{Colwise, 1, r(48, 64), []int{4, 16, 64}, 1}},
		{"moe-top1", "tp", 2, 0, "model.layers.0.feed_forward.shared_expert.gate_proj.weight", want{Colwise, 0, r(0, 32), []int{32, 64}, 1}},
		{"moe-top1", "tp", 2, 0, "model.layers.0.feed_forward.shared_expert.down_proj.weight", want{Rowwise, 1, r(0, 32), []int{64, 32}, 1}},
		{"moe-top1", "tp", 2, 0, "model.layers.0.feed_forward.router.weight", want{"", -1, nil, []int{4, 64}, 2}},
		{"moe-top1", "tp", 4, 1, "model.embed_tokens.weight", want{EmbeddingRowwise, 0, r(128, 256), []int{128, 64}, 1}},
		{"moe-top1", "tp", 4, 3, "lm_head.weight", want{ColwiseGatherOutput, 0, r(384, 512), []int{128, 64}, 1}},
		{"moe-top1", "tp", 4, 0, "model.norm.weight", want{"", -1, nil, []int{64}, 4}},
		{"moe-top1", "ep", 4, 2, "model.layers.3.feed_forward.experts.gate_up_proj", want{GroupedGEMM, 0, r(2, 3), []int{1, 64, 128}, 1}},
		{"moe-top1", "ep", 2, 1, "model.layers.3.feed_forward.experts.down_proj", want{GroupedGEMM, 0, r(2, 4), []int{2, 64, 64}, 1}},
		{"moe-top1", "ep", 2, 1, "model.layers.3.feed_forward.router.weight", want{EPRouter, -1, nil, []int{4, 64}, 2}},
		{"moe-top1", "ep", 2, 1, "model.layers.3.feed_forward.shared_expert.up_proj.weight", want{"", -1, nil, []int{64, 64}, 2}},
		{"dense-moe-mm", "tp", 2, 1, "language_model.model.layers.0.feed_forward.gate_proj.weight", want{Colwise, 0, r(64, 128), []int{64, 64}, 1}},
		{"dense-moe-mm", "tp", 4, 1, "language_model.model.layers.2.feed_forward.down_proj.weight", want{Rowwise, 1, r(32, 64), []int{64, 32}, 1}},
		{"dense-moe-mm", "ep", 4, 1, "language_model.model.layers.2.feed_forward.down_proj.weight", want{Rowwise, 1, r(32, 64), []int{64, 32}, 1}},
		{"dense-moe-mm", "tp", 2, 1, "language_model.lm_head.weight", want{ColwiseGatherOutput, 0, r(256, 512), []int{256, 64}, 1}},

		// kv heads: moe-top1 has 2; at tp 4 ranks 0-1 read head 0 and ranks 2-3 head 1.
		{"moe-top1", "tp", 4, 0, "model.layers.1.self_attn.k_proj.weight", want{Colwise, 0, r(0, 16), []int{16, 64}, 2}},
		{"moe-top1", "tp", 4, 1, "model.layers.1.self_attn.k_proj.weight", want{Colwise, 0, r(0, 16), []int{16, 64}, 2}},
		{"moe-top1", "tp", 4, 2, "model.layers.1.self_attn.v_proj.weight", want{Colwise, 0, r(16, 32), []int{16, 64}, 2}},
		{"moe-top1", "tp", 4, 3, "model.layers.1.self_attn.v_proj.weight", want{Colwise, 0, r(16, 32), []int{16, 64}, 2}},
		{"moe-top1", "tp", 4, 3, "model.layers.1.self_attn.q_proj.weight", want{Colwise, 0, r(48, 64), []int{16, 64}, 1}},
		{"moe-top1", "ep", 4, 3, "model.layers.1.self_attn.k_proj.weight", want{Colwise, 0, r(16, 32), []int{16, 64}, 2}},
		// moe-top2 has 1 kv head: every rank reads it.
		{"moe-top2", "tp", 2, 1, "model.layers.5.self_attn.k_proj.weight", want{Colwise, 0, r(0, 16), []int{16, 64}, 2}},
		{"moe-top2", "tp", 4, 3, "model.layers.5.self_attn.v_proj.weight", want{Colwise, 0, r(0, 16), []int{16, 64}, 4}},
		{"moe-top2", "tp", 4, 2, "model.layers.5.self_attn.o_proj.weight", want{Rowwise, 1, r(32, 48), []int{64, 16}, 1}},
		{"moe-top2", "tp", 1, 0, "model.layers.5.self_attn.k_proj.weight", want{Colwise, 0, r(0, 16), []int{16, 64}, 1}},
	}
	for _, tt := range tests {
		cfg, ckpt := openFixture(t, tt.fixture)
		plan, _ := NamedPlan(llama4Family, tt.plan)
		m, err := NewManifest(cfg, ckpt, plan, tt.tp, tt.rank)
		if err != nil {
			t.Errorf("NewManifest(%s, %s, tp %d, rank %d) error: %v", tt.fixture, tt.plan, tt.tp, tt.rank, err)
			continue
		}
		s, ok := m.Lookup(tt.tensor)
		if !ok {
			t.Errorf("NewManifest(%s, %s, tp %d, rank %d): no %s", tt.fixture, tt.plan, tt.tp, tt.rank, tt.tensor)
			continue
		}
		got := want{s.Style, s.Dim, s.Ranges, s.LocalShape, s.Replicas}
		if got.style != tt.want.style || got.dim != tt.want.dim || !slices.Equal(got.ranges, tt.want.ranges) ||
			!slices.Equal(got.local, tt.want.local) || got.replicas != tt.want.replicas {
			t.Errorf("NewManifest(%s, %s, tp %d, rank %d)[%s] = %+v, want %+v", tt.fixture, tt.plan, tt.tp, tt.rank, tt.tensor, got, tt.want)
		}
	}
}

func TestManifestSkipsVision(t *testing.T) {
	cfg, ckpt := openFixture(t, "dense-moe-mm")
	m, err := NewManifest(cfg, ckpt, DefaultPlan(llama4Family), 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	text := 0
	for _, name := range ckpt.Names() {
		if strings.HasPrefix(name, llama4.TextPrefix) {
			text++
		}
	}
	if len(m.Tensors) != text {
		t.Errorf("NewManifest(dense-moe-mm) = %d tensors, want the %d language_model.* ones", len(m.Tensors), text)
	}
	for _, s := range m.Tensors {
		if !strings.HasPrefix(s.Name, llama4.TextPrefix) {
			t.Errorf("NewManifest(dense-moe-mm) has %s, want only language_model.* tensors", s.Name)
		}
	}
	if m.Prefix != llama4.TextPrefix {
		t.Errorf("NewManifest(dense-moe-mm).Prefix = %q, want %q", m.Prefix, llama4.TextPrefix)
	}
}

// TestLegacyPlanSameSplits: HF 4.x's plan (local_* styles, gather, colwise_rep) splits every tensor as 5.17's.
func TestLegacyPlanSameSplits(t *testing.T) {
	for _, pair := range [][2]string{
		{hfTPLegacy, hfTP517[:len(hfTP517)-1] + `, "lm_head": "colwise_gather_output"}`},
		{hfEPLegacy, hfEP517},
	} {
		legacy, err := ParsePlan([]byte(pair[0]))
		if err != nil {
			t.Fatal(err)
		}
		current, err := ParsePlan([]byte(pair[1]))
		if err != nil {
			t.Fatal(err)
		}
		for _, fx := range fixtures {
			cfg, ckpt := openFixture(t, fx)
			a, err := NewManifest(cfg, ckpt, legacy, 2, 1)
			if err != nil {
				t.Errorf("NewManifest(%s, legacy) error: %v", fx, err)
				continue
			}
			b, err := NewManifest(cfg, ckpt, current, 2, 1)
			if err != nil {
				t.Errorf("NewManifest(%s, 5.17) error: %v", fx, err)
				continue
			}
			for i, s := range a.Tensors {
				o := b.Tensors[i]
				if s.Dim != o.Dim || s.Packed != o.Packed || !slices.Equal(s.Ranges, o.Ranges) {
					t.Errorf("NewManifest(%s, legacy)[%s] = %s dim %d %v, want as 5.17's %s dim %d %v", fx, s.Name, s.Style, s.Dim, s.Ranges, o.Style, o.Dim, o.Ranges)
				}
			}
		}
	}
}

func TestManifestAssembledHFPlan(t *testing.T) {
	plan, err := ParsePlan([]byte(hfAssembled))
	if err != nil {
		t.Fatal(err)
	}
	for _, fx := range fixtures {
		cfg, ckpt := openFixture(t, fx)
		m, err := NewManifest(cfg, ckpt, plan, 2, 0)
		if err != nil {
			t.Errorf("NewManifest(%s, assembled HF plan) error: %v", fx, err)
			continue
		}
		var unused []string
		for _, r := range m.Unused {
			unused = append(unused, r.Pattern)
		}
		want := []string{"vision_model.model.layers.*.self_attn.q_proj", "vision_model.vision_adapter.mlp.fc1",
			"vision_model.patch_embedding.linear", "multi_modal_projector.linear_1"}
		if !slices.Equal(unused, want) {
			t.Errorf("NewManifest(%s, assembled HF plan).Unused = %v, want %v", fx, unused, want)
		}
		s, _ := m.Lookup(cfg.Prefix + "model.layers.0.input_layernorm.weight")
		if s.Style != SequenceParallel || s.Split() {
			t.Errorf("NewManifest(%s, assembled HF plan)[input_layernorm] = %s split %v, want sequence_parallel whole", fx, s.Style, s.Split())
		}
	}
}

func TestManifestErrors(t *testing.T) {
	type check struct {
		sentinel error
		contains []string
	}
	tests := []struct {
		fixture string
		plan    string // "tp", "ep" or JSON
		tp      int
		rank    int
		want    []check
	}{
		// tp 3 divides nothing of the fixtures.
		{"moe-top1", "tp", 3, 0, []check{
			{ErrIndivisible, []string{"model.layers.*.self_attn.q_proj.weight", "4 attention heads (num_attention_heads)", "tp=3"}},
			{ErrIndivisible, []string{"model.layers.*.self_attn.k_proj.weight", "2 key/value heads", "multiple"}},
			{ErrIndivisible, []string{"model.layers.*.self_attn.o_proj.weight", "4 attention heads"}},
			{ErrIndivisible, []string{"model.layers.*.feed_forward.shared_expert.gate_proj.weight", "64 intermediate columns (intermediate_size)"}},
			{ErrIndivisible, []string{"model.layers.*.feed_forward.experts.gate_up_proj", "64 expert intermediate columns per half", "packed"}},
			{ErrIndivisible, []string{"model.layers.*.feed_forward.experts.down_proj", "64 intermediate columns"}},
			{ErrIndivisible, []string{"model.embed_tokens.weight", "512 vocabulary rows (vocab_size)"}},
			{ErrIndivisible, []string{"lm_head.weight", "512 vocabulary rows"}},
		}},
		{"moe-top1", "ep", 3, 2, []check{
			{ErrIndivisible, []string{"model.layers.*.feed_forward.experts.gate_up_proj", "grouped_gemm", "4 experts (num_local_experts)"}},
			{ErrIndivisible, []string{"model.layers.*.feed_forward.experts.down_proj", "4 experts"}},
		}},
		{"dense-moe-mm", "tp", 3, 0, []check{
			{ErrIndivisible, []string{"language_model.model.layers.*.feed_forward.gate_proj.weight", "128 intermediate columns (intermediate_size_mlp)"}},
			{ErrIndivisible, []string{"language_model.model.layers.*.feed_forward.down_proj.weight", "128 intermediate columns"}},
			{ErrIndivisible, []string{"language_model.model.layers.*.self_attn.q_proj.weight", "4 attention heads"}},
			{ErrIndivisible, []string{"language_model.model.embed_tokens.weight", "512 vocabulary rows"}},
		}},
		{"moe-top2", "tp", 3, 0, []check{
			{ErrIndivisible, []string{"model.layers.*.self_attn.q_proj.weight", "4 attention heads"}},
		}},
		// 2 kv heads fit tp 4 by replication, not tp 8; tp 8 also leaves half a q head per rank.
		{"moe-top1", "tp", 8, 0, []check{
			{ErrIndivisible, []string{"q_proj", "4 attention heads", "tp=8"}},
		}},
		{"moe-top1", "tp", 0, 0, []check{{ErrRank, []string{"tp 0"}}}},
		{"moe-top1", "tp", 2, 2, []check{{ErrRank, []string{"rank 2 of tp 2"}}}},
		{"moe-top1", "tp", 2, -1, []check{{ErrRank, nil}}},

		{"moe-top1", `{"layers.*.self_attn.qkv_proj": "colwise", "lm_head": "colwise"}`, 2, 0, []check{
			{ErrNoMatch, []string{`"layers.*.self_attn.qkv_proj"`}},
		}},
		{"moe-top1", `{"layers.*.self_attn.q_proj": "colwise", "layers.*.feed_forward.expert.gate_up_proj": "packed_rowwise", "layers.*.self_attn.q_proj.bias": "colwise"}`, 2, 0, []check{
			{ErrNoMatch, []string{`"layers.*.feed_forward.expert.gate_up_proj"`, "packed_rowwise"}},
			{ErrNoMatch, []string{`"layers.*.self_attn.q_proj.bias"`}},
		}},
		{"moe-top1", `{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise", "layers.*.self_attn.v_proj": "colwise"}`, 2, 0, []check{
			{ErrInconsistent, []string{"model.layers.*.self_attn:", "q_proj split on dim 0 (colwise)", "o_proj whole (no rule)", "exactly when o_proj"}},
		}},
		{"moe-top1", `{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}`, 2, 0, []check{
			{ErrInconsistent, []string{"k_proj whole", "v_proj whole"}},
		}},
		{"moe-top1", `{"layers.*.self_attn.o_proj": "colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"model.layers.*.self_attn.o_proj.weight", "colwise", "dim 0", "split by heads on dim 1 (rowwise)"}},
		}},
		{"moe-top1", `{"layers.*.self_attn.q_proj": "rowwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"q_proj.weight", "dim 1"}},
		}},
		{"moe-top1", `{"experts.gate_up_proj": "rowwise", "experts.down_proj": "colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"gate_up_proj", "plainly", "packed_rowwise"}},
		}},
		{"moe-top1", `{"experts.gate_up_proj": "colwise", "experts.down_proj": "colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"gate_up_proj", "dim 1"}},
		}},
		{"moe-top1", `{"experts.gate_up_proj": "packed_rowwise", "experts.down_proj": "grouped_gemm"}`, 2, 0, []check{
			{ErrInconsistent, []string{"model.layers.*.feed_forward.experts:", "gate_up_proj split on dim 2", "down_proj split on dim 0"}},
		}},
		{"moe-top1", `{"experts.gate_up_proj": "packed_rowwise"}`, 2, 0, []check{
			{ErrInconsistent, []string{"down_proj whole"}},
		}},
		{"moe-top1", `{"feed_forward.router": "colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"router.weight", "route every token"}},
		}},
		{"moe-top1", `{"input_layernorm": "colwise", "norm": "packed_colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"input_layernorm.weight", "only whole"}},
			{ErrUnsupported, []string{"model.norm.weight", "only whole"}},
		}},
		{"moe-top1", `{"embed_tokens": "colwise"}`, 2, 0, []check{
			{ErrUnsupported, []string{"embed_tokens.weight", "dim 1", "vocabulary rows on dim 0"}},
		}},
		{"dense-moe-mm", `{"layers.*.feed_forward.gate_proj": "colwise", "layers.*.feed_forward.up_proj": "colwise"}`, 2, 0, []check{
			{ErrInconsistent, []string{"language_model.model.layers.*.feed_forward:", "down_proj whole", "exactly when down_proj"}},
		}},
		{"dense-moe-mm", `{"shared_expert.down_proj": "rowwise"}`, 2, 0, []check{
			{ErrInconsistent, []string{"feed_forward.shared_expert:", "gate_proj whole"}},
		}},
	}
	for _, tt := range tests {
		cfg, ckpt := openFixture(t, tt.fixture)
		plan, ok := NamedPlan(llama4Family, tt.plan)
		if !ok {
			var err error
			if plan, err = ParsePlan([]byte(tt.plan)); err != nil {
				t.Fatalf("ParsePlan(%s): %v", tt.plan, err)
			}
		}
		_, err := NewManifest(cfg, ckpt, plan, tt.tp, tt.rank)
		desc := fmt.Sprintf("NewManifest(%s, %.40s, tp %d, rank %d)", tt.fixture, tt.plan, tt.tp, tt.rank)
		if err == nil {
			t.Errorf("%s = nil error, want %d problems", desc, len(tt.want))
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s = %q, want one line", desc, err)
		}
		var list []error
		if errs, ok := err.(Errors); ok {
			list = errs
		} else {
			list = []error{err}
		}
		seen := map[string]bool{}
		for _, e := range list {
			if seen[e.Error()] {
				t.Errorf("%s reports %q twice", desc, e)
			}
			seen[e.Error()] = true
		}
		for _, c := range tt.want {
			found := false
			for _, e := range list {
				if !errors.Is(e, c.sentinel) {
					continue
				}
				all := true
				for _, s := range c.contains {
					all = all && strings.Contains(e.Error(), s)
				}
				found = found || all
			}
			if !found {
				t.Errorf("%s = %q, want a %v error mentioning %q", desc, err, c.sentinel, c.contains)
			}
		}
		if !errors.Is(err, tt.want[0].sentinel) {
			t.Errorf("errors.Is(%s, %v) = false, want true", desc, tt.want[0].sentinel)
		}
	}
}

// TestTensorErrorAs shows the structured error behind a message.
func TestTensorErrorAs(t *testing.T) {
	cfg, ckpt := openFixture(t, "moe-top2")
	_, err := NewManifest(cfg, ckpt, DefaultPlan(llama4Family), 3, 0)
	var te *TensorError
	if !errors.As(err, &te) {
		t.Fatalf("NewManifest(moe-top2, tp 3) = %v, want a *TensorError", err)
	}
	// Problems come in checkpoint name order: lm_head.weight sorts first.
	if te.Tensor != "lm_head.weight" || te.Style != ColwiseGatherOutput || te.Pattern != "lm_head" || te.Err != ErrIndivisible {
		t.Errorf("NewManifest(moe-top2, tp 3) first error = %+v, want lm_head colwise_gather_output ErrIndivisible", te)
	}
}

// TestVisionPatternOnTextCheckpoint: vision rules are out of the text model's scope, not errors.
func TestVisionPatternOnTextCheckpoint(t *testing.T) {
	cfg, ckpt := openFixture(t, "moe-top1")
	plan, err := ParsePlan([]byte(`{"vision_model.model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}`))
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewManifest(cfg, ckpt, plan, 2, 0)
	if err != nil {
		t.Fatalf("NewManifest(moe-top1, vision rule) error: %v", err)
	}
	if len(m.Unused) != 1 || m.Unused[0].Pattern != "vision_model.model.layers.*.self_attn.q_proj" {
		t.Errorf("NewManifest(moe-top1, vision rule).Unused = %v, want the vision rule", m.Unused)
	}
}
