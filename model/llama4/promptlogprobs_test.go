package llama4_test

import (
	"context"
	"math"
	"testing"

	"github.com/tpfleet/tpfleet/internal/refmath"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/sample"
)

// TestPromptLogprobsGolden: the prompt logprobs Generate collects during the prefill (whole, and in
// pieces of 1, 3 and 5 tokens) are the log-softmax of HF's teacher-forced logits at the position
// before each prompt token (1e-4), the top 5 likewise, and the pieces give the whole prefill's values.
func TestPromptLogprobsGolden(t *testing.T) {
	const top = 5
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m := f.load(t)
			vocab := f.cfg.VocabSize
			ids := f.scoreIDs[0]
			var whole []sample.Choice
			for _, chunk := range []int{0, 1, 3, 5} {
				pl := sample.NewPromptLogprobs(top)
				out, _, err := m.Generate(context.Background(), ids, llama4.GenerateOptions{MaxTokens: 2, PrefillChunk: chunk, PromptLogprobs: pl}, nil)
				if err != nil {
					t.Fatal(err)
				}
				got := pl.Choices()
				if len(got) != len(ids)-1 {
					t.Fatalf("chunk %d: %d prompt logprobs for %d prompt ids, want %d", chunk, len(got), len(ids), len(ids)-1)
				}
				worst := 0.0
				for i, c := range got {
					want := refmath.LogSoftmax(f.scoreLogits[i*vocab : (i+1)*vocab])
					if c.ID != ids[i+1] {
						t.Fatalf("chunk %d: entry %d has id %d, want prompt id %d", chunk, i, c.ID, ids[i+1])
					}
					worst = max(worst, math.Abs(float64(c.Logprob)-want[ids[i+1]]))
					if len(c.Top) != top {
						t.Fatalf("chunk %d: entry %d has %d top logprobs, want %d", chunk, i, len(c.Top), top)
					}
					for k, tl := range c.Top {
						worst = max(worst, math.Abs(float64(tl.Logprob)-want[tl.ID]))
						if k > 0 && tl.Logprob > c.Top[k-1].Logprob {
							t.Errorf("chunk %d: entry %d: top %d (%g) above top %d (%g)", chunk, i, k, tl.Logprob, k-1, c.Top[k-1].Logprob)
						}
					}
					// No id outside the top may beat its last entry by more than the tolerance.
					for id, lp := range want {
						if lp > float64(c.Top[top-1].Logprob)+1e-4 && !hasID(c.Top, id) {
							t.Errorf("chunk %d: entry %d: id %d (HF logprob %g) missing from the top %d", chunk, i, id, lp, top)
						}
					}
				}
				t.Logf("chunk %d: %d prompt logprobs, max |Δ| vs HF log-softmax %.3g; new ids %v", chunk, len(got), worst, out)
				if worst > 1e-4 {
					t.Errorf("chunk %d: max |logprob - HF log-softmax| = %.3g, want <= 1e-4", chunk, worst)
				}
				if chunk == 0 {
					whole = got
					continue
				}
				d := 0.0
				for i := range got {
					d = max(d, math.Abs(float64(got[i].Logprob-whole[i].Logprob)))
					for k := range got[i].Top {
						d = max(d, math.Abs(float64(got[i].Top[k].Logprob-whole[i].Top[k].Logprob)))
					}
				}
				if d > 1e-5 {
					t.Errorf("chunk %d vs whole prefill: max |Δ logprob| = %.3g, want <= 1e-5", chunk, d)
				}
			}
		})
	}
}

func hasID(top []sample.TokenLogprob, id int) bool {
	for _, t := range top {
		if t.ID == id {
			return true
		}
	}
	return false
}
