package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// runShards dispatches the shard tools: `tpfleet shards plan` prints what each rank of a TP group loads.
func runShards(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runSubcommand(ctx, "shards", "[flags]", []command{
		{"plan", "print each rank's tensors, styles, local shapes, stored and in-memory formats and bytes under a tp_plan", runShardsPlan},
	}, args, stdout, stderr)
}

type shardsPlanFlags struct {
	dir   string
	tp    int
	rank  int
	plan  string
	json  bool
	quant quantFlags
}

// tensorMemory is how a rank holds one tensor: its stored dtype and the bytes it reads (F8_E4M3: the
// codes; their scales are read beside them), and its in-memory format and bytes (codes and scales).
type tensorMemory struct {
	Name        string `json:"name"`
	StoredDType string `json:"stored_dtype"`
	StoredBytes int64  `json:"stored_bytes"`
	Format      string `json:"format"`
	MemoryBytes int64  `json:"memory_bytes"`
}

// rankMemory is one rank's tensors as held in memory.
type rankMemory struct {
	Rank        int            `json:"rank"`
	MemoryBytes int64          `json:"memory_bytes"`
	Tensors     []tensorMemory `json:"tensors"`
}

// memoryOf says how rank m holds each tensor: F8_E4M3 tensors of a pre-quantised checkpoint as
// quant.CompressedTensorsFP8, the quantisable ones of a bf16 checkpoint in f, the rest as stored.
func memoryOf(cfg model.Config, m shard.Manifest, f quant.Format) rankMemory {
	specs := map[string]model.TensorSpec{}
	prefix := cfg.Info().Prefix
	for _, s := range model.Tensors(cfg) {
		specs[prefix+s.Name] = s
	}
	r := rankMemory{Rank: m.Rank}
	for _, t := range m.Tensors {
		spec, known := specs[t.Name]
		tm := tensorMemory{Name: t.Name, StoredDType: t.DType.String(), StoredBytes: t.Bytes, Format: strings.ToLower(t.DType.String()), MemoryBytes: t.Bytes}
		held := quant.Format{}
		switch {
		case t.DType == safetensors.F8_E4M3:
			held = quant.CompressedTensorsFP8()
		case known && spec.Quantizable && f.Quantized():
			held = f
		}
		if held.Quantized() && known {
			tm.Format, tm.MemoryBytes = held.String(), held.Bytes(t.LocalShape, spec.InputDim)
		}
		r.MemoryBytes += tm.MemoryBytes
		r.Tensors = append(r.Tensors, tm)
	}
	return r
}

// runShardsPlan applies a plan to a checkpoint and prints every rank's manifest.
func runShardsPlan(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f shardsPlanFlags
	fs := flag.NewFlagSet("shards plan", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.dir, "model", "", "checkpoint directory (config.json and *.safetensors)")
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel size: the number of ranks")
	fs.IntVar(&f.rank, "rank", -1, "print only this rank (-1: every rank)")
	fs.StringVar(&f.plan, "plan", "tp", `"tp" (HF's tp_plan with a vocab-parallel embedding), "ep" (expert parallel) or a JSON plan file in HF's format`)
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of tables")
	f.quant.addFlags(fs, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case f.dir == "":
		return usagef("--model is required")
	case f.tp < 1:
		return usagef("--tp %d must be >= 1", f.tp)
	case f.rank < -1 || f.rank >= f.tp:
		return usagef("--rank %d must be in [0, %d) or -1 for every rank", f.rank, f.tp)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	cfg, err := model.LoadConfig(f.dir)
	if err != nil {
		return err
	}
	format, err := f.quant.format()
	if err != nil {
		return err
	}
	plan, err := resolvePlan(cfg, f.plan)
	if err != nil {
		return err
	}
	ckpt, err := safetensors.OpenCheckpoint(f.dir)
	if err != nil {
		return err
	}
	defer ckpt.Close()
	view, err := shard.NewView(cfg, ckpt) // pre-quantised checkpoints: stacked experts, F8_E4M3 dtypes
	if err != nil {
		return err
	}
	ranks, err := shard.NewManifests(cfg, view, plan, f.tp)
	if err != nil {
		return err
	}
	if f.rank >= 0 {
		ranks = ranks[f.rank : f.rank+1]
	}
	mem := make([]rankMemory, len(ranks))
	for i, m := range ranks {
		mem[i] = memoryOf(cfg, m, format)
	}
	if f.json {
		return json.NewEncoder(stdout).Encode(struct {
			Model        string           `json:"model"`
			Plan         string           `json:"plan"`
			Rules        shard.Plan       `json:"rules"`
			TP           int              `json:"tp"`
			Quantization string           `json:"quantization"`
			Ranks        []shard.Manifest `json:"ranks"`
			Memory       []rankMemory     `json:"memory"`
		}{f.dir, f.plan, plan, f.tp, format.String(), ranks, mem})
	}
	return printShardsPlan(stdout, f, ranks, mem)
}

func printShardsPlan(w io.Writer, f shardsPlanFlags, ranks []shard.Manifest, mem []rankMemory) error {
	full := ranks[0].FullBytes
	fmt.Fprintf(w, "model %s, plan %s, tp %d: %d text tensors, %s whole\n", f.dir, f.plan, f.tp, len(ranks[0].Tensors), shardsSize(full))
	for i, m := range ranks {
		fmt.Fprintf(w, "\nrank %d of %d\n", m.Rank, m.TP)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  TENSOR\tSTYLE\tSPLIT\tLOCAL SHAPE\tSTORED\tBYTES\tIN MEMORY\tMEMORY BYTES")
		for j, t := range m.Tensors {
			style := string(t.Style)
			if style == "" {
				style = "-"
			}
			tm := mem[i].Tensors[j]
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%v\t%s\t%d\t%s\t%d\n", t.Name, style, shardsSplit(t), t.LocalShape, tm.StoredDType, t.Bytes, tm.Format, tm.MemoryBytes)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Fprintf(w, "  rank %d reads %s: split %s, whole %s; holds %s in memory\n", m.Rank, shardsSize(m.Bytes), shardsSize(m.SplitBytes),
			shardsSize(m.ReplicatedBytes), shardsSize(mem[i].MemoryBytes))
	}
	fmt.Fprintln(w, "\ntotals")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "RANK\tTENSORS\tSPLIT\tWHOLE\tTOTAL\tOF FULL\t")
	for _, m := range ranks {
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%.1f%%\t\n", m.Rank, len(m.Tensors), shardsSize(m.SplitBytes),
			shardsSize(m.ReplicatedBytes), shardsSize(m.Bytes), 100*float64(m.Bytes)/float64(max(full, 1)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if unused := ranks[0].Unused; len(unused) > 0 {
		s := make([]string, len(unused))
		for i, r := range unused {
			s[i] = fmt.Sprintf("%s (%s)", r.Pattern, r.Style)
		}
		fmt.Fprintf(w, "\nrules that split no tensor here (module styles, absent modules): %s\n", strings.Join(s, ", "))
	}
	return nil
}

// shardsSplit describes how a tensor is split: "dim 2 [0,16)+[32,48)", "whole".
func shardsSplit(t shard.TensorShard) string {
	if !t.Split() {
		return "whole"
	}
	r := make([]string, len(t.Ranges))
	for i, x := range t.Ranges {
		r[i] = fmt.Sprintf("[%d,%d)", x.Start, x.End)
	}
	s := fmt.Sprintf("dim %d %s", t.Dim, strings.Join(r, "+"))
	if t.Replicas > 1 {
		s += fmt.Sprintf(" on %d ranks", t.Replicas)
	}
	return s
}

func shardsSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
