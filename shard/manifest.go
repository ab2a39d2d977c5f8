package shard

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Catalog lists a checkpoint's tensors. *safetensors.Checkpoint implements it.
type Catalog interface {
	Names() []string
	Info(name string) (safetensors.TensorInfo, error)
}

var _ Catalog = (*safetensors.Checkpoint)(nil)

// Manifest is what one rank of a TP group loads: every tensor of the text model, how the plan splits it,
// and the part this rank reads. Vision and projector tensors (vision_model.*, multi_modal_projector.*) are
// not part of it.
type Manifest struct {
	TP   int `json:"tp"`
	Rank int `json:"rank"`
	// Prefix is the text model's key prefix in the checkpoint (llama4.Config.Prefix): the model asks for
	// names without it.
	Prefix  string        `json:"prefix,omitempty"`
	Tensors []TensorShard `json:"tensors"` // in checkpoint name order
	// Unused are the plan's rules that decide no tensor's split: module styles on modules above the
	// tensors (moe_tp_experts on experts, gather on feed_forward) or on a module whose parameters a more
	// specific rule claims, rules for Llama 4 modules this checkpoint lacks (dense MLPs in an all-MoE
	// model such as Scout), and rules for the vision tower.
	Unused []Rule `json:"unused,omitempty"`

	Bytes           int64 `json:"bytes"`            // bytes this rank reads
	SplitBytes      int64 `json:"split_bytes"`      // of Bytes, from split tensors
	ReplicatedBytes int64 `json:"replicated_bytes"` // of Bytes, from whole tensors
	FullBytes       int64 `json:"full_bytes"`       // every text tensor whole: what one rank of TP=1 reads

	index map[string]int
}

// TensorShard is one tensor of a Manifest and this rank's part of it.
type TensorShard struct {
	Name    string            // checkpoint name, with the prefix
	Style   Style             // the style that applied; empty when no rule matched (kept whole)
	Pattern string            // the rule's pattern; empty when none matched
	DType   safetensors.DType // element type
	Shape   []int             // the whole tensor's shape
	// Dim is the split dimension, -1 for a whole tensor. Packed splits take the matching slice of each half
	// of Dim (two Ranges).
	Dim    int
	Packed bool
	// Ranges are the index ranges along Dim that this rank reads, concatenated in order (nil when whole).
	Ranges     []safetensors.Range
	LocalShape []int // shape of what this rank holds
	Bytes      int64 // bytes this rank reads
	// Replicas is the number of ranks that hold exactly these bytes: 1 for a plain split, TP for a whole
	// tensor, TP/num_key_value_heads for k/v projections whose heads are replicated (TP > kv heads).
	Replicas int
	// Layout is what the model is told. It is {Dim, Rank, TP} for every split tensor, including k/v with
	// replicated heads (the model sees a head split whose local kv heads serve its local q heads).
	Layout llama4.Layout
}

// Split reports whether the tensor is cut across the ranks.
func (t TensorShard) Split() bool { return t.Dim >= 0 }

// MarshalJSON writes the dtype as its header string and ranges as [start, end] pairs.
func (t TensorShard) MarshalJSON() ([]byte, error) {
	ranges := make([][2]int, len(t.Ranges))
	for i, r := range t.Ranges {
		ranges[i] = [2]int{r.Start, r.End}
	}
	return json.Marshal(struct {
		Name       string   `json:"name"`
		Style      Style    `json:"style,omitempty"`
		Pattern    string   `json:"pattern,omitempty"`
		DType      string   `json:"dtype"`
		Shape      []int    `json:"shape"`
		Dim        int      `json:"dim"`
		Packed     bool     `json:"packed,omitempty"`
		Ranges     [][2]int `json:"ranges,omitempty"`
		LocalShape []int    `json:"local_shape"`
		Bytes      int64    `json:"bytes"`
		Replicas   int      `json:"replicas"`
	}{t.Name, t.Style, t.Pattern, t.DType.String(), t.Shape, t.Dim, t.Packed, ranges, t.LocalShape, t.Bytes, t.Replicas})
}

// Lookup returns the entry of the tensor with checkpoint name name (with the prefix).
func (m *Manifest) Lookup(name string) (TensorShard, bool) {
	if m.index != nil {
		i, ok := m.index[name]
		if !ok {
			return TensorShard{}, false
		}
		return m.Tensors[i], true
	}
	for _, t := range m.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return TensorShard{}, false
}

