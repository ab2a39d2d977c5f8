package imageproc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"image"
	"image/color"
	"image/color/palette"
	"image/gif"
	"image/jpeg"
	"image/png"
	"math"
	"runtime"
	"slices"
	"testing"
)

// Llama 4's special token ids (spec §5.4).
var llama4IDs = SpecialIDs{ImageStart: 200080, ImageEnd: 200081, Image: 200090, Patch: 200092, TileX: 200084, TileY: 200085}

func TestBestFit(t *testing.T) {
	c := DefaultConfig()
	tests := []struct {
		w, h       int
		want       Grid
		tiles      int
		resizeH, W int
	}{
		// Spec §6.1 [verified] cases; sizes are width × height as PIL gives them.
		{w: 500, h: 300, want: Grid{1, 2}, tiles: 3, resizeH: 300, W: 500},
		{w: 1000, h: 200, want: Grid{1, 3}, tiles: 4, resizeH: 200, W: 1000},
		{w: 336, h: 336, want: Grid{1, 1}, tiles: 1, resizeH: 336, W: 336},
		{w: 100, h: 80, want: Grid{1, 1}, tiles: 1, resizeH: 268, W: 336},
		{w: 300, h: 500, want: Grid{2, 1}, tiles: 3, resizeH: 500, W: 300},
		// Larger than the 16-tile canvas: the largest downscale.
		{w: 4000, h: 3000, want: Grid{3, 4}, tiles: 13, resizeH: 1008, W: 1344},
		{w: 1, h: 1, want: Grid{1, 1}, tiles: 1, resizeH: 336, W: 336},
		{w: 10000, h: 10, want: Grid{1, 16}, tiles: 17, resizeH: 5, W: 5376},
	}
	for _, tt := range tests {
		g := c.BestFit(tt.h, tt.w)
		if g != tt.want || g.Tiles() != tt.tiles {
			t.Errorf("BestFit(%d, %d) = %+v (%d tiles), want %+v (%d tiles)", tt.h, tt.w, g, g.Tiles(), tt.want, tt.tiles)
		}
		if h, w := c.ResizeTarget(tt.h, tt.w, g); h != tt.resizeH || w != tt.W {
			t.Errorf("ResizeTarget(%d, %d, %+v) = %d×%d, want %d×%d", tt.h, tt.w, g, h, w, tt.resizeH, tt.W)
		}
	}
}

func TestGridsOrder(t *testing.T) {
	// HF's docstring example of find_supported_resolutions(max_num_chunks=4): ratios in first-seen order.
	want := []Grid{{1, 4}, {2, 2}, {1, 1}, {4, 1}, {1, 3}, {3, 1}, {1, 2}, {2, 1}}
	if got := grids(4); !slices.Equal(got, want) {
		t.Errorf("grids(4) = %v, want %v", got, want)
	}
}

func TestLayout(t *testing.T) {
	c := DefaultConfig()
	tests := []struct {
		g    Grid
		want int
	}{
		{Grid{1, 1}, 147},         // spec §6.3
		{Grid{1, 2}, 437},         // 336×672: 1×2 + global
		{Grid{1, 3}, 4*144 + 6},   // 3 tiles, 2 x-separators, 1 y-separator, start, image, end
		{Grid{2, 2}, 5*144 + 7},   // 2 rows: 2 x-separators, 2 y-separators
		{Grid{4, 4}, 17*144 + 19}, // 12 x-separators, 4 y-separators
	}
	for _, tt := range tests {
		if got := len(c.Layout(tt.g, llama4IDs)); got != tt.want {
			t.Errorf("len(Layout(%+v)) = %d, want %d", tt.g, got, tt.want)
		}
	}
	// One slot per tile (a 28-pixel tile of 14-pixel patches): the spec's verified (1,2) string.
	small := Config{TileSize: 28}
	s, e, im, p, x, y := 1, 2, 3, 4, 5, 6
	ids := SpecialIDs{ImageStart: s, ImageEnd: e, Image: im, Patch: p, TileX: x, TileY: y}
	if got, want := small.Layout(Grid{1, 2}, ids), []int{s, p, x, p, y, im, p, e}; !slices.Equal(got, want) {
		t.Errorf("Layout(1×2) = %v, want %v", got, want)
	}
	if got, want := small.Layout(Grid{2, 2}, ids), []int{s, p, x, p, y, p, x, p, y, im, p, e}; !slices.Equal(got, want) {
		t.Errorf("Layout(2×2) = %v, want %v", got, want)
	}
	if got, want := small.Layout(Grid{1, 1}, ids), []int{s, im, p, e}; !slices.Equal(got, want) {
		t.Errorf("Layout(1×1) = %v, want %v", got, want)
	}
}

