package safetensors_test

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tpfleet/tpfleet/safetensors"
)

var toFloat32Tests = []struct {
	dt   safetensors.DType
	src  []byte // one element, little-endian
	want float32
}{
	{safetensors.BF16, le16(0x3F80), 1},
	{safetensors.BF16, le16(0xC000), -2},
	{safetensors.BF16, le16(0x0001), 0x1p-133}, // smallest subnormal
	{safetensors.BF16, le16(0x7F80), float32(math.Inf(1))},
	{safetensors.BF16, le16(0x7FC0), float32(math.NaN())},
	{safetensors.F16, le16(0x3C00), 1},
	{safetensors.F16, le16(0xC000), -2},
	{safetensors.F16, le16(0x0001), 0x1p-24}, // 5.96e-8, smallest subnormal
	{safetensors.F16, le16(0x03FF), 1023 * 0x1p-24},
	{safetensors.F16, le16(0x0400), 0x1p-14}, // smallest normal
	{safetensors.F16, le16(0x7BFF), 65504},
	{safetensors.F16, le16(0x8000), float32(math.Copysign(0, -1))},
	{safetensors.F16, le16(0x7C00), float32(math.Inf(1))},
	{safetensors.F16, le16(0xFC00), float32(math.Inf(-1))},
	{safetensors.F16, le16(0x7E00), float32(math.NaN())},
	{safetensors.F8_E4M3, []byte{0x38}, 1},
	{safetensors.F8_E4M3, []byte{0xB8}, -1},
	{safetensors.F8_E4M3, []byte{0x7E}, 448},
	{safetensors.F8_E4M3, []byte{0x78}, 256}, // exponent 15 is finite in e4m3fn
	{safetensors.F8_E4M3, []byte{0x01}, 0x1p-9},
	{safetensors.F8_E4M3, []byte{0x07}, 7 * 0x1p-9},
	{safetensors.F8_E4M3, []byte{0x08}, 0x1p-6},
	{safetensors.F8_E4M3, []byte{0x80}, float32(math.Copysign(0, -1))},
	{safetensors.F8_E4M3, []byte{0x7F}, float32(math.NaN())},
	{safetensors.F8_E4M3, []byte{0xFF}, float32(math.NaN())},
	{safetensors.F8_E5M2, []byte{0x3C}, 1},
	{safetensors.F8_E5M2, []byte{0x7B}, 57344},
	{safetensors.F8_E5M2, []byte{0x01}, 0x1p-16},
	{safetensors.F8_E5M2, []byte{0x7C}, float32(math.Inf(1))},
	{safetensors.F8_E5M2, []byte{0x7D}, float32(math.NaN())},
	{safetensors.F32, binary.LittleEndian.AppendUint32(nil, math.Float32bits(-1.5)), -1.5},
	{safetensors.F64, binary.LittleEndian.AppendUint64(nil, math.Float64bits(0.25)), 0.25},
	{safetensors.I64, binary.LittleEndian.AppendUint64(nil, uint64(1<<40)), 1 << 40},
	{safetensors.I32, binary.LittleEndian.AppendUint32(nil, 0xFFFFFFF9), -7},
	{safetensors.I16, le16(0x8000), -32768},
	{safetensors.I8, []byte{0xFF}, -1},
	{safetensors.U8, []byte{0xFF}, 255},
	{safetensors.BOOL, []byte{2}, 1},
}

func le16(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }

func TestToFloat32(t *testing.T) {
	for _, tt := range toFloat32Tests {
		dst := make([]float32, 1)
		if err := safetensors.ToFloat32(tt.dt, tt.src, dst); err != nil {
			t.Errorf("ToFloat32(%v, %x) = %v", tt.dt, tt.src, err)
			continue
		}
		if !sameFloat(dst[0], tt.want) {
			t.Errorf("ToFloat32(%v, %x) = %v, want %v", tt.dt, tt.src, dst[0], tt.want)
		}
	}
}

// sameFloat reports whether a and b are both NaN or have the same bits.
func sameFloat(a, b float32) bool {
	if a != a || b != b {
		return a != a && b != b
	}
	return math.Float32bits(a) == math.Float32bits(b)
}

// minifloat decodes an IEEE-style float of the given widths the slow way.
// With ieee false, the top exponent is finite (e4m3fn) and only all-ones is NaN.
func minifloat(bits uint32, expBits, mantBits uint, ieee bool) float32 {
	return float32(minifloat64(bits, expBits, mantBits, ieee))
}

func minifloat64(bits uint32, expBits, mantBits uint, ieee bool) float64 {
	sign := 1.0
	if bits>>(expBits+mantBits)&1 != 0 {
		sign = -1
	}
	exp := int(bits>>mantBits) & (1<<expBits - 1)
	mant := int(bits) & (1<<mantBits - 1)
	bias, top, mantMax := 1<<(expBits-1)-1, 1<<expBits-1, 1<<mantBits-1
	switch {
	case ieee && exp == top && mant == 0:
		return math.Inf(int(sign))
	case ieee && exp == top, !ieee && exp == top && mant == mantMax:
		return math.NaN()
	case exp == 0:
		return sign * math.Ldexp(float64(mant), 1-bias-int(mantBits))
	}
	return sign * math.Ldexp(float64(mantMax+1+mant), exp-bias-int(mantBits))
}

