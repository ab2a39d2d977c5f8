// Package fileread reads byte ranges of files at the disk's speed: positional reads (pread) of large
// runs into the caller's buffers, optionally with O_DIRECT, so that a cold page cache is read at the
// device's rate without polluting the cache; and DropCache, which evicts a file from the page cache
// (posix_fadvise DONTNEED) so cold reads can be measured and tested.
package fileread

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the alignment of O_DIRECT reads: offsets, lengths and buffer addresses are multiples of it.
// 4096 covers the logical block size of every disk and filesystem in use (512 or 4096).
const Align = 4096

// Slack is what a buffer needs beyond the bytes asked for, so an O_DIRECT read can round the range out
// to Align on both sides.
const Slack = 2 * Align

// Files reads ranges of files it opens on first use and keeps open until Close. It is safe for
// concurrent use.
type Files struct {
	direct bool

	mu     sync.Mutex
	open   map[string]*os.File
	closed bool
	// buffered is set for the files O_DIRECT could not open (a filesystem without it, tmpfs): they are
	// read through the page cache.
	buffered map[string]bool
}

// New returns Files that read with O_DIRECT when direct is set (falling back, per file, to buffered
// reads where the filesystem refuses it).
func New(direct bool) *Files {
	return &Files{direct: direct, open: map[string]*os.File{}, buffered: map[string]bool{}}
}

// Direct reports whether path is read with O_DIRECT.
func (f *Files) Direct(path string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.direct && !f.buffered[path]
}

func (f *Files) file(path string) (*os.File, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, false, fmt.Errorf("read %s: %w", path, os.ErrClosed)
	}
	if h, ok := f.open[path]; ok {
		return h, f.direct && !f.buffered[path], nil
	}
	if f.direct {
		h, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
		if err == nil {
			f.open[path] = h
			return h, true, nil
		}
		if !errors.Is(err, unix.EINVAL) {
			return nil, false, err
		}
		f.buffered[path] = true
	}
	h, err := os.Open(path)
	if err != nil {
		return nil, false, err
	}
	f.open[path] = h
	return h, false, nil
}

// ReadAt reads n bytes of path at offset off into buf and returns the slice of buf that holds them.
// buf must have room for n + Slack bytes when reading with O_DIRECT and be Align-aligned (AlignedBuffer,
// or pinned memory); the result then starts within the first Align bytes of buf. A file shorter than
// off+n is an error wrapping ErrShort.
func (f *Files) ReadAt(path string, buf []byte, off, n int64) ([]byte, error) {
	h, direct, err := f.file(path)
	if err != nil {
		return nil, err
	}
	if !direct {
		if int64(len(buf)) < n {
			return nil, fmt.Errorf("read %s: buffer of %d bytes for %d", path, len(buf), n)
		}
		if err := readFull(h, buf[:n], off); err != nil {
			return nil, fmt.Errorf("read %s: %d bytes at %d: %w", path, n, off, err)
		}
		return buf[:n], nil
	}
	start := off &^ (Align - 1)
	end := (off + n + Align - 1) &^ (Align - 1)
	skip := uintptr(unsafe.Pointer(unsafe.SliceData(buf))) & (Align - 1)
	if skip != 0 {
		skip = Align - skip
	}
	if int64(len(buf)) < int64(skip)+end-start {
		return nil, fmt.Errorf("read %s: buffer of %d bytes for %d (O_DIRECT needs %d more)", path, len(buf), n, Slack)
	}
	dst := buf[skip : int64(skip)+end-start]
	got, err := readSome(h, dst, start)
	if err != nil {
		return nil, fmt.Errorf("read %s: %d bytes at %d: %w", path, n, off, err)
	}
	if int64(got) < off+n-start {
		return nil, fmt.Errorf("read %s: %d bytes at %d: %w: the file ends at %d", path, n, off, ErrShort, start+int64(got))
	}
	return dst[off-start : off-start+n], nil
}

// ErrShort means a file ended before the bytes asked for: a truncated file.
var ErrShort = errors.New("file is shorter than its header says (truncated)")

// readFull reads len(b) bytes at off.
func readFull(h *os.File, b []byte, off int64) error {
	got, err := readSome(h, b, off)
	if err != nil {
		return err
	}
	if got < len(b) {
		return fmt.Errorf("%w: the file ends at %d", ErrShort, off+int64(got))
	}
	return nil
}

// readSome reads into b at off until b is full or the file ends.
func readSome(h *os.File, b []byte, off int64) (int, error) {
	got := 0
	for got < len(b) {
		m, err := h.ReadAt(b[got:], off+int64(got))
		got += m
		if err != nil {
			if m == 0 && got < len(b) && isEOF(err) {
				return got, nil
			}
			if !isEOF(err) {
				return got, err
			}
		}
	}
	return got, nil
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) }

// Close closes every file. It is idempotent.
func (f *Files) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	var errs []error
	for p, h := range f.open {
		errs = append(errs, h.Close())
		delete(f.open, p)
	}
	return errors.Join(errs...)
}

// AlignedBuffer returns a buffer of n bytes whose first byte is Align-aligned.
func AlignedBuffer(n int) []byte {
	b := make([]byte, n+Align)
	skip := uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (Align - 1)
	if skip != 0 {
		skip = Align - skip
	}
	return b[skip : int(skip)+n : int(skip)+n]
}

// DropCache evicts path's pages from the page cache (posix_fadvise POSIX_FADV_DONTNEED after an
// fdatasync), so the next read of it comes from the disk: for tests and benchmarks of cold reads. Pages
// another process has mapped and locked may stay.
func DropCache(path string) error {
	h, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("drop cache: %w", err)
	}
	defer h.Close()
	_ = unix.Fdatasync(int(h.Fd())) // dirty pages are not dropped; a read-only file has none
	if err := unix.Fadvise(int(h.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("drop cache %s: fadvise: %w", path, err)
	}
	return nil
}

// Resident returns how many of path's pages are in the page cache, and of how many (mincore over a
// mapping of it): a test checks DropCache with it.
func Resident(path string) (resident, total int, err error) {
	h, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer h.Close()
	st, err := h.Stat()
	if err != nil {
		return 0, 0, err
	}
	if st.Size() == 0 {
		return 0, 0, nil
	}
	m, err := unix.Mmap(int(h.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, 0, fmt.Errorf("resident %s: mmap: %w", path, err)
	}
	defer unix.Munmap(m)
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		return 0, 0, fmt.Errorf("resident %s: mincore: %w", path, e)
	}
	for _, v := range vec {
		resident += int(v & 1)
	}
	return resident, len(vec), nil
}
