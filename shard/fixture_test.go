package shard

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/safetensors"
)

// fixtures are the tiny HF checkpoints of testdata: 4 q heads of 16, hidden 64, 4 experts, intermediate
// 64 (dense 128), vocab 512. moe-top1 has 2 kv heads, moe-top2 1, dense-moe-mm 2 and is multimodal (the
// "language_model." prefix, vision tensors, five shards).
var fixtures = []string{"moe-top1", "dense-moe-mm", "moe-top2"}

func fixtureDir(name string) string { return filepath.Join("..", "testdata", "fixtures", name) }

func openFixture(t *testing.T, name string) (llama4.Config, *safetensors.Checkpoint) {
	t.Helper()
	cfg, err := llama4.LoadConfig(fixtureDir(name))
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(fixtureDir(name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ckpt.Close() })
	return cfg, ckpt
}

// fakeOps is a backend that only loads: its tensors keep the bytes they were given.
type fakeOps struct {
	backend.Ops // nil: any other op panics
}

type fakeTensor struct {
	dt    safetensors.DType
	shape []int
	data  []byte
}

func (t *fakeTensor) Shape() []int { return t.shape }

func (fakeOps) Name() string { return "fake" }

func (fakeOps) Load(dt safetensors.DType, shape []int, data []byte) (backend.Tensor, error) {
	n := dt.Size()
	for _, d := range shape {
		n *= d
	}
	if n != len(data) {
		return nil, fmt.Errorf("fake: %d bytes for %s%v, want %d: %w", len(data), dt, shape, n, backend.ErrShape)
	}
	return &fakeTensor{dt: dt, shape: slices.Clone(shape), data: bytes.Clone(data)}, nil
}

// assembly rebuilds a whole tensor from the ranks' parts and counts how many ranks wrote each byte.
type assembly struct {
	info  safetensors.TensorInfo
	data  []byte
	count []int
}

func newAssembly(info safetensors.TensorInfo) *assembly {
	n := info.NumBytes()
	return &assembly{info: info, data: make([]byte, n), count: make([]int, n)}
}

// place puts one rank's part (its ranges of dim, concatenated) where it belongs. A byte written twice must
// have the same value both times.
func (a *assembly) place(dim int, ranges []safetensors.Range, part []byte) error {
	shape := a.info.Shape
	inner := a.info.DType.Size()
	for _, d := range shape[dim+1:] {
		inner *= d
	}
	outer := 1
	for _, d := range shape[:dim] {
		outer *= d
	}
	pos := 0
	for o := range outer {
		for _, r := range ranges {
			off := (o*shape[dim] + r.Start) * inner
			for i := range (r.End - r.Start) * inner {
				if pos+i >= len(part) {
					return fmt.Errorf("part of %d bytes is too short", len(part))
				}
				if a.count[off+i] > 0 && a.data[off+i] != part[pos+i] {
					return fmt.Errorf("byte %d written twice with different values", off+i)
				}
				a.data[off+i] = part[pos+i]
				a.count[off+i]++
			}
			pos += (r.End - r.Start) * inner
		}
	}
	if pos != len(part) {
		return fmt.Errorf("part has %d bytes, ranges cover %d", len(part), pos)
	}
	return nil
}

// llama4Family is a Llama 4 configuration for its built-in plans, which do not depend on the sizes.
var llama4Family = llama4.Config{}

// NewRankWeights is run.RankWeights over this package's RankReader: what the worker loads a rank with.
func NewRankWeights(r Reader, ops backend.Ops, m Manifest) *run.RankWeights {
	return run.NewRankWeights(NewRankReader(r, m), ops)
}

