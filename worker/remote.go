package worker

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/internal/grpcauth"
	"github.com/tpfleet/tpfleet/internal/security"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// A worker whose model directory has no checkpoint (no shared volume) receives its slices from a peer
// that has one, or from a designated seed (Config.Seed): the peer's CheckpointInfo gives the small files
// (config.json, generation_config.json, the tokenizer), written into the model directory, and the tensors'
// headers; then each slice the rank's manifest needs arrives over ReadTensor, streamed in chunks with a
// CRC-32C each and a SHA-256 of the whole, resuming from the last good byte when the stream breaks.

// Limits of checkpoint streaming.
const (
	chunkSize     = 1 << 20  // bytes of a TensorChunk
	maxSmallFile  = 64 << 20 // the largest non-safetensors file CheckpointInfo sends whole
	fetchAttempts = 5        // streams a read may take (it resumes where each broke)
)

// errNoCheckpoint means a worker has no checkpoint files to serve to a peer.
var errNoCheckpoint = errors.New("worker: no checkpoint files here")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// hasCheckpoint reports whether dir holds a checkpoint: a config.json and a safetensors file.
func hasCheckpoint(dir string) bool {
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err != nil {
		return false
	}
	m, _ := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	return len(m) > 0
}

// seedDir is the checkpoint directory the worker serves to peers: its --model, else the plan's model
// (as a path on this host), when it holds a checkpoint.
func (w *Worker) seedDir() (string, error) {
	w.mu.Lock()
	dir := w.cfg.Model
	if dir == "" {
		dir = w.latest.Model
	}
	w.mu.Unlock()
	if dir == "" || !hasCheckpoint(dir) {
		return "", fmt.Errorf("%w (model directory %q)", errNoCheckpoint, dir)
	}
	return dir, nil
}

// seedCheckpoint returns the open checkpoint the worker serves from, opened on first use and kept until
// Close (or until the directory changes).
func (w *Worker) seedCheckpoint() (*safetensors.Checkpoint, string, error) {
	dir, err := w.seedDir()
	if err != nil {
		return nil, "", err
	}
	w.seedMu.Lock()
	defer w.seedMu.Unlock()
	if w.seed != nil && w.seedPath == dir {
		return w.seed, dir, nil
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, "", err
	}
	if w.seed != nil {
		_ = w.seed.Close()
	}
	w.seed, w.seedPath = ckpt, dir
	return ckpt, dir, nil
}

// closeSeed closes the checkpoint opened for peers.
func (w *Worker) closeSeed() {
	w.seedMu.Lock()
	defer w.seedMu.Unlock()
	if w.seed != nil {
		_ = w.seed.Close()
		w.seed = nil
	}
}

// CheckpointInfo lists the checkpoint this worker serves to peers.
func (s *service) CheckpointInfo(ctx context.Context, _ *tpfleetv1.CheckpointInfoRequest) (*tpfleetv1.CheckpointInfoResponse, error) {
	ckpt, dir, err := s.w.seedCheckpoint()
	if err != nil {
		return nil, status.Error(codes.NotFound, err.Error())
	}
	out := &tpfleetv1.CheckpointInfoResponse{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, toStatus(err)
	}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || strings.HasSuffix(e.Name(), ".safetensors") || info.Size() > maxSmallFile {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, toStatus(err)
		}
		out.Files = append(out.Files, &tpfleetv1.CheckpointFile{Name: e.Name(), Data: data})
	}
	for _, name := range ckpt.Names() {
		ti, err := ckpt.Info(name)
		if err != nil {
			return nil, toStatus(err)
		}
		shape := make([]int64, len(ti.Shape))
		for i, d := range ti.Shape {
			shape[i] = int64(d)
		}
		out.Tensors = append(out.Tensors, &tpfleetv1.TensorHeader{Name: name, Dtype: ti.DType.String(), Shape: shape})
	}
	return out, nil
}

// ReadTensor streams a tensor (or the ranges of it a peer's rank needs) from offset.
func (s *service) ReadTensor(req *tpfleetv1.ReadTensorRequest, stream grpc.ServerStreamingServer[tpfleetv1.TensorChunk]) error {
	ckpt, _, err := s.w.seedCheckpoint()
	if err != nil {
		return status.Error(codes.NotFound, err.Error())
	}
	data, shape, err := readLocal(ckpt, req)
	if err != nil {
		return status.Error(codes.InvalidArgument, oneLine(err.Error()))
	}
	return sendChunks(stream, data, shape, req.GetOffset(), chunkSize)
}

