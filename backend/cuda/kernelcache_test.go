package cuda_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend/cuda"
	"github.com/tpfleet/tpfleet/internal/gputest"
	"github.com/tpfleet/tpfleet/internal/phase"
)

// TestKernelCacheOnGPU opens the device three times on one kernel cache directory: empty (every unit
// compiled, in parallel), filled (every unit a hit, no NVRTC), and with one cubin damaged (that unit
// compiled again, with a warning). New looks every kernel up, so each open also checks that every
// kernel is in one of the units.
func TestKernelCacheOnGPU(t *testing.T) {
	gputest.Require(t)
	dir := t.TempDir()
	open := func(what string) (cuda.Info, phase.Phase) {
		t.Helper()
		start := time.Now()
		b, err := cuda.New(cuda.Config{KernelCache: dir})
		gputest.Check(t, "cuda.New", err)
		took := time.Since(start)
		defer b.Close()
		var compile phase.Phase
		for _, p := range b.StartupPhases() {
			if p.Name == phase.Compile {
				compile = p
			}
		}
		t.Logf("%s: New took %v; %s %v: %s", what, took.Round(time.Millisecond), compile.Name, compile.Took.Round(time.Millisecond), compile.Detail)
		row("KernelCache", what, fmt.Sprintf("New %v", took.Round(time.Millisecond)), fmt.Sprintf("compile phase %v", compile.Took.Round(time.Millisecond)))
		return b.Info(), compile
	}
	cold, _ := open("empty cache")
	if cold.CacheHit || cold.CompileTime <= 0 || cold.KernelCache != dir {
		t.Errorf("empty cache: hit %v, compile %v, cache %q; want a compile into %s", cold.CacheHit, cold.CompileTime, cold.KernelCache, dir)
	}
	warm, _ := open("filled cache")
	if !warm.CacheHit || warm.CompileTime != 0 || len(warm.CacheWarnings) != 0 {
		t.Errorf("filled cache: hit %v, compile %v, warnings %v; want hits only", warm.CacheHit, warm.CompileTime, warm.CacheWarnings)
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.cubin"))
	if err != nil || len(files) < 4 {
		t.Fatalf("cache files %v (%v), want one per unit", files, err)
	}
	b, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files[0], b[:len(b)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	damaged, compile := open("one file damaged")
	if damaged.CacheHit || len(damaged.CacheWarnings) != 1 || !strings.Contains(damaged.CacheWarnings[0], files[0]) || !strings.Contains(compile.Detail, "warning") {
		t.Errorf("damaged file: hit %v, warnings %v, phase %q; want one unit compiled again with a warning naming %s",
			damaged.CacheHit, damaged.CacheWarnings, compile.Detail, files[0])
	}
}
