package nccl

// The cgo half of the NCCL communicator: our own declarations of the few NCCL and CUDA driver entry
// points it uses (no header needed to build), and trampolines (package internal/dl dlopens the libraries). Every trampoline that
// touches the device makes the communicator's CUDA context current on the calling thread for the call
// and restores the thread's previous context afterwards, so callers (the cuda backend binds its context
// once per thread) see their thread's state unchanged.

/*
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

typedef int ncclResult_t;
typedef void* ncclComm_t;
typedef struct { char internal[128]; } ncclUniqueId; // NCCL_UNIQUE_ID_BYTES
typedef int CUresult;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef unsigned long long CUdeviceptr;


// Driver entry points, set by tn_set_driver.
static void *cu_get, *cu_set, *cu_alloc, *cu_free, *cu_ev_create, *cu_ev_destroy, *cu_ev_record, *cu_ev_query;
static void tn_set_driver(void** p) {
	cu_get = p[0]; cu_set = p[1]; cu_alloc = p[2]; cu_free = p[3];
	cu_ev_create = p[4]; cu_ev_destroy = p[5]; cu_ev_record = p[6]; cu_ev_query = p[7];
}

// enter makes c current, returning the previous context in *prev; leave restores it.
static CUresult enter(CUcontext c, CUcontext* prev) {
	CUresult r = ((CUresult(*)(CUcontext*))cu_get)(prev);
	if (r) return r;
	if (*prev != c) r = ((CUresult(*)(CUcontext))cu_set)(c);
	return r;
}
static void leave(CUcontext c, CUcontext prev) {
	if (prev != c) ((CUresult(*)(CUcontext))cu_set)(prev);
}
// CU_CALL runs expr (a CUresult) with c current.
#define CU_CALL(c, expr) do { CUcontext p_; CUresult r_ = enter((CUcontext)c, &p_); if (r_) return r_; r_ = (expr); leave((CUcontext)c, p_); return r_; } while (0)
// NC_CALL runs expr (an ncclResult_t) with c current; a context switch failure is NCCL's
// ncclUnhandledCudaError (1).
#define NC_CALL(c, expr) do { CUcontext p_; if (enter((CUcontext)c, &p_)) return 1; ncclResult_t r_ = (expr); leave((CUcontext)c, p_); return r_; } while (0)

static CUresult tn_cuCtxGetCurrent(uintptr_t* c) { CUcontext x = 0; CUresult r = ((CUresult(*)(CUcontext*))cu_get)(&x); *c = (uintptr_t)x; return r; }
static CUresult tn_cuMemAlloc(uintptr_t c, CUdeviceptr* p, size_t n) { CU_CALL(c, ((CUresult(*)(CUdeviceptr*, size_t))cu_alloc)(p, n)); }
static CUresult tn_cuMemFree(uintptr_t c, CUdeviceptr p) { CU_CALL(c, ((CUresult(*)(CUdeviceptr))cu_free)(p)); }
static CUresult tn_cuEventCreate(uintptr_t c, CUevent* e) { CU_CALL(c, ((CUresult(*)(CUevent*, unsigned))cu_ev_create)(e, 2)); } // CU_EVENT_DISABLE_TIMING
static CUresult tn_cuEventDestroy(uintptr_t c, CUevent e) { CU_CALL(c, ((CUresult(*)(CUevent))cu_ev_destroy)(e)); }
static CUresult tn_cuEventRecord(uintptr_t c, CUevent e, uintptr_t s) { CU_CALL(c, ((CUresult(*)(CUevent, CUstream))cu_ev_record)(e, (CUstream)s)); }
static CUresult tn_cuEventQuery(uintptr_t c, CUevent e) { CU_CALL(c, ((CUresult(*)(CUevent))cu_ev_query)(e)); }

static ncclResult_t tn_getVersion(void* f, int* v) { return ((ncclResult_t(*)(int*))f)(v); }
static const char* tn_getErrorString(void* f, ncclResult_t r) { return ((const char*(*)(ncclResult_t))f)(r); }
static const char* tn_getLastError(void* f, ncclComm_t c) { return f ? ((const char*(*)(ncclComm_t))f)(c) : ""; }
static ncclResult_t tn_getUniqueId(void* f, void* id) { return ((ncclResult_t(*)(ncclUniqueId*))f)((ncclUniqueId*)id); }

// tn_initRank runs ncclCommInitRank with the calling thread's current context (the caller's).
static ncclResult_t tn_initRank(void* f, ncclComm_t* c, int n, const void* id, int rank) {
	ncclUniqueId u;
	memcpy(&u, id, sizeof u);
	return ((ncclResult_t(*)(ncclComm_t*, int, ncclUniqueId, int))f)(c, n, u, rank);
}

// tn_initGroup makes the n communicators of one process, rank i on context ctxs[i], between
// ncclGroupStart and ncclGroupEnd (one thread initialises every rank).
static ncclResult_t tn_initGroup(void* start, void* end, void* init, int n, uintptr_t* ctxs, const void* id, ncclComm_t* comms) {
	CUcontext prev;
	if (((CUresult(*)(CUcontext*))cu_get)(&prev)) return 1;
	ncclUniqueId u;
	memcpy(&u, id, sizeof u);
	ncclResult_t r = ((ncclResult_t(*)(void))start)();
	if (r) return r;
	for (int i = 0; i < n && r == 0; i++) {
		if (((CUresult(*)(CUcontext))cu_set)((CUcontext)ctxs[i])) r = 1;
		else r = ((ncclResult_t(*)(ncclComm_t*, int, ncclUniqueId, int))init)(&comms[i], n, u, i);
	}
	ncclResult_t e = ((ncclResult_t(*)(void))end)();
	((CUresult(*)(CUcontext))cu_set)(prev);
	return r ? r : e;
}

static ncclResult_t tn_commDestroy(void* f, uintptr_t x, ncclComm_t c) { NC_CALL(x, ((ncclResult_t(*)(ncclComm_t))f)(c)); }
static ncclResult_t tn_commAbort(void* f, uintptr_t x, ncclComm_t c) { NC_CALL(x, ((ncclResult_t(*)(ncclComm_t))f)(c)); }
static ncclResult_t tn_asyncError(void* f, ncclComm_t c, ncclResult_t* r) { return ((ncclResult_t(*)(ncclComm_t, ncclResult_t*))f)(c, r); }
static ncclResult_t tn_allReduce(void* f, uintptr_t x, uint64_t s, uint64_t r, size_t n, int dt, int op, ncclComm_t c, uintptr_t st) {
	NC_CALL(x, ((ncclResult_t(*)(const void*, void*, size_t, int, int, ncclComm_t, void*))f)((const void*)s, (void*)r, n, dt, op, c, (void*)st));
}
static ncclResult_t tn_allGather(void* f, uintptr_t x, uint64_t s, uint64_t r, size_t n, int dt, ncclComm_t c, uintptr_t st) {
	NC_CALL(x, ((ncclResult_t(*)(const void*, void*, size_t, int, ncclComm_t, void*))f)((const void*)s, (void*)r, n, dt, c, (void*)st));
}
static ncclResult_t tn_broadcast(void* f, uintptr_t x, uint64_t s, uint64_t r, size_t n, int dt, int root, ncclComm_t c, uintptr_t st) {
	NC_CALL(x, ((ncclResult_t(*)(const void*, void*, size_t, int, int, ncclComm_t, void*))f)((const void*)s, (void*)r, n, dt, root, c, (void*)st));
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/internal/dl"
)

// ErrUnavailable reports that NCCL cannot be used here: libnccl.so.2 or libcuda.so.1 is missing or
// lacks an entry point.
var ErrUnavailable = errors.New("nccl: NCCL unavailable")

// nc holds the NCCL entry points.
var nc struct {
	once                                           sync.Once
	err                                            error
	path                                           string
	version, errStr, lastErr, uniqueID, initRank   unsafe.Pointer
	destroy, abort, asyncErr, allReduce, allGather unsafe.Pointer
	broadcast, groupStart, groupEnd                unsafe.Pointer
	cuGet, cuSet, cuAlloc, cuFree                  unsafe.Pointer
	cuEvCreate, cuEvDestroy, cuEvRecord, cuEvQuery unsafe.Pointer
}

// load dlopens libcuda.so.1 and libnccl.so.2 once per process (package internal/dl's search) and sets
// NCCL_NVLS_ENABLE=0 when it is unset: NVLink multicast (NVLS) can take shared GPUs out of service, so it
// stays off unless asked for.
func load() error {
	nc.once.Do(func() {
		if _, ok := os.LookupEnv("NCCL_NVLS_ENABLE"); !ok {
			os.Setenv("NCCL_NVLS_ENABLE", "0")
		}
		dirs := dl.SearchDirs(nil)
		if _, nc.err = open([]string{"libcuda.so.1"}, dirs,
			dl.Symbol{Name: "cuCtxGetCurrent", Dst: &nc.cuGet}, dl.Symbol{Name: "cuCtxSetCurrent", Dst: &nc.cuSet},
			dl.Symbol{Name: "cuMemAlloc_v2", Dst: &nc.cuAlloc}, dl.Symbol{Name: "cuMemFree_v2", Dst: &nc.cuFree},
			dl.Symbol{Name: "cuEventCreate", Dst: &nc.cuEvCreate}, dl.Symbol{Name: "cuEventDestroy_v2", Dst: &nc.cuEvDestroy},
			dl.Symbol{Name: "cuEventRecord", Dst: &nc.cuEvRecord}, dl.Symbol{Name: "cuEventQuery", Dst: &nc.cuEvQuery},
		); nc.err != nil {
			return
		}
		ptrs := [8]unsafe.Pointer{nc.cuGet, nc.cuSet, nc.cuAlloc, nc.cuFree, nc.cuEvCreate, nc.cuEvDestroy, nc.cuEvRecord, nc.cuEvQuery}
		C.tn_set_driver((*unsafe.Pointer)(unsafe.Pointer(&ptrs[0])))
		l, err := open([]string{"libnccl.so.2"}, dirs,
			dl.Symbol{Name: "ncclGetVersion", Dst: &nc.version}, dl.Symbol{Name: "ncclGetErrorString", Dst: &nc.errStr},
			dl.Symbol{Name: "ncclGetLastError", Dst: &nc.lastErr, Optional: true},
			dl.Symbol{Name: "ncclGetUniqueId", Dst: &nc.uniqueID}, dl.Symbol{Name: "ncclCommInitRank", Dst: &nc.initRank},
			dl.Symbol{Name: "ncclCommDestroy", Dst: &nc.destroy}, dl.Symbol{Name: "ncclCommAbort", Dst: &nc.abort},
			dl.Symbol{Name: "ncclCommGetAsyncError", Dst: &nc.asyncErr}, dl.Symbol{Name: "ncclAllReduce", Dst: &nc.allReduce},
			dl.Symbol{Name: "ncclAllGather", Dst: &nc.allGather}, dl.Symbol{Name: "ncclBroadcast", Dst: &nc.broadcast},
			dl.Symbol{Name: "ncclGroupStart", Dst: &nc.groupStart}, dl.Symbol{Name: "ncclGroupEnd", Dst: &nc.groupEnd},
		)
		if nc.err = err; err == nil {
			nc.path = l.Path
		}
	})
	return nc.err
}

// open loads the first of sonames found in dirs and resolves syms in it.
func open(sonames, dirs []string, syms ...dl.Symbol) (*dl.Library, error) {
	l, err := dl.Open(sonames, dirs, ErrUnavailable)
	if err == nil {
		err = l.Resolve(syms...)
	}
	if err != nil {
		return nil, fmt.Errorf("nccl: %w", err)
	}
	return l, nil
}

// Library returns the path libnccl.so.2 was loaded from and NCCL's version code (e.g. 22803 for
// 2.28.3), loading it first if needed.
func Library() (path string, version int, err error) {
	if err := load(); err != nil {
		return "", 0, err
	}
	var v C.int
	if err := ncclCheck(nil, "ncclGetVersion", C.tn_getVersion(nc.version, &v)); err != nil {
		return nc.path, 0, err
	}
	return nc.path, int(v), nil
}

// ncclError is a failed NCCL or driver call.
type ncclError struct {
	call string
	code int
	text string
}

func (e *ncclError) Error() string { return fmt.Sprintf("%s: error %d (%s)", e.call, e.code, e.text) }

func ncclCheck(c C.ncclComm_t, call string, r C.ncclResult_t) error {
	if r == 0 {
		return nil
	}
	text := C.GoString(C.tn_getErrorString(nc.errStr, r))
	if c != nil {
		if last := C.GoString(C.tn_getLastError(nc.lastErr, c)); last != "" {
			text += ": " + last
		}
	}
	return &ncclError{call: call, code: int(r), text: text}
}

func cuCheck(call string, r C.CUresult) error {
	if r == 0 {
		return nil
	}
	return &ncclError{call: call, code: int(r), text: "CUDA driver error"}
}

// cuNotReady is CUDA_ERROR_NOT_READY, cuEventQuery's answer for pending work.
const cuNotReady = 600

// NewUniqueID returns a fresh NCCL bootstrap id (ncclGetUniqueId). Rank 0 makes it and every rank
// passes the same id to New.
func NewUniqueID() (UniqueID, error) {
	var id UniqueID
	if err := load(); err != nil {
		return id, err
	}
	err := ncclCheck(nil, "ncclGetUniqueId", C.tn_getUniqueId(nc.uniqueID, unsafe.Pointer(&id[0])))
	return id, err
}

// device is what the Go side keeps of an NCCL communicator.
type device struct {
	comm C.ncclComm_t
	ctx  C.uintptr_t // the CUcontext
	ev   C.CUevent
	one  C.CUdeviceptr // one float32 for Barrier
}

// cuCtx converts a CUcontext handle held as a uintptr.
func cuCtx(p uintptr) C.uintptr_t { return C.uintptr_t(p) }

func currentContext() (uintptr, error) {
	var c C.uintptr_t
	if err := cuCheck("cuCtxGetCurrent", C.tn_cuCtxGetCurrent(&c)); err != nil {
		return 0, err
	}
	if c == 0 {
		return 0, errors.New("nccl: no CUDA context is current on this thread")
	}
	return uintptr(c), nil
}

func initRank(id UniqueID, rank, size int) (C.ncclComm_t, error) {
	var c C.ncclComm_t
	err := ncclCheck(nil, "ncclCommInitRank", C.tn_initRank(nc.initRank, &c, C.int(size), unsafe.Pointer(&id[0]), C.int(rank)))
	return c, err
}

func initGroup(id UniqueID, ctxs []uintptr) ([]C.ncclComm_t, error) {
	n := len(ctxs)
	cc := (*C.uintptr_t)(C.malloc(C.size_t(n) * 8))
	defer C.free(unsafe.Pointer(cc))
	cs := unsafe.Slice(cc, n)
	for i, c := range ctxs {
		cs[i] = C.uintptr_t(c)
	}
	out := (*C.ncclComm_t)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.ncclComm_t(nil)))))
	defer C.free(unsafe.Pointer(out))
	outs := unsafe.Slice(out, n)
	for i := range outs {
		outs[i] = nil
	}
	idc := C.CBytes(id[:])
	defer C.free(idc)
	err := ncclCheck(nil, "ncclCommInitRank (group)", C.tn_initGroup(nc.groupStart, nc.groupEnd, nc.initRank, C.int(n), cc, idc, out))
	comms := make([]C.ncclComm_t, n)
	copy(comms, outs)
	return comms, err
}

// setup gives a new communicator its Barrier scratch and its completion event.
func (d *device) setup() error {
	if err := cuCheck("cuMemAlloc", C.tn_cuMemAlloc(d.ctx, &d.one, 4)); err != nil {
		return err
	}
	return cuCheck("cuEventCreate", C.tn_cuEventCreate(d.ctx, &d.ev))
}

func (d *device) release(abort bool) error {
	var errs []error
	if d.ev != nil {
		errs = append(errs, cuCheck("cuEventDestroy", C.tn_cuEventDestroy(d.ctx, d.ev)))
		d.ev = nil
	}
	if d.comm != nil {
		if abort {
			errs = append(errs, ncclCheck(nil, "ncclCommAbort", C.tn_commAbort(nc.abort, d.ctx, d.comm)))
		} else {
			errs = append(errs, ncclCheck(nil, "ncclCommDestroy", C.tn_commDestroy(nc.destroy, d.ctx, d.comm)))
		}
		d.comm = nil
	}
	if d.one != 0 {
		errs = append(errs, cuCheck("cuMemFree", C.tn_cuMemFree(d.ctx, d.one)))
		d.one = 0
	}
	return errors.Join(errs...)
}

func (d *device) asyncError() error {
	var r C.ncclResult_t
	if err := ncclCheck(d.comm, "ncclCommGetAsyncError", C.tn_asyncError(nc.asyncErr, d.comm, &r)); err != nil {
		return err
	}
	return ncclCheck(d.comm, "asynchronous NCCL error", r)
}

// record marks the end of the work enqueued so far on stream.
func (d *device) record(stream uintptr) error {
	return cuCheck("cuEventRecord", C.tn_cuEventRecord(d.ctx, d.ev, C.uintptr_t(stream)))
}

// done reports whether the work before the last record has finished.
func (d *device) done() (bool, error) {
	r := C.tn_cuEventQuery(d.ctx, d.ev)
	if r == cuNotReady {
		return false, nil
	}
	return r == 0, cuCheck("cuEventQuery", r)
}

func ncclType(t comm.DType) C.int {
	if t == comm.BFloat16 {
		return 9 // ncclBfloat16
	}
	return 7 // ncclFloat32
}

func (d *device) allReduce(b comm.DeviceBuffer) error {
	return ncclCheck(d.comm, "ncclAllReduce", C.tn_allReduce(nc.allReduce, d.ctx, C.uint64_t(b.Ptr), C.uint64_t(b.Ptr),
		C.size_t(b.N), ncclType(b.Type), 0, d.comm, C.uintptr_t(b.Stream)))
}

func (d *device) allGather(send, recv comm.DeviceBuffer) error {
	return ncclCheck(d.comm, "ncclAllGather", C.tn_allGather(nc.allGather, d.ctx, C.uint64_t(send.Ptr), C.uint64_t(recv.Ptr),
		C.size_t(send.N), ncclType(send.Type), d.comm, C.uintptr_t(send.Stream)))
}

func (d *device) broadcast(b comm.DeviceBuffer, root int) error {
	return ncclCheck(d.comm, "ncclBroadcast", C.tn_broadcast(nc.broadcast, d.ctx, C.uint64_t(b.Ptr), C.uint64_t(b.Ptr),
		C.size_t(b.N), ncclType(b.Type), C.int(root), d.comm, C.uintptr_t(b.Stream)))
}

// barrierBuffer is the one-float scratch Barrier all-reduces, on the legacy default stream (ordered
// after the work of every blocking stream of the context).
func (d *device) barrierBuffer() comm.DeviceBuffer {
	return comm.DeviceBuffer{Ptr: uintptr(d.one), N: 1, Type: comm.Float32}
}
