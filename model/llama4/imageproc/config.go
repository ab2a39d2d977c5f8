package imageproc

import (
	"errors"
	"fmt"
)

// The defaults are Llama 4 Scout's and Maverick's processor_config.json and vision config.
const (
	// DefaultTileSize is the side of a tile in pixels (size.height = size.width).
	DefaultTileSize = 336
	// DefaultMaxTiles is the most tiles of one image, global tile excluded (max_patches).
	DefaultMaxTiles = 16
	// DefaultPatchSize is the vision tower's patch side in pixels (patch_size).
	DefaultPatchSize = 14
	// DefaultPixelShuffleRatio is the vision adapter's pixel shuffle ratio (pixel_shuffle_ratio).
	DefaultPixelShuffleRatio = 0.5
	// DefaultMaxImages bounds the images of one prompt.
	DefaultMaxImages = 10
	// DefaultMaxPixels bounds an image's width × height before decoding (32 Mpx: 128 MiB decoded).
	DefaultMaxPixels = 32 << 20
)

// The errors of this package; the messages wrap them with the detail.
var (
	// ErrImage means bytes that are not an image this package reads (corrupt, truncated, an unknown
	// format) or an image without pixels.
	ErrImage = errors.New("imageproc: invalid image")
	// ErrTooLarge means an image whose header announces more than MaxPixels pixels.
	ErrTooLarge = errors.New("imageproc: image too large")
	// ErrTooMany means more images than MaxImages, or images and <|image|> placeholders that do not
	// pair up.
	ErrTooMany = errors.New("imageproc: image count")
	// ErrConfig means a Config that fails Validate.
	ErrConfig = errors.New("imageproc: invalid config")
)

// Config is the processor's configuration. The zero value of a field means its default.
type Config struct {
	// TileSize is the side of a tile in pixels; it must be the vision tower's image_size. Zero:
	// DefaultTileSize.
	TileSize int
	// MaxTiles is the most tiles of one image, the global tile excluded (HF's max_patches). Zero:
	// DefaultMaxTiles.
	MaxTiles int
	// PatchSize is the vision tower's patch side in pixels. Zero: DefaultPatchSize.
	PatchSize int
	// PixelShuffleRatio is the vision adapter's pixel shuffle ratio. Zero: DefaultPixelShuffleRatio.
	PixelShuffleRatio float64
	// MaxImages bounds the images of one prompt. Zero: DefaultMaxImages.
	MaxImages int
	// MaxPixels bounds width × height of an image, checked in its header before decoding. Zero:
	// DefaultMaxPixels.
	MaxPixels int64
}

// DefaultConfig is Llama 4's processor configuration.
func DefaultConfig() Config {
	return Config{
		TileSize: DefaultTileSize, MaxTiles: DefaultMaxTiles, PatchSize: DefaultPatchSize,
		PixelShuffleRatio: DefaultPixelShuffleRatio, MaxImages: DefaultMaxImages, MaxPixels: DefaultMaxPixels,
	}
}

// withDefaults fills the zero fields.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.TileSize == 0 {
		c.TileSize = d.TileSize
	}
	if c.MaxTiles == 0 {
		c.MaxTiles = d.MaxTiles
	}
	if c.PatchSize == 0 {
		c.PatchSize = d.PatchSize
	}
	if c.PixelShuffleRatio == 0 {
		c.PixelShuffleRatio = d.PixelShuffleRatio
	}
	if c.MaxImages == 0 {
		c.MaxImages = d.MaxImages
	}
	if c.MaxPixels == 0 {
		c.MaxPixels = d.MaxPixels
	}
	return c
}

// Validate reports a configuration the processor cannot run.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.TileSize < 0 || c.MaxTiles < 0 || c.PatchSize < 0 || c.MaxImages < 0 || c.MaxPixels < 0 || c.PixelShuffleRatio < 0:
		return fmt.Errorf("%w: negative field in %+v", ErrConfig, c)
	case c.TileSize%c.PatchSize != 0:
		return fmt.Errorf("%w: tile size %d is not a multiple of the patch size %d", ErrConfig, c.TileSize, c.PatchSize)
	case c.PixelShuffleRatio > 1:
		return fmt.Errorf("%w: pixel shuffle ratio %g is above 1", ErrConfig, c.PixelShuffleRatio)
	case c.TokensPerTile() == 0:
		return fmt.Errorf("%w: a %d-pixel tile of %d-pixel patches with pixel shuffle ratio %g has no tokens",
			ErrConfig, c.TileSize, c.PatchSize, c.PixelShuffleRatio)
	}
	return nil
}

// TokensPerTile is the number of <|patch|> slots of one tile: (tile/patch)² / round(1/ratio²), as
// Llama4Processor counts them (144 for Llama 4).
func (c Config) TokensPerTile() int {
	c = c.withDefaults()
	side := c.TileSize / c.PatchSize
	down := int(1/(c.PixelShuffleRatio*c.PixelShuffleRatio) + 0.5)
	if down == 0 {
		return 0
	}
	return side * side / down
}
