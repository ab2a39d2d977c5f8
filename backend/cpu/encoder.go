package cpu

import (
	"fmt"
	"math"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

var _ backend.EncoderOps = (*Backend)(nil)

// rowVector checks that v is [n] for the last dimension n of x and returns x's rows and n.
func rowVector(op string, xt, vt *tensor) (rows, n int, err error) {
	if len(xt.shape) == 0 || len(vt.shape) != 1 || vt.shape[0] != xt.shape[len(xt.shape)-1] {
		return 0, 0, fmt.Errorf("cpu: %s x%v vector%v: %w", op, xt.shape, vt.shape, backend.ErrShape)
	}
	n = vt.shape[0]
	if n == 0 {
		return 0, 0, nil
	}
	return len(xt.data) / n, n, nil
}

// LayerNorm normalises each row with its mean and biased variance accumulated in float64, then applies
// weight and bias.
func (b *Backend) LayerNorm(x, weight, bias backend.Tensor, eps float32) (backend.Tensor, error) {
	xt, err := asTensor("layernorm", "x", x)
	if err != nil {
		return nil, err
	}
	wt, err := asTensor("layernorm", "weight", weight)
	if err != nil {
		return nil, err
	}
	bt, err := asTensor("layernorm", "bias", bias)
	if err != nil {
		return nil, err
	}
	rows, n, err := rowVector("layernorm", xt, wt)
	if err != nil {
		return nil, err
	}
	if !slices.Equal(wt.shape, bt.shape) {
		return nil, fmt.Errorf("cpu: layernorm weight%v bias%v: %w", wt.shape, bt.shape, backend.ErrShape)
	}
	out := alloc(slices.Clone(xt.shape)...)
	b.parallel(rows, b.grain(rows, 3*n), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			src, dst := xt.data[r*n:(r+1)*n], out.data[r*n:(r+1)*n]
			var mean, vr float64
			for _, v := range src {
				mean += float64(v)
			}
			mean /= float64(n)
			for _, v := range src {
				d := float64(v) - mean
				vr += d * d
			}
			inv := 1 / math.Sqrt(vr/float64(n)+float64(eps))
			for i, v := range src {
				dst[i] = float32((float64(v)-mean)*inv)*wt.data[i] + bt.data[i]
			}
		}
	})
	return out, nil
}

// AddBias adds bias to every row of x.
func (b *Backend) AddBias(x, bias backend.Tensor) (backend.Tensor, error) {
	xt, err := asTensor("addbias", "x", x)
	if err != nil {
		return nil, err
	}
	bt, err := asTensor("addbias", "bias", bias)
	if err != nil {
		return nil, err
	}
	rows, n, err := rowVector("addbias", xt, bt)
	if err != nil {
		return nil, err
	}
	out := alloc(slices.Clone(xt.shape)...)
	b.parallel(rows, b.grain(rows, n), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			src, dst := xt.data[r*n:(r+1)*n], out.data[r*n:(r+1)*n]
			for i, v := range src {
				dst[i] = v + bt.data[i]
			}
		}
	})
	return out, nil
}

// GELU is 0.5·x·(1 + erf(x/√2)) evaluated in float64 and rounded.
func (b *Backend) GELU(x backend.Tensor) (backend.Tensor, error) {
	xt, err := asTensor("gelu", "x", x)
	if err != nil {
		return nil, err
	}
	out := alloc(slices.Clone(xt.shape)...)
	n := len(xt.data)
	b.parallel(n, b.grain(n, 8), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(xt.data[i])
			out.data[i] = float32(0.5 * v * (1 + math.Erf(v/math.Sqrt2)))
		}
	})
	return out, nil
}

// RotatePairs rotates pair i of every head of row t by the angle whose cosine and sine are cos[t, i] and
// sin[t, i], in float32.
func (b *Backend) RotatePairs(x, cos, sin backend.Tensor) (backend.Tensor, error) {
	xt, err := asTensor("rotatepairs", "x", x)
	if err != nil {
		return nil, err
	}
	ct, err := asTensor("rotatepairs", "cos", cos)
	if err != nil {
		return nil, err
	}
	st, err := asTensor("rotatepairs", "sin", sin)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 3 || xt.shape[2]%2 != 0 || !slices.Equal(ct.shape, []int{xt.shape[0], xt.shape[2] / 2}) || !slices.Equal(ct.shape, st.shape) {
		return nil, fmt.Errorf("cpu: rotatepairs x%v cos%v sin%v: %w", xt.shape, ct.shape, st.shape, backend.ErrShape)
	}
	T, heads, D := xt.shape[0], xt.shape[1], xt.shape[2]
	out := alloc(T, heads, D)
	b.parallel(T, b.grain(T, heads*D), func(lo, hi int) {
		for t := lo; t < hi; t++ {
			cs, sn := ct.data[t*D/2:(t+1)*D/2], st.data[t*D/2:(t+1)*D/2]
			for h := range heads {
				src, dst := xt.data[(t*heads+h)*D:], out.data[(t*heads+h)*D:]
				for i := range D / 2 {
					a, c := src[2*i], src[2*i+1]
					dst[2*i] = a*cs[i] - c*sn[i]
					dst[2*i+1] = a*sn[i] + c*cs[i]
				}
			}
		}
	})
	return out, nil
}

// FullAttention computes each (query row, head) in float32 with the softmax's exponentials and sum in
// float64, one goroutine block per set of query rows.
func (b *Backend) FullAttention(q, k, v backend.Tensor, seq int, scale float32) (backend.Tensor, error) {
	var ts [3]*tensor
	for i, x := range []backend.Tensor{q, k, v} {
		t, err := asTensor("fullattention", [3]string{"q", "k", "v"}[i], x)
		if err != nil {
			return nil, err
		}
		ts[i] = t
	}
	qt, kt, vt := ts[0], ts[1], ts[2]
	if len(qt.shape) != 3 || !slices.Equal(qt.shape, kt.shape) || !slices.Equal(qt.shape, vt.shape) || seq <= 0 || qt.shape[0]%seq != 0 {
		return nil, fmt.Errorf("cpu: fullattention q%v k%v v%v seq %d: %w", qt.shape, kt.shape, vt.shape, seq, backend.ErrShape)
	}
	T, heads, D := qt.shape[0], qt.shape[1], qt.shape[2]
	out := alloc(T, heads, D)
	b.parallel(T, b.grain(T, 2*seq*heads*D), func(lo, hi int) {
		scores := make([]float32, seq)
		for i := lo; i < hi; i++ {
			first := i / seq * seq
			for h := range heads {
				qi := qt.data[(i*heads+h)*D : (i*heads+h+1)*D]
				mx := float32(math.Inf(-1))
				for j := range seq {
					kj := kt.data[((first+j)*heads+h)*D:]
					var s float32
					for e, qv := range qi {
						s += qv * kj[e]
					}
					scores[j] = s * scale
					mx = max(mx, scores[j])
				}
				var sum float64
				for j := range scores {
					e := math.Exp(float64(scores[j] - mx))
					scores[j] = float32(e)
					sum += e
				}
				o := out.data[(i*heads+h)*D : (i*heads+h+1)*D]
				for j, p := range scores {
					p = float32(float64(p) / sum)
					vj := vt.data[((first+j)*heads+h)*D:]
					for e := range o {
						o[e] += p * vj[e]
					}
				}
			}
		}
	})
	return out, nil
}
