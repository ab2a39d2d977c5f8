package dummy_test

import (
	"errors"
	"testing"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	_ "github.com/tpfleet/tpfleet/model/llama4" // registers the family
	"github.com/tpfleet/tpfleet/safetensors"
)

func source(t testing.TB) *dummy.Source {
	t.Helper()
	cfg, err := model.LoadConfig("../../testdata/configs/scout")
	if err != nil {
		t.Fatal(err)
	}
	s, err := dummy.NewSource(cfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSourceErrors: unknown names wrap safetensors.ErrNotFound; ranges and dims outside the tensor are
// errors naming them.
func TestSourceErrors(t *testing.T) {
	s := source(t)
	if _, err := s.ReadAll("no.such.weight"); !errors.Is(err, safetensors.ErrNotFound) {
		t.Errorf("ReadAll(unknown) = %v, want ErrNotFound", err)
	}
	name := "language_model.model.layers.0.self_attn.q_proj.weight"
	info, err := s.Info(name)
	if err != nil || info.DType != safetensors.BF16 || len(info.Shape) != 2 || info.Shape[0] != 5120 {
		t.Fatalf("Info(%s) = %+v, %v", name, info, err)
	}
	for _, c := range []struct {
		dim int
		r   safetensors.Range
	}{{2, safetensors.Range{Start: 0, End: 1}}, {0, safetensors.Range{Start: 5000, End: 5121}}, {1, safetensors.Range{Start: 3, End: 2}}} {
		if _, _, err := s.ReadSlice(name, c.dim, c.r); err == nil {
			t.Errorf("ReadSlice(dim %d, %v) succeeded, want an error", c.dim, c.r)
		}
	}
	data, shape, err := s.ReadSlice(name, 0, safetensors.Range{Start: 128, End: 256})
	if err != nil || len(shape) != 2 || shape[0] != 128 || shape[1] != 5120 || len(data) != 2*128*5120 {
		t.Fatalf("ReadSlice rows 128..256 = %d bytes %v, %v", len(data), shape, err)
	}
	vals := make([]float32, 128*5120)
	if err := safetensors.ToFloat32(safetensors.BF16, data, vals); err != nil {
		t.Fatal(err)
	}
	var sum, sq float64
	for _, v := range vals {
		if v < -dummy.Scale || v > dummy.Scale {
			t.Fatalf("value %v outside ±%v", v, dummy.Scale)
		}
		sum += float64(v)
		sq += float64(v) * float64(v)
	}
	n := float64(len(vals))
	if mean, std := sum/n, sq/n; mean > 1e-3 || mean < -1e-3 || std < 0.0003 || std > 0.0005 {
		t.Errorf("mean %g, variance %g: want about 0 and 0.0004 (std 0.02)", mean, std)
	}
}

// BenchmarkGenerate measures the generator on one expert stack's slice of Scout (16 experts of
// 5120×16384 bf16 at TP 8: 335 MB), in bytes per second.
func BenchmarkGenerate(b *testing.B) {
	s := source(b)
	name := "language_model.model.layers.0.feed_forward.experts.gate_up_proj"
	info, err := s.Info(name)
	if err != nil {
		b.Fatal(err)
	}
	cols := info.Shape[2] / 8
	b.SetBytes(2 * int64(info.Shape[0]*info.Shape[1]*cols))
	for b.Loop() {
		if _, _, err := s.ReadSlice(name, 2, safetensors.Range{Start: 0, End: cols}); err != nil {
			b.Fatal(err)
		}
	}
}
