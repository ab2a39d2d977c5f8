package run_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/fileread"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/llama4"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// The five-shard multimodal fixture (language_model. prefix, vision tensors the manifest leaves out).
const fixture = "../../testdata/fixtures/dense-moe-mm"

// copyFixture copies the fixture to a temporary directory, so a test may damage it.
func copyFixture(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(fixture)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(fixture, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// rank is one rank's reader of a checkpoint directory.
type rank struct {
	cfg   model.Config
	ckpt  *safetensors.Checkpoint
	man   shard.Manifest
	rr    *shard.RankReader
	names []string // the model's names, in loading order
}

func openRank(t *testing.T, dir string, tp, r int) rank {
	t.Helper()
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ckpt.Close() })
	view, err := shard.NewView(cfg, ckpt)
	if err != nil {
		t.Fatal(err)
	}
	man, err := shard.NewManifest(cfg, view, shard.DefaultPlan(cfg), tp, r)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range model.Tensors(cfg) {
		if _, ok := man.Lookup(man.Prefix + s.Name); ok {
			names = append(names, s.Name)
		}
	}
	return rank{cfg: cfg, ckpt: ckpt, man: man, rr: shard.NewRankReader(view, man), names: names}
}

// countingFiles records every read.
type countingFiles struct {
	run.FileReader
	mu    sync.Mutex
	reads []read
	// fail, when set, is returned by the read that covers byte failAt of failPath.
	failPath string
	failAt   int64
}

type read struct {
	path   string
	off, n int64
}

func (c *countingFiles) ReadAt(path string, buf []byte, off, n int64) ([]byte, error) {
	c.mu.Lock()
	c.reads = append(c.reads, read{path, off, n})
	c.mu.Unlock()
	if c.failPath == path && off <= c.failAt && c.failAt < off+n {
		return nil, fmt.Errorf("read %s: injected failure", path)
	}
	return c.FileReader.ReadAt(path, buf, off, n)
}

// hostOps is a backend that only loads: its tensors keep the bytes they were given. With staging set it
// is also a backend.Uploader whose copies land in the tensors' bytes, and a DeviceQuantizer.
type hostOps struct {
	backend.Ops // nil: any other op panics
	staging     bool

	mu       sync.Mutex
	stagings int
	closed   int
}

type hostTensor struct {
	dt    safetensors.DType
	shape []int
	data  []byte
	q     *quant.Weight
}

func (t *hostTensor) Shape() []int { return t.shape }

func (*hostOps) Name() string { return "host" }

func (*hostOps) Load(dt safetensors.DType, shape []int, data []byte) (backend.Tensor, error) {
	return &hostTensor{dt: dt, shape: slices.Clone(shape), data: bytes.Clone(data)}, nil
}

func (*hostOps) LoadQuantized(w quant.Weight) (backend.Tensor, error) {
	w.Data, w.Scales = bytes.Clone(w.Data), slices.Clone(w.Scales)
	return &hostTensor{shape: w.Shape, q: &w}, nil
}

type hostUploader struct{ *hostOps }

func (u hostUploader) NewStaging(n int, size int64) (backend.Staging, error) {
	u.mu.Lock()
	u.stagings++
	u.mu.Unlock()
	s := &hostStaging{o: u.hostOps}
	for range n {
		s.bufs = append(s.bufs, fileread.AlignedBuffer(int(size)))
	}
	return s, nil
}

func (u hostUploader) Quantize(t backend.Tensor, f quant.Format, inputDim int) (backend.Tensor, error) {
	ht := t.(*hostTensor)
	vals := make([]float32, len(ht.data)/2)
	if err := safetensors.ToFloat32(ht.dt, ht.data, vals); err != nil {
		return nil, err
	}
	w, err := quant.Quantize(f, ht.shape, inputDim, vals)
	if err != nil {
		return nil, err
	}
	return u.LoadQuantized(w)
}

type hostStaging struct {
	o    *hostOps
	bufs [][]byte
}

func (s *hostStaging) Buffer(i int) []byte              { return s.bufs[i] }
func (s *hostStaging) Stages(dt safetensors.DType) bool { return dt == safetensors.BF16 }
func (s *hostStaging) Wait(int) error                   { return nil }
func (s *hostStaging) Finish() error                    { return nil }
func (s *hostStaging) Close() error                     { s.o.mu.Lock(); s.o.closed++; s.o.mu.Unlock(); return nil }
func (s *hostStaging) Alloc(dt safetensors.DType, shape []int) (backend.Tensor, error) {
	n := dt.Size()
	for _, d := range shape {
		n *= d
	}
	return &hostTensor{dt: dt, shape: slices.Clone(shape), data: bytes.Repeat([]byte{0xAB}, n)}, nil
}
func (s *hostStaging) Copy(t backend.Tensor, off int64, i int, src, n int64) error {
	ht := t.(*hostTensor)
	if off+n > int64(len(ht.data)) || src+n > int64(len(s.bufs[i])) {
		return fmt.Errorf("copy of %d bytes from %d to %d of %d: out of range", n, src, off, len(ht.data))
	}
	copy(ht.data[off:off+n], s.bufs[i][src:src+n])
	return nil
}

