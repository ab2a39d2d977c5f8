package memplan_test

import (
	"errors"
	"math"
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/memplan"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	_ "github.com/tpfleet/tpfleet/model/llama4" // registers the family
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/shard"
)

func loadConfig(t *testing.T, name string) model.Config {
	t.Helper()
	cfg, err := model.LoadConfig(filepath.Join("..", "testdata", "configs", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestKVBytesPerTokenFormula checks the planner against the numbers docs/operations.md works out by hand
// for Scout and Maverick (48 layers, 8 KV heads of 128, 12 global NoPE layers, chunks of 8192 tokens):
// per layer and token 2·h·d·e bytes, h = 8/tp (1 when tp > 8).
func TestKVBytesPerTokenFormula(t *testing.T) {
	for _, name := range []string{"scout", "maverick"} {
		cfg := loadConfig(t, name)
		for _, c := range []struct {
			tp, elem                     int
			token, global, block         int64
			chunkedCap, blocks128k, b10m int
		}{
			// bf16, TP 1: 2·8·128·2 = 4096 bytes a layer; ×48 = 196608; ×12 global = 49152; a block 16·4096.
			// A windowed layer holds at most ceil(8192/16)+1 = 513 blocks; 36 of them 18468.
			// 128k tokens: 12·8192 + 18468 = 116772 blocks.  10M (10485760): 12·655360 + 18468 = 7882788.
			{1, 2, 196608, 49152, 65536, 18468, 116772, 7882788},
			// bf16, TP 8: one KV head a rank: 512 bytes a layer, 24576 per token, 6144 global.
			{8, 2, 24576, 6144, 8192, 18468, 116772, 7882788},
			// TP 16: heads replicated, still one a rank.
			{16, 2, 24576, 6144, 8192, 18468, 116772, 7882788},
			// float32 (the CPU backend's cache), TP 1.
			{1, 4, 393216, 98304, 131072, 18468, 116772, 7882788},
		} {
			g, err := memplan.GeometryOf(cfg, c.tp, c.elem, 0)
			if err != nil {
				t.Fatal(err)
			}
			if got := g.TokenBytes(); got != c.token {
				t.Errorf("%s tp %d e %d: TokenBytes() = %d, want %d", name, c.tp, c.elem, got, c.token)
			}
			if got := g.GlobalTokenBytes(); got != c.global {
				t.Errorf("%s tp %d e %d: GlobalTokenBytes() = %d, want %d", name, c.tp, c.elem, got, c.global)
			}
			if got := g.BlockBytes(); got != c.block {
				t.Errorf("%s tp %d e %d: BlockBytes() = %d, want %d", name, c.tp, c.elem, got, c.block)
			}
			if got := g.Blocks(8192) - 12*512; got != c.chunkedCap-36 { // at 8192 tokens a windowed layer holds 512
				t.Errorf("%s: windowed blocks at 8192 tokens = %d, want %d", name, got, c.chunkedCap-36)
			}
			if got := g.Blocks(131072); got != c.blocks128k {
				t.Errorf("%s tp %d: Blocks(131072) = %d, want %d", name, c.tp, got, c.blocks128k)
			}
			if got := g.Blocks(10485760); got != c.b10m {
				t.Errorf("%s tp %d: Blocks(10485760) = %d, want %d", name, c.tp, got, c.b10m)
			}
			// With steps of 512 tokens (the default token budget) a chunked layer may hold
			// ceil((8192+511)/16)+1 = 545 blocks during a step: 128k tokens, 12·8192 + 36·545 = 117924.
			g.Piece = 512
			if got := g.Blocks(131072); got != 117924 {
				t.Errorf("%s tp %d: Blocks(131072) with pieces of 512 = %d, want 117924", name, c.tp, got)
			}
		}
	}
}

func TestBlocksHybridPolicy(t *testing.T) {
	// 2 windowed layers (window 32) and 1 global, blocks of 16: a windowed layer holds at most 3 blocks.
	g := memplan.Geometry{BlockSize: 16, Layers: []memplan.Layer{{TokenBytes: 8, Window: 32}, {TokenBytes: 8, Window: 32}, {TokenBytes: 8}}}
	for _, c := range []struct{ tokens, want int }{
		{0, 0}, {1, 3}, {16, 3}, {17, 6}, {32, 6}, {33, 9}, {48, 9}, {49, 4 + 6}, {160, 10 + 6},
	} {
		if got := g.Blocks(c.tokens); got != c.want {
			t.Errorf("Blocks(%d) = %d, want %d", c.tokens, got, c.want)
		}
	}
	for _, c := range []struct{ blocks, want int }{
		{2, 0}, {3, 16}, {8, 32}, {9, 48}, {10, 64}, {16, 160}, {17, 176},
	} {
		if got := g.Longest(c.blocks); got != c.want {
			t.Errorf("Longest(%d) = %d, want %d", c.blocks, got, c.want)
		}
		if got := g.Longest(c.blocks); got > 0 && g.Blocks(got) > c.blocks || g.Blocks(got+1) <= c.blocks {
			t.Errorf("Longest(%d) = %d: Blocks(%d) = %d, Blocks(%d) = %d", c.blocks, got, got, g.Blocks(got), got+1, g.Blocks(got+1))
		}
	}
	// Steps that append up to 20 tokens of a sequence: a windowed layer may hold a window and a piece,
	// ceil((32+20-1)/16)+1 = 5 blocks, once the sequence is that long.
	g.Piece = 20
	for _, c := range []struct{ tokens, want int }{
		{1, 3}, {16, 3}, {33, 9}, {48, 9}, {64, 12}, {80, 15}, {160, 10 + 10}, {10, 3},
	} {
		if got := g.Blocks(c.tokens); got != c.want {
			t.Errorf("Piece 20: Blocks(%d) = %d, want %d", c.tokens, got, c.want)
		}
	}
	windowed := memplan.Geometry{BlockSize: 16, Layers: []memplan.Layer{{TokenBytes: 8, Window: 32}}}
	if got := windowed.Longest(3); got != math.MaxInt {
		t.Errorf("only windowed layers: Longest(3) = %d, want unbounded", got)
	}
}

func TestNewPlan(t *testing.T) {
	cfg := loadConfig(t, "scout")
	g, err := memplan.GeometryOf(cfg, 1, 2, 16)
	if err != nil {
		t.Fatal(err)
	}
	const gib = int64(1) << 30
	// An 80 GiB card holding 58 GiB of weights: 0.9·80 − 58 − 1 = 13 GiB of KV.
	p, err := memplan.New(memplan.Input{Geometry: g, Weights: 58 * gib, Activations: gib, Total: 80 * gib, Free: 22 * gib, MaxContext: 131072})
	if err != nil {
		t.Fatal(err)
	}
	wantBlocks := int((72*gib - 58*gib - gib) / 65536)
	if p.Blocks != wantBlocks || p.KV != int64(wantBlocks)*65536 {
		t.Errorf("Blocks = %d (KV %d), want %d", p.Blocks, p.KV, wantBlocks)
	}
	if p.Tokens != wantBlocks*16/48 {
		t.Errorf("Tokens = %d, want %d", p.Tokens, wantBlocks*16/48)
	}
	if g.Blocks(p.Longest) > p.Blocks || g.Blocks(p.Longest+16) <= p.Blocks {
		t.Errorf("Longest = %d does not fill %d blocks", p.Longest, p.Blocks)
	}
	if want := float64(p.Blocks) / 116772; math.Abs(p.Concurrency-want) > 1e-9 {
		t.Errorf("Concurrency = %g, want %g", p.Concurrency, want)
	}
	t.Logf("Scout, int4-sized weights on an 80 GiB card:\n%s", p.Table())

	if _, err := memplan.New(memplan.Input{Geometry: g, Weights: 73 * gib, Total: 80 * gib, Free: 7 * gib}); !errors.Is(err, memplan.ErrNoMemory) {
		t.Errorf("New with 73 of 80 GiB in use: %v, want ErrNoMemory", err)
	}
	// Free and total swapped (as a caller once passed backend.MemoryReporter's (free, total)): refused, not
	// a plan with negative memory in use and more KV than the card holds.
	if _, err := memplan.New(memplan.Input{Geometry: g, Weights: 55 * gib, Total: 20 * gib, Free: 79 * gib}); err == nil || errors.Is(err, memplan.ErrNoMemory) {
		t.Errorf("New with 79 GiB free of 20 GiB: %v, want an error naming the numbers", err)
	}
	p, err = memplan.New(memplan.Input{Geometry: g, KVTokens: 1000, Total: 80 * gib, Free: 80 * gib})
	if err != nil || p.Blocks != 63*48 || !p.FromTokens {
		t.Errorf("New(KVTokens 1000) = %d blocks, %v; want %d", p.Blocks, err, 63*48)
	}
}

// TestWeightBytes sizes full Scout and Maverick from their declared tensors, in bf16, fp8 and int4.
func TestWeightBytes(t *testing.T) {
	for _, c := range []struct {
		name string
		tp   int
	}{{"scout", 1}, {"scout", 8}, {"maverick", 8}} {
		cfg := loadConfig(t, c.name)
		src, err := dummy.NewSource(cfg, 1)
		if err != nil {
			t.Fatal(err)
		}
		plan, err := shard.PlanOf(cfg, "tp", nil)
		if err != nil {
			t.Fatal(err)
		}
		man, err := shard.NewManifest(cfg, src, plan, c.tp, 0)
		if err != nil {
			t.Fatal(err)
		}
		bf16 := memplan.WeightBytes(cfg, man, quant.Format{})
		if bf16 != man.Bytes {
			t.Errorf("%s tp %d: bf16 WeightBytes = %d, want the manifest's %d", c.name, c.tp, bf16, man.Bytes)
		}
		fp8 := memplan.WeightBytes(cfg, man, quant.Format{Kind: quant.FP8})
		int4 := memplan.WeightBytes(cfg, man, quant.Format{Kind: quant.Int4, GroupSize: 128})
		if !(int4 < fp8 && fp8 < bf16) {
			t.Errorf("%s tp %d: int4 %d, fp8 %d, bf16 %d: want increasing", c.name, c.tp, int4, fp8, bf16)
		}
		t.Logf("%s TP %d rank 0: bf16 %s, fp8 %s, int4 %s (checkpoint %s)", c.name, c.tp,
			memplan.GiB(bf16), memplan.GiB(fp8), memplan.GiB(int4), memplan.GiB(src.Bytes()))
	}
}
