package backendtest

import (
	"math"
	"slices"
	"sort"
)

// The reference implementations below compute in float64 from float32 inputs, as plainly as possible.
// They share no code with any backend.

// refLinear returns x [T, in] · w [out, in]ᵀ.
func refLinear(x, w []float32, T, in, out int) []float64 {
	y := make([]float64, T*out)
	for t := 0; t < T; t++ {
		for j := 0; j < out; j++ {
			var s float64
			for i := 0; i < in; i++ {
				s += float64(x[t*in+i]) * float64(w[j*in+i])
			}
			y[t*out+j] = s
		}
	}
	return y
}

// refRMSNorm normalises each row of n elements of x; weight may be nil.
func refRMSNorm(x, weight []float32, n int, eps float32) []float64 {
	y := make([]float64, len(x))
	for r := 0; r*n < len(x); r++ {
		var ss float64
		for i := 0; i < n; i++ {
			v := float64(x[r*n+i])
			ss += v * v
		}
		inv := 1 / math.Sqrt(ss/float64(n)+float64(eps))
		for i := 0; i < n; i++ {
			v := float64(x[r*n+i]) * inv
			if weight != nil {
				v *= float64(weight[i])
			}
			y[r*n+i] = v
		}
	}
	return y
}

func refSiLU(g float64) float64 { return g / (1 + math.Exp(-g)) }

func refSigmoid(v float64) float64 { return 1 / (1 + math.Exp(-v)) }

// refRoPE rotates the interleaved pairs of x [T, heads, D]. The angle is the float32 product of the
// position and the frequency, as the Ops contract says; the rest is float64.
func refRoPE(x []float32, pos []int, invFreq []float32, T, heads, D int) []float64 {
	y := make([]float64, len(x))
	for t := 0; t < T; t++ {
		for i := 0; i < D/2; i++ {
			theta := float64(float32(float32(pos[t]) * invFreq[i]))
			c, s := math.Cos(theta), math.Sin(theta)
			for h := 0; h < heads; h++ {
				o := (t*heads+h)*D + 2*i
				x0, x1 := float64(x[o]), float64(x[o+1])
				y[o] = x0*c - x1*s
				y[o+1] = x0*s + x1*c
			}
		}
	}
	return y
}

// refVisible is the window rule of backend.Window, restated.
func refVisible(chunk, query, key int) bool {
	if key > query {
		return false
	}
	return chunk == 0 || key/chunk == query/chunk
}

// refAttention attends q [T, heads, D] at positions pos over keys and values stored by position
// (keys[p] is [kvHeads·D], present for every appended position p).
func refAttention(q []float32, pos []int, keys, vals map[int][]float32, heads, kvHeads, D, chunk int, scale float32) []float64 {
	T := len(pos)
	y := make([]float64, T*heads*D)
	group := heads / kvHeads
	for t := 0; t < T; t++ {
		for h := 0; h < heads; h++ {
			kvh := h / group
			qv := q[(t*heads+h)*D : (t*heads+h+1)*D]
			var ps []int
			var scores []float64
			for p := range keys {
				if refVisible(chunk, pos[t], p) {
					ps = append(ps, p)
				}
			}
			sort.Ints(ps)
			m := math.Inf(-1)
			for _, p := range ps {
				var s float64
				for d := 0; d < D; d++ {
					s += float64(qv[d]) * float64(keys[p][kvh*D+d])
				}
				s *= float64(scale)
				scores = append(scores, s)
				m = math.Max(m, s)
			}
			var sum float64
			for i := range scores {
				scores[i] = math.Exp(scores[i] - m)
				sum += scores[i]
			}
			for i, p := range ps {
				for d := 0; d < D; d++ {
					y[(t*heads+h)*D+d] += scores[i] / sum * float64(vals[p][kvh*D+d])
				}
			}
		}
	}
	return y
}

// refRoute returns, for each row of logits [T, E], the k experts with the largest logits (ties: lower
// index first), in that order, and their sigmoid scores.
func refRoute(logits []float32, T, E, k int) (experts []int, scores []float64) {
	for t := 0; t < T; t++ {
		row := logits[t*E : (t+1)*E]
		idx := make([]int, E)
		for e := range idx {
			idx[e] = e
		}
		sort.SliceStable(idx, func(a, b int) bool { return row[idx[a]] > row[idx[b]] })
		for j := 0; j < k; j++ {
			experts = append(experts, idx[j])
			scores = append(scores, refSigmoid(float64(row[idx[j]])))
		}
	}
	return experts, scores
}

// refExperts computes the routed experts' output for x [T, H] with gateUp [E, H, 2I] and down [E, I, H]
// holding experts first .. first+E-1; experts and scores are refRoute's.
func refExperts(x []float32, experts []int, scores []float64, k int, gateUp, down []float32, T, H, E, I, first int) []float64 {
	y := make([]float64, T*H)
	for t := 0; t < T; t++ {
		for j := 0; j < k; j++ {
			e := experts[t*k+j] - first
			if e < 0 || e >= E {
				continue
			}
			u := make([]float64, H)
			for i := 0; i < H; i++ {
				u[i] = float64(x[t*H+i]) * scores[t*k+j]
			}
			act := make([]float64, I)
			for c := 0; c < I; c++ {
				var g, up float64
				for i := 0; i < H; i++ {
					g += u[i] * float64(gateUp[(e*H+i)*2*I+c])
					up += u[i] * float64(gateUp[(e*H+i)*2*I+I+c])
				}
				act[c] = up * refSiLU(g)
			}
			for o := 0; o < H; o++ {
				var s float64
				for c := 0; c < I; c++ {
					s += act[c] * float64(down[(e*I+c)*H+o])
				}
				y[t*H+o] += s
			}
		}
	}
	return y
}

// refArgmax is the first index of the largest value (-0 equals +0).
func refArgmax(row []float32) int {
	best := 0
	for i, v := range row {
		if v > row[best] {
			best = i
		}
	}
	return best
}

// refSampleRow is backend.Sampler's definition for one row, set up for one temperature and top-k: the
// kept ids in order (logit descending, ties by lower id) and their cumulative probabilities, in float64.
type refSampleRow struct {
	order []int
	cum   []float64
}

func newRefSampleRow(row []float32, temp float64, topK int) *refSampleRow {
	order := make([]int, len(row))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int {
		switch x, y := row[a], row[b]; {
		case x > y:
			return -1
		case x < y:
			return 1
		}
		return a - b
	})
	if topK > 0 && topK < len(order) {
		order = order[:topK]
	}
	top := float64(row[order[0]])
	w := make([]float64, len(order))
	var sum float64
	for i, id := range order {
		w[i] = math.Exp((float64(row[id]) - top) / temp)
		sum += w[i]
	}
	cum := make([]float64, len(order))
	var c float64
	for i := range w {
		c += w[i] / sum
		cum[i] = c
	}
	return &refSampleRow{order: order, cum: cum}
}

// pos is the position in r.order that draw u chooses with top-p p.
func (r *refSampleRow) pos(u, p float64) int {
	n, s := len(r.order), 1.0
	if p > 0 && p < 1 {
		for i, c := range r.cum {
			if c >= p {
				n = i + 1
				break
			}
		}
		s = r.cum[n-1]
	}
	x := u * s
	for i := range n {
		if r.cum[i] > x {
			return i
		}
	}
	return n - 1
}

// position returns id's position in r.order, or -1 when top-k dropped it.
func (r *refSampleRow) position(id int) int {
	for i, o := range r.order {
		if o == id {
			return i
		}
	}
	return -1
}
