package backend

import (
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Uploader is implemented by backends that copy weights to their device asynchronously from host memory
// of their own (pinned staging buffers): a loader reads a checkpoint straight into that memory and the
// copies overlap the reads (model/run's load pipeline). Without it, a loader hands each tensor's bytes
// to Ops.Load. NewStaging is called by the goroutine that drives the backend.
type Uploader interface {
	// NewStaging reserves n host buffers of size bytes each for one load. Close the Staging when the
	// load ends; its tensors stay valid.
	NewStaging(n int, size int64) (Staging, error)
}

// Staging is one load's staging buffers on an Uploader. Its methods are called by one goroutine (the
// loader's), except that the bytes of Buffer(i) may be written by any goroutine between Wait(i) and the
// next Copy from it; the caller orders those writes before that Copy (a channel send does).
type Staging interface {
	// Buffer returns host buffer i (0 ≤ i < n), of the size NewStaging was given.
	Buffer(i int) []byte
	// Stages reports whether the device stores checkpoint type dt as it is, so that Alloc and Copy can
	// load it (others go through Ops.Load, which converts them).
	Stages(dt safetensors.DType) bool
	// Alloc makes an uninitialised weight tensor of a staged type dt and shape, which Copy fills.
	Alloc(dt safetensors.DType, shape []int) (Tensor, error)
	// Copy enqueues a copy of n bytes of buffer i, from byte src of it, to t's bytes at byte offset off.
	// The copy is ordered before every op later enqueued on the backend, so t may be used (by ops, by a
	// DeviceQuantizer) as soon as its last Copy returned. Buffer i must not be written again before
	// Wait(i) returns.
	Copy(t Tensor, off int64, i int, src, n int64) error
	// Wait blocks until the copies from buffer i enqueued so far have finished.
	Wait(i int) error
	// Finish waits for every copy enqueued so far (the host side: the buffers are then free).
	Finish() error
	// Close waits for the copies and frees the buffers. It is idempotent.
	Close() error
}

// DeviceQuantizer is implemented by QuantizedLoaders that quantise a bf16 weight already on the device:
// Quantize returns t (bf16, InputDim inputDim) in format f, by quant.Quantize's rules, so a loader copies
// the checkpoint's bytes as they are and quantises after the copy instead of on the host. t is not kept.
type DeviceQuantizer interface {
	Quantize(t Tensor, f quant.Format, inputDim int) (Tensor, error)
}

// StartupReporter is implemented by backends whose opening takes measurable time (a GPU's context, its
// kernels' compile or cache hit): StartupPhases reports those phases (package phase's names).
type StartupReporter interface {
	StartupPhases() []phase.Phase
}
