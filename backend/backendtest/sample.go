package backendtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/safetensors"
)

// llamaVocab is Llama 4's vocabulary size: the rows the model samples from.
const llamaVocab = 202048

// logitsRow returns V logits shaped like a language model's: a normal bulk (σ 2) and spikes near 8, so
// that top-p 0.9 at temperature 0.7 keeps from a few ids to thousands.
func logitsRow(r *rand.Rand, V, spikes int) []float32 {
	v := make([]float32, V)
	for i := range v {
		v[i] = float32(r.NormFloat64() * 2)
	}
	for range spikes {
		v[r.IntN(V)] = float32(8 + r.NormFloat64()*2)
	}
	return v
}

// toBF16 truncates v to bfloat16 (in place) and returns its little-endian bf16 bytes.
func toBF16(v []float32) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		h := uint16(math.Float32bits(x) >> 16)
		v[i] = math.Float32frombits(uint32(h) << 16)
		binary.LittleEndian.PutUint16(b[2*i:], h)
	}
	return b
}

// sampleCall is one Sample call: logits [len(rows), V] whose row i is distinct[src[i]].
type sampleCall struct {
	name     string
	distinct [][]float32
	src      []int
	rows     []backend.SampleRow
	bf16     bool // load the logits as bf16 (the values must be bf16 already, see toBF16)
}

// refKey identifies a reference set-up: the row (by its storage) and the settings that shape it.
type refKey struct {
	row  *float32
	n    int
	temp float64
	topK int
}

// sampleChecker runs sampleCalls and compares with the reference, caching its set-ups.
type sampleChecker struct {
	s         *suite
	smp       backend.Sampler
	refs      map[refKey]*refSampleRow
	ambiguous int // rows whose tolerance allowed more than one id
	checked   int
}

func (c *sampleChecker) run(t *testing.T, call sampleCall) {
	t.Helper()
	V := len(call.distinct[0])
	vals := make([]float32, 0, len(call.rows)*V)
	for _, i := range call.src {
		vals = append(vals, call.distinct[i]...)
	}
	var logits backend.Tensor
	if call.bf16 {
		x, err := c.s.ops.Load(safetensors.BF16, []int{len(call.rows), V}, toBF16(vals))
		if err != nil {
			t.Fatalf("%s: Load(BF16) error: %v", call.name, err)
		}
		logits = x
	} else {
		logits = c.s.tensor(t, []int{len(call.rows), V}, vals)
	}
	ids, err := c.smp.Sample(logits, call.rows)
	if err != nil {
		t.Fatalf("%s: Sample error: %v", call.name, err)
	}
	if len(ids) != len(call.rows) {
		t.Fatalf("%s: Sample returned %d ids, want %d", call.name, len(ids), len(call.rows))
	}
	for i, row := range call.rows {
		c.check(t, fmt.Sprintf("%s row %d (%+v)", call.name, i, row), call.distinct[call.src[i]], row, ids[i])
	}
}

// check compares one row's id with the definition: exactly for greedy and top-1 rows, otherwise within
// backend.SampleTolerance of the draw and the top-p.
func (c *sampleChecker) check(t *testing.T, what string, row []float32, r backend.SampleRow, got int) {
	t.Helper()
	c.checked++
	if got < 0 || got >= len(row) {
		t.Errorf("%s: id %d outside [0, %d)", what, got, len(row))
		return
	}
	if r.Greedy() || len(row) == 1 || r.TopK == 1 {
		if want := refArgmax(row); got != want {
			t.Errorf("%s: id %d (logit %v), want the argmax %d (logit %v)", what, got, row[got], want, row[want])
		}
		return
	}
	key := refKey{&row[0], len(row), r.Temperature, r.TopK}
	ref := c.refs[key]
	if ref == nil {
		ref = newRefSampleRow(row, r.Temperature, r.TopK)
		c.refs[key] = ref
	}
	const d = backend.SampleTolerance
	pLo, pHi := r.TopP, r.TopP
	if r.TopP > 0 && r.TopP < 1 {
		pLo, pHi = math.Max(r.TopP-d, d), math.Min(r.TopP+d, 1)
	}
	// The choice only moves later as the draw or top-p grows, so the tolerance allows one range.
	lo, hi := ref.pos(math.Max(r.U-d, 0), pLo), ref.pos(math.Min(r.U+d, 1), pHi)
	if lo != hi {
		c.ambiguous++
	}
	if p := ref.position(got); p < lo || p > hi {
		exact := ref.order[ref.pos(r.U, r.TopP)]
		t.Errorf("%s: id %d (logit %v, position %d of the %d kept), want position %d..%d: id %d (logit %v, cumulative probability %.7f)",
			what, got, row[got], p, len(ref.order), lo, hi, exact, row[exact], ref.cum[ref.pos(r.U, r.TopP)])
	}
}

