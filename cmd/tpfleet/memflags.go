package main

import (
	"flag"
	"strconv"

	"github.com/tpfleet/tpfleet/worker"
)

// memFlags are the memory planner's and the weights' source flags that serve passes to its workers:
// --load-format, --gpu-memory-utilization and --kv-cache-tokens (vLLM's names where vLLM has them); serve's
// --block-size is the block size.
type memFlags struct {
	loadFormat    string
	utilization   float64
	kvCacheTokens int
}

func (m *memFlags) addFlags(fs *flag.FlagSet) {
	fs.StringVar(&m.loadFormat, "load-format", "auto", "where the weights come from: auto (the checkpoint) or dummy (generated from config.json on each rank: no checkpoint needed)")
	fs.Float64Var(&m.utilization, "gpu-memory-utilization", 0, "share of each device's memory (host memory on cpu) for weights, activations and the KV cache (0: 0.9)")
	fs.IntVar(&m.kvCacheTokens, "kv-cache-tokens", 0, "size each worker's KV cache for this many tokens in every layer instead of from memory (0: from memory)")
}

// apply sets a worker's Config from the flags; tokenBudget is the coordinator's --token-budget.
func (m memFlags) apply(c *worker.Config, tokenBudget int) {
	c.LoadFormat, c.GPUMemoryUtilization, c.KVCacheTokens, c.MaxStepTokens =
		m.loadFormat, m.utilization, m.kvCacheTokens, tokenBudget
}

// args are the flags for a worker process (tpfleet worker).
func (m memFlags) args(tokenBudget int) []string {
	a := []string{"--load-format", m.loadFormat}
	if m.utilization != 0 {
		a = append(a, "--gpu-memory-utilization", strconv.FormatFloat(m.utilization, 'g', -1, 64))
	}
	if m.kvCacheTokens != 0 {
		a = append(a, "--kv-cache-tokens", strconv.Itoa(m.kvCacheTokens))
	}
	if tokenBudget != 0 {
		a = append(a, "--max-step-tokens", strconv.Itoa(tokenBudget))
	}
	return a
}
