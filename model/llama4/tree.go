package llama4

import (
	"context"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
)

// The text model's tensors, declared once (spec §3.1–3.2: names; §4.1: tensor-parallel roles). Loading
// (model.Load), the tensor list (Config.Tensors: random weights, planning without a checkpoint) and shard's
// split rules and consistency groups all derive from these tags; see model.Tree for the vocabulary. Shapes
// name the dimensions of Config.Tree's Dims. nn.Linear weights are [out, in]; the routed experts are
// stored input-major ([E, H, 2I] with the gate half first, and [E, I, H]); FP8 checkpoints (spec §3.3–3.4)
// store them per expert as nn.Linear weights instead (the experts tags), each quantised weight with its
// per-row "weight_scale" (Info.ScaleSuffix). quant tags mark the weights --quantization may quantise:
// attention, dense MLP, shared and routed experts; the router, embedding, norms and lm_head stay bf16.

// weight is one loaded tensor and how it was cut for this rank.
type weight = run.Weight

// textWeights is Llama4ForCausalLM's tensor tree.
type textWeights struct {
	Embed  weight         `tensor:"model.embed_tokens.weight" shape:"vocab,hidden" kind:"embedding" split:"0=embedding_rowwise"`
	Norm   weight         `tensor:"model.norm.weight" shape:"hidden"`
	LMHead weight         `tensor:"lm_head.weight" shape:"vocab,hidden" split:"0=colwise_gather_output" if:"untied"`
	Layers []layerWeights `tensor:"model.layers" len:"layers"`
}

// layerWeights is a decoder layer (spec §2.5): a dense MLP or a mixture of experts, per config.MoE[i].
type layerWeights struct {
	InputNorm weight      `tensor:"input_layernorm.weight" shape:"hidden"`
	PostNorm  weight      `tensor:"post_attention_layernorm.weight" shape:"hidden"`
	Attn      attnWeights `tensor:"self_attn"`
	MLP       *mlpWeights `tensor:"feed_forward" if:"dense" dims:"inter=intermediate_mlp"`
	MoE       *moeWeights `tensor:"feed_forward" if:"moe"`
}

// attnWeights are spec §2.3's projections: q/k/v split by heads (colwise), o by heads on its input
// (rowwise).
type attnWeights struct {
	Q weight `tensor:"q_proj.weight" shape:"heads,hidden" quant:"1" split:"0=colwise" group:"." rule:"q/k/v must be split colwise (by heads) exactly when o_proj is split rowwise"`
	K weight `tensor:"k_proj.weight" shape:"kv_heads,hidden" quant:"1" split:"0=colwise" group:"."`
	V weight `tensor:"v_proj.weight" shape:"kv_heads,hidden" quant:"1" split:"0=colwise" group:"."`
	O weight `tensor:"o_proj.weight" shape:"hidden,heads" quant:"1" split:"1=rowwise" group:"."`
}

// mlpWeights is SwiGLU (spec §2.4): a dense layer's feed-forward, or the shared expert; inter is its
// width.
type mlpWeights struct {
	Gate weight `tensor:"gate_proj.weight" shape:"inter,hidden" quant:"1" split:"0=colwise" group:"." rule:"gate_proj and up_proj must be split colwise exactly when down_proj is split rowwise"`
	Up   weight `tensor:"up_proj.weight" shape:"inter,hidden" quant:"1" split:"0=colwise" group:"."`
	Down weight `tensor:"down_proj.weight" shape:"hidden,inter" quant:"1" split:"1=rowwise" group:"."`
}

// moeWeights is spec §2.4's Llama4TextMoe: the router (whole on every rank), the routed experts (packed
// gate_up and down split on the intermediate dim, or whole experts per rank), and the shared expert.
type moeWeights struct {
	Router weight     `tensor:"router.weight" shape:"experts,hidden" whole:"to route every token"`
	GateUp weight     `tensor:"experts.gate_up_proj" shape:"experts,hidden,2*expert_halves" kind:"experts" quant:"1" experts:"experts.{e}.gate_proj.weight|experts.{e}.up_proj.weight" split:"2=packed_rowwise,0=grouped_gemm@experts" group:"experts" rule:"split gate_up_proj packed on dim 2 (packed_rowwise) with down_proj on dim 1 (colwise), or both by expert on dim 0 (grouped_gemm), or neither"`
	Down   weight     `tensor:"experts.down_proj" shape:"experts,intermediate,hidden" kind:"experts" quant:"1" experts:"experts.{e}.down_proj.weight" split:"1=colwise,0=grouped_gemm@experts" group:"experts"`
	Shared mlpWeights `tensor:"shared_expert" dims:"inter=intermediate"`
}