func (s *suite) testSample(t *testing.T) {
	smp, ok := s.ops.(backend.Sampler)
	if !ok {
		t.Skip("the backend does not implement backend.Sampler")
	}
	r := rng(t)
	c := &sampleChecker{s: s, smp: smp, refs: map[refKey]*refSampleRow{}}
	greedy := backend.SampleRow{}
	draws := []float64{0, 0.1, 0.37, 0.5, 0.9, 0.999999}
	negZero := float32(math.Copysign(0, -1))
	inf := float32(math.Inf(1))

	// Greedy and top-1 rows, ties included: exact.
	small := [][]float32{
		{3, 5, 5, 1}, {2, 2, 2}, {-3, -1, -2, -1}, {negZero, 0}, {0, negZero, 0}, {7},
		{-inf, -inf, 1, 1}, {-inf, -2, -inf}, {1, 0, 1, 0, 1, 0, 1},
	}
	for i, row := range small {
		for _, rw := range []backend.SampleRow{greedy, {Temperature: 0.7, TopK: 1, U: 0.999}, {Temperature: 1.5, TopK: 1, TopP: 0.5, U: 0.5}} {
			c.run(t, sampleCall{name: fmt.Sprintf("small row %d %v", i, row), distinct: [][]float32{row}, src: []int{0}, rows: []backend.SampleRow{rw}})
		}
	}
	big := logitsRow(r, llamaVocab, 20)
	tied := logitsRow(r, llamaVocab, 20)
	top := tied[refArgmax(tied)]
	tied[150001], tied[70000], tied[190000] = top+1, top+1, top+1 // the argmax is 70000
	for _, row := range [][]float32{big, tied} {
		for _, rw := range []backend.SampleRow{greedy, {Temperature: 0.7, TopK: 1, U: 0.9}, {Temperature: 2, TopK: 1}} {
			c.run(t, sampleCall{name: "greedy or top-1, vocab 202048", distinct: [][]float32{row}, src: []int{0}, rows: []backend.SampleRow{rw}})
		}
	}

	// Top-k / top-p with several draws, N = 1: the common settings, the full-vocabulary nucleus, plain
	// temperature, top-k above 1024 and at the edges.
	// (Fewer draws where a host sampler must sort the whole row.)
	settings := []struct {
		backend.SampleRow
		draws []float64
	}{
		{backend.SampleRow{Temperature: 0.7, TopK: 50, TopP: 0.9}, draws},
		{backend.SampleRow{Temperature: 0.6, TopK: 0, TopP: 0.9}, []float64{0, 0.5, 0.999999}},
		{backend.SampleRow{Temperature: 1, TopK: 0, TopP: 1}, []float64{0.01, 0.37, 0.999999}},
		{backend.SampleRow{Temperature: 1.5, TopK: 2000, TopP: 0.95}, []float64{0.1, 0.9}},
		{backend.SampleRow{Temperature: 1, TopK: 1024, TopP: 0}, []float64{0.6}},
		{backend.SampleRow{Temperature: 1, TopK: 1025, TopP: 0.99}, []float64{0.999}},
	}
	for _, set := range settings {
		for _, u := range set.draws {
			rw := set.SampleRow
			rw.U = u
			c.run(t, sampleCall{name: "vocab 202048", distinct: [][]float32{big}, src: []int{0}, rows: []backend.SampleRow{rw}})
		}
	}

	// Small rows: the filters at and beyond the row's length, ties everywhere.
	flat := make([]float32, 5000) // all equal: the draw picks by id
	masked := make([]float32, 3000)
	for i := range masked {
		masked[i] = float32(math.Inf(-1))
		if i%300 == 7 {
			masked[i] = float32(r.NormFloat64())
		}
	}
	for _, row := range [][]float32{logitsRow(r, 2, 0), logitsRow(r, 7, 1), logitsRow(r, 100, 3), logitsRow(r, 1500, 10), flat, masked} {
		V := len(row)
		for _, set := range []backend.SampleRow{
			{Temperature: 1, TopK: 50, TopP: 0.9}, {Temperature: 0.8, TopK: V - 1, TopP: 0.5}, {Temperature: 1, TopK: V},
			{Temperature: 1.2, TopK: V + 5, TopP: 0.95}, {Temperature: 1, TopK: 1200, TopP: 0.7}, {Temperature: 0.5, TopP: 0.3},
		} {
			var rows []backend.SampleRow
			for _, u := range draws {
				rw := set
				rw.U = u
				rows = append(rows, rw)
			}
			c.run(t, sampleCall{name: fmt.Sprintf("vocab %d", V), distinct: [][]float32{row}, src: make([]int, len(rows)), rows: rows})
		}
	}
	// A row of length 1 samples its only id.
	c.run(t, sampleCall{name: "vocab 1", distinct: [][]float32{{-4}}, src: []int{0, 0}, rows: []backend.SampleRow{{Temperature: 1, U: 0.9}, greedy}})

	// bf16 logits (ties at every step) through Load, when the backend keeps bf16.
	b16 := logitsRow(r, llamaVocab, 20)
	toBF16(b16)
	for _, set := range settings {
		var rows []backend.SampleRow
		for _, u := range set.draws {
			rw := set.SampleRow
			rw.U = u
			rows = append(rows, rw)
		}
		rows = append(rows, greedy, backend.SampleRow{Temperature: 0.9, TopK: 1})
		c.run(t, sampleCall{name: "bf16 vocab 202048", distinct: [][]float32{b16}, src: make([]int, len(rows)), rows: rows, bf16: true})
	}

	// N = 16 in one call, every kind of row mixed, each row on its own settings.
	distinct := [][]float32{big, tied, b16, logitsRow(r, llamaVocab, 200)}
	var src []int
	var rows []backend.SampleRow
	for i := range 16 {
		rw := backend.SampleRow{}
		switch i % 6 {
		case 1:
			rw = backend.SampleRow{Temperature: 0.7, TopK: 1}
		case 2, 3:
			rw = backend.SampleRow{Temperature: 0.7, TopK: 50, TopP: 0.9}
		case 4:
			rw = backend.SampleRow{Temperature: 0.6, TopP: 0.9}
		case 5:
			rw = backend.SampleRow{Temperature: 1.5, TopK: 2000, TopP: 0.95}
		}
		rw.U = r.Float64()
		src = append(src, i%len(distinct))
		rows = append(rows, rw)
	}
	c.run(t, sampleCall{name: "N 16, vocab 202048", distinct: distinct, src: src, rows: rows})
	small16 := [][]float32{logitsRow(r, 300, 4), logitsRow(r, 300, 0), flat[:300]}
	for i := range rows {
		src[i] = i % len(small16)
	}
	c.run(t, sampleCall{name: "N 16, vocab 300", distinct: small16, src: src, rows: rows})
	t.Logf("%d rows checked, %d where the tolerance allowed a neighbour", c.checked, c.ambiguous)

	s.testSampleViewsAndErrors(t, smp)
}

