package vision

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// The errors of this package; messages wrap them with the detail.
var (
	// ErrNoVision means a checkpoint without a vision tower (a text-only config.json).
	ErrNoVision = errors.New("vision: the checkpoint has no vision tower")
	// ErrConfig means a vision configuration the tower cannot run.
	ErrConfig = errors.New("vision: invalid config")
	// ErrInput means pixel values the tower cannot take.
	ErrInput = errors.New("vision: invalid input")
)

// LayerNormEps is the eps of every LayerNorm of the tower: nn.LayerNorm's default, whatever norm_eps says
// (spec §1.2).
const LayerNormEps = 1e-5

// Config is the vision tower's configuration (spec §1.2) with the ids and sizes of the multimodal
// config.json it needs.
type Config struct {
	HiddenSize         int     // hidden_size
	NumLayers          int     // num_hidden_layers
	NumHeads           int     // num_attention_heads
	IntermediateSize   int     // intermediate_size: encoder MLP width and pixel-shuffle output width
	ImageSize          int     // image_size: the tile side in pixels
	PatchSize          int     // patch_size
	NumChannels        int     // num_channels
	VisionOutputDim    int     // vision_output_dim: the projector's input width
	ProjectorInputDim  int     // projector_input_dim: the adapter's fc1 output width
	ProjectorOutputDim int     // projector_output_dim: the adapter's fc2 width
	PixelShuffleRatio  float64 // pixel_shuffle_ratio
	RopeTheta          float64 // rope_parameters.rope_theta or rope_theta

	TextHiddenSize int // text_config.hidden_size: the projector's output width

	// The token ids of the prompt layout (config.json's boi/eoi/image_token_index).
	ImageStartID, ImageEndID, PatchID int
}