func TestExpand(t *testing.T) {
	small := Config{TileSize: 28, MaxImages: 2}
	ids := SpecialIDs{ImageStart: 1, ImageEnd: 2, Image: 3, Patch: 4, TileX: 5, TileY: 6}
	got, err := small.Expand([]int{9, 3, 8, 3, 7}, []Grid{{1, 1}, {1, 2}}, ids)
	want := []int{9, 1, 3, 4, 2, 8, 1, 4, 5, 4, 6, 3, 4, 2, 7}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("Expand = %v, %v, want %v", got, err, want)
	}
	for _, tt := range []struct {
		prompt []int
		grids  []Grid
	}{
		{[]int{3, 3, 3}, []Grid{{1, 1}, {1, 1}, {1, 1}}}, // more than MaxImages
		{[]int{9, 3}, []Grid{{1, 1}, {1, 1}}},            // fewer placeholders than images
		{[]int{3, 3}, []Grid{{1, 1}}},                    // more placeholders than images
	} {
		if _, err := small.Expand(tt.prompt, tt.grids, ids); !errors.Is(err, ErrTooMany) {
			t.Errorf("Expand(%v, %d images) error = %v, want ErrTooMany", tt.prompt, len(tt.grids), err)
		}
	}
}

func TestNormTable(t *testing.T) {
	lut := normTable()
	if lut[0] != -1 || lut[255] != 1 || lut[128] != 0.0078125 {
		t.Errorf("normTable()[0, 128, 255] = %v, %v, %v, want -1, 0.0078125, 1", lut[0], lut[128], lut[255])
	}
	for i, v := range lut {
		if bf16(v) != v {
			t.Errorf("normTable()[%d] = %v is not a bfloat16", i, v)
		}
		if exact := 2*float64(i)/255 - 1; math.Abs(float64(v)-exact) > 1.0/128 {
			t.Errorf("normTable()[%d] = %v, want within 1/128 of %v", i, v, exact)
		}
		if i > 0 && v < lut[i-1] {
			t.Errorf("normTable() decreases at %d: %v < %v", i, v, lut[i-1])
		}
	}
}

// refResize is antialiased bilinear resampling in float64 without rounding between passes.
func refResize(img *Image, h, w int) []float64 {
	axis := func(in, out int) [][2][]float64 { // per output: indices, weights
		scale := float64(in) / float64(out)
		support, inv := 1.0, 1.0
		if scale > 1 {
			support, inv = scale, 1/scale
		}
		res := make([][2][]float64, out)
		for i := range out {
			c := scale * (float64(i) + 0.5)
			var idx, ws []float64
			total := 0.0
			for j := max(0, int(math.Floor(c-support))); j < min(in, int(math.Ceil(c+support))+1); j++ {
				wt := max(0, 1-math.Abs((float64(j)+0.5-c)*inv))
				idx, ws, total = append(idx, float64(j)), append(ws, wt), total+wt
			}
			for k := range ws {
				ws[k] /= total
			}
			res[i] = [2][]float64{idx, ws}
		}
		return res
	}
	ax, ay := axis(img.Width, w), axis(img.Height, h)
	out := make([]float64, 3*w*h)
	for y := range h {
		for x := range w {
			for ch := range 3 {
				s := 0.0
				for a, iy := range ay[y][0] {
					for b, ix := range ax[x][0] {
						s += ay[y][1][a] * ax[x][1][b] * float64(img.Pix[3*(int(iy)*img.Width+int(ix))+ch])
					}
				}
				out[3*(y*w+x)+ch] = s
			}
		}
	}
	return out
}