func TestToFloat32Exhaustive(t *testing.T) {
	tests := []struct {
		dt     safetensors.DType
		n      int
		decode func(uint32) float32
	}{
		{safetensors.F16, 1 << 16, func(b uint32) float32 { return minifloat(b, 5, 10, true) }},
		{safetensors.F8_E5M2, 1 << 8, func(b uint32) float32 { return minifloat(b, 5, 2, true) }},
		{safetensors.F8_E4M3, 1 << 8, func(b uint32) float32 { return minifloat(b, 4, 3, false) }},
		{safetensors.BF16, 1 << 16, func(b uint32) float32 { return minifloat(b, 8, 7, true) }},
	}
	for _, tt := range tests {
		src := make([]byte, tt.n*tt.dt.Size())
		for i := range tt.n {
			if tt.dt.Size() == 2 {
				binary.LittleEndian.PutUint16(src[2*i:], uint16(i))
			} else {
				src[i] = byte(i)
			}
		}
		dst := make([]float32, tt.n)
		if err := safetensors.ToFloat32(tt.dt, src, dst); err != nil {
			t.Fatal(err)
		}
		for i, got := range dst {
			if want := tt.decode(uint32(i)); !sameFloat(got, want) {
				t.Errorf("ToFloat32(%v, %#x) = %v, want %v", tt.dt, i, got, want)
			}
		}
	}
}

func TestFloat32ToBF16(t *testing.T) {
	tests := []struct {
		in   uint32 // float32 bits
		want uint16
	}{
		{0x3F800000, 0x3F80}, // 1
		{0x80000000, 0x8000}, // -0
		{0x3F808000, 0x3F80}, // tie, even below: round down
		{0x3F818000, 0x3F82}, // tie, odd below: round up
		{0x3F808001, 0x3F81}, // above the tie
		{0x3F807FFF, 0x3F80}, // below the tie
		{0x7F7FFFFF, 0x7F80}, // max float32 rounds to +Inf
		{0x7F800000, 0x7F80}, // +Inf
		{0xFF800000, 0xFF80}, // -Inf
		{0x7FC00000, 0x7FC0}, // quiet NaN
		{0x7F800001, 0x7FC0}, // NaN whose payload is only in the low bits stays NaN
		{0xFF800001, 0xFFC0},
	}
	for _, tt := range tests {
		if got := safetensors.Float32ToBF16(math.Float32frombits(tt.in)); got != tt.want {
			t.Errorf("Float32ToBF16(%#08x) = %#04x, want %#04x", tt.in, got, tt.want)
		}
	}
	// Every non-NaN bfloat16 survives a round trip through float32.
	for b := range 1 << 16 {
		if b&0x7FFF > 0x7F80 {
			continue
		}
		if got := safetensors.Float32ToBF16(safetensors.BF16ToFloat32(uint16(b))); got != uint16(b) {
			t.Errorf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x, want %#04x", b, got, b)
		}
	}
	// Random finite values round to the nearer neighbour, ties to even,
	// where the neighbour above the largest finite value is 2^128 (Inf).
	r := rand.New(rand.NewPCG(7, 8))
	for range 100000 {
		x := math.Float32frombits(r.Uint32())
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			continue
		}
		lo := uint16(math.Float32bits(x) >> 16) // truncation, toward zero
		dLo := math.Abs(float64(x) - minifloat64(uint32(lo), 8, 7, false))
		dHi := math.Abs(minifloat64(uint32(lo+1), 8, 7, false) - float64(x))
		want := lo
		if dHi < dLo || (dHi == dLo && lo&1 == 1) {
			want = lo + 1
		}
		if got := safetensors.Float32ToBF16(x); got != want {
			t.Fatalf("Float32ToBF16(%#08x) = %#04x, want %#04x", math.Float32bits(x), got, want)
		}
	}
}

func TestToInt64(t *testing.T) {
	tests := []struct {
		dt   safetensors.DType
		src  []byte
		want []int64
	}{
		{safetensors.I64, binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, 1<<63), 1<<63-1), []int64{math.MinInt64, math.MaxInt64}},
		{safetensors.I32, binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 200000), 0xFFFFFFFF), []int64{200000, -1}},
		{safetensors.I16, le16(0xFFFE), []int64{-2}},
		{safetensors.I8, []byte{0x80, 0x7F}, []int64{-128, 127}},
		{safetensors.U8, []byte{0x80}, []int64{128}},
		{safetensors.BOOL, []byte{0, 1, 9}, []int64{0, 1, 1}},
	}
	for _, tt := range tests {
		got, err := safetensors.ToInt64(tt.dt, tt.src)
		if err != nil || len(got) != len(tt.want) {
			t.Errorf("ToInt64(%v, %x) = %v, %v, want %v", tt.dt, tt.src, got, err, tt.want)
			continue
		}
		for i := range got {
			if got[i] != tt.want[i] {
				t.Errorf("ToInt64(%v, %x) = %v, want %v", tt.dt, tt.src, got, tt.want)
				break
			}
		}
	}
}

func TestConversionErrors(t *testing.T) {
	if got, err := safetensors.ToInt64(safetensors.F32, make([]byte, 4)); err == nil {
		t.Errorf("ToInt64(F32, ...) = %v, nil, want an error", got)
	}
	if got, err := safetensors.ToInt64(safetensors.I32, make([]byte, 6)); err == nil {
		t.Errorf("ToInt64(I32, 6 bytes) = %v, nil, want an error", got)
	}
	if err := safetensors.ToFloat32(safetensors.BF16, make([]byte, 4), make([]float32, 3)); err == nil {
		t.Errorf("ToFloat32(BF16, 4 bytes, 3 floats) = nil, want an error")
	}
	if err := safetensors.ToFloat32(safetensors.DType(0), nil, nil); err == nil {
		t.Errorf("ToFloat32(DType(0), ...) = nil, want an error")
	}
}
