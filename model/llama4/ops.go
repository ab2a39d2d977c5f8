package llama4

import (
	"context"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/comm"
)

// step wraps backend.Ops with a sticky error so the forward pass reads as a sequence of formulas: after the
// first failure every op is skipped and returns nil, and the caller checks err once at the end.
type step struct {
	ctx  context.Context
	ops  backend.Ops
	comm comm.Comm
	pos  []int // the positions of the step's rows (the MoE spreads an expert's tokens over its replicas by them)
	err  error
}

func (s *step) fail(op string, err error) {
	if s.err == nil && err != nil {
		s.err = fmt.Errorf("%s: %w", op, err)
	}
}

func (s *step) do(op string, f func() (backend.Tensor, error)) backend.Tensor {
	if s.err != nil {
		return nil
	}
	t, err := f()
	s.fail(op, err)
	return t
}

func (s *step) embed(table backend.Tensor, ids []int, first int) backend.Tensor {
	return s.do("embed", func() (backend.Tensor, error) { return s.ops.Embed(table, ids, first) })
}

func (s *step) rmsNorm(x, w backend.Tensor, eps float32) backend.Tensor {
	return s.do("rms_norm", func() (backend.Tensor, error) { return s.ops.RMSNorm(x, w, eps) })
}

// addNorm returns x + y and RMSNorm(x + y, w): one fused op where the backend has it.
func (s *step) addNorm(x, y, w backend.Tensor, eps float32) (sum, normed backend.Tensor) {
	if s.err != nil {
		return nil, nil
	}
	if f, ok := s.ops.(backend.AddNormer); ok {
		sum, normed, err := f.AddRMSNorm(x, y, w, eps)
		s.fail("add_rms_norm", err)
		return sum, normed
	}
	sum = s.add(x, y)
	return sum, s.rmsNorm(sum, w, eps)
}

func (s *step) linear(x, w backend.Tensor) backend.Tensor {
	return s.do("linear", func() (backend.Tensor, error) { return s.ops.Linear(x, w) })
}

// linears returns x · wᵀ for each w: one op where the backend has it (backend.MultiLinear).
func (s *step) linears(x backend.Tensor, ws ...backend.Tensor) []backend.Tensor {
	out := make([]backend.Tensor, len(ws))
	if s.err != nil {
		return out
	}
	if ml, ok := s.ops.(backend.MultiLinear); ok {
		ys, err := ml.LinearMulti(x, ws...)
		if s.fail("linear", err); err == nil {
			copy(out, ys)
		}
		return out
	}
	for i, w := range ws {
		out[i] = s.linear(x, w)
	}
	return out
}

// gated returns a gated MLP's activation SiLUMul(x · gateᵀ, x · upᵀ) and x · wᵀ for each of ws: one op
// where the backend has it (backend.GatedLinear), else the products of x in one go and SiLUMul.
func (s *step) gated(x, gate, up backend.Tensor, ws ...backend.Tensor) (backend.Tensor, []backend.Tensor) {
	if s.err != nil {
		return nil, make([]backend.Tensor, len(ws))
	}
	if g, ok := s.ops.(backend.GatedLinear); ok {
		act, ys, err := g.LinearGated(x, gate, up, ws...)
		if s.fail("linear", err); err != nil {
			return nil, make([]backend.Tensor, len(ws))
		}
		return act, ys
	}
	p := s.linears(x, append(slices.Clone(ws), gate, up)...)
	return s.siluMul(p[len(ws)], p[len(ws)+1]), p[:len(ws)]
}

func (s *step) add(a, b backend.Tensor) backend.Tensor {
	return s.do("add", func() (backend.Tensor, error) { return s.ops.Add(a, b) })
}

func (s *step) siluMul(gate, up backend.Tensor) backend.Tensor {
	return s.do("silu_mul", func() (backend.Tensor, error) { return s.ops.SiLUMul(gate, up) })
}

func (s *step) scaleRows(x backend.Tensor, scale []float32) backend.Tensor {
	return s.do("scale_rows", func() (backend.Tensor, error) { return s.ops.ScaleRows(x, scale) })
}

func (s *step) rope(x backend.Tensor, pos []int, invFreq []float32) backend.Tensor {
	return s.do("rope", func() (backend.Tensor, error) { return s.ops.RoPE(x, pos, invFreq) })
}

// ropeQK rotates q and k and, with norm, applies the weightless qk-norm to both: one op where the backend
// has it (backend.QKRotator).
func (s *step) ropeQK(q, k backend.Tensor, pos []int, invFreq []float32, norm bool, eps float32) (backend.Tensor, backend.Tensor) {
	if s.err != nil {
		return nil, nil
	}
	if r, ok := s.ops.(backend.QKRotator); ok {
		qo, ko, err := r.RoPEQK(q, k, pos, invFreq, norm, eps)
		s.fail("rope", err)
		return qo, ko
	}
	q, k = s.rope(q, pos, invFreq), s.rope(k, pos, invFreq)
	if norm {
		q, k = s.rmsNorm(q, nil, eps), s.rmsNorm(k, nil, eps)
	}
	return q, k
}

