package backend

import (
	"errors"
	"fmt"
	"time"

	"github.com/tpfleet/tpfleet/quant"
)

// Optional capabilities. Callers find them with a type assertion on an Ops (or on a value a backend
// returned) to the interface, never to a backend's concrete type; a backend that lacks one simply does
// not implement it, and the caller does without (see each interface for what that means). Like Ops,
// their methods are not safe for concurrent use with the backend's other calls unless they say so.

// Synchronizer is implemented by asynchronous backends (cuda): Synchronize waits until the work
// enqueued so far has finished and reports its first error. Without it, an op has finished when it
// returns.
type Synchronizer interface {
	Synchronize() error
}

// MemoryReporter is implemented by backends with memory of their own (a GPU): DeviceMemory returns the
// device's free and total bytes, as the driver reports them now. Without it, the host's memory is the
// backend's.
type MemoryReporter interface {
	DeviceMemory() (free, total int64, err error)
}

// KVSizer is implemented by backends that say how they hold the key/value cache: KVElementBytes is the
// bytes of one cached key or value element (the cpu backend's float32: 4; cuda's bf16: 2). Without it, a
// memory planner assumes 2.
type KVSizer interface {
	KVElementBytes() int
}

// Describer is implemented by backends of a physical device: Describe reports what it is, for member
// records and logs.
type Describer interface {
	Describe() Description
}

// Description is what a Describer reports.
type Description struct {
	// Name is the device's product name, e.g. "NVIDIA H100 80GB HBM3".
	Name string
	// TotalMemory is the device's memory in bytes (0: unknown).
	TotalMemory int64
	// Details are further facts worth a log line (architecture, driver and library versions), by name.
	Details map[string]string
}

// Threader is implemented by backends that compute with goroutines on the host (cpu): Threads is how
// many.
type Threader interface {
	Threads() int
}

// DeviceContext is implemented by backends whose collectives need a device communicator (NCCL): its
// tensors live on a device that the communicator must use through the same context and stream. A TP
// group of such backends joins through NCCL; a group of others through the TCP ring. MakeCurrent makes
// the device's context current on the calling OS thread (the caller holds runtime.LockOSThread);
// Context and Stream are the driver's CUcontext and CUstream handles, valid until the backend closes.
type DeviceContext interface {
	MakeCurrent() error
	Context() uintptr
	Stream() uintptr
}

// Profiler is implemented by backends that can time each operation on the device: Profile runs f (which
// issues ops on this backend) with a timing event after every operation and returns the time per kind
// of operation, slowest first, and the whole run's device time. It runs f eagerly (no recorded steps).
type Profiler interface {
	Profile(f func() error) (entries []ProfileEntry, total time.Duration, err error)
}

// ProfileEntry is the device time of one kind of operation (a kernel, a GEMM of one shape, a copy) over
// a profiled run.
type ProfileEntry struct {
	Op    string
	Calls int
	// Device is the summed event-to-event time: the operation and any idle gap before it.
	Device time.Duration
}

// HostReporter is implemented by backends that count what their host side did that can leave the device
// idle (cuda): a step's wall time beyond its device time is spent there or in the caller.
type HostReporter interface {
	HostStats() HostStats
}

// HostStats are a backend's running totals of host work that stalls the device.
type HostStats struct {
	Syncs       int64 // waits for the device to finish its queue (stream synchronisations)
	Allocs      int64 // device allocations (each a driver call of up to milliseconds for large blocks)
	Collections int64 // garbage collections the backend forced to get device memory back
	// CollectionTime is the time those collections took on the calling goroutine.
	CollectionTime time.Duration
}

// Sub returns s − o, the counts of the span between two readings.
func (s HostStats) Sub(o HostStats) HostStats {
	return HostStats{s.Syncs - o.Syncs, s.Allocs - o.Allocs, s.Collections - o.Collections, s.CollectionTime - o.CollectionTime}
}

// GraphReporter is implemented by StepRecorders that report how their steps ran (CUDA graphs). Graphs
// returns one GraphStats per step key; ReleaseGraphs frees every recording (before the communicators
// they captured are closed: NCCL waits for the graphs that use it).
type GraphReporter interface {
	Graphs() []GraphStats
	ReleaseGraphs()
}

// GraphStats says how StepRecorder.Step ran the steps of one key.
type GraphStats struct {
	Key      string `json:"key"`
	Steps    int    `json:"steps"`    // steps run
	Replays  int64  `json:"replays"`  // of which replayed
	Captures int    `json:"captures"` // recordings made
	Eager    bool   `json:"eager"`    // the key runs eagerly for good
}

// BandwidthMeter is implemented by device backends: CopyBandwidth copies bytes from one device buffer to
// another iters times and returns the rate in bytes read plus written per second, the bandwidth floor
// that memory-bound steps are measured against.
type BandwidthMeter interface {
	CopyBandwidth(bytes int64, iters int) (float64, error)
}

// QuantizedLoader is implemented by backends that hold quantised weights (package quant's formats: fp8
// rowwise, int4 group-wise). LoadQuantized makes a weight tensor from w (codes and scales in host memory,
// not kept); the tensor carries its format, and Linear (w [out, in], InputDim 1) and Experts (gateUp
// [E, H, 2I] and down [E, I, H], InputDim 1) dispatch on it: the model does not change per format. Their
// result must equal the op on the dequantised weight (quant.Weight.Dequantize), with the input rows first
// quantised per token (quant.FakeQuantFP8Rows) where the format has DynamicActivations: for Experts that
// is the score-scaled input of gate/up and the SwiGLU product before down (FbgemmFp8, spec §3.5). A
// backend without it holds only the checkpoint's dtypes; use LoadQuantized to get a clear error.
type QuantizedLoader interface {
	LoadQuantized(w quant.Weight) (Tensor, error)
}

// LoadQuantized loads w into ops through its QuantizedLoader; a backend without the capability gives
// CheckQuantized's error.
func LoadQuantized(ops Ops, w quant.Weight) (Tensor, error) {
	q, ok := ops.(QuantizedLoader)
	if !ok {
		return nil, CheckQuantized(ops, w.Format)
	}
	return q.LoadQuantized(w)
}

// CheckQuantized reports, before anything is loaded, whether ops can hold weights of format f: nil for
// bf16 or a QuantizedLoader, else one line wrapping errors.ErrUnsupported that names the backend and the
// format.
func CheckQuantized(ops Ops, f quant.Format) error {
	if _, ok := ops.(QuantizedLoader); ok || !f.Quantized() {
		return nil
	}
	return fmt.Errorf("backend %s: %s weights: %w (this backend holds bf16 weights only)", ops.Name(), f, errors.ErrUnsupported)
}