func pattern(w, h int) *Image {
	img := NewImage(w, h)
	for y := range h {
		for x := range w {
			i := 3 * (y*w + x)
			img.Pix[i] = uint8(x * 255 / max(w-1, 1))
			img.Pix[i+1] = uint8(y * 255 / max(h-1, 1))
			img.Pix[i+2] = uint8(((x/3 + y/5) % 2) * 255)
		}
	}
	return img
}

func TestResize(t *testing.T) {
	for _, tt := range []struct{ w, h, ow, oh int }{
		{500, 300, 336, 336}, {100, 80, 336, 268}, {1000, 200, 336, 336}, {7, 5, 3, 11}, {40, 40, 40, 13},
	} {
		img := pattern(tt.w, tt.h)
		got := Resize(img, tt.oh, tt.ow)
		if got.Width != tt.ow || got.Height != tt.oh {
			t.Fatalf("Resize(%d×%d → %d×%d) gave %d×%d", tt.w, tt.h, tt.ow, tt.oh, got.Width, got.Height)
		}
		ref := refResize(img, tt.oh, tt.ow)
		worst := 0.0
		for i, v := range got.Pix {
			worst = max(worst, math.Abs(float64(v)-ref[i]))
		}
		// Two uint8 roundings and 15-bit weights: within 1.5 levels of the exact value.
		if worst > 1.5 {
			t.Errorf("Resize(%d×%d → %d×%d): max |Δ| = %.3f levels from the float64 reference, want ≤ 1.5", tt.w, tt.h, tt.ow, tt.oh, worst)
		}
	}
	img := pattern(9, 9)
	if got := Resize(img, 9, 9); got != img {
		t.Errorf("Resize to the same size made a copy")
	}
	// A constant image stays constant (weights sum to one in fixed point).
	flat := NewImage(37, 23)
	for i := range flat.Pix {
		flat.Pix[i] = 200
	}
	for _, v := range Resize(flat, 336, 336).Pix {
		if v != 200 {
			t.Fatalf("Resize of a constant 200 image gave %d", v)
		}
	}
}

func TestProcess(t *testing.T) {
	c := DefaultConfig()
	img := pattern(500, 300)
	p, err := c.Process(img)
	if err != nil {
		t.Fatal(err)
	}
	ts := c.TileSize
	if p.Grid != (Grid{1, 2}) || len(p.Pixels) != 3*3*ts*ts {
		t.Fatalf("Process(500×300) = grid %+v, %d values, want 1×2 and %d", p.Grid, len(p.Pixels), 3*3*ts*ts)
	}
	lut := normTable()
	at := func(tile, ch, y, x int) float32 { return p.Pixels[((tile*3+ch)*ts+y)*ts+x] }
	// Not resized (300 < 336 rows fit, 500 ≤ 672 columns): tile 1 starts at column 336; rows ≥ 300 and
	// columns ≥ 500 are padding (−1).
	for _, tt := range []struct{ tile, ch, y, x, sy, sx int }{{0, 0, 0, 0, 0, 0}, {0, 2, 299, 335, 299, 335}, {1, 1, 17, 0, 17, 336}, {1, 0, 299, 163, 299, 499}} {
		want := lut[img.Pix[3*(tt.sy*500+tt.sx)+tt.ch]]
		if got := at(tt.tile, tt.ch, tt.y, tt.x); got != want {
			t.Errorf("pixel (tile %d, ch %d, %d, %d) = %v, want %v", tt.tile, tt.ch, tt.y, tt.x, got, want)
		}
	}
	for _, tt := range []struct{ tile, y, x int }{{0, 300, 0}, {0, 335, 335}, {1, 0, 164}, {1, 299, 335}} {
		if got := at(tt.tile, 0, tt.y, tt.x); got != -1 {
			t.Errorf("padding (tile %d, %d, %d) = %v, want -1", tt.tile, tt.y, tt.x, got)
		}
	}
	global := Resize(img, ts, ts)
	if got, want := at(2, 1, 100, 200), lut[global.Pix[3*(100*ts+200)+1]]; got != want {
		t.Errorf("global tile pixel = %v, want %v", got, want)
	}
	if _, err := c.Process(&Image{}); !errors.Is(err, ErrImage) {
		t.Errorf("Process(empty) error = %v, want ErrImage", err)
	}
}

