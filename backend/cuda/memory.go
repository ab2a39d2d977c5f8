package cuda

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"time"
	"unsafe"
)

// MemoryStats is the device memory a Backend holds, in bytes.
type MemoryStats struct {
	// Allocated is what the backend holds from cuMemAlloc now: weights, KV caches, live activations
	// and the pool's free blocks (not the cuBLASLt workspace).
	Allocated int64
	// Peak is the largest Allocated seen.
	Peak int64
	// InUse is the part of Allocated held by live tensors, caches and routings.
	InUse int64
	// Weights is the part of InUse held by loaded tensors (Load) and KV caches.
	Weights int64
	// Allocs is the number of cuMemAlloc calls so far; a steady decode step adds none.
	Allocs int64
	// Collections is the number of garbage collections the pool forced to get blocks back, and
	// CollectionTime what they took.
	Collections    int64
	CollectionTime time.Duration
}

// buffer is device memory owned by the backend. Buffers of tensors, caches and routings return to the
// backend when the Go value becomes unreachable (runtime.AddCleanup). This is safe without waiting for
// the GPU: every kernel and copy runs on the backend's one stream, so work enqueued later with the same
// memory runs after the work that used it before.
type buffer struct {
	ptr  devptr
	size int64 // bytes reserved: the size class for pool blocks, the rounded size for dedicated ones
	kind memKind
}

type memKind uint8

const (
	pooled     memKind = iota // an activation block from the size-class free lists
	dedicated                 // a weight or a cache: its own cuMemAlloc, freed at the next sync point
	graphOwned                // a pooled block reserved for a recorded step until its graph is freed (graph.go)
)

// alignment of every block: cuMemAlloc gives 256 bytes, and cuBLASLt assumes it.
const alignment = 256

