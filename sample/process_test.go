package sample_test

import (
	"math"
	"reflect"
	"testing"

	"github.com/tpfleet/tpfleet/sample"
)

// TestProcessedGreedy checks min tokens, the bias and the penalties, in vLLM's order, on greedy
// choices whose winner each rule decides. Logits are 0: 4, 1: 3, 2: 2.5, 3: -1, 4: 3.9.
func TestProcessedGreedy(t *testing.T) {
	logits := []float32{4, 3, 2.5, -1, 3.9}
	for _, tc := range []struct {
		name   string
		p      sample.Params
		prompt []int
		want   []int // greedy choices, one per step
	}{
		{"none", sample.Params{}, nil, []int{0, 0, 0}},
		{"min tokens hold back the stop ids", sample.Params{MinTokens: 2, MinStopIDs: []int{0}}, nil, []int{4, 4, 0}},
		{"min tokens: ids outside the row are ignored", sample.Params{MinTokens: 1, MinStopIDs: []int{0, 99, -1}}, nil, []int{4, 0}},
		{"logit bias", sample.Params{LogitBias: map[int]float64{3: 5.5}}, nil, []int{3, 3}},
		{"negative bias", sample.Params{LogitBias: map[int]float64{0: -100}}, nil, []int{4, 4}},
		// 4 / 2 = 2 < 3.9, then 3.9 / 2 = 1.95 < 3: repetition counts prompt and output.
		{"repetition, prompt", sample.Params{RepetitionPenalty: 2}, []int{0}, []int{4, 1, 2}},
		// A negative logit is multiplied: -1 · 0.5 = -0.5; 4·2 stays first.
		{"repetition below 1 rewards", sample.Params{RepetitionPenalty: 0.5}, []int{3, 1}, []int{1, 1}},
		// Frequency: 4 - 0.6·n: after one choice 3.4 < 3.9.
		{"frequency", sample.Params{FrequencyPenalty: 0.6}, []int{4}, []int{0, 4, 0}},
		// Presence subtracts once: 4 - 2 = 2, 3.9 - 2 = 1.9, then 1 (3) wins.
		{"presence", sample.Params{PresencePenalty: 2}, nil, []int{0, 4, 1, 2}},
		{"prompt ids do not count for frequency", sample.Params{FrequencyPenalty: 2}, []int{0, 0, 0}, []int{0, 4}},
		// Bias before the repetition penalty: (3.9 + 0.2) / 2 = 2.05 < 3.
		{"bias then repetition", sample.Params{LogitBias: map[int]float64{4: 0.2}, RepetitionPenalty: 2}, []int{0, 4}, []int{1}},
	} {
		s := sample.New(tc.p)
		s.Feed(tc.prompt)
		var got []int
		for range tc.want {
			id := s.Next(logits)
			got = append(got, id)
			s.Feed([]int{id}) // the worker feeds the chosen id back; it must not count twice
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: Next ×%d with %+v, prompt %v = %v, want %v", tc.name, len(tc.want), tc.p, tc.prompt, got, tc.want)
		}
		if logits[0] != 4 || logits[4] != 3.9 {
			t.Fatalf("%s: Next modified the logits: %v", tc.name, logits)
		}
	}
}

// TestResumedHistory: a sampler that Skips past the ids chosen before a resume, fed the prompt and
// them, chooses as the sampler that chose them.
func TestResumedHistory(t *testing.T) {
	logits := []float32{4, 3, 2.5, -1, 3.9, 3.8}
	p := sample.Params{FrequencyPenalty: 0.3, PresencePenalty: 0.1, RepetitionPenalty: 1.2, MinTokens: 3, MinStopIDs: []int{1}, Temperature: 0.8, Seed: 9}
	prompt := []int{5, 2}
	a := sample.New(p)
	a.Feed(prompt)
	var want []int
	for range 12 {
		id := a.Next(logits)
		want = append(want, id)
		a.Feed([]int{id})
	}
	for _, k := range []int{1, 2, 5, 11} {
		b := sample.New(p)
		b.Skip(k, len(logits))
		b.Feed(prompt)
		b.Feed(want[:k]) // prefill in two pieces, as a chunked prefill feeds it
		for i := k; i < len(want); i++ {
			id := b.Next(logits)
			if id != want[i] {
				t.Fatalf("resumed after %d: Next at %d = %d, want %d (choices %v)", k, i, id, want[i], want)
			}
			b.Feed([]int{id})
		}
	}
}

