package llama4_test

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/llama4/vision"
	"github.com/tpfleet/tpfleet/safetensors"
)

// visionDir holds HF's outputs made by scripts/fixtures/make_vision_fixtures.py.
const visionDir = "../../testdata/vision"

// visionFixture is testdata/vision: the tiny multimodal model, HF's pixel values and golden outputs.
type visionFixture struct {
	cfg     llama4.Config
	vcfg    vision.Config
	ckpt    *safetensors.Checkpoint
	gold    *safetensors.Checkpoint
	pixels  *safetensors.Checkpoint // processor.safetensors.gz, unzipped
	prompts map[string]struct {
		Images []string `json:"images"`
		Model  bool     `json:"model"`
	}
}

// openVisionFixture skips until the lead has generated and committed testdata/vision. Remove this skip
// (make it a t.Fatal) once the fixtures are committed: a skipped golden test is a defect.
func openVisionFixture(t *testing.T) *visionFixture {
	t.Helper()
	if _, err := os.Stat(visionDir); errors.Is(err, fs.ErrNotExist) {
		t.Fatal("testdata/vision is missing: run python3 scripts/fixtures/make_vision_fixtures.py --out testdata/vision on the GPU machine and commit it")
	}
	f := &visionFixture{}
	dir := filepath.Join(visionDir, "model")
	var err error
	if f.cfg, err = llama4.LoadConfig(dir); err != nil {
		t.Fatal(err)
	}
	if f.vcfg, err = vision.LoadConfig(dir); err != nil {
		t.Fatal(err)
	}
	open := func(path string) *safetensors.Checkpoint {
		c, err := safetensors.OpenCheckpoint(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	f.ckpt = open(dir)
	f.gold = open(filepath.Join(visionDir, "golden.safetensors"))
	f.pixels = open(gunzip(t, filepath.Join(visionDir, "processor.safetensors.gz")))
	data, err := os.ReadFile(filepath.Join(visionDir, "prompts.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &f.prompts); err != nil {
		t.Fatal(err)
	}
	return f
}

// gunzip writes the uncompressed file into a temporary directory and returns its path.
func gunzip(t *testing.T, path string) string {
	t.Helper()
	in, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(path)+".raw")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, zr); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return out
}

// pixelValues are HF's pixel values of a prompt's images, concatenated, as float32.
func (f *visionFixture) pixelValues(t *testing.T, prompt string) ([]float32, int) {
	t.Helper()
	var all []float32
	tiles := 0
	for _, img := range f.prompts[prompt].Images {
		v, shape, err := f.pixels.Float32s(img + ".pixel_values")
		if err != nil {
			t.Fatal(err)
		}
		all, tiles = append(all, v...), tiles+shape[0]
	}
	return all, tiles
}

func (f *visionFixture) ints(t *testing.T, name string) []int {
	t.Helper()
	v, _, err := f.gold.Int64s(name)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func (f *visionFixture) floats(t *testing.T, name string) []float32 {
	t.Helper()
	v, _, err := f.gold.Float32s(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestVisionFeaturesGolden: the vision tower, adapter and projector give HF's projected features for
// prompt "one" (3 tiles) to 1e-4 relative.
func TestVisionFeaturesGolden(t *testing.T) {
	f := openVisionFixture(t)
	vm, err := vision.Load(context.Background(), cpu.New(cpu.Config{}), f.ckpt, f.vcfg)
	if err != nil {
		t.Fatal(err)
	}
	pix, tiles := f.pixelValues(t, "one")
	got, err := vm.Features(context.Background(), pix, tiles)
	if err != nil {
		t.Fatal(err)
	}
	want := f.floats(t, "one.features")
	worst, at := maxRelDiff(t, got, want, f.vcfg.TextHiddenSize)
	if worst > 1e-4 {
		t.Errorf("features: max |Δ|/max |ref| = %.3g at row %d, want <= 1e-4", worst, at)
	}
	t.Logf("features of %d tiles (cpu backend): max |Δ|/max |ref| = %.3g", tiles, worst)
}

// TestVisionLogitsGolden: with images, CPU logits match HF's float32 logits to 1e-4 relative at the stored
// positions, and greedy decoding (a prefill with the images, then one token at a time through the cache)
// reproduces HF's ids and the logits that chose them.
func TestVisionLogitsGolden(t *testing.T) {
	f := openVisionFixture(t)
	ctx := context.Background()
	ops := cpu.New(cpu.Config{})
	m, err := llama4.Load(ctx, ops, f.cfg, llama4.NewCheckpointWeights(f.ckpt, ops, f.cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	vm, err := vision.Load(ctx, ops, f.ckpt, f.vcfg)
	if err != nil {
		t.Fatal(err)
	}
	vocab := f.cfg.VocabSize
	n := 0
	for name, p := range f.prompts {
		if !p.Model {
			continue
		}
		n++
		t.Run(name, func(t *testing.T) {
			pix, tiles := f.pixelValues(t, name)
			feats, err := vm.Features(ctx, pix, tiles)
			if err != nil {
				t.Fatal(err)
			}
			images := llama4.Images{PatchID: f.vcfg.PatchID, Features: feats}
			ids := f.ints(t, name+".input_ids")
			all, err := m.ScoreImages(ctx, ids, images)
			if err != nil {
				t.Fatal(err)
			}
			positions := f.ints(t, name+".logit_positions")
			got := make([]float32, 0, len(positions)*vocab)
			for _, p := range positions {
				got = append(got, all[p*vocab:(p+1)*vocab]...)
			}
			worst, at := maxRelDiff(t, got, f.floats(t, name+".logits"), vocab)
			if worst > 1e-4 {
				t.Errorf("logits: max |Δ|/max |ref| = %.3g at position %d, want <= 1e-4", worst, positions[at])
			}
			t.Logf("%s: %d tiles, logits max |Δ|/max |ref| = %.3g", name, tiles, worst)

			want := f.ints(t, name+".greedy_ids")
			seq, err := m.NewSequence(len(ids) + len(want))
			if err != nil {
				t.Fatal(err)
			}
			logits, err := m.ForwardImages(ctx, seq, ids, images, false)
			var greedy []int
			var greedyLogits []float32
			for err == nil && len(greedy) < len(want) {
				var row []float32
				if row, err = ops.Float32(logits); err != nil {
					break
				}
				greedyLogits = append(greedyLogits, row...)
				id := argmax(row)
				greedy = append(greedy, id)
				if len(greedy) < len(want) {
					logits, err = m.Forward(ctx, seq, []int{id}, false)
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			if !equalInts(greedy, want) {
				t.Errorf("greedy ids %v, HF %v", greedy, want)
			}
			if worst, at := maxRelDiff(t, greedyLogits, f.floats(t, name+".greedy_logits"), vocab); worst > 1e-4 {
				t.Errorf("greedy logits: max |Δ|/max |ref| = %.3g at step %d, want <= 1e-4", worst, at)
			}
		})
	}
	if n < 2 {
		t.Errorf("prompts.json has %d model prompts, want 2", n)
	}
}

func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] || math.IsNaN(float64(v[best])) {
			best = i
		}
	}
	return best
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
