package vision

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/safetensors"
)

const fixtures = "../../../testdata/fixtures"

func TestShuffleRows(t *testing.T) {
	// A 4×4 grid (rows 0..15, CLS row 16): token (y, x) of the 2×2 output takes patches (2y,2x),
	// (2y,2x+1), (2y+1,2x), (2y+1,2x+1); the second tile's rows start after the first's CLS row.
	want := []int{0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15}
	got := shuffleRows(4, 2)
	if !slices.Equal(got[:16], want) {
		t.Errorf("shuffleRows(4, 2) tile 0 = %v, want %v", got[:16], want)
	}
	for i, v := range want {
		want[i] = v + 17
	}
	if !slices.Equal(got[16:], want) {
		t.Errorf("shuffleRows(4, 2) tile 1 = %v, want %v", got[16:], want)
	}
}

func TestUnfold(t *testing.T) {
	// 1 channel, 4×4 pixels valued y*10+x, patch 2: patch (row, col) holds pixels (2row+ky, 2col+kx)
	// at ky·2+kx, and a zero row (CLS) follows the 4 patches.
	c := Config{ImageSize: 4, PatchSize: 2, NumChannels: 1}
	pix := make([]float32, 16)
	for y := range 4 {
		for x := range 4 {
			pix[y*4+x] = float32(y*10 + x)
		}
	}
	want := []float32{0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33, 0, 0, 0, 0}
	if got := unfold(c, pix, 1); !slices.Equal(got, want) {
		t.Errorf("unfold = %v, want %v", got, want)
	}
}

func TestRope(t *testing.T) {
	// Scout's tower: 24×24 patches, head_dim 88: 22 base frequencies θ_i = 10000^(−4i/88).
	c := Config{HiddenSize: 1408, NumHeads: 16, ImageSize: 336, PatchSize: 14, RopeTheta: 10000}
	cos, sin := rope(c)
	if len(cos) != 577 || len(cos[0]) != 44 {
		t.Fatalf("rope table %d×%d, want 577×44", len(cos), len(cos[0]))
	}
	angle := func(pos, p int) float64 { return math.Atan2(float64(sin[pos][p]), float64(cos[pos][p])) }
	theta := func(i int) float64 { return math.Pow(10000, -4*float64(i)/88) }
	for _, tt := range []struct {
		pos, pair int
		want      float64
	}{
		{0, 0, 1},                    // row 0, col 0: (col+1)·θ_0
		{0, 22, 1},                   // (row+1)·θ_0
		{5*24 + 7, 0, 8},             // col 7
		{5*24 + 7, 22, 6},            // row 5
		{5*24 + 7, 3, 8 * theta(3)},  // col part, frequency 3
		{5*24 + 7, 25, 6 * theta(3)}, // row part, frequency 3
		{23*24 + 23, 43, 24 * theta(21)},
		{576, 0, 0}, {576, 30, 0}, // CLS: identity
	} {
		want := math.Remainder(tt.want, 2*math.Pi)
		if got := angle(tt.pos, tt.pair); math.Abs(got-want) > 1e-5 {
			t.Errorf("rope angle(pos %d, pair %d) = %v, want %v", tt.pos, tt.pair, got, want)
		}
	}
}

