package vision

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// randomWeights makes each tensor of the tree from a generator seeded by seed and the tensor's name.
type randomWeights struct {
	ops    backend.Ops
	seed   uint64
	shapes map[string][]int
}

var _ model.Weights[backend.Tensor] = (*randomWeights)(nil)

func (w *randomWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	shape, ok := w.shapes[name]
	if !ok {
		return nil, model.Replicated, fmt.Errorf("random weights: no tensor %s in this configuration", name)
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
	last := shape[len(shape)-1]
	mean, std := 0.0, 1/math.Sqrt(float64(last))
	switch {
	case strings.HasSuffix(name, "embedding") || strings.HasSuffix(name, "embedding_vlm"):
		std = 1 / math.Sqrt(float64(last))
	case strings.HasSuffix(name, ".bias"):
		std = 0.02
	case len(shape) == 1: // norm weights
		mean, std = 1, 0.1
	}
	data := make([]byte, 2*n)
	for i := range n {
		v := safetensors.Float32ToBF16(float32(mean + std*rng.NormFloat64()))
		data[2*i], data[2*i+1] = byte(v), byte(v>>8)
	}
	t, err := w.ops.Load(safetensors.BF16, shape, data)
	return t, model.Replicated, err
}
