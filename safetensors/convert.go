package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
)

// BF16ToFloat32 converts a bfloat16 bit pattern to float32. It is exact.
func BF16ToFloat32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// Float32ToBF16 converts f to a bfloat16 bit pattern, rounding to nearest
// with ties to even. Values beyond the bfloat16 range become infinities, and
// a NaN stays a NaN.
func Float32ToBF16(f float32) uint16 {
	bits := math.Float32bits(f)
	if bits&0x7FFFFFFF > 0x7F800000 { // NaN: keep sign and top payload; the quiet bit keeps it from becoming Inf
		return uint16(bits>>16) | 0x0040
	}
	bits += 0x7FFF + (bits>>16)&1
	return uint16(bits >> 16)
}

// halfToFloat32 converts an IEEE 754 half-precision bit pattern to float32.
// It is exact, subnormals, infinities and NaNs included.
func halfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1F
	mant := uint32(h) & 0x3FF
	switch exp {
	case 0: // zero or subnormal: mant × 2^-24
		v := float32(mant) * 0x1p-24
		if sign != 0 {
			v = -v
		}
		return v
	case 0x1F: // infinity or NaN
		return math.Float32frombits(sign | 0x7F800000 | mant<<13)
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
}

// E4M3ToFloat32 converts an F8_E4M3 (e4m3fn, OCP FP8) byte: bias 7, no
// infinities, 0x7F and 0xFF are NaN, the largest finite value is 448 and the
// smallest subnormal 2^-9. It is exact.
func E4M3ToFloat32(b uint8) float32 {
	exp := int(b>>3) & 0xF
	mant := float64(b & 7)
	var v float64
	switch {
	case exp == 0xF && mant == 7:
		return float32(math.NaN())
	case exp == 0: // subnormal: mant/8 × 2^-6
		v = math.Ldexp(mant, -9)
	default:
		v = math.Ldexp(8+mant, exp-7-3)
	}
	if b&0x80 != 0 {
		v = -v
	}
	return float32(v)
}

// e5m2ToFloat32 converts an F8_E5M2 byte, which is the top half of an IEEE
// half-precision number.
func e5m2ToFloat32(b uint8) float32 { return halfToFloat32(uint16(b) << 8) }

// ToFloat32 converts the little-endian elements of type dt in src to
// float32 in dst, which must hold exactly len(src)/dt.Size() elements.
// Integers convert as by a Go conversion (large int64 values round), and
// BOOL as 0 or 1.
func ToFloat32(dt DType, src []byte, dst []float32) error {
	n, err := elemCount(dt, src)
	if err != nil {
		return err
	}
	if len(dst) != n {
		return fmt.Errorf("safetensors: ToFloat32: %d %s elements into %d float32s", n, dt, len(dst))
	}
	le := binary.LittleEndian
	switch dt {
	case BF16:
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(le.Uint16(src[2*i:])) << 16)
		}
	case F32:
		for i := range dst {
			dst[i] = math.Float32frombits(le.Uint32(src[4*i:]))
		}
	case F16:
		for i := range dst {
			dst[i] = halfToFloat32(le.Uint16(src[2*i:]))
		}
	case F64:
		for i := range dst {
			dst[i] = float32(math.Float64frombits(le.Uint64(src[8*i:])))
		}
	case F8_E4M3:
		for i := range dst {
			dst[i] = E4M3ToFloat32(src[i])
		}
	case F8_E5M2:
		for i := range dst {
			dst[i] = e5m2ToFloat32(src[i])
		}
	default:
		ints, err := ToInt64(dt, src)
		if err != nil {
			return err
		}
		for i, v := range ints {
			dst[i] = float32(v)
		}
	}
	return nil
}

// ToInt64 converts the little-endian integers of type dt (I64, I32, I16, I8,
// U8 or BOOL) in src to int64, such as the token ids of a golden file.
func ToInt64(dt DType, src []byte) ([]int64, error) {
	n, err := elemCount(dt, src)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	dst := make([]int64, n)
	switch dt {
	case I64:
		for i := range dst {
			dst[i] = int64(le.Uint64(src[8*i:]))
		}
	case I32:
		for i := range dst {
			dst[i] = int64(int32(le.Uint32(src[4*i:])))
		}
	case I16:
		for i := range dst {
			dst[i] = int64(int16(le.Uint16(src[2*i:])))
		}
	case I8:
		for i := range dst {
			dst[i] = int64(int8(src[i]))
		}
	case U8:
		for i := range dst {
			dst[i] = int64(src[i])
		}
	case BOOL:
		for i := range dst {
			if src[i] != 0 {
				dst[i] = 1
			}
		}
	default:
		return nil, fmt.Errorf("safetensors: ToInt64: %s is not an integer dtype", dt)
	}
	return dst, nil
}

// elemCount returns the number of dt elements in src.
func elemCount(dt DType, src []byte) (int, error) {
	if !dt.valid() {
		return 0, fmt.Errorf("safetensors: invalid dtype %s", dt)
	}
	if len(src)%dt.Size() != 0 {
		return 0, fmt.Errorf("safetensors: %d bytes is not a whole number of %s elements", len(src), dt)
	}
	return len(src) / dt.Size(), nil
}
