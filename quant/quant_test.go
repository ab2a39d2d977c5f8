package quant

import (
	"errors"
	"math"
	"strings"
	"testing"
)

func TestDecodeE4M3(t *testing.T) {
	tests := []struct {
		code uint8
		want float64
	}{
		{0x00, 0}, {0x80, math.Copysign(0, -1)},
		{0x01, 0x1p-9}, {0x07, 7 * 0x1p-9}, {0x08, 0x1p-6}, // smallest subnormal, largest subnormal, smallest normal
		{0x38, 1}, {0x39, 1.125}, {0x40, 2}, {0xB8, -1},
		{0x7E, 448}, {0xFE, -448}, {0x77, 240}, {0x78, 256},
	}
	for _, tt := range tests {
		got := DecodeE4M3(tt.code)
		if float64(got) != tt.want || math.Signbit(float64(got)) != math.Signbit(tt.want) {
			t.Errorf("DecodeE4M3(%#02x) = %v, want %v", tt.code, got, tt.want)
		}
	}
	// All 256 codes: NaN exactly at 0x7F and 0xFF, finite values within ±448 and at least 2^-9 in
	// magnitude unless zero, strictly increasing over the positive codes, and EncodeE4M3 inverts DecodeE4M3.
	prev := float32(-1)
	for c := range 256 {
		code := uint8(c)
		v := DecodeE4M3(code)
		if nan := code&0x7F == 0x7F; nan != (v != v) {
			t.Fatalf("DecodeE4M3(%#02x) = %v: NaN %v, want %v", code, v, v != v, nan)
		}
		if v != v {
			if got := EncodeE4M3(v); got&0x7F != 0x7F {
				t.Errorf("EncodeE4M3(NaN) = %#02x, want a NaN code", got)
			}
			continue
		}
		a := math.Abs(float64(v))
		if a > 448 || (a != 0 && a < 0x1p-9) {
			t.Errorf("DecodeE4M3(%#02x) = %v, outside the E4M3 range", code, v)
		}
		if code < 0x80 {
			if v <= prev && code != 0 {
				t.Errorf("DecodeE4M3(%#02x) = %v, not above the previous code's %v", code, v, prev)
			}
			prev = v
		}
		if got := EncodeE4M3(v); got != code {
			t.Errorf("EncodeE4M3(%v) = %#02x, want %#02x", v, got, code)
		}
	}
}

func TestRoundE4M3(t *testing.T) {
	tests := []struct{ in, want float32 }{
		{1.0625, 1},         // halfway between 1 and 1.125: ties to even (1)
		{1.1875, 1.25},      // halfway between 1.125 and 1.25: ties to even (1.25)
		{1.07, 1.125},       // nearest
		{0x1p-10, 0},        // half the smallest subnormal: ties to even (0)
		{0x1.8p-10, 0x1p-9}, // above half
		{3 * 0x1p-10, 0x1p-8},
		{460, 448}, {1e9, 448}, {-1e9, -448}, // saturating
		{0.0146484375, 0.015625},  // subnormal/normal boundary: 7.5·2^-9 rounds to 8·2^-9 = 2^-6
		{239.99, 240}, {-17, -16}, // 17 is halfway between 16 and 18: ties to even mantissa (16)
	}
	for _, tt := range tests {
		if got := RoundE4M3(tt.in); got != tt.want {
			t.Errorf("RoundE4M3(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
	if got := RoundE4M3(float32(math.NaN())); got == got {
		t.Errorf("RoundE4M3(NaN) = %v, want NaN", got)
	}
}

func TestQuantizeRoundTrip(t *testing.T) {
	shape := []int{3, 5, 4} // [E, in, out], input dim 1
	vals := make([]float32, 60)
	for i := range vals {
		vals[i] = float32(math.Sin(float64(i)*1.3)) * float32(1+i%7)
	}
	vals[7] = 0
	for _, f := range []Format{{Kind: FP8}, {Kind: Int4, GroupSize: 2}} {
		w, err := Quantize(f, shape, 1, vals)
		if err != nil {
			t.Fatal(err)
		}
		deq, err := w.Dequantize()
		if err != nil {
			t.Fatal(err)
		}
		for e := range 3 {
			for o := range 4 {
				for i := range 5 {
					idx := (e*5+i)*4 + o
					// The group's scale bounds the error: half a step (int4) or 2^-4 relative (fp8).
					g := 0
					if f.Kind == Int4 {
						g = i / 2
					}
					s := w.Scales[(e*w.ScaleShape()[1]+g)*4+o]
					tol := float64(s) / 2
					if f.Kind == FP8 {
						tol = math.Max(math.Abs(float64(vals[idx]))/16, float64(s)*0x1p-9)
					}
					if d := math.Abs(float64(deq[idx] - vals[idx])); d > tol*1.0001 {
						t.Errorf("%s: element %v: %v → %v, error %v > %v", f, idx, vals[idx], deq[idx], d, tol)
					}
				}
			}
		}
		// The largest magnitude of each fp8 channel maps to ±448 exactly.
		if f.Kind == FP8 {
			if got := DecodeE4M3(w.Data[(0*5+0)*4+0]); math.Abs(float64(got)) > 448 {
				t.Errorf("fp8 code beyond 448: %v", got)
			}
		}
	}
	bad := Weight{Format: Format{Kind: FP8}, Shape: []int{2, 2}, InputDim: 1, Data: make([]byte, 4), Scales: make([]float32, 3)}
	if err := bad.Check(); !errors.Is(err, ErrFormat) {
		t.Errorf("Check(3 scales for [2 2]) = %v, want ErrFormat", err)
	}
}

func TestFakeQuantFP8Rows(t *testing.T) {
	x := []float32{448, 1, -2, 0.001, 0, 0, 0, 0, 3000, 1, 0, 0}
	FakeQuantFP8Rows(x, x, 4)
	// Row 0: scale 1, values exact in E4M3 except 0.001 → nearest subnormal multiple of 2^-9 (0.001953125 or 0).
	if x[0] != 448 || x[1] != 1 || x[2] != -2 || x[3] != 0.001953125 {
		t.Errorf("row 0 = %v", x[:4])
	}
	// Row 1: zero stays zero.
	if x[4] != 0 || x[7] != 0 {
		t.Errorf("row 1 = %v", x[4:8])
	}
	// Row 2: max clamped to 1200 (scale 1200/448), so 3000 saturates to 448·scale = 1200.
	if math.Abs(float64(x[8]-1200)) > 1e-3 {
		t.Errorf("row 2 = %v, want 1200 first", x[8:])
	}
}

const maverickQC = `{
 "config_groups": {"group_0": {
   "input_activations": {"actorder": null, "block_structure": null, "dynamic": true, "group_size": null, "num_bits": 8, "observer": null, "observer_kwargs": {}, "strategy": "token", "symmetric": true, "type": "float"},
   "output_activations": null, "targets": ["Linear"],
   "weights": {"actorder": null, "block_structure": null, "dynamic": false, "group_size": null, "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": true, "type": "float"}}},
 "format": "float-quantized", "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*", "lm_head"],
 "kv_cache_scheme": null, "quant_method": "compressed-tensors", "quantization_status": "compressed"}`

func TestParseCompressedTensors(t *testing.T) {
	s, err := ParseCompressedTensors([]byte(maverickQC))
	if err != nil {
		t.Fatal(err)
	}
	if !s.DynamicActivations || s.Targets[0] != "Linear" {
		t.Errorf("scheme = %+v", s)
	}
	for m, want := range map[string]bool{
		"lm_head": true, "model.layers.0.self_attn.q_proj": true, "model.layers.3.feed_forward.router": true,
		"model.layers.0.feed_forward.experts.3.gate_proj": false, "model.lm_head": false,
	} {
		if got := s.Ignored(m); got != want {
			t.Errorf("Ignored(%q) = %v, want %v", m, got, want)
		}
	}
	tests := []struct{ edit, want string }{
		{`"strategy": "channel"`, `quantization_config.config_groups.group_0.weights.strategy: "block" is not supported (want "channel")`},
		{`"quant_method": "compressed-tensors"`, `quantization_config.quant_method: "block" is not supported`},
		{`"format": "float-quantized"`, `quantization_config.format: "block" is not supported`},
		{`"strategy": "token"`, `input_activations.strategy: "block" is not supported (want "token")`},
	}
	for _, tt := range tests {
		key, _, _ := strings.Cut(tt.edit, ":")
		bad := strings.Replace(maverickQC, tt.edit, key+`: "block"`, 1)
		_, err := ParseCompressedTensors([]byte(bad))
		if !errors.Is(err, ErrUnsupportedScheme) || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("ParseCompressedTensors(%s → block) = %v, want one line containing %q", key, err, tt.want)
		}
	}
	for _, edit := range [][2]string{
		{`"num_bits": 8, "observer": "minmax"`, `"num_bits": 4, "observer": "minmax"`},
		{`"kv_cache_scheme": null`, `"kv_cache_scheme": {}`},
		{`"lm_head"]`, `"re:("]`},
		{`"group_size": null, "num_bits": 8, "observer": "minmax"`, `"group_size": 128, "num_bits": 8, "observer": "minmax"`},
	} {
		if _, err := ParseCompressedTensors([]byte(strings.Replace(maverickQC, edit[0], edit[1], 1))); !errors.Is(err, ErrUnsupportedScheme) {
			t.Errorf("ParseCompressedTensors(%s) = %v, want ErrUnsupportedScheme", edit[1], err)
		}
	}
}

// FuzzParseCompressedTensors: any input gives a scheme or one line of error, never a panic; its seeds run
// in CI with go test.
func FuzzParseCompressedTensors(f *testing.F) {
	f.Add([]byte(maverickQC))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": true}}}, "ignore": ["re:.*(", "x"]}`))
	f.Add([]byte(`{"config_groups": {"a": {}, "b": {}}}`))
	f.Add([]byte(`[1, 2`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseCompressedTensors(data)
		if err != nil {
			if !errors.Is(err, ErrUnsupportedScheme) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q: want one line wrapping ErrUnsupportedScheme", err)
			}
			return
		}
		if s != nil {
			s.Ignored("model.layers.0.self_attn.q_proj")
		}
	})
}

// TestRoundBF16: a compressed-tensors weight dequantises to bf16(q·scale) (spec §3.4); fp8 rowwise keeps
// q·scale in float32.
func TestRoundBF16(t *testing.T) {
	// q = 1.125 (code 0x39), scale 1+2^-7: q·scale = 1.133789…, which bf16 (8 significant bits) rounds to 1.1328125.
	w := Weight{Format: CompressedTensorsFP8(), Shape: []int{1, 1}, InputDim: 1, Data: []byte{0x39}, Scales: []float32{1 + 0x1p-7}}
	got, err := w.Dequantize()
	if err != nil {
		t.Fatal(err)
	}
	if got[0] != 1.1328125 {
		t.Errorf("Dequantize(%s) = %v, want 1.1328125", w.Format, got[0])
	}
	w.Format = Format{Kind: FP8}
	if got, _ = w.Dequantize(); got[0] != 1.125*(1+0x1p-7) {
		t.Errorf("Dequantize(%s) = %v, want %v", w.Format, got[0], 1.125*(1+0x1p-7))
	}
	if s := CompressedTensorsFP8().String(); s != "fp8-ct" {
		t.Errorf("CompressedTensorsFP8().String() = %q, want fp8-ct", s)
	}
}

func TestFormatBytes(t *testing.T) {
	tests := []struct {
		f     Format
		shape []int
		in    int
		want  int64
	}{
		{Format{}, []int{4, 6}, 1, 48},
		{Format{Kind: FP8}, []int{4, 6}, 1, 24 + 4*4},
		{Format{Kind: Int4, GroupSize: 4}, []int{4, 6}, 1, 12 + 2*4*2},
		{Format{Kind: Int4, GroupSize: 128}, []int{2, 256, 8}, 1, 2048 + 2*2*2*8}, // experts [E, in, out]
		{Format{Kind: FP8}, []int{4, 6}, 2, 0},
	}
	for _, tt := range tests {
		if got := tt.f.Bytes(tt.shape, tt.in); got != tt.want {
			t.Errorf("%s.Bytes(%v, %d) = %d, want %d", tt.f, tt.shape, tt.in, got, tt.want)
		}
	}
}
