package worker

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/memplan"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/dummy"
	"github.com/tpfleet/tpfleet/model/run"
	"github.com/tpfleet/tpfleet/quant"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/sample"
	"github.com/tpfleet/tpfleet/shard"
)

// DefaultPlanName is the tp_plan a plan with an empty PlanName uses.
const DefaultPlanName = "tp"

// weightsKey identifies what a rank's weights depend on. Two epochs with equal keys need the same bytes,
// so the second reuses the first's weights. The TP group is not part of it: rank r of every group
// holds the same slices.
type weightsKey struct {
	dir       string // checkpoint directory
	model     string // the plan's model name
	planName  string
	planRules string // the plan file's content carried by the plan (cluster.Plan.PlanRules); "": none
	order     string // the plan's unit order (cluster.Plan.Order) as JSON; "": none
	tp, rank  int
	// quantization and group are the plan's Quantization and QuantizationGroup.
	quantization string
	group        int
}

func (k weightsKey) String() string {
	s := fmt.Sprintf("%s (%s) plan %s rank %d of %d", k.dir, k.model, k.planName, k.rank, k.tp)
	if k.quantization != "" {
		s += " quantization " + k.quantization
	}
	return s
}

// weights are one rank's loaded model. The model runs its collectives through comm, whose communicator
// is replaced at every epoch.
type weights struct {
	key   weightsKey
	model run.Model
	cfg   model.Config
	info  model.Info // the model's vocabulary, context and ids
	// held is the bytes the weights take in memory, in the plan's format (memplan.WeightBytes).
	held    int64
	comm    *epochComm
	gen     model.Generation
	bytes   int64 // bytes held, as stored in the checkpoint
	tensors int
	// read is the part of bytes read for these weights; the rest (kept tensors, keptBytes) was taken over
	// from the weights held before.
	read      int64
	kept      int
	keptBytes int64
	// resident are the backend tensors by the model's name for them, with their shard keys: what a later
	// load may take over instead of reading.
	resident map[string]resident
	// order is the plan's unit order the weights were loaded in; nil: the checkpoint's.
	order *cluster.UnitOrder
	// images encodes a prompt's images (images.go); nil when the model takes none, and noImages says why.
	images   run.ImageEncoder
	noImages error
}

// unitOrder decodes k's unit order; nil when it has none.
func (k weightsKey) unitOrder() (*cluster.UnitOrder, error) {
	if k.order == "" {
		return nil, nil
	}
	var o cluster.UnitOrder
	if err := json.Unmarshal([]byte(k.order), &o); err != nil {
		return nil, fmt.Errorf("plan: unit order: %w", err)
	}
	return &o, nil
}

// resident is one loaded tensor and what identifies its bytes: its manifest entry's shard.TensorShard.Key
// and the format it is held in.
type resident struct {
	key    string
	t      backend.Tensor
	layout model.Layout
}

// sameSource reports whether weights of k and of o come from the same checkpoint in the same format, so
// that tensors with equal shard keys hold the same bytes.
func (k weightsKey) sameSource(o weightsKey) bool {
	return k.dir == o.dir && k.quantization == o.quantization && k.group == o.group
}

// reuseWeights loads a rank's tensors, taking over those that earlier weights hold with the same shard key
// (same bytes, same Layout, same format) instead of reading them. Load runs on the model's loader
// goroutine only.
type reuseWeights struct {
	next   run.Weights // reads what is lacking
	man    *shard.Manifest
	format string
	from   []map[string]resident

	got       map[string]resident
	kept      int
	keptBytes int64
}

var _ run.Weights = (*reuseWeights)(nil)

// lacking returns the entries of the manifest, and their bytes, that no earlier weights hold: what the load
// will read.
func (r *reuseWeights) lacking() (int, int64) {
	n, bytes := 0, int64(0)
	for _, ts := range r.man.Tensors {
		name := strings.TrimPrefix(ts.Name, r.man.Prefix)
		key := ts.Key() + "|" + r.format
		held := false
		for _, from := range r.from {
			if h, ok := from[name]; ok && h.key == key {
				held = true
				break
			}
		}
		if !held {
			n++
			bytes += ts.Bytes
		}
	}
	return n, bytes
}

func (r *reuseWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	ts, ok := r.man.Lookup(r.man.Prefix + name)
	key := ts.Key() + "|" + r.format
	if ok {
		for _, from := range r.from {
			if h, held := from[name]; held && h.key == key {
				h.layout = ts.Layout // the same bytes; the expert order over the group may differ
				r.got[name] = h
				r.kept++
				r.keptBytes += ts.Bytes
				return h.t, h.layout, nil
			}
		}
	}
	t, lay, err := r.next.Load(ctx, name)
	if err != nil {
		return t, lay, err
	}
	if ok {
		r.got[name] = resident{key: key, t: t, layout: lay}
	}
	return t, lay, nil
}

