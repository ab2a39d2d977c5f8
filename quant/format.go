package quant

import (
	"errors"
	"fmt"
	"math"

	"github.com/tpfleet/tpfleet/safetensors"
)

// ErrFormat reports a weight that does not fit its format: data or scales of the wrong length, an input
// dimension outside the shape, an unknown format.
var ErrFormat = errors.New("quant: malformed quantised weight")

// Kind is a weight format's name, as --quantization takes it.
type Kind string

// The formats.
const (
	// BF16 is no quantisation: the checkpoint's own dtype.
	BF16 Kind = ""
	// FP8 is E4M3 with one float32 scale per output channel.
	FP8 Kind = "fp8"
	// Int4 is weight-only int4, symmetric, one bf16 scale per output channel and group of input columns.
	Int4 Kind = "int4"
)

// DefaultGroupSize is the int4 group size (input columns per scale) --quantization-group defaults to.
const DefaultGroupSize = 128

// Format is how a weight is held in memory.
type Format struct {
	Kind Kind
	// GroupSize is the number of input columns sharing a scale (int4); ignored for the others.
	GroupSize int
	// DynamicActivations (fp8) means the ops quantise their input rows to FP8 per token before the
	// product, as FbgemmFp8 does (FakeQuantFP8Rows); false is weight-only FP8 (dequantised weights times
	// float activations), the reference of a compressed-tensors checkpoint (spec §3.4, dequantize=True).
	DynamicActivations bool
	// RoundBF16 (fp8) means a dequantised weight is rounded to bf16, bf16(float32(q)·float32(scale)), as
	// transformers 5.17 decompresses a compressed-tensors checkpoint (spec §3.4); false keeps q·scale in
	// float32, as FbgemmFp8's rowwise GEMM applies the scales to its float32 accumulator (§3.5). See the
	// package doc, Numerics.
	RoundBF16 bool
}

// CompressedTensorsFP8 is the format of a compressed-tensors checkpoint's FP8 weights (Scheme.Format):
// weight-only FP8 with one scale per output channel, dequantised to bf16 (spec §3.4).
func CompressedTensorsFP8() Format { return Format{Kind: FP8, RoundBF16: true} }

// String names the format for logs and messages: "bf16", "fp8-rowwise", "fp8-rowwise+act", "fp8-ct"
// (CompressedTensorsFP8), "int4-g128".
func (f Format) String() string {
	switch f.Kind {
	case BF16:
		return "bf16"
	case FP8:
		if f.RoundBF16 {
			return "fp8-ct"
		}
		if f.DynamicActivations {
			return "fp8-rowwise+act"
		}
		return "fp8-rowwise"
	case Int4:
		return fmt.Sprintf("int4-g%d", f.GroupSize)
	}
	return string(f.Kind)
}

// Quantized reports whether the format is not bf16.
func (f Format) Quantized() bool { return f.Kind != BF16 }

// ParseFormat returns the format --quantization name (with --quantization-group group) asks for:
// "" or "none" or "bf16", "fp8" (FbgemmFp8 semantics: dynamic activations) or "int4".
func ParseFormat(name string, group int) (Format, error) {
	switch name {
	case "", "none", "bf16":
		return Format{}, nil
	case "fp8":
		return Format{Kind: FP8, DynamicActivations: true}, nil
	case "int4":
		if group <= 0 {
			return Format{}, fmt.Errorf("quant: --quantization-group %d, want > 0", group)
		}
		return Format{Kind: Int4, GroupSize: group}, nil
	}
	return Format{}, fmt.Errorf("quant: --quantization %q is not supported (want none, fp8 or int4)", name)
}

// Weight is a quantised weight in host memory; see the package doc for its layout.
type Weight struct {
	Format   Format
	Shape    []int
	InputDim int
	Data     []byte
	Scales   []float32
}

// dims returns the weight as [outer, in, inner] and its number of groups along in.
func (w Weight) dims() (outer, in, inner, groups int, err error) {
	if w.InputDim < 0 || w.InputDim >= len(w.Shape) {
		return 0, 0, 0, 0, fmt.Errorf("%w: input dim %d of %v", ErrFormat, w.InputDim, w.Shape)
	}
	outer, inner = 1, 1
	for i, d := range w.Shape {
		if d < 0 {
			return 0, 0, 0, 0, fmt.Errorf("%w: shape %v", ErrFormat, w.Shape)
		}
		switch {
		case i < w.InputDim:
			outer *= d
		case i > w.InputDim:
			inner *= d
		}
	}
	in = w.Shape[w.InputDim]
	switch w.Format.Kind {
	case FP8:
		groups = 1
	case Int4:
		if w.Format.GroupSize <= 0 {
			return 0, 0, 0, 0, fmt.Errorf("%w: int4 group size %d", ErrFormat, w.Format.GroupSize)
		}
		groups = (in + w.Format.GroupSize - 1) / w.Format.GroupSize
	default:
		return 0, 0, 0, 0, fmt.Errorf("%w: format %s", ErrFormat, w.Format)
	}
	return outer, in, inner, groups, nil
}

// ScaleShape is the shape of Scales: Shape with the input dimension replaced by the number of groups.
func (w Weight) ScaleShape() []int {
	_, _, _, g, err := w.dims()
	if err != nil {
		return nil
	}
	s := append([]int(nil), w.Shape...)
	s[w.InputDim] = g
	return s
}

