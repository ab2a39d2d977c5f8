package cuda

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/kernels"
)

// EnvKernelCache names the kernel cache directory when Config.KernelCache is empty (a volume in the Helm
// chart, an image's baked-in cache); KernelCacheOff there disables the cache.
const EnvKernelCache = "TPFLEET_KERNEL_CACHE"

// KernelCacheDir is the directory the kernels are cached in for a Config.KernelCache of configured:
// itself; when empty, $TPFLEET_KERNEL_CACHE, else os.UserCacheDir()/tpfleet/kernels; "" when the cache is
// off (KernelCacheOff) or there is no user cache directory.
func KernelCacheDir(configured string) string {
	dir := configured
	if dir == "" {
		dir = os.Getenv(EnvKernelCache)
	}
	switch dir {
	case "":
		return defaultKernelCache()
	case KernelCacheOff:
		return ""
	}
	return dir
}

// defaultKernelCache is os.UserCacheDir()/tpfleet/kernels, or "" when there is no user cache dir.
func defaultKernelCache() string {
	d, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(d, "tpfleet", "kernels")
}

// target is what a cubin is compiled for: a cached one is used only where all of it is equal.
type target struct {
	arch   string // "sm_90"
	nvrtc  string // "13.0"
	device string // the GPU's name
	driver int    // cuDriverGetVersion
}

// cacheKey names the cubin of src for t: a hash of the source, the target and the options.
func cacheKey(src string, t target) string {
	h := sha256.New()
	for _, s := range append([]string{src, t.arch, t.nvrtc, t.device, strconv.Itoa(t.driver)}, compileOptions(t.arch)...) {
		fmt.Fprintf(h, "%d:%s;", len(s), s)
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// cacheMagic starts every cache file; the cubin's SHA-256 follows, then the cubin.
const cacheMagic = "TPFLEET-CUBIN-1\n"

// errCorruptCache is a cache file that is not what writeCache wrote (truncated, overwritten, another
// format).
var errCorruptCache = errors.New("corrupt kernel cache file")

// readCache returns the cubin stored at path: fs.ErrNotExist when there is none, errCorruptCache when
// the file fails its checksum.
func readCache(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	head := len(cacheMagic) + sha256.Size
	if len(b) <= head || string(b[:len(cacheMagic)]) != cacheMagic {
		return nil, fmt.Errorf("%w: %s: no header", errCorruptCache, path)
	}
	sum := sha256.Sum256(b[head:])
	if !bytes.Equal(sum[:], b[len(cacheMagic):head]) {
		return nil, fmt.Errorf("%w: %s: checksum mismatch", errCorruptCache, path)
	}
	return b[head:], nil
}

// writeCache stores cubin at path atomically (a temporary file renamed) with its header.
func writeCache(path string, cubin []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".cubin-*")
	if err != nil {
		return err
	}
	sum := sha256.Sum256(cubin)
	_, werr := f.Write(append(append([]byte(cacheMagic), sum[:]...), cubin...))
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(f.Name())
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		os.Remove(f.Name())
		return err
	}
	return nil
}

// unitResult is one compilation unit's cubin and how it was got.
type unitResult struct {
	unit  kernels.Unit
	src   string
	path  string // its cache file, "" without a cache
	cubin []byte
	hit   bool
	took  time.Duration
	warn  string // a cache problem that cost a compile
	err   error
}

// compileFunc compiles a unit's source (NVRTC's compile; tests replace it).
type compileFunc func(src, name, arch string) ([]byte, error)

// compileUnits gets every unit's cubin for t: from dir's cache when present and intact, else compiled,
// the units in parallel (NVRTC programs are independent), and stored. defines (preprocessor lines, the
// fusions turned off at compile time: fusionSet.defines) go before each unit's source, so they are part
// of its cache key. A corrupt cache file is compiled again with a warning. dir "" is no cache. The first
// compile error is returned after every unit ended.
func compileUnits(dir string, units []kernels.Unit, defines string, t target, compile compileFunc) ([]unitResult, error) {
	res := make([]unitResult, len(units))
	var wg sync.WaitGroup
	for i, u := range units {
		r := &res[i]
		r.unit, r.src = u, defines+u.Source()
		if dir != "" {
			r.path = filepath.Join(dir, u.Name+"-"+cacheKey(r.src, t)+".cubin")
			b, err := readCache(r.path)
			switch {
			case err == nil:
				r.cubin, r.hit = b, true
				continue
			case errors.Is(err, errCorruptCache):
				r.warn = err.Error() + "; compiled again"
			case !errors.Is(err, os.ErrNotExist):
				r.warn = fmt.Sprintf("kernel cache: %v; compiled", err)
			}
		}
		wg.Go(func() { r.build(t, compile) })
	}
	wg.Wait()
	var errs []error
	for _, r := range res {
		errs = append(errs, r.err)
	}
	return res, errors.Join(errs...)
}

