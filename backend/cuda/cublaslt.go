package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"github.com/tpfleet/tpfleet/internal/dl"
	"unsafe"
)

// lt holds the cuBLASLt entry points, resolved once by loadLibraries.
var lt struct {
	getVersion, statusString, statusName, create, destroy         unsafe.Pointer
	descCreate, descDestroy, descSet, layoutCreate, layoutDestroy unsafe.Pointer
	prefCreate, prefDestroy, prefSet, heuristic, matmul           unsafe.Pointer
}

func cublasLtSymbols() []dl.Symbol {
	return []dl.Symbol{
		{Name: "cublasLtGetVersion", Dst: &lt.getVersion},
		{Name: "cublasLtGetStatusString", Dst: &lt.statusString},
		{Name: "cublasLtGetStatusName", Dst: &lt.statusName, Optional: true},
		{Name: "cublasLtCreate", Dst: &lt.create},
		{Name: "cublasLtDestroy", Dst: &lt.destroy},
		{Name: "cublasLtMatmulDescCreate", Dst: &lt.descCreate},
		{Name: "cublasLtMatmulDescDestroy", Dst: &lt.descDestroy},
		{Name: "cublasLtMatmulDescSetAttribute", Dst: &lt.descSet},
		{Name: "cublasLtMatrixLayoutCreate", Dst: &lt.layoutCreate},
		{Name: "cublasLtMatrixLayoutDestroy", Dst: &lt.layoutDestroy},
		{Name: "cublasLtMatmulPreferenceCreate", Dst: &lt.prefCreate},
		{Name: "cublasLtMatmulPreferenceDestroy", Dst: &lt.prefDestroy},
		{Name: "cublasLtMatmulPreferenceSetAttribute", Dst: &lt.prefSet},
		{Name: "cublasLtMatmulAlgoGetHeuristic", Dst: &lt.heuristic},
		{Name: "cublasLtMatmul", Dst: &lt.matmul},
	}
}

// cuBLASLt and library_types.h constants (checked against the CUDA 13 headers by the prototype).
const (
	cudaR32F         = 0
	cudaR16BF        = 14
	cudaR8FE4M3      = 28
	cublasCompute32F = 68
	descTransA       = 3
	descTransB       = 4
	prefMaxWorkspace = 1
	opN, opT         = 0, 1
	// FP8 outer-vector scaling (cuBLASLt 12.9 and later; fp8gemm.go checks it at start-up).
	descAScalePointer = 17 // CUBLASLT_MATMUL_DESC_A_SCALE_POINTER
	descBScalePointer = 18 // CUBLASLT_MATMUL_DESC_B_SCALE_POINTER
	descAScaleMode    = 31 // CUBLASLT_MATMUL_DESC_A_SCALE_MODE
	descBScaleMode    = 32 // CUBLASLT_MATMUL_DESC_B_SCALE_MODE
	scaleOuterVec32F  = 3  // CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
)

func cublasLtVersion() int { return int(C.tp_ltGetVersion(lt.getVersion)) }

// gemmKey identifies a GEMM shape: D [m, n] = x [m, k] · w [n, k]ᵀ with bf16 inputs and out as D's type,
// or, with wIn, D = x · w for an input-major w [k, n] (the experts' gate_up and down weights).
type gemmKey struct {
	m, n, k int
	out     DType
	wIn     bool
	fp8     bool // x and w are E4M3 codes (fp8gemm.go; not with wIn: cuBLASLt's FP8 takes W transposed only)
	// scaled (with fp8): D[t][o] = sw[o]·sx[t]·Σ x·w, cuBLASLt's outer-vector scaling: one float32 scale
	// per row of W (sw, n of them) and per row of X (sx, m); runScaled passes the two vectors.
	scaled bool
}

// gemmPlan is a cached cuBLASLt description of one shape; ok is false when cuBLASLt has no algorithm
// for it (the backend then uses its own kernel).
type gemmPlan struct {
	desc      C.cublasLtMatmulDesc_t
	w, x, d   C.cublasLtMatrixLayout_t
	heuristic C.cublasLtMatmulHeuristicResult_t
	ok        bool
	destroyed bool
}

// gemm owns a cuBLASLt handle, its workspace and the plans made so far.
type gemm struct {
	d      *device
	h      C.cublasLtHandle_t
	ws     devptr
	wsSize int64
	plans  map[gemmKey]*gemmPlan
}

