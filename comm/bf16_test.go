package comm

import (
	"math"
	"testing"
)

func TestF32ToBF16(t *testing.T) {
	inf := float32(math.Inf(1))
	for _, tc := range []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000},
		{float32(math.Copysign(0, -1)), 0x8000},
		{1, 0x3f80},
		{-2, 0xc000},
		{1 + 0x1p-9, 0x3f80},              // below half an ulp: down
		{1 + 0x1p-8, 0x3f80},              // tie, 0x3f80 even: down
		{1 + 0x1p-7 + 0x1p-8, 0x3f82},     // tie, 0x3f81 odd: up
		{1 + 0x1p-8 + 0x1p-20, 0x3f81},    // above half an ulp: up
		{-(1 + 0x1p-8 + 0x1p-20), 0xbf81}, // the same, negative
		{math.MaxFloat32, 0x7f80},         // beyond the largest bfloat16: infinity
		{inf, 0x7f80},
		{-inf, 0xff80},
		{0x1p-133, 0x0001}, // subnormal
	} {
		if got := f32ToBF16(tc.in); got != tc.want {
			t.Errorf("f32ToBF16(%g) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	for _, bits := range []uint32{0x7fc00000, 0x7f800001, 0xff800001} {
		nan := math.Float32frombits(bits)
		if got := bf16ToF32(f32ToBF16(nan)); !math.IsNaN(float64(got)) {
			t.Errorf("f32ToBF16(NaN %#08x) = %#04x, want a NaN", bits, f32ToBF16(nan))
		}
	}
}

func TestBF16RoundTrip(t *testing.T) {
	for h := range 1 << 16 {
		f := bf16ToF32(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if got := f32ToBF16(f); got != uint16(h) {
			t.Fatalf("f32ToBF16(bf16ToF32(%#04x)) = %#04x, want %#04x", h, got, h)
		}
	}
}
