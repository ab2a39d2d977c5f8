package worker

import (
	"cmp"
	"context"
	"fmt"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/model"
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
	dir      string // checkpoint directory
	model    string // the plan's model name
	planName string
	tp, rank int
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
	key     weightsKey
	model   run.Model
	info    model.Info // the model's vocabulary, context and ids
	comm    *epochComm
	gen     model.Generation
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
	return weightsKey{dir: dir, model: p.Model, planName: name, tp: p.TP, rank: a.Rank,
		quantization: p.Quantization, group: p.QuantizationGroup}
}

// loadWeights reads exactly this rank's slices of the checkpoint (range reads of the mmapped files) into
// the backend and builds the model over them.
func (w *Worker) loadWeights(ctx context.Context, k weightsKey) (*weights, error) {
	start := time.Now()
	cfg, err := model.LoadConfig(k.dir)
	if err != nil {
		return nil, err
	}
	info := cfg.Info()
	gen, err := model.LoadGeneration(k.dir, info)
	if err != nil {
		return nil, err
	}
	plan, err := shard.ResolvePlan(cfg, k.planName)
	if err != nil {
		return nil, fmt.Errorf("on this host: %w", err)
	}
	ckpt, err := safetensors.OpenCheckpoint(k.dir)
	if err != nil {
		return nil, err
	}
	// The backend copies what it loads, so the mapping is not needed once the model is built.
	defer ckpt.Close()
	view, err := shard.NewView(cfg, ckpt)
	if err != nil {
		return nil, err
	}
	format, err := w.formatFor(k)
	if err != nil {
		return nil, err
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
	w.metrics.loadStart(len(man.Tensors), man.Bytes)
	defer w.metrics.loadEnd()
	counted := &progressWeights{Weights: run.NewRankWeights(shard.NewRankReader(view, man), w.ops).WithFormat(cfg, format), m: w.metrics, bytesOf: man.BytesOf}
	pw := &run.Progress{Weights: counted, Log: lg,
		Total: len(man.Tensors), TotalBytes: man.Bytes, BytesOf: man.BytesOf, Every: w.progressEvery}
	m, err := run.Open(ctx, w.ops, cfg, pw, run.Parallel{Comm: comm})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	took := time.Since(start)
	tensors, bytes := pw.Loaded()
	lg.Info("weights loaded", zap.Int("tensors", tensors), zap.Int64("bytes", bytes),
		zap.Duration("took", took.Round(time.Millisecond)),
		zap.Float64("mib-per-second", float64(bytes)/(1<<20)/max(took.Seconds(), 1e-9)))
	return &weights{key: k, model: m, info: info, comm: comm, gen: gen, bytes: bytes, tensors: tensors}, nil
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
