package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"sync"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/dl"
)

// The sonames this package loads, newest first where there is a choice.
var (
	driverNames   = []string{"libcuda.so.1"}
	cublasLtNames = []string{"libcublasLt.so.13", "libcublasLt.so.12"}
	nvrtcNames    = []string{"libnvrtc.so.13", "libnvrtc.so.12"}
)

// ErrUnavailable reports that CUDA cannot be used on this machine: a library is missing, the driver
// finds no GPU, or the requested device does not exist. Errors from New wrap it; callers fall back to the
// CPU backend when errors.Is(err, ErrUnavailable). It wraps backend.ErrUnavailable, so callers that do
// not know this backend test for that.
var ErrUnavailable error = unavailableError{}

// unavailableError is ErrUnavailable: "cuda: unavailable", unwrapping to backend.ErrUnavailable.
type unavailableError struct{}

func (unavailableError) Error() string { return "cuda: unavailable" }
func (unavailableError) Unwrap() error { return backend.ErrUnavailable }

// libs holds the process-wide loaded libraries and their entry points. A library is loaded once; a
// failed load is retried by the next New.
var libs struct {
	mu     sync.Mutex
	driver *dl.Library
	lt     *dl.Library
	rtc    *dl.Library
}

// Libraries reports the path each loaded library came from, by short name ("cuda", "cublasLt", "nvrtc").
func Libraries() map[string]string {
	libs.mu.Lock()
	defer libs.mu.Unlock()
	m := map[string]string{}
	for name, l := range map[string]*dl.Library{"cuda": libs.driver, "cublasLt": libs.lt, "nvrtc": libs.rtc} {
		if l != nil {
			m[name] = l.Path
		}
	}
	return m
}

// loadLibraries loads the driver (and calls cuInit), cuBLASLt and NVRTC, searching dirs.
func loadLibraries(dirs []string) error {
	libs.mu.Lock()
	defer libs.mu.Unlock()
	if libs.driver == nil {
		l, err := openLibrary(driverNames, dirs, driverSymbols())
		if err != nil {
			return err
		}
		C.tp_set_ctx_setter(drv.ctxSetCurrent)
		if err := check("cuInit", cuResult(C.tp_cuInit(drv.init, 0))); err != nil {
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		libs.driver = l
	}
	var err error
	if libs.lt == nil {
		libs.lt, err = openLibrary(cublasLtNames, dirs, cublasLtSymbols())
	}
	if err == nil && libs.rtc == nil {
		libs.rtc, err = openLibrary(nvrtcNames, dirs, nvrtcSymbols())
	}
	return err
}

// openLibrary loads the first of sonames found in dirs and resolves syms in it.
func openLibrary(sonames, dirs []string, syms []dl.Symbol) (*dl.Library, error) {
	l, err := dl.Open(sonames, dirs, ErrUnavailable)
	if err == nil {
		err = l.Resolve(syms...)
	}
	if err != nil {
		return nil, fmt.Errorf("cuda: %w", err)
	}
	return l, nil
}
