package llama4

import "github.com/tpfleet/tpfleet/model"

var _ model.Memory = Config{}

// KVLayers is the cache of each layer (spec §2.3): NumKVHeads heads of HeadDim; chunked-attention layers
// (the RoPE layers) attend within their chunk of AttentionChunkSize tokens, global (NoPE) layers to every
// token.
func (c Config) KVLayers() []model.KVLayer {
	out := make([]model.KVLayer, c.NumLayers)
	for i := range out {
		out[i] = model.KVLayer{KVHeads: c.NumKVHeads, HeadDim: c.HeadDim}
		if i < len(c.Chunked) && c.Chunked[i] {
			out[i].Window = c.AttentionChunkSize
		}
	}
	return out
}

// StepBytes estimates the float32 activations of a step of tokens tokens on one rank of tp, at the widest
// point of a layer plus the logits, twice over for the temporaries the ops allocate beside their inputs:
// the residual stream and its norm, q/k/v of the rank's heads and the attention output, the widest
// feed-forward (routed experts' gate/up and the shared expert, or a dense MLP, of the rank's columns), the
// router's logits, and one row of logits (the rank's vocabulary slice) per token.
func (c Config) StepBytes(tokens, tp int) int64 {
	tp = max(tp, 1)
	t := int64(tokens)
	heads := int64(max(c.NumHeads/tp, 1))
	kv := int64(max(c.NumKVHeads/tp, 1))
	d := int64(c.HeadDim)
	ffn := int64(0)
	for i, moe := range c.MoE {
		w := int64(c.IntermediateSizeMLP)
		if moe {
			w = int64(c.TopK+1) * int64(c.IntermediateSize) // routed experts' and the shared expert's columns
		}
		if i == 0 || w > ffn {
			ffn = w
		}
	}
	ffn = 3 * ffn / int64(tp) // gate and up, then their product
	perToken := 2*int64(c.HiddenSize) + (2*heads+2*kv)*d + ffn + int64(c.NumExperts) + int64(c.VocabSize)/int64(tp)
	return 2 * 4 * t * perToken
}
