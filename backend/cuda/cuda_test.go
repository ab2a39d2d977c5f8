package cuda_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/backend/backendtest"
	"github.com/tpfleet/tpfleet/backend/cpu"
	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/internal/gputest"
	"github.com/tpfleet/tpfleet/safetensors"
)

// These tests need a GPU and skip, saying why, where New finds none. scripts/gpu/test.sh builds them
// here and runs them on the GPU machine; rows for its closing table go to the file named by
// $TPFLEET_GPU_TABLE (op|shape|error|time).

// conformanceRelL2 is the relative L2 bound for backendtest with bf16 storage: bf16 keeps 8 significant
// bits (a relative rounding error up to 2^-9 ≈ 2e-3 per value), and the suite's ops chain a few
// roundings (operands to bf16, output to bf16).
const conformanceRelL2 = 3e-2

var (
	backendsMu sync.Mutex
	backends   = map[cuda.DType]*cuda.Backend{}
)

// newBackend returns the shared Backend storing activations as act. It skips the test only where the
// machine has no NVIDIA GPU (gputest.Require); where it has one, a failure to open CUDA fails the test.
func newBackend(t testing.TB, act cuda.DType) *cuda.Backend {
	t.Helper()
	gputest.Require(t)
	backendsMu.Lock()
	defer backendsMu.Unlock()
	if b, ok := backends[act]; ok {
		return b
	}
	b, err := cuda.New(cuda.Config{Activations: act, Poison: true})
	gputest.Check(t, "cuda.New", err)
	// The grouped expert kernels at every shape the tests give them, however many rows an expert has
	// (TestGroupedDispatch checks the default limit).
	cuda.SetGroupedMaxRows(b, 0)
	// q4gemm at every row count too (TestQ4GEMMDispatch checks its default limit), and the grouped fp8
	// experts from 9 tokens, where the tests' decode batches of 16 reach them (TestFP8ExpertDispatch).
	cuda.SetQ4GEMMMaxRows(b, 0)
	cuda.SetFP8ExpertGEMVRows(b, 8)
	if len(backends) == 0 {
		i := b.Info()
		t.Logf("device %q %s, %d SMs, %.1f GiB; driver %d, cuBLASLt %d, NVRTC %s; libraries %v; kernels: cache %q hit %v, compiled in %v",
			i.Device, i.Arch, i.Multiprocs, float64(i.TotalMemory)/(1<<30), i.DriverVersion, i.CublasLt, i.NVRTC,
			i.Libraries, i.KernelCache, i.CacheHit, i.CompileTime)
		row("device", i.Device, i.Arch, fmt.Sprintf("driver %d cuBLASLt %d NVRTC %s compile %v", i.DriverVersion, i.CublasLt, i.NVRTC, i.CompileTime.Round(time.Millisecond)))
	}
	backends[act] = b
	return b
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, b := range backends {
		if err := b.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "close:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// row appends one line to the table scripts/gpu/test.sh prints.
func row(cols ...string) { gputest.Row(cols...) }

func TestConformance(t *testing.T) {
	for _, act := range []cuda.DType{cuda.BF16, cuda.F32} {
		t.Run("activations="+act.String(), func(t *testing.T) {
			b := newBackend(t, act)
			backendtest.Run(t, b, backendtest.Tolerance{RelL2: conformanceRelL2})
			t.Logf("memory %+v, linear %+v", b.Memory(), b.Counters())
		})
	}
}

// TestCollectivesSolo checks the single-rank collectives and the error for larger groups.
func TestCollectivesSolo(t *testing.T) {
	b := newBackend(t, cuda.BF16)
	testCollectives(t, b)
}

// relL2 returns ‖got − want‖₂ / ‖want‖₂.
func relL2(got, want []float32) float64 {
	var num, den float64
	for i := range want {
		d := float64(got[i]) - float64(want[i])
		num += d * d
		den += float64(want[i]) * float64(want[i])
	}
	if den == 0 {
		return math.Sqrt(num)
	}
	return math.Sqrt(num / den)
}

func randVals(r *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (2*r.Float32() - 1) * scale
	}
	return v
}

// bf16Data encodes v as bf16 bytes (rounded), the form of checkpoint weights.
func bf16Data(v []float32) []byte {
	out := make([]byte, 2*len(v))
	for i, f := range v {
		h := safetensors.Float32ToBF16(f)
		out[2*i], out[2*i+1] = byte(h), byte(h>>8)
	}
	return out
}

// pair holds the same values on the cpu and the cuda backend.
type pair struct{ c, g backend.Tensor }

type opEnv struct {
	t   *testing.T
	cpu *cpu.Backend
	gpu *cuda.Backend
	r   *rand.Rand
}

func (e *opEnv) input(scale float32, shape ...int) pair {
	n := 1
	for _, d := range shape {
		n *= d
	}
	v := randVals(e.r, n, scale)
	c, err := e.cpu.FromFloat32(shape, v)
	if err != nil {
		e.t.Fatal(err)
	}
	g, err := e.gpu.FromFloat32(shape, v)
	if err != nil {
		e.t.Fatal(err)
	}
	return pair{c, g}
}

// weight makes a bf16 weight, loaded the way checkpoints are, on both backends.
func (e *opEnv) weight(scale float32, shape ...int) pair {
	n := 1
	for _, d := range shape {
		n *= d
	}
	data := bf16Data(randVals(e.r, n, scale))
	c, err := e.cpu.Load(safetensors.BF16, shape, data)
	if err != nil {
		e.t.Fatal(err)
	}
	g, err := e.gpu.Load(safetensors.BF16, shape, data)
	if err != nil {
		e.t.Fatal(err)
	}
	return pair{c, g}
}

// compare runs op on both backends, checks the relative L2 error of the cuda result against the cpu's,
// and times the cuda op (mean of reps after a warm-up, synchronized).
func (e *opEnv) compare(name, shape string, bound float64, op func(b backend.Ops, side int) (backend.Tensor, error)) {
	e.t.Helper()
	want, err := op(e.cpu, 0)
	if err != nil {
		e.t.Fatalf("%s %s on cpu: %v", name, shape, err)
	}
	got, err := op(e.gpu, 1)
	if err != nil {
		e.t.Fatalf("%s %s on cuda: %v", name, shape, err)
	}
	wv, err := e.cpu.Float32(want)
	if err != nil {
		e.t.Fatal(err)
	}
	gv, err := e.gpu.Float32(got)
	if err != nil {
		e.t.Fatal(err)
	}
	for i, v := range gv {
		if math.IsNaN(float64(v)) {
			e.t.Errorf("%s %s: [%d] = NaN (unwritten?)", name, shape, i)
			break
		}
	}
	rel := relL2(gv, wv)
	const reps = 20
	start := time.Now()
	for range reps {
		if _, err := op(e.gpu, 1); err != nil {
			e.t.Fatal(err)
		}
	}
	if err := e.gpu.Synchronize(); err != nil {
		e.t.Fatal(err)
	}
	per := time.Since(start) / reps
	status := ""
	if rel > bound {
		status = " FAIL"
		e.t.Errorf("%s %s: relative L2 vs cpu = %.3g, want <= %.3g", name, shape, rel, bound)
	}
	e.t.Logf("%-10s %-34s relL2 %.3g  %v", name, shape, rel, per)
	row(name, shape, fmt.Sprintf("relL2 %.2e%s", rel, status), per.Round(time.Microsecond).String())
}

// TestOpsVsCPU compares each op with the cpu backend on random inputs of model-like shapes (bf16
// weights on both sides, float32 inputs) and times it. Times include the host side of each op (argument
// uploads, launch) at these sizes: they are latencies, not tuned kernel times.
func TestOpsVsCPU(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	e := &opEnv{t: t, cpu: cpu.New(cpu.Config{}), gpu: g, r: rand.New(rand.NewPCG(1, 2))}
	pick := func(p pair, side int) backend.Tensor {
		if side == 0 {
			return p.c
		}
		return p.g
	}
	const bound = conformanceRelL2

	for _, s := range []struct{ T, in, out int }{{1, 5120, 5120}, {16, 5120, 1024}, {128, 5120, 1024}, {5, 64, 512}} {
		x, w := e.input(1, s.T, s.in), e.weight(0.05, s.out, s.in)
		e.compare("Linear", fmt.Sprintf("[%d %d]x[%d %d]", s.T, s.in, s.out, s.in), bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.Linear(pick(x, side), pick(w, side))
		})
	}
	// The GEMV kernel against cuBLASLt (for T <= 64 rows and a float32 x, the hi/lo split GEMM) on the
	// decode shapes: attention q/o, k/v, the shared expert's down and gate/up.
	for _, s := range []struct{ T, in, out int }{{1, 5120, 5120}, {2, 5120, 5120}, {4, 5120, 5120}, {8, 5120, 5120},
		{1, 5120, 1024}, {1, 8192, 5120}, {1, 5120, 16384}} {
		x, w := e.input(1, s.T, s.in), e.weight(0.05, s.out, s.in)
		for _, rows := range []int{8, 0} {
			name := "Lin gemv"
			if rows == 0 {
				name = "Lin lt-split"
			}
			old := cuda.SetGEMVRows(g, rows)
			e.compare(name, fmt.Sprintf("[%d %d]x[%d %d]", s.T, s.in, s.out, s.in), bound, func(b backend.Ops, side int) (backend.Tensor, error) {
				return b.Linear(pick(x, side), pick(w, side))
			})
			cuda.SetGEMVRows(g, old)
		}
	}
	{
		x, w := e.input(2, 128, 5120), e.weight(1, 5120)
		e.compare("RMSNorm", "[128 5120]", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.RMSNorm(pick(x, side), pick(w, side), 1e-5)
		})
		q := e.input(2, 16, 40, 128)
		e.compare("QKNorm", "[16 40 128] no weight", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.RMSNorm(pick(q, side), nil, 1e-5)
		})
	}
	{
		a, c := e.input(4, 128, 8192), e.input(2, 128, 8192)
		e.compare("Add", "[128 8192]", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.Add(pick(a, side), pick(c, side))
		})
		e.compare("SiLUMul", "[128 8192]", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.SiLUMul(pick(a, side), pick(c, side))
		})
		scale := randVals(e.r, 128, 2)
		e.compare("ScaleRows", "[128 8192]", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.ScaleRows(pick(a, side), scale)
		})
	}
	{
		const T, heads, D = 64, 40, 128
		x := e.input(2, T, heads, D)
		pos := make([]int, T)
		for i := range pos {
			pos[i] = 8000 + 37*i
		}
		inv := make([]float32, D/2)
		for i := range inv {
			inv[i] = float32(1 / math.Pow(500000, float64(2*i)/D))
		}
		e.compare("RoPE", "[64 40 128] pos 8000+", bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.RoPE(pick(x, side), pos, inv)
		})
	}
	{
		table := e.weight(1, 4096, 5120)
		ids := []int{3, 4095, 17, 2048, 5000}
		e.compare("Embed", "[4096 5120] 5 ids", 0, func(b backend.Ops, side int) (backend.Tensor, error) {
			return b.Embed(pick(table, side), ids, 0)
		})
	}
	// Attention: a cache filled once per backend, then a decode query and a chunked prefill.
	for _, s := range []struct {
		name                  string
		ctx, T, chunk         int
		heads, kvHeads, headD int
	}{
		{"decode", 1024, 1, 0, 40, 8, 128},
		{"decode chunked", 1000, 1, 256, 40, 8, 128},
		{"decode", 700, 3, 256, 40, 8, 128},
		{"decode", 1024, 8, 0, 40, 8, 128},
		{"prefill", 512, 512, 0, 40, 8, 128},
		{"prefill chunked", 512, 512, 128, 40, 8, 128},
	} {
		w := backend.Window{Chunk: s.chunk}
		k, v := e.input(1, s.ctx, s.kvHeads, s.headD), e.input(1, s.ctx, s.kvHeads, s.headD)
		q := e.input(1, s.T, s.heads, s.headD)
		all := make([]int, s.ctx)
		for i := range all {
			all[i] = i
		}
		var caches [2]backend.KVCache
		for side, b := range []backend.Ops{e.cpu, e.gpu} {
			c := newCache(t, b, s.kvHeads, s.headD, s.ctx, w, 0)
			if err := c.Append(pick(k, side), pick(v, side), all); err != nil {
				t.Fatal(err)
			}
			caches[side] = c
		}
		pos := all[s.ctx-s.T:]
		e.compare("Attention", fmt.Sprintf("%s T %d ctx %d h %d/%d D %d", s.name, s.T, s.ctx, s.heads, s.kvHeads, s.headD), bound,
			func(b backend.Ops, side int) (backend.Tensor, error) {
				return b.Attention(pick(q, side), caches[side], pos, w, float32(1/math.Sqrt(float64(s.headD))))
			})
	}
	// MoE: route then experts (Scout-like E and k, smaller H and I to keep the cpu side quick, and the
	// Scout decode shape). T <= 64 runs the split-K GEMV path, T 256 and 200 the grouped GEMMs.
	for _, s := range []struct{ T, E, k, H, I int }{{1, 16, 1, 5120, 1024}, {1, 16, 1, 5120, 8192}, {32, 16, 1, 2048, 1024},
		{8, 8, 2, 1024, 512}, {64, 16, 1, 1024, 512}, {256, 16, 2, 1024, 512}, {200, 8, 1, 512, 256}} {
		x := e.input(1, s.T, s.H)
		logits := e.input(3, s.T, s.E)
		gu := e.weight(float32(2/math.Sqrt(float64(s.H))), s.E, s.H, 2*s.I)
		dn := e.weight(float32(2/math.Sqrt(float64(s.I))), s.E, s.I, s.H)
		shape := fmt.Sprintf("T %d E %d k %d H %d I %d", s.T, s.E, s.k, s.H, s.I)
		e.compare("Route+Exp", shape, bound, func(b backend.Ops, side int) (backend.Tensor, error) {
			r, err := b.Route(pick(logits, side), s.k)
			if err != nil {
				return nil, err
			}
			return b.Experts(pick(x, side), r, pick(gu, side), pick(dn, side), 0)
		})
	}
	t.Logf("memory %+v, linear %+v", g.Memory(), g.Counters())
}

