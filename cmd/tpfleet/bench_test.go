package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/quant"
)

var benchTiny = []string{"--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--experts", "4",
	"--intermediate", "256", "--intermediate-mlp", "256", "--vocab", "1000", "--prompt", "8", "--tokens", "2", "--runs", "1", "--json"}

// TestBenchQuantization: bench --quantization runs on the cpu at TP 1 and 2, and its floor counts every
// quantisable tensor in its stored format (fewer bytes than bf16; int4 fewer than fp8) and the rest in bf16.
func TestBenchQuantization(t *testing.T) {
	step := map[string]int64{}
	for _, q := range []string{"none", "fp8", "int4"} {
		for _, tp := range []string{"1", "2"} {
			var out, errOut bytes.Buffer
			if err := runBench(context.Background(), append([]string{"--quantization", q, "--tp", tp}, benchTiny...), &out, &errOut); err != nil {
				t.Fatalf("bench --quantization %s --tp %s = %v (stderr %q)", q, tp, err, errOut.String())
			}
			var res benchResult
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatal(err)
			}
			if res.DecodeMSPerTok <= 0 || res.MemoryBytes <= 0 || (q == "none") != (res.MemoryBytes == res.WeightBytes) {
				t.Errorf("bench --quantization %s --tp %s = %+v", q, tp, res)
			}
			step[q] = res.StepBytes
			var names []string
			for _, p := range res.Phases {
				names = append(names, p.Name)
			}
			if got := strings.Join(names, ","); got != "process,device,weights,first-step,ready" {
				t.Errorf("bench --json phases = %s, want process,device,weights,first-step,ready", got)
			}
		}
	}
	if !(step["int4"] < step["fp8"] && step["fp8"] < step["none"]) {
		t.Errorf("decode bytes per step: none %d, fp8 %d, int4 %d; want decreasing", step["none"], step["fp8"], step["int4"])
	}
	var errOut bytes.Buffer
	if err := runBench(context.Background(), append([]string{"--quantization", "fp4"}, benchTiny...), &bytes.Buffer{}, &errOut); err == nil {
		t.Errorf("bench --quantization fp4 = nil, want a usage error")
	}
}

func TestBenchTensorBytes(t *testing.T) {
	lin := model.TensorSpec{Name: "q", Shape: []int{256, 300}, InputDim: 1, Quantizable: true}
	head := model.TensorSpec{Name: "lm_head.weight", Shape: []int{1000, 128}, InputDim: 1}
	tests := []struct {
		s    model.TensorSpec
		f    quant.Format
		want int64
	}{
		{lin, quant.Format{}, 2 * 256 * 300},
		{lin, quant.Format{Kind: quant.FP8}, 256*300 + 4*256},                      // a byte an element, a float32 scale a row
		{lin, quant.Format{Kind: quant.Int4, GroupSize: 128}, 256*300/2 + 2*256*3}, // half a byte, a bf16 scale per row and group
		{head, quant.Format{Kind: quant.Int4, GroupSize: 128}, 2 * 1000 * 128},     // lm_head stays bf16
	}
	for _, tt := range tests {
		if got := tensorBytes(tt.s, tt.f); got != tt.want {
			t.Errorf("tensorBytes(%s%v, %s) = %d, want %d", tt.s.Name, tt.s.Shape, tt.f, got, tt.want)
		}
	}
}

// TestBenchConfig: bench --config takes a real config.json's shape (here a fixture's, with --layers 2 of
// its 4), and refuses a layer count the config lacks or a load format other than dummy.
func TestBenchConfig(t *testing.T) {
	code, stdout, stderr := tpfleet(t, "bench", "--config", filepath.Join(fixtures, "moe-top1"), "--layers", "2",
		"--prompt", "16", "--tokens", "2", "--runs", "1", "--threads", "1", "--json")
	var res benchResult
	if err := json.Unmarshal([]byte(stdout), &res); code != 0 || err != nil {
		t.Fatalf("bench --config = %d, %q (%s)", code, stdout, stderr)
	}
	if res.Layers != 2 || res.Hidden != 64 || res.Experts != 4 || res.Vocab != 512 || res.PrefillMS <= 0 {
		t.Errorf("bench --config moe-top1 --layers 2 = %+v, want 2 layers of hidden 64, 4 experts, vocab 512", res)
	}
	for _, args := range [][]string{
		{"--config", filepath.Join("..", "..", "testdata", "configs", "scout"), "--layers", "49"},
		{"--config", filepath.Join(t.TempDir(), "none")},
		{"--load-format", "auto"},
	} {
		if code, _, stderr := tpfleet(t, append([]string{"bench"}, args...)...); code != 2 || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("bench %v = exit %d, %q, want 2 and one line", args, code, stderr)
		}
	}
}

