package fileread

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

func tempFile(t *testing.T, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	// Prefer a disk-backed directory: O_DIRECT is refused by tmpfs, where reads fall back to buffered.
	dir := t.TempDir()
	if wd, err := os.Getwd(); err == nil {
		if d, err := os.MkdirTemp(wd, ".fileread-test-"); err == nil {
			dir = d
			t.Cleanup(func() { os.RemoveAll(d) })
		}
	}
	path := filepath.Join(dir, "data")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, data
}

// TestReadAt reads unaligned ranges with and without O_DIRECT and compares them with the file's bytes.
func TestReadAt(t *testing.T) {
	const size = 3*Align*Align/64 + 777
	path, data := tempFile(t, size)
	for _, direct := range []bool{false, true} {
		f := New(direct)
		t.Logf("direct=%v: O_DIRECT in use: %v", direct, f.Direct(path))
		buf := AlignedBuffer(size + Slack)
		for _, r := range []struct{ off, n int64 }{{0, 1}, {1, 4095}, {4095, 2}, {4096, 4096}, {5000, 70000}, {0, size}, {size - 1, 1}, {size - 10000, 10000}} {
			got, err := f.ReadAt(path, buf, r.off, r.n)
			if err != nil {
				t.Fatalf("direct=%v: ReadAt(%d, %d): %v", direct, r.off, r.n, err)
			}
			if !bytes.Equal(got, data[r.off:r.off+r.n]) {
				t.Fatalf("direct=%v: ReadAt(%d, %d) returned other bytes", direct, r.off, r.n)
			}
		}
		if _, err := f.ReadAt(path, buf, size-10, 20); !errors.Is(err, ErrShort) {
			t.Errorf("direct=%v: ReadAt past the end = %v, want ErrShort", direct, err)
		}
		if direct && f.Direct(path) {
			if _, err := f.ReadAt(path, make([]byte, 100), 0, 100); err == nil {
				t.Errorf("ReadAt with O_DIRECT into a buffer without slack succeeded")
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := f.ReadAt(path, buf, 0, 1); !errors.Is(err, os.ErrClosed) {
			t.Errorf("ReadAt after Close = %v, want os.ErrClosed", err)
		}
	}
}

// TestDropCache evicts a file from the page cache and checks with mincore.
func TestDropCache(t *testing.T) {
	path, _ := tempFile(t, 64*os.Getpagesize())
	if _, err := os.ReadFile(path); err != nil { // bring it in
		t.Fatal(err)
	}
	before, total, err := Resident(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := DropCache(path); err != nil {
		t.Fatal(err)
	}
	after, _, err := Resident(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resident pages: %d of %d before, %d after", before, total, after)
	if before > 0 && after >= before && !onTmpfs(path) {
		t.Errorf("resident pages = %d after DropCache, %d before: want fewer", after, before)
	}
}

// onTmpfs reports whether path's filesystem keeps files only in memory (DONTNEED drops nothing there).
func onTmpfs(path string) bool {
	f := New(true)
	defer f.Close()
	_, err := f.ReadAt(path, AlignedBuffer(Slack+1), 0, 1)
	return err == nil && !f.Direct(path)
}
