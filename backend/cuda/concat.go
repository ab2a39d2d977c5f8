package cuda

import (
	"fmt"
	"runtime"
	"slices"
	"time"

	"github.com/tpfleet/tpfleet/backend"
)

// Concat joins tensors along their first dimension; the other dimensions must agree. One tensor is
// returned as it is. The result is float32 when any input is, else bf16; each input is copied with
// one device-to-device copy (or converted by a kernel when its dtype differs).
func (b *Backend) Concat(ts ...backend.Tensor) (backend.Tensor, error) {
	if len(ts) == 0 {
		return nil, fmt.Errorf("cuda: concat of no tensors: %w", backend.ErrShape)
	}
	tts := make([]*tensor, len(ts))
	rows, dt := 0, BF16
	for i, t := range ts {
		tt, err := b.asTensor("concat", fmt.Sprintf("ts[%d]", i), t)
		if err != nil {
			return nil, err
		}
		if len(tt.shape) == 0 || (i > 0 && !slices.Equal(tt.shape[1:], tts[0].shape[1:])) {
			return nil, fmt.Errorf("cuda: concat ts[%d]%v: other dimensions differ from ts[0]'s: %w", i, tt.shape, backend.ErrShape)
		}
		tts[i] = tt
		rows += tt.shape[0]
		if tt.dt == F32 {
			dt = F32
		}
	}
	if len(tts) == 1 {
		return tts[0], nil
	}
	shape := slices.Clone(tts[0].shape)
	shape[0] = rows
	out, err := b.newTensor(dt, shape...)
	if err != nil {
		return nil, err
	}
	off := int64(0) // elements
	for _, tt := range tts {
		n := tt.numel()
		if n == 0 {
			continue
		}
		if tt.dt == dt {
			err = b.stream.dtod(out.ptr()+devptr(off*dt.size()), tt.ptr(), int64(n)*dt.size())
		} else {
			err = b.stream.launch(b.k.convert, elemGrid(n), elemBlockDim, 0, tt, int(tt.dt), out.ptr()+devptr(off*dt.size()), int(dt), int64(n))
		}
		if err != nil {
			return nil, fmt.Errorf("cuda: concat: %w", err)
		}
		off += int64(n)
	}
	runtime.KeepAlive(tts)
	return out, nil
}

// CopyBandwidth measures device-to-device copy bandwidth: iters copies of bytes between two buffers
// (after one warm-up copy), timed on the host around a Synchronize. It returns bytes moved (read plus
// written) per second: the rate a memory-bound kernel can reach.
func (b *Backend) CopyBandwidth(bytes int64, iters int) (float64, error) {
	if b.closed {
		return 0, ErrClosed
	}
	src, err := b.pool.getDedicated(bytes)
	if err != nil {
		return 0, err
	}
	src = b.pool.owned(src)
	dst, err := b.pool.getDedicated(bytes)
	if err != nil {
		return 0, err
	}
	dst = b.pool.owned(dst)
	if err := b.stream.dtod(dst.ptr, src.ptr, bytes); err != nil {
		return 0, err
	}
	if err := b.stream.sync(); err != nil {
		return 0, err
	}
	start := time.Now()
	for range iters {
		if err := b.stream.dtod(dst.ptr, src.ptr, bytes); err != nil {
			return 0, err
		}
	}
	if err := b.stream.sync(); err != nil {
		return 0, err
	}
	el := time.Since(start)
	runtime.KeepAlive(src)
	runtime.KeepAlive(dst)
	return 2 * float64(bytes) * float64(iters) / el.Seconds(), nil
}
