package cuda_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/safetensors"
)

// llamaVocab is Llama 4's vocabulary: the rows the model samples from.
const llamaVocab = 202048

// lmLogits returns n rows of V logits shaped like a language model's: a normal bulk (σ 2) and a few
// spikes near 8.
func lmLogits(r *rand.Rand, n, V int) []float32 {
	v := make([]float32, n*V)
	for i := range v {
		v[i] = float32(r.NormFloat64() * 2)
	}
	for range 20 * n {
		v[r.IntN(len(v))] = float32(8 + r.NormFloat64()*2)
	}
	return v
}

// TestSampleRows checks what backendtest cannot see from outside: the device sampler's ids are
// deterministic (the same call gives the same ids), a row's id does not depend on the rows sampled with
// it (16 rows at once equal each row alone), float32 and bf16 logits of the same values agree, and
// the ids agree with the cpu backend's (package sample's) up to backend.SampleTolerance (counted, not
// failed: backendtest checks the tolerance). It times Sample (one call: launch, kernel, the ids'
// download) for the settings that matter at Llama 4's vocabulary.
func TestSampleRows(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	c := cpu.New(cpu.Config{})
	r := rand.New(rand.NewPCG(3, 4))
	const N = 16
	vals := lmLogits(r, N, llamaVocab)
	for i := range vals { // bf16 values, so that the float32 and bf16 tensors hold the same numbers
		vals[i] = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(vals[i]))
	}
	f32, err := g.FromFloat32([]int{N, llamaVocab}, vals)
	if err != nil {
		t.Fatal(err)
	}
	b16, err := g.Load(safetensors.BF16, []int{N, llamaVocab}, bf16Data(vals))
	if err != nil {
		t.Fatal(err)
	}
	host, err := c.FromFloat32([]int{N, llamaVocab}, vals)
	if err != nil {
		t.Fatal(err)
	}
	for _, set := range []struct {
		name string
		row  backend.SampleRow
	}{
		{"greedy", backend.SampleRow{}},
		{"T 0.6 top-p 0.9 (Llama 4)", backend.SampleRow{Temperature: 0.6, TopP: 0.9}},
		{"T 0.7 top-k 50 top-p 0.9", backend.SampleRow{Temperature: 0.7, TopK: 50, TopP: 0.9}},
		{"T 1 top-k 1024", backend.SampleRow{Temperature: 1, TopK: 1024}},
		{"T 1.5 top-p 0.95", backend.SampleRow{Temperature: 1.5, TopP: 0.95}},
		{"T 1", backend.SampleRow{Temperature: 1}},
		{"T 1 top-k 5000 top-p 0.9", backend.SampleRow{Temperature: 1, TopK: 5000, TopP: 0.9}},
	} {
		rows := make([]backend.SampleRow, N)
		for i := range rows {
			rows[i] = set.row
			if !set.row.Greedy() {
				rows[i].U = r.Float64()
			}
		}
		all, err := g.Sample(f32, rows)
		if err != nil {
			t.Fatalf("%s: Sample error: %v", set.name, err)
		}
		if again, err := g.Sample(f32, rows); err != nil || !slices.Equal(again, all) {
			t.Errorf("%s: the same call twice gave %v and %v (%v)", set.name, all, again, err)
		}
		if got, err := g.Sample(b16, rows); err != nil || !slices.Equal(got, all) {
			t.Errorf("%s: bf16 logits gave %v, float32 %v (%v)", set.name, got, all, err)
		}
		for i := range N {
			one, err := g.Rows(f32, i, i+1)
			if err != nil {
				t.Fatal(err)
			}
			got, err := g.Sample(one, rows[i:i+1])
			if err != nil || got[0] != all[i] {
				t.Errorf("%s: row %d alone gave %v (%v), within 16 rows %d", set.name, i, got, err, all[i])
			}
		}
		want, err := c.Sample(host, rows)
		if err != nil {
			t.Fatal(err)
		}
		same := 0
		for i := range want {
			if want[i] == all[i] {
				same++
			}
		}
		if set.row.Greedy() && same != N {
			t.Errorf("%s: ids %v, cpu %v", set.name, all, want)
		}
		var per [2]time.Duration
		for k, n := range []int{1, N} {
			x, err := g.Rows(f32, 0, n)
			if err != nil {
				t.Fatal(err)
			}
			const reps = 20
			start := time.Now()
			for range reps {
				if _, err := g.Sample(x, rows[:n]); err != nil {
					t.Fatal(err)
				}
			}
			per[k] = time.Since(start) / reps
		}
		t.Logf("%-26s N=1 %v, N=16 %v; %d/%d ids equal to the cpu's", set.name, per[0], per[1], same, N)
		row("sample "+set.name, fmt.Sprintf("%dx%d f32", N, llamaVocab), fmt.Sprintf("%d/%d = cpu", same, N),
			fmt.Sprintf("N=1 %v N=16 %v", per[0].Round(time.Microsecond), per[1].Round(time.Microsecond)))
	}
}
