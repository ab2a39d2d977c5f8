package backendtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// DefaultRelL2 is the relative L2 error allowed when Tolerance.RelL2 is 0: float32 arithmetic over the
// suite's sizes stays well inside it.
const DefaultRelL2 = 1e-5

// Tolerance bounds how far a backend's results may be from the float64 reference.
type Tolerance struct {
	// RelL2 is the largest allowed ‖got − want‖₂ / ‖want‖₂ for each op's output (‖got − want‖₂ when
	// want is all zeros). 0 means DefaultRelL2.
	RelL2 float64
}

// RoutingReader is the optional capability of reading a Routing back to the host: experts[t·k + j] is
// token t's j-th chosen expert (in Route's order) and scores[t·k + j] its score. Run uses it to check
// Route directly when ops implements it.
type RoutingReader interface {
	ReadRouting(r backend.Routing) (experts []int, scores []float32, err error)
}

// Run checks ops against the reference implementations, each op in its own subtest. It creates fresh
// tensors and caches and never calls ops from more than one goroutine.
func Run(t *testing.T, ops backend.Ops, tol Tolerance) {
	if tol.RelL2 == 0 {
		tol.RelL2 = DefaultRelL2
	}
	s := &suite{ops: ops, tol: tol}
	tests := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"Load", s.testLoad},
		{"FromFloat32", s.testFromFloat32},
		{"ReshapeRows", s.testReshapeRows},
		{"Concat", s.testConcat},
		{"Embed", s.testEmbed},
		{"RMSNorm", s.testRMSNorm},
		{"Linear", s.testLinear},
		{"Elementwise", s.testElementwise},
		{"ScaleRows", s.testScaleRows},
		{"RoPE", s.testRoPE},
		{"KVCache", s.testKVCache},
		{"Attention", s.testAttention},
		{"AttentionAppends", s.testAttentionAppends},
		{"BlockPool", s.testBlockPool},
		{"Route", s.testRoute},
		{"Experts", s.testExperts},
		{"ExpertsSplit", s.testExpertsSplit},
		{"ExpertMapper", s.testExpertMapper},
		{"ExpertTally", s.testExpertTally},
		{"Quantized", s.testQuantized},
		{"Foreign", s.testForeign},
		{"Sample", s.testSample},
		{"Encoder", s.testEncoder},
	}
	for _, tt := range tests {
		t.Run(tt.name, tt.fn)
	}
}

type suite struct {
	ops       backend.Ops
	tol       Tolerance
	blockSize int // of the pools newCache makes (0: 4)
}

// rng returns a generator seeded from the test's name, so each subtest has its own reproducible inputs.
func rng(t *testing.T) *rand.Rand {
	var h uint64 = 14695981039346656037
	for _, c := range []byte(t.Name()) {
		h = (h ^ uint64(c)) * 1099511628211
	}
	return rand.New(rand.NewPCG(h, 0x7470666c656574))
}

// uniform returns n values drawn uniformly from [-scale, scale).
func uniform(r *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (2*r.Float32() - 1) * scale
	}
	return v
}

// tensor makes a tensor from values, failing the test on error.
func (s *suite) tensor(t *testing.T, shape []int, values []float32) backend.Tensor {
	t.Helper()
	x, err := s.ops.FromFloat32(shape, values)
	if err != nil {
		t.Fatalf("FromFloat32(%v, [%d]) error: %v", shape, len(values), err)
	}
	return x
}

// read checks x's shape and returns its values.
func (s *suite) read(t *testing.T, what string, x backend.Tensor, shape ...int) []float32 {
	t.Helper()
	if got := x.Shape(); !slices.Equal(got, shape) {
		t.Fatalf("%s: shape = %v, want %v", what, got, shape)
	}
	v, err := s.ops.Float32(x)
	if err != nil {
		t.Fatalf("%s: Float32 error: %v", what, err)
	}
	if n := numel(shape); len(v) != n {
		t.Fatalf("%s: Float32 returned %d values, want %d", what, len(v), n)
	}
	return v
}

func numel(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// close fails the test when got is further than the tolerance from want or holds a NaN or infinity.
func (s *suite) close(t *testing.T, what string, got []float32, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d values, want %d", what, len(got), len(want))
		return
	}
	var num, den, worst float64
	at := -1
	for i, g := range got {
		if math.IsNaN(float64(g)) || math.IsInf(float64(g), 0) {
			t.Errorf("%s[%d] = %v, want %v (a NaN or infinity: uninitialised output?)", what, i, g, want[i])
			return
		}
		d := float64(g) - want[i]
		num += d * d
		den += want[i] * want[i]
		if math.Abs(d) > worst {
			worst, at = math.Abs(d), i
		}
	}
	rel := math.Sqrt(num)
	if den > 0 {
		rel /= math.Sqrt(den)
	}
	if rel > s.tol.RelL2 {
		t.Errorf("%s: relative L2 error = %.3g, want <= %.3g (worst: [%d] = %v, want %v)",
			what, rel, s.tol.RelL2, at, got[at], want[at])
	}
}

// poison makes and drops tensors full of NaN, so a backend whose allocator reuses freed memory without
// clearing it would show NaN in outputs it failed to write.
func (s *suite) poison(t *testing.T, elems int) {
	t.Helper()
	nan := make([]float32, elems)
	for i := range nan {
		nan[i] = float32(math.NaN())
	}
	for range 4 {
		a := s.tensor(t, []int{elems}, nan)
		if _, err := s.ops.Add(a, a); err != nil {
			t.Fatalf("Add(NaN[%d], NaN[%d]) error: %v", elems, elems, err)
		}
	}
}

// panicError is what call returns for a panic.
type panicError struct{ v any }

func (p panicError) Error() string { return fmt.Sprintf("panic: %v", p.v) }

// call runs fn and turns a panic into a panicError, so error-case tests report panics as failures.
func call(fn func() error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = panicError{p}
		}
	}()
	return fn()
}

// wantShapeErr fails the test unless fn returns an error wrapping backend.ErrShape.
func wantShapeErr(t *testing.T, what string, fn func() error) {
	t.Helper()
	if err := call(fn); !errors.Is(err, backend.ErrShape) {
		t.Errorf("%s error = %v, want one wrapping backend.ErrShape", what, err)
	}
}

// wantErr fails the test unless fn returns an error (without panicking).
func wantErr(t *testing.T, what string, fn func() error) {
	t.Helper()
	err := call(fn)
	var p panicError
	switch {
	case err == nil:
		t.Errorf("%s error = nil, want an error", what)
	case errors.As(err, &p):
		t.Errorf("%s: %v, want an error", what, err)
	}
}

func (s *suite) testLoad(t *testing.T) {
	le := binary.LittleEndian
	want := []float32{1, -2.5, 0, 0.15625, 3e-5, -65504}
	f32 := make([]byte, 4*len(want))
	bf16 := make([]byte, 2*len(want))
	for i, v := range want {
		le.PutUint32(f32[4*i:], math.Float32bits(v))
	}
	// bfloat16 keeps the top half of a float32; these values are exact in it except 3e-5 and -65504.
	wantBF16 := make([]float32, len(want))
	for i, v := range want {
		b := uint16(math.Float32bits(v) >> 16)
		le.PutUint16(bf16[2*i:], b)
		wantBF16[i] = math.Float32frombits(uint32(b) << 16)
	}
	// float16: 1, -2.5, 0, 0.15625, 2^-15 (a subnormal), -65504.
	f16 := []byte{0x00, 0x3c, 0x00, 0xc1, 0x00, 0x00, 0x00, 0x31, 0x00, 0x02, 0xff, 0xfb}
	wantF16 := []float32{1, -2.5, 0, 0.15625, 0x1p-15, -65504}
	for _, tc := range []struct {
		dt   safetensors.DType
		data []byte
		want []float32
	}{
		{safetensors.F32, f32, want},
		{safetensors.BF16, bf16, wantBF16},
		{safetensors.F16, f16, wantF16},
	} {
		x, err := s.ops.Load(tc.dt, []int{2, 3}, tc.data)
		if err != nil {
			t.Errorf("Load(%v, [2 3]) error: %v", tc.dt, err)
			continue
		}
		clear(tc.data) // Load must not keep a reference
		got := s.read(t, fmt.Sprintf("Load(%v)", tc.dt), x, 2, 3)
		if !slices.Equal(got, tc.want) {
			t.Errorf("Load(%v, [2 3]) = %v, want %v", tc.dt, got, tc.want)
		}
	}
	wantShapeErr(t, "Load(F32, [2 3], 20 bytes)", func() error {
		_, err := s.ops.Load(safetensors.F32, []int{2, 3}, make([]byte, 20))
		return err
	})
	wantShapeErr(t, "Load(BF16, [2 3], 24 bytes)", func() error {
		_, err := s.ops.Load(safetensors.BF16, []int{2, 3}, make([]byte, 24))
		return err
	})
	wantShapeErr(t, "Load(F32, [-1 2])", func() error {
		_, err := s.ops.Load(safetensors.F32, []int{-1, 2}, nil)
		return err
	})
	wantErr(t, "Load(DType(0))", func() error {
		_, err := s.ops.Load(safetensors.DType(0), []int{2}, make([]byte, 8))
		return err
	})
}

