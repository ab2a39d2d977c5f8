package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4/vision"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
)

// imageScorer is a model that takes image features in place of the embeddings of its <|patch|> (patchID)
// slots: one row of the text hidden size per slot, in order (llama4's runner).
type imageScorer interface {
	ScoreImages(ctx context.Context, ids []int, patchID int, features []float32) ([]float32, error)
}

// pixels are the optional float32 "pixel_values" [tiles, channels, height, width] of a score input.
type pixels struct {
	values []float32
	shape  []int
}

type scoreFlags struct {
	modelFlags
	ids          string
	idsFile      string
	out          string
	prefillChunk int
}

// chunkScorer is a model that scores in pieces of at most chunk tokens (chunked prefill).
type chunkScorer interface {
	ScoreChunked(ctx context.Context, ids []int, chunk int) ([]float32, error)
}

// runScore writes teacher-forced logits: float32 "logits" [batch, seq, vocab] for int64 "input_ids" [batch, seq].
// With float32 "pixel_values" [tiles, 3, H, W] beside input_ids (a multimodal checkpoint), the vision tower's
// features fill the <|patch|> slots of the rows in order, as HF's forward does (spec §6.4).
func runScore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f scoreFlags
	fs := flag.NewFlagSet("score", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.modelFlags.add(fs)
	fs.StringVar(&f.ids, "ids", "", "token ids of one sequence, comma-separated")
	fs.StringVar(&f.idsFile, "ids-file", "", `safetensors file with int64 "input_ids" [batch, seq] and, for images, float32 "pixel_values" [tiles, 3, H, W]`)
	fs.StringVar(&f.out, "out", "", `output safetensors file: float32 "logits" [batch, seq, vocab]`)
	fs.IntVar(&f.prefillChunk, "prefill-chunk", 0, "run each sequence through the model in pieces of at most this many tokens (chunked prefill; 0: whole)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if f.prefillChunk < 0 {
		return usagef("--prefill-chunk %d must not be negative", f.prefillChunk)
	}
	if err := f.check(); err != nil {
		return err
	}
	if (f.ids == "") == (f.idsFile == "") {
		return usagef("give exactly one of --ids and --ids-file")
	}
	if f.out == "" {
		return usagef("--out is required")
	}
	batch, pix, err := readBatch(f.ids, f.idsFile)
	if err != nil {
		return err
	}
	log, err := newLogger(stderr, f.logLevel)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush of stderr

	m, err := loadModel(ctx, f.modelFlags, log, func(cfg model.Info) error {
		for b, ids := range batch {
			if err := checkIDs(ids, cfg.VocabSize); err != nil {
				return fmt.Errorf("sequence %d: %w", b, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer m.Close()

	features, err := imageFeatures(ctx, f.dir, m.ckpt, m.backends[0], pix, batch, log)
	if err != nil {
		return err
	}
	vocab := m.Info().VocabSize
	seqLen := len(batch[0])
	logits := make([]float32, 0, len(batch)*seqLen*vocab)
	for b, ids := range batch {
		stepStart := time.Now()
		var row []float32
		err := m.run(func(rank int, rm modelrun.Model) error {
			var got []float32
			var err error
			if features != nil {
				is, ok := rm.(imageScorer)
				if !ok {
					return fmt.Errorf("%w: the %s model takes no images", modelrun.ErrInput, rm.Config().Info().Family)
				}
				got, err = is.ScoreImages(ctx, ids, features.patchID, features.rows[b])
			} else if cs, ok := rm.(chunkScorer); ok && f.prefillChunk > 0 {
				got, err = cs.ScoreChunked(ctx, ids, f.prefillChunk)
			} else {
				got, err = rm.Score(ctx, ids)
			}
			if rank == 0 {
				row = got
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("sequence %d: %w", b, err)
		}
		if b == 0 {
			m.firstStep(stepStart, fmt.Sprintf("score of %d tokens", len(ids)))
			m.report(log, stderr)
		}
		logits = append(logits, row...)
	}
	if !m.leader {
		return nil // rank 0's process writes the logits
	}
	t := safetensors.F32Tensor("logits", []int{len(batch), seqLen, vocab}, logits)
	if err := safetensors.WriteFile(f.out, []safetensors.Tensor{t}, nil); err != nil {
		return err
	}
	log.Info("wrote logits", zap.String("out", f.out), zap.Ints("shape", []int{len(batch), seqLen, vocab}))
	return nil
}

// readBatch returns the sequences to score, all of one length, and the file's pixel values if it has
// them.
func readBatch(ids, file string) ([][]int, *pixels, error) {
	if ids != "" {
		one, err := parseIDs(ids)
		if err != nil {
			return nil, nil, err
		}
		return [][]int{one}, nil, nil
	}
	ckpt, err := safetensors.OpenCheckpoint(file)
	if err != nil {
		return nil, nil, err
	}
	defer ckpt.Close()
	flat, shape, err := ckpt.Int64s("input_ids")
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", file, err)
	}
	if len(shape) != 2 || shape[0] == 0 || shape[1] == 0 {
		return nil, nil, fmt.Errorf("%s: input_ids has shape %v, want [batch, seq] with both > 0", file, shape)
	}
	var pix *pixels
	if ckpt.Has("pixel_values") {
		info, err := ckpt.Info("pixel_values")
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		if info.DType != safetensors.F32 || len(info.Shape) != 4 || info.Shape[0] == 0 {
			return nil, nil, fmt.Errorf("%s: pixel_values is %s%v, want F32 [tiles, 3, H, W] with tiles > 0", file, info.DType, info.Shape)
		}
		values, shape, err := ckpt.Float32s("pixel_values")
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		pix = &pixels{values: values, shape: shape}
	}
	batch := make([][]int, shape[0])
	for b := range batch {
		batch[b] = make([]int, shape[1])
		for i := range batch[b] {
			batch[b][i] = int(flat[b*shape[1]+i])
		}
	}
	return batch, pix, nil
}

// features are image features split by the batch rows whose <|patch|> slots they fill.
type features struct {
	patchID int
	rows    [][]float32
}

// imageFeatures runs the checkpoint's vision tower on ops (the first local rank's backend: every rank
// gets the same features) over pix (nil: no images, nil result) and hands the features to the rows in
// order, each row taking as many as it has <|patch|> slots.
func imageFeatures(ctx context.Context, dir string, ckpt *safetensors.Checkpoint, ops backend.Ops, pix *pixels, batch [][]int, log *zap.Logger) (*features, error) {
	if pix == nil {
		return nil, nil
	}
	cfg, err := vision.LoadConfig(dir)
	if err != nil {
		return nil, fmt.Errorf("pixel_values given: %w", err)
	}
	if s := pix.shape; s[1] != cfg.NumChannels || s[2] != cfg.ImageSize || s[3] != cfg.ImageSize {
		return nil, fmt.Errorf("%w: pixel_values %v, the vision tower takes [tiles, %d, %d, %d]", modelrun.ErrInput, s, cfg.NumChannels, cfg.ImageSize, cfg.ImageSize)
	}
	slots := 0
	for _, ids := range batch {
		for _, id := range ids {
			if id == cfg.PatchID {
				slots++
			}
		}
	}
	tiles, per := pix.shape[0], cfg.TokensPerTile()
	if slots != tiles*per {
		return nil, fmt.Errorf("%w: %d <|patch|> slots (id %d) in input_ids, %d tiles give %d features", modelrun.ErrInput, slots, cfg.PatchID, tiles, tiles*per)
	}
	vm, err := vision.Load(ctx, ops, ckpt, cfg)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	all, err := vm.Features(ctx, pix.values, tiles)
	if err != nil {
		return nil, err
	}
	log.Info("image features", zap.Int("tiles", tiles), zap.Int("slots", slots), zap.String("device", ops.Name()), zap.Duration("took", time.Since(start)))
	out := &features{patchID: cfg.PatchID, rows: make([][]float32, len(batch))}
	h := cfg.TextHiddenSize
	for b, ids := range batch {
		n := 0
		for _, id := range ids {
			if id == cfg.PatchID {
				n++
			}
		}
		out.rows[b], all = all[:n*h], all[n*h:]
	}
	return out, nil
}
