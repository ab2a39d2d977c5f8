package llama4

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// TensorSpec is one tensor of the text model; see model.TensorSpec.
type TensorSpec = model.TensorSpec

// Tensors lists the text model's tensors and shapes for this configuration (spec §3.1), as the tensor tree
// declares them (tree.go).
func (c Config) Tensors() []TensorSpec { return model.Tensors(c) }

// RandomScale is the mean and standard deviation RandomWeights draws a tensor's values from: norm weights
// near 1, matrices ~ N(0, 1/fan_in) (stacked experts are used as x·W: their fan-in is dim 1), embeddings
// ~ N(0, 1), so activations stay in range.
func RandomScale(s TensorSpec) (mean, std float64) {
	shape := s.Shape
	mean, std = 0.0, 1/math.Sqrt(float64(shape[len(shape)-1]))
	switch {
	case len(shape) == 1: // norm weights
		mean, std = 1, 0.1
	case len(shape) == 3: // experts are used as x·W: the fan-in is dim 1
		std = 1 / math.Sqrt(float64(shape[1]))
	case s.Kind == model.KindEmbedding:
		std = 1
	}
	return mean, std
}

// RandomWeights makes every tensor of a configuration from a seeded generator, in bf16, scaled like the
// fixtures (norm weights near 1, matrices ~ N(0, 1/fan_in)) so activations stay in range. It is for
// benchmarks and tests that need a model of a given shape without a checkpoint on disk.
type RandomWeights struct {
	ops   backend.Ops
	specs map[string]TensorSpec
	seed  uint64
}

var _ Weights = (*RandomWeights)(nil)

// NewRandomWeights prepares random weights for cfg on ops.
func NewRandomWeights(cfg Config, ops backend.Ops, seed uint64) *RandomWeights {
	w := &RandomWeights{ops: ops, specs: map[string]TensorSpec{}, seed: seed}
	for _, s := range cfg.Tensors() {
		w.specs[s.Name] = s
	}
	return w
}

// Load makes name's tensor; the same seed and name always give the same values.
func (w *RandomWeights) Load(ctx context.Context, name string) (backend.Tensor, Layout, error) {
	spec, ok := w.specs[name]
	shape := spec.Shape
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
	mean, std := RandomScale(spec)
	data := make([]byte, 2*n)
	for i := 0; i < n; i++ {
		v := safetensors.Float32ToBF16(float32(mean + std*rng.NormFloat64()))
		data[2*i], data[2*i+1] = byte(v), byte(v>>8)
	}
	t, err := w.ops.Load(safetensors.BF16, shape, data)
	return t, Replicated, err
}
