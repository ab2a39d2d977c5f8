// Package llama4 is the Llama 4 text model (Scout, Maverick and any checkpoint of that architecture): its
// configuration, its tensors declared once as a tagged struct tree (tree.go: HF checkpoint names, shapes,
// tensor-parallel split units and consistency groups, and the built-in tp/ep plans), and its forward
// pass, written once over backend.Ops in the vocabulary of the paper (embed, norm, attention, moe,
// lm_head). The comments cite the sections of shared/reference/llama4-spec.md each step implements.
//
// Config implements model.Config (what the coordinator and shard see: Info, Tree, Validate) and
// run.Opener (how the worker gets a run.Model), and the package registers the family with package model
// under the architectures Llama4ForConditionalGeneration and Llama4ForCausalLM and the model types llama4
// and llama4_text; a binary imports it for that effect. Loading fills the tree with model.Load
// (reflection at load time only); the forward pass then runs on plain fields.
//
// The package knows nothing of gRPC, processes or devices: a rank's slice of the model and its
// communicator come in through run.Weights and run.Parallel.
package llama4
