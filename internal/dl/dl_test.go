package dl

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unsafe"
)

// These tests need no GPU: they run everywhere, CI included.

var errTest = errors.New("test: unavailable")

func TestCandidates(t *testing.T) {
	exists := func(p string) bool {
		return p == "/w/nvidia/cu13/lib/libcublasLt.so.13" || p == "/x/libcublasLt.so.12" || p == "/x/libcublasLt.so.13"
	}
	got := candidates([]string{"libcublasLt.so.13", "libcublasLt.so.12"}, []string{"/w/nvidia/cu13/lib", "/x"}, exists)
	want := []string{
		"/w/nvidia/cu13/lib/libcublasLt.so.13", "/x/libcublasLt.so.13", "libcublasLt.so.13",
		"/x/libcublasLt.so.12", "libcublasLt.so.12",
	}
	if !slices.Equal(got, want) {
		t.Errorf("candidates = %v, want %v", got, want)
	}
}

func TestSearchDirs(t *testing.T) {
	glob := func(pat string) ([]string, error) {
		if pat == "/usr/local/cuda/lib64" {
			return []string{"/usr/local/cuda/lib64"}, nil
		}
		if strings.HasPrefix(pat, "/opt/*/.venv/") {
			return []string{"/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib", "/first"}, nil
		}
		return nil, nil
	}
	got := searchDirs([]string{"/first"}, "/env/a:/env/b:", glob)
	want := []string{"/first", "/env/a", "/env/b", "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib", "/usr/local/cuda/lib64"}
	if !slices.Equal(got, want) {
		t.Errorf("searchDirs = %v, want %v", got, want)
	}
}

func TestSearchDirsReadsEnv(t *testing.T) {
	t.Setenv(EnvLibDirs, "/tpfleet-env-dir")
	if got := SearchDirs([]string{"/tpfleet-extra"}); len(got) < 2 || got[0] != "/tpfleet-extra" || got[1] != "/tpfleet-env-dir" {
		t.Errorf("SearchDirs = %v, want the extra dir, then $%s, first", got, EnvLibDirs)
	}
}

// TestOpenMissing checks the error of a library that is nowhere: it names every path tried with
// dlerror's text and wraps the caller's sentinel.
func TestOpenMissing(t *testing.T) {
	dir := t.TempDir()
	bogus := filepath.Join(dir, "libtpfleet-missing.so.7")
	if err := os.WriteFile(bogus, []byte("not an ELF file"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open([]string{"libtpfleet-missing.so.7"}, []string{dir, "/nonexistent"}, errTest)
	var le *LoadError
	if !errors.As(err, &le) || !errors.Is(err, errTest) {
		t.Fatalf("Open(missing) error = %v, want a *LoadError wrapping the sentinel", err)
	}
	if len(le.Tried) != 2 || le.Tried[0].Path != bogus || le.Tried[1].Path != "libtpfleet-missing.so.7" {
		t.Errorf("Tried = %+v, want the file in %s then the bare soname", le.Tried, dir)
	}
	msg := err.Error()
	for _, want := range []string{"cannot load libtpfleet-missing.so.7", bogus, "libtpfleet-missing.so.7: "} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	for _, a := range le.Tried {
		if a.Err == "" {
			t.Errorf("attempt %s has no dlerror text", a.Path)
		}
	}
}

// TestResolveMissingSymbol loads libc (always there) and asks for a symbol it lacks.
func TestResolveMissingSymbol(t *testing.T) {
	l, err := Open([]string{"libc.so.6"}, nil, errTest)
	if err != nil {
		t.Fatalf("Open(libc.so.6): %v", err)
	}
	var strlen, nope, opt unsafe.Pointer
	if err := l.Resolve(Symbol{Name: "strlen", Dst: &strlen}, Symbol{Name: "tpfleet_nope", Dst: &opt, Optional: true}); err != nil || strlen == nil || opt != nil {
		t.Errorf("Resolve(strlen, optional nope) = %v (strlen %v, nope %v), want strlen only", err, strlen, opt)
	}
	err = l.Resolve(Symbol{Name: "tpfleet_nope", Dst: &nope})
	var se *SymbolError
	if !errors.As(err, &se) || se.Symbol != "tpfleet_nope" || se.Path != "libc.so.6" || !errors.Is(err, errTest) {
		t.Errorf("Resolve(tpfleet_nope) error = %v, want a *SymbolError for it wrapping the sentinel", err)
	}
}
