package llama4_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

// longCtxDir holds the long-context fixture of scripts/fixtures/make_longctx_fixture.py: a tiny random
// Llama 4 with attention_chunk_size 16 and floor_scale 8, a prompt of 12+ chunks, HF's float32 logits of
// the whole prompt and its greedy continuation.
const longCtxDir = "../../testdata/longctx"

// prefillChunks are the piece lengths every chunked-prefill test runs: whole (0), the 5, 16 (the
// attention chunk) and 37, and token by token (1).
var prefillChunks = []int{0, 5, 16, 37, 1}

// randomChunkedModel is a random model of the moe-top1 fixture's shape (attention_chunk_size 16,
// floor_scale 8, three chunked layers and one global NoPE layer) with room for long prompts.
func randomChunkedModel(t *testing.T) *llama4.Model {
	t.Helper()
	cfg, err := llama4.LoadConfig(filepath.Join(fixturesDir, "moe-top1"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AttentionChunkSize != 16 || cfg.FloorScale != 8 {
		t.Fatalf("moe-top1: attention_chunk_size %d, floor_scale %v, want 16 and 8", cfg.AttentionChunkSize, cfg.FloorScale)
	}
	cfg.MaxPositions = 1024
	ops := cpu.New(cpu.Config{})
	m, err := llama4.Load(context.Background(), ops, cfg, llama4.NewRandomWeights(cfg, ops, 42), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func randomIDs(n, vocab int, seed uint64) []int {
	r := rand.New(rand.NewPCG(seed, 1))
	ids := make([]int, n)
	for i := range ids {
		ids[i] = r.IntN(vocab)
	}
	return ids
}

// checkChunkedScore scores ids whole and in each of prefillChunks and compares with want (nil: the
// whole prefill's own logits) to tol; it returns the worst difference seen.
func checkChunkedScore(t *testing.T, m *llama4.Model, ids []int, want []float32, tol float64) float64 {
	t.Helper()
	ctx := context.Background()
	var worstAll float64
	for _, chunk := range prefillChunks {
		got, err := m.ScoreChunked(ctx, ids, chunk)
		if err != nil {
			t.Fatalf("ScoreChunked(chunk %d): %v", chunk, err)
		}
		if want == nil {
			want = got
			continue
		}
		worst, at := maxRelDiff(t, got, want, m.Config.VocabSize)
		if worst > tol {
			t.Errorf("prefill in pieces of %d (0: whole): max |Δ|/max |ref| = %.3g at position %d, want <= %g", chunk, worst, at, tol)
		}
		worstAll = max(worstAll, worst)
	}
	if used, _, _ := m.KVUsage(); used != 0 {
		t.Errorf("KV blocks in use after scoring = %d, want 0", used)
	}
	return worstAll
}

// TestChunkedPrefillEqualsWhole: a prompt prefilled in pieces (of 5, 16 and 37 tokens, and one by one)
// gives the logits of the whole prefill, on the fixtures and on a random model with 16-token attention
// chunks and a prompt of 13 chunks (NoPE temperature tuning at floor_scale 8 over many floors).
func TestChunkedPrefillEqualsWhole(t *testing.T) {
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m := f.load(t)
			ids := f.scoreIDs[0]
			worst := checkChunkedScore(t, m, ids, nil, 1e-5)
			t.Logf("%d tokens: worst chunked vs whole %.3g", len(ids), worst)
		})
	}
	t.Run("random-chunk16", func(t *testing.T) {
		m := randomChunkedModel(t)
		ids := randomIDs(208, m.Config.VocabSize, 3)
		worst := checkChunkedScore(t, m, ids, nil, 1e-5)
		t.Logf("%d tokens: worst chunked vs whole %.3g", len(ids), worst)
	})
}

// TestChunkedGenerateEqualsGreedy: Generate with PrefillChunk gives the whole prefill's greedy ids (the
// fixtures' are HF's), and every block goes back to the pool after it, also when it is cancelled.
func TestChunkedGenerateEqualsGreedy(t *testing.T) {
	ctx := context.Background()
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m := f.load(t)
			for _, chunk := range prefillChunks {
				got, _, err := m.Generate(ctx, f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs), PrefillChunk: chunk}, nil)
				if err != nil {
					t.Fatalf("chunk %d: %v", chunk, err)
				}
				if !slices.Equal(got, f.greedyIDs) {
					t.Errorf("prefill chunk %d: greedy ids %v, want HF's %v", chunk, got, f.greedyIDs)
				}
				if used, total, size := m.KVUsage(); used != 0 || total == 0 || size != 16 {
					t.Errorf("prefill chunk %d: KV usage after Generate = %d of %d blocks of %d, want 0 of >0 of 16", chunk, used, total, size)
				}
			}
			// A generation cancelled from its emit callback frees its blocks too.
			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			n := 0
			_, _, err := m.Generate(cctx, f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs), PrefillChunk: 5}, func(int) error {
				if n++; n == 3 {
					cancel()
				}
				return nil
			})
			if !errors.Is(err, context.Canceled) {
				t.Errorf("cancelled Generate: error %v, want context.Canceled", err)
			}
			if used, _, _ := m.KVUsage(); used != 0 {
				t.Errorf("KV blocks in use after a cancelled Generate = %d, want 0", used)
			}
		})
	}
}

