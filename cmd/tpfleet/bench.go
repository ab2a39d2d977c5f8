package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/memplan"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/model/llama4"
	modelrun "github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

type benchFlags struct {
	layers, hidden, heads, kvHeads, headDim, experts, topK, intermediate, intermediateMLP, vocab, moeStep int
	prompt, tokens, threads, runs, tp, batch, context                                                     int
	device                                                                                                string
	json, profile, offload                                                                                bool
	quant                                                                                                 quantFlags
	// config is a config.json (or its directory) whose shape replaces the shape flags; --layers still
	// overrides its layer count when given.
	config, loadFormat string
	utilization        float64
	prefillChunk       int
}

// benchResult is one measurement; times are the best of the runs (the first run warms up).
type benchResult struct {
	Device      string `json:"device"`
	Card        string `json:"card,omitempty"`
	TP          int    `json:"tp"`
	Threads     int    `json:"threads,omitempty"`
	Layers      int    `json:"layers"`
	Hidden      int    `json:"hidden"`
	Experts     int    `json:"experts"`
	Vocab       int    `json:"vocab"`
	WeightBytes int64  `json:"weight_bytes_bf16"`
	// Format is the quantisable weights' format (--quantization; quant.Format.String), and MemoryBytes the
	// weights' bytes in it (lm_head, embedding, routing weight and norms in bf16).
	Format       string  `json:"format"`
	MemoryBytes  int64   `json:"weight_bytes"`
	PromptTokens int     `json:"prompt_tokens"`
	PrefillMS    float64 `json:"prefill_ms"`
	DecodeTokens int     `json:"decode_tokens"`
	// Batch is the number of sequences of a decode step; each starts with Context cached tokens.
	Batch          int     `json:"batch"`
	Context        int     `json:"context,omitempty"`
	DecodeMSPerTok float64 `json:"decode_ms_per_token"` // per step: one token for each of Batch sequences
	TokensPerSec   float64 `json:"decode_tokens_per_second"`
	// StepBytes is the weight bytes one decode step of Batch sequences must read (attention, dense and
	// shared MLPs, the experts each MoE layer's step routes to, the routing weight, norms, the lm_head,
	// embedding rows), over all ranks, each tensor in the format it is held in (stepBytes). The routed
	// experts are counted as the timed steps chose them: ExpertsRouted is the distinct experts a MoE layer's
	// step routed its tokens to, on average over the steps and layers (from the model's expert counts,
	// read after each step of the warm-up run); StepBytesBound counts min(Batch·top-k, experts) a layer
	// instead, what a step can route to at most (StepBytes when the backend counts no experts).
	StepBytes      int64   `json:"decode_weight_bytes_per_step"`
	ExpertsRouted  float64 `json:"decode_experts_per_moe_layer,omitempty"`
	StepBytesBound int64   `json:"decode_weight_bytes_bound,omitempty"`
	// CopyGBs is the measured device-to-device copy rate (bytes read + written per second / 1e9) on
	// rank 0's GPU; FloorMS is StepBytes / TP / that rate, the memory-bandwidth floor of a decode step.
	CopyGBs       float64 `json:"copy_gb_per_s,omitempty"`
	FloorMS       float64 `json:"decode_floor_ms,omitempty"`
	FloorFraction float64 `json:"decode_fraction_of_floor,omitempty"`
	LoadMS        float64 `json:"load_ms"`
	// Phases are the start-up phases: the process, the device (context, kernel compile or cache hits),
	// the random weights' generation ("weights"), the first prefill.
	Phases []phaseJSON `json:"phases,omitempty"`
	// Graphs is how rank 0's backend ran the decode steps (CUDA graph replays per key), when it reports
	// them (backend.GraphReporter).
	Graphs []backend.GraphStats `json:"graphs,omitempty"`
	// Config is --config's path; Memory rank 0's memory plan after the load (memplan), when the backend
	// reports its memory or the host's is used.
	Config string       `json:"config,omitempty"`
	Memory *benchMemory `json:"memory,omitempty"`
	// ProfileDecode and ProfilePrefill are rank 0's GPU time per operation (--profile): one decode step
	// (averaged over profileSteps) and one prefill of the prompt, run eagerly with an event after each
	// operation; *GPUMS is the whole step's GPU time.
	ProfileDecode       []profileRow `json:"profile_decode,omitempty"`
	ProfileDecodeGPUMS  float64      `json:"profile_decode_gpu_ms,omitempty"`
	ProfilePrefill      []profileRow `json:"profile_prefill,omitempty"`
	ProfilePrefillGPUMS float64      `json:"profile_prefill_gpu_ms,omitempty"`
	// PrefillHost and DecodeHost are what rank 0's host side did in the last run's prefill and, per step,
	// in its decode steps (hostCounts): where a step's wall time exceeds its GPU time (the profile), the
	// waits, allocations and collections say where the rest went.
	PrefillHost *hostCounts `json:"prefill_host,omitempty"`
	DecodeHost  *hostCounts `json:"decode_host_per_step,omitempty"`
	// Offload is --offload-experts: the routed experts in pinned host memory, the chosen ones copied to
	// the GPU by every MoE layer (eager steps). OffloadStepBytes is the expert bytes a decode step of
	// Batch sequences copies (at most Batch·top-k experts a MoE layer, in the format they are held in),
	// OffloadGBs the measured pinned-host-to-device copy rate, and OffloadFloorMS their quotient: the
	// PCIe floor of a step. OffloadCopied and OffloadCalls are what the runs (prefills included) copied.
	Offload          bool    `json:"offload_experts,omitempty"`
	OffloadStepBytes int64   `json:"offload_bytes_per_step,omitempty"`
	OffloadGBs       float64 `json:"offload_gb_per_s,omitempty"`
	OffloadFloorMS   float64 `json:"offload_floor_ms,omitempty"`
	OffloadCopied    int64   `json:"offload_copied_bytes,omitempty"`
	OffloadCalls     int64   `json:"offload_calls,omitempty"`
}

