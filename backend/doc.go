// Package backend defines Ops, the operations Llama 4's forward pass is written over, and the Tensor,
// KVCache and Routing values they exchange. Implementations live in sub-packages: backend/cpu (pure Go,
// float32) and, later, backend/cuda. The package knows nothing of Llama: ops are named for the math they
// do (RMSNorm, RoPE, Attention, Experts), not for the layer that calls them. Sampler is an optional
// capability: choosing the next token where the logits are, with package sample's rule.
package backend
