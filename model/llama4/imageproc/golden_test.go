package imageproc_test

import (
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/model/llama4/imageproc"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/tokenizer"
)

// visionDir holds HF's outputs made by scripts/fixtures/make_vision_fixtures.py.
const visionDir = "../../../testdata/vision"

// needFixtures skips until the lead has generated and committed testdata/vision. Remove this skip (make it
// a t.Fatal) once the fixtures are committed: a skipped golden test is a defect.
func needFixtures(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(visionDir); errors.Is(err, fs.ErrNotExist) {
		t.Fatal("testdata/vision is missing: run python3 scripts/fixtures/make_vision_fixtures.py --out testdata/vision on the GPU machine and commit it")
	}
}

// openProcessor gunzips processor.safetensors.gz into a temporary file and opens it.
func openProcessor(t *testing.T) *safetensors.Checkpoint {
	t.Helper()
	f, err := os.Open(filepath.Join(visionDir, "processor.safetensors.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "processor.safetensors")
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, zr); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	c, err := safetensors.OpenCheckpoint(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func decodeFile(t *testing.T, path string) *imageproc.Image {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	img, err := imageproc.DefaultConfig().Decode(data)
	if err != nil {
		t.Fatalf("Decode(%s): %v", path, err)
	}
	return img
}

// TestHFPixelValues: for every fixture image, the tile grid equals HF's aspect ratio and the pixel values
// equal Llama4ImageProcessor's to 1e-5 (they are bf16 values: in practice bit for bit).
func TestHFPixelValues(t *testing.T) {
	needFixtures(t)
	gold := openProcessor(t)
	c := imageproc.DefaultConfig()
	n := 0
	for _, name := range gold.Names() {
		img, ok := strings.CutSuffix(name, ".pixel_values")
		if !ok {
			continue
		}
		n++
		t.Run(img, func(t *testing.T) {
			want, shape, err := gold.Float32s(name)
			if err != nil {
				t.Fatal(err)
			}
			ar, _, err := gold.Int64s(img + ".aspect_ratio")
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.Process(decodeFile(t, filepath.Join(visionDir, "images", img+".png")))
			if err != nil {
				t.Fatal(err)
			}
			if g := (imageproc.Grid{Rows: int(ar[0]), Cols: int(ar[1])}); p.Grid != g || p.Tiles() != shape[0] {
				t.Fatalf("Process(%s) grid %+v with %d tiles, HF %+v with %d tiles", img, p.Grid, p.Tiles(), g, shape[0])
			}
			if len(p.Pixels) != len(want) {
				t.Fatalf("Process(%s): %d values, HF %d", img, len(p.Pixels), len(want))
			}
			worst, bad, first := 0.0, 0, -1
			for i, v := range want {
				d := math.Abs(float64(p.Pixels[i] - v))
				if d > 1e-5 {
					bad++
					if first < 0 {
						first = i
					}
				}
				worst = max(worst, d)
			}
			if bad > 0 {
				ts := c.TileSize
				tile, rest := first/(3*ts*ts), first%(3*ts*ts)
				t.Errorf("Process(%s): %d of %d values differ from HF by > 1e-5 (max %.3g); first at tile %d, channel %d, y %d, x %d: %v, HF %v",
					img, bad, len(want), worst, tile, rest/(ts*ts), rest%(ts*ts)/ts, rest%ts, p.Pixels[first], want[first])
			}
		})
	}
	if n < 4 {
		t.Errorf("processor.safetensors.gz holds %d images, want 4", n)
	}
}

// TestHFWebP: the lossless WebP copy decodes to the PNG's pixels.
func TestHFWebP(t *testing.T) {
	needFixtures(t)
	var meta struct {
		WebP bool `json:"webp"`
	}
	data, err := os.ReadFile(filepath.Join(visionDir, "meta.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &meta); err != nil {
		t.Fatal(err)
	}
	if !meta.WebP {
		t.Fatal("the fixture machine's Pillow wrote no WebP (meta.json webp: false): regenerate testdata/vision where Pillow has WebP")
	}
	png := decodeFile(t, filepath.Join(visionDir, "images", "c_100x80.png"))
	webp := decodeFile(t, filepath.Join(visionDir, "images", "c_100x80.webp"))
	if webp.Width != png.Width || webp.Height != png.Height || !slices.Equal(webp.Pix, png.Pix) {
		t.Errorf("c_100x80.webp decodes to %d×%d pixels unlike the PNG's %d×%d", webp.Width, webp.Height, png.Width, png.Height)
	}
}

// TestHFPromptIDs: tokenising a prompt and expanding its <|image|> placeholders gives Llama4Processor's ids.
func TestHFPromptIDs(t *testing.T) {
	needFixtures(t)
	data, err := os.ReadFile(filepath.Join(visionDir, "prompts.json"))
	if err != nil {
		t.Fatal(err)
	}
	var prompts map[string]struct {
		Text     string   `json:"text"`
		Images   []string `json:"images"`
		InputIDs []int    `json:"input_ids"`
	}
	if err := json.Unmarshal(data, &prompts); err != nil {
		t.Fatal(err)
	}
	tok, err := tokenizer.Load("../../../testdata/tokenizer")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := imageproc.LookupIDs(tok.TokenID)
	if err != nil {
		t.Fatal(err)
	}
	c := imageproc.DefaultConfig()
	for name, p := range prompts {
		var grids []imageproc.Grid
		for _, img := range p.Images {
			pr, err := c.Process(decodeFile(t, filepath.Join(visionDir, "images", img+".png")))
			if err != nil {
				t.Fatal(err)
			}
			grids = append(grids, pr.Grid)
		}
		got, err := c.Expand(tok.Encode(p.Text, true), grids, ids)
		if err != nil {
			t.Fatalf("prompt %s: %v", name, err)
		}
		if !slices.Equal(got, p.InputIDs) {
			t.Errorf("prompt %s: %d ids, HF %d; first difference at %d", name, len(got), len(p.InputIDs), firstDiff(got, p.InputIDs))
		}
	}
	if len(prompts) < 3 {
		t.Errorf("prompts.json holds %d prompts, want 3", len(prompts))
	}
}

func firstDiff(a, b []int) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
