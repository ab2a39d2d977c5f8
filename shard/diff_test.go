package shard

import (
	"testing"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

func TestDiff(t *testing.T) {
	whole := TensorShard{Name: "norm", Dim: -1, Bytes: 8, Layout: model.Replicated}
	q0 := TensorShard{Name: "q", Dim: 0, Ranges: []safetensors.Range{{Start: 0, End: 2}}, Bytes: 16, Layout: model.Layout{Dim: 0, Part: 0, Parts: 2}}
	q1 := TensorShard{Name: "q", Dim: 0, Ranges: []safetensors.Range{{Start: 2, End: 4}}, Bytes: 16, Layout: model.Layout{Dim: 0, Part: 1, Parts: 2}}
	e0 := TensorShard{Name: "experts", Dim: 2, Packed: true, Ranges: []safetensors.Range{{Start: 0, End: 1}, {Start: 2, End: 3}}, Bytes: 32, Layout: model.Layout{Dim: 2, Part: 0, Parts: 2}}
	e0ep := TensorShard{Name: "experts", Dim: 0, Ranges: []safetensors.Range{{Start: 0, End: 2}}, Bytes: 32, Layout: model.Layout{Dim: 0, Part: 0, Parts: 2}}
	man := func(ts ...TensorShard) *Manifest { return &Manifest{Tensors: ts} }
	for _, tc := range []struct {
		name     string
		from, to *Manifest
		want     Moves
	}{
		{"from nothing", nil, man(whole, q0), Moves{Loaded: 2, LoadedBytes: 24}},
		{"to nothing", man(whole, q0), nil, Moves{Dropped: 2, DroppedBytes: 24}},
		{"same", man(whole, q0, e0), man(whole, q0, e0), Moves{Kept: 3, KeptBytes: 56}},
		{"tp to ep: attention stays", man(whole, q0, e0), man(whole, q0, e0ep), Moves{Loaded: 1, LoadedBytes: 32, Kept: 2, KeptBytes: 24, Dropped: 1, DroppedBytes: 32}},
		{"another rank: only the whole tensor stays", man(whole, q0), man(whole, q1), Moves{Loaded: 1, LoadedBytes: 16, Kept: 1, KeptBytes: 8, Dropped: 1, DroppedBytes: 16}},
	} {
		if got := Diff(tc.from, tc.to); got != tc.want {
			t.Errorf("%s: Diff = %+v, want %+v", tc.name, got, tc.want)
		}
	}
	if q0.Key() == q1.Key() || e0.Key() == e0ep.Key() {
		t.Errorf("Key: q0 %q, q1 %q, e0 %q, e0ep %q: want the slices told apart", q0.Key(), q1.Key(), e0.Key(), e0ep.Key())
	}
}
