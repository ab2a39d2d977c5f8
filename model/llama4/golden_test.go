package llama4_test

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
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/sample"
)

const fixturesDir = "../../testdata/fixtures"

// fixture is one tiny checkpoint made by scripts/fixtures/make_fixtures.py with HF transformers' golden outputs.
type fixture struct {
	name, dir    string
	cfg          llama4.Config
	ckpt         *safetensors.Checkpoint
	scoreIDs     [][]int
	scoreLogits  []float32 // [batch, seq, vocab]
	prompt       []int
	greedyIDs    []int
	greedyLogits []float32 // [len(prompt)+len(greedy)-1, vocab]
}

func fixtures(t *testing.T) []*fixture {
	t.Helper()
	entries, err := os.ReadDir(fixturesDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []*fixture
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, openFixture(t, e.Name()))
		}
	}
	if len(out) < 3 {
		t.Fatalf("found %d fixtures in %s, want at least 3", len(out), fixturesDir)
	}
	return out
}

func openFixture(t *testing.T, name string) *fixture {
	t.Helper()
	f := &fixture{name: name, dir: filepath.Join(fixturesDir, name)}
	var err error
	if f.cfg, err = llama4.LoadConfig(f.dir); err != nil {
		t.Fatal(err)
	}
	if f.ckpt, err = safetensors.OpenCheckpoint(f.dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.ckpt.Close() })
	golden, err := safetensors.OpenCheckpoint(filepath.Join(f.dir, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer golden.Close()
	f.scoreIDs = int64Rows(t, golden, "score_ids")
	f.scoreLogits = float32s(t, golden, "score_logits")
	f.prompt = int64Rows(t, golden, "prompt_ids")[0]
	f.greedyIDs = int64Rows(t, golden, "greedy_ids")[0]
	f.greedyLogits = float32s(t, golden, "greedy_logits")
	return f
}

func int64Rows(t *testing.T, c *safetensors.Checkpoint, name string) [][]int {
	t.Helper()
	flat, shape, err := c.Int64s(name)
	if err != nil {
		t.Fatal(err)
	}
	rows := make([][]int, shape[0])
	for r := range rows {
		for _, v := range flat[r*shape[1] : (r+1)*shape[1]] {
			rows[r] = append(rows[r], int(v))
		}
	}
	return rows
}

func float32s(t *testing.T, c *safetensors.Checkpoint, name string) []float32 {
	t.Helper()
	v, _, err := c.Float32s(name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (f *fixture) load(t *testing.T) *llama4.Model {
	m, _ := f.loadOps(t)
	return m
}

func (f *fixture) loadOps(t *testing.T) (*llama4.Model, backend.Ops) {
	t.Helper()
	ops := cpu.New(cpu.Config{})
	m, err := llama4.Load(context.Background(), ops, f.cfg, llama4.NewCheckpointWeights(f.ckpt, ops, f.cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	return m, ops
}

// maxRelDiff is the worst position's max |got-want| / max |want| over rows of vocab values.
func maxRelDiff(t *testing.T, got, want []float32, vocab int) (worst float64, at int) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d logits, want %d", len(got), len(want))
	}
	for p := 0; p < len(want)/vocab; p++ {
		var diff, ref float64
		for v := p * vocab; v < (p+1)*vocab; v++ {
			diff = math.Max(diff, math.Abs(float64(got[v])-float64(want[v])))
			ref = math.Max(ref, math.Abs(float64(want[v])))
		}
		if r := diff / ref; r > worst || math.IsNaN(r) {
			worst, at = r, p
		}
	}
	return worst, at
}

// TestGoldenLogits: CPU logits match HF's float32 logits to 1e-4 relative at every position (DESIGN §6).
func TestGoldenLogits(t *testing.T) {
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m := f.load(t)
			vocab := f.cfg.VocabSize
			seq := len(f.scoreIDs[0])
			for b, ids := range f.scoreIDs {
				got, err := m.Score(context.Background(), ids)
				if err != nil {
					t.Fatal(err)
				}
				want := f.scoreLogits[b*seq*vocab : (b+1)*seq*vocab]
				if worst, at := maxRelDiff(t, got, want, vocab); worst > 1e-4 {
					t.Errorf("row %d: max |Δ|/max |ref| = %.3g at position %d, want <= 1e-4", b, worst, at)
				} else {
					t.Logf("row %d: max |Δ|/max |ref| = %.3g", b, worst)
				}
			}
			full := append(slices.Clone(f.prompt), f.greedyIDs[:len(f.greedyIDs)-1]...)
			got, err := m.Score(context.Background(), full)
			if err != nil {
				t.Fatal(err)
			}
			if worst, at := maxRelDiff(t, got, f.greedyLogits, vocab); worst > 1e-4 {
				t.Errorf("greedy sequence: max |Δ|/max |ref| = %.3g at position %d, want <= 1e-4", worst, at)
			}
		})
	}
}

