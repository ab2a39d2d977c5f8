package cpu

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/sample"
)

var _ backend.Sampler = (*Backend)(nil)

// Sample implements backend.Sampler with package sample's Pick, row by row (rows in parallel): the
// definition itself, in float64, with no slack.
func (b *Backend) Sample(logits backend.Tensor, rows []backend.SampleRow) ([]int, error) {
	lt, err := asTensor("sample", "logits", logits)
	if err != nil {
		return nil, err
	}
	n, v, err := backend.CheckSample(lt.shape, rows)
	if err != nil {
		return nil, fmt.Errorf("cpu: %w", err)
	}
	ids := make([]int, n)
	b.parallel(n, 1, func(lo, hi int) {
		for r := lo; r < hi; r++ {
			p := sample.Params{Temperature: rows[r].Temperature, TopK: rows[r].TopK, TopP: rows[r].TopP}
			ids[r] = sample.Pick(lt.data[r*v:(r+1)*v], p, rows[r].U)
		}
	})
	return ids, nil
}
