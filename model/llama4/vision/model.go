package vision

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Model is the vision tower and projector, loaded on the host. Its methods are safe for concurrent use:
// the weights are read-only after Load.
type Model struct {
	Config Config
	w      *tree
	// cos and sin of the 2-D RoPE angle of each position (patches, then CLS) and pair: [positions][pairs].
	cos, sin [][]float32
}

// Load reads the vision tower and projector of cfg from ckpt (whole tensors, no prefix).
func Load(ctx context.Context, ckpt *safetensors.Checkpoint, cfg Config) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	t := cfg.Tree()
	specs, err := t.Tensors()
	if err != nil {
		return nil, err
	}
	w := &checkpointWeights{ckpt: ckpt, shapes: map[string][]int{}}
	for _, s := range specs {
		w.shapes[s.Name] = s.Shape
	}
	if err := model.Load(ctx, t, model.Weights[Tensor](w)); err != nil {
		return nil, fmt.Errorf("vision: %w", err)
	}
	m := &Model{Config: cfg, w: t.Root.(*tree)}
	m.cos, m.sin = rope(cfg)
	return m, nil
}

// rope is spec §6.2's 2-D RoPE table: for patch n (row n / grid, column n % grid) pair p of the first
// half rotates by (column+1)·θ_p, pair p of the second half by (row+1)·θ_p, θ_p = theta^(−2p/(D/2)) for
// the D/4 base frequencies; the CLS position (last) is not rotated. Frequencies and angles are float32,
// as HF builds them.
func rope(c Config) (cos, sin [][]float32) {
	d := c.HeadDim()
	freqDim := d / 2
	base := make([]float32, freqDim/2)
	for i := range base {
		e := float32(2*i) / float32(freqDim)
		base[i] = float32(1 / float32(math.Pow(c.RopeTheta, float64(e))))
	}
	g := c.Grid()
	n := g*g + 1
	cos, sin = make([][]float32, n), make([][]float32, n)
	for pos := range n {
		cos[pos], sin[pos] = make([]float32, freqDim), make([]float32, freqDim)
		for p := range freqDim {
			var angle float32
			if pos < g*g {
				if p < freqDim/2 {
					angle = float32(pos%g+1) * base[p]
				} else {
					angle = float32(pos/g+1) * base[p-freqDim/2]
				}
			}
			cos[pos][p] = float32(math.Cos(float64(angle)))
			sin[pos][p] = float32(math.Sin(float64(angle)))
		}
	}
	return cos, sin
}

// Features runs the tower, the adapter and the projector over pixel values [tiles, channels, size,
// size] and returns [tiles·TokensPerTile, text hidden]: one text-embedding row per <|patch|> slot, tile
// by tile in the order of pixels (spec §6.4's projected features).
func (m *Model) Features(ctx context.Context, pixels []float32, tiles int) ([]float32, error) {
	c := m.Config
	tile := c.NumChannels * c.ImageSize * c.ImageSize
	if tiles <= 0 || len(pixels) != tiles*tile {
		return nil, fmt.Errorf("%w: %d pixel values for %d tiles of %d×%d×%d", ErrInput, len(pixels), tiles, c.NumChannels, c.ImageSize, c.ImageSize)
	}
	per := c.TokensPerTile() * c.TextHiddenSize
	out := make([]float32, tiles*per)
	for t := range tiles {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		copy(out[t*per:], m.tile(pixels[t*tile:(t+1)*tile]))
	}
	return out, nil
}

// tile is the forward pass of one tile (spec §6.2, then the projector of §6.4).
func (m *Model) tile(pix []float32) []float32 {
	c, w := m.Config, &m.w.Tower
	g, p, hid := c.Grid(), c.PatchSize, c.HiddenSize
	np := g * g
	n := np + 1
	in := c.NumChannels * p * p
	// unfold: patch row*g+col, feature ch·p² + ky·p + kx
	patches := make([]float32, np*in)
	for row := range g {
		for col := range g {
			dst := patches[(row*g+col)*in:]
			for ch := range c.NumChannels {
				for ky := range p {
					src := pix[(ch*c.ImageSize+row*p+ky)*c.ImageSize+col*p:]
					copy(dst[(ch*p+ky)*p:(ch*p+ky+1)*p], src[:p])
				}
			}
		}
	}
	x := make([]float32, n*hid)
	copy(x, linear(patches, np, w.Patch.T, nil))
	copy(x[np*hid:], w.Class.T.Data) // CLS is appended last
	for i := range x {
		x[i] += w.Pos.T.Data[i]
	}
	x = layerNorm(x, hid, w.PreW.T.Data, w.PreB.T.Data)
	for i := range w.Layers {
		x = m.layer(&w.Layers[i], x, n)
	}
	x = layerNorm(x, hid, w.PostW.T.Data, w.PostB.T.Data)[:np*hid] // drop CLS
	x = pixelShuffle(x, g, hid)
	tokens := np / 4
	x = gelu(linear(x, tokens, w.Adapter.FC1.T, nil))
	x = gelu(linear(x, tokens, w.Adapter.FC2.T, nil))
	return linear(x, tokens, m.w.Projector.T, nil)
}