// TestFixedPoolExhaustion: a model whose pool cannot hold a sequence fails with the backend's
// ErrNoBlocks, frees what it took, and runs again once the pool is large enough.
func TestFixedPoolExhaustion(t *testing.T) {
	f := openFixture(t, "moe-top1")
	m := f.load(t)
	ctx := context.Background()
	// 4 layers; a 12-token prompt plus 30 new tokens: the global layer needs 3 blocks of 16.
	if err := m.SetKVBlocks(16, 4); err != nil {
		t.Fatal(err)
	}
	if _, _, err := m.Generate(ctx, f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs)}, nil); err == nil {
		t.Fatal("Generate with a pool of 4 blocks for 4 layers of 42 positions: no error")
	}
	if used, total, _ := m.KVUsage(); used != 0 || total != 4 {
		t.Errorf("after the failed Generate: %d of %d blocks in use, want 0 of 4", used, total)
	}
	// Chunked layers hold at most ceil(16/16)+1 = 2 blocks each, the global layer 3: 9 suffice.
	if err := m.SetKVBlocks(16, 9); err != nil {
		t.Fatal(err)
	}
	got, _, err := m.Generate(ctx, f.prompt, llama4.GenerateOptions{MaxTokens: len(f.greedyIDs), PrefillChunk: 5}, nil)
	if err != nil {
		t.Fatalf("Generate with 9 blocks: %v", err)
	}
	if !slices.Equal(got, f.greedyIDs) {
		t.Errorf("greedy ids with a 9-block pool %v, want %v", got, f.greedyIDs)
	}
	if err := m.SetKVBlocks(0, 0); err == nil {
		t.Error("SetKVBlocks(block size 0): no error")
	}
}

