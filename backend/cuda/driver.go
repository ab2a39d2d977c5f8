package cuda

/*
#include <stdlib.h>
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"github.com/tpfleet/tpfleet/internal/dl"
	"github.com/tpfleet/tpfleet/kernels"
	"math"
	"sync/atomic"
	"unsafe"
)

// drv holds the driver API entry points, resolved once by loadLibraries.
var drv struct {
	init, driverGetVersion, deviceGetCount, deviceGet, deviceGetName        unsafe.Pointer
	deviceGetAttribute, deviceTotalMem, primaryCtxRetain, primaryCtxRelease unsafe.Pointer
	ctxSetCurrent, getErrorName, getErrorString, memAlloc, memFree          unsafe.Pointer
	memAllocHost, memFreeHost, memGetInfo, memcpyHtoDAsync, memcpyDtoHAsync unsafe.Pointer
	memsetD8Async, moduleLoadData, moduleUnload, moduleGetFunction, launch  unsafe.Pointer
	streamCreate, streamDestroy, streamSynchronize, memcpyDtoDAsync         unsafe.Pointer

	// Optional: without them every step runs eagerly (see graph.go).
	beginCapture, endCapture, graphInstantiate, graphLaunch, graphExecDestroy, graphDestroy unsafe.Pointer
	eventCreate, eventDestroy, eventRecord, eventSynchronize, eventElapsedTime              unsafe.Pointer
	// Optional: without it offloaded experts are copied on the compute stream (offload.go).
	streamWaitEvent unsafe.Pointer
	// Optional (CUDA 11.8+): without it kernels launch without programmatic dependent launch.
	launchEx unsafe.Pointer
	// Optional: without it no kernel gets more than 48 KiB of dynamic shared memory (the grouped expert
	// GEMMs stay off, grouped.go).
	funcSetAttribute unsafe.Pointer
}

// driverSymbols names the entry points with the ABI version this package declares: the _v2 names are
// the ones CUDA's own header selects (size_t sizes, 64-bit device pointers).
func driverSymbols() []dl.Symbol {
	return []dl.Symbol{
		{Name: "cuInit", Dst: &drv.init},
		{Name: "cuDriverGetVersion", Dst: &drv.driverGetVersion},
		{Name: "cuDeviceGetCount", Dst: &drv.deviceGetCount},
		{Name: "cuDeviceGet", Dst: &drv.deviceGet},
		{Name: "cuDeviceGetName", Dst: &drv.deviceGetName},
		{Name: "cuDeviceGetAttribute", Dst: &drv.deviceGetAttribute},
		{Name: "cuDeviceTotalMem_v2", Dst: &drv.deviceTotalMem},
		{Name: "cuDevicePrimaryCtxRetain", Dst: &drv.primaryCtxRetain},
		{Name: "cuDevicePrimaryCtxRelease_v2", Dst: &drv.primaryCtxRelease},
		{Name: "cuCtxSetCurrent", Dst: &drv.ctxSetCurrent},
		{Name: "cuGetErrorName", Dst: &drv.getErrorName},
		{Name: "cuGetErrorString", Dst: &drv.getErrorString},
		{Name: "cuMemAlloc_v2", Dst: &drv.memAlloc},
		{Name: "cuMemFree_v2", Dst: &drv.memFree},
		{Name: "cuMemAllocHost_v2", Dst: &drv.memAllocHost},
		{Name: "cuMemFreeHost", Dst: &drv.memFreeHost},
		{Name: "cuMemGetInfo_v2", Dst: &drv.memGetInfo},
		{Name: "cuMemcpyHtoDAsync_v2", Dst: &drv.memcpyHtoDAsync},
		{Name: "cuMemcpyDtoHAsync_v2", Dst: &drv.memcpyDtoHAsync},
		{Name: "cuMemcpyDtoDAsync_v2", Dst: &drv.memcpyDtoDAsync},
		{Name: "cuMemsetD8Async", Dst: &drv.memsetD8Async},
		{Name: "cuModuleLoadData", Dst: &drv.moduleLoadData},
		{Name: "cuModuleUnload", Dst: &drv.moduleUnload},
		{Name: "cuModuleGetFunction", Dst: &drv.moduleGetFunction},
		{Name: "cuLaunchKernel", Dst: &drv.launch},
		{Name: "cuStreamCreate", Dst: &drv.streamCreate},
		{Name: "cuStreamDestroy_v2", Dst: &drv.streamDestroy},
		{Name: "cuStreamSynchronize", Dst: &drv.streamSynchronize},
		{Name: "cuStreamBeginCapture_v2", Dst: &drv.beginCapture, Optional: true},
		{Name: "cuStreamEndCapture", Dst: &drv.endCapture, Optional: true},
		{Name: "cuGraphInstantiateWithFlags", Dst: &drv.graphInstantiate, Optional: true},
		{Name: "cuGraphLaunch", Dst: &drv.graphLaunch, Optional: true},
		{Name: "cuGraphExecDestroy", Dst: &drv.graphExecDestroy, Optional: true},
		{Name: "cuGraphDestroy", Dst: &drv.graphDestroy, Optional: true},
		{Name: "cuEventCreate", Dst: &drv.eventCreate, Optional: true},
		{Name: "cuEventDestroy_v2", Dst: &drv.eventDestroy, Optional: true},
		{Name: "cuEventRecord", Dst: &drv.eventRecord, Optional: true},
		{Name: "cuEventSynchronize", Dst: &drv.eventSynchronize, Optional: true},
		{Name: "cuEventElapsedTime", Dst: &drv.eventElapsedTime, Optional: true},
		{Name: "cuStreamWaitEvent", Dst: &drv.streamWaitEvent, Optional: true},
		{Name: "cuLaunchKernelEx", Dst: &drv.launchEx, Optional: true},
		{Name: "cuFuncSetAttribute", Dst: &drv.funcSetAttribute, Optional: true},
	}
}

// Device attributes (CUdevice_attribute).
const (
	attrMultiprocessors = 16
	attrCCMajor         = 75
	attrCCMinor         = 76
)

// devptr is a device address.
type devptr uint64

// device is one GPU and its primary context (the context the CUDA runtime inside cuBLASLt and NCCL uses
// too).
type device struct {
	ordinal         int
	dev             C.CUdevice
	ctx             C.CUcontext
	name            string
	ccMajor         int
	ccMinor         int
	multiprocessors int
	totalMem        int64
	driverVersion   int
	// waits counts the host's waits for the device: stream and event synchronisations (HostStats).
	waits atomic.Int64
}

// eventSync waits until the work before event ev's record has finished.
func (d *device) eventSync(ev C.CUevent) error {
	d.waits.Add(1)
	return check("cuEventSynchronize", cuResult(C.tp_cuEventSynchronize(drv.eventSynchronize, d.ctx, ev)))
}

func driverVersion() (int, error) {
	var v C.int
	err := check("cuDriverGetVersion", cuResult(C.tp_cuDriverGetVersion(drv.driverGetVersion, &v)))
	return int(v), err
}

func deviceCount() (int, error) {
	var n C.int
	err := check("cuDeviceGetCount", cuResult(C.tp_cuDeviceGetCount(drv.deviceGetCount, &n)))
	return int(n), err
}

// openDevice retains the primary context of GPU ordinal.
func openDevice(ordinal int) (*device, error) {
	var n C.int
	if err := check("cuDeviceGetCount", cuResult(C.tp_cuDeviceGetCount(drv.deviceGetCount, &n))); err != nil {
		return nil, err
	}
	if ordinal < 0 || ordinal >= int(n) {
		return nil, fmt.Errorf("%w: device %d requested, %d present", ErrUnavailable, ordinal, int(n))
	}
	d := &device{ordinal: ordinal}
	if err := check("cuDeviceGet", cuResult(C.tp_cuDeviceGet(drv.deviceGet, &d.dev, C.int(ordinal)))); err != nil {
		return nil, err
	}
	var name [256]C.char
	if err := check("cuDeviceGetName", cuResult(C.tp_cuDeviceGetName(drv.deviceGetName, &name[0], 256, d.dev))); err != nil {
		return nil, err
	}
	d.name = C.GoString(&name[0])
	for _, a := range []struct {
		attr int
		dst  *int
	}{{attrCCMajor, &d.ccMajor}, {attrCCMinor, &d.ccMinor}, {attrMultiprocessors, &d.multiprocessors}} {
		var v C.int
		if err := check("cuDeviceGetAttribute", cuResult(C.tp_cuDeviceGetAttribute(drv.deviceGetAttribute, &v, C.int(a.attr), d.dev))); err != nil {
			return nil, err
		}
		*a.dst = int(v)
	}
	var total C.size_t
	if err := check("cuDeviceTotalMem", cuResult(C.tp_cuDeviceTotalMem(drv.deviceTotalMem, &total, d.dev))); err != nil {
		return nil, err
	}
	d.totalMem = int64(total)
	var err error
	if d.driverVersion, err = driverVersion(); err != nil {
		return nil, err
	}
	if err := check("cuDevicePrimaryCtxRetain", cuResult(C.tp_cuDevicePrimaryCtxRetain(drv.primaryCtxRetain, &d.ctx, d.dev))); err != nil {
		return nil, err
	}
	return d, nil
}

func (d *device) makeCurrent() error {
	return check("cuCtxSetCurrent", cuResult(C.tp_make_current(d.ctx)))
}

func (d *device) release() error {
	return check("cuDevicePrimaryCtxRelease", cuResult(C.tp_cuDevicePrimaryCtxRelease(drv.primaryCtxRelease, d.dev)))
}

func (d *device) memAlloc(n int64) (devptr, error) {
	var p C.CUdeviceptr
	err := check(fmt.Sprintf("cuMemAlloc(%d bytes)", n), cuResult(C.tp_cuMemAlloc(drv.memAlloc, d.ctx, &p, C.size_t(n))))
	return devptr(p), err
}

func (d *device) memFree(p devptr) error {
	return check("cuMemFree", cuResult(C.tp_cuMemFree(drv.memFree, d.ctx, C.CUdeviceptr(p))))
}

// memInfo returns the device's free and total memory.
func (d *device) memInfo() (free, total int64, err error) {
	var f, t C.size_t
	err = check("cuMemGetInfo", cuResult(C.tp_cuMemGetInfo(drv.memGetInfo, d.ctx, &f, &t)))
	return int64(f), int64(t), err
}

// stream is a CUstream of a device.
type stream struct {
	d    *device
	s    C.CUstream
	rec  *recorder // set while a Step captures or replays (graph.go)
	prof *profiler // set while Profile runs (profile.go)
	// pdl launches the kernels that begin with PDL_PROLOGUE (kernel.pdl) with programmatic dependent
	// launch (see launch); set by the Backend when the device, the driver and the Config allow it.
	pdl bool
	// ws is the cuBLASLt workspace of GEMMs on this stream, of the gemm's size; 0: the gemm's own (the
	// compute stream's). Side streams (fanout.go) have their own, since their GEMMs run at once.
	ws devptr
	// plainNext makes the next kernel launch without programmatic dependent launch: after the stream
	// waited for events (a fan-out's join), the kernel must start after them, not with the tail of the
	// kernel enqueued before them.
	plainNext bool
}

func (d *device) newStream() (*stream, error) {
	var s C.CUstream
	// Blocking (flags 0): ordered with the legacy default stream that cuBLASLt's internals may use.
	if err := check("cuStreamCreate", cuResult(C.tp_cuStreamCreate(drv.streamCreate, d.ctx, &s, 0))); err != nil {
		return nil, err
	}
	return &stream{d: d, s: s}, nil
}

func (s *stream) destroy() error {
	return check("cuStreamDestroy", cuResult(C.tp_cuStreamDestroy(drv.streamDestroy, s.d.ctx, s.s)))
}

func (s *stream) sync() error {
	if s.rec != nil {
		return s.rec.fail(fmt.Errorf("%w: stream synchronize", errNotRecordable))
	}
	s.d.waits.Add(1)
	return check("cuStreamSynchronize", cuResult(C.tp_cuStreamSynchronize(drv.streamSynchronize, s.d.ctx, s.s)))
}

// htodNow enqueues a copy of n bytes from pinned host memory src to dst. Uploads go through
// Backend.upload, which knows about recorded steps.
func (s *stream) htodNow(dst devptr, src unsafe.Pointer, n int64) error {
	return check("cuMemcpyHtoDAsync", cuResult(C.tp_cuMemcpyHtoDAsync(drv.memcpyHtoDAsync, s.d.ctx, C.CUdeviceptr(dst), src, C.size_t(n), s.s)))
}

// dtoh enqueues a copy of n bytes from src to pinned host memory dst.
func (s *stream) dtoh(dst unsafe.Pointer, src devptr, n int64) error {
	return check("cuMemcpyDtoHAsync", cuResult(C.tp_cuMemcpyDtoHAsync(drv.memcpyDtoHAsync, s.d.ctx, dst, C.CUdeviceptr(src), C.size_t(n), s.s)))
}

// dtod enqueues a copy of n bytes between device addresses.
func (s *stream) dtod(dst, src devptr, n int64) error {
	if s.rec != nil {
		if enqueue, err := s.rec.op([]uint64{sigDtoD, uint64(dst), uint64(src), uint64(n)}); !enqueue {
			return err
		}
	}
	err := check("cuMemcpyDtoDAsync", cuResult(C.tp_cuMemcpyDtoDAsync(drv.memcpyDtoDAsync, s.d.ctx, C.CUdeviceptr(dst), C.CUdeviceptr(src), C.size_t(n), s.s)))
	if s.prof != nil && err == nil {
		s.prof.mark(s, "memcpy DtoD")
	}
	return err
}

func (s *stream) memset(dst devptr, v byte, n int64) error {
	if s.rec != nil {
		if enqueue, err := s.rec.op([]uint64{sigMemset, uint64(dst), uint64(v), uint64(n)}); !enqueue {
			return err
		}
	}
	return check("cuMemsetD8Async", cuResult(C.tp_cuMemsetD8Async(drv.memsetD8Async, s.d.ctx, C.CUdeviceptr(dst), C.uchar(v), C.size_t(n), s.s)))
}

// pinned is page-locked host memory allocated by the driver (C memory, never Go's).
type pinned struct {
	d    *device
	p    unsafe.Pointer
	size int64
}

func (d *device) allocPinned(n int64) (*pinned, error) {
	var p unsafe.Pointer
	if err := check("cuMemAllocHost", cuResult(C.tp_cuMemAllocHost(drv.memAllocHost, d.ctx, &p, C.size_t(n)))); err != nil {
		return nil, err
	}
	return &pinned{d: d, p: p, size: n}, nil
}

func (h *pinned) free() error {
	return check("cuMemFreeHost", cuResult(C.tp_cuMemFreeHost(drv.memFreeHost, h.d.ctx, h.p)))
}

// bytes views [off, off+n) of the pinned memory.
func (h *pinned) bytes(off, n int64) []byte {
	return unsafe.Slice((*byte)(unsafe.Add(h.p, off)), n)
}

// module is a loaded cubin.
type module struct {
	d *device
	m C.CUmodule
}

func (d *device) loadModule(image []byte) (*module, error) {
	if len(image) == 0 {
		return nil, fmt.Errorf("cuda: load module: empty image")
	}
	var m C.CUmodule
	if err := check("cuModuleLoadData", cuResult(C.tp_cuModuleLoadData(drv.moduleLoadData, d.ctx, &m, unsafe.Pointer(&image[0])))); err != nil {
		return nil, err
	}
	return &module{d: d, m: m}, nil
}

func (m *module) unload() error {
	return check("cuModuleUnload", cuResult(C.tp_cuModuleUnload(drv.moduleUnload, m.d.ctx, m.m)))
}

// kernel is an entry point of a module.
type kernel struct {
	name string
	f    C.CUfunction
	// pdl: its source begins with PDL_PROLOGUE (kernels.Prologued), so it waits for the kernel before it
	// itself and may be launched with programmatic dependent launch.
	pdl bool
	// params is its parameter list as the source declares it (kernels.Signatures): launch checks the
	// arguments against it, since the driver copies whatever it is given without a word.
	params []kernels.Param
}

func (m *module) function(name string) (*kernel, error) {
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var f C.CUfunction
	if err := check("cuModuleGetFunction("+name+")", cuResult(C.tp_cuModuleGetFunction(drv.moduleGetFunction, m.d.ctx, &f, m.m, cn))); err != nil {
		return nil, err
	}
	return &kernel{name: name, f: f}, nil
}

// funcAttrMaxDynamicShared is CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
const funcAttrMaxDynamicShared = 8

// allowShared lets k launch with up to bytes of dynamic shared memory: above 48 KiB a function must opt
// in (cuFuncSetAttribute), up to the device's per-block limit (227 KiB on Hopper).
func (d *device) allowShared(k *kernel, bytes int) error {
	if drv.funcSetAttribute == nil {
		return fmt.Errorf("cuda: %s: %d bytes of shared memory: the driver has no cuFuncSetAttribute", k.name, bytes)
	}
	return check("cuFuncSetAttribute("+k.name+")", cuResult(C.tp_cuFuncSetAttribute(drv.funcSetAttribute, d.ctx, k.f,
		C.int(funcAttrMaxDynamicShared), C.int(bytes))))
}

// dim3 is a grid or block size.
type dim3 struct{ x, y, z uint32 }

// packArgs encodes kernel arguments into 8-byte slots: devptr, *tensor and *buffer (their device
// address), int (as int32: the kernels take int), int32, int64, float32 and bool (as int32).
func packArgs(slots []uint64, args []any) error {
	if len(args) > len(slots) {
		return fmt.Errorf("cuda: %d kernel arguments, at most %d", len(args), len(slots))
	}
	for i, a := range args {
		switch v := a.(type) {
		case devptr:
			slots[i] = uint64(v)
		case *tensor:
			slots[i] = uint64(v.ptr())
		case *buffer:
			slots[i] = uint64(v.ptr)
		case int:
			if v < math.MinInt32 || v > math.MaxInt32 {
				return fmt.Errorf("cuda: kernel argument %d = %d overflows int32", i, v)
			}
			slots[i] = uint64(uint32(int32(v)))
		case int32:
			slots[i] = uint64(uint32(v))
		case int64:
			slots[i] = uint64(v)
		case float32:
			slots[i] = uint64(math.Float32bits(v))
		case bool:
			if v {
				slots[i] = 1
			} else {
				slots[i] = 0
			}
		default:
			return fmt.Errorf("cuda: unsupported kernel argument %d of type %T", i, a)
		}
	}
	return nil
}

// argKind is the kernel parameter kind packArgs passes a as (kernels.KindOther for a type it refuses).
func argKind(a any) kernels.Kind {
	switch a.(type) {
	case devptr, *tensor, *buffer:
		return kernels.KindPointer
	case int, int32:
		return kernels.KindInt32
	case int64:
		return kernels.KindInt64
	case float32:
		return kernels.KindFloat32
	case bool:
		return kernels.KindBool
	}
	return kernels.KindOther
}

// argFits reports whether an argument of kind a may fill a parameter of kind p. A bool may fill an int:
// packArgs writes it as 0 or 1 into a zeroed 8-byte slot, which the int reads exactly. An int may not
// fill a long long (a negative one would read as a large positive value), nor an int64 an int.
func argFits(a, p kernels.Kind) bool {
	return a == p || (a == kernels.KindBool && p == kernels.KindInt32)
}

// checkArgs reports an argument list that does not match a kernel's parameters (nil params: not known,
// nothing checked): a count or a kind the kernel would misread.
func checkArgs(params []kernels.Param, args []any) error {
	if params == nil {
		return nil
	}
	if len(args) != len(params) {
		return fmt.Errorf("cuda: %d kernel arguments for %d parameters (%v)", len(args), len(params), params)
	}
	for i, a := range args {
		if k := argKind(a); !argFits(k, params[i].Kind) {
			return fmt.Errorf("cuda: kernel argument %d (%s) is a %T, which passes as %s", i, params[i], a, k)
		}
	}
	return nil
}

// launch enqueues k on s. Tensors among args stay reachable until the launch is enqueued; after that,
// stream order protects their memory (see pool).
func (s *stream) launch(k *kernel, grid, block dim3, shmem int, args ...any) error {
	if err := checkArgs(k.params, args); err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}
	var slots [C.TP_MAX_ARGS]uint64
	if err := packArgs(slots[:], args); err != nil {
		return fmt.Errorf("%s: %w", k.name, err)
	}
	if s.rec != nil {
		var sig [9 + C.TP_MAX_ARGS]uint64
		sig[0], sig[1] = sigLaunch, uint64(uintptr(unsafe.Pointer(k.f)))
		sig[2], sig[3], sig[4] = uint64(grid.x), uint64(grid.y), uint64(grid.z)
		sig[5], sig[6], sig[7], sig[8] = uint64(block.x), uint64(block.y), uint64(block.z), uint64(shmem)
		n := 9 + copy(sig[9:], slots[:len(args)])
		if enqueue, err := s.rec.op(sig[:n]); !enqueue {
			if err != nil {
				return fmt.Errorf("%s: %w", k.name, err)
			}
			return nil
		}
	}
	if r := s.enqueue(k, grid, block, shmem, &slots, len(args)); r != 0 {
		return check("cuLaunchKernel("+k.name+")", r)
	}
	if s.prof != nil {
		s.prof.mark(s, k.name)
	}
	return nil
}

// enqueue launches k with nargs packed arguments. With s.pdl and a kernel that begins with PDL_PROLOGUE
// it goes through cuLaunchKernelEx with programmatic stream serialization: the kernel's blocks may be
// scheduled while the kernel before it still runs (once that one's blocks have all passed their
// prologue's griddepcontrol.launch_dependents), and its own prologue's griddepcontrol.wait holds them
// until that kernel has completed and its writes are visible. Each kernel so waits for the one before
// it, which waited for its own predecessor, so the stream's order holds for every kernel; what overlaps
// is a kernel's launch and start-up with its predecessor's tail, the gap at every kernel boundary of a
// decode step. Captured into a graph, the launch becomes a programmatic edge between the two kernel
// nodes. Kernels without the prologue (and every launch when PDL is off) use cuLaunchKernel: they start
// only after everything before them in the stream. If the driver refuses the attributed launch of a
// kernel it then launches plainly, PDL is turned off for the stream (the first step of every recorded
// key runs eagerly, so that happens before a capture).
func (s *stream) enqueue(k *kernel, grid, block dim3, shmem int, slots *[C.TP_MAX_ARGS]uint64, nargs int) cuResult {
	plain := func() cuResult {
		return cuResult(C.tp_cuLaunchKernel(drv.launch, s.d.ctx, k.f,
			C.uint(grid.x), C.uint(grid.y), C.uint(grid.z), C.uint(block.x), C.uint(block.y), C.uint(block.z),
			C.uint(shmem), s.s, (*C.uint64_t)(unsafe.Pointer(&slots[0])), C.int(nargs)))
	}
	if !s.pdl || !k.pdl || s.plainNext {
		s.plainNext = false
		return plain()
	}
	r := cuResult(C.tp_cuLaunchKernelEx(drv.launchEx, s.d.ctx, k.f,
		C.uint(grid.x), C.uint(grid.y), C.uint(grid.z), C.uint(block.x), C.uint(block.y), C.uint(block.z),
		C.uint(shmem), s.s, (*C.uint64_t)(unsafe.Pointer(&slots[0])), C.int(nargs)))
	if r == 0 {
		return r
	}
	if pr := plain(); pr != 0 {
		return r // the launch itself is wrong, not the attribute
	}
	s.pdl = false
	return 0
}
