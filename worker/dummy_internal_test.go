package worker

import (
	"context"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// fillerCPU is the cpu backend with a deviceFiller's methods, recording what was asked of them.
type fillerCPU struct {
	*cpu.Backend
	shapes map[uint64][]int
	quant  int
}

func (f *fillerCPU) RandomBF16(shape []int, mean, std float32, seed uint64) (backend.Tensor, error) {
	n := 1
	for _, d := range shape {
		n *= d
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	data := make([]byte, 2*n)
	for i := range n {
		v := safetensors.Float32ToBF16(mean + std*float32(rng.NormFloat64()))
		data[2*i], data[2*i+1] = byte(v), byte(v>>8)
	}
	f.shapes[seed] = shape
	return f.Load(safetensors.BF16, shape, data)
}

func (f *fillerCPU) RandomQuantized(fm quant.Format, shape []int, inputDim int, mean, std float32, seed uint64) (backend.Tensor, error) {
	f.quant++
	n := 1
	for _, d := range shape {
		n *= d
	}
	vals := make([]float32, n)
	for i := range vals {
		vals[i] = mean + std*float32(i%7-3)
	}
	w, err := quant.Quantize(fm, shape, inputDim, vals)
	if err != nil {
		return nil, err
	}
	return backend.LoadQuantized(f.Backend, w)
}

// TestDeviceDummy: on a backend that generates weights itself, --load-format dummy asks it for every
// tensor of the rank's manifest at the rank's local shape, quantised ones in the plan's format, and the
// model built over them runs to finite logits.
func TestDeviceDummy(t *testing.T) {
	cfg, err := model.LoadConfig("../testdata/fixtures/moe-top1")
	if err != nil {
		t.Fatal(err)
	}
	src, err := dummy.NewSource(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := shard.PlanOf(cfg, "tp", nil)
	if err != nil {
		t.Fatal(err)
	}
	man, err := shard.NewManifest(cfg, src, plan, 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	f := &fillerCPU{Backend: cpu.New(cpu.Config{}), shapes: map[uint64][]int{}}
	d := newDeviceDummy(nil, f, cfg, &man, quant.Format{Kind: quant.Int4, GroupSize: 16})
	ctx := context.Background()
	quantizable := 0
	for _, s := range model.Tensors(cfg) {
		ts, _ := man.Lookup(man.Prefix + s.Name)
		tensor, lay, err := d.Load(ctx, s.Name)
		if err != nil {
			t.Fatalf("Load(%s): %v", s.Name, err)
		}
		if !reflect.DeepEqual(lay, ts.Layout) {
			t.Errorf("%s: layout %+v, want the manifest's %+v", s.Name, lay, ts.Layout)
		}
		if s.Quantizable {
			quantizable++
			continue
		}
		if got := tensor.Shape(); !slices.Equal(got, ts.LocalShape) {
			t.Errorf("%s: shape %v, want rank 1's %v", s.Name, got, ts.LocalShape)
		}
	}
	if f.quant != quantizable || quantizable == 0 {
		t.Errorf("RandomQuantized called %d times, want once per quantisable tensor (%d)", f.quant, quantizable)
	}

	// TP 1: the model over the generated weights runs.
	man1, err := shard.NewManifest(cfg, src, plan, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	m, err := run.Open(ctx, f, cfg, newDeviceDummy(nil, f, cfg, &man1, quant.Format{}), run.Parallel{Comm: comm.Solo()})
	if err != nil {
		t.Fatal(err)
	}
	logits, err := m.Score(ctx, []int{1, 2, 3, 4})
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range logits {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			t.Fatalf("logit %d = %v, want finite", i, v)
		}
	}
}
