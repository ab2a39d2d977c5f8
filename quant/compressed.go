package quant

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// ErrUnsupportedScheme reports a quantization_config tpfleet cannot run; the message names the field.
var ErrUnsupportedScheme = errors.New("quant: unsupported quantization_config")

// Scheme is the part of a compressed-tensors quantization_config (config.json, spec §3.4) tpfleet runs:
// FP8 E4M3 weights with one static scale per output channel, in the checkpoint as "<weight>_scale"
// beside each quantised weight, optional FP8 dynamic per-token input activations, and the modules kept in
// bf16.
type Scheme struct {
	// Targets are the config group's targets: module class names ("Linear") or "re:" patterns.
	Targets []string
	// Ignore are the modules kept in bf16: full module names or "re:" patterns.
	Ignore []string
	// DynamicActivations records input_activations: FP8 dynamic per token. The CPU reference runs the
	// checkpoint weight-only (HF 5.17's dequantised path, spec §3.4); GPU kernels may use it.
	DynamicActivations bool

	ignore []*regexp.Regexp
	names  map[string]bool
}

// Format is the format of the scheme's quantised weights: weight-only FP8 per output channel, dequantised
// to bf16 (CompressedTensorsFP8).
func (s *Scheme) Format() Format { return CompressedTensorsFP8() }

// Ignored reports whether module (a checkpoint name without ".weight", prefix included) is in Ignore.
func (s *Scheme) Ignored(module string) bool {
	if s.names[module] {
		return true
	}
	for _, re := range s.ignore {
		if re.MatchString(module) {
			return true
		}
	}
	return false
}

type ctArgs struct {
	NumBits        *int    `json:"num_bits"`
	Type           *string `json:"type"`
	Strategy       *string `json:"strategy"`
	Symmetric      *bool   `json:"symmetric"`
	Dynamic        *bool   `json:"dynamic"`
	GroupSize      *int    `json:"group_size"`
	BlockStructure any     `json:"block_structure"`
	Actorder       any     `json:"actorder"`
}

type ctGroup struct {
	Targets           []string        `json:"targets"`
	Weights           *ctArgs         `json:"weights"`
	InputActivations  *ctArgs         `json:"input_activations"`
	OutputActivations json.RawMessage `json:"output_activations"`
}

type ctConfig struct {
	QuantMethod   string             `json:"quant_method"`
	Format        string             `json:"format"`
	ConfigGroups  map[string]ctGroup `json:"config_groups"`
	Ignore        []string           `json:"ignore"`
	KVCacheScheme json.RawMessage    `json:"kv_cache_scheme"`
}

func isNull(m json.RawMessage) bool { return len(m) == 0 || string(m) == "null" }

// ParseCompressedTensors reads config.json's quantization_config (the object itself). It returns nil and
// no error for null; an error names the first field tpfleet does not support, as
// `quantization_config.config_groups.group_0.weights.strategy: "block" is not supported (want "channel")`.
func ParseCompressedTensors(data []byte) (*Scheme, error) {
	if isNull(data) {
		return nil, nil
	}
	var c ctConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%w: quantization_config: %v", ErrUnsupportedScheme, err)
	}
	bad := func(field string, got any, want string) error {
		return fmt.Errorf("%w: quantization_config.%s: %s is not supported (want %s)", ErrUnsupportedScheme, field, show(got), want)
	}
	if c.QuantMethod != "compressed-tensors" {
		return nil, bad("quant_method", c.QuantMethod, `"compressed-tensors"`)
	}
	if c.Format != "float-quantized" {
		return nil, bad("format", c.Format, `"float-quantized"`)
	}
	if !isNull(c.KVCacheScheme) {
		return nil, bad("kv_cache_scheme", string(c.KVCacheScheme), "null")
	}
	if len(c.ConfigGroups) != 1 {
		return nil, fmt.Errorf("%w: quantization_config.config_groups: %d groups are not supported (want 1)", ErrUnsupportedScheme, len(c.ConfigGroups))
	}
	s := &Scheme{Ignore: c.Ignore, names: map[string]bool{}}
	for name, g := range c.ConfigGroups {
		at := "config_groups." + name
		if len(g.Targets) == 0 {
			return nil, fmt.Errorf("%w: quantization_config.%s.targets: empty (want the quantised modules)", ErrUnsupportedScheme, at)
		}
		s.Targets = g.Targets
		if g.Weights == nil {
			return nil, fmt.Errorf("%w: quantization_config.%s.weights: missing (want FP8 per-channel weights)", ErrUnsupportedScheme, at)
		}
		w := *g.Weights
		switch {
		case w.Type == nil || *w.Type != "float":
			return nil, bad(at+".weights.type", w.Type, `"float"`)
		case w.NumBits == nil || *w.NumBits != 8:
			return nil, bad(at+".weights.num_bits", w.NumBits, "8")
		case w.Strategy == nil || *w.Strategy != "channel":
			return nil, bad(at+".weights.strategy", w.Strategy, `"channel"`)
		case w.Symmetric == nil || !*w.Symmetric:
			return nil, bad(at+".weights.symmetric", w.Symmetric, "true")
		case w.Dynamic != nil && *w.Dynamic:
			return nil, bad(at+".weights.dynamic", w.Dynamic, "false")
		case w.GroupSize != nil:
			return nil, bad(at+".weights.group_size", w.GroupSize, "null")
		case w.BlockStructure != nil:
			return nil, bad(at+".weights.block_structure", w.BlockStructure, "null")
		}
		if a := g.InputActivations; a != nil {
			switch {
			case a.Type == nil || *a.Type != "float":
				return nil, bad(at+".input_activations.type", a.Type, `"float"`)
			case a.NumBits == nil || *a.NumBits != 8:
				return nil, bad(at+".input_activations.num_bits", a.NumBits, "8")
			case a.Strategy == nil || *a.Strategy != "token":
				return nil, bad(at+".input_activations.strategy", a.Strategy, `"token"`)
			case a.Dynamic == nil || !*a.Dynamic:
				return nil, bad(at+".input_activations.dynamic", a.Dynamic, "true")
			case a.Symmetric != nil && !*a.Symmetric:
				return nil, bad(at+".input_activations.symmetric", a.Symmetric, "true")
			}
			s.DynamicActivations = true
		}
		if !isNull(g.OutputActivations) {
			return nil, bad(at+".output_activations", string(g.OutputActivations), "null")
		}
	}
	for i, ig := range c.Ignore {
		if p, ok := strings.CutPrefix(ig, "re:"); ok {
			re, err := regexp.Compile("^(?:" + p + ")") // re.match: anchored at the start only
			if err != nil {
				return nil, fmt.Errorf("%w: quantization_config.ignore[%d]: %q is not a valid pattern: %v", ErrUnsupportedScheme, i, ig, err)
			}
			s.ignore = append(s.ignore, re)
			continue
		}
		s.names[ig] = true
	}
	sort.Strings(s.Targets)
	return s, nil
}

// show formats a JSON field's value for a message: a string quoted, a missing field as "missing".
func show(v any) string {
	switch v := v.(type) {
	case *string:
		if v == nil {
			return "missing"
		}
		return fmt.Sprintf("%q", *v)
	case *int:
		if v == nil {
			return "missing"
		}
		return fmt.Sprint(*v)
	case *bool:
		if v == nil {
			return "missing"
		}
		return fmt.Sprint(*v)
	case string:
		return fmt.Sprintf("%q", v)
	}
	b, _ := json.Marshal(v)
	return string(b)
}
