package llama4

import (
	"context"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/sample"
)

// GenerateOptions bound and steer a generation.
type GenerateOptions struct {
	MaxTokens int           // new tokens at most; must be positive
	Sample    sample.Params // Temperature 0 is greedy
	StopIDs   []int         // generation ends after emitting one of these (eos ids); empty: never
}

// Finish says why a generation ended.
type Finish string

// The reasons a generation ends, in OpenAI's words.
const (
	FinishStop   Finish = "stop"   // a stop id was generated (it is the last id returned)
	FinishLength Finish = "length" // MaxTokens were generated
)

// Generate runs prompt through the model, then decodes one token at a time through the KV cache. It calls
// emit (when not nil) with each new token as soon as it is chosen and returns all new tokens, including a
// final stop id, as HF's generate() does.
func (m *Model) Generate(ctx context.Context, prompt []int, opt GenerateOptions, emit func(id int) error) ([]int, Finish, error) {
	if opt.MaxTokens <= 0 {
		return nil, "", fmt.Errorf("%w: max tokens %d must be positive", ErrInput, opt.MaxTokens)
	}
	if err := opt.Sample.Validate(); err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrInput, err)
	}
	if len(prompt)+opt.MaxTokens > m.Config.MaxPositions {
		return nil, "", fmt.Errorf("%w: prompt of %d tokens plus %d new tokens exceeds max_position_embeddings %d",
			ErrInput, len(prompt), opt.MaxTokens, m.Config.MaxPositions)
	}
	seq, err := m.NewSequence(len(prompt) + opt.MaxTokens)
	if err != nil {
		return nil, "", err
	}
	sampler := sample.New(opt.Sample)
	var out []int
	next := prompt
	for len(out) < opt.MaxTokens {
		logits, err := m.Forward(ctx, seq, next, false)
		if err != nil {
			return out, "", err
		}
		row, err := m.ops.Float32(logits)
		if err != nil {
			return out, "", fmt.Errorf("llama4: read logits: %w", err)
		}
		id := sampler.Next(row)
		out = append(out, id)
		if emit != nil {
			if err := emit(id); err != nil {
				return out, "", err
			}
		}
		if slices.Contains(opt.StopIDs, id) {
			return out, FinishStop, nil
		}
		next = []int{id}
	}
	return out, FinishLength, nil
}

// Score runs ids teacher-forced through a fresh sequence and returns logits [len(ids), vocab] on the host.
func (m *Model) Score(ctx context.Context, ids []int) ([]float32, error) {
	seq, err := m.NewSequence(len(ids))
	if err != nil {
		return nil, err
	}
	logits, err := m.Forward(ctx, seq, ids, true)
	if err != nil {
		return nil, err
	}
	return m.ops.Float32(logits)
}