// NewManifest applies plan to the text tensors of cat for rank of a TP group of size tp. It checks, and
// reports together in one error (an Errors, each wrapping a sentinel), every problem it finds: unknown
// patterns (ErrNoMatch), splits that do not cut whole heads, experts, intermediate columns or vocabulary
// rows (ErrIndivisible), splits the model cannot run (ErrUnsupported), and q/k/v/o, MLP or expert
// tensors split in ways that do not fit each other (ErrInconsistent).
//
// Key/value heads: with num_key_value_heads >= tp they must divide by tp. With fewer kv heads than ranks
// they are replicated as vLLM does, which needs tp to be a multiple of num_key_value_heads: rank r reads kv
// head r / (tp / num_key_value_heads), the one its q heads use.
func NewManifest(cfg llama4.Config, cat Catalog, plan Plan, tp, rank int) (Manifest, error) {
	if tp < 1 || rank < 0 || rank >= tp {
		return Manifest{}, fmt.Errorf("%w: rank %d of tp %d: need tp >= 1 and 0 <= rank < tp", ErrRank, rank, tp)
	}
	a, err := analyze(cfg, cat, plan, tp)
	if err != nil {
		return Manifest{}, err
	}
	return a.manifest(rank), nil
}

// NewManifests returns the manifests of every rank of a TP group of size tp; see NewManifest.
func NewManifests(cfg llama4.Config, cat Catalog, plan Plan, tp int) ([]Manifest, error) {
	if tp < 1 {
		return nil, fmt.Errorf("%w: tp %d: need tp >= 1", ErrRank, tp)
	}
	a, err := analyze(cfg, cat, plan, tp)
	if err != nil {
		return nil, err
	}
	out := make([]Manifest, tp)
	for r := range out {
		out[r] = a.manifest(r)
	}
	return out, nil
}

// analysis is the rank-independent part of a manifest.
type analysis struct {
	tp      int
	pols    map[role]policy
	prefix  string
	tensors []planned
	unused  []Rule
}

// planned is a tensor with its split decided.
type planned struct {
	info     safetensors.TensorInfo
	rule     Rule // zero when no rule matched
	dim      int
	packed   bool
	unit     int // elements of dim per unit (head_dim for attention), for k/v head replication
	replicas int // > 1: k/v heads replicated on this many ranks
	role     role
	layer    string // "model.layers.N." for per-layer tensors, else ""
	bad      bool   // already reported
}

func analyze(cfg llama4.Config, cat Catalog, plan Plan, tp int) (*analysis, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("shard: %w", err)
	}
	a := &analysis{tp: tp, prefix: cfg.Prefix, pols: policies(cfg)}
	var errs errorSet

	var text, other [][]string // name components of text and of skipped tensors
	for _, name := range cat.Names() {
		if !isText(name, cfg.Prefix) {
			other = append(other, nameComponents(name))
			continue
		}
		info, err := cat.Info(name)
		if err != nil {
			return nil, fmt.Errorf("shard: %w", err)
		}
		a.tensors = append(a.tensors, planned{info: info})
		text = append(text, nameComponents(name))
	}
	if len(a.tensors) == 0 {
		return nil, fmt.Errorf("%w: the checkpoint has no text-model tensors (prefix %q)", ErrNoMatch, cfg.Prefix)
	}

	// Every rule must match something: a tensor or a module above one, of this checkpoint or of the Llama
	// 4 architecture (HF's plan names dense MLPs, which Scout does not have).
	assigned := make([]bool, plan.Len())
	for i := range a.tensors {
		t := &a.tensors[i]
		if k := plan.match(text[i]); k >= 0 {
			t.rule = plan.rules[k].Rule
			assigned[k] = true
		}
	}
	arch := architecture(cfg)
	for k, r := range plan.rules {
		if assigned[k] {
			continue
		}
		a.unused = append(a.unused, r.Rule)
		if anyWithin(r, text) || anyWithin(r, arch) || anyWithin(r, other) ||
			r.comps[0] == "vision_model" || r.comps[0] == "multi_modal_projector" {
			continue
		}
		errs.add(fmt.Errorf("%w %q (style %s)", ErrNoMatch, r.Pattern, r.Style))
	}

	for i := range a.tensors {
		a.decide(&a.tensors[i], &errs)
	}
	a.checkGroups(&errs)
	if err := errs.err(); err != nil {
		return nil, err
	}
	return a, nil
}

// architecture lists the text tensors a Llama 4 checkpoint may have, dense and MoE variants of every layer,
// as name components.
func architecture(cfg llama4.Config) [][]string {
	perLayer := []string{
		"input_layernorm.weight", "post_attention_layernorm.weight",
		"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
		"feed_forward.router.weight", "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj",
		"feed_forward.shared_expert.gate_proj.weight", "feed_forward.shared_expert.up_proj.weight",
		"feed_forward.shared_expert.down_proj.weight",
		"feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight",
	}
	out := [][]string{
		nameComponents("model.embed_tokens.weight"), nameComponents("model.norm.weight"), nameComponents("lm_head.weight"),
	}
	for i := range cfg.NumLayers {
		for _, n := range perLayer {
			out = append(out, nameComponents(fmt.Sprintf("model.layers.%d.%s", i, n)))
		}
	}
	return out
}