// toRead lists the model's names of the manifest's tensors that no earlier weights hold, in the model's
// loading order: what the load pipeline reads ahead.
func (r *reuseWeights) toRead(cfg model.Config) []string {
	var names []string
	for _, s := range model.Tensors(cfg) {
		ts, ok := r.man.Lookup(r.man.Prefix + s.Name)
		if !ok {
			continue
		}
		key, held := ts.Key()+"|"+r.format, false
		for _, from := range r.from {
			if h, ok := from[s.Name]; ok && h.key == key {
				held = true
				break
			}
		}
		if !held {
			names = append(names, s.Name)
		}
	}
	return names
}

// defaultSampling is the sampling a sequence started without SamplingParams uses: the checkpoint's
// generation_config.json, greedy when it does not sample.
func (w *weights) defaultSampling() sample.Params {
	p := sample.Params{TopP: 1}
	if w.gen.DoSample {
		p.Temperature, p.TopK, p.TopP = w.gen.Temperature, w.gen.TopK, w.gen.TopP
	}
	return p
}

// keyFor returns the weights key of an assignment in plan p.
func (w *Worker) keyFor(p cluster.Plan, a cluster.Assignment) weightsKey {
	dir := w.cfg.Model
	if dir == "" {
		dir = p.Model
	}
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	name := p.PlanName
	if name == "" {
		name = DefaultPlanName
	}
	var order string
	if p.Order != nil {
		data, _ := json.Marshal(p.Order) // a map of ints: sorted keys, so equal orders give equal keys
		order = string(data)
	}
	return weightsKey{dir: dir, model: p.Model, planName: name, planRules: string(p.PlanRules), order: order, tp: p.TP, rank: a.Rank,
		quantization: p.Quantization, group: p.QuantizationGroup}
}

