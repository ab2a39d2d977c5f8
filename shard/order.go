package shard

import (
	"fmt"
	"maps"
	"slices"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// unitOrder permutes the units of one named dimension, per layer.
type unitOrder struct {
	unit   string
	layers map[int][]int
}

// WithOrder returns p with the units of the dimension named unit (a key of the model's Dims: "experts")
// placed, layer by layer: in every tensor of layer L (the first all-digit component of its name) split on a
// dimension of that unit, index (slot) i of the dimension over the group holds the checkpoint's unit
// layers[L][i], and each rank gets the units of its slots (whole experts per rank: the ep plan). An order
// is a permutation of the units, or longer: every unit at least once and some more than once (replicas of a
// hot expert on several ranks), in as many slots as divide over the ranks; a split tensor then has
// len(layers[L])/tp slots a rank. Whole tensors with that dimension (a router's rows, which every rank
// reads) are read in the order when it is a permutation and in the checkpoint's order when it has
// replicas. The model is told the order of every tensor it applies to (model.Layout.Units), so it
// computes what it did unordered, on other ranks. NewManifest reports an order that leaves out a unit or
// names one the dimension lacks, slots that do not divide over the ranks, and a tensor split on another
// dimension than the ordered one. Layers without an order keep the checkpoint's.
func (p Plan) WithOrder(unit string, layers map[int][]int) Plan {
	if len(layers) == 0 {
		p.order = nil
		return p
	}
	o := &unitOrder{unit: unit, layers: make(map[int][]int, len(layers))}
	for l, ord := range layers {
		o.layers[l] = slices.Clone(ord)
	}
	p.order = o
	return p
}

// layerOf returns the layer of a tensor name: its first all-digit component.
func layerOf(name string) (int, bool) {
	for _, c := range nameComponents(name) {
		if isDigits(c) {
			var n int
			fmt.Sscan(c, &n)
			return n, true
		}
	}
	return 0, false
}

// orderOf returns the permuted dimension of t and its order, if any.
func (a *analysis) orderOf(t planned) (int, []int, bool) {
	if a.order == nil || !t.known {
		return 0, nil, false
	}
	d := slices.Index(t.spec.Dims, a.order.unit)
	if d < 0 {
		return 0, nil, false
	}
	l, ok := layerOf(t.info.Name)
	if !ok {
		return 0, nil, false
	}
	ord, ok := a.order.layers[l]
	return d, ord, ok
}

// checkOrder reports orders that do not fit the tensors they permute.
func (a *analysis) checkOrder(errs *errorSet) {
	if a.order == nil {
		return
	}
	used := make(map[int]bool)
	for _, t := range a.tensors {
		d, ord, ok := a.orderOf(t)
		if !ok {
			continue
		}
		l, _ := layerOf(t.info.Name)
		used[l] = true
		n := t.info.Shape[d]
		switch {
		case !covers(ord, n):
			errs.add(fmt.Errorf("%w: %s: the order of %s in layer %d, %v, must name each of its %d %s at least once and no other", ErrPlan, t.info.Name, a.order.unit, l, ord, n, a.order.unit))
		case t.dim >= 0 && (t.dim != d || t.packed || t.replicas > 1):
			errs.add(fmt.Errorf("%w: %s is split on dim %d: an order of %s needs whole %s per rank (split on dim %d, as the ep plan does)", ErrPlan, t.info.Name, t.dim, a.order.unit, a.order.unit, d))
		case t.dim == d && len(ord)%a.tp != 0:
			errs.add(fmt.Errorf("%w: %s: the order of %s in layer %d has %d slots, which do not divide over tp=%d", ErrPlan, t.info.Name, a.order.unit, l, len(ord), a.tp))
		}
	}
	for _, l := range slices.Sorted(maps.Keys(a.order.layers)) {
		if !used[l] {
			errs.add(fmt.Errorf("%w: an order of %s for layer %d, which has no tensor with %s", ErrPlan, a.order.unit, l, a.order.unit))
		}
	}
}

// covers reports whether ord names every unit of [0, n) at least once and nothing else.
func covers(ord []int, n int) bool {
	seen := make([]bool, n)
	left := n
	for _, u := range ord {
		if u < 0 || u >= n {
			return false
		}
		if !seen[u] {
			seen[u] = true
			left--
		}
	}
	return left == 0
}

// permute applies the order to entry s of planned tensor t: its ranges along the ordered dimension become
// the checkpoint's units of its slots (all of them for a whole tensor, which stays Replicated, when the
// order is a permutation), and its Layout says the order.
func (a *analysis) permute(s *TensorShard, t planned) {
	d, ord, ok := a.orderOf(t)
	if !ok {
		return
	}
	var slots []safetensors.Range
	if t.dim == d {
		slots = s.Ranges
	} else {
		if len(ord) != t.info.Shape[d] {
			return // replicas: a whole tensor keeps the checkpoint's order, which its Layout says
		}
		slots = []safetensors.Range{{Start: 0, End: t.info.Shape[d]}}
	}
	var out []safetensors.Range
	for _, r := range slots {
		for i := r.Start; i < r.End; i++ {
			u := ord[i]
			if n := len(out); n > 0 && out[n-1].End == u {
				out[n-1].End++
				continue
			}
			out = append(out, safetensors.Range{Start: u, End: u + 1})
		}
	}
	s.Dim, s.Ranges = d, out
	if t.dim < 0 {
		s.Layout = model.Replicated
	}
	s.Layout.Units = slices.Clone(ord)
}