// offloadMeter is a backend that offloads experts and reports its copies and the host-to-device rate
// (cuda).
type offloadMeter interface {
	OffloadCopied() (calls, bytes int64)
	HostCopyRate() (float64, error)
}

// hostCounts is what rank 0's host did over a timed span (per step for decode): its waits for the
// device, device allocations and the collections the backend forced (backend.HostStats), and the Go
// runtime's collections in all.
type hostCounts struct {
	Syncs      float64 `json:"syncs"`
	Allocs     float64 `json:"allocs"`
	ForcedGCs  float64 `json:"forced_gcs"`
	ForcedGCMS float64 `json:"forced_gc_ms"`
	GoGCs      float64 `json:"go_gcs"`
}

// hostMeter reads rank 0's host counters around the timed spans of a run, outside their timing; prefill
// and decode hold the latest run's.
type hostMeter struct {
	rep             backend.HostReporter // nil when the backend counts nothing: Go's collections only
	prefill, decode *hostCounts
}

type hostReading struct {
	stats backend.HostStats
	gcs   uint32
}

// read takes a reading (a nil meter reads nothing).
func (m *hostMeter) read() hostReading {
	if m == nil {
		return hostReading{}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r := hostReading{gcs: ms.NumGC}
	if m.rep != nil {
		r.stats = m.rep.HostStats()
	}
	return r
}

// since returns the counts from r0 to now, divided by steps.
func (m *hostMeter) since(r0 hostReading, steps int) *hostCounts {
	if m == nil {
		return nil
	}
	r := m.read()
	d := r.stats.Sub(r0.stats)
	n := float64(max(steps, 1))
	return &hostCounts{Syncs: float64(d.Syncs) / n, Allocs: float64(d.Allocs) / n, ForcedGCs: float64(d.Collections) / n,
		ForcedGCMS: float64(d.CollectionTime) / float64(time.Millisecond) / n, GoGCs: float64(r.gcs-r0.gcs) / n}
}

// profileRow is one line of a GPU profile: an operation kind, its calls and GPU time per step.
type profileRow struct {
	Op    string  `json:"op"`
	Calls float64 `json:"calls"`
	MS    float64 `json:"ms"`
}

// profileSteps is how many decode steps --profile averages.
const profileSteps = 4

// randomFiller is implemented by backends that can fill random bf16 weights themselves (cuda): bench's
// random models then start in well under a second instead of generating gigabytes on the host.
type randomFiller interface {
	RandomBF16(shape []int, mean, std float32, seed uint64) (backend.Tensor, error)
}

// randomQuantFiller is implemented by backends that can make random quantised weights themselves (cuda):
// random values as RandomBF16's, quantised on the device by quant.Quantize's rules.
type randomQuantFiller interface {
	RandomQuantized(f quant.Format, shape []int, inputDim int, mean, std float32, seed uint64) (backend.Tensor, error)
}

// benchWeights are random bf16 weights for one rank, scaled like llama4.RandomWeights (norm weights
// near 1, matrices ~ N(0, 1/fan_in)), cut for the rank by a shard manifest when tp > 1. They are
// generated on the device when the backend is a randomFiller and the tensor stays bf16 (a
// randomQuantFiller for the quantisable ones in a quantised format), else on the host (ReadTensor) and
// loaded through a run.RankWeights, which quantises the quantisable ones to format exactly as a
// checkpoint's are at load.
type benchWeights struct {
	ops    backend.Ops
	cfg    llama4.Config
	man    *shard.Manifest // nil for tp = 1
	seed   uint64
	specs  map[string]model.TensorSpec
	format quant.Format
	rw     *modelrun.RankWeights // over w itself
}

func newBenchWeights(ops backend.Ops, cfg llama4.Config, man *shard.Manifest, specs map[string]model.TensorSpec, f quant.Format) *benchWeights {
	w := &benchWeights{ops: ops, cfg: cfg, man: man, seed: 1, specs: specs, format: f}
	w.rw = modelrun.NewRankWeights(w, ops).WithFormat(cfg, f)
	return w
}

var _ modelrun.Slices = (*benchWeights)(nil)

// locate returns name's spec, this rank's shape and layout of it, and the hash of its name (tensors'
// random streams differ by it).
func (w *benchWeights) locate(name string) (model.TensorSpec, []int, model.Layout, uint64, error) {
	spec, ok := w.specs[name]
	if !ok {
		return spec, nil, model.Replicated, 0, fmt.Errorf("bench weights: no tensor %s in this configuration", name)
	}
	local, lay := spec.Shape, model.Replicated
	if w.man != nil {
		ts, ok := w.man.Lookup(w.cfg.Prefix + name)
		if !ok {
			return spec, nil, lay, 0, fmt.Errorf("bench weights: %s is not in rank %d's manifest", name, w.man.Rank)
		}
		local, lay = ts.LocalShape, ts.Layout
	}
	var h uint64 = 14695981039346656037 // FNV-1a of the name, so tensors differ
	for i := 0; i < len(name); i++ {
		h = (h ^ uint64(name[i])) * 1099511628211
	}
	return spec, local, lay, h, nil
}

// ReadTensor generates this rank's part of name on the host, bf16.
func (w *benchWeights) ReadTensor(name string) (safetensors.DType, []int, []byte, model.Layout, error) {
	spec, local, lay, h, err := w.locate(name)
	if err != nil {
		return safetensors.BF16, nil, nil, lay, err
	}
	mean, std := llama4.RandomScale(spec)
	n := 1
	for _, d := range local {
		n *= d
	}
	rng := rand.New(rand.NewPCG(w.seed, h))
	data := make([]byte, 2*n)
	for i := range n {
		v := safetensors.Float32ToBF16(float32(mean + std*rng.NormFloat64()))
		data[2*i], data[2*i+1] = byte(v), byte(v>>8)
	}
	return safetensors.BF16, local, data, lay, nil
}

func (w *benchWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	spec, local, lay, h, err := w.locate(name)
	if err != nil {
		return nil, lay, err
	}
	quantized := w.format.Quantized() && spec.Quantizable
	if rf, ok := w.ops.(randomFiller); ok && !quantized {
		mean, std := llama4.RandomScale(spec)
		t, err := rf.RandomBF16(local, float32(mean), float32(std), w.seed^h)
		return t, lay, err
	}
	if rq, ok := w.ops.(randomQuantFiller); ok && quantized {
		mean, std := llama4.RandomScale(spec)
		t, err := rq.RandomQuantized(w.format, local, spec.InputDim, float32(mean), float32(std), w.seed^h)
		return t, lay, err
	}
	return w.rw.Load(ctx, name)
}

// specCatalog is a shard.Catalog of a configuration's tensors, all bf16, for planning random weights.
type specCatalog struct {
	prefix string
	specs  []model.TensorSpec
}

func (c specCatalog) Names() []string {
	names := make([]string, len(c.specs))
	for i, s := range c.specs {
		names[i] = c.prefix + s.Name
	}
	return names
}

func (c specCatalog) Info(name string) (safetensors.TensorInfo, error) {
	for _, s := range c.specs {
		if c.prefix+s.Name == name {
			n := int64(2)
			for _, d := range s.Shape {
				n *= int64(d)
			}
			return safetensors.TensorInfo{Name: name, DType: safetensors.BF16, Shape: s.Shape, End: n}, nil
		}
	}
	return safetensors.TensorInfo{}, fmt.Errorf("no tensor %s", name)
}

// stepBytes is the weight bytes a decode step of batch sequences reads when each MoE layer's step routes
// its tokens to experts distinct experts (on average; at most min(batch·top-k, E), maxRouted): every
// tensor, except the routed experts (experts of E per MoE layer) and the embedding table (one row a
// sequence), each in the format it is held in: the quantisable ones in f (fp8: a byte an element plus
// float32 scales; int4: half a byte plus bf16 scales, quant.Format.Bytes), the others (lm_head, embedding,
// routing weight, norms) bf16. Scales are counted for whole tensors (TP = 1).
func stepBytes(cfg llama4.Config, batch int, experts float64, f quant.Format) int64 {
	var total int64
	for _, s := range cfg.Tensors() {
		n := tensorBytes(s, f)
		switch s.Kind {
		case model.KindExperts:
			n = routedBytes(n, cfg.NumExperts, experts)
		case model.KindEmbedding:
			n = 2 * int64(cfg.HiddenSize) * int64(batch)
		}
		total += n
	}
	return total
}

// maxRouted is the most distinct experts a MoE layer's step of batch sequences can route to.
func maxRouted(cfg llama4.Config, batch int) float64 {
	return float64(min(batch*cfg.TopK, cfg.NumExperts))
}

// routedBytes is the part of a stacked experts tensor of n bytes (E experts) that experts of them take.
func routedBytes(n int64, E int, experts float64) int64 {
	return int64(math.Round(float64(n/int64(E)) * experts))
}

// offloadStepBytes is the routed experts' part of stepBytes: what a decode step copies to the GPU when the
// experts are offloaded (the distinct experts a layer routes to, as stepBytes counts them).
func offloadStepBytes(cfg llama4.Config, experts float64, f quant.Format) int64 {
	var total int64
	for _, s := range cfg.Tensors() {
		if s.Kind == model.KindExperts {
			total += routedBytes(tensorBytes(s, f), cfg.NumExperts, experts)
		}
	}
	return total
}

// routeCensus counts the distinct experts the MoE layers of one rank's model route each decode step's
// tokens to, from the model's cumulative expert loads (llama4.Model.ExpertLoad, one count per layer and
// expert) read before the first step and after each: an expert whose count grew was routed to. The reads
// wait for nothing but the counters (the steps are waited for already); took is their time, which the
// decode time does not include.
type routeCensus struct {
	load   func() [][]int64
	last   [][]int64
	steps  int           // steps observed
	routed int64         // (layer, expert) pairs routed to, summed over the steps
	layers int           // MoE layers (those with counts)
	took   time.Duration // spent reading the loads
}

// observe reads the loads, and after the first read counts the step that ran since the last.
func (c *routeCensus) observe() {
	start := time.Now()
	load := c.load()
	c.took += time.Since(start)
	if c.last != nil && len(load) == len(c.last) {
		c.steps++
		c.routed += int64(distinctRouted(c.last, load))
	}
	c.layers = 0
	for _, l := range load {
		if l != nil {
			c.layers++
		}
	}
	c.last = load
}

// distinctRouted counts the (layer, expert) pairs whose count grew from before to after.
func distinctRouted(before, after [][]int64) int {
	n := 0
	for l := range after {
		if l >= len(before) || len(before[l]) != len(after[l]) {
			continue
		}
		for e, c := range after[l] {
			if c > before[l][e] {
				n++
			}
		}
	}
	return n
}

// perLayer is the mean distinct experts a MoE layer's step routed to, or 0 when nothing was counted
// (a backend that counts no experts reports zeros).
func (c *routeCensus) perLayer() float64 {
	if c == nil || c.steps == 0 || c.layers == 0 || c.routed == 0 {
		return 0
	}
	return float64(c.routed) / float64(c.steps) / float64(c.layers)
}

// tensorBytes is the size of a whole tensor held in f (bf16 unless it is quantisable).
func tensorBytes(s model.TensorSpec, f quant.Format) int64 {
	if !s.Quantizable {
		f = quant.Format{}
	}
	return f.Bytes(s.Shape, s.InputDim)
}

// runBench times prefill and batch-1 decode of a random model of the given shape (no checkpoint needed).
//
// With --addr it is the serving benchmark instead (loadbench.go): load on a running coordinator.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if isLoadBench(args) {
		return runLoadBench(ctx, args, stdout, stderr)
	}
	var f benchFlags
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.String("addr", "", "benchmark a running coordinator at host:port instead: TTFT, ITL, end-to-end latency, tokens/s (see tpfleet bench --addr X -h)")
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
	fs.IntVar(&f.tokens, "tokens", 32, "decode steps")
	fs.IntVar(&f.batch, "batch", 1, "sequences decoded together in each step")
	fs.IntVar(&f.context, "context", 128, "cached tokens of each sequence before the timed decode steps when --batch > 1")
	fs.IntVar(&f.threads, "threads", 0, "CPU threads (0: all cores)")
	fs.IntVar(&f.runs, "runs", 3, "repetitions; the best is reported (the first also warms up)")
	fs.StringVar(&f.device, "device", "cpu", deviceChoices()+" (a GPU backend: rank r of --tp N on GPU r)")
	fs.IntVar(&f.tp, "tp", 1, "tensor-parallel ranks in this process (HF's tp plan)")
	fs.BoolVar(&f.json, "json", false, "print one JSON object")
	f.quant.addFlags(fs, "")
	fs.StringVar(&f.config, "config", "", "a config.json (or its directory), e.g. testdata/configs/scout: its shape replaces the shape flags (--layers still overrides the layer count)")
	fs.StringVar(&f.loadFormat, "load-format", dummy.LoadFormat, "bench's weights are always generated (dummy, as vLLM names it); no other value is accepted")
	fs.IntVar(&f.prefillChunk, "prefill-chunk", 0, "run the prompt in pieces of at most this many tokens (chunked prefill: long prompts in less activation memory; 0: whole)")
	fs.Float64Var(&f.utilization, "gpu-memory-utilization", 0, "share of the device's memory the memory plan may use (0: 0.9)")
	fs.BoolVar(&f.profile, "profile", false, "also profile one prefill and the decode steps on the GPU (time per kernel; backends that profile, e.g. cuda)")
	fs.BoolVar(&f.offload, "offload-experts", false, "keep the routed experts in pinned host memory and copy the chosen ones to the GPU each step (cuda; steps run without CUDA graphs)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if f.prefillChunk < 0 {
		return usagef("--prefill-chunk %d must not be negative", f.prefillChunk)
	}
	if f.runs < 1 || f.prompt < 1 || f.tokens < 1 || f.tp < 1 || f.batch < 1 || f.context < 1 {
		return usagef("--runs, --prompt, --tokens, --tp, --batch and --context must be positive")
	}
	if f.loadFormat != dummy.LoadFormat {
		return usagef("--load-format %q: bench generates its weights; only %s is accepted", f.loadFormat, dummy.LoadFormat)
	}
	layersSet := false
	fs.Visit(func(fl *flag.Flag) { layersSet = layersSet || fl.Name == "layers" })
	if err := checkDevice(f.device); err != nil {
		return err
	}
	format, err := f.quant.format()
	if err != nil {
		return err
	}
	cfgJSON, _ := json.Marshal(map[string]any{
		"model_type": "llama4_text", "vocab_size": f.vocab, "hidden_size": f.hidden, "intermediate_size": f.intermediate,
		"intermediate_size_mlp": f.intermediateMLP, "num_hidden_layers": f.layers, "num_attention_heads": f.heads,
		"num_key_value_heads": f.kvHeads, "head_dim": f.headDim, "num_local_experts": f.experts,
		"num_experts_per_tok": f.topK, "interleave_moe_layer_step": f.moeStep,
		"max_position_embeddings": max(f.prompt, f.context) + f.tokens,
	})
	cfg, err := llama4.ParseConfig(cfgJSON)
	if err != nil {
		return usagef("%v", err)
	}
	if f.config != "" {
		if cfg, err = benchConfig(f.config, f.layers, layersSet); err != nil {
			return err
		}
		f.layers, f.hidden, f.experts, f.vocab = cfg.NumLayers, cfg.HiddenSize, cfg.NumExperts, cfg.VocabSize
	}
	threads := f.threads
	if threads == 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	mf := modelFlags{device: f.device, threads: threads, par: parallelFlags{tp: f.tp, plan: "tp", rank: -1}}
	phases := phase.NewRecorder(phase.ProcessStart())
	start := time.Now()
	g, allOps, _, err := newRankOps(ctx, mf)
	if err != nil {
		return err
	}
	defer g.Close()
	if sr, ok := allOps[0].(backend.StartupReporter); ok {
		phases.AddAll(sr.StartupPhases())
	} else {
		phases.Since("device", start, fmt.Sprintf("%d ranks", len(allOps)))
	}
	weightsStart := time.Now()
	for _, ops := range allOps {
		if err := backend.CheckQuantized(ops, format); err != nil {
			return err
		}
	}
	var mans []shard.Manifest
	if f.tp > 1 {
		plan, _ := shard.NamedPlan(cfg, "tp")
		if mans, err = shard.NewManifests(cfg, specCatalog{prefix: cfg.Prefix, specs: cfg.Tensors()}, plan, f.tp); err != nil {
			return err
		}
	}
	specs := map[string]model.TensorSpec{}
	for _, s := range cfg.Tensors() {
		specs[s.Name] = s
	}
	for r, ops := range allOps {
		var man *shard.Manifest
		if mans != nil {
			man = &mans[r]
		}
		var w modelrun.Weights = newBenchWeights(ops, cfg, man, specs, format)
		if f.offload {
			if w, err = modelrun.NewOffloadWeights(w, cfg, ops); err != nil {
				return err
			}
		}
		m, err := cfg.Open(ctx, ops, w, modelrun.Parallel{Comm: g.comms[r]})
		if err != nil {
			return fmt.Errorf("rank %d: %w", r, err)
		}
		g.ranks = append(g.ranks, m)
	}
	for _, ops := range allOps {
		if s, ok := ops.(backend.Synchronizer); ok {
			if err := s.Synchronize(); err != nil {
				return err
			}
		}
	}
	phases.Since(phase.Weights, weightsStart, "random weights generated on the device (no checkpoint read)")
	res := benchResult{Device: allOps[0].Name(), TP: f.tp, Layers: f.layers, Hidden: f.hidden, Experts: f.experts,
		Vocab: f.vocab, PromptTokens: f.prompt, DecodeTokens: f.tokens, Batch: f.batch, Format: format.String(),
		LoadMS: float64(time.Since(start)) / float64(time.Millisecond)}
	if _, ok := allOps[0].(backend.Threader); ok {
		res.Threads = threads
	}
	for _, s := range cfg.Tensors() {
		res.WeightBytes += tensorBytes(s, quant.Format{})
		res.MemoryBytes += tensorBytes(s, format)
	}
	if d, ok := allOps[0].(backend.Describer); ok {
		res.Card = d.Describe().Name
	}
	res.Config = f.config
	var plan *memplan.Plan
	if plan, err = benchPlan(cfg, allOps[0], f, format, mans); err != nil {
		return err
	}
	if plan != nil {
		res.Memory = &benchMemory{KVBlocks: plan.Blocks, BlockSize: plan.BlockSize, KVTokens: plan.Tokens, KVBytes: plan.KV,
			TokenBytes: plan.TokenBytes, LongestContext: plan.Longest, Concurrency: plan.Concurrency, ContextFor: plan.MaxContext}
		if plan.Longest == math.MaxInt {
			res.Memory.LongestContext = -1
		}
	}
	var bw float64 // bytes per second of a device-to-device copy; 0 for a backend that does not measure it
	if b, ok := allOps[0].(backend.BandwidthMeter); ok {
		if bw, err = b.CopyBandwidth(1<<30, 20); err != nil {
			return err
		}
		res.CopyGBs = bw / 1e9
	}
	var meter offloadMeter
	if f.offload {
		m, ok := allOps[0].(offloadMeter)
		if !ok {
			return fmt.Errorf("--offload-experts: the %s backend does not report its copies", allOps[0].Name())
		}
		meter = m
		rate, err := meter.HostCopyRate()
		if err != nil {
			return err
		}
		res.Offload, res.OffloadGBs = true, rate/1e9
		res.OffloadCalls, res.OffloadCopied = meter.OffloadCopied()
	}
	prompt := make([]int, f.prompt)
	for i := range prompt {
		prompt[i] = (i*7919 + 13) % f.vocab
	}
	if f.batch > 1 {
		res.Context = f.context
	}
	// The first run (the warm-up) also counts the experts each step routes to, for the floor: the runs
	// route alike (the same prompt, context and tokens on fresh sequences, deterministic kernels).
	census := &routeCensus{load: llama4.AsModel(g.ranks[0]).ExpertLoad}
	host := &hostMeter{}
	host.rep, _ = allOps[0].(backend.HostReporter)
	for r := 0; r < f.runs; r++ {
		runStart := time.Now()
		c := census
		if r > 0 {
			c = nil
		}
		prefill, decode, err := benchOnce(ctx, g, allOps, prompt, f.tokens, f.batch, f.context, f.prefillChunk, c, host)
		if err != nil {
			return err
		}
		if r == 0 {
			phases.Add(phase.FirstStep, runStart, prefill, fmt.Sprintf("prefill of %d tokens", f.prompt))
			phases.Add(phase.Ready, phases.Start(), runStart.Add(prefill).Sub(phases.Start()), "process start to the first prefill's end")
		}
		if r == 0 || prefill < time.Duration(res.PrefillMS*float64(time.Millisecond)) {
			res.PrefillMS = float64(prefill) / float64(time.Millisecond)
		}
		perTok := float64(decode) / float64(time.Millisecond) / float64(f.tokens)
		if r == 0 || perTok < res.DecodeMSPerTok {
			res.DecodeMSPerTok = perTok
		}
	}
	res.PrefillHost, res.DecodeHost = host.prefill, host.decode
	experts := maxRouted(cfg, f.batch)
	res.StepBytesBound = stepBytes(cfg, f.batch, experts, format)
	if cfg.NumExperts > 0 && slices.Contains(cfg.MoE, true) {
		if routed := census.perLayer(); routed > 0 {
			experts, res.ExpertsRouted = routed, routed
		}
	}
	res.StepBytes = stepBytes(cfg, f.batch, experts, format)
	if bw > 0 {
		res.FloorMS = float64(res.StepBytes) / float64(f.tp) / bw * 1e3
	}
	if meter != nil {
		calls, bytes := meter.OffloadCopied()
		res.OffloadCalls, res.OffloadCopied = calls-res.OffloadCalls, bytes-res.OffloadCopied
		res.OffloadStepBytes = offloadStepBytes(cfg, experts, format)
		res.OffloadFloorMS = float64(res.OffloadStepBytes) / float64(f.tp) / (res.OffloadGBs * 1e9) * 1e3
	}
	if b, ok := allOps[0].(backend.GraphReporter); ok {
		res.Graphs = b.Graphs()
	}
	if _, ok := allOps[0].(backend.Profiler); ok && f.profile {
		if err := benchProfile(ctx, g, allOps, prompt, &res); err != nil {
			return fmt.Errorf("profile: %w", err)
		}
	}
	res.TokensPerSec = 1000 * float64(f.batch) / res.DecodeMSPerTok
	if res.FloorMS > 0 {
		res.FloorFraction = res.FloorMS / res.DecodeMSPerTok
	}
	res.Phases = phasesJSON(phases)
	if f.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	if backend.HasDevices(f.device) {
		fmt.Fprint(stderr, phases.Table())
	}
	_, err = fmt.Fprintf(stdout, "device %s %s tp %d: %d layers, hidden %d, %d experts, vocab %d, %.1f MiB bf16, %.1f MiB as %s (loaded in %.0f ms)\n"+
		"prefill %d tokens: %.1f ms\ndecode batch %d: %.2f ms/step, %.1f tokens/s\n",
		res.Device, res.Card, res.TP, res.Layers, res.Hidden, res.Experts, res.Vocab, float64(res.WeightBytes)/(1<<20), float64(res.MemoryBytes)/(1<<20), res.Format, res.LoadMS,
		res.PromptTokens, res.PrefillMS, res.Batch, res.DecodeMSPerTok, res.TokensPerSec)
	if err == nil && plan != nil {
		_, err = fmt.Fprintf(stdout, "memory plan of rank 0 after the load:\n%s", plan.Table())
	}
	if err == nil && res.Offload {
		_, err = fmt.Fprintf(stdout, "experts offloaded: %.1f MiB of experts copied a step / %d rank(s) at %.1f GB/s (measured host to device) = %.3f ms PCIe floor; runs copied %.1f MiB in %d calls\n",
			float64(res.OffloadStepBytes)/(1<<20), res.TP, res.OffloadGBs, res.OffloadFloorMS, float64(res.OffloadCopied)/(1<<20), res.OffloadCalls)
	}
	if err == nil && res.FloorMS > 0 {
		routed := ""
		if res.ExpertsRouted > 0 {
			routed = fmt.Sprintf(" (%.2f experts a MoE layer, as the steps routed)", res.ExpertsRouted)
		}
		_, err = fmt.Fprintf(stdout, "decode floor: %.1f MiB of weights a step%s / %d rank(s) at %.0f GB/s (measured copy) = %.3f ms; decode at %.0f %% of it\n",
			float64(res.StepBytes)/(1<<20), routed, res.TP, res.CopyGBs, res.FloorMS, 100*res.FloorFraction)
	}
	for _, h := range []struct {
		name string
		c    *hostCounts
	}{{"prefill", res.PrefillHost}, {"decode step", res.DecodeHost}} {
		if err == nil && h.c != nil {
			_, err = fmt.Fprintf(stdout, "host of a %s (rank 0, last run): %.1f waits for the device, %.1f device allocations, %.1f forced collections (%.2f ms), %.1f Go collections\n",
				h.name, h.c.Syncs, h.c.Allocs, h.c.ForcedGCs, h.c.ForcedGCMS, h.c.GoGCs)
		}
	}
	for _, p := range []struct {
		name string
		gpu  float64
		rows []profileRow
	}{{"decode step", res.ProfileDecodeGPUMS, res.ProfileDecode}, {"prefill", res.ProfilePrefillGPUMS, res.ProfilePrefill}} {
		if err != nil || p.rows == nil {
			continue
		}
		floor := ""
		if p.name == "decode step" && res.FloorMS > 0 {
			floor = fmt.Sprintf(" (the decode floor: %.3f ms)", res.FloorMS)
		}
		_, err = fmt.Fprintf(stdout, "profile of one %s (rank 0, eager): %.3f ms of GPU time%s\n", p.name, p.gpu, floor)
		for _, r := range p.rows {
			if err == nil {
				_, err = fmt.Fprintf(stdout, "  %8.3f ms %6.1f calls  %s\n", r.MS, r.Calls, r.Op)
			}
		}
	}
	return err
}

