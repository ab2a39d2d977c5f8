package run

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
)

// Slices reads one rank's part of each tensor of a checkpoint: its bytes, dtype and local shape, and the
// Layout the model is told. *shard.RankReader implements it.
type Slices interface {
	ReadTensor(name string) (safetensors.DType, []int, []byte, model.Layout, error)
}

// RankWeights is one rank's Weights: it reads exactly the part of each tensor a shard manifest gives the
// rank (range reads; never a whole split tensor) and loads it into a backend. Without Prefetch, Load is
// safe for concurrent use when the slices' reader and the backend's Load are; with it (the load
// pipeline), Load is called by one goroutine, the one that drives the backend.
type RankWeights struct {
	s   Slices
	ops backend.Ops
	q   quantizer
	p   *pipeline // the load pipeline Prefetch started, nil before
}

// ScaleSlices is implemented by Slices that read pre-quantised checkpoints (*shard.RankReader over a
// shard.View): the float32 scales of this rank's part of a quantised tensor.
type ScaleSlices interface {
	ReadScales(name string) ([]float32, []int, error)
}

// quantizer decides how a tensor is held: as the checkpoint stores it, quantised on the fly to format (the
// weights the model declares Quantizable), or, for an F8_E4M3 tensor of a pre-quantised checkpoint, as
// weight-only FP8 with its scales, dequantised to bf16 (quant.CompressedTensorsFP8, spec §3.4).
type quantizer struct {
	specs  map[string]model.TensorSpec
	format quant.Format
	mem    atomic.Int64 // bytes held in memory so far (quantised: codes and scales)
	log    *zap.Logger  // nil: no line a tensor
}

// held logs, at debug level, how one tensor is held: its stored dtype and bytes and its in-memory format
// and bytes (quantised: codes and scales), the per-tensor form of tpfleet shards plan's table.
func (q *quantizer) held(name string, dt safetensors.DType, stored int, format string, mem int64) {
	if q.log == nil {
		return
	}
	q.log.Debug("tensor held", zap.String("tensor", name), zap.Stringer("stored-dtype", dt), zap.Int("stored-bytes", stored),
		zap.String("in-memory", format), zap.Int64("memory-bytes", mem))
}

func (q *quantizer) configure(cfg model.Config, f quant.Format) {
	q.specs, q.format = map[string]model.TensorSpec{}, f
	for _, s := range model.Tensors(cfg) {
		q.specs[s.Name] = s
	}
}

// load makes the backend tensor of name from its stored bytes; scales reads a pre-quantised tensor's.
func (q *quantizer) load(ops backend.Ops, name string, dt safetensors.DType, shape []int, data []byte,
	scales func() ([]float32, error)) (backend.Tensor, error) {
	spec, known := q.specs[name]
	var w quant.Weight
	switch {
	case dt == safetensors.F8_E4M3:
		if !known || !spec.Quantizable {
			return nil, fmt.Errorf("a quantised %s tensor the model cannot hold quantised (configure the Weights with the model's Config)", dt)
		}
		sc, err := scales()
		if err != nil {
			return nil, err
		}
		w = quant.Weight{Format: quant.CompressedTensorsFP8(), Shape: shape, InputDim: spec.InputDim, Data: data, Scales: sc}
		if err := w.Check(); err != nil {
			return nil, err
		}
	case q.format.Quantized() && known && spec.Quantizable:
		vals := make([]float32, len(data)/max(dt.Size(), 1))
		if err := safetensors.ToFloat32(dt, data, vals); err != nil {
			return nil, err
		}
		var err error
		if w, err = quant.Quantize(q.format, shape, spec.InputDim, vals); err != nil {
			return nil, err
		}
	default:
		q.mem.Add(int64(len(data)))
		q.held(name, dt, len(data), strings.ToLower(dt.String()), int64(len(data)))
		return ops.Load(dt, shape, data)
	}
	q.mem.Add(w.Bytes())
	q.held(name, dt, len(data), w.Format.String(), w.Bytes())
	return backend.LoadQuantized(ops, w)
}

// quantizes reports whether a tensor of dtype dt called name is quantised at load.
func (q *quantizer) quantizes(name string, dt safetensors.DType) bool {
	spec, known := q.specs[name]
	return q.format.Quantized() && known && spec.Quantizable && dt != safetensors.F8_E4M3
}

// quantizeOnDevice quantises t (the bf16 weight name, already on the device) there.
func (q *quantizer) quantizeOnDevice(ops backend.Ops, name string, dt safetensors.DType, t backend.Tensor) (backend.Tensor, error) {
	dq, ok := ops.(backend.DeviceQuantizer)
	if !ok {
		return nil, fmt.Errorf("quantise %s on %s: the backend quantises on the host only", name, ops.Name())
	}
	spec := q.specs[name]
	out, err := dq.Quantize(t, q.format, spec.InputDim)
	if err != nil {
		return nil, fmt.Errorf("quantise %s: %w", name, err)
	}
	mem := q.format.Bytes(t.Shape(), spec.InputDim)
	q.mem.Add(mem)
	n := int64(dt.Size())
	for _, d := range t.Shape() {
		n *= int64(d)
	}
	q.held(name, dt, int(n), q.format.String(), mem)
	return out, nil
}

