package vision

import (
	"context"
	"fmt"
	"slices"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// weight is one loaded tensor of the tree, on the backend.
type weight = model.Weight[backend.Tensor]

// The vision tower's and projector's tensors, declared once (spec §3.1). Names are the checkpoint's keys,
// without a prefix: they sit beside language_model.* in Llama4ForConditionalGeneration checkpoints.
// nn.Linear weights are [out, in]. None carries a split tag: every rank holds the whole tower for now.
type tree struct {
	Tower     towerWeights `tensor:"vision_model"`
	Projector weight       `tensor:"multi_modal_projector.linear_1.weight" shape:"text_hidden,vision_output"`
}

type towerWeights struct {
	Patch   weight         `tensor:"patch_embedding.linear.weight" shape:"hidden,patch_in"`
	Class   weight         `tensor:"class_embedding" shape:"hidden"`
	Pos     weight         `tensor:"positional_embedding_vlm" shape:"positions,hidden"`
	PreW    weight         `tensor:"layernorm_pre.weight" shape:"hidden"`
	PreB    weight         `tensor:"layernorm_pre.bias" shape:"hidden"`
	PostW   weight         `tensor:"layernorm_post.weight" shape:"hidden"`
	PostB   weight         `tensor:"layernorm_post.bias" shape:"hidden"`
	Layers  []layerWeights `tensor:"model.layers" len:"layers"`
	Adapter struct {
		FC1 weight `tensor:"fc1.weight" shape:"projector_in,intermediate"`
		FC2 weight `tensor:"fc2.weight" shape:"projector_out,projector_out"`
	} `tensor:"vision_adapter.mlp"`
}

type layerWeights struct {
	LN1W weight `tensor:"input_layernorm.weight" shape:"hidden"`
	LN1B weight `tensor:"input_layernorm.bias" shape:"hidden"`
	LN2W weight `tensor:"post_attention_layernorm.weight" shape:"hidden"`
	LN2B weight `tensor:"post_attention_layernorm.bias" shape:"hidden"`
	QW   weight `tensor:"self_attn.q_proj.weight" shape:"hidden,hidden"`
	QB   weight `tensor:"self_attn.q_proj.bias" shape:"hidden"`
	KW   weight `tensor:"self_attn.k_proj.weight" shape:"hidden,hidden"`
	KB   weight `tensor:"self_attn.k_proj.bias" shape:"hidden"`
	VW   weight `tensor:"self_attn.v_proj.weight" shape:"hidden,hidden"`
	VB   weight `tensor:"self_attn.v_proj.bias" shape:"hidden"`
	OW   weight `tensor:"self_attn.o_proj.weight" shape:"hidden,hidden"`
	OB   weight `tensor:"self_attn.o_proj.bias" shape:"hidden"`
	FC1W weight `tensor:"mlp.fc1.weight" shape:"intermediate,hidden"`
	FC1B weight `tensor:"mlp.fc1.bias" shape:"intermediate"`
	FC2W weight `tensor:"mlp.fc2.weight" shape:"hidden,intermediate"`
	FC2B weight `tensor:"mlp.fc2.bias" shape:"hidden"`
}

// Tree is the vision tower's and projector's tensor declaration at this configuration's sizes.
func (c Config) Tree() model.Tree {
	one := func(n int, what string) model.Unit { return model.Unit{Count: n, Size: 1, What: what} }
	return model.Tree{
		Root: &tree{},
		Dims: map[string]model.Unit{
			"layers":        one(c.NumLayers, "layers (vision_config.num_hidden_layers)"),
			"hidden":        one(c.HiddenSize, "hidden columns (vision_config.hidden_size)"),
			"intermediate":  one(c.IntermediateSize, "intermediate columns (vision_config.intermediate_size)"),
			"patch_in":      one(c.NumChannels*c.PatchSize*c.PatchSize, "patch values (num_channels·patch_size²)"),
			"positions":     one(c.Grid()*c.Grid()+1, "positions (patches + CLS)"),
			"projector_in":  one(c.ProjectorInputDim, "adapter columns (projector_input_dim)"),
			"projector_out": one(c.ProjectorOutputDim, "adapter columns (projector_output_dim)"),
			"vision_output": one(c.VisionOutputDim, "vision output columns (vision_output_dim)"),
			"text_hidden":   one(c.TextHiddenSize, "text hidden columns (text_config.hidden_size)"),
		},
	}
}

// checkpointWeights loads whole tensors of a checkpoint into a backend in their checkpoint dtype,
// checking each against its declared shape.
type checkpointWeights struct {
	ckpt   *safetensors.Checkpoint
	ops    backend.Ops
	shapes map[string][]int
}

var _ model.Weights[backend.Tensor] = (*checkpointWeights)(nil)

func (w *checkpointWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	if !w.ckpt.Has(name) {
		return nil, model.Replicated, fmt.Errorf("%w: tensor %s is missing", ErrNoVision, name)
	}
	info, err := w.ckpt.Info(name)
	if err != nil {
		return nil, model.Replicated, err
	}
	if want := w.shapes[name]; !slices.Equal(info.Shape, want) {
		return nil, model.Replicated, fmt.Errorf("%w: %s has shape %v, the config says %v", ErrConfig, name, info.Shape, want)
	}
	data, err := w.ckpt.ReadAll(name)
	if err != nil {
		return nil, model.Replicated, err
	}
	t, err := w.ops.Load(info.DType, info.Shape, data)
	if err != nil {
		return nil, model.Replicated, fmt.Errorf("load %s: %w", name, err)
	}
	return t, model.Replicated, nil
}
