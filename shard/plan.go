package shard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/tpfleet/tpfleet/model"
)

// Rule is one entry of a plan: tensors matching Pattern are split by Style.
type Rule struct {
	Pattern string `json:"pattern"`
	Style   Style  `json:"style"`
}

// Plan is an ordered set of rules, HF's tp_plan: a JSON object from module pattern to style, such as
// {"layers.*.attn.query": "colwise"}. The zero Plan has no rules and keeps every tensor whole. A Plan
// is immutable and safe for concurrent use.
//
// A pattern is a dotted module or parameter name in which "*" stands for one all-digit component (a layer
// or expert index). It matches a checkpoint tensor when the tensor's own name, or the name of the module
// that holds it (the name less its last component: "….query.weight" → "….query"), ends with the pattern
// at a dot. Names and patterns are compared without a leading "language_model.", so HF's base-model plans
// ("layers.*…"), its assembled plans ("model.layers.*…", "language_model.model.layers.*…") and
// multimodal or text-only checkpoints all fit each other. When several rules match a tensor, one that
// matches the tensor's own name beats one that matches its module; then the longer pattern wins, then the
// one with fewer "*"; then the earlier rule.
type Plan struct {
	rules []compiledRule
	order *unitOrder // see WithOrder; nil: every unit in checkpoint order
}

type compiledRule struct {
	Rule
	comps []string // pattern components, without "language_model."
	wild  int      // number of "*" components
}

// NewPlan makes a plan of rules, in order. It rejects unknown styles (naming the style and the pattern),
// malformed patterns and a pattern given twice.
func NewPlan(rules ...Rule) (Plan, error) {
	p := Plan{rules: make([]compiledRule, 0, len(rules))}
	seen := make(map[string]bool, len(rules))
	for _, r := range rules {
		if !r.Style.Known() {
			return Plan{}, unknownStyle(r.Pattern, r.Style)
		}
		comps, err := patternComponents(r.Pattern)
		if err != nil {
			return Plan{}, err
		}
		key := strings.Join(comps, ".")
		if seen[key] {
			return Plan{}, fmt.Errorf("%w: pattern %q given twice", ErrPlan, r.Pattern)
		}
		seen[key] = true
		c := compiledRule{Rule: r, comps: comps}
		for _, s := range comps {
			if s == "*" {
				c.wild++
			}
		}
		p.rules = append(p.rules, c)
	}
	return p, nil
}

// patternComponents splits a pattern into components, dropping a leading "language_model.".
func patternComponents(pattern string) ([]string, error) {
	if pattern == "" {
		return nil, fmt.Errorf("%w: empty pattern", ErrPlan)
	}
	comps := strings.Split(strings.TrimPrefix(pattern, textPrefix), ".")
	for _, c := range comps {
		if c == "" {
			return nil, fmt.Errorf("%w: pattern %q has an empty component", ErrPlan, pattern)
		}
		if c != "*" && strings.Contains(c, "*") {
			return nil, fmt.Errorf("%w: pattern %q: \"*\" must be a whole component (it stands for a layer or expert number)", ErrPlan, pattern)
		}
	}
	return comps, nil
}

// ParsePlan parses HF's JSON form of a plan: one object from pattern to style name, in the order given.
func ParsePlan(data []byte) (Plan, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return Plan{}, fmt.Errorf("%w: %v", ErrPlan, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return Plan{}, fmt.Errorf("%w: want a JSON object of pattern to style, got %v", ErrPlan, tok)
	}
	var rules []Rule
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return Plan{}, fmt.Errorf("%w: %v", ErrPlan, err)
		}
		pattern := tok.(string) // object keys are always strings
		var style string
		if err := dec.Decode(&style); err != nil {
			return Plan{}, fmt.Errorf("%w: pattern %q: the style must be a string: %v", ErrPlan, pattern, err)
		}
		rules = append(rules, Rule{Pattern: pattern, Style: Style(style)})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return Plan{}, fmt.Errorf("%w: %v", ErrPlan, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Plan{}, fmt.Errorf("%w: data after the plan object", ErrPlan)
	}
	return NewPlan(rules...)
}

// LoadPlan reads a plan file in HF's JSON form (see ParsePlan).
func LoadPlan(path string) (Plan, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Plan{}, fmt.Errorf("shard: read plan: %w", err)
	}
	p, err := ParsePlan(data)
	if err != nil {
		return Plan{}, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// Rules returns the plan's rules in order.
func (p Plan) Rules() []Rule {
	out := make([]Rule, len(p.rules))
	for i, r := range p.rules {
		out[i] = r.Rule
	}
	return out
}

// Len is the number of rules.
func (p Plan) Len() int { return len(p.rules) }

// MarshalJSON writes the plan in HF's form, rules in order.
func (p Plan) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, r := range p.rules {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(r.Pattern) // strings always marshal
		v, _ := json.Marshal(string(r.Style))
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// UnmarshalJSON reads HF's form; see ParsePlan.
func (p *Plan) UnmarshalJSON(data []byte) error {
	q, err := ParsePlan(data)
	if err != nil {
		return err
	}
	*p = q
	return nil
}

// Match returns the rule that decides how the tensor called name is split, by the matching rules of Plan.
// The name is a checkpoint key, with or without "language_model.".
func (p Plan) Match(name string) (Rule, bool) {
	i := p.match(nameComponents(name))
	if i < 0 {
		return Rule{}, false
	}
	return p.rules[i].Rule, true
}

// match returns the index of the rule for a tensor's name components, or -1.
func (p Plan) match(path []string) int {
	best, bestScore := -1, [3]int{}
	for i, r := range p.rules {
		var score [3]int
		switch {
		case suffixMatch(r.comps, path):
			score = [3]int{2, len(r.comps), -r.wild}
		case len(path) > 1 && suffixMatch(r.comps, path[:len(path)-1]):
			score = [3]int{1, len(r.comps), -r.wild}
		default:
			continue
		}
		if best < 0 || greater(score, bestScore) {
			best, bestScore = i, score
		}
	}
	return best
}

func greater(a, b [3]int) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] > b[i]
		}
	}
	return false
}