// layer is one encoder layer: x + attention(LN1(x)), then + fc2(GELU(fc1(LN2(x)))).
func (m *Model) layer(l *layerWeights, x []float32, n int) []float32 {
	c := m.Config
	hid, heads, d := c.HiddenSize, c.NumHeads, c.HeadDim()
	h := layerNorm(x, hid, l.LN1W.T.Data, l.LN1B.T.Data)
	q := linear(h, n, l.QW.T, l.QB.T.Data)
	k := linear(h, n, l.KW.T, l.KB.T.Data)
	v := linear(h, n, l.VW.T, l.VB.T.Data)
	for pos := range n { // RoPE on interleaved pairs of every head
		cs, sn := m.cos[pos], m.sin[pos]
		for hd := range heads {
			for _, t := range [][]float32{q, k} {
				row := t[pos*hid+hd*d:]
				for i := range d / 2 {
					a, b := row[2*i], row[2*i+1]
					row[2*i] = a*cs[i] - b*sn[i]
					row[2*i+1] = a*sn[i] + b*cs[i]
				}
			}
		}
	}
	att := make([]float32, n*hid)
	scale := float32(1 / math.Sqrt(float64(d)))
	parallel(n, func(i int) { // bidirectional: every position sees every other
		scores := make([]float32, n)
		for hd := range heads {
			qi := q[i*hid+hd*d : i*hid+hd*d+d]
			mx := float32(math.Inf(-1))
			for j := range n {
				kj := k[j*hid+hd*d : j*hid+hd*d+d]
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
			o := att[i*hid+hd*d : i*hid+hd*d+d]
			for j, p := range scores {
				p = float32(float64(p) / sum)
				vj := v[j*hid+hd*d : j*hid+hd*d+d]
				for e := range o {
					o[e] += p * vj[e]
				}
			}
		}
	})
	o := linear(att, n, l.OW.T, l.OB.T.Data)
	for i := range x {
		x[i] += o[i]
	}
	h = layerNorm(x, hid, l.LN2W.T.Data, l.LN2B.T.Data)
	f := linear(gelu(linear(h, n, l.FC1W.T, l.FC1B.T.Data)), n, l.FC2W.T, l.FC2B.T.Data)
	for i := range x {
		x[i] += f[i]
	}
	return x
}

// pixelShuffle is HF's pixel_shuffle with ratio 0.5 (spec §6.2): [g·g, c] → [(g/2)², 4c], output token
// (y, x) concatenating input (2y, 2x), (2y, 2x+1), (2y+1, 2x), (2y+1, 2x+1).
func pixelShuffle(x []float32, g, c int) []float32 {
	h := g / 2
	out := make([]float32, h*h*4*c)
	for y := range h {
		for xx := range h {
			dst := out[(y*h+xx)*4*c:]
			for b := range 4 {
				src := ((2*y+b/2)*g + 2*xx + b%2) * c
				copy(dst[b*c:(b+1)*c], x[src:src+c])
			}
		}
	}
	return out
}

// linear is x [rows, in] · wᵀ (w [out, in]) + bias (nil: none), accumulated in float64.
func linear(x []float32, rows int, w Tensor, bias []float32) []float32 {
	out, in := w.Shape[0], w.Shape[1]
	y := make([]float32, rows*out)
	parallel(rows, func(r int) {
		xr := x[r*in : (r+1)*in]
		for o := range out {
			wr := w.Data[o*in : (o+1)*in]
			var s float64
			for i, v := range xr {
				s += float64(v) * float64(wr[i])
			}
			if bias != nil {
				s += float64(bias[o])
			}
			y[r*out+o] = float32(s)
		}
	})
	return y
}

// layerNorm normalises each row of width n to zero mean and unit variance (biased, eps LayerNormEps),
// then applies weight and bias.
func layerNorm(x []float32, n int, weight, bias []float32) []float32 {
	y := make([]float32, len(x))
	for r := 0; r < len(x); r += n {
		row := x[r : r+n]
		var mean, vr float64
		for _, v := range row {
			mean += float64(v)
		}
		mean /= float64(n)
		for _, v := range row {
			d := float64(v) - mean
			vr += d * d
		}
		inv := 1 / math.Sqrt(vr/float64(n)+LayerNormEps)
		for i, v := range row {
			y[r+i] = float32((float64(v)-mean)*inv)*weight[i] + bias[i]
		}
	}
	return y
}

// gelu is the exact (erf) GELU of nn.GELU(), in place.
func gelu(x []float32) []float32 {
	for i, v := range x {
		x[i] = float32(0.5 * float64(v) * (1 + math.Erf(float64(v)/math.Sqrt2)))
	}
	return x
}

// parallel runs f(0..n-1) over the CPU's cores and waits for all.
func parallel(n int, f func(i int)) {
	workers := min(runtime.GOMAXPROCS(0), n)
	if workers <= 1 {
		for i := range n {
			f(i)
		}
		return
	}
	var wg sync.WaitGroup
	for k := range workers {
		wg.Go(func() {
			for i := k; i < n; i += workers {
				f(i)
			}
		})
	}
	wg.Wait()
}
