package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
)

// Sentinel errors, tested with errors.Is.
var (
	// ErrConfig marks an invalid config.json or generation_config.json; errors wrap it and name the field.
	ErrConfig = errors.New("model: invalid config")
	// ErrUnknownArchitecture means no registered family serves a config.json's architectures or
	// model_type; the error names them and the registered families.
	ErrUnknownArchitecture = errors.New("model: unknown architecture")
)

// Config is one model's configuration as the rest of tpfleet sees it: what the coordinator checks
// requests against, what shard plans splits from, what a runtime loads. Each family's configuration type
// implements it (llama4.Config); a runtime finds what it needs beyond this by type assertion (model/run).
// Implementations are values, safe for concurrent use.
type Config interface {
	// Info is the model's identity, vocabulary, context and built-in plans.
	Info() Info
	// Tree is the model's tensor declaration for this configuration, with a fresh, empty Root.
	Tree() Tree
	// Validate reports a configuration the model cannot run, wrapping ErrConfig or the family's own.
	Validate() error
}

// Info is what every model says of itself.
type Info struct {
	// Family is the registered family's name ("llama4").
	Family string
	// Prefix is the key prefix of the model's tensors in the checkpoint ("language_model." in multimodal
	// checkpoints); TensorSpec names are without it.
	Prefix string
	// Foreign are the key prefixes of checkpoint tensors that belong to other parts of the checkpoint
	// (a vision tower, a projector): not this model's tensors, and not errors in a plan that names them.
	Foreign []string
	// VocabSize is the number of token ids, and of logits per token.
	VocabSize int
	// MaxPositions is the longest context, prompt and generated tokens together.
	MaxPositions int
	// BOS and EOS are config.json's token ids; generation_config.json may override EOS (Generation).
	BOS int
	EOS []int
	// Plans are the family's built-in tp_plans, by name: "tp" (the default) and "ep" where the model has
	// experts.
	Plans map[string][]PlanRule
	// Quantization is config.json's quantization_config, raw JSON ("" when absent): a pre-quantised
	// checkpoint (package quant parses it).
	Quantization string
	// ScaleSuffix names a quantised weight's scale tensor in the checkpoint: the weight's name plus it
	// (compressed-tensors). Empty: the family reads no pre-quantised checkpoints.
	ScaleSuffix string
}

// PlanRule is one entry of a built-in tp_plan, in Hugging Face's form: a module pattern and a style name.
type PlanRule struct {
	Pattern, Style string
}

// Tensors lists c's tensors; see Tree.Tensors. A malformed declaration is a bug of the family and panics.
func Tensors(c Config) []TensorSpec {
	specs, err := c.Tree().Tensors()
	if err != nil {
		panic(err)
	}
	return specs
}

// Family is a registered model family: the config.json values it answers to and its parser.
type Family struct {
	// Name is the family's name ("llama4").
	Name string
	// Architectures are config.json "architectures" values the family serves
	// ("Llama4ForConditionalGeneration").
	Architectures []string
	// ModelTypes are config.json "model_type" values the family serves ("llama4", "llama4_text").
	ModelTypes []string
	// Parse reads a config.json.
	Parse func(data []byte) (Config, error)
}

var registry struct {
	mu       sync.RWMutex
	families []Family
}

// Register adds a family; families call it from their init functions. It panics on an empty name, a nil
// Parse, or an architecture or model type another family already serves.
func Register(f Family) {
	if f.Name == "" || f.Parse == nil {
		panic("model: Register: a family needs a Name and a Parse")
	}
	registry.mu.Lock()
	defer registry.mu.Unlock()
	for _, g := range registry.families {
		for _, a := range f.Architectures {
			if slices.Contains(g.Architectures, a) {
				panic(fmt.Sprintf("model: Register(%s): architecture %s is already %s's", f.Name, a, g.Name))
			}
		}
		for _, t := range f.ModelTypes {
			if slices.Contains(g.ModelTypes, t) {
				panic(fmt.Sprintf("model: Register(%s): model_type %s is already %s's", f.Name, t, g.Name))
			}
		}
	}
	registry.families = append(registry.families, f)
}

