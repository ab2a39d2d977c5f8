package llama4

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/tpfleet/tpfleet/model"
)

// ErrConfig marks an invalid config.json or generation_config.json; errors wrap it and name the field.
var ErrConfig = errors.New("llama4: invalid config")

// TextPrefix is the key prefix of the text model's tensors in Llama4ForConditionalGeneration checkpoints.
const TextPrefix = "language_model."

// Rope is the rotary embedding's parameters (spec §1.3), from either `rope_parameters` (transformers 5) or
// the hub's `rope_scaling` + `rope_theta`.
type Rope struct {
	Type                  string // "default" or "llama3"
	Theta                 float64
	Factor                float64
	LowFreqFactor         float64
	HighFreqFactor        float64
	OriginalMaxPositionEm int // original_max_position_embeddings
}

// Config is the text model's configuration (spec §1.1) with every derived per-layer property resolved.
type Config struct {
	// QuantizationConfig is config.json's quantization_config, raw ("" when absent): a pre-quantised
	// checkpoint (spec §3.4; model.Info.Quantization).
	QuantizationConfig  string
	VocabSize           int
	HiddenSize          int
	IntermediateSize    int // per expert and shared expert
	IntermediateSizeMLP int // dense (non-MoE) layers
	NumLayers           int
	NumHeads            int
	NumKVHeads          int
	HeadDim             int
	RMSNormEps          float32
	NumExperts          int
	TopK                int // num_experts_per_tok
	UseQKNorm           bool
	AttentionChunkSize  int
	TemperatureTuning   bool
	FloorScale          float64
	AttnScale           float64
	MaxPositions        int
	TieWordEmbeddings   bool
	Rope                Rope

	// Per layer, derived as HF does when config.json leaves them out.
	UseRoPE []bool // no_rope_layers[i] == 1
	Chunked []bool // layer_types[i] == "chunked_attention"
	MoE     []bool // i in moe_layers

	// Prefix is prepended to the text model's tensor names: TextPrefix for multimodal checkpoints.
	Prefix string
	// BOS and EOS come from config.json; generation_config.json may override EOS (see Generation).
	BOS int
	EOS []int
}

// Generation is generation_config.json: stop ids and sampling defaults; see model.Generation.
type Generation = model.Generation

// LoadConfig reads dir/config.json (model_type llama4 or llama4_text).
func LoadConfig(dir string) (Config, error) {
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return Config{}, fmt.Errorf("llama4: read config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", filepath.Join(dir, "config.json"), err)
	}
	return cfg, nil
}

// LoadGeneration reads dir/generation_config.json. A missing file gives greedy defaults with cfg's ids.
func LoadGeneration(dir string, cfg Config) (Generation, error) {
	return model.LoadGeneration(dir, cfg.Info())
}

// ParseConfig parses config.json bytes. For model_type "llama4" the text model's settings are read from
// text_config and Prefix is TextPrefix.
func ParseConfig(data []byte) (Config, error) {
	top, err := decodeFields(data)
	if err != nil {
		return Config{}, err
	}
	var modelType string
	if err := top.optString("model_type", &modelType); err != nil {
		return Config{}, err
	}
	text, prefix := top, ""
	switch modelType {
	case "llama4":
		raw, ok := top.raw("text_config")
		if !ok {
			return Config{}, fmt.Errorf("%w: model_type llama4 without text_config", ErrConfig)
		}
		if text, err = decodeFields(raw); err != nil {
			return Config{}, fmt.Errorf("text_config: %w", err)
		}
		text.prefix = "text_config."
		prefix = TextPrefix
	case "llama4_text", "":
	default:
		return Config{}, fmt.Errorf("%w: model_type %q is not llama4 or llama4_text", ErrConfig, modelType)
	}
	cfg, err := parseText(text)
	if err != nil {
		return Config{}, err
	}
	cfg.Prefix = prefix
	if raw, ok := top.raw("quantization_config"); ok {
		cfg.QuantizationConfig = string(raw)
	} else if raw, ok := text.raw("quantization_config"); ok {
		cfg.QuantizationConfig = string(raw)
	}
	return cfg, nil
}