var (
	_ backend.Uploader        = hostUploader{}
	_ backend.DeviceQuantizer = hostUploader{}
)

// opsFor returns the backend of a case: plain, or staging.
func opsFor(staged bool) backend.Ops {
	o := &hostOps{staging: staged}
	if staged {
		return hostUploader{o}
	}
	return o
}

// goroutines waits until the number of goroutines is at most want, and fails the test if it stays above.
func goroutines(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > want {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines = %d after Close, want <= %d:\n%s", runtime.NumGoroutine(), want, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
}

// TestPipelineReadsEachByteOnce loads every rank's tensors through the pipeline, in the model's order and
// shuffled, plain and staged, O_DIRECT or not, with small chunks: each tensor equals what RankReader
// reads, and the reads cover each byte of the rank's slices exactly once, never a whole split tensor.
func TestPipelineReadsEachByteOnce(t *testing.T) {
	for _, tc := range []struct {
		tp              int
		staged, reverse bool
		direct          bool
		chunk           int64
	}{
		{tp: 1, chunk: 0},
		{tp: 2, chunk: 1000},
		{tp: 2, staged: true, chunk: 4096},
		{tp: 4, staged: true, reverse: true, chunk: 333},
		{tp: 2, direct: true, chunk: 5000},
		{tp: 2, staged: true, direct: true, chunk: 100000},
	} {
		for r := range tc.tp {
			name := fmt.Sprintf("tp%d-rank%d-staged=%v-reverse=%v-direct=%v-chunk%d", tc.tp, r, tc.staged, tc.reverse, tc.direct, tc.chunk)
			t.Run(name, func(t *testing.T) {
				before := runtime.NumGoroutine()
				rk := openRank(t, fixture, tc.tp, r)
				files := &countingFiles{FileReader: fileread.New(tc.direct)}
				ops := opsFor(tc.staged)
				rw := run.NewRankWeights(rk.rr, ops)
				if err := rw.Prefetch(t.Context(), rk.names, run.LoadConfig{Workers: 3, Chunk: tc.chunk, Files: files, Direct: tc.direct}); err != nil {
					t.Fatal(err)
				}
				order := slices.Clone(rk.names)
				if tc.reverse {
					slices.Reverse(order)
				}
				for _, n := range order {
					got, lay, err := rw.Load(t.Context(), n)
					if err != nil {
						t.Fatalf("Load(%s): %v", n, err)
					}
					dt, shape, want, wantLay, err := rk.rr.ReadTensor(n)
					if err != nil {
						t.Fatal(err)
					}
					ht := got.(*hostTensor)
					if ht.dt != dt || !slices.Equal(ht.shape, shape) || !bytes.Equal(ht.data, want) || !reflect.DeepEqual(lay, wantLay) {
						t.Fatalf("Load(%s) = %s%v %v (%d bytes), want %s%v %v (%d bytes, equal)", n, ht.dt, ht.shape, lay, len(ht.data), dt, shape, wantLay, len(want))
					}
				}
				if err := rw.Close(); err != nil {
					t.Fatal(err)
				}
				checkReads(t, rk, files.reads)
				st := rw.LoadStats()
				if st.Tensors != len(rk.names) || st.Bytes != rk.man.Bytes || st.Reads != int64(len(files.reads)) {
					t.Errorf("LoadStats = %d tensors, %d bytes, %d reads; want %d, %d, %d", st.Tensors, st.Bytes, st.Reads, len(rk.names), rk.man.Bytes, len(files.reads))
				}
				if tc.staged && st.Staged != st.Bytes {
					t.Errorf("LoadStats.Staged = %d, want %d (every tensor is bf16)", st.Staged, st.Bytes)
				}
				if o, ok := ops.(hostUploader); ok && (o.stagings != 1 || o.closed != 1) {
					t.Errorf("stagings made %d, closed %d; want 1, 1", o.stagings, o.closed)
				}
				t.Logf("%d tensors, %d bytes in %d reads", st.Tensors, st.Bytes, st.Reads)
				goroutines(t, before)
			})
		}
	}
}

// checkReads checks that reads cover exactly the bytes of the rank's slices, each once.
func checkReads(t *testing.T, rk rank, reads []read) {
	t.Helper()
	type span struct{ off, end int64 }
	byFile := map[string][]span{}
	var total int64
	for _, r := range reads {
		byFile[r.path] = append(byFile[r.path], span{r.off, r.off + r.n})
		total += r.n
	}
	if total != rk.man.Bytes {
		t.Errorf("read %d bytes in %d reads, want the manifest's %d", total, len(reads), rk.man.Bytes)
	}
	for path, spans := range byFile {
		slices.SortFunc(spans, func(a, b span) int { return int(a.off - b.off) })
		for i := 1; i < len(spans); i++ {
			if spans[i].off < spans[i-1].end {
				t.Fatalf("%s: bytes [%d, %d) read twice", path, spans[i].off, min(spans[i].end, spans[i-1].end))
			}
		}
	}
	// Every byte read belongs to this rank's slices: locate them and compare the sets.
	want := map[string][]span{}
	for _, n := range rk.names {
		e, _, err := rk.rr.Locate(n)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range e.Pieces {
			want[e.Path] = append(want[e.Path], span{p.Off, p.Off + p.N})
		}
		ts, _ := rk.man.Lookup(rk.man.Prefix + n)
		if ts.Split() {
			whole, err := rk.ckpt.Locate(ts.Name, -1)
			if err != nil {
				t.Fatal(err)
			}
			lo, hi := whole.Pieces[0].Off, whole.Pieces[0].Off+whole.Pieces[0].N
			var in int64
			for _, r := range reads {
				if r.path == e.Path {
					in += max(0, min(hi, r.off+r.n)-max(lo, r.off))
				}
			}
			if in != e.Bytes() {
				t.Errorf("read %d bytes of %s, a split tensor of %d bytes; want this rank's %d", in, ts.Name, hi-lo, e.Bytes())
			}
		}
	}
	for path, spans := range want {
		got := byFile[path]
		covered := func(s span) bool {
			var n int64
			for _, g := range got {
				lo, hi := max(g.off, s.off), min(g.end, s.end)
				if hi > lo {
					n += hi - lo
				}
			}
			return n == s.end-s.off
		}
		for _, s := range spans {
			if !covered(s) {
				t.Fatalf("%s: bytes [%d, %d) of the rank's slices not read", path, s.off, s.end)
			}
		}
	}
}

// TestPipelineBadShard: a truncated shard or a failing read ends the load with one error naming the file
// and the tensor, and every goroutine ends.
func TestPipelineBadShard(t *testing.T) {
	for _, staged := range []bool{false, true} {
		t.Run(fmt.Sprintf("truncated/staged=%v", staged), func(t *testing.T) {
			before := runtime.NumGoroutine()
			dir := copyFixture(t)
			rk := openRank(t, dir, 2, 0)
			// The rank's last tensor in the third shard loses its tail after the checkpoint was opened.
			victim, path := lastTensorOf(t, rk, "model-00003-of-00005.safetensors")
			e, _, _ := rk.rr.Locate(victim)
			last := e.Pieces[len(e.Pieces)-1]
			if err := os.Truncate(path, last.Off+last.N-8); err != nil {
				t.Fatal(err)
			}
			rw := run.NewRankWeights(rk.rr, opsFor(staged))
			if err := rw.Prefetch(t.Context(), rk.names, run.LoadConfig{Workers: 4, Chunk: 512}); err != nil {
				t.Fatal(err)
			}
			err := loadAll(t.Context(), rw, rk.names)
			if err == nil || !strings.Contains(err.Error(), victim) || !strings.Contains(err.Error(), path) || !errors.Is(err, fileread.ErrShort) {
				t.Fatalf("load = %v, want an error naming %s and %s, wrapping fileread.ErrShort", err, victim, path)
			}
			t.Logf("error: %v", err)
			if err := rw.Close(); err != nil {
				t.Fatal(err)
			}
			goroutines(t, before)
		})
	}
	t.Run("read-error", func(t *testing.T) {
		before := runtime.NumGoroutine()
		rk := openRank(t, fixture, 2, 1)
		victim, path := lastTensorOf(t, rk, "model-00002-of-00005.safetensors")
		e, _, _ := rk.rr.Locate(victim)
		files := &countingFiles{FileReader: fileread.New(false), failPath: path, failAt: e.Pieces[0].Off}
		rw := run.NewRankWeights(rk.rr, opsFor(true))
		if err := rw.Prefetch(t.Context(), rk.names, run.LoadConfig{Workers: 2, Chunk: 256, Files: files}); err != nil {
			t.Fatal(err)
		}
		err := loadAll(t.Context(), rw, rk.names)
		if err == nil || !strings.Contains(err.Error(), victim) || !strings.Contains(err.Error(), path) {
			t.Fatalf("load = %v, want an error naming %s and %s", err, victim, path)
		}
		rw.Close()
		goroutines(t, before)
	})
	t.Run("corrupt-header", func(t *testing.T) {
		dir := copyFixture(t)
		path := filepath.Join(dir, "model-00004-of-00005.safetensors")
		b, _ := os.ReadFile(path)
		copy(b[8:], `{"bad json`)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := safetensors.OpenCheckpoint(dir)
		if err == nil || !strings.Contains(err.Error(), path) {
			t.Fatalf("OpenCheckpoint = %v, want an error naming %s", err, path)
		}
	})
}

// lastTensorOf returns the rank's tensor (model name) that lies last in the shard file, and the file's path.
func lastTensorOf(t *testing.T, rk rank, file string) (string, string) {
	t.Helper()
	best, bestOff, path := "", int64(-1), ""
	for _, n := range rk.names {
		e, _, err := rk.rr.Locate(n)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(e.Path) == file && len(e.Pieces) > 0 && e.Pieces[len(e.Pieces)-1].Off > bestOff {
			best, bestOff, path = n, e.Pieces[len(e.Pieces)-1].Off, e.Path
		}
	}
	if best == "" {
		t.Fatalf("no tensor of the rank in %s", file)
	}
	return best, path
}

func loadAll(ctx context.Context, rw *run.RankWeights, names []string) error {
	for _, n := range names {
		if _, _, err := rw.Load(ctx, n); err != nil {
			return err
		}
	}
	return nil
}

// TestPipelineCancel: cancelling the context mid-load ends the load with the context's error and every
// goroutine, in both modes.
func TestPipelineCancel(t *testing.T) {
	for _, staged := range []bool{false, true} {
		t.Run(fmt.Sprintf("staged=%v", staged), func(t *testing.T) {
			before := runtime.NumGoroutine()
			rk := openRank(t, fixture, 1, 0)
			ctx, cancel := context.WithCancel(t.Context())
			rw := run.NewRankWeights(rk.rr, opsFor(staged))
			// Small budgets so that readers are blocked on buffers when the cancel comes.
			if err := rw.Prefetch(ctx, rk.names, run.LoadConfig{Workers: 3, Chunk: 128, Ahead: 4096}); err != nil {
				t.Fatal(err)
			}
			for _, n := range rk.names[:3] {
				if _, _, err := rw.Load(ctx, n); err != nil {
					t.Fatal(err)
				}
			}
			cancel()
			if _, _, err := rw.Load(ctx, rk.names[len(rk.names)-1]); !errors.Is(err, context.Canceled) {
				t.Fatalf("Load after cancel = %v, want context.Canceled", err)
			}
			if err := rw.Close(); err != nil {
				t.Fatal(err)
			}
			goroutines(t, before)
		})
	}
}

// TestPipelineQuantizesAfterCopy: with a format, a staged load copies the bf16 bytes and quantises them on
// the device (DeviceQuantizer), and the result is what quantising on the host gives.
func TestPipelineQuantizesAfterCopy(t *testing.T) {
	rk := openRank(t, fixture, 2, 1)
	f, err := quant.ParseFormat("int4", 32)
	if err != nil {
		t.Fatal(err)
	}
	ref := run.NewRankWeights(rk.rr, opsFor(false)).WithFormat(rk.cfg, f)
	rw := run.NewRankWeights(rk.rr, opsFor(true)).WithFormat(rk.cfg, f)
	if err := rw.Prefetch(t.Context(), rk.names, run.LoadConfig{Workers: 2, Chunk: 700}); err != nil {
		t.Fatal(err)
	}
	defer rw.Close()
	quantised := 0
	for _, n := range rk.names {
		got, _, err := rw.Load(t.Context(), n)
		if err != nil {
			t.Fatal(err)
		}
		want, _, err := ref.Load(t.Context(), n)
		if err != nil {
			t.Fatal(err)
		}
		g, w := got.(*hostTensor), want.(*hostTensor)
		if (g.q == nil) != (w.q == nil) {
			t.Fatalf("%s: quantised %v, want %v", n, g.q != nil, w.q != nil)
		}
		if g.q != nil {
			quantised++
			if !bytes.Equal(g.q.Data, w.q.Data) || !slices.Equal(g.q.Scales, w.q.Scales) {
				t.Fatalf("%s: codes or scales differ from the host's quantisation", n)
			}
		} else if !bytes.Equal(g.data, w.data) {
			t.Fatalf("%s: bytes differ", n)
		}
	}
	if quantised == 0 {
		t.Fatal("no tensor was quantised")
	}
	if rw.MemoryBytes() != ref.MemoryBytes() {
		t.Errorf("MemoryBytes = %d, want %d", rw.MemoryBytes(), ref.MemoryBytes())
	}
}

var _ = llama4.Config{} // the family registers itself for model.LoadConfig
