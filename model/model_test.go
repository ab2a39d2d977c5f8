package model_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/model"
)

// toy is a two-layer tree: layer 0 dense, layer 1 experts, an optional head.
type toy struct {
	Embed  model.Weight[string] `tensor:"embed.weight" shape:"vocab,hidden" kind:"embedding" split:"0=embedding_rowwise"`
	Head   model.Weight[string] `tensor:"head.weight" shape:"vocab,hidden" if:"untied"`
	Layers []toyLayer           `tensor:"layers" len:"layers"`
}

type toyLayer struct {
	Dense *toyMLP `tensor:"mlp" if:"dense" dims:"inter=wide"`
	Up    *struct {
		GateUp model.Weight[string] `tensor:"gate_up" shape:"experts,hidden,2*wide" kind:"experts" split:"2=packed_rowwise,0=grouped_gemm@ep" group:"." rule:"together"`
	} `tensor:"moe" if:"moe"`
}

type toyMLP struct {
	In  model.Weight[string] `tensor:"in.weight" shape:"inter,hidden" split:"0=colwise" group:"."`
	Out model.Weight[string] `tensor:"out.weight" shape:"hidden,inter" split:"1=rowwise" group:"."`
}

func toyTree(tied bool) model.Tree {
	return model.Tree{
		Root: &toy{},
		Dims: map[string]model.Unit{
			"vocab": {Count: 8, Size: 1, What: "vocabulary rows (vocab_size)"}, "hidden": {Count: 4, Size: 1},
			"wide": {Count: 6, Size: 1}, "experts": {Count: 2, Size: 1}, "layers": {Count: 2, Size: 1},
		},
		Conds: map[string]func(int) bool{
			"untied": func(int) bool { return !tied },
			"dense":  func(i int) bool { return i == 0 },
			"moe":    func(i int) bool { return i == 1 },
		},
	}
}

func TestTreeTensors(t *testing.T) {
	specs, err := toyTree(true).Tensors()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range specs {
		names = append(names, s.Name)
	}
	want := []string{"embed.weight", "layers.0.mlp.in.weight", "layers.0.mlp.out.weight", "layers.1.moe.gate_up"}
	if !slices.Equal(names, want) {
		t.Errorf("Tensors() names = %v, want %v", names, want)
	}
	gu := specs[3]
	if !slices.Equal(gu.Shape, []int{2, 4, 12}) || gu.Kind != model.KindExperts || gu.Group != "layers.1.moe" || gu.GroupRule != "together" {
		t.Errorf("Tensors()[gate_up] = %+v, want shape [2 4 12], experts kind, group layers.1.moe", gu)
	}
	if sp, ok := gu.SplitOn(2); !ok || !sp.Packed || sp.Unit.Count != 6 || sp.Mode != "" {
		t.Errorf("gate_up.SplitOn(2) = %+v, %v, want packed units of 6", sp, ok)
	}
	if sp, ok := gu.SplitOn(0); !ok || sp.Mode != "ep" {
		t.Errorf("gate_up.SplitOn(0) = %+v, %v, want mode ep", sp, ok)
	}
	if got := specs[0].Takes(); got != "whole, or split by vocabulary rows on dim 0 (embedding_rowwise)" {
		t.Errorf("embed.Takes() = %q", got)
	}
	all, err := toyTree(true).Declared()
	if err != nil || len(all) != 1+1+2*3 {
		t.Errorf("Declared() = %d specs, %v; want 8 (every variant of every layer, the optional head)", len(all), err)
	}
}

type nameWeights struct{ loaded []string }

func (w *nameWeights) Load(_ context.Context, name string) (string, model.Layout, error) {
	w.loaded = append(w.loaded, name)
	return "T:" + name, model.Layout{Dim: 0, Part: 1, Parts: 2}, nil
}

func TestLoad(t *testing.T) {
	tree := toyTree(false)
	w := &nameWeights{}
	if err := model.Load(context.Background(), tree, w); err != nil {
		t.Fatal(err)
	}
	root := tree.Root.(*toy)
	if root.Head.T != "T:head.weight" || !root.Head.Present || !root.Head.Layout.Split() {
		t.Errorf("Load: Head = %+v, want loaded and split", root.Head)
	}
	if root.Layers[0].Dense == nil || root.Layers[0].Dense.Out.T != "T:layers.0.mlp.out.weight" || root.Layers[0].Up != nil {
		t.Errorf("Load: layer 0 = %+v, want the dense MLP only", root.Layers[0])
	}
	if root.Layers[1].Up == nil || root.Layers[1].Up.GateUp.T != "T:layers.1.moe.gate_up" || root.Layers[1].Dense != nil {
		t.Errorf("Load: layer 1 = %+v, want the experts only", root.Layers[1])
	}
	if err := model.Load[int](context.Background(), toyTree(false), nil); !errors.Is(err, model.ErrTree) {
		t.Errorf("Load[int] on a string tree = %v, want ErrTree", err)
	}
}

func TestParseConfigUnknown(t *testing.T) {
	_, err := model.ParseConfig([]byte(`{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}`))
	if !errors.Is(err, model.ErrUnknownArchitecture) || !strings.Contains(err.Error(), "GPT2LMHeadModel") {
		t.Errorf("ParseConfig(gpt2) = %v, want ErrUnknownArchitecture naming GPT2LMHeadModel", err)
	}
}
