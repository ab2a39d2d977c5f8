package shard

import (
	"context"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Reader reads tensors of a checkpoint, whole or by index ranges along one dimension.
// *safetensors.Checkpoint implements it.
type Reader interface {
	ReadAll(name string) ([]byte, error)
	ReadSlice(name string, dim int, ranges ...safetensors.Range) ([]byte, []int, error)
}

var _ Reader = (*safetensors.Checkpoint)(nil)

// RankWeights is one rank's llama4.Weights: it reads exactly the part of each tensor its Manifest gives it
// (range reads; never a whole split tensor) and loads it into a backend. Load is safe for concurrent use
// when the backend's Load is.
type RankWeights struct {
	r   Reader
	ops backend.Ops
	m   Manifest
}

var _ llama4.Weights = (*RankWeights)(nil)

// NewRankWeights loads the tensors of m from r into ops. The reader must stay open while the model loads.
func NewRankWeights(r Reader, ops backend.Ops, m Manifest) *RankWeights {
	return &RankWeights{r: r, ops: ops, m: m}
}

// Manifest returns the manifest the weights follow.
func (w *RankWeights) Manifest() Manifest { return w.m }

// Load reads this rank's part of the tensor the model calls name (without the manifest's prefix), loads it
// into the backend and returns it with its Layout: {Dim, Rank, TP} for a split tensor, llama4.Replicated
// for a whole one. A name outside the manifest is an error wrapping safetensors.ErrNotFound.
func (w *RankWeights) Load(ctx context.Context, name string) (backend.Tensor, llama4.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, llama4.Replicated, err
	}
	full := w.m.Prefix + name
	s, ok := w.m.Lookup(full)
	if !ok {
		return nil, llama4.Replicated, fmt.Errorf("shard: rank %d of %d: %q is not a text tensor of the checkpoint: %w",
			w.m.Rank, w.m.TP, full, safetensors.ErrNotFound)
	}
	var data []byte
	var err error
	if s.Split() {
		var shape []int
		data, shape, err = w.r.ReadSlice(full, s.Dim, s.Ranges...)
		if err == nil && !slices.Equal(shape, s.LocalShape) {
			err = fmt.Errorf("read shape %v, want %v", shape, s.LocalShape)
		}
	} else {
		data, err = w.r.ReadAll(full)
	}
	if err != nil {
		return nil, llama4.Replicated, fmt.Errorf("shard: rank %d of %d: read %s: %w", w.m.Rank, w.m.TP, full, err)
	}
	t, err := w.ops.Load(s.DType, s.LocalShape, data)
	if err != nil {
		return nil, llama4.Replicated, fmt.Errorf("shard: rank %d of %d: load %s %s%v: %w", w.m.Rank, w.m.TP, full, s.DType, s.LocalShape, err)
	}
	return t, s.Layout, nil
}
