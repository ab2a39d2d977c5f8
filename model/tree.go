package model

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
)

// ErrTree means a tensor tree's tags are malformed: a programming error in a model family, reported with
// the field and the tag.
var ErrTree = errors.New("model: malformed tensor tree")

// Tree is a model family's tensor declaration for one configuration: a tree of structs whose fields name
// the checkpoint's tensors in struct tags, and the sizes and conditions the tags refer to.
//
// The tag vocabulary, on fields of type Weight[T] (leaves: one tensor each):
//
//	tensor:"query.weight"       the name, appended to the enclosing path with a dot
//	shape:"heads,hidden"        the shape: one named dimension (a key of Dims, or an alias) per entry,
//	                            each Count·Size long; "2*name" is a dimension packing two halves
//	split:"0=colwise,2=packed_rowwise@experts"
//	                            the dimensions a rank may take a slice of, in units of the shape's entry
//	                            there; "=style" names the plan style that gives the split (for messages),
//	                            "@mode" its group mode (see Split.Mode); no split tag: only whole
//	kind:"embedding"            the Kind ("embedding", "experts")
//	group:"."  group:"experts"  the tensor's group: the enclosing path, or a name under it
//	rule:"q/k/v must be …"      the group's rule in words (on any one member)
//	whole:"to route every token" why an unsplittable tensor must stay whole (for messages)
//	if:"untied"                 present only where Conds["untied"] holds (optional tensors)
//	quant:"1"                   a weight that may be held quantised, with dimension 1 its input
//	                            (reduction) dimension
//	experts:"experts.{e}.gate_proj.weight|experts.{e}.up_proj.weight"
//	                            (kind experts) the per-expert storage form: the names, under the
//	                            enclosing path, of each expert's parts along the last dimension, stored
//	                            as nn.Linear [out, in] (see TensorSpec.PerExpert)
//
// and on fields of struct, *struct or []struct type (subtrees):
//
//	tensor:"self_attn"          the path component the subtree's names go under
//	len:"layers"                (slices) the number of elements: Dims["layers"].Count; each element's
//	                            path gets its index ("model.layers.3")
//	if:"moe"                    (pointers) present only where Conds["moe"](index) holds, index being the
//	                            innermost slice index (the layer)
//	dims:"inter=intermediate_mlp" aliases the subtree's shape entries resolve first
//
// Fields without a tensor tag are not part of the declaration.
type Tree struct {
	// Root is a pointer to the family's tree struct; Load fills it.
	Root any
	// Dims are the named dimensions shape and len tags refer to.
	Dims map[string]Unit
	// Conds are the conditions if tags refer to, called with the innermost slice index (-1 outside any).
	Conds map[string]func(index int) bool
}

// Weight is a leaf of a tensor tree: one tensor as the runtime holds it (T, a backend tensor) and how it
// was cut for this rank. Present is false for an optional tensor the configuration does not have.
type Weight[T any] struct {
	T       T
	Layout  Layout
	Present bool
}

func (w *Weight[T]) set(v any, l Layout) {
	w.T, w.Layout, w.Present = v.(T), l, true
}

type leaf interface{ set(any, Layout) }

var leafType = reflect.TypeFor[leaf]()

// Weights gives a model this rank's slice of each tensor, by its name without the key prefix, loaded into
// the runtime's tensor type T. The implementation decides the slicing (a shard manifest) and says it in the
// Layout. Load may block on I/O; ctx bounds it.
type Weights[T any] interface {
	Load(ctx context.Context, name string) (T, Layout, error)
}

// Tensors lists the tensors the configuration has, in declaration order.
func (t Tree) Tensors() ([]TensorSpec, error) {
	var out []TensorSpec
	err := t.walk(false, func(s TensorSpec, _ reflect.Value) error {
		out = append(out, s)
		return nil
	})
	return out, err
}

