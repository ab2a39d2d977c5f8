// Package run is the runnable side of a model: what the worker and the command line need to load a
// model.Config onto a backend and run it, without naming the model's family. It is the only package of
// model/ that knows backends and communicators, so the coordinator, which imports model, links neither.
//
// A family's configuration type implements Opener (a capability found by type assertion, as backends'
// optional ops are); Open dispatches to it. Model is the small surface the callers use: sequences,
// batched forward passes, generation and scoring. RankWeights loads one rank's slices of a checkpoint, as
// a shard.Manifest cuts them, into a backend.
//
// Weight formats: RankWeights.WithFormat (and CheckpointWeights.WithFormat) hold the tensors the model
// declares Quantizable in a package quant format, quantised at load from this rank's slices only (fp8
// rowwise, int4 group-wise), and load the F8_E4M3 tensors of a pre-quantised (compressed-tensors) checkpoint
// read through a shard.View with their scales, as quant.CompressedTensorsFP8. Either needs a backend that
// implements backend.QuantizedLoader; the others get one line wrapping errors.ErrUnsupported naming the
// format. MemoryBytes counts what is held (codes and scales).
//
// The load pipeline (RankWeights.Prefetch, LoadConfig) reads a rank's tensors ahead of the model's loader:
// several reader goroutines do range reads (pread, optionally O_DIRECT; package internal/fileread) of the
// slices a Locator places in the shard files, in chunks, into the backend's staging buffers where it is a
// backend.Uploader (pinned memory on a GPU, asynchronous copies, on-device quantisation through a
// backend.DeviceQuantizer) and into whole host buffers otherwise (Ops.Load). Each byte of the rank's slices
// is read once; a failed read names the tensor and the file; Close ends every goroutine. LoadStats gives
// the load's start-up phases (package internal/phase). A source that generates weights instead of reading
// them plugs in as a Locator and a FileReader (LoadConfig.Files).
package run

import (
	"context"
	"errors"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/sample"
)

// ErrInput marks a request a model cannot run: token ids outside the vocabulary, positions past the
// context, an empty batch. Errors wrap it with the detail.
var ErrInput = errors.New("model: invalid input")

// ErrNotRunnable means a configuration's family has no runtime in this binary.
var ErrNotRunnable = errors.New("model: not runnable")

// Weights gives a model this rank's slice of each tensor loaded into a backend; see model.Weights.
type Weights = model.Weights[backend.Tensor]

// Weight is a leaf of a family's tensor tree as loaded into a backend.
type Weight = model.Weight[backend.Tensor]

// Parallel is a rank's place in its tensor-parallel group. A nil Comm means a single rank.
type Parallel struct {
	Comm comm.Comm
}

// Sequence is one sequence's decoding state on a rank (its KV caches). It belongs to the Model that made
// it and is not safe for concurrent use.
type Sequence interface {
	// Len is the number of tokens the sequence has consumed.
	Len() int
	// Free returns the sequence's KV cache blocks to the model's pool; the sequence cannot run again.
	// Call it when a sequence ends or is cancelled. Freeing twice is harmless.
	Free()
}

// KVPool is implemented by a Model whose sequences keep their KV caches in a pool of fixed-size blocks
// (backend.BlockPool): SetKVBlocks replaces the pool by one of blocks blocks of blockSize positions
// (blocks 0: a pool that grows as sequences need blocks), for the sequences made after it; KVUsage
// reports the blocks in use and the blocks the pool has (the memory planner sizes the pool from free
// memory, admission counts blocks).
type KVPool interface {
	SetKVBlocks(blockSize, blocks int) error
	KVUsage() (used, total, blockSize int)
}

// GenerateOptions bound and steer a generation.
type GenerateOptions struct {
	MaxTokens int           // new tokens at most; must be positive
	Sample    sample.Params // Temperature 0 is greedy
	StopIDs   []int         // generation ends after emitting one of these (eos ids); empty: never
	// PrefillChunk, when positive, runs the prompt through the model in pieces of at most this many
	// tokens (chunked prefill: the same logits, less activation memory per step).
	PrefillChunk int
	// PromptLogprobs, when not nil, receives the prompt's log-probabilities during the prefill (vLLM's
	// prompt_logprobs): every prompt position's logits are computed (the lm_head over all of them, in
	// each piece of a chunked prefill) and fed to it, so they cost memory only when asked for.
	PromptLogprobs *sample.PromptLogprobs
}