func (s *suite) testFromFloat32(t *testing.T) {
	vals := []float32{1, 2, 3, 4, 5, 6}
	x := s.tensor(t, []int{3, 2}, vals)
	vals[0] = 100 // FromFloat32 must copy
	got := s.read(t, "FromFloat32", x, 3, 2)
	if want := []float32{1, 2, 3, 4, 5, 6}; !slices.Equal(got, want) {
		t.Errorf("FromFloat32([3 2]) = %v, want %v", got, want)
	}
	got[1] = 100 // Float32 must copy
	if again := s.read(t, "Float32 again", x, 3, 2); again[1] != 2 {
		t.Errorf("Float32 after modifying an earlier result: [1] = %v, want 2", again[1])
	}
	empty := s.tensor(t, []int{0, 4}, nil)
	s.read(t, "FromFloat32([0 4])", empty, 0, 4)
	for _, tc := range []struct {
		shape []int
		n     int
	}{{[]int{3, 2}, 5}, {[]int{3, 2}, 7}, {[]int{-1, 2}, 0}, {[]int{-2, -3}, 6}} {
		wantShapeErr(t, fmt.Sprintf("FromFloat32(%v, [%d])", tc.shape, tc.n), func() error {
			_, err := s.ops.FromFloat32(tc.shape, make([]float32, tc.n))
			return err
		})
	}
}

func (s *suite) testReshapeRows(t *testing.T) {
	r := rng(t)
	vals := uniform(r, 4*3*5, 1)
	x := s.tensor(t, []int{4, 3, 5}, vals)
	y, err := s.ops.Reshape(x, 12, 5)
	if err != nil {
		t.Fatalf("Reshape([4 3 5], 12, 5) error: %v", err)
	}
	if got := s.read(t, "Reshape", y, 12, 5); !slices.Equal(got, vals) {
		t.Errorf("Reshape([4 3 5], 12, 5) = %v, want %v", got, vals)
	}
	for _, tc := range []struct{ start, end int }{{0, 4}, {1, 3}, {3, 4}, {2, 2}} {
		z, err := s.ops.Rows(x, tc.start, tc.end)
		if err != nil {
			t.Errorf("Rows([4 3 5], %d, %d) error: %v", tc.start, tc.end, err)
			continue
		}
		got := s.read(t, "Rows", z, tc.end-tc.start, 3, 5)
		if want := vals[tc.start*15 : tc.end*15]; !slices.Equal(got, want) {
			t.Errorf("Rows([4 3 5], %d, %d) = %v, want %v", tc.start, tc.end, got, want)
		}
	}
	// Views must be usable as operands, and leave their source unchanged.
	z, err := s.ops.Rows(y, 2, 5)
	if err != nil {
		t.Fatalf("Rows([12 5], 2, 5) error: %v", err)
	}
	sum, err := s.ops.Add(z, z)
	if err != nil {
		t.Fatalf("Add(view, view) error: %v", err)
	}
	want := make([]float64, 15)
	for i := range want {
		want[i] = 2 * float64(vals[10+i])
	}
	s.close(t, "Add(Rows(Reshape(x)))", s.read(t, "Add(view)", sum, 3, 5), want)
	if got := s.read(t, "x after views", x, 4, 3, 5); !slices.Equal(got, vals) {
		t.Errorf("x changed after ops on its views: %v, want %v", got, vals)
	}

	for _, shape := range [][]int{{61}, {4, 16}, {-4, -15}, {}} {
		wantShapeErr(t, fmt.Sprintf("Reshape([4 3 5], %v)", shape), func() error {
			_, err := s.ops.Reshape(x, shape...)
			return err
		})
	}
	for _, tc := range []struct{ start, end int }{{-1, 2}, {3, 2}, {0, 5}, {5, 5}} {
		wantShapeErr(t, fmt.Sprintf("Rows([4 3 5], %d, %d)", tc.start, tc.end), func() error {
			_, err := s.ops.Rows(x, tc.start, tc.end)
			return err
		})
	}
}