// Declared lists every tensor the family may have at this size, whatever the conditions: the dense and
// the MoE variant of every layer, optional tensors included. Plans may name any of them.
func (t Tree) Declared() ([]TensorSpec, error) {
	var out []TensorSpec
	err := t.walk(true, func(s TensorSpec, _ reflect.Value) error {
		out = append(out, s)
		return nil
	})
	return out, err
}

// Load fills t.Root from w, tensor by tensor in declaration order. It uses reflection; the filled tree is
// plain fields, so a model built from it runs without any.
func Load[T any](ctx context.Context, t Tree, w Weights[T]) error {
	return t.walk(false, func(s TensorSpec, field reflect.Value) error {
		if field.Type() != reflect.TypeFor[Weight[T]]() {
			return fmt.Errorf("%w: %s is a %s, want %s", ErrTree, s.Name, field.Type(), reflect.TypeFor[Weight[T]]())
		}
		v, lay, err := w.Load(ctx, s.Name)
		if err != nil {
			return fmt.Errorf("load %s: %w", s.Name, err)
		}
		field.Addr().Interface().(leaf).set(v, lay)
		return nil
	})
}

type walker struct {
	t     Tree
	all   bool
	visit func(TensorSpec, reflect.Value) error
}

func (t Tree) walk(all bool, visit func(TensorSpec, reflect.Value) error) error {
	v := reflect.ValueOf(t.Root)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("%w: Root is a %T, want a pointer to a struct", ErrTree, t.Root)
	}
	w := walker{t: t, all: all, visit: visit}
	return w.structure(v.Elem(), "", -1, nil)
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func (w *walker) structure(v reflect.Value, path string, index int, aliases map[string]string) error {
	typ := v.Type()
	rules := map[string]string{}
	for i := range typ.NumField() {
		if f := typ.Field(i); f.Tag.Get("rule") != "" {
			rules[f.Tag.Get("group")] = f.Tag.Get("rule")
		}
	}
	for i := range typ.NumField() {
		f := typ.Field(i)
		name, ok := f.Tag.Lookup("tensor")
		if !ok {
			continue
		}
		fv := v.Field(i)
		where := typ.String() + "." + f.Name
		if c := f.Tag.Get("if"); c != "" && !w.all {
			cond, ok := w.t.Conds[c]
			if !ok {
				return fmt.Errorf("%w: %s: condition %q is not in Conds", ErrTree, where, c)
			}
			if !cond(index) {
				continue
			}
		}
		sub := aliases
		if d := f.Tag.Get("dims"); d != "" {
			sub = make(map[string]string, len(aliases)+1)
			for k, v := range aliases {
				sub[k] = v
			}
			for _, kv := range strings.Split(d, ",") {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("%w: %s: dims entry %q is not alias=dim", ErrTree, where, kv)
				}
				sub[k] = v
			}
		}
		p := join(path, name)
		switch {
		case reflect.PointerTo(f.Type).Implements(leafType):
			s, err := w.spec(f, p, path, rules[f.Tag.Get("group")], aliases)
			if err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			if err := w.visit(s, fv); err != nil {
				return err
			}
		case f.Type.Kind() == reflect.Struct:
			if err := w.structure(fv, p, index, sub); err != nil {
				return err
			}
		case f.Type.Kind() == reflect.Pointer && f.Type.Elem().Kind() == reflect.Struct:
			if fv.IsNil() {
				fv.Set(reflect.New(f.Type.Elem()))
			}
			if err := w.structure(fv.Elem(), p, index, sub); err != nil {
				return err
			}
		case f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct:
			u, ok := w.t.Dims[f.Tag.Get("len")]
			if !ok {
				return fmt.Errorf("%w: %s: len %q is not in Dims", ErrTree, where, f.Tag.Get("len"))
			}
			if fv.Len() != u.Count {
				fv.Set(reflect.MakeSlice(f.Type, u.Count, u.Count))
			}
			for j := range u.Count {
				if err := w.structure(fv.Index(j), join(p, strconv.Itoa(j)), j, sub); err != nil {
					return err
				}
			}
		default:
			return fmt.Errorf("%w: %s: a tensor tag on a %s (want Weight, struct, *struct or []struct)", ErrTree, where, f.Type)
		}
	}
	return nil
}

