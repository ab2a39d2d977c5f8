package memplan

import (
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/tpfleet/tpfleet/model"
)

// Defaults of Input.
const (
	// DefaultBlockSize is the tokens a KV block holds (vLLM's default).
	DefaultBlockSize = 16
	// DefaultUtilization is the share of the device's memory the rank may use (--gpu-memory-utilization).
	DefaultUtilization = 0.9
)

// ErrNoMemory means the budget holds no KV cache for even one block of every layer: the weights and the
// step's activations leave too little of the device.
var ErrNoMemory = errors.New("memplan: not enough memory for a KV cache")

// Layer is one layer's cache on one rank.
type Layer struct {
	// TokenBytes is the bytes of keys and values of one token: 2·heads·head_dim·element bytes.
	TokenBytes int64
	// Window is the most past tokens the layer attends to; 0: all (global attention).
	Window int
}

// Geometry is the paged KV cache of one rank: a pool of blocks, each BlockSize tokens of one layer. It is a
// value, safe for concurrent use.
type Geometry struct {
	BlockSize int
	Layers    []Layer
	// Piece is the most tokens of one sequence a step appends (the coordinator's token budget, or its
	// --prefill-chunk): a windowed layer drops its past chunks only at the start of an append, so during a
	// step it holds up to a window and a piece. 0 or 1: one token a step (decode), the hold between steps.
	Piece int
}

// KVHeadsPerRank is how many of kv key/value heads one rank of tp holds: kv/tp, or 1 when tp exceeds kv
// (heads replicated, as vLLM does).
func KVHeadsPerRank(kv, tp int) int {
	if tp <= 1 {
		return kv
	}
	return max(kv/tp, 1)
}

// NewGeometry is the cache of one rank of tp for the model's layers, elemBytes bytes an element, blocks of
// blockSize tokens (0: DefaultBlockSize).
func NewGeometry(layers []model.KVLayer, tp, elemBytes, blockSize int) Geometry {
	if blockSize <= 0 {
		blockSize = DefaultBlockSize
	}
	g := Geometry{BlockSize: blockSize, Layers: make([]Layer, len(layers))}
	for i, l := range layers {
		g.Layers[i] = Layer{TokenBytes: 2 * int64(KVHeadsPerRank(l.KVHeads, tp)) * int64(l.HeadDim) * int64(elemBytes), Window: l.Window}
	}
	return g
}

// GeometryOf is NewGeometry for cfg when it declares its cache (model.Memory).
func GeometryOf(cfg model.Config, tp, elemBytes, blockSize int) (Geometry, error) {
	m, ok := cfg.(model.Memory)
	if !ok {
		return Geometry{}, fmt.Errorf("memplan: the %s family does not declare its KV cache (model.Memory)", cfg.Info().Family)
	}
	return NewGeometry(m.KVLayers(), tp, elemBytes, blockSize), nil
}

// TokenBytes is what one token costs in every layer: the cache's bytes per token while the context is
// within every window.
func (g Geometry) TokenBytes() int64 {
	var n int64
	for _, l := range g.Layers {
		n += l.TokenBytes
	}
	return n
}

// GlobalTokenBytes is what one more token costs once the context is past every window: the global layers'
// bytes per token.
func (g Geometry) GlobalTokenBytes() int64 {
	var n int64
	for _, l := range g.Layers {
		if l.Window == 0 {
			n += l.TokenBytes
		}
	}
	return n
}

// BlockBytes is the size of one block: BlockSize tokens of the widest layer.
func (g Geometry) BlockBytes() int64 {
	var w int64
	for _, l := range g.Layers {
		w = max(w, l.TokenBytes)
	}
	return int64(g.BlockSize) * w
}