// Tree is the text model's tensor declaration at this configuration's sizes (model.Config).
func (c Config) Tree() model.Tree {
	return model.Tree{
		Root: &textWeights{},
		Dims: map[string]model.Unit{
			"layers":           {Count: c.NumLayers, Size: 1, What: "layers (num_hidden_layers)"},
			"hidden":           {Count: c.HiddenSize, Size: 1, What: "hidden columns (hidden_size)"},
			"vocab":            {Count: c.VocabSize, Size: 1, What: "vocabulary rows (vocab_size)"},
			"heads":            {Count: c.NumHeads, Size: c.HeadDim, What: "attention heads (num_attention_heads)", Name: "heads"},
			"kv_heads":         {Count: c.NumKVHeads, Size: c.HeadDim, What: "key/value heads (num_key_value_heads)", Name: "heads", Replicable: true},
			"intermediate":     {Count: c.IntermediateSize, Size: 1, What: "intermediate columns (intermediate_size)"},
			"intermediate_mlp": {Count: c.IntermediateSizeMLP, Size: 1, What: "intermediate columns (intermediate_size_mlp)"},
			"expert_halves":    {Count: c.IntermediateSize, Size: 1, What: "expert intermediate columns per half (intermediate_size)"},
			"experts":          {Count: c.NumExperts, Size: 1, What: "experts (num_local_experts)"},
		},
		Conds: map[string]func(int) bool{
			"untied": func(int) bool { return !c.TieWordEmbeddings },
			"moe":    func(i int) bool { return i >= 0 && i < len(c.MoE) && c.MoE[i] },
			"dense":  func(i int) bool { return i >= 0 && i < len(c.MoE) && !c.MoE[i] },
		},
	}
}

// Info is what the rest of tpfleet needs of the configuration (model.Config).
func (c Config) Info() model.Info {
	return model.Info{
		Family: Family, Prefix: c.Prefix, Foreign: []string{"vision_model.", "multi_modal_projector."},
		VocabSize: c.VocabSize, MaxPositions: c.MaxPositions, BOS: c.BOS, EOS: c.EOS,
		Plans:        map[string][]model.PlanRule{"tp": planRules(tpPlan, vocabPlan), "ep": planRules(epPlan, vocabPlan)},
		Quantization: c.QuantizationConfig, ScaleSuffix: "_scale", // compressed-tensors: "….weight_scale"
	}
}

// planRules concatenates plans written as {pattern, style} pairs.
func planRules(plans ...[][2]string) []model.PlanRule {
	var out []model.PlanRule
	for _, p := range plans {
		for _, r := range p {
			out = append(out, model.PlanRule{Pattern: r[0], Style: r[1]})
		}
	}
	return out
}

// The built-in plans, verbatim from transformers 5.17 (spec §4.1; patterns relative to the text model's
// base model, as HF writes them): base_model_tp_plan, base_model_ep_plan, and the vocabulary rules both
// share (Llama4ForCausalLM's lm_head colwise_gather_output, and a vocab-parallel embedding, which HF
// keeps whole unless the embeddings are tied). shard checks every pattern against the declaration above.
var (
	tpPlan = [][2]string{
		{"layers.*.self_attn.q_proj", "colwise"},
		{"layers.*.self_attn.k_proj", "colwise"},
		{"layers.*.self_attn.v_proj", "colwise"},
		{"layers.*.self_attn.o_proj", "rowwise"},
		{"layers.*.feed_forward.shared_expert.gate_proj", "colwise"},
		{"layers.*.feed_forward.shared_expert.up_proj", "colwise"},
		{"layers.*.feed_forward.shared_expert.down_proj", "rowwise"},
		{"layers.*.feed_forward.experts.gate_up_proj", "packed_rowwise"},
		{"layers.*.feed_forward.experts.down_proj", "colwise"},
		{"layers.*.feed_forward.experts", "moe_tp_experts"},
		{"layers.*.feed_forward.gate_proj", "colwise"},
		{"layers.*.feed_forward.up_proj", "colwise"},
		{"layers.*.feed_forward.down_proj", "rowwise"},
	}
	epPlan = [][2]string{
		{"layers.*.self_attn.q_proj", "colwise"},
		{"layers.*.self_attn.k_proj", "colwise"},
		{"layers.*.self_attn.v_proj", "colwise"},
		{"layers.*.self_attn.o_proj", "rowwise"},
		{"layers.*.feed_forward.experts.gate_up_proj", "grouped_gemm"},
		{"layers.*.feed_forward.experts.down_proj", "grouped_gemm"},
		{"layers.*.feed_forward.gate_proj", "colwise"},
		{"layers.*.feed_forward.up_proj", "colwise"},
		{"layers.*.feed_forward.down_proj", "rowwise"},
		{"layers.*.feed_forward.router", "ep_router"},
	}
	vocabPlan = [][2]string{
		{"embed_tokens", "embedding_rowwise"},
		{"lm_head", "colwise_gather_output"},
	}
)