// activeExperts returns how many distinct experts routing rt chose (a synchronisation).
func activeExperts(t *testing.T, g *cuda.Backend, rt backend.Routing) int {
	t.Helper()
	ids, _, err := g.ReadRouting(rt)
	if err != nil {
		t.Fatal(err)
	}
	distinct := map[int]bool{}
	for _, id := range ids {
		distinct[id] = true
	}
	return len(distinct)
}

// TestHostStats: the backend's host counters (backend.HostReporter, bench's prefill_host) count a
// Synchronize and a download as waits for the device, report the pool's cuMemAlloc calls and forced
// collections (MemoryStats), and never go down.
func TestHostStats(t *testing.T) {
	g := newBackend(t, cuda.BF16)
	before := g.HostStats()
	if err := g.Synchronize(); err != nil {
		t.Fatal(err)
	}
	x, err := g.FromFloat32([]int{2, 3}, []float32{1, 2, 3, 4, 5, 6})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Float32(x); err != nil {
		t.Fatal(err)
	}
	after, m := g.HostStats(), g.Memory()
	d := after.Sub(before)
	if d.Syncs < 2 || d.Allocs < 0 || d.Collections < 0 || d.CollectionTime < 0 {
		t.Errorf("host stats over a Synchronize and a download: %+v, want at least two waits and nothing negative", d)
	}
	if after.Allocs != m.Allocs || after.Collections != m.Collections || after.CollectionTime != m.CollectionTime {
		t.Errorf("HostStats %+v disagree with Memory %+v", after, m)
	}
}
