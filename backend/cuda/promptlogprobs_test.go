package cuda_test

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/internal/refmath"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/sample"
)

// TestPromptLogprobsGolden: on the GPU, the prompt logprobs Generate collects during the prefill equal
// the log-softmax of the model's own teacher-forced logits (Score: the same forward pass, 1e-4) when the
// prompt comes whole, and stay within 0.25 of HF's float32 log-softmax (bf16 weights) whole and in
// pieces of 5 tokens; it prints the worst differences.
func TestPromptLogprobsGolden(t *testing.T) {
	b := newBackend(t, cuda.BF16) // skips only where there is no GPU
	root := fixturesDir(t)
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		t.Run(e.Name(), func(t *testing.T) {
			dir := filepath.Join(root, e.Name())
			cfg, err := llama4.LoadConfig(dir)
			if err != nil {
				t.Fatal(err)
			}
			ckpt, gold := openGolden(t, dir)
			ctx := context.Background()
			m, err := llama4.Load(ctx, b, cfg, llama4.NewCheckpointWeights(ckpt, b, cfg), llama4.Parallel{})
			if err != nil {
				t.Fatal(err)
			}
			vocab := cfg.VocabSize
			ids := make([]int, gold.seq)
			for i := range ids {
				ids[i] = int(gold.ids[i])
			}
			own, err := m.Score(ctx, ids)
			if err != nil {
				t.Fatal(err)
			}
			for _, chunk := range []int{0, 5} {
				pl := sample.NewPromptLogprobs(3)
				if _, _, err := m.Generate(ctx, ids, llama4.GenerateOptions{MaxTokens: 1, PrefillChunk: chunk, PromptLogprobs: pl}, nil); err != nil {
					t.Fatal(err)
				}
				got := pl.Choices()
				if len(got) != len(ids)-1 {
					t.Fatalf("chunk %d: %d prompt logprobs, want %d", chunk, len(got), len(ids)-1)
				}
				ownWorst, hfWorst := 0.0, 0.0
				for i, c := range got {
					o := refmath.LogSoftmax(own[i*vocab : (i+1)*vocab])
					h := refmath.LogSoftmax(gold.logits[i*vocab : (i+1)*vocab])
					ownWorst = max(ownWorst, math.Abs(float64(c.Logprob)-o[ids[i+1]]))
					hfWorst = max(hfWorst, math.Abs(float64(c.Logprob)-h[ids[i+1]]))
				}
				t.Logf("chunk %d: %d prompt logprobs: max |Δ| vs own Score %.3g, vs HF float32 %.3g", chunk, len(got), ownWorst, hfWorst)
				if chunk == 0 && ownWorst > 1e-4 {
					t.Errorf("whole prefill: max |prompt logprob - own Score log-softmax| = %.3g, want <= 1e-4", ownWorst)
				}
				if hfWorst > 0.25 {
					t.Errorf("chunk %d: max |prompt logprob - HF log-softmax| = %.3g, want <= 0.25", chunk, hfWorst)
				}
			}
		})
	}
}
