package shard_test

import (
	"fmt"
	"strings"

	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// A plan in HF's JSON form, with a legacy 4.x style name, matched against checkpoint keys of a multimodal
// and a text-only checkpoint.
func ExampleParsePlan() {
	plan, err := shard.ParsePlan([]byte(`{
		"layers.*.self_attn.q_proj": "colwise",
		"layers.*.self_attn.o_proj": "rowwise",
		"layers.*.feed_forward.experts": "moe_tp_experts",
		"layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
		"lm_head": "colwise_rep"
	}`))
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, name := range []string{
		"language_model.model.layers.7.self_attn.q_proj.weight",
		"model.layers.0.self_attn.o_proj.weight",
		"model.layers.0.feed_forward.experts.gate_up_proj",
		"model.layers.0.feed_forward.experts.down_proj",
		"lm_head.weight",
		"model.norm.weight",
	} {
		if r, ok := plan.Match(name); ok {
			fmt.Printf("%s: %s (%s)\n", name, r.Style, r.Pattern)
		} else {
			fmt.Printf("%s: whole\n", name)
		}
	}

	_, err = shard.ParsePlan([]byte(`{"layers.*.self_attn.q_proj": "colwize"}`))
	fmt.Println(err != nil)
	// Output:
	// language_model.model.layers.7.self_attn.q_proj.weight: colwise (layers.*.self_attn.q_proj)
	// model.layers.0.self_attn.o_proj.weight: rowwise (layers.*.self_attn.o_proj)
	// model.layers.0.feed_forward.experts.gate_up_proj: packed_rowwise (layers.*.feed_forward.experts.gate_up_proj)
	// model.layers.0.feed_forward.experts.down_proj: moe_tp_experts (layers.*.feed_forward.experts)
	// lm_head.weight: colwise_rep (lm_head)
	// model.norm.weight: whole
	// true
}

// The built-in plans, in HF's JSON form.
func ExampleExpertParallelPlan() {
	for _, r := range shard.ExpertParallelPlan(llama4.Config{}).Rules() {
		fmt.Printf("%s: %s\n", r.Pattern, r.Style)
	}
	// Output:
	// layers.*.self_attn.q_proj: colwise
	// layers.*.self_attn.k_proj: colwise
	// layers.*.self_attn.v_proj: colwise
	// layers.*.self_attn.o_proj: rowwise
	// layers.*.feed_forward.experts.gate_up_proj: grouped_gemm
	// layers.*.feed_forward.experts.down_proj: grouped_gemm
	// layers.*.feed_forward.gate_proj: colwise
	// layers.*.feed_forward.up_proj: colwise
	// layers.*.feed_forward.down_proj: rowwise
	// layers.*.feed_forward.router: ep_router
	// embed_tokens: embedding_rowwise
	// lm_head: colwise_gather_output
}

// What rank 1 of a TP group of 2 reads of a tiny checkpoint's first layer under the default plan.
func ExampleNewManifest() {
	dir := "../testdata/fixtures/moe-top1"
	cfg, err := llama4.LoadConfig(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ckpt.Close()
	m, err := shard.NewManifest(cfg, ckpt, shard.DefaultPlan(cfg), 2, 1)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, t := range m.Tensors {
		name, ok := strings.CutPrefix(t.Name, "model.layers.0.")
		if !ok {
			continue
		}
		split, style := "whole", string(t.Style)
		if t.Split() {
			split = fmt.Sprintf("dim %d", t.Dim)
			for _, r := range t.Ranges {
				split += fmt.Sprintf(" [%d,%d)", r.Start, r.End)
			}
		}
		if style == "" {
			style = "-"
		}
		fmt.Printf("%-43s %-14s %-22s %v\n", name, style, split, t.LocalShape)
	}
	fmt.Printf("rank 1 reads %d of %d bytes\n", m.Bytes, m.FullBytes)
	// Output:
	// feed_forward.experts.down_proj              colwise        dim 1 [32,64)          [4 32 64]
	// feed_forward.experts.gate_up_proj           packed_rowwise dim 2 [32,64) [96,128) [4 64 64]
	// feed_forward.router.weight                  -              whole                  [4 64]
	// feed_forward.shared_expert.down_proj.weight rowwise        dim 1 [32,64)          [64 32]
	// feed_forward.shared_expert.gate_proj.weight colwise        dim 0 [32,64)          [32 64]
	// feed_forward.shared_expert.up_proj.weight   colwise        dim 0 [32,64)          [32 64]
	// input_layernorm.weight                      -              whole                  [64]
	// post_attention_layernorm.weight             -              whole                  [64]
	// self_attn.k_proj.weight                     colwise        dim 0 [16,32)          [16 64]
	// self_attn.o_proj.weight                     rowwise        dim 1 [32,64)          [64 32]
	// self_attn.q_proj.weight                     colwise        dim 0 [32,64)          [32 64]
	// self_attn.v_proj.weight                     colwise        dim 0 [16,32)          [16 64]
	// rank 1 reads 363648 of 724096 bytes
}
