// Package refmath holds the plain float64 reference math that tests of several packages compare against
// (a model's logits against HF's on the CPU and on a GPU): written once, simply, and not used by the
// code under test.
package refmath

import "math"

// LogSoftmax returns the log-softmax of row in float64: row[i] − max − log Σ exp(row[j] − max).
func LogSoftmax(row []float32) []float64 {
	m := math.Inf(-1)
	for _, x := range row {
		m = max(m, float64(x))
	}
	s := 0.0
	for _, x := range row {
		s += math.Exp(float64(x) - m)
	}
	out := make([]float64, len(row))
	for i, x := range row {
		out[i] = float64(x) - m - math.Log(s)
	}
	return out
}
