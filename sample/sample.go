// Package sample chooses the next token from a row of logits: greedy (argmax), or a draw after temperature,
// top-k and top-p filtering, in that order, as HF transformers' sampling applies them. Draws come from a
// seeded generator, so a seed reproduces a run.
package sample

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
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

// Greedy reports whether the sampler always takes the argmax.
func (s *Sampler) Greedy() bool { return s.p.Temperature == 0 }

// Next picks a token id from logits.
func (s *Sampler) Next(logits []float32) int {
	if s.Greedy() || len(logits) == 1 {
		return Argmax(logits)
	}
	// Candidates sorted by logit, descending; ties keep the lower id first.
	s.idx = s.idx[:0]
	for i := range logits {
		s.idx = append(s.idx, i)
	}
	idx := s.idx
	sort.SliceStable(idx, func(a, b int) bool { return logits[idx[a]] > logits[idx[b]] })
	if s.p.TopK > 0 && s.p.TopK < len(idx) {
		idx = idx[:s.p.TopK]
	}
	// Softmax of logits / temperature over the candidates, in float64.
	probs := make([]float64, len(idx))
	maxL := float64(logits[idx[0]]) / s.p.Temperature
	sum := 0.0
	for i, id := range idx {
		probs[i] = math.Exp(float64(logits[id])/s.p.Temperature - maxL)
		sum += probs[i]
	}
	for i := range probs {
		probs[i] /= sum
	}
	if s.p.TopP > 0 && s.p.TopP < 1 { // keep the smallest prefix whose mass reaches top-p (at least one)
		cum := 0.0
		for i, p := range probs {
			cum += p
			if cum >= s.p.TopP {
				idx, probs = idx[:i+1], probs[:i+1]
				break
			}
		}
		sum = cum
	} else {
		sum = 1
	}
	r := s.rng.Float64() * sum
	for i, p := range probs {
		r -= p
		if r < 0 {
			return idx[i]
		}
	}
	return idx[len(idx)-1]
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
