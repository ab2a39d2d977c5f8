package cuda

/*
#cgo LDFLAGS: -ldl
#include <stdlib.h>
#include "shim.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"unsafe"
)

// EnvLibDirs names an environment variable holding extra directories (colon-separated) searched for the
// CUDA libraries before the default ones.
const EnvLibDirs = "TPFLEET_CUDA_LIB_DIRS"

// The sonames this package loads, newest first where there is a choice.
var (
	driverNames   = []string{"libcuda.so.1"}
	cublasLtNames = []string{"libcublasLt.so.13", "libcublasLt.so.12"}
	nvrtcNames    = []string{"libnvrtc.so.13", "libnvrtc.so.12"}
)

// defaultLibGlobs are where CUDA user-space libraries usually live: pip wheels (nvidia/*/lib, nvidia/cu13/lib),
// the CUDA toolkit and the driver's directory in containers. The bare soname (ld.so's own search:
// LD_LIBRARY_PATH, the ldconfig cache) is tried after them.
var defaultLibGlobs = []string{
	"/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib",
	"/usr/local/lib/python3*/dist-packages/nvidia/*/lib",
	"/usr/local/lib/python3*/site-packages/nvidia/*/lib",
	"/usr/lib/python3/dist-packages/nvidia/*/lib",
	"/usr/local/cuda/lib64",
	"/usr/local/nvidia/lib64",
	"/usr/lib/x86_64-linux-gnu",
}

// ErrUnavailable reports that CUDA cannot be used on this machine: a library is missing, the driver
// finds no GPU, or the requested device does not exist. Errors from New wrap it; callers fall back to the
// CPU backend when errors.Is(err, ErrUnavailable).
var ErrUnavailable = errors.New("cuda: unavailable")

// Attempt is one try at loading a library.
type Attempt struct {
	Path string // the path or bare soname given to dlopen
	Err  string // dlerror's text
}

// LoadError reports a library none of whose candidates could be loaded. It wraps ErrUnavailable.
type LoadError struct {
	Names []string  // the sonames looked for
	Tried []Attempt // every dlopen, in order
}

func (e *LoadError) Error() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "cuda: cannot load %s", strings.Join(e.Names, " or "))
	for i, a := range e.Tried {
		sep := "; "
		if i == 0 {
			sep = ": "
		}
		fmt.Fprintf(&sb, "%s%s: %s", sep, a.Path, a.Err)
	}
	return sb.String()
}

func (e *LoadError) Unwrap() error { return ErrUnavailable }

// SymbolError reports an entry point missing from a loaded library (a library too old for this package).
// It wraps ErrUnavailable.
type SymbolError struct {
	Path, Symbol, Err string
}

func (e *SymbolError) Error() string {
	return fmt.Sprintf("cuda: %s: symbol %s not found: %s", e.Path, e.Symbol, e.Err)
}

func (e *SymbolError) Unwrap() error { return ErrUnavailable }

