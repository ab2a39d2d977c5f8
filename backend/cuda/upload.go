package cuda

/*
#include "shim.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"slices"
	"unsafe"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

var (
	_ backend.Uploader        = (*Backend)(nil)
	_ backend.DeviceQuantizer = (*Backend)(nil)
)

// uploadStaging is one load's pinned staging buffers (backend.Staging): the loader's readers fill a
// buffer, Copy enqueues its host-to-device copy and records the buffer's event, and Wait synchronizes on
// that event before the buffer is filled again. The copies are asynchronous, so the DMA engine copies
// while the readers read the next chunks. They go on the backend's own stream: that orders each copy
// before every later op on its tensor (a family's load-time ops, the on-device quantisation) with no
// cross-stream synchronisation, and during a load that stream has nothing else to overlap with.
type uploadStaging struct {
	b      *Backend
	s      *stream
	size   int64
	bufs   []*pinned
	events []C.CUevent // per buffer; nil entries (no event API): Wait synchronizes the stream
	used   []bool      // an event was recorded since the last Wait
	closed bool
}

// NewStaging allocates n pinned buffers of size bytes for one load
// (backend.Uploader).
func (b *Backend) NewStaging(n int, size int64) (backend.Staging, error) {
	if b.closed {
		return nil, ErrClosed
	}
	if n <= 0 || size <= 0 {
		return nil, fmt.Errorf("cuda: staging of %d buffers of %d bytes", n, size)
	}
	u := &uploadStaging{b: b, s: b.stream, size: size, events: make([]C.CUevent, n), used: make([]bool, n)}
	for i := range n {
		h, err := b.dev.allocPinned(size)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("cuda: staging buffer %d of %d (%d bytes): %w", i, n, size, err), u.Close())
		}
		u.bufs = append(u.bufs, h)
		if drv.eventCreate != nil && drv.eventRecord != nil && drv.eventSynchronize != nil {
			// 2: CU_EVENT_DISABLE_TIMING. Through a local: cgo checks all the memory a pointer argument
			// points into.
			var e C.CUevent
			if err := check("cuEventCreate", cuResult(C.tp_cuEventCreate(drv.eventCreate, b.dev.ctx, &e, 2))); err != nil {
				return nil, errors.Join(err, u.Close())
			}
			u.events[i] = e
		}
	}
	return u, nil
}

// Buffer returns pinned buffer i.
func (u *uploadStaging) Buffer(i int) []byte { return u.bufs[i].bytes(0, u.size) }

// Stages reports the checkpoint types stored as they are: bf16 and float32.
func (u *uploadStaging) Stages(dt safetensors.DType) bool {
	return dt == safetensors.BF16 || dt == safetensors.F32
}

// Alloc makes an uninitialised weight tensor (dedicated memory, as Load's).
func (u *uploadStaging) Alloc(dt safetensors.DType, shape []int) (backend.Tensor, error) {
	if u.closed || u.b.closed {
		return nil, ErrClosed
	}
	n, ok := numel(shape)
	if !ok || !u.Stages(dt) {
		return nil, fmt.Errorf("cuda: staged load of %s%v: %w", dt, shape, backend.ErrShape)
	}
	st := BF16
	if dt == safetensors.F32 {
		st = F32
	}
	buf, err := u.b.pool.getDedicated(int64(n) * st.size())
	if err != nil {
		return nil, fmt.Errorf("cuda: load %s%v: %w", dt, shape, err)
	}
	buf = u.b.pool.owned(buf)
	return &tensor{b: u.b, buf: buf, shape: slices.Clone(shape), dt: st}, nil
}

// Copy enqueues the copy of n bytes of buffer i from src to t at off, and records buffer i's event.
func (u *uploadStaging) Copy(t backend.Tensor, off int64, i int, src, n int64) error {
	tt, err := u.b.asTensor("staged copy", "t", t)
	if err != nil {
		return err
	}
	size := int64(tt.numel()) * tt.dt.size()
	if i < 0 || i >= len(u.bufs) || off < 0 || src < 0 || n < 0 || off+n > size || src+n > u.size {
		return fmt.Errorf("cuda: staged copy of %d bytes from %d of buffer %d to %d of a %d-byte tensor: out of range", n, src, i, off, size)
	}
	if err := u.s.htodNow(tt.ptr()+devptr(off), unsafe.Add(u.bufs[i].p, src), n); err != nil {
		return err
	}
	if u.events[i] != nil {
		if err := check("cuEventRecord", cuResult(C.tp_cuEventRecord(drv.eventRecord, u.b.dev.ctx, u.events[i], u.s.s))); err != nil {
			return err
		}
	}
	u.used[i] = true
	return nil
}

// Wait waits for the copies from buffer i.
func (u *uploadStaging) Wait(i int) error {
	if !u.used[i] {
		return nil
	}
	u.used[i] = false
	if u.events[i] == nil {
		return u.s.sync()
	}
	return u.b.dev.eventSync(u.events[i])
}

// Finish waits for every copy (and the stream's other work).
func (u *uploadStaging) Finish() error {
	if u.closed {
		return nil
	}
	clear(u.used)
	return u.s.sync()
}

// Close waits for the copies and frees the buffers and the events.
func (u *uploadStaging) Close() error {
	if u.closed {
		return nil
	}
	u.closed = true
	errs := []error{u.s.sync()}
	for _, e := range u.events {
		if e != nil {
			errs = append(errs, check("cuEventDestroy", cuResult(C.tp_cuEventDestroy(drv.eventDestroy, u.b.dev.ctx, e))))
		}
	}
	for _, h := range u.bufs {
		errs = append(errs, h.free())
	}
	return errors.Join(errs...)
}

// quantLayout is how format f stores a weight of shape ([out, in] or [E, in, out], input dimension 1):
// its kernel code and groups, the bytes of its codes and of one scale.
func quantLayout(f quant.Format, shape []int) (q *qweight, codeBytes, scaleSize int64, err error) {
	n, _ := numel(shape)
	q = &qweight{format: f, in: shape[1]}
	codeBytes, scaleSize = int64(n), 4
	switch {
	case f.Kind == quant.FP8 && f.RoundBF16:
		q.code, q.gs, q.groups = qfFP8BF16, q.in, 1
	case f.Kind == quant.FP8:
		q.code, q.gs, q.groups = qfFP8, q.in, 1
	case f.Kind == quant.Int4 && f.GroupSize > 0:
		q.code, q.gs, q.groups = qfInt4, f.GroupSize, ceilDiv(q.in, f.GroupSize)
		codeBytes, scaleSize = (int64(n)+1)/2, 2
	default:
		return nil, 0, 0, quant.ErrFormat
	}
	return q, codeBytes, scaleSize, nil
}

// Quantize quantises a bf16 weight on the device into format f (backend.DeviceQuantizer), by
// quant.Quantize's rules (the kernel RandomQuantized uses): the loader copies a checkpoint's bf16 bytes
// and quantises after the copy. t must be [out, in] or [E, in, out] with input dimension 1; fp8 experts
// come out output-major, as LoadQuantized makes them (fp8.go).
func (b *Backend) Quantize(t backend.Tensor, f quant.Format, inputDim int) (backend.Tensor, error) {
	src, err := b.asTensor("quantize", "t", t)
	if err != nil {
		return nil, err
	}
	shape := src.shape
	n, ok := numel(shape)
	if !ok || inputDim != 1 || len(shape) < 2 || src.dt != BF16 {
		return nil, fmt.Errorf("cuda: quantize %s %s%v with input dimension %d (want bf16, input dimension 1): %w", f, src.dt, shape, inputDim, backend.ErrShape)
	}
	q, codeBytes, scaleSize, err := quantLayout(f, shape)
	if err != nil {
		return nil, fmt.Errorf("cuda: quantize %s%v: %w", f, shape, err)
	}
	inner := int64(1)
	for _, d := range shape[2:] {
		inner *= int64(d)
	}
	nscales := int64(shape[0]) * int64(q.groups) * inner
	codes, err := b.pool.getDedicated(codeBytes)
	if err != nil {
		return nil, fmt.Errorf("cuda: quantize %s%v: %w", f, shape, err)
	}
	codes = b.pool.owned(codes)
	if q.scales, err = b.pool.getDedicated(nscales * scaleSize); err != nil {
		return nil, fmt.Errorf("cuda: quantize %s%v scales: %w", f, shape, err)
	}
	q.scales = b.pool.owned(q.scales)
	out := &tensor{b: b, buf: codes, shape: slices.Clone(shape), dt: quantized, q: q}
	if n == 0 {
		return out, nil
	}
	if fp8KMajor(f, shape) { // the experts' codes output-major (fp8.go)
		q.kmajor = true
		err = b.quantizeKMajor(src, q, codes.ptr, shape[0], shape[1], shape[2])
		return b.result("quantize "+f.String(), out, err)
	}
	if err := b.stream.memset(codes.ptr, 0, codes.size); err != nil {
		return nil, err
	}
	err = b.stream.launch(b.k.quantizeBF16, elemGrid(int(min(nscales, 1<<30))), elemBlockDim, 0,
		src, int64(q.in), inner, q.code, q.gs, q.groups, nscales, codes, q.scales)
	return b.result("quantize "+f.String(), out, err)
}
