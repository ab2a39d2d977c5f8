package shard

import (
	"errors"
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

// Locator says where a tensor's bytes, or index ranges along dim of it (dim < 0: all of it), lie in the
// checkpoint's files. *safetensors.Checkpoint implements it, and so does a View for the tensors it
// stores as they are; a tensor a View assembles (stacked experts stored per expert) is an error wrapping
// ErrNotLocatable, and must be read with ReadSlice.
type Locator interface {
	Locate(name string, dim int, ranges ...safetensors.Range) (safetensors.Extent, error)
}

var (
	_ Locator = (*safetensors.Checkpoint)(nil)
	_ Locator = (*View)(nil)
)

// ErrNotLocatable means a tensor's bytes are not one run of file ranges in the result's order (a View
// assembles it), so a loader must read it through the Reader.
var ErrNotLocatable = errors.New("shard: tensor is assembled, not stored as read")

// Locate says where this rank's part of name (without the prefix) lies in the checkpoint's files, with
// the dtype and local shape of the result and the Layout the model is told. The reader must be a
// Locator; otherwise, and for tensors a View assembles, the error wraps ErrNotLocatable.
func (rr *RankReader) Locate(name string) (safetensors.Extent, model.Layout, error) {
	full := rr.m.Prefix + name
	s, ok := rr.m.Lookup(full)
	if !ok {
		return safetensors.Extent{}, model.Replicated, fmt.Errorf("shard: rank %d of %d: %q is not a text tensor of the checkpoint: %w",
			rr.m.Rank, rr.m.TP, full, safetensors.ErrNotFound)
	}
	l, ok := rr.r.(Locator)
	if !ok {
		return safetensors.Extent{}, model.Replicated, fmt.Errorf("%w: %s: the checkpoint's reader (%T) locates nothing", ErrNotLocatable, full, rr.r)
	}
	e, err := l.Locate(full, s.Dim, s.Ranges...)
	if err != nil {
		return safetensors.Extent{}, model.Replicated, fmt.Errorf("shard: rank %d of %d: locate %s: %w", rr.m.Rank, rr.m.TP, full, err)
	}
	if !slices.Equal(e.Shape, s.LocalShape) {
		return safetensors.Extent{}, model.Replicated, fmt.Errorf("shard: rank %d of %d: %s located as %v, want %v", rr.m.Rank, rr.m.TP, full, e.Shape, s.LocalShape)
	}
	return e, s.Layout, nil
}