// benchOnce runs one prefill (in pieces of at most chunk tokens; 0: whole) and tokens decode steps on
// every rank of g, returning their wall times; meter (nil: none) takes rank 0's host counts of each.
// Each decode step feeds a fixed token (no host argmax) and waits for the step's logits on the device;
// the prefill waits for its logits too. With batch > 1 the decode steps run batch sequences of context
// cached tokens each (prefilled untimed) through one ForwardBatch.
func benchOnce(ctx context.Context, g *group, ops []backend.Ops, prompt []int, tokens, batch, context, chunk int, census *routeCensus,
	meter *hostMeter) (prefill, decode time.Duration, err error) {
	seqs := make([]*llama4.Sequence, len(g.ranks))
	for r, m := range g.ranks {
		if seqs[r], err = llama4.AsModel(m).NewSequence(len(prompt) + tokens); err != nil {
			return 0, 0, err
		}
	}
	wait := func(r int, logits backend.Tensor) error {
		if s, ok := ops[r].(backend.Synchronizer); ok {
			return s.Synchronize()
		}
		_, err := ops[r].Float32(logits)
		return err
	}
	h := meter.read()
	start := time.Now()
	err = g.run(func(r int, rm modelrun.Model) error {
		m := llama4.AsModel(rm) // the benchmark times the Llama 4 model itself
		piece := len(prompt)
		if chunk > 0 {
			piece = chunk
		}
		var logits backend.Tensor
		var err error // each rank's own: the ranks run concurrently
		for at := 0; at < len(prompt); at += piece {
			if logits, err = m.Forward(ctx, seqs[r], prompt[at:min(at+piece, len(prompt))], false); err != nil {
				return err
			}
		}
		return wait(r, logits)
	})
	if err != nil {
		return 0, 0, err
	}
	prefill = time.Since(start)
	if meter != nil {
		meter.prefill = meter.since(h, 1)
	}
	vocab := g.Info().VocabSize
	if batch > 1 {
		d, err := benchBatchDecode(ctx, g, ops, wait, tokens, batch, context, chunk, vocab, census, meter)
		return prefill, d, err
	}
	observe := census.observer()
	h = meter.read()
	start = time.Now()
	err = g.run(func(r int, rm modelrun.Model) error {
		m := llama4.AsModel(rm) // the benchmark times the Llama 4 model itself
		observe(r)
		for i := 0; i < tokens; i++ {
			logits, err := m.Forward(ctx, seqs[r], []int{(i*104729 + 7) % vocab}, false)
			if err != nil {
				return err
			}
			if err := wait(r, logits); err != nil {
				return err
			}
			observe(r)
		}
		return nil
	})
	if err != nil {
		return 0, 0, errors.Join(err)
	}
	decode = time.Since(start) - census.spent()
	if meter != nil {
		meter.decode = meter.since(h, tokens)
	}
	return prefill, decode, nil
}

