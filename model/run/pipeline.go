package run

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/fileread"
	"github.com/tpfleet/tpfleet/internal/phase"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Defaults of LoadConfig.
const (
	// DefaultChunk is the most bytes one read, and one staged copy, moves: 16 MiB, large enough that a
	// read runs at the disk's sequential rate and a copy at the bus's, small enough that the pinned
	// staging buffers (two per reader) are quick to allocate (pinning costs time per byte).
	DefaultChunk = 16 << 20
	// DefaultAhead bounds the bytes read ahead of the backend when tensors are handed over whole (a
	// backend without staging): 1 GiB, or one tensor when it is larger.
	DefaultAhead = 1 << 30
	// MaxLoadWorkers caps DefaultLoadWorkers.
	MaxLoadWorkers = 8
)

// DefaultLoadWorkers is the number of reader goroutines a zero LoadConfig.Workers means: GOMAXPROCS, at
// least 2 and at most MaxLoadWorkers (NVMe disks want several reads in flight; more add nothing).
func DefaultLoadWorkers() int { return min(max(runtime.GOMAXPROCS(0), 2), MaxLoadWorkers) }

// LoadConfig configures the load pipeline (RankWeights.Prefetch).
type LoadConfig struct {
	// Workers is the number of reader goroutines; 0 means DefaultLoadWorkers().
	Workers int `json:"load-workers"`
	// Chunk is the most bytes one read and one staged copy move; 0 means DefaultChunk.
	Chunk int64 `json:"load-chunk"`
	// Ahead bounds the bytes read ahead of the backend for tensors handed over whole; 0 means
	// DefaultAhead. Staged tensors are bounded by the staging buffers (2 per worker, Chunk each).
	Ahead int64 `json:"-"`
	// Direct reads with O_DIRECT (large aligned reads that bypass the page cache), where the filesystem
	// allows it.
	Direct bool `json:"load-direct"`
	// Files reads the checkpoint's files; nil means fileread.New(Direct). Tests count reads through it.
	Files FileReader `json:"-"`
}

// Validate reports a negative field.
func (c LoadConfig) Validate() error {
	if c.Workers < 0 || c.Chunk < 0 || c.Ahead < 0 {
		return fmt.Errorf("load: workers %d, chunk %d, ahead %d: want >= 0", c.Workers, c.Chunk, c.Ahead)
	}
	return nil
}

// FileReader reads n bytes of a file at off into buf and returns the slice of buf holding them (see
// fileread.Files.ReadAt: with O_DIRECT buf needs fileread.Slack spare bytes). It is safe for concurrent
// use.
type FileReader interface {
	ReadAt(path string, buf []byte, off, n int64) ([]byte, error)
}

// Locator says where a rank's part of a tensor lies in the checkpoint's files, and the Layout the model
// is told. *shard.RankReader implements it; a tensor it cannot locate (an error wrapping
// shard.ErrNotLocatable, say) is read through Slices instead.
type Locator interface {
	Locate(name string) (safetensors.Extent, model.Layout, error)
}

// LoadStats is what a load pipeline did.
type LoadStats struct {
	Tensors int   // tensors read by the pipeline
	Bytes   int64 // their bytes
	Staged  int64 // of Bytes, copied through the backend's staging buffers
	Reads   int64 // read calls
	Workers int
	Direct  bool
	// Read is the time from the pipeline's start to its last read; Copy the loader's time in staged
	// copies (enqueueing, waiting for buffers, the final wait) and Ops.Load; Quantize its time in
	// on-device quantisation; Wait its time waiting for reads. They overlap: Read runs beside the others.
	Read, Copy, Quantize, Wait time.Duration
	// Staging is the time NewStaging took (pinned host memory is slow to allocate).
	Staging time.Duration
	Start   time.Time
}