// TestWithOrder: under the ep plan a permutation of the experts gives each rank the experts of its slots
// and every rank the router's rows in slot order; the tp plan, which splits experts on another dimension,
// cannot take one, nor can an order that is not a permutation.
func TestWithOrder(t *testing.T) {
	cfg, ckpt := openFixture(t, "moe-top1")
	ep, _ := NamedPlan(cfg, "ep")
	m, err := NewManifest(cfg, ckpt, ep.WithOrder("experts", map[int][]int{0: {3, 1, 2, 0}}), 2, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		dim    int
		ranges []safetensors.Range
		layout model.Layout
	}{
		{"model.layers.0.feed_forward.experts.gate_up_proj", 0, []safetensors.Range{{Start: 3, End: 4}, {Start: 1, End: 2}}, model.Layout{Dim: 0, Part: 0, Parts: 2, Units: []int{3, 1, 2, 0}}},
		{"model.layers.0.feed_forward.router.weight", 0, []safetensors.Range{{Start: 3, End: 4}, {Start: 1, End: 3}, {Start: 0, End: 1}}, model.Layout{Dim: -1, Parts: 1, Units: []int{3, 1, 2, 0}}},
		{"model.layers.1.feed_forward.experts.gate_up_proj", 0, []safetensors.Range{{Start: 0, End: 2}}, model.Layout{Dim: 0, Part: 0, Parts: 2}},
	} {
		s, ok := m.Lookup(tc.name)
		if !ok || s.Dim != tc.dim || !slices.Equal(s.Ranges, tc.ranges) || !reflect.DeepEqual(s.Layout, tc.layout) {
			t.Errorf("%s: dim %d, ranges %v, layout %+v; want %d, %v, %+v", tc.name, s.Dim, s.Ranges, s.Layout, tc.dim, tc.ranges, tc.layout)
		}
	}
	tp, _ := NamedPlan(cfg, "tp")
	for _, bad := range []struct {
		plan  Plan
		order map[int][]int
	}{
		{tp, map[int][]int{0: {3, 1, 2, 0}}},
		{ep, map[int][]int{0: {0, 0, 1, 2}}},
		{ep, map[int][]int{0: {0, 1}}},
		{ep, map[int][]int{99: {0, 1, 2, 3}}},
		{ep, map[int][]int{0: {0, 1, 2, 3, 0}}},    // 5 slots over 2 ranks
		{ep, map[int][]int{0: {0, 1, 2, 3, 4, 0}}}, // no expert 4
		{ep, map[int][]int{0: {0, 1, 2, 0, 1, 2}}}, // expert 3 nowhere
	} {
		if _, err := NewManifest(cfg, ckpt, bad.plan.WithOrder("experts", bad.order), 2, 0); !errors.Is(err, ErrPlan) {
			t.Errorf("NewManifest with order %v = %v, want ErrPlan", bad.order, err)
		}
	}
}

// TestWithOrderReplicas: an order with more slots than experts gives each rank the experts of its slots,
// a replicated expert on every rank that has a slot of it, with the bytes of its slots; the router stays
// in the checkpoint's order; Diff reads on each rank only the experts it lacks.
func TestWithOrderReplicas(t *testing.T) {
	cfg, ckpt := openFixture(t, "moe-top1")
	ep, _ := NamedPlan(cfg, "ep")
	order := []int{3, 0, 1, 0, 2, 3} // experts 0 and 3 on both ranks
	const gu = "model.layers.0.feed_forward.experts.gate_up_proj"
	info, err := ckpt.Info(gu)
	if err != nil {
		t.Fatal(err)
	}
	perExpert := info.NumBytes() / int64(info.Shape[0])
	for rank, want := range [][]safetensors.Range{{{Start: 3, End: 4}, {Start: 0, End: 2}}, {{Start: 0, End: 1}, {Start: 2, End: 4}}} {
		m, err := NewManifest(cfg, ckpt, ep.WithOrder("experts", map[int][]int{0: order}), 2, rank)
		if err != nil {
			t.Fatal(err)
		}
		s, _ := m.Lookup(gu)
		wantLayout := model.Layout{Dim: 0, Part: rank, Parts: 2, Units: order}
		if !slices.Equal(s.Ranges, want) || s.LocalShape[0] != 3 || s.Bytes != 3*perExpert || !reflect.DeepEqual(s.Layout, wantLayout) {
			t.Errorf("rank %d %s: ranges %v, local shape %v, %d bytes, layout %+v; want %v, 3 experts, %d bytes, %+v",
				rank, gu, s.Ranges, s.LocalShape, s.Bytes, s.Layout, want, 3*perExpert, wantLayout)
		}
		r, _ := m.Lookup("model.layers.0.feed_forward.router.weight")
		if r.Ranges != nil || !reflect.DeepEqual(r.Layout, model.Replicated) {
			t.Errorf("rank %d router: ranges %v, layout %+v; want the whole tensor in the checkpoint's order", rank, r.Ranges, r.Layout)
		}
		// From the checkpoint's order (experts 0, 1 on rank 0; 2, 3 on rank 1) a rank reads only the
		// experts it lacks: for the ep plan's two expert tensors, their entries.
		plain, err := NewManifest(cfg, ckpt, ep, 2, rank)
		if err != nil {
			t.Fatal(err)
		}
		mv := Diff(&plain, &m)
		var wantBytes int64
		for _, name := range []string{gu, "model.layers.0.feed_forward.experts.down_proj"} {
			e, _ := m.Lookup(name)
			wantBytes += e.Bytes
		}
		if mv.Loaded != 2 || mv.LoadedBytes != wantBytes || mv.Dropped != 2 {
			t.Errorf("rank %d: Diff(checkpoint order, replicas) = %+v; want the 2 expert tensors loaded (%d bytes) and dropped", rank, mv, wantBytes)
		}
	}
}