func anyWithin(r compiledRule, paths [][]string) bool {
	for _, p := range paths {
		if r.matchesWithin(p) {
			return true
		}
	}
	return false
}

// isText reports whether a checkpoint key belongs to the text model.
func isText(name, prefix string) bool {
	if !strings.HasPrefix(name, prefix) {
		return false
	}
	return !strings.HasPrefix(name, "vision_model.") && !strings.HasPrefix(name, "multi_modal_projector.")
}

// decide sets t's split dimension and checks it against the model and the config.
func (a *analysis) decide(t *planned, errs *errorSet) {
	rel := strings.Split(strings.TrimPrefix(t.info.Name, a.prefix), ".")
	if len(rel) > 0 && rel[0] == "model" {
		rel = rel[1:]
	}
	t.role = classify(rel)
	if len(rel) > 2 && rel[0] == "layers" {
		t.layer = "model.layers." + rel[1] + "."
	}
	t.dim, t.packed, t.unit, t.replicas = -1, false, 1, 1
	if t.rule.Style == "" {
		return
	}
	t.dim, t.packed = t.rule.Style.dim(len(t.info.Shape), t.role == roleEmbed)
	if t.dim < 0 {
		return
	}
	fail := func(sentinel error, format string, args ...any) {
		t.bad = true
		errs.add(&TensorError{
			Tensor: generic(t.info.Name), Style: t.rule.Style, Pattern: t.rule.Pattern,
			Reason: fmt.Sprintf(format, args...), Err: sentinel,
		})
	}
	shape, size := t.info.Shape, t.info.Shape[t.dim]
	how := "evenly"
	if t.packed {
		how = "packed (each half)"
	}
	pol, known := a.pols[t.role]
	var u units
	if known {
		var ok bool
		if u, ok = pol.dims[t.dim]; !ok {
			fail(ErrUnsupported, "splits dim %d of %v, but the model takes %s %s", t.dim, shape, t.role, pol.takes)
			return
		}
		if u.packed != t.packed {
			if u.packed {
				fail(ErrUnsupported, "splits dim %d of %v plainly, which would give the first ranks only gate columns and the last only up columns; use packed_rowwise, which takes the matching slice of both halves", t.dim, shape)
			} else {
				fail(ErrUnsupported, "splits dim %d of %v packed, but %s does not pack two halves on it", t.dim, shape, t.role)
			}
			return
		}
		want := u.count * u.size
		if u.packed {
			want *= 2
		}
		if size != want {
			fail(ErrInconsistent, "dim %d has %d entries, but the config gives %d %s of %d", t.dim, size, u.count, u.what, u.size)
			return
		}
	} else {
		u = units{count: size, size: 1, what: fmt.Sprintf("entries of dim %d", t.dim)}
		if t.packed {
			if size%2 != 0 {
				fail(ErrUnsupported, "splits dim %d of %v packed, but its size is odd", t.dim, shape)
				return
			}
			u.count = size / 2
			u.what += " per half"
		}
	}
	t.unit = u.size
	if u.count%a.tp == 0 {
		return
	}
	if t.role == roleK || t.role == roleV {
		if u.count < a.tp && a.tp%u.count == 0 {
			t.replicas = a.tp / u.count // vLLM's kv-head replication
			return
		}
		fail(ErrIndivisible, "%d %s cannot be split over tp=%d: tp must divide num_key_value_heads, or be a multiple of it (each kv head is then replicated on tp/num_key_value_heads ranks)", u.count, u.what, a.tp)
		return
	}
	fail(ErrIndivisible, "%d %s cannot be split %s over tp=%d", u.count, u.what, how, a.tp)
}