func (s *step) reshape(x backend.Tensor, shape ...int) backend.Tensor {
	return s.do("reshape", func() (backend.Tensor, error) { return s.ops.Reshape(x, shape...) })
}

func (s *step) rows(x backend.Tensor, start, end int) backend.Tensor {
	return s.do("rows", func() (backend.Tensor, error) { return s.ops.Rows(x, start, end) })
}

func (s *step) concat(ts ...backend.Tensor) backend.Tensor {
	return s.do("concat", func() (backend.Tensor, error) { return s.ops.Concat(ts...) })
}

func (s *step) attention(q backend.Tensor, cache backend.KVCache, pos []int, w backend.Window, scale float32) backend.Tensor {
	return s.do("attention", func() (backend.Tensor, error) { return s.ops.Attention(q, cache, pos, w, scale) })
}

func (s *step) attendBatch(ba backend.BatchAttender, q, k, v backend.Tensor, spans []backend.AttendSpan, w backend.Window, scale float32) backend.Tensor {
	return s.do("attention", func() (backend.Tensor, error) { return ba.AttendBatch(q, k, v, spans, w, scale) })
}

// attendQK is attendBatch with q and k under tr first, in one op (backend.QKAttender).
func (s *step) attendQK(qa backend.QKAttender, q, k, v backend.Tensor, spans []backend.AttendSpan, w backend.Window, scale float32,
	tr backend.QKTransform) backend.Tensor {
	return s.do("attention", func() (backend.Tensor, error) { return qa.AttendBatchQK(q, k, v, spans, w, scale, tr) })
}

// transformQK returns q and k under tr (spec §2.3 (a) to (c)): RoPE and the qk-norm through ropeQK, then
// q scaled by row.
func (s *step) transformQK(q, k backend.Tensor, pos []int, tr backend.QKTransform) (backend.Tensor, backend.Tensor) {
	if tr.InvFreq != nil {
		q, k = s.ropeQK(q, k, pos, tr.InvFreq, tr.Norm, tr.Eps)
	}
	if tr.QScale != nil {
		q = s.scaleRows(q, tr.QScale)
	}
	return q, k
}

func (s *step) appendKV(cache backend.KVCache, k, v backend.Tensor, pos []int) {
	if s.err == nil {
		s.fail("kv_cache", cache.Append(k, v, pos))
	}
}

func (s *step) route(logits backend.Tensor, k int) backend.Routing {
	if s.err != nil {
		return nil
	}
	r, err := s.ops.Route(logits, k)
	s.fail("route", err)
	return r
}

// mapExperts sends each choice of r to one of its expert's slots (backend.ExpertMapper), by the rows'
// positions.
func (s *step) mapExperts(em backend.ExpertMapper, r backend.Routing, slots [][]int) backend.Routing {
	if s.err != nil {
		return nil
	}
	m, err := em.MapExperts(r, slots, s.pos)
	s.fail("map_experts", err)
	return m
}

func (s *step) experts(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int) backend.Tensor {
	return s.do("experts", func() (backend.Tensor, error) { return s.ops.Experts(x, r, gateUp, down, first) })
}

// expertsAdd returns the routed experts' output plus add: one op where the backend has it
// (backend.ExpertsAdder).
func (s *step) expertsAdd(x backend.Tensor, r backend.Routing, gateUp, down backend.Tensor, first int, add backend.Tensor) backend.Tensor {
	if ea, ok := s.ops.(backend.ExpertsAdder); ok {
		return s.do("experts", func() (backend.Tensor, error) { return ea.ExpertsAdd(x, r, gateUp, down, first, add) })
	}
	return s.add(s.experts(x, r, gateUp, down, first), add)
}

// allReduce sums a partial result over the tensor-parallel group when the weights that made it were split.
func (s *step) allReduce(t backend.Tensor, partial bool) backend.Tensor {
	if s.err != nil || !partial || s.comm.Size() == 1 {
		return t
	}
	s.fail("all_reduce", s.ops.AllReduce(s.ctx, s.comm, t))
	return t
}

// allGather concatenates the ranks' column slices when the weights that made them were split.
func (s *step) allGather(t backend.Tensor, split bool) backend.Tensor {
	if !split || s.comm.Size() == 1 {
		return t
	}
	return s.do("all_gather", func() (backend.Tensor, error) { return s.ops.AllGather(s.ctx, s.comm, t) })
}
