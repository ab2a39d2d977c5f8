package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/model"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
)

type scoreFlags struct {
	modelFlags
	ids     string
	idsFile string
	out     string
}

// runScore writes teacher-forced logits: float32 "logits" [batch, seq, vocab] for int64 "input_ids" [batch, seq].
func runScore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f scoreFlags
	fs := flag.NewFlagSet("score", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.modelFlags.add(fs)
	fs.StringVar(&f.ids, "ids", "", "token ids of one sequence, comma-separated")
	fs.StringVar(&f.idsFile, "ids-file", "", `safetensors file with int64 "input_ids" [batch, seq]`)
	fs.StringVar(&f.out, "out", "", `output safetensors file: float32 "logits" [batch, seq, vocab]`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
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
	batch, err := readBatch(f.ids, f.idsFile)
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

	vocab := m.Info().VocabSize
	seqLen := len(batch[0])
	logits := make([]float32, 0, len(batch)*seqLen*vocab)
	for b, ids := range batch {
		var row []float32
		err := m.run(func(rank int, rm modelrun.Model) error {
			got, err := rm.Score(ctx, ids)
			if rank == 0 {
				row = got
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("sequence %d: %w", b, err)
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

// readBatch returns the sequences to score, all of one length.
func readBatch(ids, file string) ([][]int, error) {
	if ids != "" {
		one, err := parseIDs(ids)
		if err != nil {
			return nil, err
		}
		return [][]int{one}, nil
	}
	ckpt, err := safetensors.OpenCheckpoint(file)
	if err != nil {
		return nil, err
	}
	defer ckpt.Close()
	flat, shape, err := ckpt.Int64s("input_ids")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if len(shape) != 2 || shape[0] == 0 || shape[1] == 0 {
		return nil, fmt.Errorf("%s: input_ids has shape %v, want [batch, seq] with both > 0", file, shape)
	}
	batch := make([][]int, shape[0])
	for b := range batch {
		batch[b] = make([]int, shape[1])
		for i := range batch[b] {
			batch[b][i] = int(flat[b*shape[1]+i])
		}
	}
	return batch, nil
}
