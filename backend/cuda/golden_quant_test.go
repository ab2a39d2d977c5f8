package cuda_test

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// Issue 11's bounds for the quantised models on the GPU against HF's float32 logits of the same
// quantised weights (testdata/quant, scripts/fixtures/make_quant_fixtures.py): relative L2 <= 5e-2 and
// top-1 agreement >= 95 % of positions.
//
// fp8+act (FbgemmFp8's dynamic activations) has no HF golden and is compared with the cpu backend,
// which it cannot match as closely as the weight-only formats do: every quantised Linear rounds its
// input rows to E4M3, and inputs that differ from the cpu's in the last bits (the KV cache is bf16 on
// the GPU, float32 on the cpu: attention outputs differ by about 2^-9) land on the neighbouring E4M3
// value near a rounding midpoint, a step of 6–12 % of that element. Hence the looser bounds.
const (
	quantGoldenRelL2 = 5e-2
	quantGoldenTop1  = 0.95
	quantActRelL2    = 1e-1
	quantActTop1     = 0.90
)

// quantModel is one quantised model of the goldens: how to load it on a backend.
type quantModel struct {
	name   string
	golden string // the HF golden in testdata/quant ("" for a comparison with the cpu backend only)
	load   func(t *testing.T, ops backend.Ops) *llama4.Model
	// relL2 and top1 are the bounds (quantGolden… with a golden, quantAct… without).
	relL2, top1 float64
}

// quantModels are the compressed-tensors FP8 checkpoint (testdata/quant/fp8-ct, read through a
// shard.View), moe-top2 quantised at load to fp8 rowwise (weight-only) and int4 g128 (HF goldens), and
// moe-top2 at --quantization fp8 (dynamic activations; no HF golden: compared with the cpu backend).
func quantModels(t *testing.T) []quantModel {
	t.Helper()
	quantDir := filepath.Join(filepath.Dir(fixturesDir(t)), "quant")
	ctDir := filepath.Join(quantDir, "fp8-ct")
	fromFixture := func(f quant.Format) func(t *testing.T, ops backend.Ops) *llama4.Model {
		return func(t *testing.T, ops backend.Ops) *llama4.Model {
			dir := filepath.Join(fixturesDir(t), "moe-top2")
			cfg, err := llama4.LoadConfig(dir)
			if err != nil {
				t.Fatal(err)
			}
			ckpt := openCheckpoint(t, dir)
			m, err := llama4.Load(context.Background(), ops, cfg, llama4.NewCheckpointWeights(ckpt, ops, cfg).WithFormat(cfg, f), llama4.Parallel{})
			if err != nil {
				t.Fatalf("load moe-top2 as %s on %s: %v", f, ops.Name(), err)
			}
			return m
		}
	}
	return []quantModel{
		{name: "fp8-ct", golden: filepath.Join(quantDir, "golden-fp8-ct.safetensors"), relL2: quantGoldenRelL2, top1: quantGoldenTop1, load: func(t *testing.T, ops backend.Ops) *llama4.Model {
			cfg, err := llama4.LoadConfig(ctDir)
			if err != nil {
				t.Fatal(err)
			}
			ckpt := openCheckpoint(t, ctDir)
			view, err := shard.NewView(cfg, ckpt)
			if err != nil {
				t.Fatal(err)
			}
			man, err := shard.NewManifest(cfg, view, shard.DefaultPlan(cfg), 1, 0)
			if err != nil {
				t.Fatal(err)
			}
			w := run.NewRankWeights(shard.NewRankReader(view, man), ops).WithFormat(cfg, quant.Format{})
			m, err := llama4.Load(context.Background(), ops, cfg, w, llama4.Parallel{})
			if err != nil {
				t.Fatalf("load fp8-ct on %s: %v", ops.Name(), err)
			}
			return m
		}},
		{name: "fp8", golden: filepath.Join(quantDir, "golden-fp8.safetensors"), relL2: quantGoldenRelL2, top1: quantGoldenTop1,
			load: fromFixture(quant.Format{Kind: quant.FP8})},
		{name: "int4-g128", golden: filepath.Join(quantDir, "golden-int4.safetensors"), relL2: quantGoldenRelL2, top1: quantGoldenTop1,
			load: fromFixture(quant.Format{Kind: quant.Int4, GroupSize: 128})},
		{name: "fp8+act", relL2: quantActRelL2, top1: quantActTop1, load: fromFixture(quant.Format{Kind: quant.FP8, DynamicActivations: true})},
	}
}

