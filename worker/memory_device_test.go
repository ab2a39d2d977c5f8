package worker_test

import (
	"context"
	"testing"

	"github.com/tpfleet/tpfleet/backend"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// deviceMemoryOps is the cpu backend with a device's memory report (backend.MemoryReporter): 48 MiB free
// of 64 MiB (small: the cpu backend allocates the planned KV pool), so that the worker plans from a device
// as it does on a GPU.
type deviceMemoryOps struct{ backend.Ops }

const (
	testDeviceFree  = 48 << 20
	testDeviceTotal = 64 << 20
)

func (deviceMemoryOps) DeviceMemory() (free, total int64, err error) {
	return testDeviceFree, testDeviceTotal, nil
}

func init() {
	backend.Register("cpu-device-memory", backend.Driver{Open: func(ctx context.Context, o backend.Options) (backend.Ops, error) {
		ops, err := backend.Open(ctx, "cpu", o)
		if err != nil {
			return nil, err
		}
		return deviceMemoryOps{ops}, nil
	}})
}

// TestMemoryPlanFromDevice: a worker on a backend that reports its device's memory plans from it: a
// budget of utilization × total, less what is in use (total − free) and the largest step's activations,
// in KV blocks. A worker that read the report's (free, total) the wrong way round planned negative
// memory in use and more KV than the device holds.
func TestMemoryPlanFromDevice(t *testing.T) {
	e := startEtcd(t)
	cli := newClient(t, e)
	cfg := testConfig(t, e, "dev")
	cfg.Device = "cpu-device-memory"
	cfg.GPUMemoryUtilization = 0.9
	w := startWorker(t, cfg)
	c := tpfleetv1.NewWorkerClient(dial(t, w.Addr()))
	putPlan(t, cli, plan(1, w), c)

	p := w.Status().Memory
	if p == nil {
		t.Fatal("Status().Memory = nil, want a plan from the device's memory")
	}
	wantBudget := int64(float64(testDeviceTotal) * cfg.GPUMemoryUtilization)
	if p.Budget != wantBudget || p.FromTokens {
		t.Fatalf("plan budget %d (from tokens %v), want 0.9 × %d = %d from the device", p.Budget, p.FromTokens, int64(testDeviceTotal), wantBudget)
	}
	left := wantBudget - (testDeviceTotal - testDeviceFree) - p.Activations
	if want := int(left / p.BlockBytes); p.Blocks != want || p.KV > left {
		t.Errorf("plan: %d blocks (%d bytes of KV), want %d: budget %d − in use %d − activations %d = %d bytes",
			p.Blocks, p.KV, want, wantBudget, int64(testDeviceTotal-testDeviceFree), p.Activations, left)
	}
}