// pipeline reads one rank's tensors ahead of the model's loader with several reader goroutines and hands
// them to the backend: through its staging buffers (backend.Uploader: read into pinned memory, copied
// asynchronously, quantised on the device) or whole (Ops.Load). Its consumer side (take) runs on the
// model's loader goroutine, the one that drives the backend.
type pipeline struct {
	w      *RankWeights
	cfg    LoadConfig
	files  FileReader
	owned  *fileread.Files // closed by stop when the pipeline opened it
	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup

	tasks  []*task
	byName map[string]*task
	next   int // the next task take processes
	done   map[string]loaded

	staging backend.Staging
	free    chan int // staging buffers not in use
	inUse   []int    // buffers whose copies are enqueued, oldest first
	budget  *budget

	mu       sync.Mutex // guards dispatch
	dispTask int
	dispCh   int

	reads    atomic.Int64
	lastRead atomic.Int64 // unix nanoseconds
	stats    LoadStats
	stopOnce sync.Once
	// stopOnCancel unregisters the callback that stops the pipeline when Prefetch's context ends.
	stopOnCancel func() bool
}

type loaded struct {
	t   backend.Tensor
	lay model.Layout
}

// task is one tensor the pipeline reads.
type task struct {
	name   string
	ext    safetensors.Extent
	lay    model.Layout
	bytes  int64
	staged bool
	chunks []*chunk
	host   []byte // the whole tensor's bytes, when not staged
	held   int64  // budget held for host
}

// chunk is a run of a task's bytes that one reader reads: pieces of the file, at off of the tensor.
type chunk struct {
	t      *task
	off    int64
	n      int64
	pieces []safetensors.Piece
	buf    int           // staging buffer, when staged
	data   []byte        // where the bytes landed (a staging buffer's part), when staged
	done   chan struct{} // closed when read
	err    error
}

// Prefetch starts reading the tensors names lists (the model's loading order, as model.Tensors gives it)
// ahead of Load with cfg's reader goroutines, when w's Slices is also a Locator. Load then returns the
// prefetched tensors (any order works; the one asked for is processed first); names outside the list or
// that cannot be located are read as before. Call Close when the model is built: it ends every goroutine
// and frees the staging buffers. Prefetch is called once, from the goroutine that drives the backend.
func (w *RankWeights) Prefetch(ctx context.Context, names []string, cfg LoadConfig) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if w.p != nil {
		return errors.New("load: Prefetch called twice")
	}
	loc, ok := w.s.(Locator)
	if !ok {
		return nil
	}
	if cfg.Workers == 0 {
		cfg.Workers = DefaultLoadWorkers()
	}
	if cfg.Chunk == 0 {
		cfg.Chunk = DefaultChunk
	}
	if cfg.Ahead == 0 {
		cfg.Ahead = DefaultAhead
	}
	p := &pipeline{w: w, cfg: cfg, files: cfg.Files, byName: map[string]*task{}, done: map[string]loaded{}}
	if p.files == nil {
		p.owned = fileread.New(cfg.Direct)
		p.files = p.owned
	}
	up, _ := w.ops.(backend.Uploader)
	_, devQuant := w.ops.(backend.DeviceQuantizer)
	for _, name := range names {
		if _, dup := p.byName[name]; dup {
			continue
		}
		ext, lay, err := loc.Locate(name)
		if err != nil {
			continue // read through Slices at Load (an assembled tensor, or an error Load reports)
		}
		t := &task{name: name, ext: ext, lay: lay, bytes: ext.Bytes()}
		hostQuant := w.q.quantizes(name, ext.DType) && !(devQuant && ext.DType == safetensors.BF16)
		t.staged = up != nil && !hostQuant && t.bytes > 0
		t.chunks = p.split(t)
		p.tasks = append(p.tasks, t)
		p.byName[name] = t
		p.stats.Tensors++
		p.stats.Bytes += t.bytes
		if t.staged {
			p.stats.Staged += t.bytes
		}
	}
	if len(p.tasks) == 0 {
		return p.closeFiles()
	}
	if p.stats.Staged > 0 {
		n := 2 * cfg.Workers
		pin := time.Now()
		st, err := up.NewStaging(n, cfg.Chunk+fileread.Slack)
		p.stats.Staging = time.Since(pin)
		if err != nil {
			return errors.Join(fmt.Errorf("load: staging buffers: %w", err), p.closeFiles())
		}
		p.staging, p.free = st, make(chan int, n)
		for i := range n {
			p.free <- i
		}
		for _, t := range p.tasks {
			if t.staged && !st.Stages(t.ext.DType) {
				t.staged = false
				p.stats.Staged -= t.bytes
			}
		}
	}
	p.budget = newBudget(cfg.Ahead)
	p.stats.Workers, p.stats.Direct, p.stats.Start = cfg.Workers, cfg.Direct, time.Now()
	p.ctx, p.cancel = context.WithCancelCause(context.WithoutCancel(ctx))
	stopOnCancel := context.AfterFunc(ctx, func() { p.cancel(context.Cause(ctx)) })
	p.stopOnCancel = stopOnCancel
	p.wg.Add(cfg.Workers)
	for range cfg.Workers {
		go func() {
			defer p.wg.Done()
			p.read()
		}()
	}
	w.p = p
	return nil
}