func (w *walker) unit(name string, aliases map[string]string) (Unit, bool) {
	u, ok := w.t.Dims[w.unitName(name, aliases)]
	return u, ok
}

// unitName is the Dims key a shape entry names, aliases resolved.
func (w *walker) unitName(name string, aliases map[string]string) string {
	if a, ok := aliases[name]; ok {
		return a
	}
	return name
}

// spec builds a leaf's TensorSpec from its tags.
func (w *walker) spec(f reflect.StructField, name, parent, rule string, aliases map[string]string) (TensorSpec, error) {
	s := TensorSpec{Name: name, Kind: Kind(f.Tag.Get("kind")), Whole: f.Tag.Get("whole")}
	switch s.Kind {
	case KindPlain, KindEmbedding, KindExperts:
	default:
		return s, fmt.Errorf("%w: unknown kind %q", ErrTree, s.Kind)
	}
	var units []Unit
	var packed []bool
	for _, d := range strings.Split(f.Tag.Get("shape"), ",") {
		d = strings.TrimSpace(d)
		halves := strings.HasPrefix(d, "2*")
		u, ok := w.unit(strings.TrimPrefix(d, "2*"), aliases)
		if !ok {
			return s, fmt.Errorf("%w: shape entry %q is not in Dims", ErrTree, d)
		}
		n := u.Count * u.Size
		if halves {
			n *= 2
		}
		s.Shape = append(s.Shape, n)
		s.Dims = append(s.Dims, w.unitName(strings.TrimPrefix(d, "2*"), aliases))
		units, packed = append(units, u), append(packed, halves)
	}
	if sp := f.Tag.Get("split"); sp != "" {
		for _, e := range strings.Split(sp, ",") {
			e, mode, _ := strings.Cut(strings.TrimSpace(e), "@")
			d, style, _ := strings.Cut(e, "=")
			dim, err := strconv.Atoi(d)
			if err != nil || dim < 0 || dim >= len(s.Shape) {
				return s, fmt.Errorf("%w: split entry %q is not a dimension of %v", ErrTree, e, s.Shape)
			}
			s.Splits = append(s.Splits, Split{Dim: dim, Unit: units[dim], Packed: packed[dim], Style: style, Mode: mode})
		}
	}
	if q, ok := f.Tag.Lookup("quant"); ok {
		d, err := strconv.Atoi(q)
		if err != nil || d < 0 || d >= len(s.Shape) {
			return s, fmt.Errorf("%w: quant %q is not a dimension of %v", ErrTree, q, s.Shape)
		}
		s.Quantizable, s.InputDim = true, d
	}
	if pe := f.Tag.Get("experts"); pe != "" {
		if s.Kind != KindExperts || len(s.Shape) != 3 {
			return s, fmt.Errorf("%w: experts tag on a %q tensor of %v (want stacked experts)", ErrTree, s.Kind, s.Shape)
		}
		for _, p := range strings.Split(pe, "|") {
			if !strings.Contains(p, "{e}") {
				return s, fmt.Errorf("%w: experts name %q has no {e}", ErrTree, p)
			}
			s.PerExpert = append(s.PerExpert, join(parent, p))
		}
		if s.Shape[2]%len(s.PerExpert) != 0 {
			return s, fmt.Errorf("%w: %d per-expert parts do not divide dim 2 of %v", ErrTree, len(s.PerExpert), s.Shape)
		}
	}
	switch g := f.Tag.Get("group"); g {
	case "":
	case ".":
		s.Group, s.GroupRule = parent, rule
	default:
		s.Group, s.GroupRule = join(parent, g), rule
	}
	return s, nil
}
