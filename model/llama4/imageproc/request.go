package imageproc

import "fmt"

// Request is a prompt's images as the model takes them.
type Request struct {
	// IDs is the prompt with every <|image|> placeholder expanded (Expand).
	IDs []int
	// Pixels are the images' tiles in prompt order, [Tiles, 3, TileSize, TileSize].
	Pixels []float32
	// Tiles is the number of tiles in Pixels.
	Tiles int
	// Grids are the images' tile grids, in order.
	Grids []Grid
}

// Prepare decodes and processes the encoded images of one prompt and expands its placeholders. The
// image count is checked against MaxImages and the prompt's <|image|> placeholders before any image is
// decoded, and each image's size before its pixels are, so a request's memory stays bounded by
// MaxImages × MaxPixels. Errors name the image (from 0) and wrap ErrImage, ErrTooLarge or ErrTooMany.
func (c Config) Prepare(prompt []int, images [][]byte, ids SpecialIDs) (Request, error) {
	c = c.withDefaults()
	if len(images) > c.MaxImages {
		return Request{}, fmt.Errorf("%w: %d images, at most %d per prompt", ErrTooMany, len(images), c.MaxImages)
	}
	n := 0
	for _, id := range prompt {
		if id == ids.Image {
			n++
		}
	}
	if n != len(images) {
		return Request{}, fmt.Errorf("%w: the prompt has %d <|image|> placeholders for %d images", ErrTooMany, n, len(images))
	}
	var r Request
	for i, data := range images {
		img, err := c.Decode(data)
		if err != nil {
			return Request{}, fmt.Errorf("image %d: %w", i, err)
		}
		p, err := c.Process(img)
		if err != nil {
			return Request{}, fmt.Errorf("image %d: %w", i, err)
		}
		r.Pixels = append(r.Pixels, p.Pixels...)
		r.Tiles += p.Tiles()
		r.Grids = append(r.Grids, p.Grid)
	}
	var err error
	if r.IDs, err = c.Expand(prompt, r.Grids, ids); err != nil {
		return Request{}, err
	}
	return r, nil
}
