package worker

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/quant"
)

// TestFormatFor: the plan decides the ranks' weight format; a worker's own --quantization only checks it.
func TestFormatFor(t *testing.T) {
	fp8, _ := quant.ParseFormat("fp8", 0)
	tests := []struct {
		plan, own   string
		planG, ownG int
		want        quant.Format
		wantErr     string
	}{
		{plan: "", own: "", want: quant.Format{}},
		{plan: "fp8", own: "", want: fp8},
		{plan: "int4", planG: 64, own: "", want: quant.Format{Kind: quant.Int4, GroupSize: 64}},
		{plan: "int4", own: "int4", want: quant.Format{Kind: quant.Int4, GroupSize: 128}}, // both default to 128
		{plan: "fp8", own: "fp8", want: fp8},
		{plan: "", own: "none", want: quant.Format{}},
		{plan: "fp8", own: "int4", wantErr: "--quantization int4-g128, but the plan's quantization is fp8-rowwise+act"},
		{plan: "int4", planG: 64, own: "int4", wantErr: "--quantization int4-g128, but the plan's quantization is int4-g64"},
		{plan: "fp8", own: "none", wantErr: "--quantization bf16, but the plan's quantization is fp8-rowwise+act"},
		{plan: "fp4", wantErr: `plan: quant: --quantization "fp4" is not supported`},
	}
	for _, tt := range tests {
		w := &Worker{cfg: Config{Quantization: tt.own, QuantizationGroup: tt.ownG}}
		k := w.keyFor(cluster.Plan{Model: "m", TP: 1, Quantization: tt.plan, QuantizationGroup: tt.planG}, cluster.Assignment{})
		got, err := w.formatFor(k)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("formatFor(plan %q, worker %q) = %v, %v; want error containing %q", tt.plan, tt.own, got, err, tt.wantErr)
			}
			if tt.own != "" && !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("formatFor(plan %q, worker %q) = %v, want ErrInvalidConfig", tt.plan, tt.own, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("formatFor(plan %q, worker %q) = %v, %v; want %v", tt.plan, tt.own, got, err, tt.want)
		}
	}
}

// TestOffloadExpertsRefused: a worker with --offload-experts on a backend that cannot offload (cpu) fails
// its load with one line of ErrInvalidConfig before reading any weight.
func TestOffloadExpertsRefused(t *testing.T) {
	w := &Worker{cfg: Config{OffloadExperts: true}, ops: cpu.New(cpu.Config{})}
	k := w.keyFor(cluster.Plan{Model: "../testdata/fixtures/moe-top1", TP: 1, PlanName: "tp"}, cluster.Assignment{})
	_, err := w.loadWeights(context.Background(), k)
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "cannot keep experts in host memory") || strings.Contains(err.Error(), "\n") {
		t.Errorf("loadWeights with --offload-experts on the cpu = %v, want one line of ErrInvalidConfig saying it cannot", err)
	}
}
