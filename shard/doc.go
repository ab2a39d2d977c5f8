// Package shard is tpfleet's tp_plan engine: it parses Hugging Face tensor-parallel plans, matches their
// patterns to checkpoint tensors, decides which part of each tensor every rank of a TP group holds, and
// loads exactly that part of a safetensors checkpoint for the Llama 4 model.
//
// It owns plans (Plan, Rule, Style), manifests (Manifest: what one rank reads, with byte counts) and one
// rank's weights (RankWeights, a llama4.Weights). It imports model/llama4 for the Config and Layout types,
// backend for Ops.Load and safetensors for range reads; it knows nothing of gRPC, etcd or NCCL, and the
// worker and coordinator use it, never the other way round.
//
// # Plans
//
// A plan is HF's JSON object from module pattern to style (spec §4), for example
//
//	{"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
//
// ParsePlan and LoadPlan read one; DefaultPlan and ExpertParallelPlan are the built-ins. See Plan for how
// patterns match tensor names.
//
// DefaultPlan is transformers 5.17's Llama 4 text plan (base_model_tp_plan, with lm_head
// colwise_gather_output) plus a vocab-parallel embedding (embed_tokens embedding_rowwise), which HF leaves
// whole. Per decoder layer the model then does one all-reduce after o_proj and one after the feed-forward
// (shared expert and routed experts reduced together); the embedding is all-reduced and the logits
// all-gathered. ExpertParallelPlan is HF's base_model_ep_plan with the same vocabulary rules: whole experts
// per rank, router and shared expert whole.
//
// # Styles
//
// What each style does to a weight of the Llama 4 model (nn.Linear weights are [out, in]; the routed
// experts' gate_up_proj is [E, H, 2I] and down_proj [E, I, H]):
//
//	colwise, colwise_gather_output, colwise_rep, local_colwise
//	    dim 0 of a 2-D weight (q/k/v by heads, gate/up by intermediate columns, lm_head by vocabulary),
//	    dim ndim-2 of a 3-D tensor (experts.down_proj → dim 1), dim 0 of a bias, dim 1 of an embedding
//	rowwise, rowwise_split_input, rowwise_rep, local_rowwise
//	    the last dim (o_proj by heads, down_proj by intermediate columns); a bias stays whole; an
//	    embedding splits dim 0
//	embedding_rowwise
//	    dim 0 (embedding vocabulary rows)
//	packed_rowwise, local_packed_rowwise
//	    the last dim, packed: rank r takes slice r of each half (gate_up_proj's gate and up columns)
//	packed_colwise
//	    dim ndim-2, packed
//	grouped_gemm
//	    dim 0: whole experts per rank
//	moe_tp_experts, local, gather, all_reduce, ep_router, replicate, sequence_parallel,
//	replicated_with_grad_allreduce
//	    no parameter split (module hooks and activation layouts)
//
// A split the model cannot run is an error (ErrUnsupported): the model takes q/k/v split only on dim 0,
// o_proj only on dim 1, the router and norms only whole, gate_up_proj only packed on dim 2 or by expert.
//
// # Key/value heads
//
// q/k/v/o splits cut whole heads. When num_key_value_heads is smaller than the TP size, the kv heads are
// replicated as vLLM does: tp must be a multiple of num_key_value_heads, and rank r reads kv head
// r / (tp / num_key_value_heads), the one its own q heads attend with. The model is told a head split
// (Layout{Dim: 0, Part: r, Parts: tp}) with one local kv head, which is exactly right for its local q heads.
//
// # Errors
//
// Every error wraps a sentinel (ErrPlan, ErrUnknownStyle, ErrNoMatch, ErrIndivisible, ErrUnsupported,
// ErrInconsistent, ErrRank), tested with errors.Is. NewManifest reports all the problems of a plan at once
// as Errors (one line, "; "-separated), each a *TensorError naming the tensor with its layer numbers as "*".
package shard