// pngWithSize is a valid 1×1 RGB PNG whose header claims w×h (with a correct checksum).
func pngWithSize(t *testing.T, w, h uint32) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := png.Encode(&buf, image.NewRGBA(image.Rect(0, 0, 1, 1))); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	binary.BigEndian.PutUint32(b[16:], w) // IHDR data starts at 16: width, height
	binary.BigEndian.PutUint32(b[20:], h)
	binary.BigEndian.PutUint32(b[29:], crc32.ChecksumIEEE(b[12:29]))
	return b
}

func TestDecodeErrors(t *testing.T) {
	c := DefaultConfig()
	var good bytes.Buffer
	if err := png.Encode(&good, image.NewRGBA(image.Rect(0, 0, 4, 4))); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, ErrImage},
		{"garbage", []byte("this is not an image at all"), ErrImage},
		{"truncated png", good.Bytes()[:len(good.Bytes())-20], ErrImage},
		{"zero width", pngWithSize(t, 0, 10), ErrImage},
		{"20000×20000", pngWithSize(t, 20000, 20000), ErrTooLarge},
		{"claims 2×2, holds 1×1", pngWithSize(t, 2, 2), ErrImage},
	}
	for _, tt := range tests {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := c.Decode(tt.data)
		runtime.ReadMemStats(&after)
		if !errors.Is(err, tt.want) {
			t.Errorf("Decode(%s) error = %v, want %v", tt.name, err, tt.want)
		}
		if grew := after.TotalAlloc - before.TotalAlloc; grew > 8<<20 {
			t.Errorf("Decode(%s) allocated %d bytes, want < 8 MiB", tt.name, grew)
		}
	}
}