// checkGroups checks, per layer, that tensors used together are split in ways that fit: the model requires
// q/k/v colwise exactly when o_proj is rowwise, MLP gate/up colwise exactly when down is rowwise, and the
// routed experts either whole, packed gate_up with down on dim 1, or both by expert.
func (a *analysis) checkGroups(errs *errorSet) {
	type group struct {
		layer, module string
		members       map[role]*planned
	}
	groups := map[string]*group{}
	var order []string
	for i := range a.tensors {
		t := &a.tensors[i]
		mod := t.role.module()
		if t.layer == "" || mod == "" {
			continue
		}
		key := t.layer + mod
		g, ok := groups[key]
		if !ok {
			g = &group{layer: t.layer, module: mod, members: map[role]*planned{}}
			groups[key] = g
			order = append(order, key)
		}
		g.members[t.role] = t
	}
	for _, key := range order {
		g := groups[key]
		bad := false
		for _, t := range g.members {
			bad = bad || t.bad
		}
		if bad {
			continue
		}
		var roles []role
		var rule string
		switch g.module {
		case "self_attn":
			roles = []role{roleQ, roleK, roleV, roleO}
			rule = "q/k/v must be split colwise (by heads) exactly when o_proj is split rowwise"
		case "feed_forward", "feed_forward.shared_expert":
			roles = []role{roleMLPGate, roleMLPUp, roleMLPDown}
			if g.module != "feed_forward" {
				roles = []role{roleSharedGate, roleSharedUp, roleSharedDown}
			}
			rule = "gate_proj and up_proj must be split colwise exactly when down_proj is split rowwise"
		case "feed_forward.experts":
			roles = []role{roleExpertsGateUp, roleExpertsDown}
			rule = "split gate_up_proj packed on dim 2 (packed_rowwise) with down_proj on dim 1 (colwise), or both by expert on dim 0 (grouped_gemm), or neither"
		}
		var present []*planned
		for _, r := range roles {
			if t := g.members[r]; t != nil {
				present = append(present, t)
			}
		}
		if consistent(g.module, present) {
			continue
		}
		parts := make([]string, len(present))
		for i, t := range present {
			parts[i] = describe(t)
		}
		errs.add(&TensorError{
			Tensor: generic(a.prefix + g.layer + g.module),
			Reason: strings.Join(parts, ", ") + ": " + rule,
			Err:    ErrInconsistent,
		})
	}
}

func consistent(module string, ts []*planned) bool {
	if module == "feed_forward.experts" {
		dims := map[role]int{roleExpertsGateUp: -1, roleExpertsDown: -1}
		for _, t := range ts {
			dims[t.role] = t.dim
		}
		gu, dn := dims[roleExpertsGateUp], dims[roleExpertsDown]
		return gu == dn && (gu == -1 || gu == 0) || gu == 2 && dn == 1
	}
	for _, t := range ts[1:] {
		if (t.dim >= 0) != (ts[0].dim >= 0) {
			return false
		}
	}
	return true
}

func describe(t *planned) string {
	name := strings.TrimSuffix(t.info.Name, ".weight")
	name = name[strings.LastIndex(name, ".")+1:]
	if t.dim < 0 {
		if t.rule.Style == "" {
			return name + " whole (no rule)"
		}
		return fmt.Sprintf("%s whole (%s)", name, t.rule.Style)
	}
	return fmt.Sprintf("%s split on dim %d (%s)", name, t.dim, t.rule.Style)
}

// manifest computes rank's part of every tensor.
func (a *analysis) manifest(rank int) Manifest {
	m := Manifest{TP: a.tp, Rank: rank, Prefix: a.prefix, Unused: a.unused, index: make(map[string]int, len(a.tensors))}
	for _, t := range a.tensors {
		s := TensorShard{
			Name: t.info.Name, Style: t.rule.Style, Pattern: t.rule.Pattern, DType: t.info.DType,
			Shape: t.info.Shape, Dim: t.dim, Packed: t.packed, Replicas: 1,
			LocalShape: append([]int(nil), t.info.Shape...), Layout: llama4.Replicated,
		}
		full := t.info.NumBytes()
		m.FullBytes += full
		if t.dim < 0 {
			s.Replicas = a.tp
			s.Bytes = full
			m.ReplicatedBytes += full
		} else {
			n := t.info.Shape[t.dim]
			switch {
			case t.replicas > 1:
				h := rank / t.replicas
				s.Ranges = []safetensors.Range{{Start: h * t.unit, End: (h + 1) * t.unit}}
				s.Replicas = t.replicas
			case t.packed:
				half, c := n/2, n/2/a.tp
				s.Ranges = []safetensors.Range{{Start: rank * c, End: (rank + 1) * c}, {Start: half + rank*c, End: half + (rank+1)*c}}
			default:
				c := n / a.tp
				s.Ranges = []safetensors.Range{{Start: rank * c, End: (rank + 1) * c}}
			}
			local := 0
			for _, r := range s.Ranges {
				local += r.End - r.Start
			}
			s.LocalShape[t.dim] = local
			s.Bytes = int64(t.info.DType.Size())
			for _, d := range s.LocalShape {
				s.Bytes *= int64(d)
			}
			s.Layout = llama4.Layout{Dim: t.dim, Part: rank, Parts: a.tp}
			m.SplitBytes += s.Bytes
		}
		m.Bytes += s.Bytes
		m.index[s.Name] = len(m.Tensors)
		m.Tensors = append(m.Tensors, s)
	}
	return m
}