func TestParseConfig(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(fixtures, "dense-moe-mm", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig(data)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{HiddenSize: 32, NumLayers: 1, NumHeads: 2, IntermediateSize: 128, ImageSize: 28, PatchSize: 14,
		NumChannels: 3, VisionOutputDim: 32, ProjectorInputDim: 32, ProjectorOutputDim: 32, PixelShuffleRatio: 0.5,
		RopeTheta: 10000, TextHiddenSize: 64, ImageStartID: 200080, ImageEndID: 200081, PatchID: 200092}
	if c != want {
		t.Errorf("ParseConfig(dense-moe-mm) = %+v, want %+v", c, want)
	}
	text, err := os.ReadFile(filepath.Join(fixtures, "moe-top1", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ParseConfig(text); !errors.Is(err, ErrNoVision) {
		t.Errorf("ParseConfig(text-only) error = %v, want ErrNoVision", err)
	}
	for _, bad := range []string{
		`{"model_type":"llama4","vision_config":{"hidden_size":30,"num_attention_heads":2,"intermediate_size":120}}`,
		`{"model_type":"llama4","vision_config":{"image_size":30}}`,
		`{"model_type":"llama4","vision_config":{"hidden_size":32,"num_attention_heads":2,"intermediate_size":100}}`,
		`{"model_type":"llama4","vision_config":{"pixel_shuffle_ratio":0.25}}`,
		`{"model_type":"llama4","vision_config":[1]}`,
	} {
		if _, err := ParseConfig([]byte(bad)); !errors.Is(err, ErrConfig) {
			t.Errorf("ParseConfig(%s) error = %v, want ErrConfig", bad, err)
		}
	}
}

func TestLoadFixture(t *testing.T) {
	dir := filepath.Join(fixtures, "dense-moe-mm")
	cfg, err := LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	m, err := Load(context.Background(), cpu.New(cpu.Config{}), ckpt, cfg)
	if err != nil {
		t.Fatal(err)
	}
	pix := make([]float32, 2*3*28*28)
	for i := range pix {
		pix[i] = float32(i%255)/127.5 - 1
	}
	f, err := m.Features(context.Background(), pix, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(f) != 2*1*64 {
		t.Fatalf("Features: %d values, want 2 tiles × 1 token × 64", len(f))
	}
	for i, v := range f {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("Features[%d] = %v", i, v)
		}
	}
	if slices.Equal(f[:64], f[64:]) {
		t.Errorf("two different tiles gave the same features")
	}
	if _, err := m.Features(context.Background(), pix[:10], 2); !errors.Is(err, ErrInput) {
		t.Errorf("Features(10 values) error = %v, want ErrInput", err)
	}
	bad := cfg
	bad.NumLayers = 2
	if _, err := Load(context.Background(), cpu.New(cpu.Config{}), ckpt, bad); err == nil {
		t.Errorf("Load with 2 layers of a 1-layer checkpoint: no error")
	}
}

// textOnly is a backend without backend.EncoderOps.
type textOnly struct{ backend.Ops }

func TestLoadNeedsEncoderOps(t *testing.T) {
	cfg := tinyConfig()
	if _, err := Random(context.Background(), textOnly{cpu.New(cpu.Config{})}, cfg, 1); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Random on a backend without EncoderOps: error %v, want ErrUnsupported", err)
	}
}

// tinyConfig is a 2-layer tower of 28-pixel tiles (2×2 patches of 14).
func tinyConfig() Config {
	return Config{HiddenSize: 32, NumLayers: 2, NumHeads: 2, IntermediateSize: 128, ImageSize: 28, PatchSize: 14,
		NumChannels: 3, VisionOutputDim: 24, ProjectorInputDim: 24, ProjectorOutputDim: 24, PixelShuffleRatio: 0.5,
		RopeTheta: 10000, TextHiddenSize: 40}
}

// TestFeaturesBatched: tiles run together (more than MaxTilesPerPass, so in several passes) give each
// tile's features exactly as the tile alone does: attention never crosses tiles, and every other op is
// per row.
func TestFeaturesBatched(t *testing.T) {
	ctx := context.Background()
	m, err := Random(ctx, cpu.New(cpu.Config{}), tinyConfig(), 3)
	if err != nil {
		t.Fatal(err)
	}
	tiles := MaxTilesPerPass + 2
	size := 3 * 28 * 28
	pix := make([]float32, tiles*size)
	for i := range pix {
		pix[i] = float32((i*7919)%255)/127.5 - 1
	}
	all, err := m.Features(ctx, pix, tiles)
	if err != nil {
		t.Fatal(err)
	}
	per := m.Config.TokensPerTile() * m.Config.TextHiddenSize
	if len(all) != tiles*per {
		t.Fatalf("Features: %d values, want %d", len(all), tiles*per)
	}
	for _, tile := range []int{0, 5, tiles - 1} {
		one, err := m.Features(ctx, pix[tile*size:(tile+1)*size], 1)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(one, all[tile*per:(tile+1)*per]) {
			t.Errorf("tile %d alone differs from tile %d of the batch of %d", tile, tile, tiles)
		}
	}
	if slices.Equal(all[:per], all[per:2*per]) {
		t.Errorf("two different tiles gave the same features")
	}
}
