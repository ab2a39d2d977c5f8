package vision

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// MaxTilesPerPass is the most tiles Features runs through the encoder in one batch: more are split into
// passes of this many (the activations of one pass grow with it: 16 tiles of Scout's 336-pixel tower
// are about 9,200 rows of 5,632 float32 MLP values, 210 MB).
const MaxTilesPerPass = 16

// Model is the vision tower and projector, loaded on a backend. Its methods are safe for concurrent use
// (they take turns on the backend), but the backend must not be driven by another goroutine meanwhile.
type Model struct {
	Config Config
	ops    backend.Ops
	enc    backend.EncoderOps
	w      *tree
	// base is what is added to a tile's embedded patches [positions, hidden]: the positional embedding,
	// plus the class embedding on the CLS row (last; its patch row is zeros).
	base backend.Tensor
	// cos and sin of the 2-D RoPE angle of each position (patches, then CLS) and pair: [positions, D/2].
	cos, sin backend.Tensor
	mu       sync.Mutex
}

// Load reads the vision tower and projector of cfg from ckpt (whole tensors, no prefix) into ops, which
// must implement backend.EncoderOps (cpu and cuda do). The weights keep the checkpoint's dtype where the
// backend does (bf16 on cuda; cpu holds float32). Every rank of a tensor-parallel group holds the whole
// tower: it is small (Scout's is 0.9 GB in bf16) and one pass per image is short.
func Load(ctx context.Context, ops backend.Ops, ckpt *safetensors.Checkpoint, cfg Config) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	specs, err := cfg.Tree().Tensors()
	if err != nil {
		return nil, err
	}
	w := &checkpointWeights{ckpt: ckpt, ops: ops, shapes: map[string][]int{}}
	for _, s := range specs {
		w.shapes[s.Name] = s.Shape
	}
	return load(ctx, ops, cfg, w)
}

// Random makes a tower and projector of cfg with random bf16 weights from seed (matrices ~ N(0,
// 1/fan_in), norm weights near 1, small biases and embeddings): for benchmarks of a configuration without
// its checkpoint.
func Random(ctx context.Context, ops backend.Ops, cfg Config, seed uint64) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	specs, err := cfg.Tree().Tensors()
	if err != nil {
		return nil, err
	}
	w := &randomWeights{ops: ops, seed: seed, shapes: map[string][]int{}}
	for _, s := range specs {
		w.shapes[s.Name] = s.Shape
	}
	return load(ctx, ops, cfg, w)
}

// load fills cfg's tree from w.
func load(ctx context.Context, ops backend.Ops, cfg Config, w model.Weights[backend.Tensor]) (*Model, error) {
	enc, ok := ops.(backend.EncoderOps)
	if !ok {
		return nil, fmt.Errorf("vision: backend %s has no encoder ops (LayerNorm, GELU, full attention): %w", ops.Name(), errors.ErrUnsupported)
	}
	t := cfg.Tree()
	if err := model.Load(ctx, t, w); err != nil {
		return nil, fmt.Errorf("vision: %w", err)
	}
	m := &Model{Config: cfg, ops: ops, enc: enc, w: t.Root.(*tree)}
	if err := m.tables(); err != nil {
		return nil, fmt.Errorf("vision: %w", err)
	}
	return m, nil
}