func (s *suite) testConcat(t *testing.T) {
	r := rng(t)
	a, b, c := uniform(r, 2*3*4, 1), uniform(r, 1*3*4, 1), uniform(r, 5*3*4, 1)
	x, err := s.ops.Concat(s.tensor(t, []int{2, 3, 4}, a), s.tensor(t, []int{1, 3, 4}, b), s.tensor(t, []int{5, 3, 4}, c))
	if err != nil {
		t.Fatalf("Concat([2 3 4], [1 3 4], [5 3 4]) error: %v", err)
	}
	want := append(append(slices.Clone(a), b...), c...)
	if got := s.read(t, "Concat", x, 8, 3, 4); !slices.Equal(got, want) {
		t.Errorf("Concat = %v, want %v", got, want)
	}
	// Rows of a concatenation are the pieces again.
	y, err := s.ops.Rows(x, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.read(t, "Rows(Concat)", y, 1, 3, 4); !slices.Equal(got, b) {
		t.Errorf("Rows(Concat, 2, 3) = %v, want %v", got, b)
	}
	one, err := s.ops.Concat(s.tensor(t, []int{1, 3, 4}, b))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.read(t, "Concat(one)", one, 1, 3, 4); !slices.Equal(got, b) {
		t.Errorf("Concat(one) = %v, want %v", got, b)
	}
	wantShapeErr(t, "Concat()", func() error { _, err := s.ops.Concat(); return err })
	wantShapeErr(t, "Concat([2 3 4], [1 4 3])", func() error {
		_, err := s.ops.Concat(s.tensor(t, []int{2, 3, 4}, a), s.tensor(t, []int{1, 4, 3}, b))
		return err
	})
}

func (s *suite) testEmbed(t *testing.T) {
	r := rng(t)
	for _, tc := range []struct{ V, H, first int }{{11, 64, 0}, {7, 96, 5}, {1, 64, 3}} {
		table := uniform(r, tc.V*tc.H, 1)
		tt := s.tensor(t, []int{tc.V, tc.H}, table)
		ids := []int{tc.first, tc.first + tc.V - 1, tc.first - 1, tc.first + tc.V, -1, 1 << 20}
		for range 11 {
			ids = append(ids, tc.first+r.IntN(tc.V))
		}
		want := make([]float64, len(ids)*tc.H)
		for i, id := range ids {
			if id < tc.first || id >= tc.first+tc.V {
				continue
			}
			for c := 0; c < tc.H; c++ {
				want[i*tc.H+c] = float64(table[(id-tc.first)*tc.H+c])
			}
		}
		s.poison(t, len(want))
		x, err := s.ops.Embed(tt, ids, tc.first)
		if err != nil {
			t.Fatalf("Embed([%d %d], ids, %d) error: %v", tc.V, tc.H, tc.first, err)
		}
		got := s.read(t, "Embed", x, len(ids), tc.H)
		for i, g := range got {
			if float64(g) != want[i] { // a gather is exact
				t.Errorf("Embed([%d %d], id %d, first %d)[%d] = %v, want %v",
					tc.V, tc.H, ids[i/tc.H], tc.first, i%tc.H, g, want[i])
				break
			}
		}
	}
	flat := s.tensor(t, []int{64}, make([]float32, 64))
	wantShapeErr(t, "Embed([64], ...)", func() error {
		_, err := s.ops.Embed(flat, []int{0}, 0)
		return err
	})
}

func (s *suite) testRMSNorm(t *testing.T) {
	r := rng(t)
	for _, shape := range [][]int{{1, 64}, {3, 64}, {17, 96}, {2, 3, 16}} {
		n := shape[len(shape)-1]
		xv := uniform(r, numel(shape), 3)
		wv := uniform(r, n, 2)
		x := s.tensor(t, shape, xv)
		w := s.tensor(t, []int{n}, wv)
		for _, weighted := range []bool{false, true} {
			var wt backend.Tensor
			var wref []float32
			if weighted {
				wt, wref = w, wv
			}
			s.poison(t, len(xv))
			y, err := s.ops.RMSNorm(x, wt, 1e-5)
			if err != nil {
				t.Fatalf("RMSNorm(%v, weighted %v) error: %v", shape, weighted, err)
			}
			s.close(t, fmt.Sprintf("RMSNorm(%v, weighted %v)", shape, weighted),
				s.read(t, "RMSNorm", y, shape...), refRMSNorm(xv, wref, n, 1e-5))
		}
	}
	// A zero row gives zeros, not NaN: eps keeps the root positive.
	z := s.tensor(t, []int{2, 8}, make([]float32, 16))
	y, err := s.ops.RMSNorm(z, nil, 1e-5)
	if err != nil {
		t.Fatalf("RMSNorm(zeros) error: %v", err)
	}
	s.close(t, "RMSNorm(zeros)", s.read(t, "RMSNorm(zeros)", y, 2, 8), make([]float64, 16))

	x := s.tensor(t, []int{3, 64}, uniform(r, 3*64, 1))
	for _, wshape := range [][]int{{63}, {3, 64}, {1, 64}} {
		w := s.tensor(t, wshape, make([]float32, numel(wshape)))
		wantShapeErr(t, fmt.Sprintf("RMSNorm([3 64], weight %v)", wshape), func() error {
			_, err := s.ops.RMSNorm(x, w, 1e-5)
			return err
		})
	}
}

func (s *suite) testLinear(t *testing.T) {
	r := rng(t)
	for _, T := range []int{1, 3, 17} {
		for _, in := range []int{64, 96, 13} {
			for _, out := range []int{32, 50} {
				xv := uniform(r, T*in, 1)
				wv := uniform(r, out*in, 0.2)
				x := s.tensor(t, []int{T, in}, xv)
				w := s.tensor(t, []int{out, in}, wv)
				s.poison(t, T*out)
				y, err := s.ops.Linear(x, w)
				if err != nil {
					t.Fatalf("Linear([%d %d], [%d %d]) error: %v", T, in, out, in, err)
				}
				s.close(t, fmt.Sprintf("Linear([%d %d], [%d %d])", T, in, out, in),
					s.read(t, "Linear", y, T, out), refLinear(xv, wv, T, in, out))
			}
		}
	}
	for _, tc := range []struct{ x, w []int }{
		{[]int{3, 64}, []int{32, 63}},
		{[]int{3, 64}, []int{64}},
		{[]int{64}, []int{32, 64}},
		{[]int{3, 64}, []int{2, 32, 64}},
	} {
		x := s.tensor(t, tc.x, make([]float32, numel(tc.x)))
		w := s.tensor(t, tc.w, make([]float32, numel(tc.w)))
		wantShapeErr(t, fmt.Sprintf("Linear(%v, %v)", tc.x, tc.w), func() error {
			_, err := s.ops.Linear(x, w)
			return err
		})
	}
}

func (s *suite) testElementwise(t *testing.T) {
	r := rng(t)
	for _, shape := range [][]int{{1, 64}, {17, 96}, {3, 5, 7}} {
		n := numel(shape)
		av, bv := uniform(r, n, 6), uniform(r, n, 3)
		a, b := s.tensor(t, shape, av), s.tensor(t, shape, bv)
		wantAdd, wantSiLU := make([]float64, n), make([]float64, n)
		for i := range av {
			wantAdd[i] = float64(av[i]) + float64(bv[i])
			wantSiLU[i] = refSiLU(float64(av[i])) * float64(bv[i])
		}
		s.poison(t, n)
		sum, err := s.ops.Add(a, b)
		if err != nil {
			t.Fatalf("Add(%v) error: %v", shape, err)
		}
		s.close(t, fmt.Sprintf("Add(%v)", shape), s.read(t, "Add", sum, shape...), wantAdd)
		s.poison(t, n)
		prod, err := s.ops.SiLUMul(a, b)
		if err != nil {
			t.Fatalf("SiLUMul(%v) error: %v", shape, err)
		}
		s.close(t, fmt.Sprintf("SiLUMul(%v)", shape), s.read(t, "SiLUMul", prod, shape...), wantSiLU)
	}
	// Large gates: silu(g) → g for g ≫ 0 and → 0 (not NaN) for g ≪ 0.
	g := s.tensor(t, []int{4}, []float32{-200, -90, 90, 200})
	one := s.tensor(t, []int{4}, []float32{1, 1, 1, 1})
	prod, err := s.ops.SiLUMul(g, one)
	if err != nil {
		t.Fatalf("SiLUMul(large) error: %v", err)
	}
	s.close(t, "SiLUMul([-200 -90 90 200])", s.read(t, "SiLUMul(large)", prod, 4),
		[]float64{refSiLU(-200), refSiLU(-90), 90, 200})

	a := s.tensor(t, []int{3, 4}, make([]float32, 12))
	for _, shape := range [][]int{{4, 3}, {12}, {3, 5}} {
		b := s.tensor(t, shape, make([]float32, numel(shape)))
		wantShapeErr(t, fmt.Sprintf("Add([3 4], %v)", shape), func() error {
			_, err := s.ops.Add(a, b)
			return err
		})
		wantShapeErr(t, fmt.Sprintf("SiLUMul([3 4], %v)", shape), func() error {
			_, err := s.ops.SiLUMul(a, b)
			return err
		})
	}
}

func (s *suite) testScaleRows(t *testing.T) {
	r := rng(t)
	for _, shape := range [][]int{{1, 64}, {3, 64}, {17, 4, 16}} {
		n := numel(shape)
		xv := uniform(r, n, 2)
		sc := uniform(r, shape[0], 3)
		x := s.tensor(t, shape, xv)
		row := n / shape[0]
		want := make([]float64, n)
		for i := range want {
			want[i] = float64(xv[i]) * float64(sc[i/row])
		}
		s.poison(t, n)
		y, err := s.ops.ScaleRows(x, sc)
		if err != nil {
			t.Fatalf("ScaleRows(%v) error: %v", shape, err)
		}
		s.close(t, fmt.Sprintf("ScaleRows(%v)", shape), s.read(t, "ScaleRows", y, shape...), want)
	}
	x := s.tensor(t, []int{3, 64}, make([]float32, 3*64))
	for _, n := range []int{2, 4, 0} {
		wantShapeErr(t, fmt.Sprintf("ScaleRows([3 64], scale[%d])", n), func() error {
			_, err := s.ops.ScaleRows(x, make([]float32, n))
			return err
		})
	}
}

// invFreq returns Llama's RoPE frequencies 1/theta^(2i/D), in float32.
func invFreq(D int, theta float64) []float32 {
	f := make([]float32, D/2)
	for i := range f {
		f[i] = float32(1 / math.Pow(theta, float64(2*i)/float64(D)))
	}
	return f
}

func (s *suite) testRoPE(t *testing.T) {
	r := rng(t)
	for _, tc := range []struct{ T, heads, D int }{{1, 1, 16}, {3, 4, 64}, {17, 3, 128}, {5, 2, 6}} {
		xv := uniform(r, tc.T*tc.heads*tc.D, 2)
		pos := []int{0, 8191, 100003, 1, 7}
		for len(pos) < tc.T {
			pos = append(pos, r.IntN(1<<17))
		}
		pos = pos[:tc.T]
		f := invFreq(tc.D, 500000)
		x := s.tensor(t, []int{tc.T, tc.heads, tc.D}, xv)
		s.poison(t, len(xv))
		y, err := s.ops.RoPE(x, pos, f)
		if err != nil {
			t.Fatalf("RoPE([%d %d %d]) error: %v", tc.T, tc.heads, tc.D, err)
		}
		s.close(t, fmt.Sprintf("RoPE([%d %d %d], pos %v)", tc.T, tc.heads, tc.D, pos),
			s.read(t, "RoPE", y, tc.T, tc.heads, tc.D), refRoPE(xv, pos, f, tc.T, tc.heads, tc.D))
	}
	x := s.tensor(t, []int{3, 2, 16}, make([]float32, 96))
	odd := s.tensor(t, []int{3, 2, 15}, make([]float32, 90))
	flat := s.tensor(t, []int{3, 32}, make([]float32, 96))
	for _, tc := range []struct {
		name string
		x    backend.Tensor
		pos  int
		freq int
	}{
		{"pos[2]", x, 2, 8},
		{"invFreq[7]", x, 3, 7},
		{"odd D", odd, 3, 7},
		{"rank 2", flat, 3, 16},
	} {
		wantShapeErr(t, "RoPE "+tc.name, func() error {
			_, err := s.ops.RoPE(tc.x, make([]int, tc.pos), make([]float32, tc.freq))
			return err
		})
	}
}

// kvData is what the reference keeps of a cache: every appended position's key and value rows.
type kvData struct {
	keys, vals map[int][]float32
}

func newKVData() *kvData { return &kvData{keys: map[int][]float32{}, vals: map[int][]float32{}} }

// appendKV makes random k and v for positions pos, appends them to c and records them in d.
func (s *suite) appendKV(t *testing.T, r *rand.Rand, c backend.KVCache, d *kvData, pos []int, kvHeads, D int) {
	t.Helper()
	T := len(pos)
	kv, vv := uniform(r, T*kvHeads*D, 1), uniform(r, T*kvHeads*D, 1)
	k := s.tensor(t, []int{T, kvHeads, D}, kv)
	v := s.tensor(t, []int{T, kvHeads, D}, vv)
	if err := c.Append(k, v, pos); err != nil {
		t.Fatalf("Append(pos %v) error: %v", pos, err)
	}
	for i, p := range pos {
		d.keys[p] = kv[i*kvHeads*D : (i+1)*kvHeads*D]
		d.vals[p] = vv[i*kvHeads*D : (i+1)*kvHeads*D]
	}
}

// newCache makes a cache of capacity positions under w in a growing pool of blocks of s.blockSize
// positions (4 unless a test sets it: several blocks even in small tests).
func (s *suite) newCache(t *testing.T, kvHeads, D, capacity int, w backend.Window) (backend.KVCache, error) {
	t.Helper()
	bs := s.blockSize
	if bs == 0 {
		bs = 4
	}
	pool, err := s.ops.NewBlockPool(kvHeads, D, bs, 0)
	if err != nil {
		t.Fatalf("NewBlockPool(%d, %d, block size %d) error: %v", kvHeads, D, bs, err)
	}
	return s.ops.NewKVCache(pool, capacity, w)
}

func span(from, to int) []int {
	p := make([]int, 0, to-from)
	for i := from; i < to; i++ {
		p = append(p, i)
	}
	return p
}

func (s *suite) testKVCache(t *testing.T) {
	r := rng(t)
	const kvHeads, D = 2, 8
	for _, tc := range []struct{ kvHeads, D, capacity, chunk int }{
		{0, 8, 16, 0}, {2, 0, 16, 0}, {2, 8, 0, 0}, {2, 8, 16, -1},
	} {
		wantShapeErr(t, fmt.Sprintf("NewBlockPool(%d, %d) + NewKVCache(%d, chunk %d)", tc.kvHeads, tc.D, tc.capacity, tc.chunk), func() error {
			pool, err := s.ops.NewBlockPool(tc.kvHeads, tc.D, 4, 0)
			if err != nil {
				return err
			}
			_, err = s.ops.NewKVCache(pool, tc.capacity, backend.Window{Chunk: tc.chunk})
			return err
		})
	}

	c, err := s.newCache(t, kvHeads, D, 16, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	if c.Len() != 0 || c.Kept() != 0 {
		t.Errorf("new cache: Len, Kept = %d, %d, want 0, 0", c.Len(), c.Kept())
	}
	d := newKVData()
	s.appendKV(t, r, c, d, span(0, 3), kvHeads, D)
	if c.Len() != 3 || c.Kept() != 3 {
		t.Errorf("after Append(0..2): Len, Kept = %d, %d, want 3, 3", c.Len(), c.Kept())
	}
	good := func(T int) (backend.Tensor, backend.Tensor) {
		return s.tensor(t, []int{T, kvHeads, D}, make([]float32, T*kvHeads*D)),
			s.tensor(t, []int{T, kvHeads, D}, make([]float32, T*kvHeads*D))
	}
	k1, v1 := good(1)
	k2, v2 := good(2)
	for _, tc := range []struct {
		name string
		pos  []int
	}{
		{"gap", []int{4}},
		{"repeat", []int{2}},
		{"backwards", []int{0}},
		{"not increasing", []int{3, 3}},
		{"skipping", []int{3, 5}},
	} {
		k, v := k1, v1
		if len(tc.pos) == 2 {
			k, v = k2, v2
		}
		wantErr(t, fmt.Sprintf("Append(pos %v) after 0..2 (%s)", tc.pos, tc.name), func() error {
			return c.Append(k, v, tc.pos)
		})
		if c.Len() != 3 {
			t.Errorf("Len after a failed Append(pos %v) = %d, want 3", tc.pos, c.Len())
		}
	}
	wrongHeads := s.tensor(t, []int{1, kvHeads + 1, D}, make([]float32, (kvHeads+1)*D))
	wrongDim := s.tensor(t, []int{1, kvHeads, D - 1}, make([]float32, kvHeads*(D-1)))
	for _, tc := range []struct {
		name string
		k, v backend.Tensor
		pos  []int
	}{
		{"k heads", wrongHeads, v1, []int{3}},
		{"v dim", k1, wrongDim, []int{3}},
		{"len(pos)", k1, v1, []int{3, 4}},
		{"k vs v rows", k2, v1, []int{3}},
	} {
		wantShapeErr(t, "Append "+tc.name, func() error { return c.Append(tc.k, tc.v, tc.pos) })
	}
	s.appendKV(t, r, c, d, span(3, 16), kvHeads, D)
	if c.Len() != 16 || c.Kept() != 16 {
		t.Errorf("after Append(0..15): Len, Kept = %d, %d, want 16, 16", c.Len(), c.Kept())
	}
	wantErr(t, "Append(pos 16) past capacity 16", func() error { return c.Append(k1, v1, []int{16}) })

	// A chunked cache keeps at most the chunk of the last position plus the positions just appended.
	const chunk = 4
	c, err = s.newCache(t, kvHeads, D, 64, backend.Window{Chunk: chunk})
	if err != nil {
		t.Fatalf("NewKVCache(chunk 4) error: %v", err)
	}
	d = newKVData()
	next := 0
	prefillKept := 0
	for _, T := range []int{10, 1, 1, 3, 1, 7, 1, 1, 1, 1} {
		s.appendKV(t, r, c, d, span(next, next+T), kvHeads, D)
		next += T
		last := next - 1
		from := next - T
		need := last - (from - from%chunk) + 1 // every key the new queries may see
		if c.Len() != next || c.Kept() < need || c.Kept() > chunk+T {
			t.Errorf("chunk 4, after Append(%d..%d): Len, Kept = %d, %d, want %d, in [%d, %d]",
				from, last, c.Len(), c.Kept(), next, need, chunk+T)
		}
		if next == 10 {
			prefillKept = c.Kept()
		}
		if next == 11 && c.Kept() >= prefillKept {
			t.Errorf("chunk 4: Kept after the step after a 10-position prefill = %d, want < %d", c.Kept(), prefillKept)
		}
	}
}

func (s *suite) testAttention(t *testing.T) {
	r := rng(t)
	for _, tc := range []struct {
		T, heads, kvHeads, D, chunk int
		qScale                      float32
	}{
		{1, 4, 2, 16, 0, 1},
		{3, 4, 4, 16, 0, 1},
		{17, 6, 2, 32, 0, 1},
		{17, 8, 1, 16, 5, 1},
		{17, 4, 2, 64, 4, 1},
		{9, 2, 1, 16, 0, 3000}, // scores beyond even float64 exp's range: the softmax must subtract the max
	} {
		name := fmt.Sprintf("Attention(T %d, heads %d/%d, D %d, chunk %d, q×%v)", tc.T, tc.heads, tc.kvHeads, tc.D, tc.chunk, tc.qScale)
		w := backend.Window{Chunk: tc.chunk}
		c, err := s.newCache(t, tc.kvHeads, tc.D, 64, w)
		if err != nil {
			t.Fatalf("%s: NewKVCache error: %v", name, err)
		}
		d := newKVData()
		pos := span(0, tc.T)
		s.appendKV(t, r, c, d, pos, tc.kvHeads, tc.D)
		qv := uniform(r, tc.T*tc.heads*tc.D, tc.qScale)
		q := s.tensor(t, []int{tc.T, tc.heads, tc.D}, qv)
		scale := float32(1 / math.Sqrt(float64(tc.D)))
		s.poison(t, len(qv))
		y, err := s.ops.Attention(q, c, pos, w, scale)
		if err != nil {
			t.Fatalf("%s error: %v", name, err)
		}
		s.close(t, name, s.read(t, name, y, tc.T, tc.heads, tc.D),
			refAttention(qv, pos, d.keys, d.vals, tc.heads, tc.kvHeads, tc.D, tc.chunk, scale))
	}

	c, err := s.newCache(t, 2, 16, 64, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	s.appendKV(t, r, c, newKVData(), span(0, 5), 2, 16)
	for _, tc := range []struct {
		name  string
		shape []int
		pos   []int
	}{
		{"D", []int{1, 4, 8}, []int{4}},
		{"heads not a multiple of kvHeads", []int{1, 3, 16}, []int{4}},
		{"len(pos)", []int{2, 4, 16}, []int{4}},
		{"rank 2", []int{1, 64}, []int{4}},
	} {
		q := s.tensor(t, tc.shape, make([]float32, numel(tc.shape)))
		wantShapeErr(t, "Attention "+tc.name, func() error {
			_, err := s.ops.Attention(q, c, tc.pos, backend.Window{}, 1)
			return err
		})
	}
	q := s.tensor(t, []int{1, 4, 16}, make([]float32, 64))
	wantErr(t, "Attention(pos 5) over a cache holding 0..4", func() error {
		_, err := s.ops.Attention(q, c, []int{5}, backend.Window{}, 1)
		return err
	})
	empty, err := s.newCache(t, 2, 16, 64, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	wantErr(t, "Attention over an empty cache", func() error {
		_, err := s.ops.Attention(q, empty, []int{0}, backend.Window{}, 1)
		return err
	})
}

// testAttentionAppends checks that attention after several Appends (prefill pieces crossing chunk
// boundaries, then decode steps) equals attention over one Append of everything and the reference.
func (s *suite) testAttentionAppends(t *testing.T) {
	r := rng(t)
	const heads, kvHeads, D, total = 4, 2, 16, 23
	scale := float32(0.25)
	defer func() { s.blockSize = 0 }()
	for _, tc := range []struct{ chunk, block int }{{0, 4}, {4, 4}, {6, 4}, {0, 1}, {6, 1}, {6, 5}, {4, 16}, {0, 16}} {
		chunk := tc.chunk
		s.blockSize = tc.block
		w := backend.Window{Chunk: chunk}
		kv := uniform(r, total*kvHeads*D, 1)
		vv := uniform(r, total*kvHeads*D, 1)
		qv := uniform(r, total*heads*D, 1)
		d := newKVData()
		for p := 0; p < total; p++ {
			d.keys[p] = kv[p*kvHeads*D : (p+1)*kvHeads*D]
			d.vals[p] = vv[p*kvHeads*D : (p+1)*kvHeads*D]
		}
		rows := func(v []float32, from, to, width int) []float32 { return v[from*width : to*width] }

		one, err := s.newCache(t, kvHeads, D, total, w)
		if err != nil {
			t.Fatalf("NewKVCache error: %v", err)
		}
		all := span(0, total)
		if err := one.Append(s.tensor(t, []int{total, kvHeads, D}, kv), s.tensor(t, []int{total, kvHeads, D}, vv), all); err != nil {
			t.Fatalf("Append(0..%d) error: %v", total-1, err)
		}
		y, err := s.ops.Attention(s.tensor(t, []int{total, heads, D}, qv), one, all, w, scale)
		if err != nil {
			t.Fatalf("Attention(one Append, chunk %d, block %d) error: %v", chunk, tc.block, err)
		}
		whole := s.read(t, "Attention(one Append)", y, total, heads, D)
		s.close(t, fmt.Sprintf("Attention(one Append, chunk %d)", chunk), whole,
			refAttention(qv, all, d.keys, d.vals, heads, kvHeads, D, chunk, scale))

		many, err := s.newCache(t, kvHeads, D, total, w)
		if err != nil {
			t.Fatalf("NewKVCache error: %v", err)
		}
		var pieces []float32
		for from := 0; from < total; {
			T := 7
			if from >= 14 {
				T = 1 // decode steps
			}
			to := min(from+T, total)
			pos := span(from, to)
			k := s.tensor(t, []int{to - from, kvHeads, D}, rows(kv, from, to, kvHeads*D))
			v := s.tensor(t, []int{to - from, kvHeads, D}, rows(vv, from, to, kvHeads*D))
			if err := many.Append(k, v, pos); err != nil {
				t.Fatalf("Append(%d..%d) error: %v", from, to-1, err)
			}
			q := s.tensor(t, []int{to - from, heads, D}, rows(qv, from, to, heads*D))
			y, err := s.ops.Attention(q, many, pos, w, scale)
			if err != nil {
				t.Fatalf("Attention(pos %d..%d, chunk %d) after several Appends error: %v", from, to-1, chunk, err)
			}
			pieces = append(pieces, s.read(t, "Attention(piece)", y, to-from, heads, D)...)
			from = to
		}
		want := make([]float64, len(whole))
		for i, v := range whole {
			want[i] = float64(v)
		}
		s.close(t, fmt.Sprintf("Attention(several Appends, chunk %d, block %d) vs one Append", chunk, tc.block), pieces, want)
		if chunk > 0 && many.Kept() > chunk+1 {
			t.Errorf("chunk %d: Kept after decode steps = %d, want <= %d", chunk, many.Kept(), chunk+1)
		}
		if chunk > 0 {
			// The cache has dropped early positions, so a global query over it cannot be answered.
			q := s.tensor(t, []int{1, heads, D}, rows(qv, total-1, total, heads*D))
			wantErr(t, fmt.Sprintf("global Attention over a chunk-%d cache that dropped positions", chunk), func() error {
				_, err := s.ops.Attention(q, many, []int{total - 1}, backend.Window{}, scale)
				return err
			})
		}
	}
}

func (s *suite) testRoute(t *testing.T) {
	r := rng(t)
	reader, canRead := s.ops.(RoutingReader)
	check := func(name string, logits []float32, T, E, k int) {
		t.Helper()
		rt, err := s.ops.Route(s.tensor(t, []int{T, E}, logits), k)
		if err != nil {
			t.Fatalf("%s: Route error: %v", name, err)
		}
		if rt.TopK() != k {
			t.Errorf("%s: TopK() = %d, want %d", name, rt.TopK(), k)
		}
		wantE, wantS := refRoute(logits, T, E, k)
		if canRead {
			gotE, gotS, err := reader.ReadRouting(rt)
			if err != nil {
				t.Fatalf("%s: ReadRouting error: %v", name, err)
			}
			if !slices.Equal(gotE, wantE) {
				t.Errorf("%s: experts = %v, want %v", name, gotE, wantE)
			}
			s.close(t, name+" scores", gotS, wantS)
		}
		// Through Experts: with random weights each expert gives a different output, so a wrong choice or
		// score shows in the result.
		s.checkExperts(t, name, r, logits, T, E, k, 16, 8)
	}
	for _, tc := range []struct{ T, E, k int }{{1, 4, 1}, {3, 4, 2}, {17, 16, 2}, {5, 8, 4}} {
		check(fmt.Sprintf("Route(random [%d %d], k %d)", tc.T, tc.E, tc.k), uniform(r, tc.T*tc.E, 4), tc.T, tc.E, tc.k)
	}
	ties := []float32{
		1, 3, 3, 0, 3, // k 2 → 1, 2
		2, 2, 2, 2, 2, // → 0, 1
		-1, 5, -1, 5, -1, // → 1, 3
		0, 0, 0, 0, 1, // → 4, 0
	}
	check("Route(ties, k 2)", ties, 4, 5, 2)
	check("Route(ties, k 1)", ties, 4, 5, 1)
	check("Route(ties, k 3)", ties, 4, 5, 3)
	if canRead {
		rt, err := s.ops.Route(s.tensor(t, []int{4, 5}, ties), 2)
		if err != nil {
			t.Fatalf("Route(ties) error: %v", err)
		}
		got, _, err := reader.ReadRouting(rt)
		if err != nil {
			t.Fatalf("ReadRouting error: %v", err)
		}
		if want := []int{1, 2, 0, 1, 1, 3, 4, 0}; !slices.Equal(got, want) {
			t.Errorf("Route(ties, k 2) experts = %v, want %v", got, want)
		}
	}

	logits := s.tensor(t, []int{3, 4}, make([]float32, 12))
	for _, k := range []int{0, -1, 5} {
		wantShapeErr(t, fmt.Sprintf("Route([3 4], k %d)", k), func() error {
			_, err := s.ops.Route(logits, k)
			return err
		})
	}
	flat := s.tensor(t, []int{12}, make([]float32, 12))
	wantShapeErr(t, "Route([12], k 1)", func() error {
		_, err := s.ops.Route(flat, 1)
		return err
	})
}

// expertWeights are random expert weights scaled so that the activations stay near 1.
func expertWeights(r *rand.Rand, E, H, I int) (gateUp, down []float32) {
	return uniform(r, E*H*2*I, float32(2/math.Sqrt(float64(H)))), uniform(r, E*I*H, float32(2/math.Sqrt(float64(I))))
}

// checkExperts routes logits [T, E] with the backend and compares Experts on random x and weights with
// the reference, which routes by itself.
func (s *suite) checkExperts(t *testing.T, name string, r *rand.Rand, logits []float32, T, E, k, H, I int) {
	t.Helper()
	xv := uniform(r, T*H, 1)
	gu, dn := expertWeights(r, E, H, I)
	rt, err := s.ops.Route(s.tensor(t, []int{T, E}, logits), k)
	if err != nil {
		t.Fatalf("%s: Route error: %v", name, err)
	}
	s.poison(t, T*H)
	y, err := s.ops.Experts(s.tensor(t, []int{T, H}, xv), rt,
		s.tensor(t, []int{E, H, 2 * I}, gu), s.tensor(t, []int{E, I, H}, dn), 0)
	if err != nil {
		t.Fatalf("%s: Experts error: %v", name, err)
	}
	experts, scores := refRoute(logits, T, E, k)
	s.close(t, name+" → Experts", s.read(t, name+" → Experts", y, T, H),
		refExperts(xv, experts, scores, k, gu, dn, T, H, E, I, 0))
}

func (s *suite) testExperts(t *testing.T) {
	r := rng(t)
	for _, tc := range []struct{ T, E, k, H, I int }{
		{1, 4, 1, 64, 32}, {3, 4, 2, 64, 32}, {17, 4, 2, 96, 48}, {17, 4, 1, 96, 40}, {9, 8, 3, 64, 20},
	} {
		s.checkExperts(t, fmt.Sprintf("Experts(T %d, E %d, k %d, H %d, I %d)", tc.T, tc.E, tc.k, tc.H, tc.I),
			r, uniform(r, tc.T*tc.E, 3), tc.T, tc.E, tc.k, tc.H, tc.I)
	}

	const T, E, H, I = 3, 4, 16, 8
	x := s.tensor(t, []int{T, H}, uniform(r, T*H, 1))
	rt, err := s.ops.Route(s.tensor(t, []int{T, E}, uniform(r, T*E, 1)), 2)
	if err != nil {
		t.Fatalf("Route error: %v", err)
	}
	gu, dn := expertWeights(r, E, H, I)
	guT := s.tensor(t, []int{E, H, 2 * I}, gu)
	dnT := s.tensor(t, []int{E, I, H}, dn)
	// No chosen expert in range: exact zeros, even over poisoned memory.
	for _, first := range []int{E, -E, 100} {
		s.poison(t, T*H)
		y, err := s.ops.Experts(x, rt, guT, dnT, first)
		if err != nil {
			t.Fatalf("Experts(first %d) error: %v", first, err)
		}
		for i, v := range s.read(t, "Experts(out of range)", y, T, H) {
			if v != 0 {
				t.Errorf("Experts(first %d, experts 0..%d chosen)[%d] = %v, want 0", first, E-1, i, v)
				break
			}
		}
	}

	wrong := func(shape ...int) backend.Tensor { return s.tensor(t, shape, make([]float32, numel(shape))) }
	for _, tc := range []struct {
		name        string
		x, gu, down backend.Tensor
	}{
		{"x H", wrong(T, H+1), guT, dnT},
		{"x rows", wrong(T+1, H), guT, dnT},
		{"gateUp E", x, wrong(E+1, H, 2*I), dnT},
		{"gateUp 2I", x, wrong(E, H, 2*I+2), dnT},
		{"gateUp odd", x, wrong(E, H, 2*I-1), dnT},
		{"down H", x, guT, wrong(E, I, H+1)},
		{"down rank", x, guT, wrong(E*I, H)},
		{"x rank", wrong(T, H, 1), guT, dnT},
	} {
		wantShapeErr(t, "Experts "+tc.name, func() error {
			_, err := s.ops.Experts(tc.x, rt, tc.gu, tc.down, 0)
			return err
		})
	}
}

// testExpertsSplit checks the expert-parallel contract: two ranks holding experts [0, E/2) and [E/2, E)
// (first = 0 and E/2) sum to the output of one rank holding all E.
func (s *suite) testExpertsSplit(t *testing.T) {
	r := rng(t)
	for _, tc := range []struct{ T, E, k, H, I int }{{1, 4, 1, 64, 32}, {17, 4, 2, 96, 48}, {5, 8, 2, 64, 16}} {
		name := fmt.Sprintf("Experts split (T %d, E %d, k %d)", tc.T, tc.E, tc.k)
		xv := uniform(r, tc.T*tc.H, 1)
		logits := uniform(r, tc.T*tc.E, 3)
		gu, dn := expertWeights(r, tc.E, tc.H, tc.I)
		x := s.tensor(t, []int{tc.T, tc.H}, xv)
		rt, err := s.ops.Route(s.tensor(t, []int{tc.T, tc.E}, logits), tc.k)
		if err != nil {
			t.Fatalf("%s: Route error: %v", name, err)
		}
		guT := s.tensor(t, []int{tc.E, tc.H, 2 * tc.I}, gu)
		dnT := s.tensor(t, []int{tc.E, tc.I, tc.H}, dn)
		full, err := s.ops.Experts(x, rt, guT, dnT, 0)
		if err != nil {
			t.Fatalf("%s: Experts(all) error: %v", name, err)
		}
		half := tc.E / 2
		var parts []backend.Tensor
		for _, rg := range [][2]int{{0, half}, {half, tc.E}} {
			g, err := s.ops.Rows(guT, rg[0], rg[1])
			if err != nil {
				t.Fatalf("%s: Rows(gateUp, %d, %d) error: %v", name, rg[0], rg[1], err)
			}
			d, err := s.ops.Rows(dnT, rg[0], rg[1])
			if err != nil {
				t.Fatalf("%s: Rows(down, %d, %d) error: %v", name, rg[0], rg[1], err)
			}
			s.poison(t, tc.T*tc.H)
			y, err := s.ops.Experts(x, rt, g, d, rg[0])
			if err != nil {
				t.Fatalf("%s: Experts(first %d) error: %v", name, rg[0], err)
			}
			parts = append(parts, y)
		}
		sum, err := s.ops.Add(parts[0], parts[1])
		if err != nil {
			t.Fatalf("%s: Add error: %v", name, err)
		}
		fullV := s.read(t, name, full, tc.T, tc.H)
		want := make([]float64, len(fullV))
		for i, v := range fullV {
			want[i] = float64(v)
		}
		s.close(t, name+": sum of halves vs all", s.read(t, name, sum, tc.T, tc.H), want)
		experts, scores := refRoute(logits, tc.T, tc.E, tc.k)
		s.close(t, name+": all vs reference", fullV, refExperts(xv, experts, scores, tc.k, gu, dn, tc.T, tc.H, tc.E, tc.I, 0))
	}
}

// testExpertMapper checks backend.ExpertMapper, where the backend has it: two ranks holding 6 slots of 4
// experts (experts 0 and 3 twice, on both ranks) sum, after MapExperts, to what one rank holding the 4
// experts computes; each choice goes to the replica its spread picks; errors wrap ErrShape.
func (s *suite) testExpertMapper(t *testing.T) {
	em, ok := s.ops.(backend.ExpertMapper)
	if !ok {
		t.Skipf("%s does not implement backend.ExpertMapper (optional)", s.ops.Name())
	}
	r := rng(t)
	const E, H, I = 4, 32, 16
	order := []int{3, 0, 1, 0, 2, 3} // slot → expert; 3 slots a rank
	slots := make([][]int, E)
	for p, e := range order {
		slots[e] = append(slots[e], p)
	}
	for _, tc := range []struct{ T, k int }{{1, 1}, {7, 1}, {9, 2}} {
		name := fmt.Sprintf("MapExperts(T %d, k %d)", tc.T, tc.k)
		xv := uniform(r, tc.T*H, 1)
		logits := uniform(r, tc.T*E, 3)
		gu, dn := expertWeights(r, E, H, I)
		x := s.tensor(t, []int{tc.T, H}, xv)
		rt, err := s.ops.Route(s.tensor(t, []int{tc.T, E}, logits), tc.k)
		if err != nil {
			t.Fatalf("%s: Route error: %v", name, err)
		}
		spread := make([]int, tc.T)
		for i := range spread {
			spread[i] = 5 + 3*i
		}
		mapped, err := em.MapExperts(rt, slots, spread)
		if err != nil {
			t.Fatalf("%s error: %v", name, err)
		}
		// Each rank's slots hold copies of its experts' weights.
		guS, dnS := make([]float32, 0, len(order)*H*2*I), make([]float32, 0, len(order)*I*H)
		for _, e := range order {
			guS = append(guS, gu[e*H*2*I:(e+1)*H*2*I]...)
			dnS = append(dnS, dn[e*I*H:(e+1)*I*H]...)
		}
		per := len(order) / 2
		var parts []backend.Tensor
		for rank := range 2 {
			lo, hi := rank*per, (rank+1)*per
			y, err := s.ops.Experts(x, mapped, s.tensor(t, []int{per, H, 2 * I}, guS[lo*H*2*I:hi*H*2*I]),
				s.tensor(t, []int{per, I, H}, dnS[lo*I*H:hi*I*H]), lo)
			if err != nil {
				t.Fatalf("%s: Experts(rank %d) error: %v", name, rank, err)
			}
			parts = append(parts, y)
		}
		sum, err := s.ops.Add(parts[0], parts[1])
		if err != nil {
			t.Fatalf("%s: Add error: %v", name, err)
		}
		experts, scores := refRoute(logits, tc.T, E, tc.k)
		s.close(t, name+": sum over ranks vs reference", s.read(t, name, sum, tc.T, H),
			refExperts(xv, experts, scores, tc.k, gu, dn, tc.T, H, E, I, 0))
		// Which slot each choice went to: run one slot at a time and see which rows it fills.
		for p := range order {
			y, err := s.ops.Experts(x, mapped, s.tensor(t, []int{1, H, 2 * I}, guS[p*H*2*I:(p+1)*H*2*I]),
				s.tensor(t, []int{1, I, H}, dnS[p*I*H:(p+1)*I*H]), p)
			if err != nil {
				t.Fatalf("%s: Experts(slot %d) error: %v", name, p, err)
			}
			got := s.read(t, name, y, tc.T, H)
			for tok := range tc.T {
				want := false
				for j := range tc.k {
					e := experts[tok*tc.k+j]
					want = want || slots[e][spread[tok]%len(slots[e])] == p
				}
				filled := slices.ContainsFunc(got[tok*H:(tok+1)*H], func(v float32) bool { return v != 0 })
				if filled != want {
					t.Errorf("%s: token %d (experts %v, spread %d) reached slot %d: %t, want %t", name, tok, experts[tok*tc.k:(tok+1)*tc.k], spread[tok], p, filled, want)
				}
			}
		}
	}
	rt, err := s.ops.Route(s.tensor(t, []int{2, E}, []float32{0, 0, 0, 5, 0, 5, 0, 0}), 1) // experts 3 and 1
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		name   string
		slots  [][]int
		spread []int
	}{
		{"short spread", slots, []int{0}},
		{"slots of 2 experts", slots[:2], []int{0, 1}},
		{"an expert without a slot", [][]int{{0}, {}, {}, {}}, []int{0, 1}},
		{"negative spread", slots, []int{-1, 0}},
	} {
		if _, err := em.MapExperts(rt, bad.slots, bad.spread); !errors.Is(err, backend.ErrShape) {
			t.Errorf("MapExperts(%s) = %v, want ErrShape", bad.name, err)
		}
	}
}

// testExpertTally checks backend.ExpertTallier, where the backend has it: a new tally is all zeros; Add
// counts each (token, choice) pair into its expert's counter of the range asked for, skips experts
// beyond a narrower range, and accumulates over calls and over three ranges of one tally (as a model's
// layers share one); Counts equals the host count of the reference routing; bad ranges wrap ErrShape.
func (s *suite) testExpertTally(t *testing.T) {
	et, ok := s.ops.(backend.ExpertTallier)
	if !ok {
		t.Skipf("%s does not implement backend.ExpertTallier (optional)", s.ops.Name())
	}
	r := rng(t)
	const E = 6
	const n = 2*E + 3 // [0, E): a layer; [E, E+3): experts 0..2 only; [E+3, 2E+3): another layer
	tally, err := et.NewExpertTally(n)
	if err != nil {
		t.Fatalf("NewExpertTally(%d) error: %v", n, err)
	}
	counts := func() []int64 {
		t.Helper()
		if sy, ok := s.ops.(backend.Synchronizer); ok {
			if err := sy.Synchronize(); err != nil {
				t.Fatalf("Synchronize error: %v", err)
			}
		}
		got, err := tally.Counts()
		if err != nil {
			t.Fatalf("Counts error: %v", err)
		}
		return got
	}
	want := make([]int64, n)
	if got := counts(); !slices.Equal(got, want) {
		t.Fatalf("Counts() of a new tally = %v, want %v", got, want)
	}
	var last backend.Routing
	for _, tc := range []struct{ T, k int }{{1, 1}, {7, 2}, {300, 2}, {0, 1}, {5, 4}} {
		logits := uniform(r, tc.T*E, 3)
		rt, err := s.ops.Route(s.tensor(t, []int{tc.T, E}, logits), tc.k)
		if err != nil {
			t.Fatalf("Route(T %d, k %d) error: %v", tc.T, tc.k, err)
		}
		for _, add := range []struct{ first, n int }{{0, E}, {E + 3, E}, {E, 3}} {
			if err := tally.Add(rt, add.first, add.n); err != nil {
				t.Fatalf("Add(T %d k %d, %d, %d) error: %v", tc.T, tc.k, add.first, add.n, err)
			}
		}
		experts, _ := refRoute(logits, tc.T, E, tc.k)
		for _, e := range experts {
			want[e]++
			want[E+3+e]++
			if e < 3 {
				want[E+e]++
			}
		}
		if tc.T > 0 {
			last = rt
		}
	}
	if got := counts(); !slices.Equal(got, want) {
		t.Errorf("Counts() = %v, want %v", got, want)
	}
	if got := counts(); !slices.Equal(got, want) {
		t.Errorf("Counts() again = %v, want %v (reading does not reset)", got, want)
	}
	for _, bad := range []struct{ first, n int }{{-1, E}, {E + 4, E}, {0, n + 1}, {0, -1}} {
		if err := tally.Add(last, bad.first, bad.n); !errors.Is(err, backend.ErrShape) {
			t.Errorf("Add(routing, %d, %d) of %d counters = %v, want ErrShape", bad.first, bad.n, n, err)
		}
	}
	if err := tally.Add(foreignRouting{}, 0, E); err == nil {
		t.Errorf("Add(a foreign routing) = nil, want an error")
	}
	if _, err := et.NewExpertTally(-1); !errors.Is(err, backend.ErrShape) {
		t.Errorf("NewExpertTally(-1) = %v, want ErrShape", err)
	}
	if got := counts(); !slices.Equal(got, want) {
		t.Errorf("Counts() after refused Adds = %v, want %v", got, want)
	}
}

// foreign values stand for another backend's tensors, caches and routings.
type (
	foreignTensor  struct{ shape []int }
	foreignCache   struct{}
	foreignRouting struct{}
)

func (f foreignTensor) Shape() []int                             { return f.shape }
func (foreignCache) Append(k, v backend.Tensor, pos []int) error { return nil }
func (foreignCache) Len() int                                    { return 1 }
func (foreignCache) Kept() int                                   { return 1 }
func (foreignCache) Free()                                       {}
func (foreignRouting) TopK() int                                 { return 1 }

// testForeign checks that values from elsewhere (and nil tensors) give errors, not panics.
func (s *suite) testForeign(t *testing.T) {
	x := s.tensor(t, []int{2, 4}, make([]float32, 8))
	q := s.tensor(t, []int{1, 2, 4}, make([]float32, 8))
	f := foreignTensor{shape: []int{2, 4}}
	f3 := foreignTensor{shape: []int{1, 2, 4}}
	c, err := s.newCache(t, 1, 4, 8, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	if err := c.Append(s.tensor(t, []int{1, 1, 4}, make([]float32, 4)), s.tensor(t, []int{1, 1, 4}, make([]float32, 4)), []int{0}); err != nil {
		t.Fatalf("Append error: %v", err)
	}
	rt, err := s.ops.Route(s.tensor(t, []int{2, 2}, make([]float32, 4)), 1)
	if err != nil {
		t.Fatalf("Route error: %v", err)
	}
	gu := s.tensor(t, []int{2, 4, 2}, make([]float32, 16))
	dn := s.tensor(t, []int{2, 1, 4}, make([]float32, 8))
	for _, tc := range []struct {
		name string
		fn   func() error
	}{
		{"Float32(foreign)", func() error { _, err := s.ops.Float32(f); return err }},
		{"Reshape(foreign)", func() error { _, err := s.ops.Reshape(f, 8); return err }},
		{"Rows(foreign)", func() error { _, err := s.ops.Rows(f, 0, 1); return err }},
		{"Embed(foreign)", func() error { _, err := s.ops.Embed(f, []int{0}, 0); return err }},
		{"RMSNorm(foreign, nil)", func() error { _, err := s.ops.RMSNorm(f, nil, 1e-5); return err }},
		{"RMSNorm(x, foreign)", func() error {
			_, err := s.ops.RMSNorm(x, foreignTensor{shape: []int{4}}, 1e-5)
			return err
		}},
		{"Linear(x, foreign)", func() error { _, err := s.ops.Linear(x, f); return err }},
		{"Linear(nil, x)", func() error { _, err := s.ops.Linear(nil, x); return err }},
		{"Add(foreign, x)", func() error { _, err := s.ops.Add(f, x); return err }},
		{"Add(x, nil)", func() error { _, err := s.ops.Add(x, nil); return err }},
		{"SiLUMul(x, foreign)", func() error { _, err := s.ops.SiLUMul(x, f); return err }},
		{"ScaleRows(foreign)", func() error { _, err := s.ops.ScaleRows(f, []float32{1, 1}); return err }},
		{"RoPE(foreign)", func() error { _, err := s.ops.RoPE(f3, []int{0}, make([]float32, 2)); return err }},
		{"Append(foreign)", func() error { return c.Append(f3, q, []int{1}) }},
		{"Attention(foreign q)", func() error { _, err := s.ops.Attention(f3, c, []int{0}, backend.Window{}, 1); return err }},
		{"Attention(foreign cache)", func() error {
			_, err := s.ops.Attention(q, foreignCache{}, []int{0}, backend.Window{}, 1)
			return err
		}},
		{"Attention(nil cache)", func() error { _, err := s.ops.Attention(q, nil, []int{0}, backend.Window{}, 1); return err }},
		{"Route(foreign)", func() error { _, err := s.ops.Route(f, 1); return err }},
		{"Experts(foreign routing)", func() error { _, err := s.ops.Experts(x, foreignRouting{}, gu, dn, 0); return err }},
		{"Experts(nil routing)", func() error { _, err := s.ops.Experts(x, nil, gu, dn, 0); return err }},
		{"Experts(foreign gateUp)", func() error {
			_, err := s.ops.Experts(x, rt, foreignTensor{shape: []int{2, 4, 2}}, dn, 0)
			return err
		}},
	} {
		wantErr(t, tc.name, tc.fn)
	}
}

// testQuantized checks, for a backend.QuantizedLoader, Linear and Experts on weights in package quant's
// formats against the reference on the dequantised weights (quant.Weight.Dequantize), with x's rows
// quantised per token first for a format with DynamicActivations (Linear only: the experts' SwiGLU rows
// would be rounded to E4M3 from float64 here). It skips for backends without the capability.
func (s *suite) testQuantized(t *testing.T) {
	ql, ok := s.ops.(backend.QuantizedLoader)
	if !ok {
		t.Skipf("%s is not a backend.QuantizedLoader", s.ops.Name())
	}
	r := rng(t)
	load := func(f quant.Format, shape []int, vals []float32) (backend.Tensor, []float32) {
		t.Helper()
		qf := f
		qf.RoundBF16 = false // the codes and scales do not depend on how they are dequantised
		w, err := quant.Quantize(qf, shape, 1, vals)
		if err != nil {
			t.Fatalf("quant.Quantize(%s, %v): %v", f, shape, err)
		}
		w.Format = f
		deq, err := w.Dequantize()
		if err != nil {
			t.Fatalf("Dequantize(%s%v): %v", f, shape, err)
		}
		wt, err := ql.LoadQuantized(w)
		if err != nil {
			t.Fatalf("LoadQuantized(%s%v) error: %v", f, shape, err)
		}
		return wt, deq
	}
	for _, f := range []quant.Format{{Kind: quant.FP8}, {Kind: quant.FP8, DynamicActivations: true}, quant.CompressedTensorsFP8(), {Kind: quant.Int4, GroupSize: 32}} {
		for _, T := range []int{1, 3, 17} {
			for _, in := range []int{64, 96, 13} {
				const out = 40
				xv := uniform(r, T*in, 1)
				w, wv := load(f, []int{out, in}, uniform(r, out*in, 0.2))
				s.poison(t, T*out)
				y, err := s.ops.Linear(s.tensor(t, []int{T, in}, xv), w)
				if err != nil {
					t.Fatalf("Linear([%d %d], %s[%d %d]) error: %v", T, in, f, out, in, err)
				}
				xq := xv
				if f.DynamicActivations {
					xq = make([]float32, len(xv))
					quant.FakeQuantFP8Rows(xq, xv, in)
				}
				s.close(t, fmt.Sprintf("Linear([%d %d], %s[%d %d])", T, in, f, out, in), s.read(t, "Linear", y, T, out), refLinear(xq, wv, T, in, out))
			}
		}
		if f.DynamicActivations {
			continue
		}
		for _, tc := range []struct{ T, E, k, H, I int }{{1, 4, 1, 64, 32}, {3, 4, 2, 64, 32}, {17, 4, 2, 96, 48}} {
			name := fmt.Sprintf("Experts(T %d, E %d, k %d, H %d, I %d, %s)", tc.T, tc.E, tc.k, tc.H, tc.I, f)
			logits := uniform(r, tc.T*tc.E, 3)
			xv := uniform(r, tc.T*tc.H, 1)
			gu, dn := expertWeights(r, tc.E, tc.H, tc.I)
			guT, guV := load(f, []int{tc.E, tc.H, 2 * tc.I}, gu)
			dnT, dnV := load(f, []int{tc.E, tc.I, tc.H}, dn)
			rt, err := s.ops.Route(s.tensor(t, []int{tc.T, tc.E}, logits), tc.k)
			if err != nil {
				t.Fatalf("%s: Route error: %v", name, err)
			}
			s.poison(t, tc.T*tc.H)
			y, err := s.ops.Experts(s.tensor(t, []int{tc.T, tc.H}, xv), rt, guT, dnT, 0)
			if err != nil {
				t.Fatalf("%s error: %v", name, err)
			}
			experts, scores := refRoute(logits, tc.T, tc.E, tc.k)
			s.close(t, name, s.read(t, name, y, tc.T, tc.H), refExperts(xv, experts, scores, tc.k, guV, dnV, tc.T, tc.H, tc.E, tc.I, 0))
		}
	}
}

// testBlockPool checks the paged cache's blocks: a fixed pool runs out with ErrNoBlocks and the cache
// unchanged, chunked caches give back the blocks of past chunks (at most ceil(chunk/block)+1 between decode
// steps), global caches keep all, Free returns everything, and a freed cache refuses work.
func (s *suite) testBlockPool(t *testing.T) {
	r := rng(t)
	const kvHeads, D, heads = 2, 8, 4
	for _, tc := range []struct{ kvHeads, D, block, blocks int }{{0, 8, 4, 0}, {2, 0, 4, 0}, {2, 8, 0, 0}, {2, 8, 4, -1}} {
		wantShapeErr(t, fmt.Sprintf("NewBlockPool(%d, %d, block %d, blocks %d)", tc.kvHeads, tc.D, tc.block, tc.blocks), func() error {
			_, err := s.ops.NewBlockPool(tc.kvHeads, tc.D, tc.block, tc.blocks)
			return err
		})
	}
	usage := func(name string, p backend.BlockPool, wantUsed, wantTotal int) {
		t.Helper()
		used, total := p.Usage()
		if used != wantUsed || (wantTotal >= 0 && total != wantTotal) {
			t.Errorf("%s: Usage = %d, %d, want %d, %d (-1: any)", name, used, total, wantUsed, wantTotal)
		}
	}

	// A fixed pool of 5 blocks of 4: a global cache of 12 positions takes 3.
	fixed, err := s.ops.NewBlockPool(kvHeads, D, 4, 5)
	if err != nil {
		t.Fatalf("NewBlockPool(fixed 5) error: %v", err)
	}
	if fixed.BlockSize() != 4 {
		t.Errorf("BlockSize = %d, want 4", fixed.BlockSize())
	}
	usage("new fixed pool", fixed, 0, 5)
	a, err := s.ops.NewKVCache(fixed, 64, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	da := newKVData()
	s.appendKV(t, r, a, da, span(0, 9), kvHeads, D)
	usage("global cache of 9 positions", fixed, 3, 5)
	b, err := s.ops.NewKVCache(fixed, 64, backend.Window{})
	if err != nil {
		t.Fatalf("NewKVCache error: %v", err)
	}
	zeros := func(T int) backend.Tensor { return s.tensor(t, []int{T, kvHeads, D}, make([]float32, T*kvHeads*D)) }
	err = b.Append(zeros(9), zeros(9), span(0, 9))
	if !errors.Is(err, backend.ErrNoBlocks) {
		t.Errorf("Append of 9 positions (3 blocks) to a pool with 2 free: error %v, want ErrNoBlocks", err)
	}
	if b.Len() != 0 || b.Kept() != 0 {
		t.Errorf("after a failed Append: Len, Kept = %d, %d, want 0, 0", b.Len(), b.Kept())
	}
	usage("after a failed Append", fixed, 3, 5)
	// The first cache still attends what it holds.
	qv := uniform(r, heads*D, 1)
	y, err := s.ops.Attention(s.tensor(t, []int{1, heads, D}, qv), a, []int{8}, backend.Window{}, 0.5)
	if err != nil {
		t.Fatalf("Attention after another cache's failed Append: %v", err)
	}
	s.close(t, "Attention after another cache's failed Append", s.read(t, "attention", y, 1, heads, D),
		refAttention(qv, []int{8}, da.keys, da.vals, heads, kvHeads, D, 0, 0.5))
	a.Free()
	usage("after Free", fixed, 0, 5)
	a.Free()
	usage("after a second Free", fixed, 0, 5)
	wantErr(t, "Append to a freed cache", func() error { return a.Append(zeros(1), zeros(1), []int{9}) })
	wantErr(t, "Attention over a freed cache", func() error {
		_, err := s.ops.Attention(s.tensor(t, []int{1, heads, D}, qv), a, []int{8}, backend.Window{}, 0.5)
		return err
	})
	if err := b.Append(zeros(9), zeros(9), span(0, 9)); err != nil {
		t.Errorf("Append of 9 positions after Free made room: %v", err)
	}
	b.Free()
	usage("after the second cache's Free", fixed, 0, 5)

	// Chunked and global caches in one growing pool, decoding a long sequence.
	for _, tc := range []struct{ chunk, block int }{{8, 4}, {6, 4}, {16, 16}, {5, 1}} {
		pool, err := s.ops.NewBlockPool(kvHeads, D, tc.block, 0)
		if err != nil {
			t.Fatalf("NewBlockPool(growing) error: %v", err)
		}
		w := backend.Window{Chunk: tc.chunk}
		chunked, err := s.ops.NewKVCache(pool, 200, w)
		if err != nil {
			t.Fatalf("NewKVCache error: %v", err)
		}
		global, err := s.ops.NewKVCache(pool, 200, backend.Window{})
		if err != nil {
			t.Fatalf("NewKVCache error: %v", err)
		}
		dc, dg := newKVData(), newKVData()
		s.appendKV(t, r, chunked, dc, span(0, 11), kvHeads, D) // a prefill
		s.appendKV(t, r, global, dg, span(0, 11), kvHeads, D)
		limit := ceilDiv(tc.chunk, tc.block) + 1
		for p := 11; p < 60; p++ {
			s.appendKV(t, r, chunked, dc, []int{p}, kvHeads, D)
			s.appendKV(t, r, global, dg, []int{p}, kvHeads, D)
			used, _ := pool.Usage()
			globalBlocks := ceilDiv(p+1, tc.block)
			if held := used - globalBlocks; held > limit || held < 1 {
				t.Fatalf("chunk %d, block %d, after position %d: the chunked cache holds %d blocks, want 1..%d",
					tc.chunk, tc.block, p, held, limit)
			}
			qv := uniform(r, heads*D, 1)
			y, err := s.ops.Attention(s.tensor(t, []int{1, heads, D}, qv), chunked, []int{p}, w, 0.5)
			if err != nil {
				t.Fatalf("chunked Attention(pos %d): %v", p, err)
			}
			s.close(t, fmt.Sprintf("chunk %d, block %d: chunked Attention(pos %d)", tc.chunk, tc.block, p),
				s.read(t, "attention", y, 1, heads, D), refAttention(qv, []int{p}, dc.keys, dc.vals, heads, kvHeads, D, tc.chunk, 0.5))
		}
		chunked.Free()
		global.Free()
		usage(fmt.Sprintf("chunk %d, block %d: after both Free", tc.chunk, tc.block), pool, 0, -1)
	}
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }
