package refmath

import (
	"math"
	"testing"
)

// TestLogSoftmax: the values of a small row by hand, and a row too large for a naive exp.
func TestLogSoftmax(t *testing.T) {
	got := LogSoftmax([]float32{0, 0, math.Float32frombits(0x3f317218)}) // ln 2
	want := []float64{-math.Log(4), -math.Log(4), math.Log(2) - math.Log(4)}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-7 {
			t.Errorf("LogSoftmax[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	big := LogSoftmax([]float32{1000, 1000})
	if math.Abs(big[0]+math.Ln2) > 1e-12 || math.Abs(big[1]+math.Ln2) > 1e-12 {
		t.Errorf("LogSoftmax([1000 1000]) = %v, want both -ln 2", big)
	}
}
