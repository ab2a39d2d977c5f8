package cpu

import (
	"fmt"
	"math"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
)

// Embed gathers rows of table [V, H]: out[i] = table[ids[i]-first] when first <= ids[i] < first+V, else
// zeros. Returns [len(ids), H].
func (b *Backend) Embed(table backend.Tensor, ids []int, first int) (backend.Tensor, error) {
	tt, err := asTensor("embed", "table", table)
	if err != nil {
		return nil, err
	}
	if len(tt.shape) != 2 {
		return nil, fmt.Errorf("cpu: embed table%v: %w", tt.shape, backend.ErrShape)
	}
	V, H := tt.shape[0], tt.shape[1]
	out := alloc(len(ids), H)
	for i, id := range ids {
		r := id - first
		if id < first || r >= V {
			continue
		}
		copy(out.data[i*H:(i+1)*H], tt.data[r*H:(r+1)*H])
	}
	return out, nil
}

// RMSNorm normalises x over its last dimension, x · 1/sqrt(mean(x²) + eps) with the mean accumulated in
// float64, then multiplies by weight (shape = [last dim]) when weight is not nil.
func (b *Backend) RMSNorm(x, weight backend.Tensor, eps float32) (backend.Tensor, error) {
	xt, err := asTensor("rmsnorm", "x", x)
	if err != nil {
		return nil, err
	}
	var wd []float32
	if weight != nil {
		wt, err := asTensor("rmsnorm", "weight", weight)
		if err != nil {
			return nil, err
		}
		if len(xt.shape) == 0 || len(wt.shape) != 1 || wt.shape[0] != xt.shape[len(xt.shape)-1] {
			return nil, fmt.Errorf("cpu: rmsnorm x%v weight%v: %w", xt.shape, wt.shape, backend.ErrShape)
		}
		wd = wt.data
	}
	if len(xt.shape) == 0 {
		return nil, fmt.Errorf("cpu: rmsnorm x%v: %w", xt.shape, backend.ErrShape)
	}
	n := xt.shape[len(xt.shape)-1]
	out := alloc(slices.Clone(xt.shape)...)
	if n == 0 {
		return out, nil
	}
	rows := len(xt.data) / n
	b.parallel(rows, b.grain(rows, 2*n), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			src := xt.data[r*n : (r+1)*n]
			dst := out.data[r*n : (r+1)*n]
			var ss float64
			for _, v := range src {
				ss += float64(v) * float64(v)
			}
			inv := float32(1 / math.Sqrt(ss/float64(n)+float64(eps)))
			if wd == nil {
				for i, v := range src {
					dst[i] = v * inv
				}
				continue
			}
			for i, v := range src {
				dst[i] = (v * inv) * wd[i]
			}
		}
	})
	return out, nil
}

// Add returns a + b elementwise; the shapes must be equal.
func (b *Backend) Add(x, y backend.Tensor) (backend.Tensor, error) {
	return b.binary("add", x, y, func(dst, p, q []float32) {
		for i := range dst {
			dst[i] = p[i] + q[i]
		}
	})
}

// SiLUMul returns silu(gate) · up elementwise, silu(g) = g / (1 + e^-g) evaluated in float64 and
// rounded; the shapes must be equal.
func (b *Backend) SiLUMul(gate, up backend.Tensor) (backend.Tensor, error) {
	return b.binary("silumul", gate, up, siluMul)
}

// siluMul sets dst[i] = silu(gate[i]) · up[i].
func siluMul(dst, gate, up []float32) {
	up = up[:len(dst)]
	gate = gate[:len(dst)]
	for i := range dst {
		dst[i] = silu(gate[i]) * up[i]
	}
}

// silu returns g / (1 + e^-g) rounded to float32.
func silu(g float32) float32 {
	v := float64(g)
	return float32(v / (1 + math.Exp(-v)))
}

// binary applies the elementwise fn to two tensors of the same shape, in parallel blocks.
func (b *Backend) binary(op string, x, y backend.Tensor, fn func(dst, p, q []float32)) (backend.Tensor, error) {
	xt, err := asTensor(op, "a", x)
	if err != nil {
		return nil, err
	}
	yt, err := asTensor(op, "b", y)
	if err != nil {
		return nil, err
	}
	if !slices.Equal(xt.shape, yt.shape) {
		return nil, fmt.Errorf("cpu: %s a%v b%v: %w", op, xt.shape, yt.shape, backend.ErrShape)
	}
	out := alloc(slices.Clone(xt.shape)...)
	n := len(out.data)
	b.parallel(n, b.grain(n, 4), func(lo, hi int) {
		fn(out.data[lo:hi], xt.data[lo:hi], yt.data[lo:hi])
	})
	return out, nil
}

// ScaleRows multiplies row i of x ([T, ...]) by scale[i] (len T).
func (b *Backend) ScaleRows(x backend.Tensor, scale []float32) (backend.Tensor, error) {
	xt, err := asTensor("scalerows", "x", x)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) == 0 || xt.shape[0] != len(scale) {
		return nil, fmt.Errorf("cpu: scalerows x%v scale[%d]: %w", xt.shape, len(scale), backend.ErrShape)
	}
	out := alloc(slices.Clone(xt.shape)...)
	row, _ := numel(xt.shape[1:])
	for t, s := range scale {
		src := xt.data[t*row : (t+1)*row]
		dst := out.data[t*row : (t+1)*row]
		for i, v := range src {
			dst[i] = v * s
		}
	}
	return out, nil
}

// RoPE rotates the interleaved pairs (x[2i], x[2i+1]) of each head of x [T, heads, D] by the angle
// θ = float32(pos[t])·invFreq[i], a float32 product as in HF; cos θ and sin θ are evaluated in float64
// and rounded to float32, then the rotation is done in float32:
//
//	out[2i]   = x[2i]·cos θ − x[2i+1]·sin θ
//	out[2i+1] = x[2i]·sin θ + x[2i+1]·cos θ
func (b *Backend) RoPE(x backend.Tensor, pos []int, invFreq []float32) (backend.Tensor, error) {
	xt, err := asTensor("rope", "x", x)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 3 || xt.shape[0] != len(pos) || xt.shape[2]%2 != 0 || xt.shape[2]/2 != len(invFreq) {
		return nil, fmt.Errorf("cpu: rope x%v pos[%d] invFreq[%d]: %w", xt.shape, len(pos), len(invFreq), backend.ErrShape)
	}
	T, heads, D := xt.shape[0], xt.shape[1], xt.shape[2]
	half := D / 2
	out := alloc(T, heads, D)
	b.parallel(T, b.grain(T, heads*D+8*half), func(lo, hi int) {
		cos := make([]float32, half)
		sin := make([]float32, half)
		for t := lo; t < hi; t++ {
			p := float32(pos[t])
			for i, f := range invFreq {
				theta := float64(float32(p * f)) // the conversion forbids fusing into a wider op
				cos[i] = float32(math.Cos(theta))
				sin[i] = float32(math.Sin(theta))
			}
			for h := range heads {
				off := (t*heads + h) * D
				src := xt.data[off : off+D]
				dst := out.data[off : off+D]
				for i := range half {
					x0, x1 := src[2*i], src[2*i+1]
					dst[2*i] = x0*cos[i] - x1*sin[i]
					dst[2*i+1] = x0*sin[i] + x1*cos[i]
				}
			}
		}
	})
	return out, nil
}
