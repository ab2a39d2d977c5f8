package model

import (
	"fmt"
	"strconv"
	"strings"
)

// Unit is what one dimension of a tensor is made of: Count units of Size elements each (attention heads of
// head_dim rows, vocabulary rows of one).
type Unit struct {
	Count, Size int
	// What names the units in words with their config.json field, for messages: "attention heads
	// (num_attention_heads)".
	What string
	// Name is the units' short name for what a split cuts ("heads"); empty: Words.
	Name string
	// Replicable means that with fewer units than ranks each unit may be held by several ranks (key/value
	// heads, as vLLM does); the TP size must then be a multiple of Count.
	Replicable bool
}

// Words is What without its parenthesised config field: "attention heads".
func (u Unit) Words() string {
	if i := strings.Index(u.What, " ("); i >= 0 {
		return u.What[:i]
	}
	return u.What
}

// Kind tells what a tensor is where its shape alone does not say it.
type Kind string

// The kinds of tensor a model-neutral reader must tell apart.
const (
	// KindPlain is any other tensor (a Linear weight [out, in], a norm weight).
	KindPlain Kind = ""
	// KindEmbedding is an nn.Embedding weight [vocab, hidden]: plan styles split it the other way round
	// from a Linear weight, and a step reads one row per token.
	KindEmbedding Kind = "embedding"
	// KindExperts is routed experts stacked on dim 0: a step reads only the experts its tokens chose.
	KindExperts Kind = "experts"
)

// Split is one dimension a model can take a slice of.
type Split struct {
	Dim  int
	Unit Unit // what the dimension is made of; a rank's slice holds whole units
	// Packed means the dimension packs two halves of Unit.Count·Unit.Size each (gate and up columns): a
	// rank takes the matching slice of both.
	Packed bool
	// Style is the plan style that gives this split, for messages ("rowwise").
	Style string
	// Mode tells which splits of a group fit each other: a group is consistent when its members are all
	// whole, or all split in one Mode. "" is the ordinary tensor-parallel mode.
	Mode string
}

// TensorSpec is one tensor a model reads: its checkpoint name, its shape for a configuration, and how the
// model can take it under tensor parallelism. It is derived from the model's tagged tensor tree (see
// Tree); nothing else lists a model's tensors.
type TensorSpec struct {
	// Name is the checkpoint key without the configuration's key prefix
	// ("model.layers.0.attn.query.weight").
	Name  string
	Shape []int
	// Dims names each dimension's unit, as a key of the tree's Dims ("experts", "hidden").
	Dims []string
	Kind Kind
	// Splits are the dimensions the model can take a slice of; none: only whole.
	Splits []Split
	// Whole says why the tensor must stay whole, after "only whole: every rank needs all of it"
	// ("to route every token"); empty for the plain reason.
	Whole string
	// Group is the module whose tensors must be split in ways that fit each other
	// ("model.layers.0.self_attn"); empty when the tensor has no such partners. GroupRule says the rule in
	// words.
	Group, GroupRule string
	// Quantizable means the tensor is a linear or expert weight that may be held quantised (fp8, int4)
	// with InputDim its input (reduction) dimension: scales run along the others.
	Quantizable bool
	InputDim    int
	// PerExpert, for stacked experts, are the checkpoint names of the per-expert storage form
	// (compressed-tensors FP8 checkpoints): one template per part along the last dimension, in order
	// (gate then up), "{e}" standing for the expert index; each part is stored as nn.Linear [out, in],
	// the transpose of the expert's slice of this input-major tensor. Empty: stored only stacked.
	PerExpert []string
}

// ExpertName returns part p of expert e's name in the per-expert storage form.
func (s TensorSpec) ExpertName(p, e int) string {
	return strings.ReplaceAll(s.PerExpert[p], "{e}", strconv.Itoa(e))
}

// SplitOn returns the split the model accepts on dim, if any.
func (s TensorSpec) SplitOn(dim int) (Split, bool) {
	for _, sp := range s.Splits {
		if sp.Dim == dim {
			return sp, true
		}
	}
	return Split{}, false
}

// Role is the tensor's short name for messages: its last name component before ".weight" ("query").
func (s TensorSpec) Role() string {
	name := strings.TrimSuffix(s.Name, ".weight")
	return name[strings.LastIndex(name, ".")+1:]
}

// Takes says in words how the model can take the tensor: "whole, or split by attention heads on dim 1
// (rowwise)", "only whole: every rank needs all of it".
func (s TensorSpec) Takes() string {
	if len(s.Splits) == 0 {
		if s.Whole != "" {
			return "only whole: every rank needs all of it " + s.Whole
		}
		return "only whole: every rank needs all of it"
	}
	var b strings.Builder
	b.WriteString("whole, or split")
	for i, sp := range s.Splits {
		if i > 0 {
			b.WriteString(", or")
		}
		by := sp.Unit.Name
		if by == "" {
			by = sp.Unit.Words()
		}
		how := "by " + by
		if sp.Packed {
			how = "packed, by " + by + ","
		}
		fmt.Fprintf(&b, " %s on dim %d", how, sp.Dim)
		if sp.Style != "" {
			fmt.Fprintf(&b, " (%s)", sp.Style)
		}
	}
	return b.String()
}

// NumElements is the product of the shape.
func (s TensorSpec) NumElements() int64 {
	n := int64(1)
	for _, d := range s.Shape {
		n *= int64(d)
	}
	return n
}
