package cpu

import (
	"fmt"
	"math"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

// routing is the cpu Routing: for each of T tokens, k expert indices and their scores, in the order Route
// chose them (descending logit, ties by lower index).
type routing struct {
	tokens, k int
	experts   []int     // [T·k]
	scores    []float32 // [T·k]
}

var (
	_ backend.Routing       = (*routing)(nil)
	_ backend.ExpertCounter = (*routing)(nil)
	_ backend.ExpertMapper  = (*Backend)(nil)
)

// CountExperts adds the tokens routed to each expert to counts.
func (r *routing) CountExperts(counts []int64) error {
	for _, e := range r.experts {
		if e >= len(counts) {
			return fmt.Errorf("cpu: count experts: expert %d, %d counts: %w", e, len(counts), backend.ErrShape)
		}
		counts[e]++
	}
	return nil
}

// TopK returns the number of experts chosen per token.
func (r *routing) TopK() int { return r.k }

// Route picks, for each row of logits [T, E], the k largest raw logits, ties going to the lower expert
// index, and scores them with sigmoid(logit) = 1/(1+e^-logit) evaluated in float64 and rounded to
// float32. A NaN logit is never larger than another, so it is chosen only when nothing else is left.
func (b *Backend) Route(logits backend.Tensor, k int) (backend.Routing, error) {
	lt, err := asTensor("route", "logits", logits)
	if err != nil {
		return nil, err
	}
	if len(lt.shape) != 2 || k < 1 || k > lt.shape[1] {
		return nil, fmt.Errorf("cpu: route logits%v k=%d: %w", lt.shape, k, backend.ErrShape)
	}
	T, E := lt.shape[0], lt.shape[1]
	r := &routing{tokens: T, k: k, experts: make([]int, T*k), scores: make([]float32, T*k)}
	taken := make([]bool, E)
	for t := range T {
		row := lt.data[t*E : (t+1)*E]
		clear(taken)
		for j := range k {
			best := -1
			for e, v := range row {
				if !taken[e] && (best < 0 || v > row[best] || (math.IsNaN(float64(row[best])) && !math.IsNaN(float64(v)))) {
					best = e
				}
			}
			taken[best] = true
			r.experts[t*k+j] = best
			r.scores[t*k+j] = float32(1 / (1 + math.Exp(-float64(row[best]))))
		}
	}
	return r, nil
}

// MapExperts returns r with token t's choice of expert e replaced by slot slots[e][spread[t] mod
// len(slots[e])] (backend.ExpertMapper), scores and order unchanged.
func (b *Backend) MapExperts(r backend.Routing, slots [][]int, spread []int) (backend.Routing, error) {
	rt, ok := r.(*routing)
	if !ok || rt == nil {
		return nil, fmt.Errorf("cpu: map experts: routing is a %T: %w", r, ErrForeign)
	}
	if len(spread) != rt.tokens {
		return nil, fmt.Errorf("cpu: map experts: %d spreads for %d tokens: %w", len(spread), rt.tokens, backend.ErrShape)
	}
	out := &routing{tokens: rt.tokens, k: rt.k, experts: make([]int, len(rt.experts)), scores: slices.Clone(rt.scores)}
	for s, e := range rt.experts {
		if e < 0 || e >= len(slots) || len(slots[e]) == 0 || spread[s/rt.k] < 0 {
			return nil, fmt.Errorf("cpu: map experts: expert %d of %d with slots, spread %d: %w", e, len(slots), spread[s/rt.k], backend.ErrShape)
		}
		rs := slots[e]
		out.experts[s] = rs[spread[s/rt.k]%len(rs)]
	}
	return out, nil
}

// ReadRouting returns the choice r holds, flattened token-major: experts[t·k + j] is token t's j-th
// expert and scores[t·k + j] its score, j in the order Route chose them. The slices are copies.
func (b *Backend) ReadRouting(r backend.Routing) (experts []int, scores []float32, err error) {
	rt, ok := r.(*routing)
	if !ok || rt == nil {
		return nil, nil, fmt.Errorf("cpu: read routing: a %T: %w", r, ErrForeign)
	}
	return slices.Clone(rt.experts), slices.Clone(rt.scores), nil
}

// expertTile is the number of tokens whose expert activations are accumulated together while one weight
// row is in cache.
const expertTile = 8

// Experts computes, for each row t of x [T, H], the sum over its chosen experts e (those among first ..
// first+E-1) with score s of (up ⊙ silu(gate))·down[e], where [gate | up] = (x[t]·s)·gateUp[e]; gateUp is
// [E, H, 2I] and down [E, I, H]. Returns [T, H]. Quantised experts (LoadQuantized) hold their
// dequantised values; with DynamicActivations the score-scaled input rows and the SwiGLU rows are
// quantised to FP8 per token before their products (FbgemmFp8Llama4TextExperts, spec §3.5).
//
// Tokens are grouped by expert so that each expert's weights are streamed once per tile of expertTile
// tokens; the columns of each product are split over the threads. Every element is accumulated in a fixed
// order (over the input dimension, in order), and each token's expert outputs are summed in the order
// Route chose them, starting from zero: so the result does not depend on Threads or on which other
// tokens are in the batch, and splitting the experts between ranks and summing their outputs (k ≤ 2)
// gives the same bits as one rank holding them all.
func (b *Backend) Experts(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int) (backend.Tensor, error) {
	xt, err := asTensor("experts", "x", x)
	if err != nil {
		return nil, err
	}
	rt, ok := r.(*routing)
	if !ok || rt == nil {
		return nil, fmt.Errorf("cpu: experts: routing is a %T: %w", r, ErrForeign)
	}
	gt, err := asTensor("experts", "gateUp", gateUp)
	if err != nil {
		return nil, err
	}
	dt, err := asTensor("experts", "down", down)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 2 || len(gt.shape) != 3 || len(dt.shape) != 3 || rt.tokens != xt.shape[0] ||
		gt.shape[0] != dt.shape[0] || gt.shape[1] != xt.shape[1] || gt.shape[2] != 2*dt.shape[1] || dt.shape[2] != xt.shape[1] {
		return nil, fmt.Errorf("cpu: experts x%v routing[%d×%d] gateUp%v down%v: %w",
			xt.shape, rt.tokens, rt.k, gt.shape, dt.shape, backend.ErrShape)
	}
	T, H := xt.shape[0], xt.shape[1]
	E, I := gt.shape[0], dt.shape[1]
	k := rt.k
	out := alloc(T, H)

	// slots[e] lists the routing slots (t·k + j) that chose local expert e, in token order.
	slots := make([][]int, E)
	for s, e := range rt.experts {
		if e >= first && e-first < E {
			slots[e-first] = append(slots[e-first], s)
		}
	}
	// ys[s] is the output of slot s's expert; only chosen slots are computed.
	ys := make([]float32, T*k*H)
	for e, ss := range slots {
		if len(ss) == 0 {
			continue
		}
		gu := gt.data[e*H*2*I : (e+1)*H*2*I]
		dn := dt.data[e*I*H : (e+1)*I*H]
		for s0 := 0; s0 < len(ss); s0 += expertTile {
			tile := ss[s0:min(s0+expertTile, len(ss))]
			n := len(tile)
			h := make([]float32, n*H)
			for i, s := range tile {
				t := s / k
				sc := rt.scores[s]
				for c, v := range xt.data[t*H : (t+1)*H] {
					h[i*H+c] = v * sc
				}
			}
			h = actRows(h, H, gt.format)
			// [gate | up] = h · gu, columns split over threads.
			g := make([]float32, n*2*I)
			b.parallel(2*I, b.grain(2*I, n*H), func(lo, hi int) {
				for row := range H {
					w := gu[row*2*I+lo : row*2*I+hi]
					for i := range n {
						axpy(g[i*2*I+lo:i*2*I+hi], h[i*H+row], w)
					}
				}
			})
			act := make([]float32, n*I)
			for i := range n {
				siluMul(act[i*I:(i+1)*I], g[i*2*I:i*2*I+I], g[i*2*I+I:(i+1)*2*I])
			}
			act = actRows(act, I, dt.format)
			// y = act · dn, columns split over threads.
			b.parallel(H, b.grain(H, n*I), func(lo, hi int) {
				for row := range I {
					w := dn[row*H+lo : row*H+hi]
					for i, s := range tile {
						axpy(ys[s*H+lo:s*H+hi], act[i*I+row], w)
					}
				}
			})
		}
	}
	for t := range T {
		o := out.data[t*H : (t+1)*H]
		for j := range k {
			e := rt.experts[t*k+j]
			if e < first || e-first >= E {
				continue
			}
			s := t*k + j
			for c, v := range ys[s*H : (s+1)*H] {
				o[c] += v
			}
		}
	}
	return out, nil
}
