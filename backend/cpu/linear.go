package cpu

import (
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// Linear computes x · wᵀ for x [T, in] and w [out, in] → [T, out]. A quantised w (LoadQuantized) holds
// its dequantised values; with DynamicActivations the rows of x are quantised to FP8 per token first.
//
// The output columns (rows of w) are split into blocks over the Backend's threads. Inside a block, a
// tile of w rows small enough for L1 is multiplied with every row of a tile of x, so each weight row is
// read from memory once per x tile rather than once per token. Every output element is one dot product,
// computed by dot in a fixed order, so the result does not depend on Threads, on T or on the tiling.
//
// A register-blocked kernel (4 rows of x against one weight row, 16 accumulators) was measured slower
// than this one: Go's register allocator spills the accumulators, and the scalar dot product is bound
// by add latency, not by loads, once the weight tile sits in cache.
func (b *Backend) Linear(x, w backend.Tensor) (backend.Tensor, error) {
	xt, err := asTensor("linear", "x", x)
	if err != nil {
		return nil, err
	}
	wt, err := asTensor("linear", "w", w)
	if err != nil {
		return nil, err
	}
	if len(xt.shape) != 2 || len(wt.shape) != 2 || xt.shape[1] != wt.shape[1] {
		return nil, fmt.Errorf("cpu: linear x%v w%v: %w", xt.shape, wt.shape, backend.ErrShape)
	}
	T, in, out := xt.shape[0], xt.shape[1], wt.shape[0]
	y := alloc(T, out)
	b.matmulT(y.data, actRows(xt.data, in, wt.format), wt.data, T, in, out)
	return y, nil
}

// Tile sizes for matmulT, in float32 elements: a w tile fits L1 (with room for the x row), an x tile
// fits L2.
const (
	wTileElems = 6 << 10
	xTileElems = 64 << 10
)

// matmulT sets y [T, out] = x [T, in] · w [out, in]ᵀ.
func (b *Backend) matmulT(y, x, w []float32, T, in, out int) {
	if T == 0 || out == 0 {
		return
	}
	wTile := max(1, wTileElems/max(in, 1))
	xTile := max(1, xTileElems/max(in, 1))
	b.parallel(out, b.grain(out, T*in), func(lo, hi int) {
		for t0 := 0; t0 < T; t0 += xTile {
			t1 := min(t0+xTile, T)
			for j0 := lo; j0 < hi; j0 += wTile {
				j1 := min(j0+wTile, hi)
				for t := t0; t < t1; t++ {
					xr := x[t*in : (t+1)*in]
					yr := y[t*out : (t+1)*out]
					for j := j0; j < j1; j++ {
						yr[j] = dot(xr, w[j*in:(j+1)*in])
					}
				}
			}
		}
	})
}

// dot returns Σ x[i]·w[i] over len(x) elements (w must be at least as long) in float32, with four
// independent accumulators over the elements i ≡ 0, 1, 2, 3 (mod 4), combined as (a0+a1)+(a2+a3),
// then the tail added in order. The order is fixed: callers rely on it for bit-identical results.
func dot(x, w []float32) float32 {
	n := len(x)
	w = w[:n]
	var a0, a1, a2, a3 float32
	i := 0
	for ; i+4 <= n; i += 4 {
		a0 += x[i] * w[i]
		a1 += x[i+1] * w[i+1]
		a2 += x[i+2] * w[i+2]
		a3 += x[i+3] * w[i+3]
	}
	s := (a0 + a1) + (a2 + a3)
	for ; i < n; i++ {
		s += x[i] * w[i]
	}
	return s
}

// axpy adds a·x to y elementwise (len(x) elements; y must be at least as long).
func axpy(y []float32, a float32, x []float32) {
	n := len(x)
	y = y[:n]
	i := 0
	for ; i+4 <= n; i += 4 {
		y[i] += a * x[i]
		y[i+1] += a * x[i+1]
		y[i+2] += a * x[i+2]
		y[i+3] += a * x[i+3]
	}
	for ; i < n; i++ {
		y[i] += a * x[i]
	}
}