// readLocal reads what req asks of a local checkpoint.
func readLocal(ckpt *safetensors.Checkpoint, req *tpfleetv1.ReadTensorRequest) ([]byte, []int, error) {
	rs := req.GetRanges()
	if req.GetDim() < 0 || len(rs) == 0 {
		ti, err := ckpt.Info(req.GetName())
		if err != nil {
			return nil, nil, err
		}
		data, err := ckpt.ReadAll(req.GetName())
		return data, ti.Shape, err
	}
	if len(rs)%2 != 0 {
		return nil, nil, fmt.Errorf("%w: ranges of %s: %d numbers, want pairs", ErrInvalidRequest, req.GetName(), len(rs))
	}
	ranges := make([]safetensors.Range, 0, len(rs)/2)
	for i := 0; i < len(rs); i += 2 {
		ranges = append(ranges, safetensors.Range{Start: int(rs[i]), End: int(rs[i+1])})
	}
	return ckpt.ReadSlice(req.GetName(), int(req.GetDim()), ranges...)
}

// chunkSender is the side of a ReadTensor stream that sends.
type chunkSender interface {
	Send(*tpfleetv1.TensorChunk) error
}

// sendChunks sends data from offset in chunks of size, the last one with the size, shape and SHA-256 of
// the whole.
func sendChunks(stream chunkSender, data []byte, shape []int, offset int64, size int) error {
	if offset < 0 || offset > int64(len(data)) {
		return status.Errorf(codes.OutOfRange, "offset %d outside [0, %d]", offset, len(data))
	}
	sum := sha256.Sum256(data)
	sh := make([]int64, len(shape))
	for i, d := range shape {
		sh[i] = int64(d)
	}
	for off := offset; ; {
		end := min(off+int64(size), int64(len(data)))
		c := &tpfleetv1.TensorChunk{Offset: off, Data: data[off:end], Crc32C: crc32.Checksum(data[off:end], castagnoli)}
		if end == int64(len(data)) {
			c.Last, c.Size, c.Shape, c.Sha256 = true, int64(len(data)), sh, sum[:]
		}
		if err := stream.Send(c); err != nil {
			return err
		}
		if c.Last {
			return nil
		}
		off = end
	}
}

// chunkOpener opens a ReadTensor stream; tpfleetv1.WorkerClient's ReadTensor fits.
type chunkOpener func(ctx context.Context, req *tpfleetv1.ReadTensorRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[tpfleetv1.TensorChunk], error)

// fetch reads a tensor (or ranges of it) from a peer: chunk by chunk, each checked against its CRC-32C, the
// whole against its SHA-256; a stream that breaks or a chunk that fails its check is resumed from the last
// good byte, up to fetchAttempts streams. It returns the bytes, their shape and the streams it took.
func fetch(ctx context.Context, open chunkOpener, req *tpfleetv1.ReadTensorRequest) ([]byte, []int, int, error) {
	var buf []byte
	var lastErr error
	for attempt := 1; attempt <= fetchAttempts; attempt++ {
		r := &tpfleetv1.ReadTensorRequest{Name: req.GetName(), Dim: req.GetDim(), Ranges: req.GetRanges(), Offset: int64(len(buf))}
		stream, err := open(ctx, r)
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, attempt, ctx.Err()
			}
			lastErr = err
			continue
		}
		for {
			c, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil {
					return nil, nil, attempt, ctx.Err()
				}
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				lastErr = fmt.Errorf("stream broke at byte %d: %w", len(buf), err)
				break
			}
			if c.GetOffset() != int64(len(buf)) {
				lastErr = fmt.Errorf("chunk at byte %d, want %d", c.GetOffset(), len(buf))
				break
			}
			if crc32.Checksum(c.GetData(), castagnoli) != c.GetCrc32C() {
				lastErr = fmt.Errorf("chunk at byte %d fails its CRC-32C", c.GetOffset())
				break
			}
			buf = append(buf, c.GetData()...)
			if !c.GetLast() {
				continue
			}
			sum := sha256.Sum256(buf)
			if c.GetSize() != int64(len(buf)) || !bytes.Equal(sum[:], c.GetSha256()) {
				// The whole is wrong although every chunk was right: read it again from the start.
				lastErr = fmt.Errorf("%d bytes fail the SHA-256 of %d", len(buf), c.GetSize())
				buf = buf[:0]
				break
			}
			shape := make([]int, len(c.GetShape()))
			for i, d := range c.GetShape() {
				shape[i] = int(d)
			}
			return buf, shape, attempt, nil
		}
	}
	return nil, nil, fetchAttempts, fmt.Errorf("worker: read %s from a peer: %d streams failed; last: %w", req.GetName(), fetchAttempts, lastErr)
}

// remoteCheckpoint is a checkpoint read from a peer (shard.Source): its headers from CheckpointInfo, its
// bytes through fetch. It is safe for concurrent use.
type remoteCheckpoint struct {
	ctx      context.Context // the load's: a read ends with it
	client   tpfleetv1.WorkerClient
	peer     string
	names    []string
	infos    map[string]safetensors.TensorInfo
	streamed atomic.Int64 // bytes received
	resumed  atomic.Int64 // streams beyond the first of each read
}

var _ shard.Source = (*remoteCheckpoint)(nil)

func (r *remoteCheckpoint) Names() []string { return slices.Clone(r.names) }

func (r *remoteCheckpoint) Info(name string) (safetensors.TensorInfo, error) {
	ti, ok := r.infos[name]
	if !ok {
		return ti, fmt.Errorf("worker: tensor %q at peer %s: %w", name, r.peer, safetensors.ErrNotFound)
	}
	return ti, nil
}