// TestBenchOffloadExperts: --offload-experts on a backend that cannot offload (cpu) is one clear error,
// and the bytes an offloaded step copies are the chosen experts' (gate_up and down of min(batch·top-k, E)
// experts a MoE layer) in the format they are held in: a 4-layer model of 4 experts, hidden 128,
// intermediate 256, every layer MoE.
func TestBenchOffloadExperts(t *testing.T) {
	var errOut bytes.Buffer
	err := runBench(context.Background(), append([]string{"--offload-experts"}, benchTiny...), &bytes.Buffer{}, &errOut)
	if err == nil || !strings.Contains(err.Error(), "cannot keep experts in host memory") || strings.Contains(err.Error(), "\n") {
		t.Errorf("bench --offload-experts on the cpu = %v, want one line saying it cannot", err)
	}
	cfgJSON := []byte(`{"model_type": "llama4_text", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
		"intermediate_size_mlp": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
		"num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1}`)
	cfg, err := llama4.ParseConfig(cfgJSON)
	if err != nil {
		t.Fatal(err)
	}
	const expert = 3 * 128 * 256 // gate, up and down of one expert, elements
	for _, tt := range []struct {
		batch int
		f     quant.Format
		want  int64
	}{
		{1, quant.Format{}, 4 * 2 * expert},
		{3, quant.Format{}, 4 * 3 * 2 * expert},
		{64, quant.Format{}, 4 * 4 * 2 * expert},                                                // at most every expert
		{1, quant.Format{Kind: quant.FP8}, 4 * (expert + 4*(2*256+128))},                        // codes + a float32 scale an output column
		{1, quant.Format{Kind: quant.Int4, GroupSize: 128}, 4 * (expert/2 + 2*(1*2*256+2*128))}, // nibbles + bf16 scales per group
	} {
		if got := offloadStepBytes(cfg, maxRouted(cfg, tt.batch), tt.f); got != tt.want {
			t.Errorf("offloadStepBytes(batch %d, %s) = %d, want %d", tt.batch, tt.f, got, tt.want)
		}
	}
}

// TestBenchBatchContext: a batch bench fills each sequence's context alone (in pieces of --prefill-chunk),
// at TP 1 and 2, and reports the batch's decode step; a context that does not divide by the chunk works.
func TestBenchBatchContext(t *testing.T) {
	for _, tp := range []string{"1", "2"} {
		var out, errOut bytes.Buffer
		args := append([]string{"--tp", tp, "--batch", "3", "--context", "20", "--prefill-chunk", "7"}, benchTiny...)
		if err := runBench(context.Background(), args, &out, &errOut); err != nil {
			t.Fatalf("bench %v = %v (stderr %q)", args, err, errOut.String())
		}
		var res benchResult
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatal(err)
		}
		if res.Batch != 3 || res.DecodeMSPerTok <= 0 {
			t.Errorf("bench --tp %s --batch 3 --context 20 = %+v, want batch 3 and a decode time", tp, res)
		}
	}
}

// TestBenchFloorCountsRoutedExperts: the decode floor counts the distinct experts each MoE layer's step
// routes its tokens to, as the model's expert counts say, not every expert a batch could reach: on the
// cpu, top-1 over 16 experts, batch 1 routes one expert a layer (the bound) and batch 12 at most 12,
// usually fewer distinct ones; the bytes are the bound's with the experts part scaled to the routed count.
func TestBenchFloorCountsRoutedExperts(t *testing.T) {
	cfgJSON := []byte(`{"model_type": "llama4_text", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
		"intermediate_size_mlp": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
		"num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1}`)
	cfg, err := llama4.ParseConfig(cfgJSON)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--experts", "16",
		"--intermediate", "256", "--intermediate-mlp", "256", "--vocab", "1000", "--prompt", "8", "--tokens", "3", "--runs", "1",
		"--context", "4", "--json", "--threads", "1"}
	for _, batch := range []int{1, 12} {
		var out, errOut bytes.Buffer
		if err := runBench(context.Background(), append([]string{"--batch", strconv.Itoa(batch)}, args...), &out, &errOut); err != nil {
			t.Fatalf("bench --batch %d = %v (stderr %q)", batch, err, errOut.String())
		}
		var res benchResult
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatal(err)
		}
		bound := stepBytes(cfg, batch, maxRouted(cfg, batch), quant.Format{})
		if res.StepBytesBound != bound {
			t.Errorf("batch %d: decode_weight_bytes_bound = %d, want %d", batch, res.StepBytesBound, bound)
		}
		if res.ExpertsRouted < 1 || res.ExpertsRouted > maxRouted(cfg, batch) {
			t.Errorf("batch %d: decode_experts_per_moe_layer = %g, want in [1, %g]", batch, res.ExpertsRouted, maxRouted(cfg, batch))
		}
		if batch == 1 && res.ExpertsRouted != 1 {
			t.Errorf("batch 1, top-1: decode_experts_per_moe_layer = %g, want 1", res.ExpertsRouted)
		}
		if want := stepBytes(cfg, batch, res.ExpertsRouted, quant.Format{}); res.StepBytes != want || res.StepBytes > bound {
			t.Errorf("batch %d: decode_weight_bytes_per_step = %d, want %d (%g experts a layer), at most the bound %d",
				batch, res.StepBytes, want, res.ExpertsRouted, bound)
		}
	}
}

