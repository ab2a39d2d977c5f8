package llama4

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/safetensors"
)

// TensorSpec is one tensor of the text model: its name without Prefix and its full shape.
type TensorSpec struct {
	Name  string
	Shape []int
}

// Tensors lists the text model's tensors and shapes for this configuration (spec §3.1).
func (c Config) Tensors() []TensorSpec {
	h, d := c.HiddenSize, c.HeadDim
	specs := []TensorSpec{{"model.embed_tokens.weight", []int{c.VocabSize, h}}, {"model.norm.weight", []int{h}}}
	if !c.TieWordEmbeddings {
		specs = append(specs, TensorSpec{"lm_head.weight", []int{c.VocabSize, h}})
	}
	for i := 0; i < c.NumLayers; i++ {
		p := fmt.Sprintf("model.layers.%d.", i)
		specs = append(specs,
			TensorSpec{p + "input_layernorm.weight", []int{h}},
			TensorSpec{p + "post_attention_layernorm.weight", []int{h}},
			TensorSpec{p + "self_attn.q_proj.weight", []int{c.NumHeads * d, h}},
			TensorSpec{p + "self_attn.k_proj.weight", []int{c.NumKVHeads * d, h}},
			TensorSpec{p + "self_attn.v_proj.weight", []int{c.NumKVHeads * d, h}},
			TensorSpec{p + "self_attn.o_proj.weight", []int{h, c.NumHeads * d}},
		)
		if c.MoE[i] {
			f, e := p+"feed_forward.", c.IntermediateSize
			specs = append(specs,
				TensorSpec{f + "router.weight", []int{c.NumExperts, h}},
				TensorSpec{f + "experts.gate_up_proj", []int{c.NumExperts, h, 2 * e}},
				TensorSpec{f + "experts.down_proj", []int{c.NumExperts, e, h}},
				TensorSpec{f + "shared_expert.gate_proj.weight", []int{e, h}},
				TensorSpec{f + "shared_expert.up_proj.weight", []int{e, h}},
				TensorSpec{f + "shared_expert.down_proj.weight", []int{h, e}},
			)
		} else {
			f, e := p+"feed_forward.", c.IntermediateSizeMLP
			specs = append(specs,
				TensorSpec{f + "gate_proj.weight", []int{e, h}},
				TensorSpec{f + "up_proj.weight", []int{e, h}},
				TensorSpec{f + "down_proj.weight", []int{h, e}},
			)
		}
	}
	return specs
}

// RandomWeights makes every tensor of a configuration from a seeded generator, in bf16, scaled like the
// fixtures (norm weights near 1, matrices ~ N(0, 1/fan_in)) so activations stay in range. It is for
// benchmarks and tests that need a model of a given shape without a checkpoint on disk.
type RandomWeights struct {
	ops    backend.Ops
	shapes map[string][]int
	seed   uint64
}

var _ Weights = (*RandomWeights)(nil)

// NewRandomWeights prepares random weights for cfg on ops.
func NewRandomWeights(cfg Config, ops backend.Ops, seed uint64) *RandomWeights {
	w := &RandomWeights{ops: ops, shapes: map[string][]int{}, seed: seed}
	for _, s := range cfg.Tensors() {
		w.shapes[s.Name] = s.Shape
	}
	return w
}

// Load makes name's tensor; the same seed and name always give the same values.
func (w *RandomWeights) Load(ctx context.Context, name string) (backend.Tensor, Layout, error) {
	shape, ok := w.shapes[name]
	if !ok {
		return nil, Replicated, fmt.Errorf("random weights: no tensor %s in this configuration", name)
	}
	n := 1
	for _, d := range shape {
		n *= d
	}
	var h uint64 = 14695981039346656037 // FNV-1a of the name, so tensors differ
	for i := 0; i < len(name); i++ {
		h = (h ^ uint64(name[i])) * 1099511628211
	}
	rng := rand.New(rand.NewPCG(w.seed, h))
	mean, std := 0.0, 1/math.Sqrt(float64(shape[len(shape)-1]))
	switch {
	case len(shape) == 1: // norm weights
		mean, std = 1, 0.1
	case len(shape) == 3: // experts are used as x·W: the fan-in is dim 1
		std = 1 / math.Sqrt(float64(shape[1]))
	case name == "model.embed_tokens.weight":
		std = 1
	}
	data := make([]byte, 2*n)
	for i := 0; i < n; i++ {
		v := safetensors.Float32ToBF16(float32(mean + std*rng.NormFloat64()))
		data[2*i], data[2*i+1] = byte(v), byte(v>>8)
	}
	t, err := w.ops.Load(safetensors.BF16, shape, data)
	return t, Replicated, err
}
