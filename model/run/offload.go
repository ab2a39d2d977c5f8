package run

import (
	"context"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
)

// ExpertsOffloader is a backend that can keep a routed-experts weight in host memory and copy only the
// experts a step chooses to the device (the cuda backend: --offload-experts).
type ExpertsOffloader interface {
	OffloadExperts(t backend.Tensor) (backend.Tensor, error)
}

// OffloadWeights is Weights that moves every routed-experts tensor (model.KindExperts) it loads to host
// memory through the backend, right after loading it: the device holds one such tensor at a time while
// the model loads.
type OffloadWeights struct {
	Weights
	off   ExpertsOffloader
	specs map[string]model.TensorSpec
	// Offloaded counts the tensors moved so far.
	Offloaded int
}

// NewOffloadWeights wraps w, whose tensors load into ops, for cfg's model. It fails when ops cannot
// offload experts.
func NewOffloadWeights(w Weights, cfg model.Config, ops backend.Ops) (*OffloadWeights, error) {
	off, ok := ops.(ExpertsOffloader)
	if !ok {
		return nil, fmt.Errorf("--offload-experts: the %s backend cannot keep experts in host memory (cuda can)", ops.Name())
	}
	o := &OffloadWeights{Weights: w, off: off, specs: map[string]model.TensorSpec{}}
	for _, s := range model.Tensors(cfg) {
		o.specs[s.Name] = s
	}
	return o, nil
}

// Load loads name through the wrapped Weights and offloads it when it is routed experts.
func (o *OffloadWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	t, lay, err := o.Weights.Load(ctx, name)
	if err != nil || o.specs[name].Kind != model.KindExperts {
		return t, lay, err
	}
	h, err := o.off.OffloadExperts(t)
	if err != nil {
		return nil, lay, fmt.Errorf("offload %s: %w", name, err)
	}
	o.Offloaded++
	return h, lay, nil
}