// testSampleViewsAndErrors: a view of rows samples like a copy; empty batches, non-finite rows, bad shapes
// and bad settings give ids in range, errors or ErrShape, never panics.
func (s *suite) testSampleViewsAndErrors(t *testing.T, smp backend.Sampler) {
	r := rng(t)
	vals := uniform(r, 4*64, 4)
	x := s.tensor(t, []int{4, 64}, vals)
	view, err := s.ops.Rows(x, 1, 3)
	if err != nil {
		t.Fatal(err)
	}
	rows := []backend.SampleRow{{}, {Temperature: 1, TopK: 10, TopP: 0.8, U: 0.6}}
	ids, err := smp.Sample(view, rows)
	if err != nil {
		t.Fatalf("Sample(Rows(x, 1, 3)) error: %v", err)
	}
	for i, id := range ids {
		row := vals[(i+1)*64 : (i+2)*64]
		ref := newRefSampleRow(row, 1, 10)
		if want := refArgmax(row); i == 0 && id != want {
			t.Errorf("Sample(view) row 0 = %d, want %d", id, want)
		}
		if lo, hi, p := ref.pos(0.6-backend.SampleTolerance, 0.8-backend.SampleTolerance), ref.pos(0.6+backend.SampleTolerance, 0.8+backend.SampleTolerance), ref.position(id); i == 1 && (p < lo || p > hi) {
			t.Errorf("Sample(view) row 1 = %d (position %d), want positions %d..%d", id, p, lo, hi)
		}
	}
	none, err := smp.Sample(s.tensor(t, []int{0, 64}, nil), nil)
	if err != nil || len(none) != 0 {
		t.Errorf("Sample([0 64], no rows) = %v, %v; want no ids and no error", none, err)
	}

	nan, inf := float32(math.NaN()), float32(math.Inf(1))
	for _, row := range [][]float32{{1, nan, 2}, {nan, nan, nan}, {1, inf, 2}, {-inf, -inf, -inf}, {inf, inf, 0}} {
		for _, rw := range []backend.SampleRow{{}, {Temperature: 1, U: 0.5}, {Temperature: 1, TopK: 2, TopP: 0.5, U: 0.5}} {
			ids, err := smp.Sample(s.tensor(t, []int{1, 3}, row), []backend.SampleRow{rw})
			if err != nil || len(ids) != 1 || ids[0] < 0 || ids[0] >= 3 {
				t.Errorf("Sample(%v, %+v) = %v, %v; want one id in [0, 3)", row, rw, ids, err)
			}
		}
	}

	two := s.tensor(t, []int{2, 8}, make([]float32, 16))
	for _, tc := range []struct {
		name string
		x    backend.Tensor
		rows []backend.SampleRow
	}{
		{"rank 1", s.tensor(t, []int{8}, make([]float32, 8)), []backend.SampleRow{{}}},
		{"rank 3", s.tensor(t, []int{2, 1, 8}, make([]float32, 16)), []backend.SampleRow{{}, {}}},
		{"one row for two", two, []backend.SampleRow{{}}},
		{"three rows for two", two, []backend.SampleRow{{}, {}, {}}},
		{"vocabulary 0", s.tensor(t, []int{1, 0}, nil), []backend.SampleRow{{}}},
	} {
		wantShapeErr(t, "Sample "+tc.name, func() error { _, err := smp.Sample(tc.x, tc.rows); return err })
	}
	for _, rw := range []backend.SampleRow{
		{Temperature: -1}, {Temperature: math.NaN()}, {Temperature: 1, TopK: -1}, {Temperature: 1, TopP: 1.5},
		{Temperature: 1, TopP: math.NaN()}, {Temperature: 1, U: 1}, {Temperature: 1, U: -0.1}, {Temperature: 1, U: math.NaN()},
	} {
		wantErr(t, fmt.Sprintf("Sample(row %+v)", rw), func() error { _, err := smp.Sample(two, []backend.SampleRow{{}, rw}); return err })
	}
	wantErr(t, "Sample(foreign)", func() error {
		_, err := smp.Sample(foreignTensor{shape: []int{2, 8}}, []backend.SampleRow{{}, {}})
		return err
	})
	wantErr(t, "Sample(nil)", func() error { _, err := smp.Sample(nil, []backend.SampleRow{{}}); return err })
	if err := call(func() error { _, err := smp.Sample(two, []backend.SampleRow{{}, {Temperature: 1, U: 2}}); return err }); errors.Is(err, backend.ErrShape) {
		t.Errorf("Sample(draw 2) error = %v, want one not wrapping ErrShape (the shapes are right)", err)
	}
}
