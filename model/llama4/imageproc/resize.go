package imageproc

import "math"

// taps is one axis of a resampling: for each output index, the first input index, and its integer
// weights (fixed point with precision fractional bits).
type taps struct {
	first     []int
	weights   [][]int32
	precision uint
}

// bilinearTaps computes torch's weights for antialiased bilinear resampling of uint8 images along one
// axis of in → out samples (aten/src/ATen/native/cpu/UpSampleKernel.cpp:
// _compute_indices_min_size_weights_aa and _compute_index_ranges_int16_weights, align_corners false):
// Pillow's triangle filter widened by the downscale factor, normalised in float64, then rounded to
// int16 at the largest precision under which the largest weight still fits.
func bilinearTaps(in, out int) taps {
	scale := float64(in) / float64(out)
	support, invscale := 1.0, 1.0 // interp_size/2 = 1 for bilinear
	if scale >= 1 {
		support, invscale = scale, 1/scale
	}
	maxTaps := int(math.Ceil(support))*2 + 1
	t := taps{first: make([]int, out), weights: make([][]int32, out)}
	real := make([][]float64, out)
	wtMax := 0.0
	for i := range out {
		center := scale * (float64(i) + 0.5)
		xmin := max(int64(center-support+0.5), 0) // C++ casts truncate toward zero
		xsize := min(int64(center+support+0.5), int64(in)) - xmin
		xsize = min(max(xsize, 0), int64(maxTaps))
		ws := make([]float64, xsize)
		total := 0.0
		for j := range ws {
			x := math.Abs((float64(int64(j)+xmin) - center + 0.5) * invscale)
			if x < 1 {
				ws[j] = 1 - x
			}
			total += ws[j]
		}
		if total != 0 {
			for j := range ws {
				ws[j] /= total
				wtMax = max(wtMax, ws[j])
			}
		}
		t.first[i], real[i] = int(xmin), ws
	}
	var p uint
	for p = 0; p < 22; p++ {
		if int(0.5+wtMax*float64(int(1)<<(p+1))) >= 1<<15 {
			break
		}
	}
	t.precision = p
	for i, ws := range real {
		t.weights[i] = make([]int32, len(ws))
		for j, w := range ws {
			v := w * float64(int(1)<<p)
			if v < 0 {
				t.weights[i][j] = int32(int16(int(-0.5 + v)))
			} else {
				t.weights[i][j] = int32(int16(int(0.5 + v)))
			}
		}
	}
	return t
}

// sample is one output value: the weighted sum of n inputs at(j), rounded and clamped to uint8.
func (t *taps) sample(i int, at func(j int) uint8) uint8 {
	acc := int32(1) << (t.precision - 1)
	if t.precision == 0 {
		acc = 0
	}
	for j, w := range t.weights[i] {
		acc += int32(at(t.first[i]+j)) * w
	}
	acc >>= t.precision
	return uint8(min(max(acc, 0), 255))
}

// Resize returns img resized to height × width as torchvision resizes a uint8 image with bilinear
// interpolation and antialiasing on a CPU with AVX2 (HF's image processors): separable, the width
// first, each pass rounding to uint8. The same size returns img itself.
func Resize(img *Image, height, width int) *Image {
	if img.Width == width && img.Height == height {
		return img
	}
	cur := img
	if width != img.Width {
		t := bilinearTaps(img.Width, width)
		next := NewImage(width, img.Height)
		for y := range img.Height {
			row := cur.Pix[3*y*img.Width:]
			for ch := range 3 {
				for x := range width {
					next.Pix[3*(y*width+x)+ch] = t.sample(x, func(j int) uint8 { return row[3*j+ch] })
				}
			}
		}
		cur = next
	}
	if height != img.Height {
		t := bilinearTaps(img.Height, height)
		next := NewImage(width, height)
		for y := range height {
			for x := range width {
				for ch := range 3 {
					next.Pix[3*(y*width+x)+ch] = t.sample(y, func(j int) uint8 { return cur.Pix[3*(j*width+x)+ch] })
				}
			}
		}
		cur = next
	}
	return cur
}