// WithFormat makes w hold cfg's quantisable weights (model.TensorSpec.Quantizable) in format f, quantised
// at load from this rank's slices only, and lets it load pre-quantised (F8_E4M3) checkpoints read through
// a shard.View. The backend must be a backend.QuantizedLoader for either. It returns w.
func (w *RankWeights) WithFormat(cfg model.Config, f quant.Format) *RankWeights {
	w.q.configure(cfg, f)
	return w
}

// WithLog makes w log each tensor it loads at debug level ("tensor held": stored dtype and bytes,
// in-memory format and bytes). It returns w.
func (w *RankWeights) WithLog(log *zap.Logger) *RankWeights {
	w.q.log = log
	return w
}

// MemoryBytes is the bytes of the tensors loaded so far as held in memory: their stored size, or their
// quantised size (codes and scales).
func (w *RankWeights) MemoryBytes() int64 { return w.q.mem.Load() }

var _ Weights = (*RankWeights)(nil)

// NewRankWeights loads the tensors s reads into ops.
func NewRankWeights(s Slices, ops backend.Ops) *RankWeights {
	return &RankWeights{s: s, ops: ops}
}

// Load reads this rank's part of the tensor the model calls name, loads it into the backend and returns it
// with its Layout. Errors wrap the reader's (safetensors.ErrNotFound for a name outside the manifest).
func (w *RankWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	if w.p != nil {
		if t, lay, ok, err := w.p.take(ctx, name); ok || err != nil {
			return t, lay, err
		}
	}
	dt, shape, data, lay, err := w.s.ReadTensor(name)
	if err != nil {
		return nil, model.Replicated, err
	}
	t, err := w.make(name, dt, shape, data)
	if err != nil {
		return nil, model.Replicated, err
	}
	return t, lay, nil
}

// make loads a tensor's bytes into the backend, quantised on the host when the format says so.
func (w *RankWeights) make(name string, dt safetensors.DType, shape []int, data []byte) (backend.Tensor, error) {
	t, err := w.q.load(w.ops, name, dt, shape, data, func() ([]float32, error) {
		ss, ok := w.s.(ScaleSlices)
		if !ok {
			return nil, fmt.Errorf("%s: the slices' reader reads no scales", dt)
		}
		sc, _, err := ss.ReadScales(name)
		return sc, err
	})
	if err != nil {
		return nil, fmt.Errorf("load %s %s%v: %w", name, dt, shape, err)
	}
	return t, nil
}

// Close ends the load pipeline Prefetch started: its goroutines end, its staging buffers are freed and
// the tensors it read that Load did not hand out are dropped. The tensors loaded stay valid. It is
// idempotent; without Prefetch it does nothing.
func (w *RankWeights) Close() error {
	if w.p == nil {
		return nil
	}
	return w.p.stop()
}

// LoadStats reports what the pipeline did (zero without Prefetch); call it after Close.
func (w *RankWeights) LoadStats() LoadStats {
	if w.p == nil {
		return LoadStats{}
	}
	return w.p.stats
}

// CheckpointWeights loads whole tensors from a safetensors checkpoint into a backend: the Weights of a
// single rank. Names are looked up with the configuration's key prefix.
type CheckpointWeights struct {
	ckpt   *safetensors.Checkpoint
	ops    backend.Ops
	prefix string
	q      quantizer
}

// WithFormat makes w hold cfg's quantisable weights in format f, quantised at load (see
// RankWeights.WithFormat; pre-quantised checkpoints load through a shard.View and RankWeights). It returns
// w.
func (w *CheckpointWeights) WithFormat(cfg model.Config, f quant.Format) *CheckpointWeights {
	w.q.configure(cfg, f)
	return w
}

// WithLog makes w log each tensor it loads at debug level (see RankWeights.WithLog). It returns w.
func (w *CheckpointWeights) WithLog(log *zap.Logger) *CheckpointWeights {
	w.q.log = log
	return w
}

// MemoryBytes is the bytes of the tensors loaded so far as held in memory (see RankWeights.MemoryBytes).
func (w *CheckpointWeights) MemoryBytes() int64 { return w.q.mem.Load() }

var _ Weights = (*CheckpointWeights)(nil)

// NewCheckpointWeights reads cfg's tensors from ckpt into ops.
func NewCheckpointWeights(ckpt *safetensors.Checkpoint, ops backend.Ops, cfg model.Config) *CheckpointWeights {
	return &CheckpointWeights{ckpt: ckpt, ops: ops, prefix: cfg.Info().Prefix}
}

// Load reads name (without the prefix) whole.
func (w *CheckpointWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	if err := ctx.Err(); err != nil {
		return nil, model.Replicated, err
	}
	full := w.prefix + name
	info, err := w.ckpt.Info(full)
	if err != nil {
		return nil, model.Replicated, err
	}
	data, err := w.ckpt.ReadAll(full)
	if err != nil {
		return nil, model.Replicated, err
	}
	t, err := w.q.load(w.ops, name, info.DType, info.Shape, data, func() ([]float32, error) {
		return nil, fmt.Errorf("pre-quantised checkpoints load through a shard.View and RankWeights")
	})
	if err != nil {
		return nil, model.Replicated, fmt.Errorf("%s %s%v: %w", full, info.DType, info.Shape, err)
	}
	return t, model.Replicated, nil
}