func TestDecodeFormats(t *testing.T) {
	c := DefaultConfig()
	src := image.NewNRGBA(image.Rect(0, 0, 6, 4))
	for y := range 4 {
		for x := range 6 {
			src.Set(x, y, color.NRGBA{R: uint8(40 * x), G: uint8(60 * y), B: 7, A: 255})
		}
	}
	src.Set(5, 3, color.NRGBA{R: 0, G: 0, B: 0, A: 0}) // transparent: white
	var pngBytes bytes.Buffer
	if err := png.Encode(&pngBytes, src); err != nil {
		t.Fatal(err)
	}
	img, err := c.Decode(pngBytes.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if img.Width != 6 || img.Height != 4 || !slices.Equal(img.Pix[3*(1*6+2):3*(1*6+2)+3], []uint8{80, 60, 7}) ||
		!slices.Equal(img.Pix[3*23:], []uint8{255, 255, 255}) {
		t.Errorf("Decode(png) = %d×%d %v", img.Width, img.Height, img.Pix)
	}

	// GIF: the first frame of an animation.
	frame := func(v uint8) *image.Paletted {
		p := image.NewPaletted(image.Rect(0, 0, 3, 2), palette.WebSafe)
		for i := range p.Pix {
			p.Pix[i] = v
		}
		return p
	}
	var gifBytes bytes.Buffer
	if err := gif.EncodeAll(&gifBytes, &gif.GIF{Image: []*image.Paletted{frame(5), frame(100)}, Delay: []int{1, 1}}); err != nil {
		t.Fatal(err)
	}
	img, err = c.Decode(gifBytes.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	r, g, b, _ := palette.WebSafe[5].RGBA()
	if want := []uint8{uint8(r >> 8), uint8(g >> 8), uint8(b >> 8)}; img.Width != 3 || !slices.Equal(img.Pix[:3], want) {
		t.Errorf("Decode(gif) first pixel = %v, want frame 0's %v", img.Pix[:3], want)
	}

	// JPEG: lossy, so only close.
	var jpegBytes bytes.Buffer
	flat := image.NewRGBA(image.Rect(0, 0, 16, 16))
	for i := 0; i < len(flat.Pix); i += 4 {
		flat.Pix[i], flat.Pix[i+1], flat.Pix[i+2], flat.Pix[i+3] = 200, 100, 50, 255
	}
	if err := jpeg.Encode(&jpegBytes, flat, &jpeg.Options{Quality: 95}); err != nil {
		t.Fatal(err)
	}
	img, err = c.Decode(jpegBytes.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{200, 100, 50} {
		if d := int(img.Pix[i]) - want; d < -4 || d > 4 {
			t.Errorf("Decode(jpeg) channel %d = %d, want %d ± 4", i, img.Pix[i], want)
		}
	}
}

func TestPrepare(t *testing.T) {
	c := Config{MaxImages: 2}
	var buf bytes.Buffer
	src := image.NewRGBA(image.Rect(0, 0, 500, 300))
	for i := range src.Pix {
		src.Pix[i] = uint8(i)
	}
	if err := png.Encode(&buf, src); err != nil {
		t.Fatal(err)
	}
	img := buf.Bytes()
	ph := llama4IDs.Image
	r, err := c.Prepare([]int{1, ph, 2, ph}, [][]byte{img, img}, llama4IDs)
	if err != nil {
		t.Fatal(err)
	}
	if r.Tiles != 6 || len(r.Pixels) != 6*3*336*336 || len(r.IDs) != 2+2*437 || !slices.Equal(r.Grids, []Grid{{1, 2}, {1, 2}}) {
		t.Errorf("Prepare = %d tiles, %d values, %d ids, grids %v; want 6, %d, %d, [1×2 1×2]", r.Tiles, len(r.Pixels), len(r.IDs), r.Grids, 6*3*336*336, 2+2*437)
	}
	huge := pngWithSize(t, 20000, 20000)
	for _, tt := range []struct {
		name   string
		prompt []int
		images [][]byte
		want   error
	}{
		{"three images", []int{ph, ph, ph}, [][]byte{img, img, img}, ErrTooMany},
		{"placeholder without image", []int{ph, ph}, [][]byte{img}, ErrTooMany},
		{"corrupt second image", []int{ph, ph}, [][]byte{img, []byte("garbage")}, ErrImage},
		{"20000×20000", []int{ph}, [][]byte{huge}, ErrTooLarge},
	} {
		if _, err := c.Prepare(tt.prompt, tt.images, llama4IDs); !errors.Is(err, tt.want) {
			t.Errorf("Prepare(%s) error = %v, want %v", tt.name, err, tt.want)
		}
	}
}

// TestToRGBFastPaths: the direct conversions of NRGBA, YCbCr and Gray images equal the generic one.
func TestToRGBFastPaths(t *testing.T) {
	generic := func(img image.Image) *Image {
		b := img.Bounds()
		out := NewImage(b.Dx(), b.Dy())
		i := 0
		for y := b.Min.Y; y < b.Max.Y; y++ {
			for x := b.Min.X; x < b.Max.X; x++ {
				c := color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA)
				out.Pix[i], out.Pix[i+1], out.Pix[i+2] = overWhite(c.R, c.A), overWhite(c.G, c.A), overWhite(c.B, c.A)
				i += 3
			}
		}
		return out
	}
	r := image.Rect(3, 2, 40, 23) // a non-zero origin, odd sizes
	nrgba := image.NewNRGBA(r)
	gray := image.NewGray(r)
	for i := range nrgba.Pix {
		nrgba.Pix[i] = uint8(i * 37)
	}
	for i := range gray.Pix {
		gray.Pix[i] = uint8(i * 11)
	}
	rgba := image.NewRGBA(r)
	for i := 0; i < len(rgba.Pix); i += 4 {
		a := uint8(255)
		if i%12 == 0 {
			a = uint8(i * 3)
		}
		rgba.Pix[i], rgba.Pix[i+1], rgba.Pix[i+2], rgba.Pix[i+3] = min(uint8(i), a), min(uint8(i*5), a), min(uint8(i*9), a), a
	}
	imgs := map[string]image.Image{"nrgba": nrgba, "gray": gray, "rgba": rgba}
	for _, sub := range []image.YCbCrSubsampleRatio{image.YCbCrSubsampleRatio444, image.YCbCrSubsampleRatio420, image.YCbCrSubsampleRatio422} {
		y := image.NewYCbCr(r, sub)
		for i := range y.Y {
			y.Y[i] = uint8(i * 7)
		}
		for i := range y.Cb {
			y.Cb[i], y.Cr[i] = uint8(i*13), uint8(255-i*5)
		}
		imgs[sub.String()] = y
	}
	for name, img := range imgs {
		if got, want := toRGB(img), generic(img); !slices.Equal(got.Pix, want.Pix) {
			t.Errorf("toRGB(%s) differs from the generic conversion", name)
		}
	}
}