// sizeClass rounds n up to the pool's class: a power of two, at least alignment bytes.
func sizeClass(n int64) int64 {
	if n <= alignment {
		return alignment
	}
	return 1 << bits.Len64(uint64(n-1))
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// pool allocates device memory. Activations come from free lists by size class, so a steady decode step
// makes no cuMemAlloc call; weights and caches get dedicated allocations. Cleanups run on the runtime's
// cleanup goroutine, hence the mutex; cuMemFree itself only runs on the owner's goroutine (flush).
type pool struct {
	d    *device
	sync func() error // waits for the backend's stream, before memory is freed

	mu       sync.Mutex
	free     map[int64][]devptr // size class → free blocks
	deferred []devptr           // dedicated blocks to cuMemFree at the next flush
	blocks   map[devptr]int64   // every block held from cuMemAlloc → its size
	closed   bool
	stats    MemoryStats
	grown    int64 // bytes of pooled blocks cuMemAlloc'ed since the last forced collection
	gets     int   // pooled blocks handed out since the last forced collection

	rec *recorder // set while a Step captures or replays: blocks then come from its recording
}

// When a free list is empty and, since the last forced collection, the pool has handed out gcEveryGets
// blocks or cuMemAlloc'ed gcEveryBytes, it runs the garbage collector before allocating: pooled blocks
// come back through cleanups, which run only after a collection, and the Go heap (a few small structs
// per tensor) alone would rarely trigger one. So the pool holds at most about gcEveryGets blocks of
// garbage besides the live ones, and a decode loop settles on reusing them. (Explicit lifetimes, a step
// arena or CUDA graphs, will replace this.)
const (
	gcEveryBytes = 256 << 20
	gcEveryGets  = 1024
)

func newPool(d *device, sync func() error) *pool {
	return &pool{d: d, sync: sync, free: map[int64][]devptr{}, blocks: map[devptr]int64{}}
}

// cuAlloc calls cuMemAlloc; when the device is out of memory it frees the free lists and deferred
// blocks, lets the garbage collector find unreachable tensors, and tries once more.
func (p *pool) cuAlloc(n int64) (devptr, error) {
	ptr, err := p.d.memAlloc(n)
	var ce *Error
	if errors.As(err, &ce) && ce.Code == cudaErrorOutOfMemory {
		runtime.GC()
		runtime.Gosched()
		if serr := p.sync(); serr != nil {
			return 0, serr
		}
		if terr := p.trim(); terr != nil {
			return 0, terr
		}
		ptr, err = p.d.memAlloc(n)
	}
	if err != nil {
		return 0, err
	}
	p.mu.Lock()
	p.blocks[ptr] = n
	p.stats.Allocated += n
	p.stats.Peak = max(p.stats.Peak, p.stats.Allocated)
	p.stats.Allocs++
	p.mu.Unlock()
	return ptr, nil
}

// get returns a block of at least n bytes from the free lists (no cleanup attached: the caller puts it
// back), or while a step is recorded, the recording's block.
func (p *pool) get(n int64) (*buffer, error) {
	if p.rec != nil {
		return p.rec.allocate(p, n)
	}
	return p.getPooled(n)
}

// getPooled is get without a recording.
func (p *pool) getPooled(n int64) (*buffer, error) {
	class := sizeClass(n)
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	p.gets++
	if b := p.take(class); b != nil {
		p.mu.Unlock()
		return b, nil
	}
	if p.grown >= gcEveryBytes || p.gets >= gcEveryGets {
		p.grown, p.gets = 0, 0
		p.mu.Unlock()
		start := time.Now()
		runtime.GC()
		runtime.Gosched() // let the cleanup goroutine return what the collection found
		p.mu.Lock()
		p.stats.Collections++
		p.stats.CollectionTime += time.Since(start)
		if b := p.take(class); b != nil {
			p.mu.Unlock()
			return b, nil
		}
	}
	p.grown += class
	p.mu.Unlock()
	ptr, err := p.cuAlloc(class)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.stats.InUse += class
	p.mu.Unlock()
	return &buffer{ptr: ptr, size: class, kind: pooled}, nil
}

// take pops a free block of class, or returns nil. p.mu is held.
func (p *pool) take(class int64) *buffer {
	l := p.free[class]
	if len(l) == 0 {
		return nil
	}
	ptr := l[len(l)-1]
	p.free[class] = l[:len(l)-1]
	p.stats.InUse += class
	return &buffer{ptr: ptr, size: class, kind: pooled}
}

// getDedicated returns a block of its own for a weight or a cache.
func (p *pool) getDedicated(n int64) (*buffer, error) {
	if p.rec != nil {
		return nil, p.rec.fail(fmt.Errorf("%w: a weight or cache allocation", errNotRecordable))
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	size := roundUp(max(n, 1), alignment)
	ptr, err := p.cuAlloc(size)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.stats.InUse += size
	p.stats.Weights += size
	p.mu.Unlock()
	return &buffer{ptr: ptr, size: size, kind: dedicated}, nil
}

// release takes a block back: a pooled one to its free list, a dedicated one to the deferred list.
// Safe from any goroutine; a no-op after close (close frees every block).
func (p *pool) release(b buffer) {
	if b.kind == graphOwned { // its graph gives it back (freeGraph)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.stats.InUse -= b.size
	if b.kind == dedicated {
		p.stats.Weights -= b.size
		p.deferred = append(p.deferred, b.ptr)
		return
	}
	p.free[b.class()] = append(p.free[b.class()], b.ptr)
}

func (b buffer) class() int64 { return b.size }

// owned returns a buffer whose memory returns to the pool when the buffer becomes unreachable.
func (p *pool) owned(b *buffer) *buffer {
	if b.kind == graphOwned {
		return b
	}
	runtime.AddCleanup(b, p.release, *b)
	return b
}

// flush frees the deferred dedicated blocks. Call it only after the stream is synchronized.
func (p *pool) flush() error {
	p.mu.Lock()
	list := p.deferred
	p.deferred = nil
	p.mu.Unlock()
	return p.freeAll(list)
}

// trim frees the deferred blocks and every free pooled block. Call it only after the stream is
// synchronized.
func (p *pool) trim() error {
	p.mu.Lock()
	list := p.deferred
	p.deferred = nil
	for class, l := range p.free {
		list = append(list, l...)
		delete(p.free, class)
	}
	p.mu.Unlock()
	return p.freeAll(list)
}

// freeAll frees every block of list, going on past a failure; it returns the first error.
func (p *pool) freeAll(list []devptr) error {
	var first error
	for _, ptr := range list {
		if err := p.free1(ptr); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (p *pool) free1(ptr devptr) error {
	if err := p.d.memFree(ptr); err != nil {
		return err
	}
	p.mu.Lock()
	p.stats.Allocated -= p.blocks[ptr]
	delete(p.blocks, ptr)
	p.mu.Unlock()
	return nil
}

// close frees every block, live or not. Tensors still reachable become unusable (their backend is
// closed).
func (p *pool) close() error {
	p.mu.Lock()
	p.closed = true
	var list []devptr
	for ptr := range p.blocks {
		list = append(list, ptr)
	}
	p.free, p.deferred = map[int64][]devptr{}, nil
	p.mu.Unlock()
	return p.freeAll(list)
}

func (p *pool) snapshot() MemoryStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// staging is the pinned host buffer every host↔device copy goes through: host data is copied into it
// (a plain memory copy) and from there enqueued on the stream, so Go memory is never handed to an
// asynchronous copy. Space is reused after the stream is synchronized.
type staging struct {
	h   *pinned
	off int64
}

// upload enqueues a copy of src to dst, through the staging buffer, synchronizing when it is full.
func (b *Backend) upload(dst devptr, src []byte) error {
	if b.rec != nil {
		return b.rec.upload(b.stream, dst, src)
	}
	st := b.staging
	for len(src) > 0 {
		if st.off >= st.h.size {
			if err := b.stream.sync(); err != nil {
				return err
			}
			st.off = 0
		}
		n := min(int64(len(src)), st.h.size-st.off)
		copy(st.h.bytes(st.off, n), src[:n])
		if err := b.stream.htodNow(dst, unsafe.Add(st.h.p, st.off), n); err != nil {
			return err
		}
		if b.stream.prof != nil {
			b.stream.prof.mark(b.stream, "memcpy HtoD")
		}
		st.off = roundUp(st.off+n, 64)
		dst += devptr(n)
		src = src[n:]
	}
	return nil
}

// download copies len(dst) bytes from src to dst, waiting for all work enqueued so far.
func (b *Backend) download(dst []byte, src devptr) error {
	if b.rec != nil {
		return b.rec.fail(fmt.Errorf("%w: a download", errNotRecordable))
	}
	st := b.staging
	for len(dst) > 0 {
		if err := b.stream.sync(); err != nil { // finishes earlier uploads that use the buffer
			return err
		}
		n := min(int64(len(dst)), st.h.size)
		if err := b.stream.dtoh(st.h.p, src, n); err != nil {
			return err
		}
		if err := b.stream.sync(); err != nil {
			return err
		}
		copy(dst[:n], st.h.bytes(0, n))
		st.off = 0
		src += devptr(n)
		dst = dst[n:]
	}
	return nil
}

// temp returns a pooled block of n bytes holding src (uploaded), for kernel arguments that live for one
// op. The caller releases it after enqueuing the kernels that read it.
func (b *Backend) temp(src []byte) (*buffer, error) {
	if b.rec != nil {
		return b.rec.arg(src)
	}
	b.argBytes += roundUp(int64(len(src)), argAlign)
	buf, err := b.pool.get(int64(len(src)))
	if err != nil {
		return nil, err
	}
	if err := b.upload(buf.ptr, src); err != nil {
		b.pool.release(*buf)
		return nil, err
	}
	return buf, nil
}

// int32Bytes encodes v as little-endian int32s; values outside int32 are an error.
func int32Bytes(what string, v []int) ([]byte, error) {
	out := make([]byte, 4*len(v))
	for i, x := range v {
		if x != int(int32(x)) {
			return nil, fmt.Errorf("cuda: %s[%d] = %d overflows int32", what, i, x)
		}
		u := uint32(int32(x))
		out[4*i], out[4*i+1], out[4*i+2], out[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
	}
	return out, nil
}

// float32Bytes encodes v as little-endian float32s.
func float32Bytes(v []float32) []byte {
	if len(v) == 0 {
		return nil
	}
	return append([]byte(nil), unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v))...)
}
