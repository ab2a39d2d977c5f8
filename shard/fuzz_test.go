package shard

import (
	"errors"
	"reflect"
	"testing"
)

// FuzzParsePlan feeds ParsePlan tp_plan files (outside input: --plan names any file): it must return a
// plan or an error wrapping ErrPlan (ErrUnknownStyle for a bad style), never panic; an accepted plan
// encodes (MarshalJSON) to a file that parses to the same rules, and matching a tensor name never
// panics. Its seeds run in go test.
func FuzzParsePlan(f *testing.F) {
	for _, s := range []string{hfTP517, hfEP517, hfTPLegacy, hfEPLegacy, hfAssembled, `{}`, `[]`, `null`, `{"lm_head": 3}`,
		`{"layers.*.q_*": "colwise"}`, `{"a": "colwise"} x`, `{"language_model.a.*": "rowwise", "a.*": "rowwise"}`, "{\"\xff\": \"colwise\"}"} {
		f.Add([]byte(s))
	}
	names := []string{"model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight",
		"language_model.model.layers.12.feed_forward.experts.gate_up_proj", ""}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePlan(data)
		if err != nil {
			if !errors.Is(err, ErrPlan) && !errors.Is(err, ErrUnknownStyle) {
				t.Fatalf("ParsePlan(%q) = %v, want ErrPlan or ErrUnknownStyle", data, err)
			}
			return
		}
		enc, err := p.MarshalJSON()
		if err != nil {
			t.Fatalf("MarshalJSON of %q: %v", data, err)
		}
		q, err := ParsePlan(enc)
		if err != nil || !reflect.DeepEqual(p.Rules(), q.Rules()) {
			t.Fatalf("ParsePlan(MarshalJSON(ParsePlan(%q))) = %v, %v; want %v", data, q.Rules(), err, p.Rules())
		}
		for _, n := range names {
			p.Match(n)
		}
	})
}