// Blocks is the blocks a sequence of tokens tokens needs at most: per global layer ceil(L/B), per windowed
// layer min(ceil(L/B), ceil((window+P-1)/B)+1) with P = min(Piece, L) (at least 1): the blocks that window+P-1
// consecutive positions can span. With P = 1 that is min(ceil(L/B), ceil(window/B)+1).
func (g Geometry) Blocks(tokens int) int {
	if tokens <= 0 || g.BlockSize <= 0 {
		return 0
	}
	full := ceilDiv(tokens, g.BlockSize)
	piece := min(max(g.Piece, 1), tokens)
	n := 0
	for _, l := range g.Layers {
		if l.Window > 0 {
			n += min(full, ceilDiv(l.Window+piece-1, g.BlockSize)+1)
		} else {
			n += full
		}
	}
	return n
}

// Longest is the longest sequence, in tokens, whose Blocks fit in blocks; math.MaxInt when a model with
// only windowed layers fits (its cache stops growing).
func (g Geometry) Longest(blocks int) int {
	if len(g.Layers) == 0 || g.BlockSize <= 0 || g.Blocks(g.BlockSize) > blocks {
		return 0
	}
	global := 0
	for _, l := range g.Layers {
		if l.Window == 0 {
			global++
		}
	}
	if global == 0 && g.Blocks(math.MaxInt/2) <= blocks {
		return math.MaxInt
	}
	lo, hi := 1, 1 // in blocks of tokens: Blocks(lo·B) fits, find the largest
	for g.Blocks(hi*g.BlockSize) <= blocks {
		lo, hi = hi, 2*hi
	}
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if g.Blocks(mid*g.BlockSize) <= blocks {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo * g.BlockSize
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// Input is what a plan is made of. Memory figures are bytes of the rank's device.
type Input struct {
	Geometry Geometry
	// Weights is the bytes of the rank's weights, as held (quantised sizes for quantised weights).
	Weights int64
	// Activations is the bytes of the largest step's activations (model.Memory.StepBytes).
	Activations int64
	// Total and Free are the device's memory and what of it is free now, after the weights were loaded
	// (backend.MemoryReporter, or the host's memory for a backend without).
	Total, Free int64
	// Utilization is the share of Total the rank may use, in (0, 1]; 0 means DefaultUtilization.
	Utilization float64
	// KVTokens, when positive, sizes the cache for this many tokens in every layer instead of from memory
	// (ceil(KVTokens/BlockSize) blocks a layer): --kv-cache-tokens.
	KVTokens int
	// MaxContext is the longest request the coordinator accepts (--max-model-len, else
	// max_position_embeddings): the context Concurrency is computed for.
	MaxContext int
}

// Plan is one rank's memory plan.
type Plan struct {
	Weights, Activations int64
	// Budget is what the rank may use: Total·Utilization (or, with KVTokens, the cache's size plus the rest).
	Budget int64
	// Blocks is the number of KV blocks, of BlockSize tokens and BlockBytes bytes each; KV their bytes.
	Blocks     int
	BlockSize  int
	BlockBytes int64
	KV         int64
	// TokenBytes and GlobalTokenBytes are Geometry.TokenBytes and GlobalTokenBytes.
	TokenBytes, GlobalTokenBytes int64
	// Tokens is the tokens of KV: Blocks·BlockSize / layers, what every layer holds of one context.
	Tokens int
	// Longest is the longest context one sequence can have alone (Geometry.Longest; math.MaxInt: no limit).
	Longest int
	// MaxContext is Input.MaxContext, and Concurrency the sequences of MaxContext tokens the cache holds at
	// once (0 when MaxContext is 0).
	MaxContext  int
	Concurrency float64
	// FromTokens reports a plan sized by Input.KVTokens rather than from memory.
	FromTokens bool
}

// New makes the plan: blocks = (Total·Utilization − (Total − Free) − Activations) / BlockBytes, the used
// memory (Total − Free) counting the weights already loaded, or ceil(KVTokens/BlockSize)·layers blocks.
// It fails with ErrNoMemory, naming the numbers, when not one block a layer fits.
func New(in Input) (Plan, error) {
	g := in.Geometry
	if len(g.Layers) == 0 || g.BlockSize <= 0 {
		return Plan{}, fmt.Errorf("memplan: a geometry of %d layers and blocks of %d tokens", len(g.Layers), g.BlockSize)
	}
	util := in.Utilization
	if util == 0 {
		util = DefaultUtilization
	}
	if util < 0 || util > 1 {
		return Plan{}, fmt.Errorf("memplan: memory utilization %g, want (0, 1]", util)
	}
	if in.Free < 0 || in.Free > in.Total {
		return Plan{}, fmt.Errorf("memplan: %s free of %s total: want 0 <= free <= total", GiB(in.Free), GiB(in.Total))
	}
	p := Plan{Weights: in.Weights, Activations: in.Activations, BlockSize: g.BlockSize, BlockBytes: g.BlockBytes(),
		TokenBytes: g.TokenBytes(), GlobalTokenBytes: g.GlobalTokenBytes(), MaxContext: in.MaxContext}
	if in.KVTokens > 0 {
		p.FromTokens = true
		p.Blocks = ceilDiv(in.KVTokens, g.BlockSize) * len(g.Layers)
		p.Budget = in.Total - in.Free + in.Activations + int64(p.Blocks)*p.BlockBytes
	} else {
		p.Budget = int64(float64(in.Total) * util)
		left := p.Budget - (in.Total - in.Free) - in.Activations
		if left > 0 {
			p.Blocks = int(left / p.BlockBytes)
		}
		if p.Blocks < len(g.Layers) {
			return p, fmt.Errorf("%w: %s of %s at utilization %.2f, %s in use (weights %s), activations %s: %s left, one block of every layer needs %s",
				ErrNoMemory, GiB(p.Budget), GiB(in.Total), util, GiB(in.Total-in.Free), GiB(in.Weights), GiB(in.Activations),
				GiB(max(left, 0)), GiB(int64(len(g.Layers))*p.BlockBytes))
		}
	}
	p.KV = int64(p.Blocks) * p.BlockBytes
	p.Tokens = p.Blocks * g.BlockSize / len(g.Layers)
	p.Longest = g.Longest(p.Blocks)
	if in.MaxContext > 0 {
		p.Concurrency = float64(p.Blocks) / float64(g.Blocks(in.MaxContext))
	}
	return p, nil
}

// GiB formats bytes in GiB with two decimals ("12.34 GiB").
func GiB(b int64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) }

// LongestString is Longest in words: a number, or "unbounded".
func (p Plan) LongestString() string {
	if p.Longest == math.MaxInt {
		return "unbounded"
	}
	return fmt.Sprint(p.Longest)
}

// Table is the plan as a human-readable table, for the start-up log and `tpfleet bench`.
func (p Plan) Table() string {
	var b strings.Builder
	row := func(k, v string) { fmt.Fprintf(&b, "  %-26s %s\n", k, v) }
	row("weights", GiB(p.Weights))
	row("activations (largest step)", GiB(p.Activations))
	kv := fmt.Sprintf("%s: %d blocks of %d tokens (%d bytes)", GiB(p.KV), p.Blocks, p.BlockSize, p.BlockBytes)
	if p.FromTokens {
		kv += ", sized by --kv-cache-tokens"
	}
	row("KV cache", kv)
	row("KV bytes per token", fmt.Sprintf("%d (all layers), %d (global layers, past the windows)", p.TokenBytes, p.GlobalTokenBytes))
	row("tokens of KV", fmt.Sprintf("%d (every layer)", p.Tokens))
	row("longest context", p.LongestString())
	if p.MaxContext > 0 {
		row("concurrency", fmt.Sprintf("%.2f sequences of %d tokens", p.Concurrency, p.MaxContext))
	}
	row("budget", GiB(p.Budget))
	return b.String()
}
