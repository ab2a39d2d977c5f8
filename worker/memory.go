package worker

import (
	"errors"
	"fmt"
	"math"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/memplan"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// memory is the rank's memory plan for its weights, and the cache geometry it counts blocks with.
type memory struct {
	plan memplan.Plan
	geom memplan.Geometry
}

// planMemory makes the rank's memory plan once its weights are loaded (package memplan): the device's
// memory (backend.MemoryReporter, else the host's) times --gpu-memory-utilization, less what is in use
// and the largest step's activations, in KV blocks; or --kv-cache-tokens. It logs the plan as one
// structured line and a table. A family that declares no KV cache gets no plan (nil, nil); a device that
// cannot hold one block of every layer is an error wrapping memplan.ErrNoMemory.
func (w *Worker) planMemory(lg *zap.Logger, wts *weights, tp int) (*memory, error) {
	elem := 2
	if k, ok := w.ops.(backend.KVSizer); ok {
		elem = k.KVElementBytes()
	}
	geom, err := memplan.GeometryOf(wts.cfg, tp, elem, w.blockSize())
	if err != nil {
		lg.Warn("no memory plan: requests are not admitted by KV blocks", zap.Error(err))
		return nil, nil
	}
	var total, free int64
	m, device := w.ops.(backend.MemoryReporter)
	if device {
		if free, total, err = m.DeviceMemory(); err != nil {
			return nil, fmt.Errorf("memory plan: device memory: %w", err)
		}
	} else {
		total, free = memInfo()
	}
	in := memplan.Input{Geometry: geom, Weights: wts.held, Total: total, Free: free,
		Utilization: w.cfg.GPUMemoryUtilization, KVTokens: w.cfg.KVCacheTokens, MaxContext: wts.info.MaxPositions}
	if m, ok := wts.cfg.(interface{ StepBytes(tokens, tp int) int64 }); ok {
		in.Activations = m.StepBytes(w.maxStepTokens(), tp)
	}
	p, err := memplan.New(in)
	if err != nil && !device && errors.Is(err, memplan.ErrNoMemory) {
		// The host's memory is shared with everything else on it: too little of it free is no reason to
		// stop serving, but then there is no budget to admit by.
		lg.Warn("no memory plan: the host's memory is too full for a KV cache at --gpu-memory-utilization; requests are not admitted by KV blocks (give --kv-cache-tokens)",
			zap.Error(err))
		return nil, nil
	}
	if err != nil {
		if errors.Is(err, memplan.ErrNoMemory) {
			err = fmt.Errorf("%w (lower the weights with --quantization or a larger TP, or raise --gpu-memory-utilization)", err)
		}
		return nil, fmt.Errorf("memory plan: %w", err)
	}
	lg.Info("memory plan", zap.Int64("weight-bytes", p.Weights), zap.Int64("activation-bytes", p.Activations),
		zap.Int64("budget-bytes", p.Budget), zap.Int64("device-total", total), zap.Int64("device-free", free),
		zap.Int("kv-blocks", p.Blocks), zap.Int("block-size", p.BlockSize), zap.Int64("block-bytes", p.BlockBytes),
		zap.Int64("kv-bytes", p.KV), zap.Int64("token-bytes", p.TokenBytes), zap.Int64("global-token-bytes", p.GlobalTokenBytes),
		zap.Int("kv-tokens", p.Tokens), zap.String("longest-context", p.LongestString()),
		zap.Int("max-context", p.MaxContext), zap.Float64("concurrency", p.Concurrency), zap.Bool("from-kv-cache-tokens", p.FromTokens))
	lg.Info(fmt.Sprintf("memory plan (rank %d of %d):\n%s", wts.key.rank, tp, p.Table()))
	return &memory{plan: p, geom: geom}, nil
}

func (w *Worker) maxStepTokens() int {
	if w.cfg.MaxStepTokens > 0 {
		return w.cfg.MaxStepTokens
	}
	return DefaultMaxStepTokens
}

// reservedLocked is the blocks the sequences held reserve at their capacity, less those of release
// (freed by the same request). runMu is held.
func (w *Worker) reservedLocked(release []uint64) int {
	n := 0
	for _, s := range w.seqs {
		n += s.blocks
	}
	for _, id := range release {
		if s, ok := w.seqs[id]; ok {
			n -= s.blocks
		}
	}
	return n
}

// memoryProto is the plan for StatusResponse.memory; nil without one.
func memoryProto(m *memory, reserved int) *tpfleetv1.MemoryPlan {
	if m == nil {
		return nil
	}
	p := m.plan
	longest := int64(p.Longest)
	if p.Longest == math.MaxInt {
		longest = -1
	}
	windows := make([]int32, len(m.geom.Layers))
	for i, l := range m.geom.Layers {
		windows[i] = int32(l.Window)
	}
	return &tpfleetv1.MemoryPlan{WeightBytes: p.Weights, ActivationBytes: p.Activations, BudgetBytes: p.Budget,
		KvBlocks: int64(p.Blocks), BlockSize: int32(p.BlockSize), BlockBytes: p.BlockBytes, TokenBytes: p.TokenBytes,
		GlobalTokenBytes: p.GlobalTokenBytes, KvTokens: int64(p.Tokens), LongestContext: longest,
		MaxContext: int64(p.MaxContext), Concurrency: p.Concurrency, Windows: windows, KvBlocksReserved: int64(reserved),
		FromTokens: p.FromTokens}
}

// memoryStatus is the served weights' memory plan and the blocks reserved, for the Status RPC.
func (w *Worker) memoryStatus() (*memory, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.memPlan, w.nreserved
}