// TestLongContextGolden: on the long-context fixture (testdata/longctx, HF 5.17), the prompt prefilled
// whole, in pieces of 5, 16 and 37 tokens and token by token gives HF's float32 logits to 1e-4 relative,
// and greedy decoding after a chunked prefill gives HF's ids.
func TestLongContextGolden(t *testing.T) {
	if _, err := os.Stat(filepath.Join(longCtxDir, "golden.safetensors")); err != nil {
		t.Fatalf("the long-context fixture is missing (%v): make it on the GPU machine with "+
			"python3 scripts/fixtures/make_longctx_fixture.py --out testdata/longctx", err)
	}
	cfg, err := llama4.LoadConfig(longCtxDir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AttentionChunkSize != 16 || cfg.FloorScale != 8 {
		t.Fatalf("longctx: attention_chunk_size %d, floor_scale %v, want 16 and 8", cfg.AttentionChunkSize, cfg.FloorScale)
	}
	ckpt, err := safetensors.OpenCheckpoint(longCtxDir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	golden, err := safetensors.OpenCheckpoint(filepath.Join(longCtxDir, "golden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer golden.Close()
	prompt := int64Rows(t, golden, "prompt_ids")[0]
	want := float32s(t, golden, "prompt_logits")
	greedy := int64Rows(t, golden, "greedy_ids")[0]
	if len(prompt) < 12*cfg.AttentionChunkSize {
		t.Fatalf("longctx prompt of %d tokens, want at least 12 chunks of %d", len(prompt), cfg.AttentionChunkSize)
	}
	ops := cpu.New(cpu.Config{})
	m, err := llama4.Load(context.Background(), ops, cfg, llama4.NewCheckpointWeights(ckpt, ops, cfg), llama4.Parallel{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, chunk := range prefillChunks {
		got, err := m.ScoreChunked(ctx, prompt, chunk)
		if err != nil {
			t.Fatalf("chunk %d: %v", chunk, err)
		}
		worst, at := maxRelDiff(t, got, want, cfg.VocabSize)
		t.Logf("prefill in pieces of %d (0: whole), %d tokens: max |Δ|/max |HF| = %.3g at %d", chunk, len(prompt), worst, at)
		if worst > 1e-4 {
			t.Errorf("prefill in pieces of %d: max |Δ|/max |HF| = %.3g at position %d, want <= 1e-4", chunk, worst, at)
		}
		ids, _, err := m.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: len(greedy), PrefillChunk: chunk}, nil)
		if err != nil {
			t.Fatalf("Generate(chunk %d): %v", chunk, err)
		}
		if !slices.Equal(ids, greedy) {
			t.Errorf("prefill in pieces of %d: greedy ids %v, want HF's %v", chunk, ids, greedy)
		}
	}
	if used, _, _ := m.KVUsage(); used != 0 {
		t.Errorf("KV blocks in use at the end = %d, want 0", used)
	}
}

// TestChunkedPrefillInterleaved: one sequence's prompt fed in pieces of 5 in the same ForwardBatch
// steps as another sequence's greedy decode (as the coordinator's --prefill-chunk schedules them): both
// give HF's greedy ids, and their blocks go back when they are freed.
func TestChunkedPrefillInterleaved(t *testing.T) {
	ctx := context.Background()
	for _, f := range fixtures(t) {
		t.Run(f.name, func(t *testing.T) {
			m, ops := f.loadOps(t)
			n := len(f.greedyIDs)
			a, err := m.NewSequence(len(f.prompt) + n)
			if err != nil {
				t.Fatal(err)
			}
			b, err := m.NewSequence(len(f.prompt) + n)
			if err != nil {
				t.Fatal(err)
			}
			argmaxRow := func(v []float32, row int) int {
				r := v[row*f.cfg.VocabSize : (row+1)*f.cfg.VocabSize]
				best := 0
				for i, x := range r {
					if x > r[best] {
						best = i
					}
				}
				return best
			}
			var gotA, gotB []int
			nextA := f.prompt // a's prompt whole, then its decodes
			fedB := 0
			for len(gotA) < n || len(gotB) < n {
				var seqs []*llama4.Sequence
				var ids [][]int
				if len(gotA) < n {
					seqs, ids = append(seqs, a), append(ids, nextA)
				}
				var pieceB []int
				switch {
				case fedB < len(f.prompt):
					pieceB = f.prompt[fedB:min(fedB+5, len(f.prompt))]
				case len(gotB) < n:
					pieceB = []int{gotB[len(gotB)-1]}
				}
				if pieceB != nil {
					seqs, ids = append(seqs, b), append(ids, pieceB)
				}
				logits, err := m.ForwardBatch(ctx, seqs, ids, false)
				if err != nil {
					t.Fatal(err)
				}
				v, err := ops.Float32(logits)
				if err != nil {
					t.Fatal(err)
				}
				row := 0
				if len(gotA) < n {
					gotA = append(gotA, argmaxRow(v, row))
					nextA = []int{gotA[len(gotA)-1]}
					row++
				}
				if pieceB != nil {
					if fedB < len(f.prompt) {
						fedB += len(pieceB)
						if fedB == len(f.prompt) {
							gotB = append(gotB, argmaxRow(v, row))
						}
					} else {
						gotB = append(gotB, argmaxRow(v, row))
					}
				}
			}
			if !slices.Equal(gotA, f.greedyIDs) || !slices.Equal(gotB, f.greedyIDs) {
				t.Errorf("interleaved: a %v, b (prompt in pieces of 5) %v, want HF's %v", gotA, gotB, f.greedyIDs)
			}
			if used, _, _ := m.KVUsage(); used == 0 {
				t.Error("no KV blocks in use while two sequences are held")
			}
			a.Free()
			b.Free()
			if used, _, _ := m.KVUsage(); used != 0 {
				t.Errorf("KV blocks in use after Free = %d, want 0", used)
			}
			if _, err := m.Forward(ctx, a, []int{1}, false); !errors.Is(err, llama4.ErrInput) {
				t.Errorf("Forward on a freed sequence: %v, want ErrInput", err)
			}
		})
	}
}
