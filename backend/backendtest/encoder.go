package backendtest

import (
	"fmt"
	"math"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
)

// testEncoder checks backend.EncoderOps (LayerNorm, AddBias, GELU, RotatePairs, FullAttention) against
// float64 references; a backend without the capability skips it (it is optional).
func (s *suite) testEncoder(t *testing.T) {
	enc, ok := s.ops.(backend.EncoderOps)
	if !ok {
		t.Skipf("%s has no backend.EncoderOps", s.ops.Name())
	}
	t.Run("LayerNorm", func(t *testing.T) { s.testLayerNorm(t, enc) })
	t.Run("AddBiasGELU", func(t *testing.T) { s.testAddBiasGELU(t, enc) })
	t.Run("RotatePairs", func(t *testing.T) { s.testRotatePairs(t, enc) })
	t.Run("FullAttention", func(t *testing.T) { s.testFullAttention(t, enc) })
}

func (s *suite) testLayerNorm(t *testing.T, enc backend.EncoderOps) {
	r := rng(t)
	// 80 rows: above the 64 rows a device backend may keep in float32.
	for _, shape := range [][]int{{1, 64}, {3, 88}, {80, 96}, {2, 3, 16}} {
		n := shape[len(shape)-1]
		xv, wv, bv := uniform(r, numel(shape), 3), uniform(r, n, 2), uniform(r, n, 1)
		for i := range xv {
			xv[i] += 1.5 // a mean far from 0, which the variance must not see
		}
		s.poison(t, len(xv))
		y, err := enc.LayerNorm(s.tensor(t, shape, xv), s.tensor(t, []int{n}, wv), s.tensor(t, []int{n}, bv), 1e-5)
		if err != nil {
			t.Fatalf("LayerNorm(%v) error: %v", shape, err)
		}
		s.close(t, fmt.Sprintf("LayerNorm(%v)", shape), s.read(t, "LayerNorm", y, shape...), refLayerNorm(xv, wv, bv, n, 1e-5))
	}
	x := s.tensor(t, []int{3, 64}, uniform(r, 3*64, 1))
	w := s.tensor(t, []int{64}, uniform(r, 64, 1))
	for _, bshape := range [][]int{{63}, {1, 64}} {
		b := s.tensor(t, bshape, make([]float32, numel(bshape)))
		wantShapeErr(t, fmt.Sprintf("LayerNorm([3 64], bias %v)", bshape), func() error {
			_, err := enc.LayerNorm(x, w, b, 1e-5)
			return err
		})
	}
}

func (s *suite) testAddBiasGELU(t *testing.T, enc backend.EncoderOps) {
	r := rng(t)
	for _, shape := range [][]int{{1, 8}, {5, 40}, {70, 32}} {
		n := shape[len(shape)-1]
		xv, bv := uniform(r, numel(shape), 4), uniform(r, n, 1)
		x := s.tensor(t, shape, xv)
		y, err := enc.AddBias(x, s.tensor(t, []int{n}, bv))
		if err != nil {
			t.Fatalf("AddBias(%v) error: %v", shape, err)
		}
		want := make([]float64, len(xv))
		for i, v := range xv {
			want[i] = float64(v) + float64(bv[i%n])
		}
		s.close(t, fmt.Sprintf("AddBias(%v)", shape), s.read(t, "AddBias", y, shape...), want)
		g, err := enc.GELU(x)
		if err != nil {
			t.Fatalf("GELU(%v) error: %v", shape, err)
		}
		for i, v := range xv {
			want[i] = 0.5 * float64(v) * (1 + math.Erf(float64(v)/math.Sqrt2))
		}
		s.close(t, fmt.Sprintf("GELU(%v)", shape), s.read(t, "GELU", g, shape...), want)
	}
	x := s.tensor(t, []int{3, 8}, make([]float32, 24))
	wantShapeErr(t, "AddBias([3 8], bias [7])", func() error {
		_, err := enc.AddBias(x, s.tensor(t, []int{7}, make([]float32, 7)))
		return err
	})
}