// Bytes is the weight's size in memory: codes plus float32 (fp8) or bf16 (int4) scales
// (Format.Bytes of its shape).
func (w Weight) Bytes() int64 { return w.Format.Bytes(w.Shape, w.InputDim) }

// Bytes is the size in memory of a weight of shape, with input dimension inDim, held in f: 2 bytes an
// element for bf16; 1 (fp8) or ½ (int4) plus its scales (Weight.Bytes) for the others. A shape f cannot
// hold gives 0.
func (f Format) Bytes(shape []int, inDim int) int64 {
	if !f.Quantized() {
		n := int64(2)
		for _, d := range shape {
			n *= int64(d)
		}
		return n
	}
	outer, in, inner, g, err := Weight{Format: f, Shape: shape, InputDim: inDim}.dims()
	if err != nil {
		return 0
	}
	n, scales := int64(outer)*int64(in)*int64(inner), int64(outer)*int64(g)*int64(inner)
	if f.Kind == Int4 {
		return (n+1)/2 + 2*scales
	}
	return n + 4*scales
}

// Check reports data or scales whose lengths do not fit the shape.
func (w Weight) Check() error {
	outer, in, inner, g, err := w.dims()
	if err != nil {
		return err
	}
	n := outer * in * inner
	want := n
	if w.Format.Kind == Int4 {
		want = (n + 1) / 2
	}
	if len(w.Data) != want {
		return fmt.Errorf("%w: %s%v: %d bytes of data, want %d", ErrFormat, w.Format, w.Shape, len(w.Data), want)
	}
	if len(w.Scales) != outer*g*inner {
		return fmt.Errorf("%w: %s%v: %d scales, want %d (%v)", ErrFormat, w.Format, w.Shape, len(w.Scales), outer*g*inner, w.ScaleShape())
	}
	return nil
}

// Dequantize returns the weight's values, q·scale in float32 (rounded to bf16 where the format has
// RoundBF16), row-major over Shape.
func (w Weight) Dequantize() ([]float32, error) {
	if err := w.Check(); err != nil {
		return nil, err
	}
	outer, in, inner, g, _ := w.dims()
	out := make([]float32, outer*in*inner)
	for o := range outer {
		for i := range in {
			gi := 0
			if w.Format.Kind == Int4 {
				gi = i / w.Format.GroupSize
			}
			for k := range inner {
				idx := (o*in+i)*inner + k
				s := w.Scales[(o*g+gi)*inner+k]
				var q float32
				if w.Format.Kind == FP8 {
					q = DecodeE4M3(w.Data[idx])
				} else {
					q = float32(int4At(w.Data, idx))
				}
				out[idx] = q * s
				if w.Format.RoundBF16 {
					out[idx] = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(out[idx]))
				}
			}
		}
	}
	return out, nil
}

// int4At returns element idx of packed nibbles, sign-extended.
func int4At(data []byte, idx int) int8 {
	b := data[idx/2]
	if idx%2 == 1 {
		b >>= 4
	}
	return int8(b<<4) >> 4
}

// Quantize quantises values (row-major over shape) to f with inDim as the input dimension. fp8: per
// output channel, scale = max|w| over the input dimension / 448 (FP8RowScale without a bound), code =
// E4M3(clamp(w/scale, ±448)). int4: see the package doc.
func Quantize(f Format, shape []int, inDim int, values []float32) (Weight, error) {
	w := Weight{Format: f, Shape: append([]int(nil), shape...), InputDim: inDim}
	outer, in, inner, g, err := w.dims()
	if err != nil {
		return w, err
	}
	n := outer * in * inner
	if len(values) != n {
		return w, fmt.Errorf("%w: %d values for shape %v", ErrFormat, len(values), shape)
	}
	w.Scales = make([]float32, outer*g*inner)
	if f.Kind == FP8 {
		w.Data = make([]byte, n)
	} else {
		w.Data = make([]byte, (n+1)/2)
	}
	for o := range outer {
		for gi := range g {
			lo, hi := 0, in
			if f.Kind == Int4 {
				lo, hi = gi*f.GroupSize, min((gi+1)*f.GroupSize, in)
			}
			for k := range inner {
				var amax float32
				for i := lo; i < hi; i++ {
					amax = max(amax, float32(math.Abs(float64(values[(o*in+i)*inner+k]))))
				}
				var s float32
				if f.Kind == FP8 {
					s = FP8RowScale(amax, 0)
				} else {
					s = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(amax / 7))
				}
				w.Scales[(o*g+gi)*inner+k] = s
				for i := lo; i < hi; i++ {
					idx := (o*in+i)*inner + k
					v := values[idx]
					if f.Kind == FP8 {
						w.Data[idx] = EncodeE4M3(min(max(v/s, -FP8Max), FP8Max))
						continue
					}
					var q int
					if s != 0 {
						q = int(min(max(math.RoundToEven(float64(v/s)), -8), 7))
					}
					sh := uint(4 * (idx % 2))
					w.Data[idx/2] |= byte(q&0xF) << sh
				}
			}
		}
	}
	return w, nil
}
