package cuda

/*
#include <stdlib.h>
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"github.com/tpfleet/tpfleet/internal/dl"
	"unsafe"
)

// rtc holds the NVRTC entry points, resolved once by loadLibraries.
var rtc struct {
	version, errorString, create, compile, logSize, log, cubinSize, cubin, destroy unsafe.Pointer
}

func nvrtcSymbols() []dl.Symbol {
	return []dl.Symbol{
		{Name: "nvrtcVersion", Dst: &rtc.version},
		{Name: "nvrtcGetErrorString", Dst: &rtc.errorString},
		{Name: "nvrtcCreateProgram", Dst: &rtc.create},
		{Name: "nvrtcCompileProgram", Dst: &rtc.compile},
		{Name: "nvrtcGetProgramLogSize", Dst: &rtc.logSize},
		{Name: "nvrtcGetProgramLog", Dst: &rtc.log},
		{Name: "nvrtcGetCUBINSize", Dst: &rtc.cubinSize},
		{Name: "nvrtcGetCUBIN", Dst: &rtc.cubin},
		{Name: "nvrtcDestroyProgram", Dst: &rtc.destroy},
	}
}

func nvrtcVersion() (string, error) {
	var a, b C.int
	if err := check("nvrtcVersion", rtcResult(C.tp_nvrtcVersion(rtc.version, &a, &b))); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d.%d", int(a), int(b)), nil
}

// CompileError is a kernel source NVRTC rejected, with its log.
type CompileError struct {
	Name string
	Err  error
	Log  string
}

func (e *CompileError) Error() string {
	return fmt.Sprintf("cuda: compile %s: %v\n%s", e.Name, e.Err, e.Log)
}

func (e *CompileError) Unwrap() error { return e.Err }

// compileOptions are NVRTC's options for arch (e.g. "sm_90"). No fast math: the kernels' float32
// results should not depend on the compiler's approximations.
func compileOptions(arch string) []string {
	return []string{"--gpu-architecture=" + arch, "-std=c++17", "--fmad=true"}
}

// compile compiles src for arch to a cubin.
func compile(src, name, arch string) ([]byte, error) {
	csrc, cname := C.CString(src), C.CString(name)
	defer C.free(unsafe.Pointer(csrc))
	defer C.free(unsafe.Pointer(cname))
	var p C.nvrtcProgram
	if err := check("nvrtcCreateProgram", rtcResult(C.tp_nvrtcCreateProgram(rtc.create, &p, csrc, cname))); err != nil {
		return nil, err
	}
	defer C.tp_nvrtcDestroyProgram(rtc.destroy, &p)
	opts := compileOptions(arch)
	argv := (**C.char)(C.calloc(C.size_t(len(opts)), C.size_t(unsafe.Sizeof((*C.char)(nil)))))
	defer C.free(unsafe.Pointer(argv))
	args := unsafe.Slice(argv, len(opts))
	for i, o := range opts {
		args[i] = C.CString(o)
	}
	defer func() {
		for _, a := range args {
			C.free(unsafe.Pointer(a))
		}
	}()
	if st := rtcResult(C.tp_nvrtcCompileProgram(rtc.compile, p, C.int(len(opts)), argv)); !st.ok() {
		log := ""
		var n C.size_t
		if C.tp_nvrtcGetSize(rtc.logSize, p, &n) == 0 && n > 1 {
			buf := make([]byte, int(n))
			if C.tp_nvrtcGetData(rtc.log, p, (*C.char)(unsafe.Pointer(&buf[0]))) == 0 {
				log = string(buf[:n-1])
			}
		}
		return nil, &CompileError{Name: name, Err: check("nvrtcCompileProgram", st), Log: log}
	}
	var n C.size_t
	if err := check("nvrtcGetCUBINSize", rtcResult(C.tp_nvrtcGetSize(rtc.cubinSize, p, &n))); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, fmt.Errorf("cuda: compile %s: empty cubin", name)
	}
	out := make([]byte, int(n))
	if err := check("nvrtcGetCUBIN", rtcResult(C.tp_nvrtcGetData(rtc.cubin, p, (*C.char)(unsafe.Pointer(&out[0]))))); err != nil {
		return nil, err
	}
	return out, nil
}
