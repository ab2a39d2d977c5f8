package shard

import (
	"bytes"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
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
