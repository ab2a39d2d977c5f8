package backend

import "fmt"

// SampleTolerance bounds how far a Sampler's choice may stray from the exact definition (see Sampler): the
// result must be the definition's for some draw U' and top-p P' with |U' − U| ≤ SampleTolerance and
// |P' − TopP| ≤ SampleTolerance. Float32 weights and another summation order move the cumulative
// probabilities by about 1e-6 at most, so the bound leaves a margin of ten.
const SampleTolerance = 1e-5

// SampleRow is how one row of logits is sampled: the settings of package sample's Params and the uniform
// draw that decides. The caller makes the draw (sample.Sampler.Uniform), so a seeded stream on the host
// reproduces a run whichever backend chooses.
type SampleRow struct {
	// Temperature divides the logits before the softmax; 0 means greedy (argmax). It must be >= 0.
	Temperature float64
	// TopK keeps the TopK largest logits; 0, or at least the row's length, keeps all. It must be >= 0.
	TopK int
	// TopP keeps the shortest prefix of the ordered candidates whose probability reaches TopP; 0 or 1
	// keeps all. It must be in [0, 1].
	TopP float64
	// U is the uniform draw in [0, 1) that picks the token. Greedy rows ignore it.
	U float64
}

// Validate reports a row no Sampler can honour.
func (r SampleRow) Validate() error {
	switch {
	case !(r.Temperature >= 0):
		return fmt.Errorf("backend: sample: temperature %g must be >= 0", r.Temperature)
	case r.TopK < 0:
		return fmt.Errorf("backend: sample: top-k %d must be >= 0", r.TopK)
	case !(r.TopP >= 0 && r.TopP <= 1):
		return fmt.Errorf("backend: sample: top-p %g must be in [0, 1]", r.TopP)
	case !(r.U >= 0 && r.U < 1):
		return fmt.Errorf("backend: sample: draw %g must be in [0, 1)", r.U)
	}
	return nil
}

// Greedy reports whether the row takes the argmax.
func (r SampleRow) Greedy() bool { return r.Temperature == 0 }

// Sampler is the optional capability of choosing tokens where the logits are, so that only the chosen ids
// reach the host (the GPU backend: one small download per step instead of the logits row). The model uses
// it when its backend implements it and otherwise reads the logits back and samples with package sample.
//
// Sample returns, for each row r of logits [N, V] (any dtype the backend stores), the id in [0, V) that
// rows[r] chooses; len(rows) must be N. The definition is package sample's Pick(row, params, U), which
// sample.Sampler.Next computes with its next draw:
//
//   - Greedy rows (Temperature 0), and every row when V is 1: the index of the largest logit, the lowest
//     index on ties (−0 equals +0). Exact.
//   - Otherwise the ids are ordered by logit, descending, ties by lower id first. When 0 < TopK < V only
//     the first TopK stay (TopK 1 is the argmax, exactly). Each kept id i has the weight
//     exp((x_i − x_max) / Temperature), x_max the row's largest logit, and the probability weight / sum of
//     the kept weights. When 0 < TopP < 1, only the shortest prefix of the kept ids (in that order) whose
//     cumulative probability reaches TopP stays, at least one id. With S the probability of what stays (1
//     without top-p), the result is the first id that stays whose cumulative probability exceeds U·S (the
//     last one if rounding leaves none).
//
// Host and device compute these sums differently (float64 in order on the host; float32 weights, summed
// in fixed point, on the cuda backend), so a cumulative probability within about 1e-6 of U·S or of TopP
// may be judged on the other side: a Sampler may return what the definition gives for a draw and a top-p
// within SampleTolerance of the row's. Ids whose probability is below about 1e-12 may never be chosen.
// Greedy and TopK 1 rows have no such slack. Rows holding NaN or +Inf, or only −Inf, give some id in
// [0, V), unspecified (package sample has no meaningful answer for them either). A row's id depends only
// on its logits and its SampleRow: the same call gives the same ids, whatever rows come with it.
//
// Logits that are not [N, V] with V >= 1 (a backend may also bound V), or a len(rows) other than N, give
// an error wrapping ErrShape; an invalid row (SampleRow.Validate) or a tensor of another backend give an
// error. A backend may refuse settings it cannot honour with an error wrapping errors.ErrUnsupported; the
// caller then samples on the host.
type Sampler interface {
	Sample(logits Tensor, rows []SampleRow) ([]int, error)
}

// CheckSample validates Sample's operands given the logits' shape and returns N and V.
func CheckSample(shape []int, rows []SampleRow) (n, v int, err error) {
	if len(shape) != 2 || shape[0] != len(rows) || shape[1] < 1 {
		return 0, 0, fmt.Errorf("backend: sample logits%v with %d rows: %w", shape, len(rows), ErrShape)
	}
	for i, r := range rows {
		if err := r.Validate(); err != nil {
			return 0, 0, fmt.Errorf("row %d: %w", i, err)
		}
	}
	return shape[0], shape[1], nil
}
