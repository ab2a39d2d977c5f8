package imageproc

import (
	"fmt"
	"math"
)

// Processed is one image as the vision tower takes it.
type Processed struct {
	// Grid is the image's tile grid (HF's aspect_ratios entry).
	Grid Grid
	// Pixels are the tiles' pixel values [Grid.Tiles(), 3, TileSize, TileSize], row-major: the local
	// tiles row by row, then the global tile when there are several. Every value is a bfloat16.
	Pixels []float32
}

// Tiles is the number of tiles in Pixels.
func (p Processed) Tiles() int { return p.Grid.Tiles() }

// Process is HF's Llama4ImageProcessor for one image (spec §6.1): the best grid, a resize keeping the
// aspect ratio, black padding to the grid's canvas, bfloat16 rescale and normalisation, tiles row-major
// and the global tile.
func (c Config) Process(img *Image) (Processed, error) {
	c = c.withDefaults()
	if err := c.Validate(); err != nil {
		return Processed{}, err
	}
	if img == nil || img.Width <= 0 || img.Height <= 0 || len(img.Pix) != 3*img.Width*img.Height {
		return Processed{}, fmt.Errorf("%w: no pixels", ErrImage)
	}
	g := c.BestFit(img.Height, img.Width)
	h, w := c.ResizeTarget(img.Height, img.Width, g)
	resized := Resize(img, h, w)
	ts := c.TileSize
	tile := 3 * ts * ts
	p := Processed{Grid: g, Pixels: make([]float32, g.Tiles()*tile)}
	lut := normTable()
	pad := lut[0]
	for ty := range g.Rows {
		for tx := range g.Cols {
			dst := p.Pixels[(ty*g.Cols+tx)*tile:]
			for ch := range 3 {
				for y := range ts {
					sy := ty*ts + y
					for x := range ts {
						sx := tx*ts + x
						v := pad
						if sy < resized.Height && sx < resized.Width {
							v = lut[resized.Pix[3*(sy*resized.Width+sx)+ch]]
						}
						dst[(ch*ts+y)*ts+x] = v
					}
				}
			}
		}
	}
	if g.Rows*g.Cols > 1 {
		global := Resize(img, ts, ts)
		dst := p.Pixels[g.Rows*g.Cols*tile:]
		for ch := range 3 {
			for i := range ts * ts {
				dst[ch*ts*ts+i] = lut[global.Pix[3*i+ch]]
			}
		}
	}
	return p, nil
}

// normTable maps each uint8 level to HF's normalised value: in bfloat16, x·(1/255) (the product
// computed in float32 and rounded), then (x − 0.5) rounded, then divided by 0.5 (exact).
func normTable() [256]float32 {
	var lut [256]float32
	one, denom := 1.0, 255.0
	scale := float32(one / denom) // Python's float 1/255, as torch's float32 opmath takes it
	for i := range lut {
		v := bf16(float32(i) * scale)
		v = bf16(v - 0.5)
		lut[i] = v / 0.5
	}
	return lut
}

// bf16 rounds f to the nearest bfloat16, ties to even (f is finite here).
func bf16(f float32) float32 {
	b := math.Float32bits(f)
	b += 0x7fff + (b>>16)&1
	return math.Float32frombits(b &^ 0xffff)
}
