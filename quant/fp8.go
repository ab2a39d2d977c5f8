package quant

import (
	"math"

	"github.com/tpfleet/tpfleet/safetensors"
)

// FP8 E4M3 constants (OCP FP8 e4m3fn: no infinities, one NaN pattern per sign).
const (
	// FP8Max is the largest finite E4M3 value.
	FP8Max = 448
	// FP8MinSubnormal is the smallest positive E4M3 value, 2^-9.
	FP8MinSubnormal = 0x1p-9
	// FP8NaN is the code of a positive NaN (0xFF is the negative one).
	FP8NaN uint8 = 0x7F
	// ActivationScaleUB is FbgemmFp8's bound on an activation row's max before its scale is taken
	// (activation_scale_ub, spec §3.5).
	ActivationScaleUB = 1200
)

// DecodeE4M3 returns the value of an E4M3 code; 0x7F and 0xFF are NaN. It is exact.
func DecodeE4M3(b uint8) float32 { return safetensors.E4M3ToFloat32(b) }

// RoundE4M3 rounds x to the nearest E4M3 value, ties to even, saturating at ±448 (as a clamp to ±448
// followed by torch's float8_e4m3fn conversion does); NaN stays NaN.
func RoundE4M3(x float32) float32 {
	if x != x {
		return x
	}
	a := math.Abs(float64(x))
	if a >= FP8Max {
		return float32(math.Copysign(FP8Max, float64(x)))
	}
	if a == 0 {
		return x
	}
	_, e := math.Frexp(a) // a = f·2^e, f in [0.5, 1): the binade's exponent is e-1
	step := FP8MinSubnormal
	if e-1 >= -6 {
		step = math.Ldexp(1, e-1-3)
	}
	r := math.RoundToEven(a/step) * step
	return float32(math.Copysign(r, float64(x)))
}

// EncodeE4M3 returns the E4M3 code of RoundE4M3(x); NaN gives FP8NaN (with x's sign).
func EncodeE4M3(x float32) uint8 {
	var sign uint8
	if math.Signbit(float64(x)) {
		sign = 0x80
	}
	if x != x {
		return sign | FP8NaN
	}
	v := math.Abs(float64(RoundE4M3(x)))
	if v == 0 {
		return sign
	}
	f, e := math.Frexp(v)
	if e-1 < -6 { // subnormal: m·2^-9
		return sign | uint8(v/FP8MinSubnormal)
	}
	return sign | uint8(e-1+7)<<3 | uint8((2*f-1)*8)
}

// FP8RowScale returns the dequantisation scale of a row whose largest magnitude is amax: amax/448, with
// amax first clamped to ub when ub > 0 (activations); a zero row gets 1/448 (spec §3.4).
func FP8RowScale(amax, ub float32) float32 {
	if ub > 0 && amax > ub {
		amax = ub
	}
	if amax == 0 {
		return 1.0 / FP8Max
	}
	return amax / FP8Max
}

// FakeQuantFP8Rows quantises each row of x (rows of n) to FP8 with its own scale (FbgemmFp8's dynamic
// per-token activation quantisation, row max clamped to ActivationScaleUB) and writes the dequantised
// values, q·scale, to dst (which may be x).
func FakeQuantFP8Rows(dst, x []float32, n int) {
	for r := 0; r+n <= len(x); r += n {
		row := x[r : r+n]
		var amax float32
		for _, v := range row {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		s := FP8RowScale(amax, ActivationScaleUB)
		for i, v := range row {
			dst[r+i] = RoundE4M3(min(max(v/s, -FP8Max), FP8Max)) * s
		}
	}
}