// TestLogprobs: log-softmax of the raw logits, whatever the temperature or penalties; the top ids
// highest first, ties by lower id; -Inf written as -9999.
func TestLogprobs(t *testing.T) {
	logits := []float32{1, 3, 3, float32(math.Inf(-1)), 0}
	lse := math.Log(math.E + 2*math.Exp(3) + 1)
	lp := func(x float64) float32 { return float32(x - lse) }
	for _, tc := range []struct {
		name    string
		p       sample.Params
		wantID  int
		wantTop []sample.TokenLogprob
	}{
		{"greedy, no top", sample.Params{Logprobs: true}, 1, nil},
		{"greedy, top 2 (a tie)", sample.Params{Logprobs: true, TopLogprobs: 2}, 1, []sample.TokenLogprob{{1, lp(3)}, {2, lp(3)}}},
		{"top past the vocabulary", sample.Params{Logprobs: true, TopLogprobs: 9}, 1,
			[]sample.TokenLogprob{{1, lp(3)}, {2, lp(3)}, {0, lp(1)}, {4, lp(0)}, {3, -9999}}},
		{"bias changes the choice, not the logprobs", sample.Params{Logprobs: true, TopLogprobs: 1, LogitBias: map[int]float64{4: 10}}, 4,
			[]sample.TokenLogprob{{1, lp(3)}}},
	} {
		c := sample.New(tc.p).Choose(logits)
		if c.ID != tc.wantID || !reflect.DeepEqual(c.Top, tc.wantTop) {
			t.Errorf("%s: Choose = %+v, want id %d top %v", tc.name, c, tc.wantID, tc.wantTop)
		}
		if want := lp(float64(logits[c.ID])); c.Logprob != want {
			t.Errorf("%s: Choose logprob = %v, want %v", tc.name, c.Logprob, want)
		}
	}
	if c := sample.New(sample.Params{TopLogprobs: 3}).Choose(logits); c.Logprob != 0 || c.Top != nil {
		t.Errorf("Choose without Logprobs = %+v, want no logprobs", c)
	}
	// Sampled at a temperature, the logprobs are still the raw distribution's.
	s := sample.New(sample.Params{Temperature: 5, Seed: 1, Logprobs: true})
	for range 20 {
		c := s.Choose(logits)
		if want := lp(float64(logits[c.ID])); c.ID != 3 && c.Logprob != want {
			t.Fatalf("sampled Choose = %+v, logprob want %v", c, want)
		}
	}
}

func TestValidateProcessing(t *testing.T) {
	for _, tc := range []struct {
		p  sample.Params
		ok bool
	}{
		{sample.Params{RepetitionPenalty: 1.3, FrequencyPenalty: 2, PresencePenalty: -2, MinTokens: 4, TopLogprobs: 20}, true},
		{sample.Params{RepetitionPenalty: -1}, false},
		{sample.Params{RepetitionPenalty: math.Inf(1)}, false},
		{sample.Params{FrequencyPenalty: 2.1}, false},
		{sample.Params{PresencePenalty: math.NaN()}, false},
		{sample.Params{MinTokens: -1}, false},
		{sample.Params{TopLogprobs: 21}, false},
		{sample.Params{LogitBias: map[int]float64{1: math.NaN()}}, false},
	} {
		if err := tc.p.Validate(); (err == nil) != tc.ok {
			t.Errorf("Validate(%+v) = %v, want ok %v", tc.p, err, tc.ok)
		}
	}
}
