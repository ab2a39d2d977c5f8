package cpu

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// DefaultThreads is the default Config.Threads: 0, one goroutine per runtime.GOMAXPROCS.
const DefaultThreads = 0

// ErrForeign reports a tensor, KV cache or routing that this package did not make (another backend's, or
// a nil pointer of this package's type).
var ErrForeign = errors.New("cpu: value not made by the cpu backend")

// Config configures a Backend.
type Config struct {
	// Threads is the number of goroutines Linear, Attention, Experts and the larger elementwise ops
	// use. 0 means runtime.GOMAXPROCS(0) at New; New treats a negative value as 0 and Validate
	// rejects it. Results do not depend on it (see the package doc).
	Threads int `json:"cpu-threads"`
}

// Validate reports a Config that New would have to correct.
func (c Config) Validate() error {
	if c.Threads < 0 {
		return fmt.Errorf("cpu: Threads = %d, want >= 0", c.Threads)
	}
	return nil
}

// AddFlags binds c's fields to flags in fs, with c's current values as defaults.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&c.Threads, "cpu-threads", c.Threads, "goroutines for the cpu backend's parallel ops (0: GOMAXPROCS)")
}

// Backend is the pure-Go implementation of backend.Ops. It holds no mutable state and is safe for
// concurrent use; make one with New.
type Backend struct {
	threads int
}

var _ backend.Ops = (*Backend)(nil)

// New returns a Backend configured by cfg.
func New(cfg Config) *Backend {
	n := cfg.Threads
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	return &Backend{threads: n}
}

// Threads returns the number of goroutines the parallel ops use.
func (b *Backend) Threads() int { return b.threads }

// Name returns "cpu".
func (b *Backend) Name() string { return "cpu" }

// tensor is a row-major float32 array. data has exactly numel(shape) elements.
type tensor struct {
	shape []int
	data  []float32
	// format is a weight's format (LoadQuantized): data holds its dequantised values, and ops whose
	// format has DynamicActivations quantise their input rows first. Zero for every other tensor.
	format quant.Format
}

// Shape returns the tensor's dimensions, outermost first. The caller must not modify the slice.
func (t *tensor) Shape() []int { return t.shape }

// Data returns the storage of t, a tensor made by a cpu Backend, row-major and without copying. The
// caller must not modify it (tensors are immutable and views share storage). Use Backend.Float32 for a
// copy.
func Data(t backend.Tensor) ([]float32, error) {
	tt, err := asTensor("data", "t", t)
	if err != nil {
		return nil, err
	}
	return tt.data, nil
}

// asTensor returns t as this package's tensor, or an error naming op and the operand.
func asTensor(op, name string, t backend.Tensor) (*tensor, error) {
	if t == nil {
		return nil, fmt.Errorf("cpu: %s: %s is nil: %w", op, name, backend.ErrShape)
	}
	tt, ok := t.(*tensor)
	if !ok || tt == nil {
		return nil, fmt.Errorf("cpu: %s: %s is a %T: %w", op, name, t, ErrForeign)
	}
	return tt, nil
}

// numel returns the number of elements of shape; ok is false for a negative dimension or an overflow.
func numel(shape []int) (n int, ok bool) {
	n = 1
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		if d != 0 && n > math.MaxInt/d {
			return 0, false
		}
		n *= d
	}
	return n, true
}

func newTensor(shape []int, data []float32) *tensor {
	return &tensor{shape: shape, data: data}
}

// alloc makes a zeroed tensor of the given shape, which the caller has already validated.
func alloc(shape ...int) *tensor {
	n, _ := numel(shape)
	return &tensor{shape: shape, data: make([]float32, n)}
}

// Load converts data, little-endian elements of type dt, to a float32 tensor of the given shape. It
// accepts every dtype safetensors.ToFloat32 does and keeps no reference to data.
func (b *Backend) Load(dt safetensors.DType, shape []int, data []byte) (backend.Tensor, error) {
	n, ok := numel(shape)
	if !ok {
		return nil, fmt.Errorf("cpu: load %s%v: %w", dt, shape, backend.ErrShape)
	}
	size := dt.Size()
	if size == 0 {
		return nil, fmt.Errorf("cpu: load %s%v: invalid dtype", dt, shape)
	}
	if len(data) != n*size {
		return nil, fmt.Errorf("cpu: load %s%v from %d bytes, want %d: %w", dt, shape, len(data), n*size, backend.ErrShape)
	}
	out := make([]float32, n)
	if err := safetensors.ToFloat32(dt, data, out); err != nil {
		return nil, fmt.Errorf("cpu: load %s%v: %w", dt, shape, err)
	}
	return newTensor(slices.Clone(shape), out), nil
}