// loadWeights reads exactly this rank's slices of the checkpoint (range reads of the mmapped files) into
// the backend and builds the model over them. Tensors that the weights in from (nil ones skipped) hold
// with the same shard key, from the same checkpoint in the same format, are taken over, not read.
func (w *Worker) loadWeights(ctx context.Context, k weightsKey, from ...*weights) (*weights, error) {
	start := time.Now()
	// The checkpoint: the directory's files, or a peer's when the directory holds none.
	var src shard.Source
	var remote *remoteCheckpoint
	if w.cfg.LoadFormat == dummy.LoadFormat {
		d, err := dummySource(k.dir)
		if err != nil {
			return nil, err
		}
		src = d
	} else if hasCheckpoint(k.dir) {
		ckpt, err := safetensors.OpenCheckpoint(k.dir)
		if err != nil {
			return nil, err
		}
		// The backend copies what it loads, so the mapping is not needed once the model is built.
		defer ckpt.Close()
		src = ckpt
	} else {
		rc, conn, err := w.dialCheckpoint(ctx, k.dir)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		src, remote = rc, rc
	}
	cfg, err := model.LoadConfig(k.dir)
	if err != nil {
		return nil, err
	}
	info := cfg.Info()
	gen, err := model.LoadGeneration(k.dir, info)
	if err != nil {
		return nil, err
	}
	plan, err := shard.PlanOf(cfg, k.planName, []byte(k.planRules))
	if err != nil {
		return nil, fmt.Errorf("on this host: %w", err)
	}
	order, err := k.unitOrder()
	if err != nil {
		return nil, err
	}
	if order != nil {
		plan = plan.WithOrder(order.Unit, order.Layers)
	}
	view, err := shard.NewView(cfg, src)
	if err != nil {
		return nil, err
	}
	format, err := w.formatFor(k)
	if err != nil {
		return nil, err
	}
	if _, ok := w.ops.(run.ExpertsOffloader); w.cfg.OffloadExperts && !ok {
		return nil, fmt.Errorf("%w: --offload-experts: the %s backend cannot keep experts in host memory (cuda can)", ErrInvalidConfig, w.ops.Name())
	}
	man, err := shard.NewManifest(cfg, view, plan, k.tp, k.rank)
	if err != nil {
		return nil, err
	}
	lg := w.lg.With(zap.Int("rank", k.rank), zap.Int("tp", k.tp))
	lg.Info("loading weights", zap.String("model", k.dir), zap.String("plan", k.planName),
		zap.String("device", w.ops.Name()), zap.String("family", info.Family), zap.Stringer("format", format), zap.Int("tensors", len(man.Tensors)),
		zap.Int64("bytes", man.Bytes), zap.Int64("full-bytes", man.FullBytes))

	_, device := w.ops.(backend.DeviceContext) // the epochs' communicators are then NCCL's
	comm := newEpochComm(k.rank, k.tp, device)
	rw := &reuseWeights{man: &man, format: format.String(), got: make(map[string]resident)}
	for _, f := range from {
		if f != nil && f.key.sameSource(k) {
			rw.from = append(rw.from, f.resident)
		}
	}
	toRead, toReadBytes := rw.lacking()
	w.metrics.loadStart(toRead, toReadBytes)
	defer w.metrics.loadEnd()
	rankW := run.NewRankWeights(shard.NewRankReader(view, man), w.ops).WithFormat(cfg, format).WithLog(lg)
	defer rankW.Close()
	var next run.Weights = rankW
	if fill, ok := w.ops.(deviceFiller); ok && w.cfg.LoadFormat == dummy.LoadFormat {
		next = newDeviceDummy(rankW, fill, cfg, &man, format) // generated on the device
	} else if err := rankW.Prefetch(ctx, rw.toRead(cfg), w.cfg.Load); err != nil {
		// The load pipeline reads what is lacking ahead of the model's loader, with several readers, into
		// the backend's staging buffers where it has them (a checkpoint streamed from a peer, or generated
		// weights, are read as before).
		return nil, err
	}
	if w.cfg.OffloadExperts {
		if next, err = run.NewOffloadWeights(next, cfg, w.ops); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	}
	counted := &progressWeights{Weights: next, m: w.metrics, bytesOf: man.BytesOf}
	pw := &run.Progress{Weights: counted, Log: lg,
		Total: toRead, TotalBytes: toReadBytes, BytesOf: man.BytesOf, Every: w.progressEvery}
	rw.next = pw
	m, err := run.Open(ctx, w.ops, cfg, rw, run.Parallel{Comm: comm})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	if err := rankW.Close(); err != nil {
		return nil, err
	}
	if s, ok := w.ops.(backend.Synchronizer); ok { // the weights are on the device when their copies end
		if err := s.Synchronize(); err != nil {
			return nil, err
		}
	}
	enc, noImages, err := w.openImages(ctx, cfg, k.dir, remote == nil, from) // images.go
	if err != nil {
		return nil, err
	}
	took := time.Since(start)
	tensors, bytes := pw.Loaded()
	w.phases.AddAll(rankW.LoadStats().Phases(start, bytes))
	lg.Info("weights loaded", zap.Int("tensors", tensors), zap.Int64("bytes", bytes),
		zap.Int("kept-tensors", rw.kept), zap.Int64("kept-bytes", rw.keptBytes),
		zap.Duration("took", took.Round(time.Millisecond)),
		zap.Float64("mib-per-second", float64(bytes)/(1<<20)/max(took.Seconds(), 1e-9)))
	if remote != nil {
		w.streamed.Add(remote.streamed.Load())
	}
	w.mu.Lock()
	w.readBytes += bytes
	w.keptTensors, w.keptBytes = rw.kept, rw.keptBytes
	w.mu.Unlock()
	return &weights{key: k, model: m, cfg: cfg, info: info, held: memplan.WeightBytes(cfg, man, format), comm: comm, gen: gen, bytes: bytes + rw.keptBytes, tensors: tensors + rw.kept,
		read: bytes, kept: rw.kept, keptBytes: rw.keptBytes, resident: rw.got, order: order, images: enc, noImages: noImages}, nil
}

// formatFor returns the weight format of k's plan. The plan decides, so that the ranks of a group agree; a
// worker started with its own --quantization refuses a plan that says otherwise (ErrInvalidConfig) rather
// than hold its slices in another format than its peers.
func (w *Worker) formatFor(k weightsKey) (quant.Format, error) {
	format, err := quant.ParseFormat(k.quantization, cmp.Or(k.group, quant.DefaultGroupSize))
	if err != nil {
		return quant.Format{}, fmt.Errorf("plan: %w", err)
	}
	if w.cfg.Quantization == "" {
		return format, nil
	}
	own, err := quant.ParseFormat(w.cfg.Quantization, cmp.Or(w.cfg.QuantizationGroup, quant.DefaultGroupSize))
	if err != nil {
		return quant.Format{}, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if own != format {
		return quant.Format{}, fmt.Errorf("%w: --quantization %s, but the plan's quantization is %s (the coordinator's --quantization decides; start the worker without it)",
			ErrInvalidConfig, own, format)
	}
	return format, nil
}

// DummySeed is the seed of generated weights (--load-format dummy): every rank uses it, so the ranks of a
// group hold slices of one model.
const DummySeed = 0

// dummySource generates the weights of dir's config.json (--load-format dummy).
func dummySource(dir string) (*dummy.Source, error) {
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return nil, err
	}
	return dummy.NewSource(cfg, DummySeed)
}
