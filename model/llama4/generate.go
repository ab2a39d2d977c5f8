package llama4

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/sample"
)

// GenerateOptions bound and steer a generation; see run.GenerateOptions.
type GenerateOptions = run.GenerateOptions

// Finish says why a generation ended; see run.Finish.
type Finish = run.Finish

// The reasons a generation ends, in OpenAI's words.
const (
	FinishStop   = run.FinishStop   // a stop id was generated (it is the last id returned)
	FinishLength = run.FinishLength // MaxTokens were generated
)

// Generate runs prompt through the model, then decodes one token at a time through the KV cache. It calls
// emit (when not nil) with each new token as soon as it is chosen and returns all new tokens, including a
// final stop id, as HF's generate() does.
//
// Tokens are chosen with package sample's rule from a stream of draws seeded by opt.Sample.Seed. When the
// backend implements backend.Sampler, the choice is made where the logits are (they are never read back)
// with the draws made here, so a seed gives the same tokens as on the host, up to the backend's
// documented rounding slack; otherwise the logits come to the host and sample.Sampler chooses.
func (m *Model) Generate(ctx context.Context, prompt []int, opt GenerateOptions, emit func(id int) error) ([]int, Finish, error) {
	return m.generate(ctx, prompt, nil, opt, emit)
}

// GenerateImages is Generate with image features in the prompt's <|patch|> slots (see ForwardImages).
// The features enter with the prompt only: decode steps read the image tokens' keys and values from the
// cache and never need the features again.
func (m *Model) GenerateImages(ctx context.Context, prompt []int, images Images, opt GenerateOptions, emit func(id int) error) ([]int, Finish, error) {
	return m.generate(ctx, prompt, &images, opt, emit)
}

func (m *Model) generate(ctx context.Context, prompt []int, images *Images, opt GenerateOptions, emit func(id int) error) ([]int, Finish, error) {
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
	if opt.PrefillChunk < 0 {
		return nil, "", fmt.Errorf("%w: prefill chunk %d must not be negative", ErrInput, opt.PrefillChunk)
	}
	seq, err := m.NewSequence(len(prompt) + opt.MaxTokens)
	if err != nil {
		return nil, "", err
	}
	defer seq.Free() // the blocks go back however the generation ends
	sampler := sample.New(opt.Sample)
	sampler.Feed(prompt) // the penalties' history
	var out []int
	next := prompt
	pl := opt.PromptLogprobs
	if images == nil && opt.PrefillChunk > 0 { // all of the prompt but its last piece; the loop runs that
		for len(next) > opt.PrefillChunk {
			logits, err := m.Forward(ctx, seq, next[:opt.PrefillChunk], pl != nil)
			if err != nil {
				return nil, "", err
			}
			if pl != nil {
				if err := m.addPromptLogprobs(pl, next[:opt.PrefillChunk], logits); err != nil {
					return nil, "", err
				}
			}
			next = next[opt.PrefillChunk:]
		}
	}
	for len(out) < opt.MaxTokens {
		prefill := len(out) == 0
		all := prefill && pl != nil // the prompt's logprobs need every position's logits
		var logits backend.Tensor
		if images != nil && prefill {
			logits, err = m.ForwardImages(ctx, seq, next, *images, all)
		} else {
			logits, err = m.Forward(ctx, seq, next, all)
		}
		if err != nil {
			return out, "", err
		}
		var id int
		if all {
			if err := m.addPromptLogprobs(pl, next, logits); err != nil {
				return out, "", err
			}
			id = sampler.Next(pl.Last())
		} else if id, err = m.choose(logits, sampler); err != nil {
			return out, "", err
		}
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

// addPromptLogprobs reads the logits of every position of a prompt piece, ids, and feeds them to pl.
func (m *Model) addPromptLogprobs(pl *sample.PromptLogprobs, ids []int, logits backend.Tensor) error {
	rows, err := m.ops.Float32(logits)
	if err != nil {
		return fmt.Errorf("llama4: read prompt logits: %w", err)
	}
	shape := logits.Shape()
	return pl.Add(ids, rows, shape[len(shape)-1])
}

// choose picks the next token from logits [1, vocab]: on the backend when it implements backend.Sampler
// (with the draw sampler.Next would make), else on the host. A backend that refuses the settings
// (errors.ErrUnsupported) leaves the choice to the host, with the same draw. Settings that process the
// logits (bias, penalties, min tokens: sample.Params.Processed) or ask for logprobs are the host's:
// the row is read back and sampler chooses, so backend.Sampler needs to know only Pick's rule.
func (m *Model) choose(logits backend.Tensor, sampler *sample.Sampler) (int, error) {
	smp, onDevice := m.ops.(backend.Sampler)
	if p := sampler.Params(); !onDevice || p.Processed() || p.Logprobs {
		values, err := m.ops.Float32(logits)
		if err != nil {
			return 0, fmt.Errorf("llama4: read logits: %w", err)
		}
		return sampler.Next(values), nil
	}
	shape := logits.Shape()
	p := sampler.Params()
	row := backend.SampleRow{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, U: sampler.Uniform(shape[len(shape)-1])}
	ids, err := smp.Sample(logits, []backend.SampleRow{row})
	if err == nil {
		return ids[0], nil
	}
	if !errors.Is(err, errors.ErrUnsupported) {
		return 0, fmt.Errorf("llama4: sample: %w", err)
	}
	values, err := m.ops.Float32(logits)
	if err != nil {
		return 0, fmt.Errorf("llama4: read logits: %w", err)
	}
	return sample.Pick(values, p, row.U), nil
}

// Score runs ids teacher-forced through a fresh sequence and returns logits [len(ids), vocab] on the host.
func (m *Model) Score(ctx context.Context, ids []int) ([]float32, error) {
	return m.ScoreChunked(ctx, ids, 0)
}

// ScoreChunked is Score with the ids run in pieces of at most chunk tokens (chunked prefill; 0: all at
// once). The logits are those of Score: each piece attends to the cached keys of the pieces before it.
func (m *Model) ScoreChunked(ctx context.Context, ids []int, chunk int) ([]float32, error) {
	if chunk < 0 {
		return nil, fmt.Errorf("%w: prefill chunk %d must not be negative", ErrInput, chunk)
	}
	if chunk == 0 {
		chunk = max(len(ids), 1)
	}
	seq, err := m.NewSequence(len(ids))
	if err != nil {
		return nil, err
	}
	defer seq.Free()
	var out []float32
	for from := 0; from < len(ids) || from == 0; from += chunk {
		logits, err := m.Forward(ctx, seq, ids[from:min(from+chunk, len(ids))], true)
		if err != nil {
			return nil, err
		}
		v, err := m.ops.Float32(logits)
		if err != nil {
			return nil, err
		}
		out = append(out, v...)
	}
	return out, nil
}

// ScoreImages is Score with images: features in the <|patch|> slots of ids (see ForwardImages).
func (m *Model) ScoreImages(ctx context.Context, ids []int, images Images) ([]float32, error) {
	seq, err := m.NewSequence(len(ids))
	if err != nil {
		return nil, err
	}
	defer seq.Free()
	logits, err := m.ForwardImages(ctx, seq, ids, images, true)
	if err != nil {
		return nil, err
	}
	return m.ops.Float32(logits)
}