// LoadConfig reads dir/config.json.
func LoadConfig(dir string) (Config, error) {
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return Config{}, fmt.Errorf("vision: read config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	return cfg, nil
}

// ParseConfig parses a multimodal config.json (model_type llama4 with a vision_config); defaults are
// transformers 5.17's Llama4VisionConfig and Llama4Config's.
func ParseConfig(data []byte) (Config, error) {
	var top struct {
		ModelType  string           `json:"model_type"`
		Vision     *json.RawMessage `json:"vision_config"`
		Text       *json.RawMessage `json:"text_config"`
		Boi        *int             `json:"boi_token_index"`
		Eoi        *int             `json:"eoi_token_index"`
		ImageToken *int             `json:"image_token_index"`
	}
	if err := json.Unmarshal(data, &top); err != nil {
		return Config{}, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if top.Vision == nil || string(*top.Vision) == "null" {
		return Config{}, fmt.Errorf("%w (model_type %q, no vision_config)", ErrNoVision, top.ModelType)
	}
	c := Config{
		HiddenSize: 768, NumLayers: 34, NumHeads: 16, IntermediateSize: 5632, ImageSize: 448, PatchSize: 14,
		NumChannels: 3, VisionOutputDim: 7680, ProjectorInputDim: 4096, ProjectorOutputDim: 4096,
		PixelShuffleRatio: 0.5, RopeTheta: 10000, ImageStartID: 200080, ImageEndID: 200081, PatchID: 200092,
	}
	var v struct {
		HiddenSize         *int     `json:"hidden_size"`
		NumLayers          *int     `json:"num_hidden_layers"`
		NumHeads           *int     `json:"num_attention_heads"`
		IntermediateSize   *int     `json:"intermediate_size"`
		ImageSize          *int     `json:"image_size"`
		PatchSize          *int     `json:"patch_size"`
		NumChannels        *int     `json:"num_channels"`
		VisionOutputDim    *int     `json:"vision_output_dim"`
		ProjectorInputDim  *int     `json:"projector_input_dim"`
		ProjectorOutputDim *int     `json:"projector_output_dim"`
		PixelShuffleRatio  *float64 `json:"pixel_shuffle_ratio"`
		RopeTheta          *float64 `json:"rope_theta"`
		RopeParameters     *struct {
			RopeTheta *float64 `json:"rope_theta"`
		} `json:"rope_parameters"`
	}
	if err := json.Unmarshal(*top.Vision, &v); err != nil {
		return Config{}, fmt.Errorf("%w: vision_config: %v", ErrConfig, err)
	}
	setInt := func(dst *int, src *int) {
		if src != nil {
			*dst = *src
		}
	}
	setInt(&c.HiddenSize, v.HiddenSize)
	setInt(&c.NumLayers, v.NumLayers)
	setInt(&c.NumHeads, v.NumHeads)
	setInt(&c.IntermediateSize, v.IntermediateSize)
	setInt(&c.ImageSize, v.ImageSize)
	setInt(&c.PatchSize, v.PatchSize)
	setInt(&c.NumChannels, v.NumChannels)
	setInt(&c.VisionOutputDim, v.VisionOutputDim)
	setInt(&c.ProjectorInputDim, v.ProjectorInputDim)
	setInt(&c.ProjectorOutputDim, v.ProjectorOutputDim)
	setInt(&c.ImageStartID, top.Boi)
	setInt(&c.ImageEndID, top.Eoi)
	setInt(&c.PatchID, top.ImageToken)
	if v.PixelShuffleRatio != nil {
		c.PixelShuffleRatio = *v.PixelShuffleRatio
	}
	if v.RopeTheta != nil {
		c.RopeTheta = *v.RopeTheta
	}
	if v.RopeParameters != nil && v.RopeParameters.RopeTheta != nil {
		c.RopeTheta = *v.RopeParameters.RopeTheta
	}
	if top.Text != nil {
		var t struct {
			HiddenSize *int `json:"hidden_size"`
		}
		if err := json.Unmarshal(*top.Text, &t); err != nil {
			return Config{}, fmt.Errorf("%w: text_config: %v", ErrConfig, err)
		}
		setInt(&c.TextHiddenSize, t.HiddenSize)
	}
	if c.TextHiddenSize == 0 {
		c.TextHiddenSize = 5120
	}
	return c, c.Validate()
}

// Validate checks the sizes the forward pass relies on.
func (c Config) Validate() error {
	for _, p := range []struct {
		key string
		v   int
	}{
		{"hidden_size", c.HiddenSize}, {"num_hidden_layers", c.NumLayers}, {"num_attention_heads", c.NumHeads},
		{"intermediate_size", c.IntermediateSize}, {"image_size", c.ImageSize}, {"patch_size", c.PatchSize},
		{"num_channels", c.NumChannels}, {"vision_output_dim", c.VisionOutputDim},
		{"projector_input_dim", c.ProjectorInputDim}, {"projector_output_dim", c.ProjectorOutputDim},
		{"text_config.hidden_size", c.TextHiddenSize},
	} {
		if p.v <= 0 {
			return fmt.Errorf("%w: vision_config.%s must be positive, got %d", ErrConfig, p.key, p.v)
		}
	}
	switch {
	case c.ImageSize%c.PatchSize != 0:
		return fmt.Errorf("%w: image_size %d is not a multiple of patch_size %d", ErrConfig, c.ImageSize, c.PatchSize)
	case c.HiddenSize%c.NumHeads != 0 || c.HeadDim()%4 != 0:
		return fmt.Errorf("%w: hidden_size %d / num_attention_heads %d must be a multiple of 4 (2-D RoPE pairs)", ErrConfig, c.HiddenSize, c.NumHeads)
	case c.PixelShuffleRatio != 0.5:
		return fmt.Errorf("%w: pixel_shuffle_ratio %g: only 0.5 is supported", ErrConfig, c.PixelShuffleRatio)
	case c.Grid()%2 != 0:
		return fmt.Errorf("%w: a %d-patch grid cannot be pixel-shuffled by 0.5", ErrConfig, c.Grid())
	case c.IntermediateSize != 4*c.HiddenSize:
		return fmt.Errorf("%w: intermediate_size %d must be 4·hidden_size (the pixel-shuffle width the adapter takes)", ErrConfig, c.IntermediateSize)
	case c.ProjectorOutputDim != c.VisionOutputDim:
		return fmt.Errorf("%w: projector_output_dim %d must equal vision_output_dim %d", ErrConfig, c.ProjectorOutputDim, c.VisionOutputDim)
	case c.RopeTheta <= 0:
		return fmt.Errorf("%w: rope_theta must be positive, got %g", ErrConfig, c.RopeTheta)
	}
	return nil
}

// HeadDim is the attention head width.
func (c Config) HeadDim() int { return c.HiddenSize / c.NumHeads }

// Grid is the number of patches along a tile's side.
func (c Config) Grid() int { return c.ImageSize / c.PatchSize }

// TokensPerTile is the number of features (and <|patch|> slots) per tile: (Grid/2)².
func (c Config) TokensPerTile() int { return (c.Grid() / 2) * (c.Grid() / 2) }
