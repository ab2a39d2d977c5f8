package imageproc

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	_ "image/gif"  // GIF: the first frame
	_ "image/jpeg" // JPEG
	_ "image/png"  // PNG

	_ "golang.org/x/image/webp" // WebP, lossy and lossless
)

// Image is an 8-bit RGB image: Pix holds Height rows of Width pixels of 3 bytes (R, G, B).
type Image struct {
	Width, Height int
	Pix           []uint8
}

// NewImage returns a black image of the given size.
func NewImage(width, height int) *Image {
	return &Image{Width: width, Height: height, Pix: make([]uint8, 3*width*height)}
}

// Decode reads a PNG, JPEG, GIF (first frame) or WebP image into RGB. The dimensions are read from the
// header first: an image without pixels is an ErrImage, one of more than MaxPixels pixels an ErrTooLarge,
// and neither is decoded. Translucent pixels are composited over white (HF's convert_to_rgb).
func (c Config) Decode(data []byte) (*Image, error) {
	c = c.withDefaults()
	if len(data) == 0 {
		return nil, fmt.Errorf("%w: no bytes", ErrImage)
	}
	hdr, format, err := image.DecodeConfig(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrImage, err)
	}
	if hdr.Width <= 0 || hdr.Height <= 0 {
		return nil, fmt.Errorf("%w: %s of %d×%d pixels", ErrImage, format, hdr.Width, hdr.Height)
	}
	if n := int64(hdr.Width) * int64(hdr.Height); n > c.MaxPixels {
		return nil, fmt.Errorf("%w: %s of %d×%d = %d pixels, more than %d", ErrTooLarge, format, hdr.Width, hdr.Height, n, c.MaxPixels)
	}
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrImage, format, err)
	}
	b := img.Bounds()
	if b.Dx() != hdr.Width || b.Dy() != hdr.Height {
		return nil, fmt.Errorf("%w: %s header says %d×%d, pixels are %d×%d", ErrImage, format, hdr.Width, hdr.Height, b.Dx(), b.Dy())
	}
	return toRGB(img), nil
}

// toRGB converts any image to RGB, compositing translucent pixels over white. The common decoder outputs
// take a direct path with the same results as the generic one.
func toRGB(img image.Image) *Image {
	b := img.Bounds()
	out := NewImage(b.Dx(), b.Dy())
	switch m := img.(type) {
	case *image.NRGBA:
		for y := range b.Dy() {
			row := m.Pix[y*m.Stride : y*m.Stride+4*b.Dx()]
			dst := out.Pix[3*y*b.Dx():]
			for x := range b.Dx() {
				a := row[4*x+3]
				dst[3*x], dst[3*x+1], dst[3*x+2] = overWhite(row[4*x], a), overWhite(row[4*x+1], a), overWhite(row[4*x+2], a)
			}
		}
		return out
	case *image.RGBA: // premultiplied: opaque pixels directly, others through NRGBA
		for y := range b.Dy() {
			row := m.Pix[y*m.Stride : y*m.Stride+4*b.Dx()]
			dst := out.Pix[3*y*b.Dx():]
			for x := range b.Dx() {
				c := color.NRGBA{R: row[4*x], G: row[4*x+1], B: row[4*x+2], A: row[4*x+3]}
				if c.A != 0xff {
					c = color.NRGBAModel.Convert(color.RGBA(c)).(color.NRGBA)
				}
				dst[3*x], dst[3*x+1], dst[3*x+2] = overWhite(c.R, c.A), overWhite(c.G, c.A), overWhite(c.B, c.A)
			}
		}
		return out
	case *image.YCbCr:
		for y := range b.Dy() {
			dst := out.Pix[3*y*b.Dx():]
			for x := range b.Dx() {
				yi, ci := m.YOffset(b.Min.X+x, b.Min.Y+y), m.COffset(b.Min.X+x, b.Min.Y+y)
				dst[3*x], dst[3*x+1], dst[3*x+2] = color.YCbCrToRGB(m.Y[yi], m.Cb[ci], m.Cr[ci])
			}
		}
		return out
	case *image.Gray:
		for y := range b.Dy() {
			row := m.Pix[y*m.Stride : y*m.Stride+b.Dx()]
			dst := out.Pix[3*y*b.Dx():]
			for x, v := range row {
				dst[3*x], dst[3*x+1], dst[3*x+2] = v, v, v
			}
		}
		return out
	}
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

// overWhite is a straight-alpha channel value composited over white, rounded.
func overWhite(v, a uint8) uint8 {
	if a == 0xff {
		return v
	}
	return uint8((int(v)*int(a) + 255*(255-int(a)) + 127) / 255)
}
