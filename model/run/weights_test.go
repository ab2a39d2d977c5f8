package run_test

import (
	"context"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model"
	_ "github.com/tpfleet/tpfleet/model/llama4" // registers the fixture's family
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// TestLoadLogHeld: with WithLog, loading a bf16 checkpoint under each --quantization logs one "tensor held"
// line a tensor with its stored dtype and bytes and its in-memory format and bytes: the quantisable tensors in
// the format (fp8 about half, int4 under a third of their bf16 bytes), the rest as stored; the lines' memory
// bytes add up to MemoryBytes.
func TestLoadLogHeld(t *testing.T) {
	const dir = "../../testdata/fixtures/moe-top1"
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	specs := model.Tensors(cfg)
	for _, tt := range []struct {
		name   string
		format quant.Format
		want   string // the quantisable tensors' in-memory format
		num    int64  // their in-memory bytes are at most num/den of their stored bytes
		den    int64
	}{
		{"none", quant.Format{}, "bf16", 1, 1},
		{"fp8", quant.Format{Kind: quant.FP8, DynamicActivations: true}, "fp8-rowwise+act", 6, 10},
		{"int4", quant.Format{Kind: quant.Int4, GroupSize: quant.DefaultGroupSize}, "int4-g128", 1, 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.DebugLevel)
			ops := cpu.New(cpu.Config{})
			w := run.NewCheckpointWeights(ckpt, ops, cfg).WithFormat(cfg, tt.format).WithLog(zap.New(core))
			for _, s := range specs {
				if _, _, err := w.Load(context.Background(), s.Name); err != nil {
					t.Fatalf("load %s: %v", s.Name, err)
				}
			}
			entries := logs.FilterMessage("tensor held").All()
			if len(entries) != len(specs) {
				t.Fatalf("%d tensor held lines, want one a tensor (%d)", len(entries), len(specs))
			}
			var sum int64
			for i, e := range entries {
				f := e.ContextMap()
				s := specs[i]
				stored, mem := f["stored-bytes"].(int64), f["memory-bytes"].(int64)
				format, _ := f["in-memory"].(string)
				sum += mem
				if f["tensor"] != s.Name || f["stored-dtype"] == nil || stored <= 0 {
					t.Errorf("line %d = %v, want tensor %s with its stored dtype and bytes", i, f, s.Name)
					continue
				}
				quantised := s.Quantizable && tt.format.Quantized()
				switch {
				case quantised && (format != tt.want || mem*tt.den > stored*tt.num):
					t.Errorf("%s: held %s in %d of %d stored bytes, want %s in at most %d/%d", s.Name, format, mem, stored, tt.want, tt.num, tt.den)
				case !quantised && (mem != stored || !strings.HasPrefix(format, "bf16") && !strings.HasPrefix(format, "f32")):
					t.Errorf("%s: held %s in %d of %d stored bytes, want as stored", s.Name, format, mem, stored)
				}
			}
			if sum != w.MemoryBytes() {
				t.Errorf("the lines' memory bytes add to %d, MemoryBytes() = %d", sum, w.MemoryBytes())
			}
		})
	}
}