func parseText(f fields) (Config, error) {
	c := Config{
		NumKVHeads: 8, RMSNormEps: 1e-5, NumExperts: 16, TopK: 1, UseQKNorm: true,
		AttentionChunkSize: 8192, TemperatureTuning: true, FloorScale: 8192, AttnScale: 0.1,
		MaxPositions: 4096 * 32, IntermediateSizeMLP: 16384, BOS: 200000, EOS: []int{200001},
	}
	for _, r := range []struct {
		key string
		dst *int
	}{
		{"vocab_size", &c.VocabSize},
		{"hidden_size", &c.HiddenSize},
		{"intermediate_size", &c.IntermediateSize},
		{"num_hidden_layers", &c.NumLayers},
		{"num_attention_heads", &c.NumHeads},
	} {
		if err := f.reqInt(r.key, r.dst); err != nil {
			return c, err
		}
	}
	eps := float64(c.RMSNormEps)
	var tuning any = true
	var noRope, moeLayers []int
	var layerTypes []string
	step := 1
	interval := 4
	for _, err := range []error{
		f.optInt("num_key_value_heads", &c.NumKVHeads),
		f.optInt("head_dim", &c.HeadDim),
		f.optInt("intermediate_size_mlp", &c.IntermediateSizeMLP),
		f.optFloat("rms_norm_eps", &eps),
		f.optInt("num_local_experts", &c.NumExperts),
		f.optInt("num_experts_per_tok", &c.TopK),
		f.optBool("use_qk_norm", &c.UseQKNorm),
		f.optInt("attention_chunk_size", &c.AttentionChunkSize),
		f.optAny("attn_temperature_tuning", &tuning),
		f.optFloat("floor_scale", &c.FloorScale),
		f.optFloat("attn_scale", &c.AttnScale),
		f.optInt("max_position_embeddings", &c.MaxPositions),
		f.optBool("tie_word_embeddings", &c.TieWordEmbeddings),
		f.optInt("interleave_moe_layer_step", &step),
		f.optInt("no_rope_layer_interval", &interval),
		f.optInts("no_rope_layers", &noRope),
		f.optInts("moe_layers", &moeLayers),
		f.optStrings("layer_types", &layerTypes),
		f.optInt("bos_token_id", &c.BOS),
		f.optIDs("eos_token_id", &c.EOS),
	} {
		if err != nil {
			return c, err
		}
	}
	c.RMSNormEps = float32(eps)
	var err error
	if c.TemperatureTuning, err = truthy("attn_temperature_tuning", tuning); err != nil {
		return c, err
	}
	if c.HeadDim == 0 && c.NumHeads > 0 {
		c.HeadDim = c.HiddenSize / c.NumHeads
	}
	if c.Rope, err = parseRope(f); err != nil {
		return c, err
	}
	if err := c.deriveLayers(step, interval, noRope, moeLayers, layerTypes); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// deriveLayers resolves the per-layer kinds as Llama4TextConfig.__post_init__ does (spec §1.1).
func (c *Config) deriveLayers(step, interval int, noRope, moeLayers []int, layerTypes []string) error {
	if c.NumLayers <= 0 {
		return fieldErr("num_hidden_layers", "must be positive, got %d", c.NumLayers)
	}
	if len(noRope) == 0 { // HF treats [] like None
		if interval <= 0 {
			return fieldErr("no_rope_layer_interval", "must be positive, got %d", interval)
		}
		noRope = make([]int, c.NumLayers)
		for i := range noRope {
			if (i+1)%interval != 0 {
				noRope[i] = 1
			}
		}
	}
	if len(noRope) != c.NumLayers {
		return fieldErr("no_rope_layers", "has %d entries for %d layers", len(noRope), c.NumLayers)
	}
	c.UseRoPE = make([]bool, c.NumLayers)
	for i, v := range noRope {
		c.UseRoPE[i] = v != 0
	}
	c.Chunked = make([]bool, c.NumLayers)
	if layerTypes == nil {
		copy(c.Chunked, c.UseRoPE)
	} else {
		if len(layerTypes) != c.NumLayers {
			return fieldErr("layer_types", "has %d entries for %d layers", len(layerTypes), c.NumLayers)
		}
		for i, t := range layerTypes {
			switch t {
			case "chunked_attention":
				c.Chunked[i] = true
			case "full_attention":
			default:
				return fieldErr("layer_types", "entry %d is %q, want chunked_attention or full_attention", i, t)
			}
		}
	}
	if moeLayers == nil {
		if step <= 0 {
			return fieldErr("interleave_moe_layer_step", "must be positive, got %d", step)
		}
		for i := step - 1; i < c.NumLayers; i += step {
			moeLayers = append(moeLayers, i)
		}
	}
	c.MoE = make([]bool, c.NumLayers)
	for _, l := range moeLayers {
		if l < 0 || l >= c.NumLayers {
			return fieldErr("moe_layers", "layer %d out of range [0, %d)", l, c.NumLayers)
		}
		c.MoE[l] = true
	}
	return nil
}

// parseRope reads rope_parameters, or else the legacy rope_scaling + rope_theta (spec §1.3).
func parseRope(f fields) (Rope, error) {
	r := Rope{Type: "default", Theta: 500000}
	key := "rope_parameters"
	raw, ok := f.raw(key)
	if !ok {
		key = "rope_scaling"
		raw, ok = f.raw(key)
	}
	if err := f.optFloat("rope_theta", &r.Theta); err != nil {
		return r, err
	}
	if ok {
		p, err := decodeFields(raw)
		if err != nil {
			return r, fieldErr(key, "%v", err)
		}
		p.prefix = key + "."
		if err := p.optString("rope_type", &r.Type); err != nil {
			return r, err
		}
		if _, has := p.raw("rope_type"); !has {
			if err := p.optString("type", &r.Type); err != nil { // older spelling
				return r, err
			}
		}
		for _, err := range []error{
			p.optFloat("rope_theta", &r.Theta),
			p.optFloat("factor", &r.Factor),
			p.optFloat("low_freq_factor", &r.LowFreqFactor),
			p.optFloat("high_freq_factor", &r.HighFreqFactor),
			p.optInt("original_max_position_embeddings", &r.OriginalMaxPositionEm),
		} {
			if err != nil {
				return r, err
			}
		}
	}
	switch r.Type {
	case "default":
	case "llama3":
		if r.Factor <= 0 || r.LowFreqFactor <= 0 || r.HighFreqFactor < r.LowFreqFactor || r.OriginalMaxPositionEm <= 0 {
			return r, fieldErr(key, "llama3 needs factor > 0, 0 < low_freq_factor <= high_freq_factor and original_max_position_embeddings > 0")
		}
	default:
		return r, fieldErr(key+".rope_type", "%q is not supported (default, llama3)", r.Type)
	}
	if r.Theta <= 0 {
		return r, fieldErr("rope_theta", "must be positive, got %g", r.Theta)
	}
	return r, nil
}

// Validate checks the sizes the forward pass relies on.
func (c Config) Validate() error {
	for _, p := range []struct {
		key string
		v   int
	}{
		{"vocab_size", c.VocabSize}, {"hidden_size", c.HiddenSize}, {"intermediate_size", c.IntermediateSize},
		{"num_hidden_layers", c.NumLayers}, {"num_attention_heads", c.NumHeads},
		{"num_key_value_heads", c.NumKVHeads}, {"head_dim", c.HeadDim},
		{"attention_chunk_size", c.AttentionChunkSize}, {"max_position_embeddings", c.MaxPositions},
	} {
		if p.v <= 0 {
			return fieldErr(p.key, "must be positive, got %d", p.v)
		}
	}
	if c.HeadDim%2 != 0 {
		return fieldErr("head_dim", "must be even for RoPE pairs, got %d", c.HeadDim)
	}
	if c.NumHeads%c.NumKVHeads != 0 {
		return fieldErr("num_key_value_heads", "%d does not divide num_attention_heads %d", c.NumKVHeads, c.NumHeads)
	}
	anyMoE, anyDense := false, false
	for _, m := range c.MoE {
		anyMoE = anyMoE || m
		anyDense = anyDense || !m
	}
	if anyMoE && (c.NumExperts <= 0 || c.TopK <= 0 || c.TopK > c.NumExperts) {
		return fieldErr("num_experts_per_tok", "%d must be in [1, num_local_experts=%d]", c.TopK, c.NumExperts)
	}
	if anyDense && c.IntermediateSizeMLP <= 0 {
		return fieldErr("intermediate_size_mlp", "must be positive for dense layers, got %d", c.IntermediateSizeMLP)
	}
	if c.TemperatureTuning && c.FloorScale <= 0 {
		return fieldErr("floor_scale", "must be positive, got %g", c.FloorScale)
	}
	if c.RMSNormEps <= 0 {
		return fieldErr("rms_norm_eps", "must be positive, got %g", c.RMSNormEps)
	}
	return nil
}

// InvFreq is the RoPE inverse frequency of each of the HeadDim/2 pairs (spec §2.3a), llama3-scaled when
// configured. HF computes it in float32; float64 here differs by at most an ulp after rounding.
func (c Config) InvFreq() []float32 {
	n := c.HeadDim / 2
	out := make([]float32, n)
	r := c.Rope
	for i := range out {
		f := 1 / math.Pow(r.Theta, float64(2*i)/float64(c.HeadDim))
		if r.Type == "llama3" {
			old := float64(r.OriginalMaxPositionEm)
			lowWavelen := old / r.LowFreqFactor
			highWavelen := old / r.HighFreqFactor
			wavelen := 2 * math.Pi / f
			switch {
			case wavelen > lowWavelen:
				f /= r.Factor
			case wavelen >= highWavelen: // medium band: interpolate (never reached when low == high)
				smooth := (old/wavelen - r.LowFreqFactor) / (r.HighFreqFactor - r.LowFreqFactor)
				f = (1-smooth)*f/r.Factor + smooth*f
			}
		}
		out[i] = float32(f)
	}
	return out
}

// AttnTemperature is the query scale of NoPE layers at absolute cache index t (spec §2.3c):
// 1 + attn_scale·ln(1 + ⌊(t+1)/floor_scale⌋).
func (c Config) AttnTemperature(t int) float32 {
	return float32(math.Log1p(math.Floor(float64(float32(t)+1)/c.FloorScale))*c.AttnScale + 1)
}

// fields is a JSON object whose values are decoded one at a time, so that each error names its field.
type fields struct {
	m      map[string]json.RawMessage
	prefix string // names a nested object's fields in errors ("rope_scaling.factor")
}

func decodeFields(data []byte) (fields, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return fields{}, fmt.Errorf("%w: not a JSON object: %v", ErrConfig, err)
	}
	if m == nil {
		return fields{}, fmt.Errorf("%w: not a JSON object", ErrConfig)
	}
	return fields{m: m}, nil
}