func newGemm(d *device, workspace int64) (*gemm, error) {
	g := &gemm{d: d, wsSize: workspace, plans: map[gemmKey]*gemmPlan{}}
	if err := check("cublasLtCreate", ltStatus(C.tp_ltCreate(lt.create, d.ctx, &g.h))); err != nil {
		return nil, err
	}
	if workspace > 0 {
		ws, err := d.memAlloc(workspace)
		if err != nil {
			C.tp_ltDestroy(lt.destroy, d.ctx, g.h)
			return nil, err
		}
		g.ws = ws
	}
	return g, nil
}

func (g *gemm) close() error {
	var first error
	keep := func(err error) {
		if first == nil {
			first = err
		}
	}
	for _, p := range g.plans {
		keep(p.destroy())
	}
	g.plans = nil
	if g.ws != 0 {
		keep(g.d.memFree(g.ws))
	}
	keep(check("cublasLtDestroy", ltStatus(C.tp_ltDestroy(lt.destroy, g.d.ctx, g.h))))
	return first
}

func (p *gemmPlan) destroy() error {
	if p.destroyed {
		return nil
	}
	p.destroyed = true
	var first error
	for _, l := range []C.cublasLtMatrixLayout_t{p.w, p.x, p.d} {
		if l != nil {
			if err := check("cublasLtMatrixLayoutDestroy", ltStatus(C.tp_ltMatrixLayoutDestroy(lt.layoutDestroy, l))); err != nil && first == nil {
				first = err
			}
		}
	}
	if p.desc != nil {
		if err := check("cublasLtMatmulDescDestroy", ltStatus(C.tp_ltMatmulDescDestroy(lt.descDestroy, p.desc))); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func ltType(dt DType) C.int {
	if dt == F32 {
		return cudaR32F
	}
	return cudaR16BF
}

// plan returns the cached plan for key, making it on first use. In cuBLASLt's column-major terms the
// product is Dᵀ [n, m] = op(W) · X with W stored [k, n] (ld k) transposed, or for wIn stored [n, k]
// (ld n) as it is, and X stored [k, m] (ld k).
func (g *gemm) plan(key gemmKey) (*gemmPlan, error) {
	if p, ok := g.plans[key]; ok {
		return p, nil
	}
	p := &gemmPlan{}
	op := fmt.Sprintf("gemm m=%d n=%d k=%d", key.m, key.n, key.k)
	fail := func(err error) (*gemmPlan, error) {
		p.destroy()
		return nil, err
	}
	if err := check(op+": cublasLtMatmulDescCreate", ltStatus(C.tp_ltMatmulDescCreate(lt.descCreate, &p.desc, cublasCompute32F, cudaR32F))); err != nil {
		return fail(err)
	}
	ta, tb := C.int32_t(opT), C.int32_t(opN)
	wRows, wCols, wLd := key.k, key.n, key.k // w [n, k] row-major: column-major [k, n], transposed
	if key.wIn {
		ta = opN
		wRows, wCols, wLd = key.n, key.k, key.n // w [k, n] row-major: column-major [n, k]
	}
	if err := check(op+": set TRANSA", ltStatus(C.tp_ltMatmulDescSetAttribute(lt.descSet, p.desc, descTransA, unsafe.Pointer(&ta), 4))); err != nil {
		return fail(err)
	}
	if err := check(op+": set TRANSB", ltStatus(C.tp_ltMatmulDescSetAttribute(lt.descSet, p.desc, descTransB, unsafe.Pointer(&tb), 4))); err != nil {
		return fail(err)
	}
	if key.scaled {
		mode := C.int32_t(scaleOuterVec32F)
		for _, attr := range []C.int{descAScaleMode, descBScaleMode} {
			st := ltStatus(C.tp_ltMatmulDescSetAttribute(lt.descSet, p.desc, attr, unsafe.Pointer(&mode), 4))
			if !st.ok() { // a cuBLASLt without the attribute: no plan, the unscaled path runs
				g.plans[key] = p
				return p, nil
			}
		}
	}
	m, n, k := C.uint64_t(key.m), C.uint64_t(key.n), C.uint64_t(key.k)
	in := C.int(cudaR16BF)
	if key.fp8 {
		in = cudaR8FE4M3
	}
	if err := check(op+": layout W", ltStatus(C.tp_ltMatrixLayoutCreate(lt.layoutCreate, &p.w, in, C.uint64_t(wRows), C.uint64_t(wCols), C.int64_t(wLd)))); err != nil {
		return fail(err)
	}
	if err := check(op+": layout X", ltStatus(C.tp_ltMatrixLayoutCreate(lt.layoutCreate, &p.x, in, k, m, C.int64_t(key.k)))); err != nil {
		return fail(err)
	}
	if err := check(op+": layout D", ltStatus(C.tp_ltMatrixLayoutCreate(lt.layoutCreate, &p.d, ltType(key.out), n, m, C.int64_t(key.n)))); err != nil {
		return fail(err)
	}
	var pref C.cublasLtMatmulPreference_t
	if err := check(op+": cublasLtMatmulPreferenceCreate", ltStatus(C.tp_ltMatmulPreferenceCreate(lt.prefCreate, &pref))); err != nil {
		return fail(err)
	}
	defer C.tp_ltMatmulPreferenceDestroy(lt.prefDestroy, pref)
	ws := C.uint64_t(g.wsSize)
	if err := check(op+": set MAX_WORKSPACE_BYTES", ltStatus(C.tp_ltMatmulPreferenceSetAttribute(lt.prefSet, pref, prefMaxWorkspace, unsafe.Pointer(&ws), 8))); err != nil {
		return fail(err)
	}
	var nres C.int
	st := ltStatus(C.tp_ltMatmulAlgoGetHeuristic(lt.heuristic, g.d.ctx, g.h, p.desc, p.w, p.x, p.d, p.d, pref, &p.heuristic, &nres))
	// NOT_SUPPORTED means no algorithm for this shape: not an error, the fallback kernel takes it.
	const notSupported = 15
	switch {
	case st == notSupported:
	case !st.ok():
		return fail(check(op+": cublasLtMatmulAlgoGetHeuristic", st))
	default:
		p.ok = nres > 0
	}
	g.plans[key] = p
	return p, nil
}

// run enqueues D = X · Wᵀ with the plan of key on s. The pointers must be 16-byte aligned (pool buffers
// and loaded tensors are 256-byte aligned).
func (g *gemm) run(p *gemmPlan, key gemmKey, x, w, d devptr, s *stream) error {
	return g.runScaled(p, key, x, w, d, 0, 0, s)
}

// runScaled is run for a scaled key: sw (n float32, W's rows) and sx (m float32, X's rows) are the
// outer-vector scales, set on the plan's descriptor before the call (cuBLASLt reads them when the call
// enqueues its kernels).
func (g *gemm) runScaled(p *gemmPlan, key gemmKey, x, w, d, sw, sx devptr, s *stream) error {
	if s.rec != nil {
		if enqueue, err := s.rec.op([]uint64{sigMatmul, uint64(uintptr(unsafe.Pointer(p))), uint64(x), uint64(w), uint64(d), uint64(sw), uint64(sx)}); !enqueue {
			return err
		}
	}
	if key.scaled {
		for _, a := range []struct {
			attr C.int
			ptr  devptr
		}{{descAScalePointer, sw}, {descBScalePointer, sx}} {
			v := C.uint64_t(a.ptr)
			if err := check(fmt.Sprintf("cublasLtMatmul m=%d n=%d k=%d: set scale pointer %d", key.m, key.n, key.k, a.attr),
				ltStatus(C.tp_ltMatmulDescSetAttribute(lt.descSet, p.desc, a.attr, unsafe.Pointer(&v), 8))); err != nil {
				return err
			}
		}
	}
	alpha, beta := C.float(1), C.float(0)
	ws := g.ws
	if s.ws != 0 {
		ws = s.ws
	}
	st := ltStatus(C.tp_ltMatmul(lt.matmul, g.d.ctx, g.h, p.desc, &alpha,
		C.CUdeviceptr(w), p.w, C.CUdeviceptr(x), p.x, &beta, C.CUdeviceptr(d), p.d, C.CUdeviceptr(d), p.d,
		&p.heuristic.algo, C.CUdeviceptr(ws), C.size_t(g.wsSize), s.s))
	if st.ok() {
		if s.prof != nil {
			name := "cublasLt"
			switch {
			case key.scaled:
				name = "cublasLt fp8 outer-vec"
			case key.fp8:
				name = "cublasLt fp8"
			}
			s.prof.mark(s, fmt.Sprintf("%s m=%d n=%d k=%d", name, key.m, key.n, key.k))
		}
		return nil
	}
	return check(fmt.Sprintf("cublasLtMatmul m=%d n=%d k=%d", key.m, key.n, key.k), st)
}