// observer returns the decode loops' hook: rank 0 observes the census after each step (a nil census
// observes nothing).
func (c *routeCensus) observer() func(rank int) {
	return func(rank int) {
		if c != nil && rank == 0 {
			c.observe()
		}
	}
}

// spent is the time the census took, which the decode time leaves out.
func (c *routeCensus) spent() time.Duration {
	if c == nil {
		return 0
	}
	return c.took
}

// benchProfile profiles, on every rank, a prefill of prompt and profileSteps decode steps after it, and
// keeps rank 0's tables in res.
func benchProfile(ctx context.Context, g *group, ops []backend.Ops, prompt []int, res *benchResult) error {
	vocab := g.Info().VocabSize
	return g.run(func(r int, rm modelrun.Model) error {
		m := llama4.AsModel(rm) // the benchmark times the Llama 4 model itself
		b, ok := ops[r].(backend.Profiler)
		if !ok {
			return fmt.Errorf("rank %d: --profile needs a backend that profiles its device (%s does not)", r, ops[r].Name())
		}
		seq, err := m.NewSequence(len(prompt) + profileSteps)
		if err != nil {
			return err
		}
		prefill, prefillGPU, err := b.Profile(func() error {
			_, err := m.Forward(ctx, seq, prompt, false)
			return err
		})
		if err != nil {
			return err
		}
		decode, decodeGPU, err := b.Profile(func() error {
			for i := 0; i < profileSteps; i++ {
				if _, err := m.Forward(ctx, seq, []int{(i*104729 + 7) % vocab}, false); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil || r != 0 {
			return err
		}
		res.ProfilePrefill, res.ProfilePrefillGPUMS = profileRows(prefill, 1), ms(prefillGPU)
		res.ProfileDecode, res.ProfileDecodeGPUMS = profileRows(decode, profileSteps), ms(decodeGPU)/profileSteps
		return nil
	})
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func profileRows(entries []backend.ProfileEntry, steps int) []profileRow {
	rows := make([]profileRow, len(entries))
	for i, e := range entries {
		rows[i] = profileRow{Op: e.Op, Calls: float64(e.Calls) / float64(steps), MS: ms(e.Device) / float64(steps)}
	}
	return rows
}

// benchBatchDecode times tokens decode steps of batch sequences that each hold context cached tokens
// (meter, when not nil, takes rank 0's host counts of the steps).
func benchBatchDecode(ctx context.Context, g *group, ops []backend.Ops, wait func(int, backend.Tensor) error,
	tokens, batch, context, chunk, vocab int, census *routeCensus, meter *hostMeter) (time.Duration, error) {
	seqs := make([][]*llama4.Sequence, len(g.ranks))
	prefill := make([][]int, batch)
	for b := range prefill {
		for i := 0; i < context; i++ {
			prefill[b] = append(prefill[b], (b*7919+i*31+3)%vocab)
		}
	}
	err := g.run(func(r int, rm modelrun.Model) error {
		m := llama4.AsModel(rm) // the benchmark times the Llama 4 model itself
		for b := 0; b < batch; b++ {
			s, err := m.NewSequence(context + tokens)
			if err != nil {
				return err
			}
			seqs[r] = append(seqs[r], s)
		}
		// One sequence's context at a time (in pieces of chunk with --prefill-chunk): the whole batch's
		// contexts in one step would need batch×context tokens of activations (16×4096 ran a full-size
		// Scout on an H100 out of memory).
		var logits backend.Tensor
		for b, s := range seqs[r] {
			piece := len(prefill[b])
			if chunk > 0 {
				piece = min(piece, chunk)
			}
			for at := 0; at < len(prefill[b]); at += piece {
				var err error
				if logits, err = m.Forward(ctx, s, prefill[b][at:min(at+piece, len(prefill[b]))], false); err != nil {
					return err
				}
			}
		}
		if logits == nil {
			return nil
		}
		return wait(r, logits)
	})
	if err != nil {
		return 0, err
	}
	observe := census.observer()
	h := meter.read()
	start := time.Now()
	err = g.run(func(r int, rm modelrun.Model) error {
		m := llama4.AsModel(rm) // the benchmark times the Llama 4 model itself
		observe(r)
		ids := make([][]int, batch)
		for i := 0; i < tokens; i++ {
			for b := range ids {
				ids[b] = []int{(i*104729 + b*13 + 7) % vocab}
			}
			logits, err := m.ForwardBatch(ctx, seqs[r], ids, false)
			if err != nil {
				return err
			}
			if err := wait(r, logits); err != nil {
				return err
			}
			observe(r)
		}
		return nil
	})
	d := time.Since(start) - census.spent()
	if meter != nil && err == nil {
		meter.decode = meter.since(h, tokens)
	}
	return d, err
}

// benchMemory is rank 0's memory plan in bench's JSON (memplan.Plan): KV blocks after the weights, the
// tokens every layer holds, the longest context alone (-1: unbounded) and the concurrency at ContextFor
// tokens (the prompt or --context, and the decode steps).
type benchMemory struct {
	KVBlocks       int     `json:"kv_blocks"`
	BlockSize      int     `json:"block_size"`
	KVTokens       int     `json:"kv_tokens"`
	KVBytes        int64   `json:"kv_bytes"`
	TokenBytes     int64   `json:"kv_bytes_per_token"`
	LongestContext int     `json:"longest_context"`
	ContextFor     int     `json:"concurrency_context"`
	Concurrency    float64 `json:"concurrency"`
}

// benchConfig reads --config (a config.json or its directory); with layersSet, the first layers layers
// only (their RoPE, chunking and MoE pattern as the checkpoint's).
func benchConfig(path string, layers int, layersSet bool) (llama4.Config, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "config.json")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return llama4.Config{}, usagef("--config: %v", err)
	}
	cfg, err := llama4.ParseConfig(data)
	if err != nil {
		return llama4.Config{}, usagef("--config %s: %v", path, err)
	}
	if layersSet {
		if layers < 1 || layers > cfg.NumLayers {
			return llama4.Config{}, usagef("--layers %d: the config has %d", layers, cfg.NumLayers)
		}
		cfg.NumLayers, cfg.UseRoPE, cfg.Chunked, cfg.MoE = layers, cfg.UseRoPE[:layers], cfg.Chunked[:layers], cfg.MoE[:layers]
	}
	// bench runs the text model: the weights are named without the multimodal prefix.
	cfg.Prefix = ""
	return cfg, cfg.Validate()
}

// benchPlan is rank 0's memory plan after the load: its weights in format, the device's memory as it
// reports it now (the host's for a backend without), activations of the prefill. Nil for a backend that
// reports no memory (the CPU: its weights share the host with everything else).
func benchPlan(cfg llama4.Config, ops backend.Ops, f benchFlags, format quant.Format, mans []shard.Manifest) (*memplan.Plan, error) {
	m, ok := ops.(backend.MemoryReporter)
	if !ok {
		return nil, nil
	}
	free, total, err := m.DeviceMemory()
	if err != nil {
		return nil, err
	}
	elem := 2
	if k, ok := ops.(backend.KVSizer); ok {
		elem = k.KVElementBytes()
	}
	geom, err := memplan.GeometryOf(cfg, f.tp, elem, 0)
	if err != nil {
		return nil, err
	}
	var weights int64
	if mans != nil {
		weights = memplan.WeightBytes(cfg, mans[0], format)
	} else {
		for _, s := range cfg.Tensors() {
			weights += tensorBytes(s, format)
		}
	}
	step := f.prompt // the largest step: the prompt, or its largest piece
	if f.prefillChunk > 0 {
		step = min(step, f.prefillChunk)
	}
	p, err := memplan.New(memplan.Input{Geometry: geom, Weights: weights, Activations: cfg.StepBytes(max(step, f.batch), f.tp),
		Total: total, Free: free, Utilization: f.utilization, MaxContext: max(f.prompt, f.context) + f.tokens})
	if err != nil {
		return nil, err
	}
	return &p, nil
}
