package imageproc

import "fmt"

// SpecialIDs are the tokenizer's ids of the tokens an image's layout uses (spec §5.4 for Llama 4's:
// 200080, 200081, 200090, 200092, 200084, 200085).
type SpecialIDs struct {
	ImageStart int // <|image_start|> (config boi_token_index)
	ImageEnd   int // <|image_end|> (eoi_token_index)
	Image      int // <|image|>: the placeholder in a prompt, and the global tile's marker
	Patch      int // <|patch|>: a slot for one image feature (image_token_index)
	TileX      int // <|tile_x_separator|>: between the tiles of a row
	TileY      int // <|tile_y_separator|>: after each row of tiles
}

// Layout returns an image's tokens for grid g (spec §6.3): one tile is <|image_start|><|image|>, the
// slots and <|image_end|>; several are <|image_start|>, per row the tiles' slots separated by
// <|tile_x_separator|> and followed by <|tile_y_separator|>, then <|image|>, the global tile's slots and
// <|image_end|>.
func (c Config) Layout(g Grid, ids SpecialIDs) []int {
	n := c.TokensPerTile()
	out := make([]int, 0, g.Tiles()*(n+1)+g.Rows+3)
	slots := func() {
		for range n {
			out = append(out, ids.Patch)
		}
	}
	out = append(out, ids.ImageStart)
	if g.Rows*g.Cols > 1 {
		for range g.Rows {
			for x := range g.Cols {
				slots()
				if x < g.Cols-1 {
					out = append(out, ids.TileX)
				}
			}
			out = append(out, ids.TileY)
		}
	}
	out = append(out, ids.Image)
	slots()
	return append(out, ids.ImageEnd)
}

// Expand replaces the i-th <|image|> id of a tokenised prompt by image i's Layout, as Llama4Processor
// does to the text before tokenising it (the layout is all special tokens, so expanding ids or text is
// the same). The number of placeholders must equal len(grids), and be at most MaxImages.
func (c Config) Expand(prompt []int, grids []Grid, ids SpecialIDs) ([]int, error) {
	c = c.withDefaults()
	if len(grids) > c.MaxImages {
		return nil, fmt.Errorf("%w: %d images, at most %d per prompt", ErrTooMany, len(grids), c.MaxImages)
	}
	n := 0
	for _, id := range prompt {
		if id == ids.Image {
			n++
		}
	}
	if n != len(grids) {
		return nil, fmt.Errorf("%w: the prompt has %d <|image|> placeholders for %d images", ErrTooMany, n, len(grids))
	}
	out := make([]int, 0, len(prompt)+len(grids)*c.TokensPerTile())
	i := 0
	for _, id := range prompt {
		if id != ids.Image {
			out = append(out, id)
			continue
		}
		out = append(out, c.Layout(grids[i], ids)...)
		i++
	}
	return out, nil
}

// The special tokens' names in Llama 4's tokenizer.
const (
	TokenImageStart = "<|image_start|>"
	TokenImageEnd   = "<|image_end|>"
	TokenImage      = "<|image|>"
	TokenPatch      = "<|patch|>"
	TokenTileX      = "<|tile_x_separator|>"
	TokenTileY      = "<|tile_y_separator|>"
)

// LookupIDs builds SpecialIDs from a tokenizer's token-to-id lookup (tokenizer.Tokenizer.TokenID).
func LookupIDs(tokenID func(token string) (int, bool)) (SpecialIDs, error) {
	var ids SpecialIDs
	for _, e := range []struct {
		name string
		dst  *int
	}{
		{TokenImageStart, &ids.ImageStart}, {TokenImageEnd, &ids.ImageEnd}, {TokenImage, &ids.Image},
		{TokenPatch, &ids.Patch}, {TokenTileX, &ids.TileX}, {TokenTileY, &ids.TileY},
	} {
		id, ok := tokenID(e.name)
		if !ok {
			return SpecialIDs{}, fmt.Errorf("%w: the tokenizer has no %s token", ErrConfig, e.name)
		}
		*e.dst = id
	}
	return ids, nil
}
