package llama4_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/sample"
)

// hostOnly hides the backend's Sampler: the model reads the logits back and samples on the host.
type hostOnly struct{ backend.Ops }

// onBackend samples through smp and counts what the model asks of it: logits read back (Float32) and
// Sample calls. With refuse set, Sample refuses every row as unsupported.
type onBackend struct {
	backend.Ops
	smp            backend.Sampler
	refuse         bool
	reads, samples int
}

func (o *onBackend) Float32(t backend.Tensor) ([]float32, error) {
	o.reads++
	return o.Ops.Float32(t)
}

func (o *onBackend) Sample(logits backend.Tensor, rows []backend.SampleRow) ([]int, error) {
	o.samples++
	if o.refuse {
		return nil, fmt.Errorf("test: %w", errors.ErrUnsupported)
	}
	return o.smp.Sample(logits, rows)
}

func (f *fixture) loadWith(t *testing.T, ops backend.Ops) *llama4.Model {
	t.Helper()
	m, err := llama4.Load(context.Background(), ops, f.cfg, llama4.NewCheckpointWeights(f.ckpt, ops, f.cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestGenerateSamplerPaths: generation through backend.Sampler (the cpu backend's, which is package
// sample's rule) gives the ids the host path gives, greedy and seeded, without reading logits back; a
// backend that refuses the settings leaves the choice to the host with the same draws.
func TestGenerateSamplerPaths(t *testing.T) {
	if _, ok := any(hostOnly{}).(backend.Sampler); ok {
		t.Fatal("hostOnly implements backend.Sampler")
	}
	ctx := context.Background()
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			ops := cpu.New(cpu.Config{})
			host := f.loadWith(t, hostOnly{ops})
			dev := &onBackend{Ops: ops, smp: ops}
			onDev := f.loadWith(t, dev)
			refusing := &onBackend{Ops: ops, smp: ops, refuse: true}
			fallback := f.loadWith(t, refusing)
			n := min(20, len(f.greedyIDs))
			for _, p := range []sample.Params{
				{},
				{Temperature: 1.5, TopK: 50, TopP: 0.95, Seed: 7},
				{Temperature: 0.8, TopP: 0.9, Seed: 3},
				{Temperature: 1, Seed: 11},
				{Temperature: 0.7, TopK: 1, Seed: 5},
			} {
				opt := llama4.GenerateOptions{MaxTokens: n, Sample: p}
				want, _, err := host.Generate(ctx, f.prompt, opt, nil)
				if err != nil {
					t.Fatal(err)
				}
				reads, samples := dev.reads, dev.samples
				got, _, err := onDev.Generate(ctx, f.prompt, opt, nil)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, want) {
					t.Errorf("%+v: through backend.Sampler %v, on the host %v", p, got, want)
				}
				if dev.reads != reads || dev.samples-samples != len(got) {
					t.Errorf("%+v: %d tokens read logits back %d times and sampled %d times, want 0 and %d",
						p, len(got), dev.reads-reads, dev.samples-samples, len(got))
				}
				if got, _, err := fallback.Generate(ctx, f.prompt, opt, nil); err != nil || !slices.Equal(got, want) {
					t.Errorf("%+v: with the backend refusing: %v, %v; want %v", p, got, err, want)
				}
				if p.Temperature == 0 || p.TopK == 1 {
					if !slices.Equal(want, f.greedyIDs[:n]) {
						t.Errorf("%+v: %v, want HF's greedy ids %v", p, want, f.greedyIDs[:n])
					}
				}
			}
		})
	}
}

// failing is a Sampler that fails.
type failing struct{ backend.Ops }

func (failing) Sample(backend.Tensor, []backend.SampleRow) ([]int, error) {
	return nil, errors.New("test: device lost")
}

func TestGenerateSamplerError(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.loadWith(t, failing{cpu.New(cpu.Config{})})
	if _, _, err := m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{MaxTokens: 3}, nil); err == nil {
		t.Errorf("Generate with a failing Sampler: error = nil, want its error")
	}
}

// TestGenerateProcessedOnHost: settings that process the logits are applied on the host even when the
// backend samples: min tokens hold back a biased id for two tokens, then the bias of +100 makes it every
// choice; the device's Sampler is not asked.
func TestGenerateProcessedOnHost(t *testing.T) {
	ctx := context.Background()
	f := openFixture(t, "moe-top1")
	ops := cpu.New(cpu.Config{})
	dev := &onBackend{Ops: ops, smp: ops}
	m := f.loadWith(t, dev)
	biased := (f.greedyIDs[0] + 5) % f.cfg.VocabSize
	for _, p := range []sample.Params{
		{LogitBias: map[int]float64{biased: 100}, MinTokens: 2, MinStopIDs: []int{biased}},
		{LogitBias: map[int]float64{biased: 100}, MinTokens: 2, MinStopIDs: []int{biased}, Temperature: 0.7, Seed: 3, RepetitionPenalty: 1.1},
	} {
		samples := dev.samples
		got, _, err := m.Generate(ctx, f.prompt, llama4.GenerateOptions{MaxTokens: 6, Sample: p}, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := []int{biased, biased, biased, biased}
		if len(got) != 6 || got[0] == biased || got[1] == biased || !slices.Equal(got[2:], want) {
			t.Errorf("%+v: Generate = %v, want 2 ids other than %d, then %v", p, got, biased, want)
		}
		if dev.samples != samples {
			t.Errorf("%+v: the backend's Sampler was asked %d times, want 0", p, dev.samples-samples)
		}
	}
}

// TestExpertLoad: on cpu, every MoE layer counts top-k experts for every token it runs (the prompt in one
// prefill, then each generated token but the last, which is never fed back), and dense layers count none.
func TestExpertLoad(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.loadWith(t, cpu.New(cpu.Config{}))
	n := 8
	if _, _, err := m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{MaxTokens: n}, nil); err != nil {
		t.Fatal(err)
	}
	load := m.ExpertLoad()
	moeLayers := 0
	for i, layer := range load {
		if layer == nil {
			continue
		}
		moeLayers++
		var sum int64
		for _, c := range layer {
			sum += c
		}
		if want := int64((len(f.prompt) + n - 1) * f.cfg.TopK); sum != want {
			t.Errorf("ExpertLoad()[%d] = %v, sum %d; want %d tokens × top-%d", i, layer, sum, len(f.prompt)+n-1, f.cfg.TopK)
		}
	}
	if moeLayers == 0 {
		t.Errorf("ExpertLoad() = %v, want counts for the MoE layers", load)
	}
}