// Finish says why a generation ended.
type Finish string

// The reasons a generation ends, in OpenAI's words.
const (
	FinishStop   Finish = "stop"   // a stop id was generated (it is the last id returned)
	FinishLength Finish = "length" // MaxTokens were generated
)

// Model is one rank's slice of a model, loaded on a backend. Its methods run the rank's part of each
// step, collectives included: every rank of a TP group must call the same methods with the same
// arguments, concurrently. A Model is not safe for concurrent use; its tensors belong to the backend.
type Model interface {
	// Config is the configuration the model was opened with.
	Config() model.Config
	// NewSequence makes an empty sequence with room for capacity tokens; errors wrap ErrInput.
	NewSequence(capacity int) (Sequence, error)
	// ForwardBatch runs ids[i] through seqs[i] at their next positions in one pass and returns logits
	// [rows, vocab] on the backend: every new token's when allLogits is set, else each sequence's last.
	// On error no sequence advances.
	ForwardBatch(ctx context.Context, seqs []Sequence, ids [][]int, allLogits bool) (backend.Tensor, error)
	// Generate runs prompt then decodes up to opt.MaxTokens, calling emit (when not nil) with each new id.
	Generate(ctx context.Context, prompt []int, opt GenerateOptions, emit func(id int) error) ([]int, Finish, error)
	// Score runs ids teacher-forced and returns logits [len(ids), vocab] on the host.
	Score(ctx context.Context, ids []int) ([]float32, error)
}

// ExpertLoader is implemented by a Model of a mixture of experts that counts the tokens routed to each
// expert: ExpertLoad returns them per decoder layer since the model was loaded (nil for a dense layer), by
// the checkpoint's expert numbering; SlotLoad returns them per slot of the group's expert tensors (the
// plan's expert order, replicas included: model.Layout.Units), which says what each rank computed. Both
// are safe to call while the model runs.
type ExpertLoader interface {
	ExpertLoad() [][]int64
	SlotLoad() [][]int64
}

// Opener is implemented by the configuration types of families that run in this binary.
type Opener interface {
	// Open builds the model from w on ops.
	Open(ctx context.Context, ops backend.Ops, w Weights, par Parallel) (Model, error)
}

// Open builds cfg's model on ops from w.
func Open(ctx context.Context, ops backend.Ops, cfg model.Config, w Weights, par Parallel) (Model, error) {
	o, ok := cfg.(Opener)
	if !ok {
		return nil, fmt.Errorf("%w: %s (%T) has no runtime", ErrNotRunnable, cfg.Info().Family, cfg)
	}
	return o.Open(ctx, ops, w, par)
}

// ImageModel is implemented by a Model whose prompts may carry image features: ForwardBatchImages is
// ForwardBatch with features[i] (nil: none) in place of the embeddings of the image slots (the ids equal
// to slotID, ImageEncoder.SlotID) among ids[i], one row of the model's hidden size per slot, in order. The rows must match the slots exactly; errors
// wrap ErrInput. The features are read, never kept.
type ImageModel interface {
	ForwardBatchImages(ctx context.Context, seqs []Sequence, ids [][]int, slotID int, features [][]float32, allLogits bool) (backend.Tensor, error)
}

// ImageOpener is implemented by the configuration types of families with a vision tower that runs in
// this binary.
type ImageOpener interface {
	// OpenImageEncoder loads the vision tower of the checkpoint in dir into ops (the rank's backend: the
	// text model's); it wraps model.ErrNoImages when the checkpoint has none.
	OpenImageEncoder(ctx context.Context, dir string, ops backend.Ops) (ImageEncoder, error)
}

// ImageEncoder turns encoded images into the feature rows of their image slots. It runs on the backend it
// was opened on, the same on every rank (the same bytes and backend give the same features; every rank
// holds the whole tower). Its calls take turns with each other, but like any work on a backend they must
// not overlap the backend's other work (the worker encodes in the step, before the forward pass).
type ImageEncoder interface {
	// SlotID is the id of an image slot in an expanded prompt (the <|patch|> id), and Width the length of
	// one slot's feature row (the text model's hidden size).
	SlotID() int
	Width() int
	// Encode decodes and processes every prompt's images and runs the vision tower once over all their
	// tiles; out[i] holds prompt i's feature rows ([slots, hidden_size]) in slot order. Bad images wrap
	// model.ErrImage and name the prompt and the image.
	Encode(ctx context.Context, prompts [][][]byte) ([][]float32, error)
}