// openCheckpoint opens the checkpoint (or single safetensors file) at dir, closed when t ends.
func openCheckpoint(t *testing.T, dir string) *safetensors.Checkpoint {
	t.Helper()
	c, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestQuantGolden scores the quantised goldens' ids teacher-forced on the GPU and compares the logits
// with HF's float32 ones (relative L2, top-1 agreement per position), and with the cpu backend's (the
// reference, which matches HF to 1e-4: model/llama4.TestQuantGoldens). fp8+act has no HF golden: it is
// held to looser bounds against the cpu backend (quantActRelL2, quantActTop1: see there why). Greedy decoding (16 tokens through the KV cache: the
// one-row GEMV paths) is compared with the cpu's and reported.
func TestQuantGolden(t *testing.T) {
	for _, act := range []cuda.DType{cuda.BF16, cuda.F32} {
		for _, qm := range quantModels(t) {
			t.Run(fmt.Sprintf("%s/activations=%s", qm.name, act), func(t *testing.T) {
				g := newBackend(t, act)
				c := cpu.New(cpu.Config{})
				var ids []int
				var hf []float32
				src := qm.golden
				if src == "" {
					src = filepath.Join(filepath.Dir(fixturesDir(t)), "quant", "golden-fp8.safetensors") // its ids only
				}
				gf := openCheckpoint(t, src)
				info, data := readGolden(t, gf, "score_ids")
				i64, err := safetensors.ToInt64(info.DType, data)
				if err != nil {
					t.Fatal(err)
				}
				for _, v := range i64 {
					ids = append(ids, int(v))
				}
				if qm.golden != "" {
					info, data = readGolden(t, gf, "score_logits")
					hf = make([]float32, info.NumElements())
					if err := safetensors.ToFloat32(info.DType, data, hf); err != nil {
						t.Fatal(err)
					}
				}
				gm, cm := qm.load(t, g), qm.load(t, c)
				ctx := context.Background()
				before := g.Counters()
				start := time.Now()
				got, err := gm.Score(ctx, ids)
				elapsed := time.Since(start)
				if err != nil {
					t.Fatalf("score on cuda: %v", err)
				}
				paths := counterDiff(before, g.Counters())
				ref, err := cm.Score(ctx, ids)
				if err != nil {
					t.Fatalf("score on cpu: %v", err)
				}
				vocab := len(ref) / len(ids)
				want, against := hf, "HF"
				if want == nil {
					want, against = ref, "cpu"
				}
				if len(got) != len(want) || len(ref) != len(want) {
					t.Fatalf("cuda gave %d logits, cpu %d, %s %d", len(got), len(ref), against, len(want))
				}
				rel, agree, worstPos, worst := logitStats(got, want, vocab)
				relCPU, agreeCPU, _, _ := logitStats(got, ref, vocab)
				positions := len(ids)

				// Greedy decoding: the first 8 ids as the prompt, 16 tokens on each backend.
				prompt := ids[:8]
				gg, _, err := gm.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 16}, nil)
				if err != nil {
					t.Fatalf("generate on cuda: %v", err)
				}
				cg, _, err := cm.Generate(ctx, prompt, llama4.GenerateOptions{MaxTokens: 16}, nil)
				if err != nil {
					t.Fatalf("generate on cpu: %v", err)
				}
				same := 0
				for same < len(gg) && same < len(cg) && gg[same] == cg[same] {
					same++
				}
				status := ""
				if rel > qm.relL2 || float64(agree) < qm.top1*float64(positions) || math.IsNaN(rel) {
					status = " FAIL"
					t.Errorf("%s act=%s vs %s: relative L2 = %.3g (want <= %.3g), top-1 agreement %d/%d (want >= %.0f%%); "+
						"worst position %d (max |Δ|/max|ref| %.3g); vs cpu: relative L2 %.3g, top-1 %d/%d; paths %s",
						qm.name, act, against, rel, qm.relL2, agree, positions, 100*qm.top1, worstPos, worst, relCPU, agreeCPU, positions, paths)
				}
				t.Logf("%s act=%s: vs %s relL2 %.3g top-1 %d/%d (worst position %d: %.3g); vs cpu relL2 %.3g top-1 %d/%d; greedy vs cpu %d/%d %v / %v; score %v; paths %s",
					qm.name, act, against, rel, agree, positions, worstPos, worst, relCPU, agreeCPU, positions, same, len(cg), gg, cg, elapsed, paths)
				row("qgolden "+qm.name, fmt.Sprintf("act %s, 1x%d ids vs %s", act, positions, against),
					fmt.Sprintf("relL2 %.2e top1 %d/%d greedy=cpu %d/%d%s", rel, agree, positions, same, len(cg), status),
					fmt.Sprintf("vs cpu relL2 %.2e; %s", relCPU, paths))
			})
		}
	}
}

// logitStats compares logits [positions, vocab]: relative L2 over all, the positions whose argmax
// agree, and the position with the largest max |Δ| / max |ref|.
func logitStats(got, want []float32, vocab int) (rel float64, agree, worstPos int, worst float64) {
	rel = relL2(got, want)
	for p := 0; p < len(want)/vocab; p++ {
		g, h := got[p*vocab:(p+1)*vocab], want[p*vocab:(p+1)*vocab]
		if argmax(g) == argmax(h) {
			agree++
		}
		var d, m float64
		for i := range h {
			d = math.Max(d, math.Abs(float64(g[i])-float64(h[i])))
			m = math.Max(m, math.Abs(float64(h[i])))
		}
		if r := d / m; r > worst || math.IsNaN(r) {
			worst, worstPos = r, p
		}
	}
	return rel, agree, worstPos, worst
}
