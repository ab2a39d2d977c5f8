package worker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/model/llama4"
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
	dir      string // checkpoint directory
	model    string // the plan's model name
	planName string
	tp, rank int
}

func (k weightsKey) String() string {
	return fmt.Sprintf("%s (%s) plan %s rank %d of %d", k.dir, k.model, k.planName, k.rank, k.tp)
}

// weights are one rank's loaded model. The model runs its collectives through comm, whose communicator
// is replaced at every epoch.
type weights struct {
	key     weightsKey
	model   *llama4.Model
	comm    *epochComm
	gen     llama4.Generation
	bytes   int64 // bytes read from the checkpoint
	tensors int
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
	return weightsKey{dir: dir, model: p.Model, planName: name, tp: p.TP, rank: a.Rank}
}

// resolvePlan returns a built-in plan by name ("tp", "ep") or reads a plan file.
func resolvePlan(name string) (shard.Plan, error) {
	if plan, ok := shard.NamedPlan(name); ok {
		return plan, nil
	}
	plan, err := shard.LoadPlan(name)
	if errors.Is(err, os.ErrNotExist) {
		return plan, fmt.Errorf("plan %q is not tp, ep or a plan file on this host: %w", name, err)
	}
	return plan, err
}

// loadWeights reads exactly this rank's slices of the checkpoint (range reads of the mmapped files) into
// the backend and builds the model over them.
func (w *Worker) loadWeights(ctx context.Context, k weightsKey) (*weights, error) {
	start := time.Now()
	cfg, err := llama4.LoadConfig(k.dir)
	if err != nil {
		return nil, err
	}
	gen, err := llama4.LoadGeneration(k.dir, cfg)
	if err != nil {
		return nil, err
	}
	plan, err := resolvePlan(k.planName)
	if err != nil {
		return nil, err
	}
	ckpt, err := safetensors.OpenCheckpoint(k.dir)
	if err != nil {
		return nil, err
	}
	// The backend copies what it loads, so the mapping is not needed once the model is built.
	defer ckpt.Close()
	man, err := shard.NewManifest(cfg, ckpt, plan, k.tp, k.rank)
	if err != nil {
		return nil, err
	}
	lg := w.lg.With(zap.Int("rank", k.rank), zap.Int("tp", k.tp))
	lg.Info("loading weights", zap.String("model", k.dir), zap.String("plan", k.planName),
		zap.String("device", w.ops.Name()), zap.Int("layers", cfg.NumLayers), zap.Int("hidden", cfg.HiddenSize),
		zap.Int("experts", cfg.NumExperts), zap.Int("tensors", len(man.Tensors)),
		zap.Int64("bytes", man.Bytes), zap.Int64("full-bytes", man.FullBytes))

	_, device := w.ops.(backend.DeviceContext) // the epochs' communicators are then NCCL's
	comm := newEpochComm(k.rank, k.tp, device)
	pw := &progressWeights{inner: shard.NewRankWeights(ckpt, w.ops, man), man: &man, lg: lg,
		total: len(man.Tensors), totalBytes: man.Bytes, start: start, last: start, every: w.progressEvery}
	m, err := llama4.Load(ctx, w.ops, cfg, pw, llama4.Parallel{Comm: comm})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	took := time.Since(start)
	lg.Info("weights loaded", zap.Int("tensors", pw.tensors), zap.Int64("bytes", pw.bytes),
		zap.Duration("took", took.Round(time.Millisecond)),
		zap.Float64("mib-per-second", float64(pw.bytes)/(1<<20)/max(took.Seconds(), 1e-9)))
	return &weights{key: k, model: m, comm: comm, gen: gen, bytes: pw.bytes, tensors: pw.tensors}, nil
}

// progressWeights counts the tensors and bytes loaded and logs progress every few seconds.
type progressWeights struct {
	inner             llama4.Weights
	man               *shard.Manifest
	lg                *zap.Logger
	tensors, total    int
	bytes, totalBytes int64
	start, last       time.Time
	every             time.Duration
}

var _ llama4.Weights = (*progressWeights)(nil)

func (p *progressWeights) Load(ctx context.Context, name string) (backend.Tensor, llama4.Layout, error) {
	t, lay, err := p.inner.Load(ctx, name)
	if err != nil {
		return t, lay, err
	}
	p.tensors++
	if s, ok := p.man.Lookup(p.man.Prefix + name); ok {
		p.bytes += s.Bytes
	}
	if now := time.Now(); now.Sub(p.last) >= p.every {
		p.last = now
		p.lg.Info("loading weights", zap.Int("tensors", p.tensors), zap.Int("of", p.total),
			zap.Int64("bytes", p.bytes), zap.Int64("of-bytes", p.totalBytes),
			zap.Duration("elapsed", now.Sub(p.start).Round(time.Millisecond)))
	}
	return t, lay, nil
}
