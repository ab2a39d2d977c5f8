package main

import (
	"encoding/json"
	"runtime"
	"strings"
	"testing"
)

// TestVersion: tpfleet version prints the module, the Go version and every runtime library (found or
// not: a host without CUDA is no error), in text and in JSON.
func TestVersion(t *testing.T) {
	code, stdout, stderr := tpfleet(t, "version")
	if code != 0 {
		t.Fatalf("version = exit %d (%s)", code, stderr)
	}
	for _, want := range []string{"tpfleet ", "github.com/tpfleet/tpfleet", runtime.Version(), "CUDA driver", "cuBLASLt", "NVRTC", "NCCL"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("version printed %q, want %q in it", stdout, want)
		}
	}
	code, stdout, stderr = tpfleet(t, "version", "--json")
	var v versionInfo
	if err := json.Unmarshal([]byte(stdout), &v); code != 0 || err != nil {
		t.Fatalf("version --json = exit %d, %q (%s): %v", code, stdout, stderr, err)
	}
	if v.Module != "github.com/tpfleet/tpfleet" || v.Version == "" || v.GoVersion != runtime.Version() || len(v.Libraries) != len(runtimeLibraries) {
		t.Errorf("version --json = %+v", v)
	}
	for _, l := range v.Libraries {
		if (l.Path == "") == (l.Error == "") {
			t.Errorf("library %s: path %q, error %q; want exactly one", l.Name, l.Path, l.Error)
		}
	}
	if code, _, _ := tpfleet(t, "version", "extra"); code != 2 {
		t.Errorf("version extra = exit %d, want 2", code)
	}
}