// build compiles the unit and stores it in the cache (a failed store is a warning).
func (r *unitResult) build(t target, compile compileFunc) {
	start := time.Now()
	r.cubin, r.err = compile(r.src, r.unit.Name+".cu", t.arch)
	r.took, r.hit = time.Since(start), false
	if r.err != nil || r.path == "" {
		return
	}
	if err := writeCache(r.path, r.cubin); err != nil {
		r.warn = strings.TrimPrefix(r.warn+"; ", "; ") + fmt.Sprintf("kernel cache: store %s: %v", r.path, err)
	}
}

// moduleSet is the loaded units, with the unit of every kernel.
type moduleSet struct {
	mods  []*module
	where map[string]int  // kernel → index into mods
	pdl   map[string]bool // kernels that begin with PDL_PROLOGUE (kernels.Prologued)
	sigs  map[string][]kernels.Param
}

func (s *moduleSet) function(name string) (*kernel, error) {
	i, ok := s.where[name]
	if !ok {
		return nil, fmt.Errorf("cuda: kernel %s is in no compilation unit (kernels.Units)", name)
	}
	k, err := s.mods[i].function(name)
	if err != nil {
		return nil, err
	}
	k.pdl = s.pdl[name]
	k.params = s.sigs[name]
	return k, nil
}

func (s *moduleSet) unload() error {
	var errs []error
	for _, m := range s.mods {
		errs = append(errs, m.unload())
	}
	return errors.Join(errs...)
}

// loadKernels gets the kernels' cubins (compileUnits) and loads them as modules. A cached cubin the
// driver refuses is compiled again, with a warning. It fills the kernel fields of b.info and b.phases.
func (b *Backend) loadKernels(t target) error {
	dir := KernelCacheDir(b.cfg.KernelCache)
	start := time.Now()
	units := kernels.Units()
	res, err := compileUnits(dir, units, b.fuse.defines(), t, compile)
	if err != nil {
		return err
	}
	set := &moduleSet{where: map[string]int{}, pdl: map[string]bool{}, sigs: map[string][]kernels.Param{}}
	b.module = set
	hits, compiled := 0, 0
	var slowest time.Duration
	var warns []string
	for i := range res {
		r := &res[i]
		m, err := b.dev.loadModule(r.cubin)
		if err != nil && r.hit {
			r.warn = fmt.Sprintf("kernel cache: the driver refused %s (%v); compiled again", r.path, err)
			if r.build(t, compile); r.err != nil {
				return r.err
			}
			m, err = b.dev.loadModule(r.cubin)
		}
		if err != nil {
			return fmt.Errorf("cuda: load kernels %s: %w", r.unit.Name, err)
		}
		set.mods = append(set.mods, m)
		for _, k := range kernels.Entries(r.src) {
			set.where[k] = len(set.mods) - 1
		}
		for _, k := range kernels.Prologued(r.src) {
			set.pdl[k] = true
		}
		sigs, err := kernels.Signatures(r.src)
		if err != nil {
			return fmt.Errorf("cuda: load kernels %s: %w", r.unit.Name, err)
		}
		maps.Copy(set.sigs, sigs)
		if r.hit {
			hits++
		} else {
			compiled++
			slowest = max(slowest, r.took)
		}
		if r.warn != "" {
			warns = append(warns, r.warn)
		}
	}
	took := time.Since(start)
	b.info.KernelCache, b.info.CacheHit, b.info.CacheWarnings = dir, compiled == 0, warns
	detail := fmt.Sprintf("%d units: %d cache hits", len(units), hits)
	if compiled > 0 {
		b.info.CompileTime = took
		detail = fmt.Sprintf("%d units: %d compiled in parallel (slowest %.2fs), %d cache hits", len(units), compiled, slowest.Seconds(), hits)
	}
	if dir == "" {
		detail += ", no cache"
	} else {
		detail += ", cache " + dir
	}
	for _, w := range warns {
		detail += "; warning: " + w
	}
	b.phases = append(b.phases, phase.Phase{Name: phase.Compile, Start: start, Took: took, Detail: detail})
	return nil
}

// StartupPhases reports New's phases: the CUDA context (libraries, device, stream, cuBLASLt) and the
// kernels' compile or cache hits (backend.StartupReporter).
func (b *Backend) StartupPhases() []phase.Phase { return append([]phase.Phase(nil), b.phases...) }

var _ backend.StartupReporter = (*Backend)(nil)