// TestRouteCensus: the census counts, for each step, the (layer, expert) pairs whose count grew, and
// averages them over steps and MoE layers; dense layers (nil) and backends that count nothing give 0.
func TestRouteCensus(t *testing.T) {
	loads := [][][]int64{
		{{0, 0, 0, 0}, nil, {0, 0, 0, 0}},
		{{2, 0, 0, 0}, nil, {0, 1, 1, 0}}, // 1 + 2 experts
		{{2, 3, 0, 0}, nil, {0, 1, 1, 5}}, // 1 + 1
		{{3, 4, 1, 1}, nil, {1, 2, 2, 6}}, // 4 + 4
	}
	i := 0
	c := &routeCensus{load: func() [][]int64 { i++; return loads[i-1] }}
	for range loads {
		c.observe()
	}
	if c.steps != 3 || c.routed != 13 || c.layers != 2 {
		t.Errorf("census = %d steps, %d routed, %d layers; want 3, 13, 2", c.steps, c.routed, c.layers)
	}
	if got, want := c.perLayer(), 13.0/3/2; got != want {
		t.Errorf("perLayer() = %g, want %g", got, want)
	}
	zero := &routeCensus{load: func() [][]int64 { return [][]int64{{0, 0}} }}
	zero.observe()
	zero.observe()
	if got := zero.perLayer(); got != 0 {
		t.Errorf("perLayer() with nothing counted = %g, want 0", got)
	}
	var none *routeCensus
	none.observer()(0)
	if none.perLayer() != 0 || none.spent() != 0 {
		t.Errorf("a nil census observes nothing")
	}
}

// fakeHost is a backend.HostReporter whose counts the test sets.
type fakeHost struct{ s backend.HostStats }

func (f *fakeHost) HostStats() backend.HostStats { return f.s }

// TestHostMeter: a span's counts are the reporter's difference between the readings, per step; a nil
// meter reads nothing; a bench run reports its prefill's and decode steps' counts in its JSON.
func TestHostMeter(t *testing.T) {
	rep := &fakeHost{backend.HostStats{Syncs: 5, Allocs: 2, Collections: 1, CollectionTime: time.Millisecond}}
	m := &hostMeter{rep: rep}
	r0 := m.read()
	rep.s = backend.HostStats{Syncs: 13, Allocs: 6, Collections: 3, CollectionTime: 5 * time.Millisecond}
	got := m.since(r0, 4)
	want := hostCounts{Syncs: 2, Allocs: 1, ForcedGCs: 0.5, ForcedGCMS: 1, GoGCs: got.GoGCs}
	if *got != want {
		t.Errorf("since = %+v, want %+v", *got, want)
	}
	var none *hostMeter
	if none.since(none.read(), 1) != nil {
		t.Error("a nil meter counted")
	}

	var out, errOut bytes.Buffer
	if err := runBench(context.Background(), benchTiny, &out, &errOut); err != nil {
		t.Fatalf("bench = %v (stderr %q)", err, errOut.String())
	}
	var res benchResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	if res.PrefillHost == nil || res.DecodeHost == nil {
		t.Fatalf("bench JSON has prefill_host %v and decode_host_per_step %v, want both", res.PrefillHost, res.DecodeHost)
	}
	// The cpu backend has no device to wait for: no syncs, allocations or forced collections.
	if res.PrefillHost.Syncs != 0 || res.DecodeHost.Allocs != 0 || res.PrefillHost.ForcedGCs != 0 {
		t.Errorf("cpu bench host counts %+v / %+v, want no device work", *res.PrefillHost, *res.DecodeHost)
	}
}