// libDirs returns the directories searched, in order: extra, then $TPFLEET_CUDA_LIB_DIRS, then the
// existing matches of the default globs. Duplicates are dropped.
func libDirs(extra []string, env string, glob func(string) ([]string, error)) []string {
	var dirs []string
	seen := map[string]bool{}
	add := func(d string) {
		if d != "" && !seen[d] {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	for _, d := range extra {
		add(d)
	}
	for _, d := range filepath.SplitList(env) {
		add(d)
	}
	for _, pat := range defaultLibGlobs {
		m, _ := glob(pat) // only ErrBadPattern, impossible for the constants
		for _, d := range m {
			add(d)
		}
	}
	return dirs
}

// candidates returns what to dlopen, in order: for each soname (in preference order), its path in each
// dir where exists says it is, then the bare soname.
func candidates(sonames, dirs []string, exists func(string) bool) []string {
	var out []string
	for _, so := range sonames {
		for _, d := range dirs {
			if p := filepath.Join(d, so); exists(p) {
				out = append(out, p)
			}
		}
		out = append(out, so)
	}
	return out
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// library is one dlopen'ed shared object. Handles are never closed: the libraries stay loaded for the
// life of the process, as the CUDA runtime's do.
type library struct {
	path string
	h    unsafe.Pointer
}

// dlopen opens path. dlopen and dlerror run on one locked OS thread, since dlerror's state is per thread.
func dlopen(path string) (*library, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cp := C.CString(path)
	defer C.free(unsafe.Pointer(cp))
	C.tp_dlerror() // clear
	h := C.tp_dlopen(cp)
	if h == nil {
		return nil, errors.New(dlerrorText())
	}
	return &library{path: path, h: h}, nil
}

func dlerrorText() string {
	if e := C.tp_dlerror(); e != nil {
		return C.GoString(e)
	}
	return "unknown dlopen error"
}

// openLibrary loads the first candidate of sonames that dlopen accepts.
func openLibrary(sonames, dirs []string) (*library, error) {
	e := &LoadError{Names: sonames}
	for _, p := range candidates(sonames, dirs, fileExists) {
		l, err := dlopen(p)
		if err == nil {
			return l, nil
		}
		e.Tried = append(e.Tried, Attempt{Path: p, Err: err.Error()})
	}
	return nil, e
}

// symbol is an entry point to resolve: its name, where to store it, and whether it may be absent.
type symbol struct {
	name     string
	dst      *unsafe.Pointer
	optional bool
}

// resolve looks up every symbol; the first missing required one is an error.
func (l *library) resolve(syms []symbol) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, s := range syms {
		cn := C.CString(s.name)
		C.tp_dlerror() // clear, so a stale error is not taken for this lookup's
		p := C.tp_dlsym(l.h, cn)
		C.free(unsafe.Pointer(cn))
		if p == nil {
			if s.optional {
				continue
			}
			return &SymbolError{Path: l.path, Symbol: s.name, Err: dlerrorText()}
		}
		*s.dst = p
	}
	return nil
}

// libs holds the process-wide loaded libraries and their entry points. A library is loaded once; a
// failed load is retried by the next New.
var libs struct {
	mu     sync.Mutex
	driver *library
	lt     *library
	rtc    *library
}

// Libraries reports the path each loaded library came from, by short name ("cuda", "cublasLt", "nvrtc").
func Libraries() map[string]string {
	libs.mu.Lock()
	defer libs.mu.Unlock()
	m := map[string]string{}
	for name, l := range map[string]*library{"cuda": libs.driver, "cublasLt": libs.lt, "nvrtc": libs.rtc} {
		if l != nil {
			m[name] = l.path
		}
	}
	return m
}

// loadLibraries loads the driver (and calls cuInit), cuBLASLt and NVRTC, searching dirs.
func loadLibraries(dirs []string) error {
	libs.mu.Lock()
	defer libs.mu.Unlock()
	if libs.driver == nil {
		l, err := openLibrary(driverNames, dirs)
		if err != nil {
			return err
		}
		if err := l.resolve(driverSymbols()); err != nil {
			return err
		}
		C.tp_set_ctx_setter(drv.ctxSetCurrent)
		if err := check("cuInit", cuResult(C.tp_cuInit(drv.init, 0))); err != nil {
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		libs.driver = l
	}
	if libs.lt == nil {
		l, err := openLibrary(cublasLtNames, dirs)
		if err != nil {
			return err
		}
		if err := l.resolve(cublasLtSymbols()); err != nil {
			return err
		}
		libs.lt = l
	}
	if libs.rtc == nil {
		l, err := openLibrary(nvrtcNames, dirs)
		if err != nil {
			return err
		}
		if err := l.resolve(nvrtcSymbols()); err != nil {
			return err
		}
		libs.rtc = l
	}
	return nil
}
