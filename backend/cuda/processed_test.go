package cuda_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/sample"
)

// TestGenerateProcessedOnHost: on the GPU, settings that process the logits (bias, min tokens,
// penalties) and logprobs bypass the device sampler, so they hold exactly: min tokens hold back a
// biased id for two tokens, then its bias of +100 makes it every choice; greedy with a repetition
// penalty gives the ids of the CPU backend.
func TestGenerateProcessedOnHost(t *testing.T) {
	b := newBackend(t, cuda.F32)
	dir := filepath.Join(fixturesDir(t), "moe-top1")
	cfg, err := llama4.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, gold := openGolden(t, dir)
	info, data := readGolden(t, gold.file, "prompt_ids")
	p64, err := safetensors.ToInt64(info.DType, data)
	if err != nil {
		t.Fatal(err)
	}
	prompt := make([]int, len(p64))
	for i, v := range p64 {
		prompt[i] = int(v)
	}
	ctx := context.Background()
	gpu, err := llama4.Load(ctx, b, cfg, llama4.NewCheckpointWeights(ckpt, b, cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	ops := cpu.New(cpu.Config{})
	host, err := llama4.Load(ctx, ops, cfg, llama4.NewCheckpointWeights(ckpt, ops, cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	plain, _, err := gpu.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	biased := (plain[0] + 5) % cfg.VocabSize
	for _, p := range []sample.Params{
		{LogitBias: map[int]float64{biased: 100}, MinTokens: 2, MinStopIDs: []int{biased}},
		{LogitBias: map[int]float64{biased: 100}, MinTokens: 2, MinStopIDs: []int{biased}, Temperature: 0.7, Seed: 3, Logprobs: true},
	} {
		got, _, err := gpu.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 6, Sample: p}, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := []int{biased, biased, biased, biased}
		if len(got) != 6 || got[0] == biased || got[1] == biased || !slices.Equal(got[2:], want) {
			t.Errorf("%+v: Generate on the GPU = %v, want 2 ids other than %d, then %v", p, got, biased, want)
		}
	}
	p := sample.Params{RepetitionPenalty: 1.8, FrequencyPenalty: 0.5}
	opt := llama4.GenerateOptions{MaxTokens: 12, Sample: p}
	got, _, err := gpu.Generate(ctx, prompt, opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	want, _, err := host.Generate(ctx, prompt, opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	same := 0
	for same < len(got) && same < len(want) && got[same] == want[same] {
		same++
	}
	row("generate processed on host", "moe-top1 act f32", fmt.Sprintf("penalised greedy %d/%d of the CPU's", same, len(want)), "")
	if same < len(want)/2 {
		t.Errorf("%+v: GPU %v, CPU %v: the first %d agree, want at least %d", p, got, want, same, len(want)/2)
	}
}
