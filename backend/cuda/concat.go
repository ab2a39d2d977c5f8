package cuda

import (
	"errors"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// Concat joins tensors along their first dimension. For now only a single tensor (one sequence per
// forward pass) is supported; batches of several sequences need a device-to-device copy.
func (b *Backend) Concat(ts ...backend.Tensor) (backend.Tensor, error) {
	if len(ts) == 0 {
		return nil, fmt.Errorf("cuda: concat of no tensors: %w", backend.ErrShape)
	}
	if len(ts) > 1 {
		return nil, fmt.Errorf("cuda: concat of %d tensors: %w", len(ts), errors.ErrUnsupported)
	}
	if _, err := b.asTensor("concat", "ts[0]", ts[0]); err != nil {
		return nil, err
	}
	return ts[0], nil
}
