package shard

import (
	"strings"

	"github.com/tpfleet/tpfleet/model/llama4"
)

// role is what a tensor is to the Llama 4 model (spec §3.1), which decides the splits it can take.
type role int

const (
	roleOther role = iota // not a tensor the model reads by this name: split as the style says
	roleEmbed
	roleLMHead
	roleNorm
	roleQ
	roleK
	roleV
	roleO
	roleRouter
	roleMLPGate
	roleMLPUp
	roleMLPDown
	roleSharedGate
	roleSharedUp
	roleSharedDown
	roleExpertsGateUp
	roleExpertsDown
)

var roleNames = map[role]string{
	roleOther: "tensor", roleEmbed: "embed_tokens", roleLMHead: "lm_head", roleNorm: "a norm weight",
	roleQ: "q_proj", roleK: "k_proj", roleV: "v_proj", roleO: "o_proj", roleRouter: "the router",
	roleMLPGate: "gate_proj", roleMLPUp: "up_proj", roleMLPDown: "down_proj",
	roleSharedGate: "shared_expert.gate_proj", roleSharedUp: "shared_expert.up_proj",
	roleSharedDown:    "shared_expert.down_proj",
	roleExpertsGateUp: "experts.gate_up_proj", roleExpertsDown: "experts.down_proj",
}

func (r role) String() string { return roleNames[r] }

// module is the part of a layer the tensor belongs to, for the consistency checks; "" for none.
func (r role) module() string {
	switch r {
	case roleQ, roleK, roleV, roleO:
		return "self_attn"
	case roleMLPGate, roleMLPUp, roleMLPDown:
		return "feed_forward"
	case roleSharedGate, roleSharedUp, roleSharedDown:
		return "feed_forward.shared_expert"
	case roleExpertsGateUp, roleExpertsDown:
		return "feed_forward.experts"
	}
	return ""
}

// classify gives the role of a text tensor from its name relative to the base model ("layers.0.self_attn.
// q_proj.weight", "lm_head.weight").
func classify(rel []string) role {
	switch strings.Join(rel, ".") {
	case "embed_tokens.weight":
		return roleEmbed
	case "lm_head.weight":
		return roleLMHead
	case "norm.weight":
		return roleNorm
	}
	if len(rel) < 4 || rel[0] != "layers" || !isDigits(rel[1]) {
		return roleOther
	}
	switch strings.Join(rel[2:], ".") {
	case "input_layernorm.weight", "post_attention_layernorm.weight":
		return roleNorm
	case "self_attn.q_proj.weight":
		return roleQ
	case "self_attn.k_proj.weight":
		return roleK
	case "self_attn.v_proj.weight":
		return roleV
	case "self_attn.o_proj.weight":
		return roleO
	case "feed_forward.router.weight":
		return roleRouter
	case "feed_forward.gate_proj.weight":
		return roleMLPGate
	case "feed_forward.up_proj.weight":
		return roleMLPUp
	case "feed_forward.down_proj.weight":
		return roleMLPDown
	case "feed_forward.shared_expert.gate_proj.weight":
		return roleSharedGate
	case "feed_forward.shared_expert.up_proj.weight":
		return roleSharedUp
	case "feed_forward.shared_expert.down_proj.weight":
		return roleSharedDown
	case "feed_forward.experts.gate_up_proj":
		return roleExpertsGateUp
	case "feed_forward.experts.down_proj":
		return roleExpertsDown
	}
	return roleOther
}

// units is what a split dimension is made of: count units of size elements (count per half when packed).
type units struct {
	count, size int
	what        string
	packed      bool
}

// policy is how the model can take a tensor: whole, or split on one of dims (llama4.Load's rules).
type policy struct {
	takes string
	dims  map[int]units
}

func policies(cfg llama4.Config) map[role]policy {
	heads := units{count: cfg.NumHeads, size: cfg.HeadDim, what: "attention heads (num_attention_heads)"}
	kv := units{count: cfg.NumKVHeads, size: cfg.HeadDim, what: "key/value heads (num_key_value_heads)"}
	vocab := units{count: cfg.VocabSize, size: 1, what: "vocabulary rows (vocab_size)"}
	dense := units{count: cfg.IntermediateSizeMLP, size: 1, what: "intermediate columns (intermediate_size_mlp)"}
	inter := units{count: cfg.IntermediateSize, size: 1, what: "intermediate columns (intermediate_size)"}
	experts := units{count: cfg.NumExperts, size: 1, what: "experts (num_local_experts)"}
	packed := inter
	packed.what = "expert intermediate columns per half (intermediate_size)"
	packed.packed = true

	const (
		colwise = "whole, or split on dim 0 (colwise)"
		rowwise = "whole, or split on dim 1 (rowwise)"
		whole   = "only whole: every rank needs all of it"
	)
	return map[role]policy{
		roleEmbed:         {"whole, or split by vocabulary rows on dim 0 (embedding_rowwise)", map[int]units{0: vocab}},
		roleLMHead:        {"whole, or split by vocabulary rows on dim 0 (colwise_gather_output)", map[int]units{0: vocab}},
		roleNorm:          {whole, nil},
		roleRouter:        {whole + " to route every token", nil},
		roleQ:             {"whole, or split by heads on dim 0 (colwise)", map[int]units{0: heads}},
		roleK:             {"whole, or split by heads on dim 0 (colwise)", map[int]units{0: kv}},
		roleV:             {"whole, or split by heads on dim 0 (colwise)", map[int]units{0: kv}},
		roleO:             {"whole, or split by heads on dim 1 (rowwise)", map[int]units{1: heads}},
		roleMLPGate:       {colwise, map[int]units{0: dense}},
		roleMLPUp:         {colwise, map[int]units{0: dense}},
		roleMLPDown:       {rowwise, map[int]units{1: dense}},
		roleSharedGate:    {colwise, map[int]units{0: inter}},
		roleSharedUp:      {colwise, map[int]units{0: inter}},
		roleSharedDown:    {rowwise, map[int]units{1: inter}},
		roleExpertsGateUp: {"whole, packed on dim 2 (packed_rowwise), or by expert on dim 0 (grouped_gemm)", map[int]units{0: experts, 2: packed}},
		roleExpertsDown:   {"whole, on dim 1 (colwise), or by expert on dim 0 (grouped_gemm)", map[int]units{0: experts, 1: inter}},
	}
}
