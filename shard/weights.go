package shard

import (
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Reader reads tensors of a checkpoint, whole or by index ranges along one dimension.
// *safetensors.Checkpoint implements it.
type Reader interface {
	ReadAll(name string) ([]byte, error)
	ReadSlice(name string, dim int, ranges ...safetensors.Range) ([]byte, []int, error)
}

var _ Reader = (*safetensors.Checkpoint)(nil)

// Read reads this rank's part of the tensor the model calls name (without the manifest's prefix) from r:
// range reads for a split tensor (never the whole of it), the whole tensor otherwise. It returns the
// tensor's entry, whose LocalShape, DType and Layout describe the bytes. A name outside the manifest is an
// error wrapping safetensors.ErrNotFound. Read is safe for concurrent use when r is.
func (m *Manifest) Read(r Reader, name string) (TensorShard, []byte, error) {
	full := m.Prefix + name
	s, ok := m.Lookup(full)
	if !ok {
		return s, nil, fmt.Errorf("shard: rank %d of %d: %q is not a text tensor of the checkpoint: %w",
			m.Rank, m.TP, full, safetensors.ErrNotFound)
	}
	var data []byte
	var err error
	if s.Split() {
		var shape []int
		data, shape, err = r.ReadSlice(full, s.Dim, s.Ranges...)
		if err == nil && !slices.Equal(shape, s.LocalShape) {
			err = fmt.Errorf("read shape %v, want %v", shape, s.LocalShape)
		}
	} else {
		data, err = r.ReadAll(full)
	}
	if err != nil {
		return s, nil, fmt.Errorf("shard: rank %d of %d: read %s: %w", m.Rank, m.TP, full, err)
	}
	return s, data, nil
}

// RankReader is one rank's view of a checkpoint: the slices its Manifest gives it, read from a Reader.
// It hands out bytes, never backend tensors; model/run's RankWeights loads them into a backend.
type RankReader struct {
	r Reader
	m Manifest
}

// NewRankReader reads m's slices from r. The reader must stay open while it is used.
func NewRankReader(r Reader, m Manifest) *RankReader { return &RankReader{r: r, m: m} }

// Manifest returns the manifest the reader follows.
func (rr *RankReader) Manifest() Manifest { return rr.m }

// ReadScales reads the float32 scales of this rank's part of a quantised tensor (see ScaleReader); the
// reader must be a ScaleReader (a View).
func (rr *RankReader) ReadScales(name string) ([]float32, []int, error) {
	sr, ok := rr.r.(ScaleReader)
	if !ok {
		return nil, nil, fmt.Errorf("shard: %s is quantised, but the checkpoint is not read through a View", name)
	}
	full := rr.m.Prefix + name
	s, ok := rr.m.Lookup(full)
	if !ok {
		return nil, nil, fmt.Errorf("shard: %q is not in the manifest: %w", full, safetensors.ErrNotFound)
	}
	return sr.ReadScales(full, s.Dim, s.Ranges...)
}

// ReadTensor reads this rank's part of name (see Manifest.Read) and returns its dtype, local shape, bytes
// and the Layout the model is told: {Dim, Rank, TP} for a split tensor, model.Replicated for a whole one.
func (rr *RankReader) ReadTensor(name string) (safetensors.DType, []int, []byte, model.Layout, error) {
	s, data, err := rr.m.Read(rr.r, name)
	if err != nil {
		return 0, nil, nil, model.Replicated, err
	}
	return s.DType, s.LocalShape, data, s.Layout, nil
}