// TestGoldenGreedy: greedy decoding through the KV cache reproduces HF's 30 greedy ids exactly.
func TestGoldenGreedy(t *testing.T) {
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m := f.load(t)
			got, finish, err := m.Generate(context.Background(), f.prompt,
				llama4.GenerateOptions{MaxTokens: len(f.greedyIDs)}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, f.greedyIDs) || finish != llama4.FinishLength {
				t.Errorf("Generate(%v) = %v, %s\nwant %v, length", f.prompt, got, finish, f.greedyIDs)
			}
		})
	}
}

// TestGenerateStopsAtEOS: with the fixture's eos ids as stop ids, generation ends at the first one, which
// dense-moe-mm's greedy sequence contains (id 2 at step 15).
func TestGenerateStopsAtEOS(t *testing.T) {
	f := openFixture(t, "dense-moe-mm")
	gen, err := llama4.LoadGeneration(f.dir, f.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(gen.EOS, []int{2, 3}) {
		t.Fatalf("generation_config eos = %v, want [2 3]", gen.EOS)
	}
	stop := slices.IndexFunc(f.greedyIDs, func(id int) bool { return slices.Contains(gen.EOS, id) })
	if stop < 0 {
		t.Fatalf("fixture's greedy ids %v contain no eos id", f.greedyIDs)
	}
	var emitted []int
	got, finish, err := f.load(t).Generate(context.Background(), f.prompt,
		llama4.GenerateOptions{MaxTokens: len(f.greedyIDs), StopIDs: gen.EOS},
		func(id int) error { emitted = append(emitted, id); return nil })
	if err != nil {
		t.Fatal(err)
	}
	want := f.greedyIDs[:stop+1]
	if !slices.Equal(got, want) || finish != llama4.FinishStop || !slices.Equal(emitted, want) {
		t.Errorf("Generate = %v, %s (emitted %v), want %v, stop", got, finish, emitted, want)
	}
}

// TestIncrementalEqualsFull: feeding a sequence through the KV cache in pieces (a prefill, then single
// tokens, crossing chunk boundaries) gives the logits of one full forward.
func TestIncrementalEqualsFull(t *testing.T) {
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m, ops := f.loadOps(t)
			ids := f.scoreIDs[0]
			want, err := m.Score(context.Background(), ids)
			if err != nil {
				t.Fatal(err)
			}
			for _, prefill := range []int{1, 5, 17} {
				seq, err := m.NewSequence(len(ids))
				if err != nil {
					t.Fatal(err)
				}
				var got []float32
				for start := 0; start < len(ids); {
					end := min(start+1, len(ids))
					if start == 0 {
						end = prefill
					}
					logits, err := m.Forward(context.Background(), seq, ids[start:end], true)
					if err != nil {
						t.Fatal(err)
					}
					rows, err := ops.Float32(logits)
					if err != nil {
						t.Fatal(err)
					}
					got = append(got, rows...)
					start = end
				}
				if worst, at := maxRelDiff(t, got, want, f.cfg.VocabSize); worst > 1e-5 {
					t.Errorf("prefill %d then decode: max |Δ|/max |ref| = %.3g at position %d vs full forward, want <= 1e-5", prefill, worst, at)
				}
			}
		})
	}
}

// TestSampledGenerationIsSeeded: the same seed gives the same sampled tokens, another seed others.
func TestSampledGenerationIsSeeded(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.load(t)
	gen := func(seed uint64) []int {
		ids, _, err := m.Generate(context.Background(), f.prompt, llama4.GenerateOptions{
			MaxTokens: 20, Sample: sample.Params{Temperature: 1.5, TopK: 50, TopP: 0.95, Seed: seed}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}
	a, b, c := gen(7), gen(7), gen(8)
	if !slices.Equal(a, b) {
		t.Errorf("seed 7 twice: %v and %v", a, b)
	}
	if slices.Equal(a, c) {
		t.Errorf("seeds 7 and 8 both gave %v", a)
	}
	if slices.Equal(a, f.greedyIDs[:20]) {
		t.Errorf("sampling at temperature 1.5 reproduced the greedy ids %v", a)
	}
}

func TestForwardRejectsBadInput(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.load(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		ids  []int
	}{
		{"empty", nil},
		{"id past vocabulary", []int{1, 512}},
		{"negative id", []int{-1}},
	} {
		if _, err := m.Score(ctx, tc.ids); !errors.Is(err, llama4.ErrInput) {
			t.Errorf("%s: Score(%v) error = %v, want ErrInput", tc.name, tc.ids, err)
		}
	}
	if _, _, err := m.Generate(ctx, []int{1}, llama4.GenerateOptions{MaxTokens: 0}, nil); !errors.Is(err, llama4.ErrInput) {
		t.Errorf("Generate(max tokens 0) error = %v, want ErrInput", err)
	}
	if _, _, err := m.Generate(ctx, []int{1}, llama4.GenerateOptions{MaxTokens: f.cfg.MaxPositions}, nil); !errors.Is(err, llama4.ErrInput) {
		t.Errorf("Generate(past the context) error = %v, want ErrInput", err)
	}
	seq, err := m.NewSequence(3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Forward(ctx, seq, []int{1, 2, 3, 4}, false); !errors.Is(err, llama4.ErrInput) {
		t.Errorf("Forward(4 tokens into a 3-token sequence) error = %v, want ErrInput", err)
	}
}