var _ backend.QuantizedLoader = (*Backend)(nil)

// LoadQuantized makes a weight tensor of w's format. The cpu backend is the reference: it keeps the
// dequantised values (quant.Weight.Dequantize: q·scale in float32) and the format, so Linear and Experts
// compute exactly the dequantised math, quantising their input rows per token first where the format has
// DynamicActivations.
func (b *Backend) LoadQuantized(w quant.Weight) (backend.Tensor, error) {
	vals, err := w.Dequantize()
	if err != nil {
		return nil, fmt.Errorf("cpu: load %s%v: %w", w.Format, w.Shape, err)
	}
	t := newTensor(slices.Clone(w.Shape), vals)
	t.format = w.Format
	return t, nil
}

// actRows returns x's rows quantised to FP8 per token when the weight's format asks for it (a copy), else
// x itself.
func actRows(x []float32, n int, w quant.Format) []float32 {
	if !w.DynamicActivations {
		return x
	}
	q := make([]float32, len(x))
	quant.FakeQuantFP8Rows(q, x, n)
	return q
}

// FromFloat32 copies values into a new tensor of the given shape.
func (b *Backend) FromFloat32(shape []int, values []float32) (backend.Tensor, error) {
	n, ok := numel(shape)
	if !ok || n != len(values) {
		return nil, fmt.Errorf("cpu: from float32 %v with %d values: %w", shape, len(values), backend.ErrShape)
	}
	return newTensor(slices.Clone(shape), slices.Clone(values)), nil
}

// Float32 returns a copy of t's values, row-major.
func (b *Backend) Float32(t backend.Tensor) ([]float32, error) {
	tt, err := asTensor("float32", "t", t)
	if err != nil {
		return nil, err
	}
	return slices.Clone(tt.data), nil
}

// Reshape returns a view of t with a new shape of the same element count. It shares t's storage.
func (b *Backend) Reshape(t backend.Tensor, shape ...int) (backend.Tensor, error) {
	tt, err := asTensor("reshape", "t", t)
	if err != nil {
		return nil, err
	}
	n, ok := numel(shape)
	if !ok || n != len(tt.data) {
		return nil, fmt.Errorf("cpu: reshape %v to %v: %w", tt.shape, shape, backend.ErrShape)
	}
	return newTensor(slices.Clone(shape), tt.data), nil
}

// Rows returns a view of rows [start, end) of t along its first dimension. It shares t's storage.
func (b *Backend) Rows(t backend.Tensor, start, end int) (backend.Tensor, error) {
	tt, err := asTensor("rows", "t", t)
	if err != nil {
		return nil, err
	}
	if len(tt.shape) == 0 || start < 0 || end < start || end > tt.shape[0] {
		return nil, fmt.Errorf("cpu: rows [%d, %d) of %v: %w", start, end, tt.shape, backend.ErrShape)
	}
	row, _ := numel(tt.shape[1:])
	shape := slices.Clone(tt.shape)
	shape[0] = end - start
	return newTensor(shape, tt.data[start*row:end*row:end*row]), nil
}

// parallel runs fn over [0, n) in blocks of grain indices, on up to b.threads goroutines (the caller's
// included), and returns when all blocks are done. Blocks are handed out dynamically, so fn must make
// each index's result independent of which goroutine runs it and of the other blocks.
func (b *Backend) parallel(n, grain int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	grain = max(grain, 1)
	blocks := (n + grain - 1) / grain
	workers := min(b.threads, blocks)
	if workers <= 1 {
		fn(0, n)
		return
	}
	var next atomic.Int64
	work := func() {
		for {
			i := int(next.Add(1) - 1)
			if i >= blocks {
				return
			}
			lo := i * grain
			fn(lo, min(lo+grain, n))
		}
	}
	var wg sync.WaitGroup
	for range workers - 1 {
		wg.Go(work)
	}
	work()
	wg.Wait()
}

// minBlockWork is the least work (in multiply-adds or comparable element operations) worth handing to
// another goroutine: below it, starting the goroutine costs more than it saves.
const minBlockWork = 1 << 15

// grain returns a block size for parallel over n items of cost work each: about four blocks per thread
// for balance, but none smaller than minBlockWork, so small ops run inline on the caller's goroutine.
func (b *Backend) grain(n, work int) int {
	work = max(work, 1)
	return max(1, (minBlockWork+work-1)/work, (n+4*b.threads-1)/(4*b.threads))
}