// Families lists the registered families by name.
func Families() []Family {
	registry.mu.RLock()
	defer registry.mu.RUnlock()
	out := slices.Clone(registry.families)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// lookup finds the family of a config.json: its first registered architecture, else its model_type.
func lookup(archs []string, modelType string) (Family, error) {
	fams := Families()
	for _, a := range archs {
		for _, f := range fams {
			if slices.Contains(f.Architectures, a) {
				return f, nil
			}
		}
	}
	for _, f := range fams {
		if slices.Contains(f.ModelTypes, modelType) {
			return f, nil
		}
	}
	known := make([]string, len(fams))
	for i, f := range fams {
		known[i] = fmt.Sprintf("%s (%s; model_type %s)", f.Name, strings.Join(f.Architectures, ", "), strings.Join(f.ModelTypes, ", "))
	}
	if len(known) == 0 {
		known = []string{"none (a binary registers families by importing them)"}
	}
	return Family{}, fmt.Errorf("%w: config.json has architectures %q and model_type %q; registered: %s",
		ErrUnknownArchitecture, archs, modelType, strings.Join(known, "; "))
}

// ParseConfig parses config.json bytes with the family its "architectures" or "model_type" names.
func ParseConfig(data []byte) (Config, error) {
	var head struct {
		Architectures []string `json:"architectures"`
		ModelType     string   `json:"model_type"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("%w: not a JSON object: %v", ErrConfig, err)
	}
	f, err := lookup(head.Architectures, head.ModelType)
	if err != nil {
		return nil, err
	}
	return f.Parse(data)
}

// LoadConfig reads dir/config.json; see ParseConfig.
func LoadConfig(dir string) (Config, error) {
	path := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("model: read config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// Generation is generation_config.json: stop ids and sampling defaults.
type Generation struct {
	BOS         int
	EOS         []int
	Pad         int
	DoSample    bool
	Temperature float64
	TopK        int
	TopP        float64
}

// LoadGeneration reads dir/generation_config.json. A missing file gives greedy defaults with info's ids.
func LoadGeneration(dir string, info Info) (Generation, error) {
	g := Generation{BOS: info.BOS, EOS: info.EOS, Temperature: 1, TopP: 1}
	data, err := os.ReadFile(filepath.Join(dir, "generation_config.json"))
	if errors.Is(err, os.ErrNotExist) {
		return g, nil
	}
	if err != nil {
		return g, fmt.Errorf("model: read generation config: %w", err)
	}
	var f struct {
		BOS         *int            `json:"bos_token_id"`
		EOS         json.RawMessage `json:"eos_token_id"`
		Pad         *int            `json:"pad_token_id"`
		DoSample    *bool           `json:"do_sample"`
		Temperature *float64        `json:"temperature"`
		TopK        *int            `json:"top_k"`
		TopP        *float64        `json:"top_p"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return g, fmt.Errorf("generation_config.json: %w: %v", ErrConfig, err)
	}
	set(&g.BOS, f.BOS)
	set(&g.Pad, f.Pad)
	set(&g.DoSample, f.DoSample)
	set(&g.Temperature, f.Temperature)
	set(&g.TopK, f.TopK)
	set(&g.TopP, f.TopP)
	if raw := strings.TrimSpace(string(f.EOS)); raw != "" && raw != "null" {
		var one int
		if json.Unmarshal(f.EOS, &one) == nil {
			g.EOS = []int{one}
		} else if err := json.Unmarshal(f.EOS, &g.EOS); err != nil {
			return g, fmt.Errorf("generation_config.json: %w: eos_token_id has the wrong type: %s", ErrConfig, raw)
		}
	}
	return g, nil
}

func set[T any](dst *T, v *T) {
	if v != nil {
		*dst = *v
	}
}
