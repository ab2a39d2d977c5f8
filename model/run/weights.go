package run

import (
	"context"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Slices reads one rank's part of each tensor of a checkpoint: its bytes, dtype and local shape, and the
// Layout the model is told. *shard.RankReader implements it.
type Slices interface {
	ReadTensor(name string) (safetensors.DType, []int, []byte, model.Layout, error)
}

// RankWeights is one rank's Weights: it reads exactly the part of each tensor a shard manifest gives the
// rank (range reads; never a whole split tensor) and loads it into a backend. Load is safe for concurrent
// use when the slices' reader and the backend's Load are.
type RankWeights struct {
	s   Slices
	ops backend.Ops
}

var _ Weights = (*RankWeights)(nil)

// NewRankWeights loads the tensors s reads into ops.
func NewRankWeights(s Slices, ops backend.Ops) *RankWeights {
	return &RankWeights{s: s, ops: ops}
}

// Load reads this rank's part of the tensor the model calls name, loads it into the backend and returns it
// with its Layout. Errors wrap the reader's (safetensors.ErrNotFound for a name outside the manifest).
func (w *RankWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	dt, shape, data, lay, err := w.s.ReadTensor(name)
	if err != nil {
		return nil, model.Replicated, err
	}
	t, err := w.ops.Load(dt, shape, data)
	if err != nil {
		return nil, model.Replicated, fmt.Errorf("load %s %s%v: %w", name, dt, shape, err)
	}
	return t, lay, nil
}

// CheckpointWeights loads whole tensors from a safetensors checkpoint into a backend: the Weights of a
// single rank. Names are looked up with the configuration's key prefix.
type CheckpointWeights struct {
	ckpt   *safetensors.Checkpoint
	ops    backend.Ops
	prefix string
}

var _ Weights = (*CheckpointWeights)(nil)

// NewCheckpointWeights reads cfg's tensors from ckpt into ops.
func NewCheckpointWeights(ckpt *safetensors.Checkpoint, ops backend.Ops, cfg model.Config) *CheckpointWeights {
	return &CheckpointWeights{ckpt: ckpt, ops: ops, prefix: cfg.Info().Prefix}
}

// Load reads name (without the prefix) whole.
func (w *CheckpointWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	full := w.prefix + name
	info, err := w.ckpt.Info(full)
	if err != nil {
		return nil, model.Replicated, err
	}
	data, err := w.ckpt.ReadAll(full)
	if err != nil {
		return nil, model.Replicated, err
	}
	t, err := w.ops.Load(info.DType, info.Shape, data)
	if err != nil {
		return nil, model.Replicated, fmt.Errorf("%s %s%v: %w", full, info.DType, info.Shape, err)
	}
	return t, model.Replicated, nil
}
