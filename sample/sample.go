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
// The zero values of the other fields disable what they control.
type Params struct {
	Temperature float64
	TopK        int
	TopP        float64
	Seed        uint64

	// MinTokens holds back the MinStopIDs (the eos and stop ids) until this many tokens were chosen:
	// their logits are -Inf before then.
	MinTokens  int
	MinStopIDs []int
	// LogitBias is added to the logits of its ids (vLLM clamps OpenAI's to [-100, 100] before).
	LogitBias map[int]float64
	// RepetitionPenalty (0 or 1: off) divides the positive logit of an id seen in the prompt or the
	// output, and multiplies a negative one. FrequencyPenalty is subtracted from an id's logit once
	// per time it was chosen, PresencePenalty once if it was chosen at all.
	RepetitionPenalty float64
	FrequencyPenalty  float64
	PresencePenalty   float64

	// Logprobs asks Choose for the chosen id's log-probability and the TopLogprobs most likely ids'.
	// They are of the model's own distribution (vLLM's raw logprobs): the log-softmax of the logits as
	// they come, before the bias, the penalties, the temperature and the filters.
	Logprobs    bool
	TopLogprobs int
}

// MaxTopLogprobs bounds Params.TopLogprobs, as vLLM's default max_logprobs does.
const MaxTopLogprobs = 20

// Validate reports settings no sampler can honour.
func (p Params) Validate() error {
	switch {
	case p.Temperature < 0 || math.IsNaN(p.Temperature):
		return fmt.Errorf("sample: temperature %g must be >= 0", p.Temperature)
	case p.TopK < 0:
		return fmt.Errorf("sample: top-k %d must be >= 0", p.TopK)
	case p.TopP < 0 || p.TopP > 1 || math.IsNaN(p.TopP):
		return fmt.Errorf("sample: top-p %g must be in [0, 1]", p.TopP)
	case p.MinTokens < 0:
		return fmt.Errorf("sample: min tokens %d must be >= 0", p.MinTokens)
	case p.RepetitionPenalty < 0 || math.IsNaN(p.RepetitionPenalty) || math.IsInf(p.RepetitionPenalty, 0):
		return fmt.Errorf("sample: repetition penalty %g must be > 0 (0: off)", p.RepetitionPenalty)
	case !(p.FrequencyPenalty >= -2 && p.FrequencyPenalty <= 2):
		return fmt.Errorf("sample: frequency penalty %g must be in [-2, 2]", p.FrequencyPenalty)
	case !(p.PresencePenalty >= -2 && p.PresencePenalty <= 2):
		return fmt.Errorf("sample: presence penalty %g must be in [-2, 2]", p.PresencePenalty)
	case p.TopLogprobs < 0 || p.TopLogprobs > MaxTopLogprobs:
		return fmt.Errorf("sample: top logprobs %d must be in [0, %d]", p.TopLogprobs, MaxTopLogprobs)
	}
	for id, b := range p.LogitBias {
		if math.IsNaN(b) {
			return fmt.Errorf("sample: logit bias of id %d is NaN", id)
		}
	}
	return nil
}

// Processed reports whether p changes the logits before the choice (bias, penalties, min tokens): the
// choice then needs the sampler's history, and Pick on the raw logits does not make it.
func (p Params) Processed() bool {
	return len(p.LogitBias) > 0 || (p.RepetitionPenalty != 0 && p.RepetitionPenalty != 1) ||
		p.FrequencyPenalty != 0 || p.PresencePenalty != 0 || (p.MinTokens > 0 && len(p.MinStopIDs) > 0)
}

// Greedy reports whether p always takes the argmax (Temperature 0).
func (p Params) Greedy() bool { return p.Temperature == 0 }

