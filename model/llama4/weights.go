package llama4

import (
	"context"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/safetensors"
)

// CheckpointWeights loads whole tensors from a safetensors checkpoint into a backend: the Weights of a
// single rank. Names are looked up with cfg.Prefix, so multimodal checkpoints' "language_model." keys work.
type CheckpointWeights struct {
	ckpt   *safetensors.Checkpoint
	ops    backend.Ops
	prefix string
}

var _ Weights = (*CheckpointWeights)(nil)

// NewCheckpointWeights reads cfg's tensors from ckpt into ops.
func NewCheckpointWeights(ckpt *safetensors.Checkpoint, ops backend.Ops, cfg Config) *CheckpointWeights {
	return &CheckpointWeights{ckpt: ckpt, ops: ops, prefix: cfg.Prefix}
}

// Load reads name (without the prefix) whole.
func (w *CheckpointWeights) Load(ctx context.Context, name string) (backend.Tensor, Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, Replicated, err
	}
	full := w.prefix + name
	info, err := w.ckpt.Info(full)
	if err != nil {
		return nil, Replicated, err
	}
	data, err := w.ckpt.ReadAll(full)
	if err != nil {
		return nil, Replicated, err
	}
	t, err := w.ops.Load(info.DType, info.Shape, data)
	if err != nil {
		return nil, Replicated, fmt.Errorf("%s %s%v: %w", full, info.DType, info.Shape, err)
	}
	return t, Replicated, nil
}
