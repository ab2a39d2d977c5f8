package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"errors"
	"fmt"

	"github.com/tpfleet/tpfleet/backend"
)

// ErrForeign reports a tensor, KV cache or routing that this backend did not make (another backend's, or
// a nil pointer of this package's type).
var ErrForeign = errors.New("cuda: value not made by this cuda backend")

// ErrClosed reports a call on a closed Backend.
var ErrClosed = errors.New("cuda: backend closed")

// Error is a failed call into a CUDA library: a non-zero CUresult, cublasStatus_t or nvrtcResult.
type Error struct {
	Lib  string // "cuda", "cublasLt" or "nvrtc"
	Op   string // the entry point, with context
	Code int
	Name string // the library's name for Code, when known
	Msg  string // the library's description of Code, when known
}

func (e *Error) Error() string {
	s := fmt.Sprintf("cuda: %s: %s error %d", e.Op, e.Lib, e.Code)
	if e.Name != "" {
		s += " " + e.Name
	}
	if e.Msg != "" {
		s += " (" + e.Msg + ")"
	}
	return s
}

// Is makes errors.Is(err, ErrUnavailable) (and so backend.ErrUnavailable) hold for the driver's "no
// device" and "no driver" codes.
func (e *Error) Is(target error) bool {
	return (target == ErrUnavailable || target == backend.ErrUnavailable) && e.Lib == "cuda" && (e.Code == cudaErrorNoDevice || e.Code == cudaErrorNoDriver ||
		e.Code == cudaErrorInsufficientDriver || e.Code == cudaErrorInvalidDevice)
}

// Driver API codes that matter to callers (cuda.h).
const (
	cudaErrorOutOfMemory        = 2
	cudaErrorNoDevice           = 100
	cudaErrorInvalidDevice      = 101
	cudaErrorNoDriver           = 34 // CUDA_ERROR_STUB_LIBRARY
	cudaErrorInsufficientDriver = 35
)

// status is a library's return code.
type status interface {
	ok() bool
	describe() (lib string, code int, name, msg string)
}

// check is the one place typed errors are made: nil for success, else an *Error for op.
func check(op string, s status) error {
	if s.ok() {
		return nil
	}
	lib, code, name, msg := s.describe()
	return &Error{Lib: lib, Op: op, Code: code, Name: name, Msg: msg}
}

// cuResult is a CUresult.
type cuResult C.CUresult

func (r cuResult) ok() bool { return r == 0 }

// cuNames are the names of common CUresult codes, used when the driver cannot be asked.
var cuNames = map[int]string{
	1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
	34: "CUDA_ERROR_STUB_LIBRARY", 35: "CUDA_ERROR_INSUFFICIENT_DRIVER", 100: "CUDA_ERROR_NO_DEVICE",
	101: "CUDA_ERROR_INVALID_DEVICE", 200: "CUDA_ERROR_INVALID_IMAGE", 201: "CUDA_ERROR_INVALID_CONTEXT",
	209: "CUDA_ERROR_NO_BINARY_FOR_GPU", 218: "CUDA_ERROR_INVALID_PTX", 500: "CUDA_ERROR_NOT_FOUND",
	700: "CUDA_ERROR_ILLEGAL_ADDRESS", 701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", 702: "CUDA_ERROR_LAUNCH_TIMEOUT",
	719: "CUDA_ERROR_LAUNCH_FAILED", 999: "CUDA_ERROR_UNKNOWN",
}

func (r cuResult) describe() (string, int, string, string) {
	code := int(r)
	name, msg := cuNames[code], ""
	if drv.getErrorName != nil {
		var s *C.char
		if C.tp_cuGetErrorName(drv.getErrorName, C.CUresult(r), &s) == 0 && s != nil {
			name = C.GoString(s)
		}
	}
	if drv.getErrorString != nil {
		var s *C.char
		if C.tp_cuGetErrorString(drv.getErrorString, C.CUresult(r), &s) == 0 && s != nil {
			msg = C.GoString(s)
		}
	}
	return "cuda", code, name, msg
}

// ltStatus is a cublasStatus_t.
type ltStatus C.cublasStatus_t

func (s ltStatus) ok() bool { return s == 0 }

var ltNames = map[int]string{
	1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
	8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
	14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
}

func (s ltStatus) describe() (string, int, string, string) {
	code := int(s)
	name, msg := ltNames[code], ""
	if lt.statusName != nil {
		if p := C.tp_ltGetStatusName(lt.statusName, C.cublasStatus_t(s)); p != nil {
			name = C.GoString(p)
		}
	}
	if lt.statusString != nil {
		if p := C.tp_ltGetStatusString(lt.statusString, C.cublasStatus_t(s)); p != nil {
			msg = C.GoString(p)
		}
	}
	return "cublasLt", code, name, msg
}

// rtcResult is an nvrtcResult.
type rtcResult C.nvrtcResult

func (r rtcResult) ok() bool { return r == 0 }

var rtcNames = map[int]string{
	1: "NVRTC_ERROR_OUT_OF_MEMORY", 3: "NVRTC_ERROR_INVALID_INPUT", 4: "NVRTC_ERROR_INVALID_PROGRAM",
	5: "NVRTC_ERROR_INVALID_OPTION", 6: "NVRTC_ERROR_COMPILATION", 11: "NVRTC_ERROR_INTERNAL_ERROR",
}

func (r rtcResult) describe() (string, int, string, string) {
	code := int(r)
	name := rtcNames[code]
	if rtc.errorString != nil {
		if p := C.tp_nvrtcGetErrorString(rtc.errorString, C.nvrtcResult(r)); p != nil {
			name = C.GoString(p)
		}
	}
	return "nvrtc", code, name, ""
}
