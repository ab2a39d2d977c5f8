package shard

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Catalog lists a checkpoint's tensors. *safetensors.Checkpoint implements it.
type Catalog interface {
	Names() []string
	Info(name string) (safetensors.TensorInfo, error)
}

var _ Catalog = (*safetensors.Checkpoint)(nil)

// Manifest is what one rank of a TP group loads: every tensor of the model, how the plan splits it, and
// the part this rank reads. Tensors of other parts of the checkpoint (model.Info.Foreign: a vision tower,
// a projector) are not part of it.
type Manifest struct {
	TP   int `json:"tp"`
	Rank int `json:"rank"`
	// Prefix is the model's key prefix in the checkpoint (model.Info.Prefix): the model asks for names
	// without it.
	Prefix  string        `json:"prefix,omitempty"`
	Tensors []TensorShard `json:"tensors"` // in checkpoint name order
	// Unused are the plan's rules that decide no tensor's split: module styles on modules above the
	// tensors or on a module whose parameters a more specific rule claims, rules for tensors the model
	// declares but this checkpoint lacks (dense MLPs in an all-MoE model), and rules for the checkpoint's
	// foreign parts (a vision tower).
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
	Layout model.Layout
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

// BytesOf returns the bytes this rank reads of the tensor the model calls name (without the prefix), 0
// for a tensor outside the manifest.
func (m *Manifest) BytesOf(name string) int64 {
	s, _ := m.Lookup(m.Prefix + name)
	return s.Bytes
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

// NewManifest applies plan to the model's tensors in cat for rank of a TP group of size tp. It checks, and
// reports together in one error (an Errors, each wrapping a sentinel), every problem it finds: unknown
// patterns (ErrNoMatch), splits that do not cut whole units of the model's TensorSpec (heads, experts,
// intermediate columns, vocabulary rows: ErrIndivisible), splits the model cannot run (ErrUnsupported), and
// tensors of one group split in ways that do not fit each other (ErrInconsistent).
//
// Replicable units (key/value heads): with at least tp of them they must divide by tp. With fewer units
// than ranks they are replicated as vLLM does, which needs tp to be a multiple of their count: rank r reads
// unit r / (tp / count), the one its other slices use.
func NewManifest(cfg model.Config, cat Catalog, plan Plan, tp, rank int) (Manifest, error) {
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
func NewManifests(cfg model.Config, cat Catalog, plan Plan, tp int) ([]Manifest, error) {
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
	specs   map[string]model.TensorSpec // every tensor the model declares, by name without the prefix
	declIdx map[string]int              // declaration order of specs
	prefix  string
	tensors []planned
	unused  []Rule
	order   *unitOrder // the plan's permutation of a unit (Plan.WithOrder); nil: none
}

// planned is a tensor with its split decided.
type planned struct {
	info     safetensors.TensorInfo
	rule     Rule // zero when no rule matched
	dim      int
	packed   bool
	unit     int // elements of dim per unit (head_dim for attention), for k/v head replication
	replicas int // > 1: units (k/v heads) replicated on this many ranks
	spec     model.TensorSpec
	known    bool   // the model declares the tensor (spec is set)
	mode     string // the split's group mode (model.Split.Mode)
	bad      bool   // already reported
}

func analyze(cfg model.Config, cat Catalog, plan Plan, tp int) (*analysis, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("shard: %w", err)
	}
	info := cfg.Info()
	declared, err := cfg.Tree().Declared()
	if err != nil {
		return nil, fmt.Errorf("shard: %w", err)
	}
	a := &analysis{tp: tp, prefix: info.Prefix, specs: make(map[string]model.TensorSpec, len(declared)), declIdx: make(map[string]int, len(declared))}
	arch := make([][]string, len(declared))
	for i, s := range declared {
		a.specs[s.Name], a.declIdx[s.Name] = s, i
		arch[i] = nameComponents(s.Name)
	}
	var errs errorSet

	var text, other [][]string // name components of the model's and of skipped tensors
	for _, name := range cat.Names() {
		if !isText(name, info) {
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
		return nil, fmt.Errorf("%w: the checkpoint has no text-model tensors (prefix %q)", ErrNoMatch, info.Prefix)
	}

	// Every rule must match something: a tensor or a module above one, of this checkpoint or of every
	// tensor the model declares (HF's Llama 4 plan names dense MLPs, which Scout does not have).
	assigned := make([]bool, plan.Len())
	for i := range a.tensors {
		t := &a.tensors[i]
		if k := plan.match(text[i]); k >= 0 {
			t.rule = plan.rules[k].Rule
			assigned[k] = true
		}
	}
	for k, r := range plan.rules {
		if assigned[k] {
			continue
		}
		a.unused = append(a.unused, r.Rule)
		if anyWithin(r, text) || anyWithin(r, arch) || anyWithin(r, other) || foreign(r.Pattern, info) {
			continue
		}
		errs.add(fmt.Errorf("%w %q (style %s)", ErrNoMatch, r.Pattern, r.Style))
	}

	for i := range a.tensors {
		a.decide(&a.tensors[i], &errs)
	}
	a.checkGroups(&errs)
	a.order = plan.order
	a.checkOrder(&errs)
	if err := errs.err(); err != nil {
		return nil, err
	}
	return a, nil
}

func anyWithin(r compiledRule, paths [][]string) bool {
	for _, p := range paths {
		if r.matchesWithin(p) {
			return true
		}
	}
	return false
}

// isText reports whether a checkpoint key belongs to the model (the text model of a multimodal checkpoint).
func isText(name string, info model.Info) bool {
	return strings.HasPrefix(name, info.Prefix) && !foreign(name, info)
}

// foreign reports whether a checkpoint key or plan pattern belongs to another part of the checkpoint.
func foreign(name string, info model.Info) bool {
	for _, f := range info.Foreign {
		if strings.HasPrefix(name, f) {
			return true
		}
	}
	return false
}

// decide sets t's split dimension and checks it against the model's TensorSpec and the config.
func (a *analysis) decide(t *planned, errs *errorSet) {
	t.spec, t.known = a.specs[strings.TrimPrefix(t.info.Name, a.prefix)]
	t.dim, t.packed, t.unit, t.replicas = -1, false, 1, 1
	if t.rule.Style == "" {
		return
	}
	t.dim, t.packed = t.rule.Style.dim(len(t.info.Shape), t.known && t.spec.Kind == model.KindEmbedding)
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
	var u model.Unit
	if t.known {
		sp, ok := t.spec.SplitOn(t.dim)
		if !ok {
			fail(ErrUnsupported, "splits dim %d of %v, but the model takes %s %s", t.dim, shape, t.spec.Role(), t.spec.Takes())
			return
		}
		if sp.Packed != t.packed {
			if sp.Packed {
				fail(ErrUnsupported, "splits dim %d of %v plainly, which would give the first ranks only the first half's columns and the last only the second's (gate and up); use packed_rowwise, which takes the matching slice of both halves", t.dim, shape)
			} else {
				fail(ErrUnsupported, "splits dim %d of %v packed, but %s does not pack two halves on it", t.dim, shape, t.spec.Role())
			}
			return
		}
		u, t.mode = sp.Unit, sp.Mode
		want := u.Count * u.Size
		if sp.Packed {
			want *= 2
		}
		if size != want {
			fail(ErrInconsistent, "dim %d has %d entries, but the config gives %d %s of %d", t.dim, size, u.Count, u.What, u.Size)
			return
		}
	} else {
		u = model.Unit{Count: size, Size: 1, What: fmt.Sprintf("entries of dim %d", t.dim)}
		if t.packed {
			if size%2 != 0 {
				fail(ErrUnsupported, "splits dim %d of %v packed, but its size is odd", t.dim, shape)
				return
			}
			u.Count = size / 2
			u.What += " per half"
		}
	}
	t.unit = u.Size
	if u.Count%a.tp == 0 {
		return
	}
	if u.Replicable {
		if u.Count < a.tp && a.tp%u.Count == 0 {
			t.replicas = a.tp / u.Count // vLLM's kv-head replication
			return
		}
		fail(ErrIndivisible, "%d %s cannot be split over tp=%d: tp must divide their number, or be a multiple of it (each is then replicated on tp/%d ranks)", u.Count, u.What, a.tp, u.Count)
		return
	}
	fail(ErrIndivisible, "%d %s cannot be split %s over tp=%d", u.Count, u.What, how, a.tp)
}

// checkGroups checks that tensors of one group (model.TensorSpec.Group: a layer's attention, MLP or
// experts) are split in ways that fit: all whole, or all split in the same mode. The model declares the
// groups and their modes with its tensors (model.TensorSpec.Group, model.Split.Mode).
func (a *analysis) checkGroups(errs *errorSet) {
	groups := map[string][]*planned{}
	var order []string
	for i := range a.tensors {
		t := &a.tensors[i]
		if !t.known || t.spec.Group == "" {
			continue
		}
		g := t.spec.Group
		if _, ok := groups[g]; !ok {
			order = append(order, g)
		}
		groups[g] = append(groups[g], t)
	}
	for _, g := range order {
		members := groups[g]
		bad := false
		for _, t := range members {
			bad = bad || t.bad
		}
		if bad || consistent(members) {
			continue
		}
		sort.SliceStable(members, func(i, j int) bool { return a.declIdx[members[i].spec.Name] < a.declIdx[members[j].spec.Name] })
		parts := make([]string, len(members))
		rule := ""
		for i, t := range members {
			parts[i] = describe(t)
			if t.spec.GroupRule != "" {
				rule = t.spec.GroupRule
			}
		}
		if rule == "" {
			rule = "split all of them, in the same way, or none"
		}
		errs.add(&TensorError{
			Tensor: generic(a.prefix + g),
			Reason: strings.Join(parts, ", ") + ": " + rule,
			Err:    ErrInconsistent,
		})
	}
}

// consistent reports whether a group's tensors are all whole or all split in one mode.
func consistent(ts []*planned) bool {
	for _, t := range ts[1:] {
		if (t.dim >= 0) != (ts[0].dim >= 0) || t.dim >= 0 && t.mode != ts[0].mode {
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
			LocalShape: append([]int(nil), t.info.Shape...), Layout: model.Replicated,
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
				if d, ord, ok := a.orderOf(t); ok && d == t.dim {
					n = len(ord) // slots, replicas included
				}
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
			s.Layout = model.Layout{Dim: t.dim, Part: rank, Parts: a.tp}
			m.SplitBytes += s.Bytes
		}
		a.permute(&s, t)
		m.Bytes += s.Bytes
		m.index[s.Name] = len(m.Tensors)
		m.Tensors = append(m.Tensors, s)
	}
	return m
}
