package sample_test

import (
	"math"
	"testing"

	"github.com/tpfleet/tpfleet/sample"
)

func TestArgmax(t *testing.T) {
	for _, tc := range []struct {
		v    []float32
		want int
	}{
		{[]float32{1}, 0},
		{[]float32{1, 3, 2}, 1},
		{[]float32{5, 5, 1}, 0}, // first of ties, as torch.argmax
		{[]float32{-3, -1, -2}, 1},
	} {
		if got := sample.Argmax(tc.v); got != tc.want {
			t.Errorf("Argmax(%v) = %d, want %d", tc.v, got, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		p  sample.Params
		ok bool
	}{
		{sample.Params{}, true},
		{sample.Params{Temperature: 0.7, TopK: 40, TopP: 0.9}, true},
		{sample.Params{Temperature: -1}, false},
		{sample.Params{Temperature: math.NaN()}, false},
		{sample.Params{TopK: -2}, false},
		{sample.Params{TopP: 1.5}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok %v", tc.p, err, tc.ok)
		}
	}
}

// frequencies draws n tokens and returns how often each id came up.
func frequencies(p sample.Params, logits []float32, n int) []float64 {
	s := sample.New(p)
	f := make([]float64, len(logits))
	for i := 0; i < n; i++ {
		f[s.Next(logits)]++
	}
	for i := range f {
		f[i] /= float64(n)
	}
	return f
}

func TestSamplingDistribution(t *testing.T) {
	logits := []float32{2, 1, 0, -1, 3}
	softmax := func(temp float64, keep []int) []float64 {
		out := make([]float64, len(logits))
		sum := 0.0
		for _, i := range keep {
			out[i] = math.Exp(float64(logits[i]) / temp)
			sum += out[i]
		}
		for i := range out {
			out[i] /= sum
		}
		return out
	}
	for _, tc := range []struct {
		name string
		p    sample.Params
		want []float64
	}{
		{"temperature 1", sample.Params{Temperature: 1, Seed: 1}, softmax(1, []int{0, 1, 2, 3, 4})},
		{"temperature 0.5", sample.Params{Temperature: 0.5, Seed: 2}, softmax(0.5, []int{0, 1, 2, 3, 4})},
		{"top-k 2", sample.Params{Temperature: 1, TopK: 2, Seed: 3}, softmax(1, []int{4, 0})},
		// softmax(1) = .23 .09 .03 .01 .63: the top two (.63 + .23) first reach 0.8.
		{"top-p 0.8", sample.Params{Temperature: 1, TopP: 0.8, Seed: 4}, softmax(1, []int{4, 0})},
	} {
		got := frequencies(tc.p, logits, 40000)
		for i := range got {
			if math.Abs(got[i]-tc.want[i]) > 0.01 {
				t.Errorf("%s: frequency of %d = %.3f, want %.3f", tc.name, i, got[i], tc.want[i])
			}
		}
	}
}

func TestGreedyAndSeeds(t *testing.T) {
	logits := []float32{0.1, 0.3, 0.2}
	if s := sample.New(sample.Params{}); !s.Greedy() || s.Next(logits) != 1 {
		t.Errorf("temperature 0 is not greedy")
	}
	a, b := sample.New(sample.Params{Temperature: 1, Seed: 9}), sample.New(sample.Params{Temperature: 1, Seed: 9})
	for i := 0; i < 100; i++ {
		if x, y := a.Next(logits), b.Next(logits); x != y {
			t.Fatalf("draw %d: same seed gave %d and %d", i, x, y)
		}
	}
}