// split cuts t's pieces into chunks of at most cfg.Chunk bytes.
func (p *pipeline) split(t *task) []*chunk {
	var out []*chunk
	var cur *chunk
	off := int64(0)
	for _, pc := range t.ext.Pieces {
		for pc.N > 0 {
			if cur == nil || cur.n == p.cfg.Chunk {
				cur = &chunk{t: t, off: off, done: make(chan struct{})}
				out = append(out, cur)
			}
			n := min(pc.N, p.cfg.Chunk-cur.n)
			cur.pieces = append(cur.pieces, safetensors.Piece{Off: pc.Off, N: n})
			cur.n += n
			off += n
			pc.Off += n
			pc.N -= n
		}
	}
	return out
}

// dispatch hands out the next chunk, in order, with what it needs: a staging buffer, or for a task's
// first whole-mode chunk, the budget and buffer of the whole tensor. Taking them in chunk order under
// the lock means the chunk the loader waits for never waits for a buffer a later chunk holds.
func (p *pipeline) dispatch() (*chunk, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.dispTask < len(p.tasks) && p.dispCh >= len(p.tasks[p.dispTask].chunks) {
		p.dispTask, p.dispCh = p.dispTask+1, 0
	}
	if p.dispTask == len(p.tasks) {
		return nil, nil
	}
	t := p.tasks[p.dispTask]
	c := t.chunks[p.dispCh]
	if t.staged {
		select {
		case c.buf = <-p.free:
		case <-p.ctx.Done():
			return nil, context.Cause(p.ctx)
		}
	} else if p.dispCh == 0 {
		t.held = min(t.bytes, p.cfg.Ahead)
		if err := p.budget.acquire(p.ctx, t.held); err != nil {
			return nil, err
		}
		t.host = make([]byte, t.bytes)
	}
	p.dispCh++
	return c, nil
}

// read is one reader goroutine: it reads chunks until none are left or the pipeline stops.
func (p *pipeline) read() {
	var scratch []byte // for O_DIRECT reads of pieces that do not land in place
	for {
		c, err := p.dispatch()
		if err != nil || c == nil {
			return
		}
		if err := p.readChunk(c, &scratch); err != nil {
			c.err = &chunkError{tensor: c.t.name, path: c.t.ext.Path, err: err}
		}
		p.lastRead.Store(time.Now().UnixNano())
		close(c.done)
		if c.err != nil {
			p.cancel(c.err)
			return
		}
	}
}

// readChunk reads c's pieces: into its staging buffer, or into its task's host buffer.
func (p *pipeline) readChunk(c *chunk, scratch *[]byte) error {
	path := c.t.ext.Path
	var dst []byte // where the chunk's bytes go, in order
	if c.t.staged {
		buf := p.staging.Buffer(c.buf)
		if len(c.pieces) == 1 { // in place, O_DIRECT or not
			p.reads.Add(1)
			got, err := p.files.ReadAt(path, buf, c.pieces[0].Off, c.pieces[0].N)
			if err != nil {
				return err
			}
			c.data = got
			return nil
		}
		dst = buf[:c.n]
		c.data = dst
	} else {
		dst = c.t.host[c.off : c.off+c.n]
	}
	pos := int64(0)
	for _, pc := range c.pieces {
		if err := p.ctx.Err(); err != nil {
			return context.Cause(p.ctx)
		}
		p.reads.Add(1)
		into := dst[pos : pos+pc.N]
		if p.cfg.Direct {
			if int64(len(*scratch)) < pc.N+fileread.Slack {
				*scratch = fileread.AlignedBuffer(int(p.cfg.Chunk + fileread.Slack))
			}
			got, err := p.files.ReadAt(path, *scratch, pc.Off, pc.N)
			if err != nil {
				return err
			}
			copy(into, got)
		} else {
			got, err := p.files.ReadAt(path, into, pc.Off, pc.N)
			if err != nil {
				return err
			}
			if &got[0] != &into[0] {
				copy(into, got)
			}
		}
		pos += pc.N
	}
	return nil
}