func (f fields) name(key string) string { return f.prefix + key }

func (f fields) raw(key string) (json.RawMessage, bool) {
	raw, ok := f.m[key]
	if !ok || isNull(raw) {
		return nil, false
	}
	return raw, true
}

func fieldErr(key, format string, args ...any) error {
	return fmt.Errorf("%w: %s %s", ErrConfig, key, fmt.Sprintf(format, args...))
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), []byte("null")) }

func (f fields) decode(key string, dst any) (bool, error) {
	raw, ok := f.raw(key)
	if !ok {
		return false, nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return false, fieldErr(f.name(key), "has the wrong type: %s", strings.TrimSpace(string(raw)))
	}
	return true, nil
}

func (f fields) reqInt(key string, dst *int) error {
	ok, err := f.decode(key, dst)
	if err == nil && !ok {
		err = fieldErr(f.name(key), "is missing")
	}
	return err
}

func (f fields) optInt(key string, dst *int) error       { _, err := f.decode(key, dst); return err }
func (f fields) optFloat(key string, dst *float64) error { _, err := f.decode(key, dst); return err }
func (f fields) optBool(key string, dst *bool) error     { _, err := f.decode(key, dst); return err }
func (f fields) optString(key string, dst *string) error { _, err := f.decode(key, dst); return err }
func (f fields) optInts(key string, dst *[]int) error    { _, err := f.decode(key, dst); return err }
func (f fields) optAny(key string, dst *any) error       { _, err := f.decode(key, dst); return err }
func (f fields) optStrings(key string, dst *[]string) error {
	_, err := f.decode(key, dst)
	return err
}

// optIDs reads a token id that may be one int or a list of ints (eos_token_id).
func (f fields) optIDs(key string, dst *[]int) error {
	raw, ok := f.raw(key)
	if !ok {
		return nil
	}
	var one int
	if json.Unmarshal(raw, &one) == nil {
		*dst = []int{one}
		return nil
	}
	_, err := f.decode(key, dst)
	return err
}

// truthy accepts a bool or a number (some hub copies store attn_temperature_tuning as 4; spec §7.17).
func truthy(key string, v any) (bool, error) {
	switch x := v.(type) {
	case bool:
		return x, nil
	case float64:
		return x != 0, nil
	default:
		return false, fieldErr(key, "must be a bool or a number, got %v", v)
	}
}
