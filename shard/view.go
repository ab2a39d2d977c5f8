package shard

import (
	"fmt"
	"slices"
	"strings"

	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Source is a checkpoint to read: its catalog and its bytes. *safetensors.Checkpoint implements it.
type Source interface {
	Catalog
	Reader
}

// ScaleReader reads the float32 scales of a quantised tensor: those of the index ranges along dim that a
// rank reads of the weight (dim < 0: the whole tensor), in the weight's quant.Weight.ScaleShape order.
// *View implements it.
type ScaleReader interface {
	ReadScales(name string, dim int, ranges ...safetensors.Range) ([]float32, []int, error)
}

// View is a checkpoint as the model declares it, whatever its storage form (spec §3.3–3.4): stacked
// experts stored per expert (compressed-tensors FP8 checkpoints: "experts.{e}.gate_proj.weight", …) appear
// under their declared stacked name and shape, input-major, assembled from range reads of the per-expert
// tensors; quantised weights (F8_E4M3) keep their dtype and answer ReadScales from their scale tensors,
// which, like the per-expert tensors, are not listed. A plan, a manifest and a RankReader work on a View as
// on the checkpoint itself, so every split (packed halves, the intermediate dim, whole experts) takes the
// matching scales. For a plain bf16 checkpoint a View changes nothing.
type View struct {
	src    Source
	scheme *quant.Scheme
	prefix string
	suffix string
	names  []string
	specs  map[string]model.TensorSpec // by full name
	exps   map[string]*stacked         // by full stacked name
	scales map[string]string           // quantised plain tensor → its scale tensor
}

// stacked is a stacked-experts tensor assembled from its per-expert storage form.
type stacked struct {
	spec  model.TensorSpec
	dtype safetensors.DType
	parts [][]string // [part][expert] full names
}

var (
	_ Source      = (*View)(nil)
	_ ScaleReader = (*View)(nil)
)

// NewView checks src against cfg's declaration and its quantization_config (model.Info.Quantization) and
// returns the model's view of it. A malformed pre-quantised checkpoint is one line of error wrapping
// ErrInconsistent or quant.ErrUnsupportedScheme: an unsupported scheme, a missing or misshapen scale, a
// quantised tensor the model cannot hold quantised or the config's ignore list names, a missing expert.
func NewView(cfg model.Config, src Source) (*View, error) {
	info := cfg.Info()
	v := &View{src: src, prefix: info.Prefix, suffix: info.ScaleSuffix, specs: map[string]model.TensorSpec{},
		exps: map[string]*stacked{}, scales: map[string]string{}}
	var err error
	if v.scheme, err = quant.ParseCompressedTensors([]byte(info.Quantization)); err != nil {
		return nil, err
	}
	declared, err := cfg.Tree().Declared()
	if err != nil {
		return nil, fmt.Errorf("shard: %w", err)
	}
	hidden := map[string]bool{}
	for _, s := range declared {
		full := v.prefix + s.Name
		v.specs[full] = s
		if len(s.PerExpert) == 0 || has(src, full) || !has(src, v.prefix+s.ExpertName(0, 0)) {
			continue
		}
		st, err := v.stack(s, hidden)
		if err != nil {
			return nil, err
		}
		v.exps[full] = st
	}
	for _, name := range src.Names() {
		if hidden[name] {
			continue
		}
		info, err := src.Info(name)
		if err != nil {
			return nil, fmt.Errorf("shard: %w", err)
		}
		if info.DType == safetensors.F8_E4M3 {
			s, ok := v.specs[name]
			if err := v.checkQuantised(name, s, ok); err != nil {
				return nil, err
			}
			scale := name + v.suffix
			want := slices.Clone(info.Shape)
			want[s.InputDim] = 1
			if err := checkScale(src, name, scale, want); err != nil {
				return nil, err
			}
			v.scales[name], hidden[scale] = scale, true
		}
	}
	for _, name := range src.Names() {
		if !hidden[name] {
			v.names = append(v.names, name)
		}
	}
	for name := range v.exps {
		v.names = append(v.names, name)
	}
	slices.Sort(v.names)
	return v, nil
}

func has(c Catalog, name string) bool {
	_, err := c.Info(name)
	return err == nil
}

// checkQuantised checks that a quantised tensor is one the model may hold quantised and that the
// checkpoint's config says how.
func (v *View) checkQuantised(name string, s model.TensorSpec, known bool) error {
	switch {
	case v.scheme == nil:
		return fmt.Errorf("%w: %s is F8_E4M3 but config.json has no quantization_config", ErrInconsistent, name)
	case known && !s.Quantizable:
		return fmt.Errorf("%w: %s is F8_E4M3, but the model holds %s only in bf16", ErrInconsistent, name, s.Role())
	case v.scheme.Ignored(strings.TrimSuffix(name, ".weight")):
		return fmt.Errorf("%w: %s is F8_E4M3, but quantization_config.ignore lists it (want bf16)", ErrInconsistent, name)
	}
	return nil
}

// checkScale checks that scale exists with shape want and a float dtype.
func checkScale(src Catalog, weight, scale string, want []int) error {
	si, err := src.Info(scale)
	if err != nil {
		return fmt.Errorf("%w: %s is F8_E4M3 without its scale %s", ErrInconsistent, weight, scale)
	}
	switch si.DType {
	case safetensors.F32, safetensors.BF16, safetensors.F16:
	default:
		return fmt.Errorf("%w: %s is %s, want F32, BF16 or F16", ErrInconsistent, scale, si.DType)
	}
	if !slices.Equal(si.Shape, want) {
		return fmt.Errorf("%w: %s has shape %v, want %v (one scale per output row)", ErrInconsistent, scale, si.Shape, want)
	}
	return nil
}

// stack checks the per-expert tensors of s and marks them (and their scales) hidden.
func (v *View) stack(s model.TensorSpec, hidden map[string]bool) (*stacked, error) {
	E, in, out := s.Shape[0], s.Shape[1], s.Shape[2]
	P := out / len(s.PerExpert)
	st := &stacked{spec: s, parts: make([][]string, len(s.PerExpert))}
	for p := range s.PerExpert {
		for e := range E {
			name := v.prefix + s.ExpertName(p, e)
			info, err := v.src.Info(name)
			if err != nil {
				return nil, fmt.Errorf("%w: %s is stored per expert, but %s is missing", ErrInconsistent, v.prefix+s.Name, name)
			}
			if !slices.Equal(info.Shape, []int{P, in}) {
				return nil, fmt.Errorf("%w: %s has shape %v, want %v", ErrInconsistent, name, info.Shape, []int{P, in})
			}
			if p == 0 && e == 0 {
				st.dtype = info.DType
			} else if info.DType != st.dtype {
				return nil, fmt.Errorf("%w: %s is %s, but %s is %s", ErrInconsistent, name, info.DType, st.parts[0][0], st.dtype)
			}
			if info.DType == safetensors.F8_E4M3 {
				if err := v.checkQuantised(name, s, true); err != nil {
					return nil, err
				}
				scale := name + v.suffix
				if err := checkScale(v.src, name, scale, []int{P, 1}); err != nil {
					return nil, err
				}
				hidden[scale] = true
			}
			hidden[name] = true
			st.parts[p] = append(st.parts[p], name)
		}
	}
	return st, nil
}

// Scheme is the checkpoint's quantization_config, or nil for an unquantised checkpoint.
func (v *View) Scheme() *quant.Scheme { return v.scheme }

// Names lists the tensors as the model declares them, sorted.
func (v *View) Names() []string { return slices.Clone(v.names) }

// Info describes a tensor of the view.
func (v *View) Info(name string) (safetensors.TensorInfo, error) {
	if st, ok := v.exps[name]; ok {
		return safetensors.TensorInfo{Name: name, DType: st.dtype, Shape: slices.Clone(st.spec.Shape)}, nil
	}
	return v.src.Info(name)
}

// ReadAll reads a whole tensor.
func (v *View) ReadAll(name string) ([]byte, error) {
	if st, ok := v.exps[name]; ok {
		b, _, err := v.readStacked(st, -1, nil, false)
		return b, err
	}
	return v.src.ReadAll(name)
}

// ReadSlice reads index ranges along dim of a tensor (see safetensors.Checkpoint.ReadSlice).
func (v *View) ReadSlice(name string, dim int, ranges ...safetensors.Range) ([]byte, []int, error) {
	if st, ok := v.exps[name]; ok {
		return v.readStacked(st, dim, ranges, false)
	}
	return v.src.ReadSlice(name, dim, ranges...)
}

// ReadScales reads the scales of a quantised tensor for the ranges along dim a rank reads of it; a split
// along the input dimension takes every scale (they are per output row).
func (v *View) ReadScales(name string, dim int, ranges ...safetensors.Range) ([]float32, []int, error) {
	if st, ok := v.exps[name]; ok {
		if st.dtype != safetensors.F8_E4M3 {
			return nil, nil, fmt.Errorf("shard: %s is %s, not quantised", name, st.dtype)
		}
		if dim == st.spec.InputDim {
			dim = -1
		}
		b, shape, err := v.readStacked(st, dim, ranges, true)
		if err != nil {
			return nil, nil, err
		}
		return bytesToF32(b), shape, nil
	}
	scale, ok := v.scales[name]
	if !ok {
		return nil, nil, fmt.Errorf("shard: %s is not quantised", name)
	}
	if dim == v.specs[name].InputDim {
		dim = -1
	}
	info, err := v.src.Info(scale)
	if err != nil {
		return nil, nil, err
	}
	var data []byte
	shape := slices.Clone(info.Shape)
	if dim < 0 {
		data, err = v.src.ReadAll(scale)
	} else {
		data, shape, err = v.src.ReadSlice(scale, dim, ranges...)
	}
	if err != nil {
		return nil, nil, err
	}
	out := make([]float32, len(data)/info.DType.Size())
	if err := safetensors.ToFloat32(info.DType, data, out); err != nil {
		return nil, nil, err
	}
	return out, shape, nil
}

func bytesToF32(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	_ = safetensors.ToFloat32(safetensors.F32, b, out)
	return out
}

// partReader reads rows [r0, r1) of a per-expert part (nn.Linear [out, in]) and, of the input dim, the
// ranges cols (nil: all), as row-major bytes.
type partReader func(name string, r0, r1 int, cols []safetensors.Range) ([]byte, error)

func (v *View) readPart(name string, r0, r1 int, cols []safetensors.Range) ([]byte, error) {
	data, _, err := v.src.ReadSlice(name, 0, safetensors.Range{Start: r0, End: r1})
	if err != nil || cols == nil {
		return data, err
	}
	info, err := v.src.Info(name)
	if err != nil {
		return nil, err
	}
	es, in := info.DType.Size(), info.Shape[1]
	var out []byte
	for r := range r1 - r0 {
		for _, c := range cols {
			out = append(out, data[(r*in+c.Start)*es:(r*in+c.End)*es]...)
		}
	}
	return out, nil
}

// readScalePart reads rows [r0, r1) of a per-expert part's scale [out, 1] as float32 bytes.
func (v *View) readScalePart(name string, r0, r1 int, _ []safetensors.Range) ([]byte, error) {
	scale := name + v.suffix
	info, err := v.src.Info(scale)
	if err != nil {
		return nil, err
	}
	data, _, err := v.src.ReadSlice(scale, 0, safetensors.Range{Start: r0, End: r1})
	if err != nil {
		return nil, err
	}
	f := make([]float32, len(data)/info.DType.Size())
	if err := safetensors.ToFloat32(info.DType, data, f); err != nil {
		return nil, err
	}
	return safetensors.F32Tensor("", nil, f).Data, nil
}

// readStacked assembles ranges along dim of a stacked [E, in, out] tensor (dim < 0: all of it) from its
// per-expert parts, transposing each [rows, in] block into the input-major layout; with scales, the
// float32 scales [E, 1, out] instead.
func (v *View) readStacked(st *stacked, dim int, ranges []safetensors.Range, scales bool) ([]byte, []int, error) {
	E, in, out := st.spec.Shape[0], st.spec.Shape[1], st.spec.Shape[2]
	es, read := st.dtype.Size(), partReader(v.readPart)
	if scales {
		in, es, read = 1, 4, v.readScalePart
	}
	P := out / len(st.parts)
	experts := rangeIndices(dim == 0, ranges, E)
	var cols []safetensors.Range
	inL := in
	if dim == 1 && !scales {
		cols, inL = ranges, rangeLen(ranges)
	}
	type piece struct{ part, r0, r1 int }
	var pieces []piece
	if dim == 2 {
		for _, r := range ranges {
			p := r.Start / P
			if p != (r.End-1)/P {
				return nil, nil, fmt.Errorf("shard: range [%d, %d) of dim 2 of %s straddles its per-expert parts", r.Start, r.End, st.spec.Name)
			}
			pieces = append(pieces, piece{p, r.Start - p*P, r.End - p*P})
		}
	} else {
		for p := range st.parts {
			pieces = append(pieces, piece{p, 0, P})
		}
	}
	outL := 0
	for _, pc := range pieces {
		outL += pc.r1 - pc.r0
	}
	buf := make([]byte, len(experts)*inL*outL*es)
	for ei, e := range experts {
		off := 0
		for _, pc := range pieces {
			block, err := read(st.parts[pc.part][e], pc.r0, pc.r1, cols)
			if err != nil {
				return nil, nil, fmt.Errorf("shard: read %s: %w", st.parts[pc.part][e], err)
			}
			rows := pc.r1 - pc.r0
			if len(block) != rows*inL*es {
				return nil, nil, fmt.Errorf("shard: read %s: %d bytes, want %d", st.parts[pc.part][e], len(block), rows*inL*es)
			}
			for o := range rows {
				for i := range inL {
					dst := ((ei*inL+i)*outL + off + o) * es
					copy(buf[dst:dst+es], block[(o*inL+i)*es:(o*inL+i+1)*es])
				}
			}
			off += rows
		}
	}
	return buf, []int{len(experts), inL, outL}, nil
}

// rangeIndices lists the indices ranges cover (when on), else 0..n-1.
func rangeIndices(on bool, ranges []safetensors.Range, n int) []int {
	var out []int
	if !on {
		for i := range n {
			out = append(out, i)
		}
		return out
	}
	for _, r := range ranges {
		for i := r.Start; i < r.End; i++ {
			out = append(out, i)
		}
	}
	return out
}

func rangeLen(ranges []safetensors.Range) int {
	n := 0
	for _, r := range ranges {
		n += r.End - r.Start
	}
	return n
}

// Locate says where a tensor the view stores as it is lies in the checkpoint's files (see Locator); a
// stacked tensor the view assembles from per-expert parts is an error wrapping ErrNotLocatable, and so
// is any tensor when the view's source is not a Locator.
func (v *View) Locate(name string, dim int, ranges ...safetensors.Range) (safetensors.Extent, error) {
	if _, ok := v.exps[name]; ok {
		return safetensors.Extent{}, fmt.Errorf("%w: %s is stored per expert", ErrNotLocatable, name)
	}
	l, ok := v.src.(Locator)
	if !ok {
		return safetensors.Extent{}, fmt.Errorf("%w: %s: the view's source (%T) locates nothing", ErrNotLocatable, name, v.src)
	}
	return l.Locate(name, dim, ranges...)
}