// take returns the tensor name, processing the tasks in order up to it; ok is false for a name the
// pipeline does not read. It runs on the loader's goroutine.
func (p *pipeline) take(ctx context.Context, name string) (backend.Tensor, model.Layout, bool, error) {
	if l, ok := p.done[name]; ok {
		delete(p.done, name)
		return l.t, l.lay, true, nil
	}
	want, ok := p.byName[name]
	if !ok || p.indexOf(want) < 0 {
		return nil, model.Replicated, false, nil
	}
	for p.next < len(p.tasks) {
		t := p.tasks[p.next]
		p.next++
		ten, err := p.finish(ctx, t)
		if err != nil {
			if ce := (*chunkError)(nil); !errors.As(err, &ce) && ctx.Err() == nil {
				err = &chunkError{tensor: t.name, path: t.ext.Path, err: err}
			}
			p.cancel(err)
			return nil, model.Replicated, true, err
		}
		if t == want {
			return ten, t.lay, true, nil
		}
		p.done[t.name] = loaded{ten, t.lay}
	}
	return nil, model.Replicated, false, nil
}

func (p *pipeline) indexOf(t *task) int {
	for i := p.next; i < len(p.tasks); i++ {
		if p.tasks[i] == t {
			return i
		}
	}
	return -1
}

// wait waits for c to be read.
func (p *pipeline) wait(ctx context.Context, c *chunk) error {
	select {
	case <-c.done:
		return c.err
	default:
	}
	// Nothing to do until c is read: give the buffers whose copies are done back to the readers first.
	if err := p.drain(0); err != nil {
		return err
	}
	start := time.Now()
	defer func() { p.stats.Wait += time.Since(start) }()
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	case <-p.ctx.Done():
		select {
		case <-c.done:
			return c.err
		default:
			return context.Cause(p.ctx)
		}
	}
}

// drain waits for the oldest copies until at most keep buffers are in use, and frees them.
func (p *pipeline) drain(keep int) error {
	start := time.Now()
	defer func() { p.stats.Copy += time.Since(start) }()
	for len(p.inUse) > keep {
		i := p.inUse[0]
		if err := p.staging.Wait(i); err != nil {
			return err
		}
		p.inUse = p.inUse[1:]
		p.free <- i
	}
	return nil
}

// finish makes t's tensor from its chunks.
func (p *pipeline) finish(ctx context.Context, t *task) (backend.Tensor, error) {
	if !t.staged {
		for _, c := range t.chunks {
			if err := p.wait(ctx, c); err != nil {
				return nil, err
			}
		}
		start := time.Now()
		ten, err := p.w.make(t.name, t.ext.DType, t.ext.Shape, t.host)
		p.stats.Copy += time.Since(start)
		t.host = nil
		p.budget.release(t.held)
		return ten, err
	}
	start := time.Now()
	ten, err := p.staging.Alloc(t.ext.DType, t.ext.Shape)
	p.stats.Copy += time.Since(start)
	if err != nil {
		return nil, err
	}
	for _, c := range t.chunks {
		if err := p.wait(ctx, c); err != nil {
			return nil, err
		}
		start := time.Now()
		base := int64(0)
		if len(c.data) > 0 {
			base = int64(cap(p.staging.Buffer(c.buf))) - int64(cap(c.data))
		}
		err := p.staging.Copy(ten, c.off, c.buf, base, c.n)
		p.stats.Copy += time.Since(start)
		if err != nil {
			return nil, err
		}
		p.inUse = append(p.inUse, c.buf)
		if err := p.drain(cap(p.free) / 2); err != nil {
			return nil, err
		}
	}
	if !p.w.q.quantizes(t.name, t.ext.DType) {
		p.w.q.mem.Add(t.bytes)
		p.w.q.held(t.name, t.ext.DType, int(t.bytes), strings.ToLower(t.ext.DType.String()), t.bytes)
		return ten, nil
	}
	start = time.Now()
	defer func() { p.stats.Quantize += time.Since(start) }()
	return p.w.q.quantizeOnDevice(p.w.ops, t.name, t.ext.DType, ten) // ordered after the copies (Staging.Copy)
}

