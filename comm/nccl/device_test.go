package nccl_test

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/tpfleet/tpfleet/comm/nccl"
	"github.com/tpfleet/tpfleet/internal/gputest"
)

// TestNCCLLibrary loads libnccl.so.2 and reports its version. It skips where NCCL is absent on a machine
// without a GPU; with a GPU, NCCL must load.
func TestNCCLLibrary(t *testing.T) {
	path, v, err := nccl.Library()
	if errors.Is(err, nccl.ErrUnavailable) && !gputest.Present() {
		t.Skipf("NCCL unavailable on a machine without a GPU: %v", err)
	}
	gputest.Check(t, "nccl.Library", err)
	t.Logf("NCCL %d from %s, NCCL_NVLS_ENABLE=%q", v, path, os.Getenv("NCCL_NVLS_ENABLE"))
	if os.Getenv("NCCL_NVLS_ENABLE") != "0" {
		t.Errorf("NCCL_NVLS_ENABLE = %q, want 0", os.Getenv("NCCL_NVLS_ENABLE"))
	}
	if _, err := nccl.NewUniqueID(); err != nil {
		t.Errorf("NewUniqueID: %v", err)
	}
	gputest.Row("nccl library", path, fmt.Sprintf("version %d", v), "")
}