func (r *remoteCheckpoint) read(req *tpfleetv1.ReadTensorRequest) ([]byte, []int, error) {
	data, shape, streams, err := fetch(r.ctx, r.client.ReadTensor, req)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (peer %s)", err, r.peer)
	}
	r.streamed.Add(int64(len(data)))
	r.resumed.Add(int64(streams - 1))
	return data, shape, nil
}

func (r *remoteCheckpoint) ReadAll(name string) ([]byte, error) {
	data, _, err := r.read(&tpfleetv1.ReadTensorRequest{Name: name, Dim: -1})
	return data, err
}

func (r *remoteCheckpoint) ReadSlice(name string, dim int, ranges ...safetensors.Range) ([]byte, []int, error) {
	rs := make([]int64, 0, 2*len(ranges))
	for _, x := range ranges {
		rs = append(rs, int64(x.Start), int64(x.End))
	}
	return r.read(&tpfleetv1.ReadTensorRequest{Name: name, Dim: int32(dim), Ranges: rs})
}

// dialCheckpoint finds a peer that serves a checkpoint — Config.Seed first, then the registered members
// — writes its small files into dir and returns the checkpoint's remote view. The caller closes conn.
func (w *Worker) dialCheckpoint(ctx context.Context, dir string) (*remoteCheckpoint, *grpc.ClientConn, error) {
	var peers []string
	if w.cfg.Seed != "" {
		peers = append(peers, w.cfg.Seed)
	}
	if ms, _, err := w.cli.Members(ctx); err == nil {
		for _, m := range ms {
			if m.ID != w.cfg.ID && m.Addr != w.addr {
				peers = append(peers, m.Addr)
			}
		}
	}
	var errs []error
	for _, peer := range peers {
		conn, err := w.dialPeer(peer)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		c := tpfleetv1.NewWorkerClient(conn)
		info, err := c.CheckpointInfo(ctx, &tpfleetv1.CheckpointInfoRequest{})
		if err != nil {
			_ = conn.Close()
			errs = append(errs, fmt.Errorf("%s: %w", peer, err))
			continue
		}
		rc, err := w.remoteFrom(ctx, c, peer, dir, info)
		if err != nil {
			_ = conn.Close()
			return nil, nil, err
		}
		return rc, conn, nil
	}
	if ctx.Err() != nil {
		return nil, nil, ctx.Err()
	}
	return nil, nil, fmt.Errorf("worker: %s holds no checkpoint and no peer serves one (seed %q, %d peers): %w",
		dir, w.cfg.Seed, len(peers), errors.Join(errs...))
}

// remoteFrom writes info's small files into dir and makes the remote checkpoint of its tensors.
func (w *Worker) remoteFrom(ctx context.Context, c tpfleetv1.WorkerClient, peer, dir string, info *tpfleetv1.CheckpointInfoResponse) (*remoteCheckpoint, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("worker: checkpoint from %s: %w", peer, err)
	}
	for _, f := range info.GetFiles() {
		name := filepath.Base(f.GetName())
		if name != f.GetName() || name == "." || name == ".." {
			return nil, fmt.Errorf("worker: checkpoint from %s: file name %q", peer, f.GetName())
		}
		if err := os.WriteFile(filepath.Join(dir, name), f.GetData(), 0o644); err != nil {
			return nil, fmt.Errorf("worker: checkpoint from %s: %w", peer, err)
		}
	}
	rc := &remoteCheckpoint{ctx: ctx, client: c, peer: peer, infos: make(map[string]safetensors.TensorInfo)}
	for _, t := range info.GetTensors() {
		dt, err := safetensors.ParseDType(t.GetDtype())
		if err != nil {
			return nil, fmt.Errorf("worker: checkpoint from %s: tensor %s: %w", peer, t.GetName(), err)
		}
		shape := make([]int, len(t.GetShape()))
		for i, d := range t.GetShape() {
			shape[i] = int(d)
		}
		rc.names = append(rc.names, t.GetName())
		rc.infos[t.GetName()] = safetensors.TensorInfo{Name: t.GetName(), DType: dt, Shape: shape}
	}
	slices.Sort(rc.names)
	w.lg.Info("reading the checkpoint from a peer", zap.String("peer", peer), zap.String("model", dir),
		zap.Int("files", len(info.GetFiles())), zap.Int("tensors", len(rc.names)))
	return rc, nil
}

// dialPeer opens a connection to a peer worker or seed: with the worker's TLS, mTLS that presents its
// certificate and accepts only a worker's of the same cluster; without, plaintext.
func (w *Worker) dialPeer(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr, grpc.WithTransportCredentials(grpcauth.DialCredentials(w.cfg.TLS, security.RoleWorker)))
}

// seedState is the checkpoint a worker serves to peers (see seedCheckpoint).
type seedState struct {
	seedMu   sync.Mutex
	seed     *safetensors.Checkpoint
	seedPath string
}
