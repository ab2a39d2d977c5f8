// Package gputest is the one rule the GPU tests follow for skipping: a test that needs a GPU skips only
// where the machine has no NVIDIA GPU at all. Where one is present, a failure to load CUDA or NCCL or to
// open the device is a test failure (t.Fatal), not a skip, so a GPU run with a broken driver or missing
// libraries fails instead of reporting success. Tests of the paths of a machine without a GPU skip where
// one is present (SkipIfPresent).
//
// Presence is read from the kernel, not from CUDA: the NVIDIA driver lists each GPU as a directory
// under /proc/driver/nvidia/gpus and makes a device node /dev/nvidia<N> for each; either is enough. No
// library is loaded, so the check cannot fail the way the code under test might.
package gputest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Count is the number of NVIDIA GPUs the kernel reports on this machine (0: none).
func Count() int {
	if entries, err := os.ReadDir("/proc/driver/nvidia/gpus"); err == nil && len(entries) > 0 {
		return len(entries)
	}
	nodes, _ := filepath.Glob("/dev/nvidia[0-9]*")
	return len(nodes)
}

// Present reports whether this machine has an NVIDIA GPU.
func Present() bool { return Count() > 0 }

// Require skips t where the machine has no NVIDIA GPU. Where it has one, the test goes on, and must fail
// when CUDA or NCCL cannot be opened (Fatal, see Check).
func Require(t testing.TB) {
	t.Helper()
	if !Present() {
		t.Skip("no NVIDIA GPU on this machine (/proc/driver/nvidia/gpus, /dev/nvidia*)")
	}
}

// Check fails t (Fatal) with what when err is not nil, after Require: on a machine with a GPU, opening
// CUDA or NCCL must work.
func Check(t testing.TB, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s on a machine with %d NVIDIA GPU(s): %v", what, Count(), err)
	}
}

// SkipIfPresent skips t where the machine has an NVIDIA GPU: for tests of the paths of a machine
// without one.
func SkipIfPresent(t testing.TB) {
	t.Helper()
	if n := Count(); n > 0 {
		t.Skipf("%d NVIDIA GPU(s) here: the paths of a machine without one cannot be checked", n)
	}
}

// EnvTable names the file that Row appends to: scripts/gpu/test.sh sets it and prints the table last.
const EnvTable = "TPFLEET_GPU_TABLE"

// tableMu serialises the appends of one test binary's goroutines; each row is one write.
var tableMu sync.Mutex

// Row appends one line of columns ("op|shape|error|time") to the table file, when $TPFLEET_GPU_TABLE
// names one; otherwise it does nothing.
func Row(cols ...string) {
	path := os.Getenv(EnvTable)
	if path == "" {
		return
	}
	tableMu.Lock()
	defer tableMu.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintln(f, strings.Join(cols, "|"))
}
