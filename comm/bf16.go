package comm

import "math"

// bf16ToF32 widens a bfloat16 bit pattern to float32; it is exact.
func bf16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// f32ToBF16 rounds f to the nearest bfloat16, ties to even. Values beyond the largest bfloat16 round
// to infinity; a NaN stays a NaN (quiet, with its sign).
func f32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x0040
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}