// stop ends the readers, waits for them and frees the staging buffers and files.
func (p *pipeline) stop() error {
	var err error
	p.stopOnce.Do(func() {
		p.cancel(errStopped)
		p.wg.Wait()
		p.stopOnCancel()
		if p.staging != nil {
			err = errors.Join(p.drain(0), p.staging.Finish(), p.staging.Close())
		}
		err = errors.Join(err, p.closeFiles())
		p.done = nil
		if last := p.lastRead.Load(); last > 0 {
			p.stats.Read = time.Unix(0, last).Sub(p.stats.Start)
		}
		p.stats.Reads = p.reads.Load()
	})
	return err
}

func (p *pipeline) closeFiles() error {
	if p.owned != nil {
		return p.owned.Close()
	}
	return nil
}

var errStopped = errors.New("load: pipeline closed")

// chunkError is a failed read or copy of a tensor: it names the tensor and its file.
type chunkError struct {
	tensor, path string
	err          error
}

func (e *chunkError) Error() string {
	return fmt.Sprintf("load %s from %s: %v", e.tensor, e.path, e.err)
}
func (e *chunkError) Unwrap() error { return e.err }

// budget is a weighted semaphore of bytes.
type budget struct {
	mu    sync.Mutex
	avail int64
	wake  chan struct{}
}

func newBudget(n int64) *budget { return &budget{avail: n, wake: make(chan struct{})} }

func (b *budget) acquire(ctx context.Context, n int64) error {
	for {
		b.mu.Lock()
		if b.avail >= n {
			b.avail -= n
			b.mu.Unlock()
			return nil
		}
		wake := b.wake
		b.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.avail += n
	close(b.wake)
	b.wake = make(chan struct{})
	b.mu.Unlock()
}

// AddFlags binds c's fields to flags in fs (--load-workers, --load-chunk, --load-direct), with c's
// current values as defaults.
func (c *LoadConfig) AddFlags(fs *flag.FlagSet) {
	fs.IntVar(&c.Workers, "load-workers", c.Workers, fmt.Sprintf("reader goroutines of the weight load (0: GOMAXPROCS, 2 to %d)", MaxLoadWorkers))
	fs.Int64Var(&c.Chunk, "load-chunk", c.Chunk, "bytes one weight read and one host-to-device copy move at most (0: 16 MiB)")
	fs.BoolVar(&c.Direct, "load-direct", c.Direct, "read the checkpoint with O_DIRECT (bypasses the page cache: for cold reads at the disk's rate)")
}

// Phases are a load's start-up phases (package phase): the whole (from start to now, bytes in all, the
// kept and fallback-read tensors included), and the pipeline's reads, copies and quantisation.
func (st LoadStats) Phases(start time.Time, bytes int64) []phase.Phase {
	took := time.Since(start)
	out := []phase.Phase{{Name: phase.Weights, Start: start, Took: took, Detail: fmt.Sprintf("%s at %s", gb(bytes), rate(bytes, took))}}
	if st.Tensors == 0 {
		return out
	}
	direct := ""
	if st.Direct {
		direct = ", O_DIRECT"
	}
	out = append(out,
		phase.Phase{Name: phase.Read, Start: st.Start, Took: st.Read,
			Detail: fmt.Sprintf("%s at %s, %d readers, %d reads%s", gb(st.Bytes), rate(st.Bytes, st.Read), st.Workers, st.Reads, direct)},
		phase.Phase{Name: phase.Copy, Start: st.Start, Took: st.Copy,
			Detail: fmt.Sprintf("%s staged (pinned buffers allocated in %.3fs, async copies); waited %.3fs for reads", gb(st.Staged), st.Staging.Seconds(), st.Wait.Seconds())})
	if st.Quantize > 0 {
		out = append(out, phase.Phase{Name: phase.Quantize, Start: st.Start, Took: st.Quantize, Detail: "on the device, after the copies"})
	}
	return out
}

func gb(n int64) string { return fmt.Sprintf("%.2f GB", float64(n)/1e9) }

func rate(n int64, d time.Duration) string {
	return fmt.Sprintf("%.2f GB/s", float64(n)/1e9/max(d.Seconds(), 1e-9))
}