func (s *suite) testRotatePairs(t *testing.T, enc backend.EncoderOps) {
	r := rng(t)
	T, heads, D := 9, 3, 12
	xv := uniform(r, T*heads*D, 2)
	cv, sv := make([]float32, T*D/2), make([]float32, T*D/2)
	for i := range cv {
		a := float64(uniform(r, 1, 6)[0])
		cv[i], sv[i] = float32(math.Cos(a)), float32(math.Sin(a))
	}
	y, err := enc.RotatePairs(s.tensor(t, []int{T, heads, D}, xv), s.tensor(t, []int{T, D / 2}, cv), s.tensor(t, []int{T, D / 2}, sv))
	if err != nil {
		t.Fatalf("RotatePairs error: %v", err)
	}
	want := make([]float64, len(xv))
	for tt := range T {
		for h := range heads {
			for p := range D / 2 {
				e := (tt*heads+h)*D + 2*p
				c, sn := float64(cv[tt*D/2+p]), float64(sv[tt*D/2+p])
				want[e] = float64(xv[e])*c - float64(xv[e+1])*sn
				want[e+1] = float64(xv[e])*sn + float64(xv[e+1])*c
			}
		}
	}
	s.close(t, "RotatePairs", s.read(t, "RotatePairs", y, T, heads, D), want)
	wantShapeErr(t, "RotatePairs(cos of the wrong length)", func() error {
		bad := s.tensor(t, []int{T, D/2 - 1}, make([]float32, T*(D/2-1)))
		_, err := enc.RotatePairs(s.tensor(t, []int{T, heads, D}, xv), bad, bad)
		return err
	})
}

func (s *suite) testFullAttention(t *testing.T, enc backend.EncoderOps) {
	r := rng(t)
	// Sequences whose length is not a multiple of a device's query or key tiles; Llama 4's vision head
	// width 88; several sequences that must not see each other.
	for _, c := range []struct{ S, seq, heads, D int }{{1, 1, 1, 8}, {2, 37, 2, 8}, {3, 17, 2, 88}, {1, 70, 1, 128}} {
		n := c.S * c.seq * c.heads * c.D
		qv, kv, vv := uniform(r, n, 2), uniform(r, n, 2), uniform(r, n, 1)
		shape := []int{c.S * c.seq, c.heads, c.D}
		scale := float32(1 / math.Sqrt(float64(c.D)))
		s.poison(t, n)
		y, err := enc.FullAttention(s.tensor(t, shape, qv), s.tensor(t, shape, kv), s.tensor(t, shape, vv), c.seq, scale)
		if err != nil {
			t.Fatalf("FullAttention(%+v) error: %v", c, err)
		}
		s.close(t, fmt.Sprintf("FullAttention(%+v)", c), s.read(t, "FullAttention", y, shape...),
			refFullAttention(qv, kv, vv, c.S, c.seq, c.heads, c.D, scale))
	}
	x := s.tensor(t, []int{10, 1, 8}, make([]float32, 80))
	wantShapeErr(t, "FullAttention(10 rows, seq 4)", func() error {
		_, err := enc.FullAttention(x, x, x, 4, 1)
		return err
	})
}

// refLayerNorm is nn.LayerNorm over rows of n.
func refLayerNorm(x, w, b []float32, n int, eps float64) []float64 {
	y := make([]float64, len(x))
	for r := 0; r*n < len(x); r++ {
		var mean, vr float64
		for i := range n {
			mean += float64(x[r*n+i])
		}
		mean /= float64(n)
		for i := range n {
			d := float64(x[r*n+i]) - mean
			vr += d * d
		}
		inv := 1 / math.Sqrt(vr/float64(n)+eps)
		for i := range n {
			y[r*n+i] = (float64(x[r*n+i])-mean)*inv*float64(w[i]) + float64(b[i])
		}
	}
	return y
}

// refFullAttention is unmasked softmax attention within each of S sequences of seq rows.
func refFullAttention(q, k, v []float32, S, seq, heads, D int, scale float32) []float64 {
	out := make([]float64, len(q))
	p := make([]float64, seq)
	for s := range S {
		for i := range seq {
			for h := range heads {
				at := func(row, e int) int { return ((s*seq+row)*heads+h)*D + e }
				mx := math.Inf(-1)
				for j := range seq {
					var d float64
					for e := range D {
						d += float64(q[at(i, e)]) * float64(k[at(j, e)])
					}
					p[j] = d * float64(scale)
					mx = max(mx, p[j])
				}
				var sum float64
				for j := range seq {
					p[j] = math.Exp(p[j] - mx)
					sum += p[j]
				}
				for e := range D {
					var o float64
					for j := range seq {
						o += p[j] / sum * float64(v[at(j, e)])
					}
					out[at(i, e)] = o
				}
			}
		}
	}
	return out
}
