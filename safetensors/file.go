package safetensors

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
)

// File is one safetensors file opened read-only. Its methods may be called
// from several goroutines at once, but not concurrently with Close.
type File struct {
	name     string
	src      io.ReaderAt
	base     int64  // offset of the data section in src
	mapping  []byte // the whole file when memory-mapped by Open, else nil
	tensors  []TensorInfo
	byName   map[string]int // index into tensors
	metadata map[string]string

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// Open memory-maps the file at path read-only and parses its header. The
// file descriptor is closed before Open returns; the mapping lives until
// Close. The file must not be truncated while open: reading a mapped page
// past the new end faults. Errors name the path.
func Open(path string) (*File, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return nil, fmt.Errorf("safetensors: %w", err)
	}
	size := st.Size()
	if size > math.MaxInt {
		return nil, &fileError{path, fmt.Errorf("file of %d bytes is too large to map", size)}
	}
	var mapping []byte
	if size > 0 { // mmap rejects a zero length; OpenSource reports it as truncated
		mapping, err = syscall.Mmap(int(fd.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
		if err != nil {
			return nil, &fileError{path, fmt.Errorf("mmap: %w", err)}
		}
	}
	f, err := OpenSource(path, bytes.NewReader(mapping), size)
	if err != nil {
		if mapping != nil {
			syscall.Munmap(mapping)
		}
		return nil, err
	}
	f.mapping = mapping
	return f, nil
}

// OpenSource parses the header of a safetensors file of size bytes read
// through src, which must stay readable until the File is no longer used.
// Every later read goes through src.ReadAt and reads only the bytes asked
// for. Close does not close src. The name is used in error messages.
func OpenSource(name string, src io.ReaderAt, size int64) (*File, error) {
	fail := func(err error) (*File, error) { return nil, &fileError{name, err} }
	if size < 8 {
		return fail(fmt.Errorf("%w: file has %d bytes, need at least 8", ErrTruncated, size))
	}
	var lenBuf [8]byte
	if err := readFull(src, lenBuf[:], 0); err != nil {
		return fail(fmt.Errorf("reading header length: %w", err))
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n > MaxHeaderSize {
		return fail(fmt.Errorf("%w: header length %d exceeds limit %d", ErrInvalidHeader, n, MaxHeaderSize))
	}
	if int64(n) > size-8 {
		return fail(fmt.Errorf("%w: header says %d bytes, file has %d", ErrTruncated, n, size))
	}
	header := make([]byte, n)
	if err := readFull(src, header, 8); err != nil {
		return fail(fmt.Errorf("reading header: %w", err))
	}
	base := 8 + int64(n)
	tensors, metadata, err := ParseHeader(header, size-base)
	if err != nil {
		return fail(err)
	}
	byName := make(map[string]int, len(tensors))
	for i, t := range tensors {
		byName[t.Name] = i
	}
	return &File{name: name, src: src, base: base, tensors: tensors, byName: byName, metadata: metadata}, nil
}

// Name returns the name the file was opened with.
func (f *File) Name() string { return f.name }

// Tensors returns the file's tensors sorted by name. The caller may modify
// the returned slice but not the Shape slices it holds.
func (f *File) Tensors() []TensorInfo { return slices.Clone(f.tensors) }

// Info returns the tensor called name, or an error wrapping ErrNotFound.
func (f *File) Info(name string) (TensorInfo, error) {
	i, ok := f.byName[name]
	if !ok {
		return TensorInfo{}, &fileError{f.name, fmt.Errorf("%w: %q", ErrNotFound, name)}
	}
	return f.tensors[i], nil
}

// Metadata returns a copy of the header's "__metadata__" map, nil if the
// header has none.
func (f *File) Metadata() map[string]string { return maps.Clone(f.metadata) }

// ReadAll returns the bytes of the tensor called name. For a file opened
// with Open the slice is part of the memory mapping: it must not be modified
// and is valid only until Close. Otherwise it is a fresh slice.
func (f *File) ReadAll(name string) ([]byte, error) {
	t, err := f.Info(name)
	if err != nil {
		return nil, err
	}
	if err := f.checkOpen(); err != nil {
		return nil, err
	}
	if f.mapping != nil {
		b, e := f.base+t.Begin, f.base+t.End
		return f.mapping[b:e:e], nil
	}
	buf := make([]byte, t.End-t.Begin)
	if err := f.readAt(buf, t.Begin); err != nil {
		return nil, err
	}
	return buf, nil
}

// Close unmaps a file opened with Open. It is idempotent; reads after Close
// fail with an error wrapping os.ErrClosed.
func (f *File) Close() error {
	f.closeOnce.Do(func() {
		f.closed.Store(true)
		if f.mapping != nil {
			f.closeErr = syscall.Munmap(f.mapping)
			f.mapping = nil
		}
	})
	return f.closeErr
}

func (f *File) checkOpen() error {
	if f.closed.Load() {
		return &fileError{f.name, os.ErrClosed}
	}
	return nil
}

// readAt reads len(buf) bytes at offset off of the data section.
func (f *File) readAt(buf []byte, off int64) error {
	if err := readFull(f.src, buf, f.base+off); err != nil {
		return &fileError{f.name, fmt.Errorf("reading %d bytes at data offset %d: %w", len(buf), off, err)}
	}
	return nil
}

// readFull reads exactly len(buf) bytes at off; a short read is
// ErrTruncated. Unlike io.ReaderAt it accepts io.EOF with a full buffer.
func readFull(src io.ReaderAt, buf []byte, off int64) error {
	n, err := src.ReadAt(buf, off)
	switch {
	case n == len(buf):
		return nil
	case err == nil || err == io.EOF:
		return fmt.Errorf("%w: read %d of %d bytes at offset %d", ErrTruncated, n, len(buf), off)
	}
	return err
}