// tables makes base, cos and sin on the backend.
func (m *Model) tables() error {
	c := m.Config
	hid, np := c.HiddenSize, c.Grid()*c.Grid()
	pos, err := m.ops.Float32(m.w.Tower.Pos.T)
	if err != nil {
		return err
	}
	class, err := m.ops.Float32(m.w.Tower.Class.T)
	if err != nil {
		return err
	}
	for i, v := range class {
		pos[np*hid+i] += v
	}
	if m.base, err = m.ops.FromFloat32([]int{np + 1, hid}, pos); err != nil {
		return err
	}
	cos, sin := rope(c)
	flat := func(rows [][]float32) []float32 {
		var out []float32
		for _, r := range rows {
			out = append(out, r...)
		}
		return out
	}
	if m.cos, err = m.ops.FromFloat32([]int{np + 1, c.HeadDim() / 2}, flat(cos)); err != nil {
		return err
	}
	m.sin, err = m.ops.FromFloat32([]int{np + 1, c.HeadDim() / 2}, flat(sin))
	return err
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
// by tile in the order of pixels (spec §6.4's projected features). The tiles go through the encoder
// together (MaxTilesPerPass at a time): every Linear sees all their rows, attention stays within a tile.
func (m *Model) Features(ctx context.Context, pixels []float32, tiles int) ([]float32, error) {
	c := m.Config
	tile := c.NumChannels * c.ImageSize * c.ImageSize
	if tiles <= 0 || len(pixels) != tiles*tile {
		return nil, fmt.Errorf("%w: %d pixel values for %d tiles of %d×%d×%d", ErrInput, len(pixels), tiles, c.NumChannels, c.ImageSize, c.ImageSize)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	per := c.TokensPerTile() * c.TextHiddenSize
	out := make([]float32, 0, tiles*per)
	for first := 0; first < tiles; first += MaxTilesPerPass {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(MaxTilesPerPass, tiles-first)
		f, err := m.pass(pixels[first*tile:(first+n)*tile], n)
		if err != nil {
			return nil, fmt.Errorf("vision: tiles %d..%d on %s: %w", first, first+n-1, m.ops.Name(), err)
		}
		out = append(out, f...)
	}
	return out, nil
}

// unfold cuts each tile into patches, one row each (patch row·g+col, feature ch·p² + ky·p + kx: the
// Conv2d-as-Linear layout of spec §6.2), with a zero row after each tile's patches where the CLS token
// goes: [tiles·(g²+1), channels·p²].
func unfold(c Config, pix []float32, tiles int) []float32 {
	g, p := c.Grid(), c.PatchSize
	n, in := g*g+1, c.NumChannels*p*p
	size := c.NumChannels * c.ImageSize * c.ImageSize
	out := make([]float32, tiles*n*in)
	for t := range tiles {
		src0 := pix[t*size:]
		for row := range g {
			for col := range g {
				dst := out[(t*n+row*g+col)*in:]
				for ch := range c.NumChannels {
					for ky := range p {
						src := src0[(ch*c.ImageSize+row*p+ky)*c.ImageSize+col*p:]
						copy(dst[(ch*p+ky)*p:(ch*p+ky+1)*p], src[:p])
					}
				}
			}
		}
	}
	return out
}

// shuffleRows is HF's pixel_shuffle with ratio 0.5 (spec §6.2) as a row gather: the encoder's output rows
// [tiles·(g²+1), c] taken in this order and viewed as [tiles·(g/2)², 4c] give, for output token (y, x)
// of a tile, input patches (2y, 2x), (2y, 2x+1), (2y+1, 2x), (2y+1, 2x+1) side by side. CLS rows are left
// out.
func shuffleRows(g, tiles int) []int {
	h, n := g/2, g*g+1
	out := make([]int, 0, tiles*g*g)
	for t := range tiles {
		for y := range h {
			for x := range h {
				for b := range 4 {
					out = append(out, t*n+(2*y+b/2)*g+2*x+b%2)
				}
			}
		}
	}
	return out
}

// pass is the forward pass of tiles tiles (spec §6.2, then the projector of §6.4).
func (m *Model) pass(pix []float32, tiles int) ([]float32, error) {
	c, w := m.Config, &m.w.Tower
	g, hid := c.Grid(), c.HiddenSize
	n := g*g + 1
	s := &step{ops: m.ops, enc: m.enc}
	patches := s.do("unfold", func() (backend.Tensor, error) {
		return m.ops.FromFloat32([]int{tiles * n, c.NumChannels * c.PatchSize * c.PatchSize}, unfold(c, pix, tiles))
	})
	x := s.linear(patches, w.Patch.T)
	x = s.add(x, s.repeat(m.base, tiles))
	x = s.layerNorm(x, w.PreW.T, w.PreB.T)
	cos, sin := s.repeat(m.cos, tiles), s.repeat(m.sin, tiles)
	for i := range w.Layers {
		x = m.layer(s, &w.Layers[i], x, cos, sin, tiles*n, n)
	}
	x = s.layerNorm(x, w.PostW.T, w.PostB.T)
	x = s.do("pixel_shuffle", func() (backend.Tensor, error) { return m.ops.Embed(x, shuffleRows(g, tiles), 0) })
	x = s.do("pixel_shuffle", func() (backend.Tensor, error) { return m.ops.Reshape(x, tiles*c.TokensPerTile(), 4*hid) })
	x = s.gelu(s.linear(x, w.Adapter.FC1.T))
	x = s.gelu(s.linear(x, w.Adapter.FC2.T))
	x = s.linear(x, m.w.Projector.T)
	if s.err != nil {
		return nil, s.err
	}
	return m.ops.Float32(x)
}

// layer is one encoder layer over rows rows (tiles of n): x + attention(LN1(x)), then
// + fc2(GELU(fc1(LN2(x)))).
func (m *Model) layer(s *step, l *layerWeights, x, cos, sin backend.Tensor, rows, n int) backend.Tensor {
	c := m.Config
	heads, d := c.NumHeads, c.HeadDim()
	h := s.layerNorm(x, l.LN1W.T, l.LN1B.T)
	q := s.rotate(s.reshape(s.affine(h, l.QW.T, l.QB.T), rows, heads, d), cos, sin)
	k := s.rotate(s.reshape(s.affine(h, l.KW.T, l.KB.T), rows, heads, d), cos, sin)
	v := s.reshape(s.affine(h, l.VW.T, l.VB.T), rows, heads, d)
	att := s.do("attention", func() (backend.Tensor, error) {
		return m.enc.FullAttention(q, k, v, n, float32(1/math.Sqrt(float64(d))))
	})
	x = s.add(x, s.affine(s.reshape(att, rows, c.HiddenSize), l.OW.T, l.OB.T))
	h = s.layerNorm(x, l.LN2W.T, l.LN2B.T)
	return s.add(x, s.affine(s.gelu(s.affine(h, l.FC1W.T, l.FC1B.T)), l.FC2W.T, l.FC2B.T))
}

// step wraps the backend with a sticky error: after the first failure every op is skipped and returns
// nil, and the caller checks err once at the end.
type step struct {
	ops backend.Ops
	enc backend.EncoderOps
	err error
}

func (s *step) do(op string, f func() (backend.Tensor, error)) backend.Tensor {
	if s.err != nil {
		return nil
	}
	t, err := f()
	if err != nil {
		s.err = fmt.Errorf("%s: %w", op, err)
	}
	return t
}

func (s *step) linear(x, w backend.Tensor) backend.Tensor {
	return s.do("linear", func() (backend.Tensor, error) { return s.ops.Linear(x, w) })
}

// affine is x·wᵀ + b.
func (s *step) affine(x, w, b backend.Tensor) backend.Tensor {
	y := s.linear(x, w)
	return s.do("bias", func() (backend.Tensor, error) { return s.enc.AddBias(y, b) })
}

func (s *step) add(x, y backend.Tensor) backend.Tensor {
	return s.do("add", func() (backend.Tensor, error) { return s.ops.Add(x, y) })
}

func (s *step) layerNorm(x, w, b backend.Tensor) backend.Tensor {
	return s.do("layer_norm", func() (backend.Tensor, error) { return s.enc.LayerNorm(x, w, b, LayerNormEps) })
}

func (s *step) gelu(x backend.Tensor) backend.Tensor {
	return s.do("gelu", func() (backend.Tensor, error) { return s.enc.GELU(x) })
}

func (s *step) rotate(x, cos, sin backend.Tensor) backend.Tensor {
	return s.do("rope", func() (backend.Tensor, error) { return s.enc.RotatePairs(x, cos, sin) })
}

func (s *step) reshape(x backend.Tensor, shape ...int) backend.Tensor {
	return s.do("reshape", func() (backend.Tensor, error) { return s.ops.Reshape(x, shape...) })
}

// repeat stacks times copies of t along its first dimension (a per-tile table for every tile).
func (s *step) repeat(t backend.Tensor, times int) backend.Tensor {
	if times == 1 {
		return t
	}
	ts := make([]backend.Tensor, times)
	for i := range ts {
		ts[i] = t
	}
	return s.do("repeat", func() (backend.Tensor, error) { return s.ops.Concat(ts...) })
}
