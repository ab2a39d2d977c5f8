// Package sample chooses the next token from a row of logits: greedy (argmax), or a draw after temperature,
// top-k and top-p filtering, in that order, as HF transformers' sampling applies them. Draws come from a
// seeded generator, so a seed reproduces a run.
//
// The choice itself is [Pick], a pure function of the logits, the [Params] and one uniform draw u; a
// [Sampler] is Pick fed by a seeded stream of draws. Splitting the two lets the draw be made here and the
// choice elsewhere (backend.Sampler, on the GPU) with the same result: Pick(row, s.Params(),
// s.Uniform(len(row))) is what s.Next(row) returns for the same stream.
package sample

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// Params are the sampling settings. Temperature 0 means greedy; TopK 0 and TopP 1 (or 0) disable those filters.
type Params struct {
	Temperature float64
	TopK        int
	TopP        float64
	Seed        uint64
}

// Validate reports settings no sampler can honour.
func (p Params) Validate() error {
	switch {
	case p.Temperature < 0 || math.IsNaN(p.Temperature):
		return fmt.Errorf("sample: temperature %g must be >= 0", p.Temperature)
	case p.TopK < 0:
		return fmt.Errorf("sample: top-k %d must be >= 0", p.TopK)
	case p.TopP < 0 || p.TopP > 1 || math.IsNaN(p.TopP):
		return fmt.Errorf("sample: top-p %g must be in [0, 1]", p.TopP)
	}
	return nil
}

// Greedy reports whether p always takes the argmax (Temperature 0).
func (p Params) Greedy() bool { return p.Temperature == 0 }

// Sampler draws tokens with fixed Params. It is not safe for concurrent use.
type Sampler struct {
	p   Params
	rng *rand.Rand
	idx []int // scratch
}

// New returns a Sampler; p must be valid.
func New(p Params) *Sampler {
	return &Sampler{p: p, rng: rand.New(rand.NewPCG(p.Seed, p.Seed^0x9e3779b97f4a7c15))}
}

// Params returns the sampler's settings.
func (s *Sampler) Params() Params { return s.p }

// Greedy reports whether the sampler always takes the argmax.
func (s *Sampler) Greedy() bool { return s.p.Greedy() }

// Uniform returns the draw in [0, 1) that Next would use to choose from a row of n logits, and advances
// the stream exactly as that Next call would: Next draws once per call, except when the sampler is greedy
// or n is 1 (the choice is then certain), where Uniform returns 0 and draws nothing. So for samplers a
// and b made from the same Params, a.Next(row) == Pick(row, b.Params(), b.Uniform(len(row))) at every step.
func (s *Sampler) Uniform(n int) float64 {
	if s.Greedy() || n <= 1 {
		return 0
	}
	return s.rng.Float64()
}

// Skip advances the stream past steps calls of Next on rows of n logits, as if they had been made: a
// sampler made from the same Params and skipped past the tokens a request already chose continues that
// request's draws exactly (how a resumed sequence keeps its output reproducible under a fixed seed).
func (s *Sampler) Skip(steps, n int) {
	for range steps {
		s.Uniform(n)
	}
}

// Next picks a token id from logits, drawing from the sampler's stream (see Uniform).
func (s *Sampler) Next(logits []float32) int {
	u := s.Uniform(len(logits))
	var id int
	id, s.idx = pick(logits, s.p, u, s.idx)
	return id
}

// Pick chooses a token id from logits with p's temperature, top-k and top-p (p.Seed is not used) and the
// uniform draw u in [0, 1). The algorithm, which backend.Sampler implementations reproduce:
//
//   - Temperature 0, or a single logit: the argmax ([Argmax]: the first index on ties).
//   - Otherwise the ids are ordered by logit, descending, ties by lower id first. When 0 < TopK < len(logits)
//     only the first TopK stay. Each kept id i gets probability exp(x_i/T − x_max/T) / Σ over the kept ids
//     (float64). When 0 < TopP < 1, only the shortest prefix (in that order) whose cumulative probability
//     reaches TopP stays: at least one id. With S the probability mass kept (1 without top-p), the result
//     is the first kept id whose cumulative probability exceeds u·S, or the last kept id if rounding
//     leaves none.
//
// Rows holding NaN or +Inf, or only -Inf, give no meaningful choice (some id in range).
func Pick(logits []float32, p Params, u float64) int {
	id, _ := pick(logits, p, u, nil)
	return id
}

// pick is Pick with a reusable scratch slice for the candidate ids; it returns the slice for reuse.
func pick(logits []float32, p Params, u float64, scratch []int) (int, []int) {
	if p.Greedy() || len(logits) <= 1 {
		return Argmax(logits), scratch
	}
	// Candidates sorted by logit, descending; ties keep the lower id first.
	order := func(a, b int) int {
		if c := cmp.Compare(logits[b], logits[a]); c != 0 {
			return c
		}
		return a - b
	}
	var idx []int
	if p.TopK > 0 && p.TopK < len(logits)/8 {
		idx = topK(logits, p.TopK, order, scratch[:0])
	} else {
		idx = scratch[:0]
		for i := range logits {
			idx = append(idx, i)
		}
		slices.SortFunc(idx, order)
		if p.TopK > 0 && p.TopK < len(idx) {
			idx = idx[:p.TopK]
		}
	}
	scratch = idx
	// Softmax of logits / temperature over the candidates, in float64.
	probs := make([]float64, len(idx))
	maxL := float64(logits[idx[0]]) / p.Temperature
	sum := 0.0
	for i, id := range idx {
		probs[i] = math.Exp(float64(logits[id])/p.Temperature - maxL)
		sum += probs[i]
	}
	for i := range probs {
		probs[i] /= sum
	}
	if p.TopP > 0 && p.TopP < 1 { // keep the smallest prefix whose mass reaches top-p (at least one)
		cum := 0.0
		for i, q := range probs {
			cum += q
			if cum >= p.TopP {
				idx, probs = idx[:i+1], probs[:i+1]
				break
			}
		}
		sum = cum
	} else {
		sum = 1
	}
	r := u * sum
	for i, q := range probs {
		r -= q
		if r < 0 {
			return idx[i], scratch
		}
	}
	return idx[len(idx)-1], scratch
}

// topK returns the k (< len(logits)) first ids in order, sorted: a heap of the best k seen, whose root is
// the worst of them, then a sort of those k.
func topK(logits []float32, k int, order func(a, b int) int, h []int) []int {
	worse := func(a, b int) bool { return order(h[a], h[b]) > 0 } // h[a] comes after h[b]
	down := func(j int) {
		for {
			w, l, r := j, 2*j+1, 2*j+2
			if l < len(h) && worse(l, w) {
				w = l
			}
			if r < len(h) && worse(r, w) {
				w = r
			}
			if w == j {
				return
			}
			h[j], h[w] = h[w], h[j]
			j = w
		}
	}
	for i := range logits {
		switch {
		case len(h) < k:
			h = append(h, i)
			for j := len(h) - 1; j > 0 && worse(j, (j-1)/2); j = (j - 1) / 2 {
				h[j], h[(j-1)/2] = h[(j-1)/2], h[j]
			}
		case order(i, h[0]) < 0:
			h[0] = i
			down(0)
		}
	}
	slices.SortFunc(h, order)
	return h
}

// Argmax returns the index of the largest value, the first one on ties (as torch.argmax does).
func Argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}
