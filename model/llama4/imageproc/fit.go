package imageproc

import "math"

// Grid is an image's tile grid: Rows × Cols tiles (HF's aspect_ratios entry (ratio_h, ratio_w)).
type Grid struct {
	Rows, Cols int
}

// Tiles is the number of tiles of the image, the global tile included when there are several.
func (g Grid) Tiles() int {
	if n := g.Rows * g.Cols; n > 1 {
		return n + 1
	}
	return 1
}

// grids lists every grid of at most maxTiles tiles in the order HF's find_supported_resolutions does:
// tile counts from maxTiles down, each count's factorisations grouped by their aspect ratio in the order
// the ratios first appear. The order decides ties of equal area in BestFit.
func grids(maxTiles int) []Grid {
	var ratios []float64
	byRatio := map[float64][]Grid{}
	for n := maxTiles; n >= 1; n-- {
		for f := 1; f <= n; f++ { // sorted factors of n
			if n%f != 0 {
				continue
			}
			g := Grid{Rows: f, Cols: n / f}
			r := float64(g.Rows) / float64(g.Cols)
			if _, seen := byRatio[r]; !seen {
				ratios = append(ratios, r)
			}
			byRatio[r] = append(byRatio[r], g)
		}
	}
	var out []Grid
	for _, r := range ratios {
		out = append(out, byRatio[r]...)
	}
	return out
}

// BestFit is HF's get_best_fit for an image of height × width pixels: of the grids of at most MaxTiles
// tiles, the one whose canvas takes the smallest upscale (≥ 1) without distortion, else the largest
// downscale; ties go to the smallest canvas. Scales are float32, as torch computes them.
func (c Config) BestFit(height, width int) Grid {
	c = c.withDefaults()
	gs := grids(c.MaxTiles)
	scales := make([]float32, len(gs))
	for i, g := range gs {
		sh := float32(g.Rows*c.TileSize) / float32(height)
		sw := float32(g.Cols*c.TileSize) / float32(width)
		scales[i] = sw
		if sh <= sw {
			scales[i] = sh
		}
	}
	var sel float32
	up := false
	for _, s := range scales {
		if s >= 1 && (!up || s < sel) {
			sel, up = s, true
		}
	}
	if !up {
		sel = float32(math.Inf(-1))
		for _, s := range scales {
			if s > sel {
				sel = s
			}
		}
	}
	best, area := Grid{}, -1
	for i, g := range gs {
		if scales[i] == sel && (area < 0 || g.Rows*g.Cols < area) {
			best, area = g, g.Rows*g.Cols
		}
	}
	return best
}

// side is one dimension of HF's resize target: its value, and whether Python holds it as a torch
// scalar (then the arithmetic on it is float32) or as an int (float64).
type side struct {
	v      int
	tensor bool
}

// pyMin is Python's min(a, b): the first of equal values.
func pyMin(a, b side) side {
	if b.v < a.v {
		return b
	}
	return a
}

// ratio is t / o as Python computes it: float32 when t is a tensor.
func (t side) ratio(o int) float64 {
	if t.tensor {
		return float64(float32(t.v) / float32(o))
	}
	return float64(t.v) / float64(o)
}

// times is floor(o · s) with the float32 arithmetic of a tensor scale.
func timesFloor(o int, s float64, tensor bool) int {
	if tensor {
		return int(math.Floor(float64(float32(o) * float32(s))))
	}
	return int(math.Floor(float64(o) * s))
}

// ResizeTarget is the size HF resizes an image of height × width to on grid g, keeping its aspect
// ratio: the canvas, but never upscaled past max(side, TileSize) (resize_to_max_canvas off), then
// get_max_res_without_distortion.
func (c Config) ResizeTarget(height, width int, g Grid) (h, w int) {
	c = c.withDefaults()
	th := pyMin(side{v: max(height, c.TileSize)}, side{v: g.Rows * c.TileSize, tensor: true})
	tw := pyMin(side{v: max(width, c.TileSize)}, side{v: g.Cols * c.TileSize, tensor: true})
	sw, sh := tw.ratio(width), th.ratio(height)
	less := sw < sh
	if tw.tensor || th.tensor { // a comparison with a tensor is float32
		less = float32(sw) < float32(sh)
	}
	if less {
		w = tw.v
		h = min(timesFloor(height, sw, tw.tensor), th.v)
	} else {
		h = th.v
		w = min(timesFloor(width, sh, th.tensor), tw.v)
	}
	return max(h, 1), max(w, 1)
}