// matchesWithin reports whether r matches path or any module above it.
func (r compiledRule) matchesWithin(path []string) bool {
	for end := len(path); end >= len(r.comps); end-- {
		if suffixMatch(r.comps, path[:end]) {
			return true
		}
	}
	return false
}

// suffixMatch reports whether path ends with pattern, component by component; "*" matches a component of
// digits.
func suffixMatch(pattern, path []string) bool {
	if len(pattern) > len(path) {
		return false
	}
	off := len(path) - len(pattern)
	for i, c := range pattern {
		s := path[off+i]
		if c == "*" {
			if !isDigits(s) {
				return false
			}
		} else if c != s {
			return false
		}
	}
	return true
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// textPrefix is the key prefix Hugging Face gives a multimodal checkpoint's language model; patterns and
// names are compared without it whatever the checkpoint's prefix.
const textPrefix = "language_model."

func nameComponents(name string) []string {
	return strings.Split(strings.TrimPrefix(name, textPrefix), ".")
}

// generic writes name with every all-digit component as "*": the form in which one error covers every layer.
func generic(name string) string {
	comps := strings.Split(name, ".")
	for i, c := range comps {
		if isDigits(c) {
			comps[i] = "*"
		}
	}
	return strings.Join(comps, ".")
}

// builtin makes a model's built-in plan from its declaration; a malformed one is the family's bug.
func builtin(cfg model.Config, name string) (Plan, bool) {
	rules, ok := cfg.Info().Plans[name]
	if !ok {
		return Plan{}, false
	}
	all := make([]Rule, len(rules))
	for i, r := range rules {
		all[i] = Rule{Pattern: r.Pattern, Style: Style(r.Style)}
	}
	p, err := NewPlan(all...)
	if err != nil {
		panic(fmt.Sprintf("shard: %s's built-in plan %q: %v", cfg.Info().Family, name, err))
	}
	return p, true
}

// DefaultPlan is the model's tensor-parallel plan, its built-in plan "tp" (model.Info.Plans; for Llama 4,
// transformers 5.17's effective text plan with a vocab-parallel embedding). A model without one gets the
// zero Plan: every tensor whole.
func DefaultPlan(cfg model.Config) Plan {
	p, _ := builtin(cfg, "tp")
	return p
}

// ExpertParallelPlan is the model's built-in plan "ep": whole experts per rank (for Llama 4, HF's
// base_model_ep_plan with the vocabulary rules of DefaultPlan). A model without one gets the zero Plan.
func ExpertParallelPlan(cfg model.Config) Plan {
	p, _ := builtin(cfg, "ep")
	return p
}

// NamedPlan returns one of the model's built-in plans by name: "tp" (or "default") for DefaultPlan, "ep"
// for ExpertParallelPlan, or any other name the model declares.
func NamedPlan(cfg model.Config, name string) (Plan, bool) {
	if name == "default" {
		name = "tp"
	}
	return builtin(cfg, name)
}

// ResolvePlan returns the model's built-in plan called name (NamedPlan: "tp", "default", "ep", ...) or
// else reads name as a plan file (LoadPlan). A name that is neither gives an error that says so and wraps
// os.ErrNotExist; a plan file that does not parse gives LoadPlan's error.
func ResolvePlan(cfg model.Config, name string) (Plan, error) {
	if plan, ok := NamedPlan(cfg, name); ok {
		return plan, nil
	}
	plan, err := LoadPlan(name)
	if errors.Is(err, os.ErrNotExist) {
		return plan, fmt.Errorf("plan %q is neither a built-in plan (%s) nor a plan file: %w", name, builtinNames(cfg), err)
	}
	return plan, err
}

// builtinNames lists the model's built-in plan names for messages, the default first: "tp, ep".
func builtinNames(cfg model.Config) string {
	names := make([]string, 0, len(cfg.Info().Plans))
	for n := range cfg.Info().Plans {
		if n != "tp" {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	if _, ok := cfg.Info().Plans["tp"]; ok {
		names = append([]string{"tp"}, names...)
	}
	return strings.Join(names, ", ")
}

// PlanOf returns the plan a placement names: rules (a plan file's content in HF's JSON form) parsed when
// given, else ResolvePlan(cfg, name), with "tp" for an empty name.
func PlanOf(cfg model.Config, name string, rules []byte) (Plan, error) {
	if len(rules) > 0 {
		p, err := ParsePlan(rules)
		if err != nil {
			return Plan{}, fmt.Errorf("plan %q: %w", name, err)
		}
		return p, nil
	}
	if name == "" {
		name = "tp"
	}
	return ResolvePlan(cfg, name)
}
