// Package dl opens shared libraries at run time (dlopen and dlsym through cgo) for the CUDA and NCCL
// bindings, so that the binary builds with no CUDA present and runs CPU-only where the libraries are
// missing. Both bindings search with one rule (SearchDirs): the caller's directories, then
// $TPFLEET_LIB_DIRS (colon-separated), then where pip wheels, the CUDA toolkit and the driver put their
// libraries, then the bare soname (ld.so's own search: LD_LIBRARY_PATH and the ldconfig cache).
//
// Handles are never closed: the libraries stay loaded for the life of the process, as the CUDA
// runtime's do. dlopen, dlsym and dlerror run on one locked OS thread, since dlerror's state is per
// thread.
package dl

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

static void* dl_open(const char* p) { return dlopen(p, RTLD_NOW | RTLD_GLOBAL); }
static void* dl_sym(void* h, const char* n) { return dlsym(h, n); }
static const char* dl_error(void) { return dlerror(); }
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"
)

// EnvLibDirs names the environment variable holding extra directories (colon-separated) searched for
// every dlopened library (libcuda, cuBLASLt, NVRTC, NCCL) before the default ones.
const EnvLibDirs = "TPFLEET_LIB_DIRS"

// defaultGlobs are where CUDA and NCCL user-space libraries usually live: pip wheels (nvidia/*/lib, which
// holds nvidia/nccl/lib and CUDA 13's nvidia/cu13/lib), the CUDA toolkit, NCCL's own prefix, the driver's
// directory in containers and the system library directories.
var defaultGlobs = []string{
	"/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib",
	"/opt/*/lib/python3*/site-packages/nvidia/*/lib",
	"/usr/local/lib/python3*/dist-packages/nvidia/*/lib",
	"/usr/local/lib/python3*/site-packages/nvidia/*/lib",
	"/usr/lib/python3/dist-packages/nvidia/*/lib",
	"/usr/local/cuda/lib64",
	"/usr/local/nccl/lib",
	"/usr/local/nvidia/lib64",
	"/usr/lib/x86_64-linux-gnu",
	"/usr/lib64",
}

// SearchDirs returns the directories searched, in order: extra, then $TPFLEET_LIB_DIRS, then the
// existing matches of the default locations. Duplicates are dropped.
func SearchDirs(extra []string) []string {
	return searchDirs(extra, os.Getenv(EnvLibDirs), filepath.Glob)
}

func searchDirs(extra []string, env string, glob func(string) ([]string, error)) []string {
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
	for _, pat := range defaultGlobs {
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

// Attempt is one try at loading a library.
type Attempt struct {
	Path string // the path or bare soname given to dlopen
	Err  string // dlerror's text
}

// LoadError reports a library none of whose candidates could be loaded. It wraps the caller's sentinel
// (Err: cuda.ErrUnavailable, nccl.ErrUnavailable), so callers test for that with errors.Is.
type LoadError struct {
	Names []string  // the sonames looked for
	Tried []Attempt // every dlopen, in order
	Err   error
}

func (e *LoadError) Error() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "cannot load %s", strings.Join(e.Names, " or "))
	for i, a := range e.Tried {
		sep := "; "
		if i == 0 {
			sep = ": "
		}
		fmt.Fprintf(&sb, "%s%s: %s", sep, a.Path, a.Err)
	}
	return sb.String()
}

func (e *LoadError) Unwrap() error { return e.Err }

// SymbolError reports an entry point missing from a loaded library (a library too old for its binding).
// It wraps the sentinel the library was opened with.
type SymbolError struct {
	Path, Symbol, Text string
	Err                error
}

func (e *SymbolError) Error() string {
	return fmt.Sprintf("%s: symbol %s not found: %s", e.Path, e.Symbol, e.Text)
}

func (e *SymbolError) Unwrap() error { return e.Err }

// Library is one dlopened shared object.
type Library struct {
	Path        string // where it was loaded from
	h           unsafe.Pointer
	unavailable error
}

// open dlopens path.
func open(path string) (unsafe.Pointer, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cp := C.CString(path)
	defer C.free(unsafe.Pointer(cp))
	C.dl_error() // clear
	h := C.dl_open(cp)
	if h == nil {
		return nil, errors.New(errorText())
	}
	return h, nil
}

func errorText() string {
	if e := C.dl_error(); e != nil {
		return C.GoString(e)
	}
	return "unknown dlopen error"
}

// Open loads the first candidate of sonames (in preference order) that dlopen accepts, looking in dirs
// (SearchDirs) and then by bare soname. Its errors, and those of the library's Resolve, wrap unavailable.
func Open(sonames, dirs []string, unavailable error) (*Library, error) {
	e := &LoadError{Names: sonames, Err: unavailable}
	for _, p := range candidates(sonames, dirs, fileExists) {
		h, err := open(p)
		if err == nil {
			return &Library{Path: p, h: h, unavailable: unavailable}, nil
		}
		e.Tried = append(e.Tried, Attempt{Path: p, Err: err.Error()})
	}
	return nil, e
}

// Symbol is an entry point to resolve: its name, where to store its address, and whether it may be
// absent (an entry point newer versions of the library add).
type Symbol struct {
	Name     string
	Dst      *unsafe.Pointer
	Optional bool
}

// Resolve looks up every symbol; the first missing required one is a *SymbolError.
func (l *Library) Resolve(syms ...Symbol) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, s := range syms {
		cn := C.CString(s.Name)
		C.dl_error() // clear, so a stale error is not taken for this lookup's
		p := C.dl_sym(l.h, cn)
		C.free(unsafe.Pointer(cn))
		if p == nil {
			if s.Optional {
				continue
			}
			return &SymbolError{Path: l.Path, Symbol: s.Name, Text: errorText(), Err: l.unavailable}
		}
		*s.Dst = p
	}
	return nil
}
