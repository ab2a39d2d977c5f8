package sample_test

import (
	"math"
	"math/rand/v2"
	"reflect"
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

// TestPickEqualsNext: Pick fed with Uniform's draws makes the choices Next makes from the same seed, for
// greedy and sampled settings, single-logit rows included (which draw nothing).
func TestPickEqualsNext(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	rows := [][]float32{{0.5}, {1, 3, 3, 2}, make([]float32, 300)}
	for i := range rows[2] {
		rows[2][i] = float32(r.NormFloat64() * 2)
	}
	for _, p := range []sample.Params{
		{},
		{Temperature: 1, Seed: 3},
		{Temperature: 0.7, TopK: 50, TopP: 0.9, Seed: 4},
		{Temperature: 1.3, TopP: 0.5, Seed: 5},
		{Temperature: 0.5, TopK: 1, Seed: 6},
	} {
		a, b := sample.New(p), sample.New(p)
		if !reflect.DeepEqual(b.Params(), p) {
			t.Errorf("Params() = %+v, want %+v", b.Params(), p)
		}
		for step := range 300 {
			row := rows[step%len(rows)]
			if got, want := sample.Pick(row, b.Params(), b.Uniform(len(row))), a.Next(row); got != want {
				t.Fatalf("%+v step %d: Pick(Uniform) = %d, Next = %d", p, step, got, want)
			}
		}
	}
	if u := sample.New(sample.Params{}).Uniform(10); u != 0 {
		t.Errorf("greedy Uniform = %v, want 0", u)
	}
}

// TestSkip: a sampler skipped past k draws continues exactly as one that made them (a resumed
// sequence), for every k.
func TestSkip(t *testing.T) {
	logits := []float32{0.1, 0.3, 0.2, 0.25}
	p := sample.Params{Temperature: 1, Seed: 11}
	var want []int
	a := sample.New(p)
	for range 40 {
		want = append(want, a.Next(logits))
	}
	for _, k := range []int{0, 1, 7, 39} {
		b := sample.New(p)
		b.Skip(k, len(logits))
		for i := k; i < len(want); i++ {
			if got := b.Next(logits); got != want[i] {
				t.Fatalf("Skip(%d) then Next at draw %d = %d, want %d", k, i, got, want[i])
			}
		}
	}
}

// TestPickRule checks Pick's rule on hand-computed cases: u walks the cumulative probabilities in logit
// order, ties by lower id, after top-k and top-p.
func TestPickRule(t *testing.T) {
	ln := func(v float64) float32 { return float32(math.Log(v)) }
	// Probabilities 0.1, 0.4, 0.2, 0.3 (ids 0..3): order 1, 3, 2, 0; cumulative .4 .7 .9 1.
	logits := []float32{ln(0.1), ln(0.4), ln(0.2), ln(0.3)}
	for _, tc := range []struct {
		p    sample.Params
		u    float64
		want int
	}{
		{sample.Params{Temperature: 1}, 0, 1},
		{sample.Params{Temperature: 1}, 0.39, 1},
		{sample.Params{Temperature: 1}, 0.41, 3},
		{sample.Params{Temperature: 1}, 0.8, 2},
		{sample.Params{Temperature: 1}, 0.95, 0},
		{sample.Params{Temperature: 1, TopK: 2}, 0.95, 3},            // 1, 3 renormalised: .57 .43
		{sample.Params{Temperature: 1, TopK: 2}, 0.5, 1},             // .5 < .571
		{sample.Params{Temperature: 1, TopP: 0.6}, 0.6, 3},           // 1, 3 kept (.7): .6·.7 = .42 > .4
		{sample.Params{Temperature: 1, TopP: 0.6}, 0.99, 3},          //
		{sample.Params{Temperature: 1, TopP: 0.3}, 0.99, 1},          // .4 reaches .3 alone
		{sample.Params{Temperature: 1, TopK: 1}, 0.99, 1},            // top-1 is the argmax
		{sample.Params{Temperature: 1, TopK: 9, TopP: 1}, 0.95, 0},   // filters off
		{sample.Params{Temperature: 1, TopK: 0, TopP: 0}, 0.95, 0},   //
		{sample.Params{Temperature: 0, TopK: 3, TopP: 0.5}, 0.95, 1}, // greedy ignores the rest
	} {
		if got := sample.Pick(logits, tc.p, tc.u); got != tc.want {
			t.Errorf("Pick(%+v, u %v) = %d, want %d", tc.p, tc.u, got, tc.want)
		}
	}
	// Ties: equal logits are ordered by id, so u picks the lower id first.
	ties := []float32{0, 1, 1, 0}
	for _, tc := range []struct {
		u    float64
		want int
	}{{0.1, 1}, {0.3, 1}, {0.4, 2}, {0.7, 2}, {0.8, 0}, {0.99, 3}} {
		if got := sample.Pick(ties, sample.Params{Temperature: 1}, tc.u); got != tc.want {
			t.Errorf("Pick(ties, u %v) = %d, want %d", tc.u, got, tc.want)
		}
	}
	if got := sample.Pick([]float32{0, 2, 2}, sample.Params{Temperature: 1, TopK: 1}, 0.99); got != 1 {
		t.Errorf("Pick(top-1 on a tie) = %d, want 1 (the lower id)", got)
	}
}

// TestPromptLogprobs: a prompt fed in pieces gives the logprobs of fed whole: entry i is token i+1's
// under row i (Logprobs' math), with its rank among the row's logits; the first token has none. Bad
// shapes are refused.
func TestPromptLogprobs(t *testing.T) {
	const vocab = 5
	ids := []int{0, 3, 1, 4}
	rows := []float32{
		1, 2, 3, 4, 0, // after 0: 3 is the most likely (rank 1)
		0, 5, 1, 1, 1, // after 3: 1 is the most likely
		2, 2, 2, 2, 1, // after 1: 4 is the least likely (rank 5)
		9, 9, 9, 9, 9,
	}
	whole := sample.NewPromptLogprobs(2)
	if err := whole.Add(ids, rows, vocab); err != nil {
		t.Fatal(err)
	}
	pieces := sample.NewPromptLogprobs(2)
	for _, cut := range [][2]int{{0, 1}, {1, 3}, {3, 4}} {
		if err := pieces.Add(ids[cut[0]:cut[1]], rows[cut[0]*vocab:cut[1]*vocab], vocab); err != nil {
			t.Fatal(err)
		}
	}
	got := whole.Choices()
	if len(got) != 3 || !reflect.DeepEqual(got, pieces.Choices()) {
		t.Fatalf("Choices = %+v (pieces %+v), want 3, the same", got, pieces.Choices())
	}
	for i, c := range got {
		lp, top := sample.Logprobs(rows[i*vocab:(i+1)*vocab], ids[i+1], 2)
		if c.ID != ids[i+1] || c.Logprob != lp || !reflect.DeepEqual(c.Top, top) {
			t.Errorf("entry %d = %+v, want id %d logprob %g top %v", i, c, ids[i+1], lp, top)
		}
	}
	if ranks := []int{got[0].Rank, got[1].Rank, got[2].Rank}; !reflect.DeepEqual(ranks, []int{1, 1, 5}) {
		t.Errorf("ranks = %v, want [1 1 5]", ranks)
	}
	if last := whole.Last(); !reflect.DeepEqual(last, rows[3*vocab:]) {
		t.Errorf("Last = %v, want the last row", last)
	}
	if err := sample.NewPromptLogprobs(0).Add(ids, rows[:vocab], vocab); err == nil {
		t.Error("Add of 4 ids with 1 row: no error")
	}
	p := sample.NewPromptLogprobs(0)
	if err := p.Add([]int{0, 7}, rows[:2*vocab], vocab); err == nil {
		t.Error("Add of an id outside the vocabulary: no error")
	}
}
