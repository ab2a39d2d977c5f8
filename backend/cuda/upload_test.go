package cuda_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

func sameBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	diff := 0
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			if diff == 0 {
				t.Errorf("%s: [%d] = %g, want %g", what, i, got[i], want[i])
			}
			diff++
		}
	}
	if len(got) != len(want) || diff > 0 {
		t.Errorf("%s: %d of %d values differ (lengths %d, %d)", what, diff, len(want), len(got), len(want))
	}
	row("Staging", what, fmt.Sprintf("%d/%d differ", diff, len(want)), "")
}

// TestStagedCopy fills tensors through the staging buffers in odd-sized chunks from odd offsets of the
// buffers (as O_DIRECT reads leave them) and compares them bit for bit with Load's.
func TestStagedCopy(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(5, 6))
	st, err := g.NewStaging(3, 70_000)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, tc := range []struct {
		dt    safetensors.DType
		shape []int
	}{{safetensors.BF16, []int{300, 700}}, {safetensors.F32, []int{123, 45}}, {safetensors.BF16, []int{3, 40, 64}}} {
		n := tc.dt.Size()
		for _, d := range tc.shape {
			n *= d
		}
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(r.Uint32())
		}
		if tc.dt == safetensors.BF16 { // no NaNs: the comparison is by value
			for i := 1; i < n; i += 2 {
				data[i] &= 0x7e
			}
		} else {
			for i := 3; i < n; i += 4 {
				data[i] &= 0x7e
			}
		}
		want, err := g.Load(tc.dt, tc.shape, data)
		if err != nil {
			t.Fatal(err)
		}
		got, err := st.Alloc(tc.dt, tc.shape)
		if err != nil {
			t.Fatal(err)
		}
		const chunk, skew = 50_001, 4093
		for i, off := 0, 0; off < n; i, off = i+1, off+chunk {
			b := i % 3
			if err := st.Wait(b); err != nil {
				t.Fatal(err)
			}
			m := min(chunk, n-off)
			copy(st.Buffer(b)[skew:], data[off:off+m])
			if err := st.Copy(got, int64(off), b, skew, int64(m)); err != nil {
				t.Fatal(err)
			}
		}
		if err := st.Finish(); err != nil {
			t.Fatal(err)
		}
		gv, err := g.Float32(got)
		if err != nil {
			t.Fatal(err)
		}
		wv, err := g.Float32(want)
		if err != nil {
			t.Fatal(err)
		}
		sameBits(t, fmt.Sprintf("%s%v", tc.dt, tc.shape), gv, wv)
	}
	if err := st.Copy(nil, 0, 0, 0, 1); err == nil {
		t.Error("Copy to a nil tensor succeeded")
	}
}

// TestQuantizeOnDevice quantises loaded bf16 weights on the device and compares a product with the
// weight quantised on the host (quant.Quantize) and loaded: the same codes and scales give the same
// outputs bit for bit.
func TestQuantizeOnDevice(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	r := rand.New(rand.NewPCG(7, 8))
	for _, f := range []quant.Format{{Kind: quant.FP8}, {Kind: quant.FP8, DynamicActivations: true}, {Kind: quant.Int4, GroupSize: 128}, {Kind: quant.Int4, GroupSize: 48}} {
		shape := []int{160, 400}
		vals := randVals(r, 160*400, 0.05)
		bf := bf16Data(vals)
		for i := range vals { // the values the device holds
			vals[i] = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(vals[i]))
		}
		src, err := g.Load(safetensors.BF16, shape, bf)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := g.Quantize(src, f, 1)
		if err != nil {
			t.Fatal(err)
		}
		qf := f
		qf.RoundBF16 = false
		w, err := quant.Quantize(qf, shape, 1, vals)
		if err != nil {
			t.Fatal(err)
		}
		w.Format = f
		host, err := g.LoadQuantized(w)
		if err != nil {
			t.Fatal(err)
		}
		x, _ := g.FromFloat32([]int{3, 400}, randVals(r, 1200, 1))
		a, err := g.Linear(x, dev)
		if err != nil {
			t.Fatal(err)
		}
		b, err := g.Linear(x, host)
		if err != nil {
			t.Fatal(err)
		}
		av, _ := g.Float32(a)
		bv, _ := g.Float32(b)
		sameBits(t, "quantize "+f.String(), av, bv)
	}
}

// TestPipelineOnGPU loads a fixture through the load pipeline (staged copies, several readers, small
// chunks; bf16 and int4 quantised after the copy) and through plain Loads, and compares the scores.
func TestPipelineOnGPU(t *testing.T) {
	dir := filepath.Join(fixturesDir(t), "dense-moe-mm")
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ckpt.Close()
	view, err := shard.NewView(cfg, ckpt)
	if err != nil {
		t.Fatal(err)
	}
	man, err := shard.NewManifest(cfg, view, shard.DefaultPlan(cfg), 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range model.Tensors(cfg) {
		names = append(names, s.Name)
	}
	ids := []int{1, 5, 9, 77, 300, 2, 41}
	for _, format := range []string{"", "int4"} {
		f, err := quant.ParseFormat(format, 32)
		if err != nil {
			t.Fatal(err)
		}
		score := func(prefetch bool) []float32 {
			g := newBackend(t, cuda.BF16)
			rw := run.NewRankWeights(shard.NewRankReader(view, man), g).WithFormat(cfg, f)
			if prefetch {
				if err := rw.Prefetch(context.Background(), names, run.LoadConfig{Workers: 3, Chunk: 4096}); err != nil {
					t.Fatal(err)
				}
			}
			m, err := run.Open(context.Background(), g, cfg, rw, run.Parallel{})
			if err != nil {
				t.Fatal(err)
			}
			if err := rw.Close(); err != nil {
				t.Fatal(err)
			}
			if prefetch {
				st := rw.LoadStats()
				if st.Staged == 0 || st.Bytes != man.Bytes {
					t.Errorf("LoadStats: %d bytes, %d staged; want %d, staged", st.Bytes, st.Staged, man.Bytes)
				}
			}
			logits, err := m.Score(context.Background(), ids)
			if err != nil {
				t.Fatal(err)
			}
			return logits
		}
		// The same bytes on the device give the same logits; a bound, not bit equality, in case a kernel's
		// summation order is not fixed from run to run.
		got, want := score(true), score(false)
		if e := relL2(got, want); e > 1e-5 || len(got) != len(want) {
			t.Errorf("pipeline %s: logits relative L2 %g to the plain load's, want <= 1e-5", cmpOr(format, "bf16"), e)
		}
		row("Pipeline", cmpOr(format, "bf16"), fmt.Sprintf("rel L2 %.2g", relL2(got, want)), "")
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

var _ backend.Uploader = (*cuda.Backend)(nil)
