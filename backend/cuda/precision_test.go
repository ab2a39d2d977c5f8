package cuda_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/safetensors"
)

// TestNarrowLinearPrecise: above 64 rows (prefill) in the default mode, Linear rounds a float32 x to bf16
// for wide products but keeps float32 accuracy (the hi/lo split) for narrow ones such as a MoE router,
// whose top-k a rounding would flip. The router-shaped products must match the cpu backend to 1e-4
// relative L2 (the split keeps about 16 bits of x; bf16 keeps 8, about 3e-3); a norm's output, which
// feeds them, must be float32.
func TestNarrowLinearPrecise(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	c := cpu.New(cpu.Config{})
	r := rand.New(rand.NewPCG(11, 12))
	for _, s := range []struct{ T, out, in int }{{100, 16, 5120}, {300, 128, 5120}, {208, 4, 64}} {
		label := fmt.Sprintf("x [%d %d] w [%d %d]", s.T, s.in, s.out, s.in)
		xv, wv := randVals(r, s.T*s.in, 1), bf16Data(randVals(r, s.out*s.in, 0.05))
		var outs [2][]float32
		gx, err := g.FromFloat32([]int{s.T, s.in}, xv)
		if err != nil {
			t.Fatal(err)
		}
		gn, err := g.RMSNorm(gx, nil, 1e-5)
		if err != nil {
			t.Fatal(err)
		}
		if dt, _ := cuda.DTypeOf(gn); dt != cuda.F32 {
			t.Errorf("%s: RMSNorm stores %v, want float32", label, dt)
		}
		gw, err := g.Load(safetensors.BF16, []int{s.out, s.in}, wv)
		if err != nil {
			t.Fatal(err)
		}
		gy, err := g.Linear(gn, gw)
		if err != nil {
			t.Fatal(err)
		}
		outs[0] = float32s(t, g, gy)
		cx, err := c.FromFloat32([]int{s.T, s.in}, xv)
		if err != nil {
			t.Fatal(err)
		}
		cn, err := c.RMSNorm(cx, nil, 1e-5)
		if err != nil {
			t.Fatal(err)
		}
		cw, err := c.Load(safetensors.BF16, []int{s.out, s.in}, wv)
		if err != nil {
			t.Fatal(err)
		}
		cy, err := c.Linear(cn, cw)
		if err != nil {
			t.Fatal(err)
		}
		outs[1] = float32s(t, c, cy)
		rel := relL2(outs[0], outs[1])
		status := ""
		if rel > 1e-4 {
			status = " FAIL"
			t.Errorf("%s: relative L2 vs cpu %.3g, want <= 1e-4 (float32 accuracy for a narrow product)", label, rel)
		}
		t.Logf("%s: relL2 vs cpu %.3g", label, rel)
		row("Narrow linear", label, fmt.Sprintf("relL2 %.2e%s", rel, status), "")
	}
}
