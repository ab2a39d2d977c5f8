package worker

import (
	"testing"

	"github.com/tpfleet/tpfleet/comm"
)

// TestEpochCommAcceptsDeviceBuffers: a GPU worker's per-epoch communicator is NCCL's to the GPU
// backend; a CPU worker's is not.
func TestEpochCommAcceptsDeviceBuffers(t *testing.T) {
	if !comm.AcceptsDeviceBuffers(newEpochComm(0, 2, true)) || comm.AcceptsDeviceBuffers(newEpochComm(0, 2, false)) {
		t.Errorf("AcceptsDeviceBuffers(epochComm) does not follow the worker's device")
	}
}
