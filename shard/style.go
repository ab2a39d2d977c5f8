package shard

import (
	"fmt"
	"sort"
	"strings"
)

// Style is a tp_plan style name, as HF transformers writes it in a plan: "colwise", "packed_rowwise",
// "grouped_gemm", or a legacy 4.x name such as "local_colwise". A Style says which dimension of a weight is
// split across the ranks; the collectives follow from the splits (the model reads them from each tensor's
// Layout), so styles that only differ in their collective mean the same here.
type Style string

// The styles of transformers 5.17 (spec §4.2).
const (
	// Colwise splits output features: dim 0 of an nn.Linear weight [out, in] and of a bias, dim ndim-2 of a
	// 3-D tensor (HF's Shard(ndim-2): stacked experts [E, I, H] → dim 1), dim 1 of an embedding.
	Colwise Style = "colwise"
	// Rowwise splits input features: the last dim of a weight of two or more dims; a 1-D bias stays whole
	// (it is added once after the all-reduce); an embedding splits its vocabulary rows (dim 0).
	Rowwise Style = "rowwise"
	// ColwiseGatherOutput is Colwise with the output all-gathered (lm_head: vocab-parallel logits).
	ColwiseGatherOutput Style = "colwise_gather_output"
	// RowwiseSplitInput is Rowwise for a replicated input that each rank slices itself.
	RowwiseSplitInput Style = "rowwise_split_input"
	// EmbeddingRowwise splits an embedding's vocabulary rows (dim 0); the partial lookups are all-reduced.
	EmbeddingRowwise Style = "embedding_rowwise"
	// PackedColwise splits dim ndim-2 of a tensor that packs two halves along it: each rank takes slice r of
	// both halves.
	PackedColwise Style = "packed_colwise"
	// PackedRowwise splits the last dim of a tensor that packs two halves along it: on packed experts
	// [E, H, 2I] rank r takes columns [r·I/tp, (r+1)·I/tp) of the first half and the same of the second.
	PackedRowwise Style = "packed_rowwise"
	// MoETPExperts is a module style (the experts' partial sums are all-reduced); it splits no parameter.
	MoETPExperts Style = "moe_tp_experts"
	// GroupedGEMM splits dim 0, the expert dimension: whole experts per rank (expert parallelism).
	GroupedGEMM Style = "grouped_gemm"
	// EPRouter is HF's module style for expert routing under expert parallelism: no parameter is split.
	EPRouter Style = "ep_router"
	// Replicate keeps every parameter whole.
	Replicate Style = "replicate"
	// SequenceParallel splits activations along the sequence, not parameters: weights stay whole.
	SequenceParallel Style = "sequence_parallel"
	// AllReduce is a module style (all-reduce the module's output); it splits no parameter.
	AllReduce Style = "all_reduce"
	// ReplicatedWithGradAllreduce is a training style; for inference its parameters stay whole.
	ReplicatedWithGradAllreduce Style = "replicated_with_grad_allreduce"
)

// Legacy style names of transformers 4.51–4.57 (spec §4.3), read as their 5.17 equivalents.
const (
	ColwiseRep         Style = "colwise_rep"          // = ColwiseGatherOutput
	RowwiseRep         Style = "rowwise_rep"          // = RowwiseSplitInput
	LocalColwise       Style = "local_colwise"        // Colwise's split, without DTensor hooks
	LocalRowwise       Style = "local_rowwise"        // Rowwise's split, without DTensor hooks
	LocalPackedRowwise Style = "local_packed_rowwise" // = PackedRowwise
	Local              Style = "local"                // module style (IsolatedParallel): no split
	Gather             Style = "gather"               // module style: all-reduce of the module's output
)

// split is what a style does to a parameter.
type split int

const (
	splitNone          split = iota // parameters stay whole
	splitColwise                    // output features
	splitRowwise                    // input features
	splitRows                       // dim 0 (embedding vocabulary rows)
	splitPackedColwise              // dim ndim-2, both packed halves
	splitPackedRowwise              // last dim, both packed halves
	splitExperts                    // dim 0, whole experts
)

var styles = map[Style]split{
	Colwise:                     splitColwise,
	Rowwise:                     splitRowwise,
	ColwiseGatherOutput:         splitColwise,
	RowwiseSplitInput:           splitRowwise,
	EmbeddingRowwise:            splitRows,
	PackedColwise:               splitPackedColwise,
	PackedRowwise:               splitPackedRowwise,
	MoETPExperts:                splitNone,
	GroupedGEMM:                 splitExperts,
	EPRouter:                    splitNone,
	Replicate:                   splitNone,
	SequenceParallel:            splitNone,
	AllReduce:                   splitNone,
	ReplicatedWithGradAllreduce: splitNone,

	ColwiseRep:         splitColwise,
	RowwiseRep:         splitRowwise,
	LocalColwise:       splitColwise,
	LocalRowwise:       splitRowwise,
	LocalPackedRowwise: splitPackedRowwise,
	Local:              splitNone,
	Gather:             splitNone,
}

// Known reports whether s is a style this package understands.
func (s Style) Known() bool {
	_, ok := styles[s]
	return ok
}

// SplitsParameters reports whether s cuts parameters at all; module styles (moe_tp_experts, gather, local,
// all_reduce, ep_router) and replicate, sequence_parallel do not.
func (s Style) SplitsParameters() bool { return styles[s] != splitNone }

// Styles lists every known style name, sorted.
func Styles() []Style {
	out := make([]Style, 0, len(styles))
	for s := range styles {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// dim is the dimension s splits in a tensor of ndim dimensions, and whether the split is packed; -1 when
// the tensor stays whole. embedding marks an nn.Embedding weight, which HF splits the other way round.
func (s Style) dim(ndim int, embedding bool) (dim int, packed bool) {
	if ndim == 0 {
		return -1, false
	}
	switch styles[s] {
	case splitColwise:
		switch {
		case embedding:
			return 1, false
		case ndim == 1:
			return 0, false
		}
		return ndim - 2, false
	case splitRowwise:
		switch {
		case embedding:
			return 0, false
		case ndim == 1:
			return -1, false
		}
		return ndim - 1, false
	case splitRows, splitExperts:
		return 0, false
	case splitPackedColwise:
		if ndim == 1 {
			return 0, true
		}
		return ndim - 2, true
	case splitPackedRowwise:
		return ndim - 1, true
	}
	return -1, false
}

func unknownStyle(pattern string, s Style) error {
	names := make([]string, 0, len(styles))
	for _, k := range Styles() {
		names = append(names, string(k))
	}
	return fmt.Errorf("%w %q for pattern %q (known: %s)", ErrUnknownStyle, string(s), pattern, strings.Join(names, ", "))
}
