package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"runtime"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/sample"
)

type benchFlags struct {
	layers, hidden, heads, kvHeads, headDim, experts, topK, intermediate, intermediateMLP, vocab, moeStep int
	prompt, tokens, threads, runs                                                                         int
	json                                                                                                  bool
}

// benchResult is one measurement; times are the best of the runs.
type benchResult struct {
	Device         string  `json:"device"`
	Threads        int     `json:"threads"`
	Layers         int     `json:"layers"`
	Hidden         int     `json:"hidden"`
	Experts        int     `json:"experts"`
	Vocab          int     `json:"vocab"`
	WeightBytes    int64   `json:"weight_bytes_bf16"`
	PromptTokens   int     `json:"prompt_tokens"`
	PrefillMS      float64 `json:"prefill_ms"`
	DecodeTokens   int     `json:"decode_tokens"`
	DecodeMSPerTok float64 `json:"decode_ms_per_token"`
	TokensPerSec   float64 `json:"decode_tokens_per_second"`
}

// runBench times prefill and batch-1 decode of a random model of the given shape (no checkpoint needed).
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f benchFlags
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&f.layers, "layers", 4, "decoder layers")
	fs.IntVar(&f.hidden, "hidden", 512, "hidden size")
	fs.IntVar(&f.heads, "heads", 8, "attention heads")
	fs.IntVar(&f.kvHeads, "kv-heads", 2, "key/value heads")
	fs.IntVar(&f.headDim, "head-dim", 64, "head dimension")
	fs.IntVar(&f.experts, "experts", 16, "routed experts")
	fs.IntVar(&f.topK, "top-k", 1, "experts per token")
	fs.IntVar(&f.intermediate, "intermediate", 1024, "expert and shared-expert width")
	fs.IntVar(&f.intermediateMLP, "intermediate-mlp", 2048, "dense-layer width")
	fs.IntVar(&f.moeStep, "moe-step", 1, "interleave_moe_layer_step: 1 all MoE, 2 alternate dense/MoE")
	fs.IntVar(&f.vocab, "vocab", 32000, "vocabulary size")
	fs.IntVar(&f.prompt, "prompt", 128, "prompt tokens (prefill)")
	fs.IntVar(&f.tokens, "tokens", 32, "decoded tokens")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads (0: all cores)")
	fs.IntVar(&f.runs, "runs", 3, "repetitions; the best is reported")
	fs.BoolVar(&f.json, "json", false, "print one JSON object")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.runs < 1 || f.prompt < 1 || f.tokens < 1 {
		return usagef("--runs, --prompt and --tokens must be positive")
	}
	cfgJSON, _ := json.Marshal(map[string]any{
		"model_type": "llama4_text", "vocab_size": f.vocab, "hidden_size": f.hidden, "intermediate_size": f.intermediate,
		"intermediate_size_mlp": f.intermediateMLP, "num_hidden_layers": f.layers, "num_attention_heads": f.heads,
		"num_key_value_heads": f.kvHeads, "head_dim": f.headDim, "num_local_experts": f.experts,
		"num_experts_per_tok": f.topK, "interleave_moe_layer_step": f.moeStep,
		"max_position_embeddings": f.prompt + f.tokens,
	})
	cfg, err := llama4.ParseConfig(cfgJSON)
	if err != nil {
		return usagef("%v", err)
	}
	threads := f.threads
	if threads == 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	ops := cpu.New(cpu.Config{Threads: threads})
	m, err := llama4.Load(ctx, ops, cfg, llama4.NewRandomWeights(cfg, ops, 1), llama4.Parallel{})
	if err != nil {
		return err
	}
	res := benchResult{Device: ops.Name(), Threads: threads, Layers: f.layers, Hidden: f.hidden, Experts: f.experts,
		Vocab: f.vocab, PromptTokens: f.prompt, DecodeTokens: f.tokens}
	for _, s := range cfg.Tensors() {
		n := int64(2)
		for _, d := range s.Shape {
			n *= int64(d)
		}
		res.WeightBytes += n
	}
	prompt := make([]int, f.prompt)
	for i := range prompt {
		prompt[i] = (i*7919 + 13) % f.vocab
	}
	for r := 0; r < f.runs; r++ {
		prefill, decode, err := benchOnce(ctx, m, ops, prompt, f.tokens)
		if err != nil {
			return err
		}
		if r == 0 || prefill < time.Duration(res.PrefillMS*float64(time.Millisecond)) {
			res.PrefillMS = float64(prefill) / float64(time.Millisecond)
		}
		perTok := float64(decode) / float64(time.Millisecond) / float64(f.tokens)
		if r == 0 || perTok < res.DecodeMSPerTok {
			res.DecodeMSPerTok = perTok
		}
	}
	res.TokensPerSec = 1000 / res.DecodeMSPerTok
	if f.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	_, err = fmt.Fprintf(stdout, "device %s threads %d: %d layers, hidden %d, %d experts, vocab %d, %.1f MiB bf16\n"+
		"prefill %d tokens: %.1f ms\ndecode: %.2f ms/token, %.1f tokens/s\n",
		res.Device, res.Threads, res.Layers, res.Hidden, res.Experts, res.Vocab, float64(res.WeightBytes)/(1<<20),
		res.PromptTokens, res.PrefillMS, res.DecodeMSPerTok, res.TokensPerSec)
	return err
}

// benchOnce runs one prefill and greedy decode steps, returning their wall times.
func benchOnce(ctx context.Context, m *llama4.Model, ops backend.Ops, prompt []int, tokens int) (prefill, decode time.Duration, err error) {
	seq, err := m.NewSequence(len(prompt) + tokens)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	logits, err := m.Forward(ctx, seq, prompt, false)
	if err != nil {
		return 0, 0, err
	}
	row, err := ops.Float32(logits)
	if err != nil {
		return 0, 0, err
	}
	prefill = time.Since(start)
	start = time.Now()
	for i := 0; i < tokens; i++ {
		if logits, err = m.Forward(ctx, seq, []int{sample.Argmax(row)}, false); err != nil {
			return 0, 0, err
		}
		if row, err = ops.Float32(logits); err != nil {
			return 0, 0, err
		}
	}
	return prefill, time.Since(start), nil
}