// Family is the name Llama 4 registers under.
const Family = "llama4"

func init() {
	model.Register(model.Family{
		Name:          Family,
		Architectures: []string{"Llama4ForConditionalGeneration", "Llama4ForCausalLM"},
		ModelTypes:    []string{"llama4", "llama4_text"},
		Parse:         func(data []byte) (model.Config, error) { return ParseConfig(data) },
	})
}

var (
	_ model.Config = Config{}
	_ run.Opener   = Config{}
	_ run.Model    = runner{}
)

// Open loads the model on ops from w (run.Opener).
func (c Config) Open(ctx context.Context, ops backend.Ops, w run.Weights, par run.Parallel) (run.Model, error) {
	m, err := Load(ctx, ops, c, w, par)
	if err != nil {
		return nil, err
	}
	return runner{m}, nil
}

// runner is a *Model as a run.Model: the family-neutral surface the worker and the command line use.
type runner struct{ m *Model }

// AsModel returns the Llama 4 model behind a run.Model that Config.Open made, or nil.
func AsModel(m run.Model) *Model {
	if r, ok := m.(runner); ok {
		return r.m
	}
	return nil
}

func (r runner) Config() model.Config { return r.m.Config }

var _ run.ExpertLoader = runner{}

var _ run.KVPool = runner{}

// SetKVBlocks is Model.SetKVBlocks.
func (r runner) SetKVBlocks(blockSize, blocks int) error { return r.m.SetKVBlocks(blockSize, blocks) }

// KVUsage is Model.KVUsage.
func (r runner) KVUsage() (used, total, blockSize int) { return r.m.KVUsage() }

// ExpertLoad is Model.ExpertLoad.
func (r runner) ExpertLoad() [][]int64 { return r.m.ExpertLoad() }

// SlotLoad is Model.SlotLoad.
func (r runner) SlotLoad() [][]int64 { return r.m.SlotLoad() }

func (r runner) NewSequence(capacity int) (run.Sequence, error) {
	s, err := r.m.NewSequence(capacity)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (r runner) ForwardBatch(ctx context.Context, seqs []run.Sequence, ids [][]int, allLogits bool) (backend.Tensor, error) {
	own := make([]*Sequence, len(seqs))
	for i, s := range seqs {
		var ok bool
		if own[i], ok = s.(*Sequence); !ok {
			return nil, fmt.Errorf("%w: sequence %d is a %T, not one of this model's", ErrInput, i, s)
		}
	}
	return r.m.ForwardBatch(ctx, own, ids, allLogits)
}

func (r runner) Generate(ctx context.Context, prompt []int, opt run.GenerateOptions, emit func(id int) error) ([]int, run.Finish, error) {
	return r.m.Generate(ctx, prompt, opt, emit)
}

func (r runner) Score(ctx context.Context, ids []int) ([]float32, error) { return r.m.Score(ctx, ids) }

// ScoreChunked is Model.ScoreChunked: Score with the ids run in pieces of at most chunk tokens.
func (r runner) ScoreChunked(ctx context.Context, ids []int, chunk int) ([]float32, error) {
	return r.m.ScoreChunked(ctx, ids, chunk)
}

// GenerateImages is Model.GenerateImages: Generate with image features in the <|patch|> (patchID) slots.
func (r runner) GenerateImages(ctx context.Context, prompt []int, patchID int, features []float32, opt run.GenerateOptions, emit func(id int) error) ([]int, run.Finish, error) {
	return r.m.GenerateImages(ctx, prompt, Images{PatchID: patchID, Features: features}, opt, emit)
}

// ScoreImages is Model.ScoreImages: Score with image features in the <|patch|> (patchID) slots.
func (r runner) ScoreImages(ctx context.Context, ids []int, patchID int, features []float32) ([]float32, error) {
	return r.m.ScoreImages(ctx, ids, Images{PatchID: patchID, Features: features})
}
