package cpu

import (
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

// Concat joins tensors along their first dimension into new storage (a single tensor is returned as is).
func (b *Backend) Concat(ts ...backend.Tensor) (backend.Tensor, error) {
	if len(ts) == 0 {
		return nil, fmt.Errorf("cpu: concat of no tensors: %w", backend.ErrShape)
	}
	parts := make([]*tensor, len(ts))
	rows, total := 0, 0
	for i, t := range ts {
		tt, err := asTensor("concat", fmt.Sprintf("ts[%d]", i), t)
		if err != nil {
			return nil, err
		}
		if len(tt.shape) == 0 || (i > 0 && !slices.Equal(tt.shape[1:], parts[0].shape[1:])) {
			return nil, fmt.Errorf("cpu: concat %v after %v: %w", tt.shape, parts[0].shape, backend.ErrShape)
		}
		parts[i] = tt
		rows += tt.shape[0]
		total += len(tt.data)
	}
	if len(parts) == 1 {
		return parts[0], nil
	}
	data := make([]float32, 0, total)
	for _, p := range parts {
		data = append(data, p.data...)
	}
	shape := slices.Clone(parts[0].shape)
	shape[0] = rows
	return newTensor(shape, data), nil
}
