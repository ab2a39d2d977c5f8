// Package shard is tpfleet's tp_plan engine: it parses Hugging Face tensor-parallel plans, matches their
// patterns to checkpoint tensors, decides which part of each tensor every rank of a TP group holds, and
// reads exactly that part of a safetensors checkpoint.
//
// It is model-neutral: it works from the tensor specs a model declares (model.Config: []model.TensorSpec
// with names, shapes, the dimensions the model can take a slice of and in units of what, and the groups
// whose splits must fit each other) and from the model's built-in plans (model.Info.Plans). It owns plans
// (Plan, Rule, Style), manifests (Manifest: what one rank reads, with byte counts) and one rank's reads
// (RankReader: bytes, shapes and model.Layouts). It imports model and safetensors only: no model family,
// no backend, no gRPC, etcd or NCCL; loading the bytes into a backend is model/run's RankWeights. The
// worker, the coordinator and the command line use it, never the other way round.
//
// # Plans
//
// A plan is HF's JSON object from module pattern to style (spec §4), for example
//
//	{"layers.*.attn.query": "colwise", "layers.*.attn.out": "rowwise"}
//
// ParsePlan and LoadPlan read one; DefaultPlan ("tp") and ExpertParallelPlan ("ep") are the model's
// built-ins. See Plan for how patterns match tensor names. Llama 4's built-ins, declared in model/llama4,
// are transformers 5.17's text plan plus a vocab-parallel embedding, and HF's expert-parallel plan with
// the same vocabulary rules.
//
// # Styles
//
// What each style does to a weight (nn.Linear weights are [out, in]; stacked experts are [E, in, out]):
//
//	colwise, colwise_gather_output, colwise_rep, local_colwise
//	    dim 0 of a 2-D weight (output features: heads, intermediate columns, vocabulary rows),
//	    dim ndim-2 of a 3-D tensor, dim 0 of a bias, dim 1 of an embedding
//	rowwise, rowwise_split_input, rowwise_rep, local_rowwise
//	    the last dim (input features); a bias stays whole; an embedding splits dim 0
//	embedding_rowwise
//	    dim 0 (embedding vocabulary rows)
//	packed_rowwise, local_packed_rowwise
//	    the last dim, packed: rank r takes slice r of each half (a fused gate and up projection)
//	packed_colwise
//	    dim ndim-2, packed
//	grouped_gemm
//	    dim 0: whole experts per rank
//	moe_tp_experts, local, gather, all_reduce, ep_router, replicate, sequence_parallel,
//	replicated_with_grad_allreduce
//	    no parameter split (module hooks and activation layouts)
//
// A split the model cannot run is an error (ErrUnsupported): a tensor is split only on a dimension its
// TensorSpec lists, packed exactly where the spec's dimension packs two halves.
//
// # Replicated units (key/value heads)
//
// Splits cut whole units. When a replicable unit (key/value heads) is fewer than the TP size, it is
// replicated as vLLM does: tp must be a multiple of the count, and rank r reads unit r / (tp / count),
// the one its own query heads attend with. The model is told a plain split (Layout{Dim: 0, Part: r,
// Parts: tp}) with one local unit, which is exactly right for its local query heads.
//
// # Quantised checkpoints
//
// A View (NewView) presents a checkpoint as the model declares it whatever its storage form: a
// compressed-tensors FP8 checkpoint (quantization_config, spec §3.4; package quant parses it) stores routed
// experts per expert as nn.Linear weights in F8_E4M3 with a scale tensor per output row; the View shows them
// stacked under their declared names with dtype F8_E4M3 and answers ReadScales for exactly the rows a rank
// reads, so every plan and split works unchanged. Manifests count stored bytes (F8_E4M3: a byte an element,
// scales aside). Formats chosen at load (--quantization fp8|int4) are not shard's business: the rank reads
// bf16 slices and model/run quantises them.
//
// # Errors
//
// Every error wraps a sentinel (ErrPlan, ErrUnknownStyle, ErrNoMatch, ErrIndivisible, ErrUnsupported,
// ErrInconsistent, ErrRank), tested with errors.Is. NewManifest reports all the problems of a plan at once
// as Errors (one line, "; "-separated), each a *TensorError naming the tensor with its layer numbers as "*".
package shard