// Sampler draws tokens with fixed Params. It is not safe for concurrent use.
//
// When the Params process the logits (Processed), the sampler keeps the sequence's history: the ids it
// was fed before its first choice (Feed: the prompt) and the ids it chose.
type Sampler struct {
	p   Params
	rng *rand.Rand
	idx []int     // scratch
	buf []float32 // scratch: the processed logits

	// History, kept when p.Processed().
	fed     []int        // ids fed before the first choice
	resumed int          // of them, the last ones were chosen before a resume (Skip)
	started bool         // a choice was made: fed ids are the chosen ones from then on
	prompt  map[int]bool // ids of the prompt (the repetition penalty's)
	counts  map[int]int  // chosen ids and how often
	chosen  int          // how many ids were chosen, resumed ones included
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
//
// The last steps ids given to Feed before the first choice are then the ids chosen before: the
// penalties and MinTokens count them as output.
func (s *Sampler) Skip(steps, n int) {
	for range steps {
		s.Uniform(n)
	}
	s.resumed += steps
}

// Feed records ids the sequence was fed. Before the first choice they are the prompt (on a resumed
// sequence the prompt, then the ids Skip stands for); after it they are the ids chosen, which the
// sampler recorded when it chose them, so they are ignored. Only Processed Params need it.
func (s *Sampler) Feed(ids []int) {
	if s.started || !s.p.Processed() {
		return
	}
	s.fed = append(s.fed, ids...)
}

// Next picks a token id from logits, drawing from the sampler's stream (see Uniform).
func (s *Sampler) Next(logits []float32) int {
	return s.Choose(logits).ID
}

// TokenLogprob is an id and its log-probability.
type TokenLogprob struct {
	ID      int
	Logprob float32
}

// Choice is what Choose chose: the id and, when the Params ask for them, its log-probability and the
// TopLogprobs most likely ids (highest first, ties by lower id), of the logits as they came.
type Choice struct {
	ID      int
	Logprob float32
	Top     []TokenLogprob
	// Rank is ID's rank in the row (1: the most likely; the ids whose logit is at least its own, as
	// vLLM counts): set by PromptLogprobs, 0 elsewhere.
	Rank int
}

// Choose picks a token id from logits as Next does, after the bias, min tokens and penalties of the
// Params (in vLLM's order: min tokens, bias, repetition, frequency, presence), and records it in the
// history. logits is not modified.
func (s *Sampler) Choose(logits []float32) Choice {
	u := s.Uniform(len(logits))
	row := logits
	if s.p.Processed() {
		s.start()
		row = s.process(logits)
	}
	var c Choice
	c.ID, s.idx = pick(row, s.p, u, s.idx)
	if s.p.Logprobs {
		c.Logprob, c.Top = Logprobs(logits, c.ID, s.p.TopLogprobs)
	}
	s.chosen++
	if s.counts != nil {
		s.counts[c.ID]++
	}
	s.started = true
	return c
}

// start splits the fed ids into prompt and output at the first choice.
func (s *Sampler) start() {
	if s.started {
		return
	}
	s.prompt, s.counts = map[int]bool{}, map[int]int{}
	cut := max(0, len(s.fed)-s.resumed)
	for _, id := range s.fed[:cut] {
		s.prompt[id] = true
	}
	for _, id := range s.fed[cut:] {
		s.counts[id]++
	}
	s.chosen = s.resumed
	s.fed = nil
}

// process returns the logits after min tokens, the bias and the penalties, in a scratch row.
func (s *Sampler) process(logits []float32) []float32 {
	s.buf = append(s.buf[:0], logits...)
	row, p := s.buf, s.p
	if s.chosen < p.MinTokens {
		for _, id := range p.MinStopIDs {
			if id >= 0 && id < len(row) {
				row[id] = float32(math.Inf(-1))
			}
		}
	}
	for id, b := range p.LogitBias {
		if id >= 0 && id < len(row) {
			row[id] = float32(float64(row[id]) + b)
		}
	}
	if r := p.RepetitionPenalty; r != 0 && r != 1 {
		penalise := func(id int) {
			if id < 0 || id >= len(row) {
				return
			}
			if row[id] > 0 {
				row[id] = float32(float64(row[id]) / r)
			} else {
				row[id] = float32(float64(row[id]) * r)
			}
		}
		for id := range s.prompt {
			penalise(id)
		}
		for id := range s.counts {
			if !s.prompt[id] {
				penalise(id)
			}
		}
	}
	for id, n := range s.counts {
		if id < 0 || id >= len(row) {
			continue
		}
		row[id] = float32(float64(row[id]) - p.FrequencyPenalty*float64(n) - p.PresencePenalty)
	}
	return row
}

// Logprobs returns the log-probability of id under the log-softmax of logits (in float64) and the top
// ids with theirs, highest first, ties by lower id. A log-probability of -Inf is given as -9999, as
// vLLM's API writes it.
func Logprobs(logits []float32, id, top int) (float32, []TokenLogprob) {
	maxL := math.Inf(-1)
	for _, x := range logits {
		maxL = max(maxL, float64(x))
	}
	sum := 0.0
	for _, x := range logits {
		sum += math.Exp(float64(x) - maxL)
	}
	lse := maxL + math.Log(sum)
	lp := func(i int) float32 {
		v := float64(logits[i]) - lse
		if math.IsInf(v, -1) || v < -9999 {
			v = -9999
		}
		return float32(v)
	}
	var tops []TokenLogprob
	if top > 0 {
		order := func(a, b int) int {
			if c := cmp.Compare(logits[b], logits[a]); c != 0 {
				return c
			}
			return a - b
		}
		var idx []int
		if top < len(logits) {
			idx = topK(logits, top, order, nil)
		} else {
			idx = make([]int, len(logits))
			for i := range idx {
				idx[i] = i
			}
			slices.SortFunc(idx, order)
		}
		tops = make([]TokenLogprob, len(idx))
		for i, j := range idx {
			tops[i] = TokenLogprob{ID: j, Logprob: lp(j)}
		}
	}
	return lp(id), tops
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

// PromptLogprobs collects a prompt's log-probabilities as its prefill runs, piece by piece: the
// log-probability of each prompt token after the first under the logits of the position before it, and
// the Top most likely ids there, with the math of Logprobs (the raw logits' log-softmax, before bias,
// penalties and temperature), as vLLM's prompt_logprobs gives them. It keeps the last row it was given,
// whose next token comes with the next piece. It is not safe for concurrent use.
type PromptLogprobs struct {
	top  int
	last []float32 // the logits of the last position fed: they score the next piece's first token
	out  []Choice
}

// NewPromptLogprobs returns a PromptLogprobs that keeps the top most likely ids of each position
// (0: the prompt tokens' own log-probabilities only); top must be in [0, MaxTopLogprobs].
func NewPromptLogprobs(top int) *PromptLogprobs { return &PromptLogprobs{top: top} }

// Top is the number of most likely ids kept per position.
func (p *PromptLogprobs) Top() int { return p.top }

// Add takes the next piece of the prompt, ids, and the logits of its positions, rows (len(ids) rows of
// vocab values, row k being the logits after ids[k]). rows is not kept: its last row is copied.
func (p *PromptLogprobs) Add(ids []int, rows []float32, vocab int) error {
	if vocab <= 0 || len(rows) != len(ids)*vocab {
		return fmt.Errorf("sample: prompt logprobs: %d logits for %d ids of a vocabulary of %d", len(rows), len(ids), vocab)
	}
	for k, id := range ids {
		if p.last != nil {
			if id < 0 || id >= vocab {
				return fmt.Errorf("sample: prompt logprobs: id %d outside the vocabulary [0, %d)", id, vocab)
			}
			c := Choice{ID: id}
			c.Logprob, c.Top = Logprobs(p.last, id, p.top)
			for _, x := range p.last {
				if x >= p.last[id] {
					c.Rank++
				}
			}
			p.out = append(p.out, c)
		}
		p.last = append(p.last[:0], rows[k*vocab:(k+1)*vocab]...)
	}
	return nil
}

// Last returns the logits of the last position fed (nil before the first Add): after the whole prompt,
// the row the first new token is chosen from. The caller must not modify it.
func (p *PromptLogprobs) Last() []float32 { return p.last }

// Choices returns the log-probabilities of the prompt tokens fed so far, but the first: entry i is
// token i+1's (the first token has none, as vLLM gives null for it).
func (p *PromptLogprobs) Choices() []Choice { return p.out }
