package coordinator

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/safetensors"
	"github.com/tpfleet/tpfleet/shard"
)

// DefaultLoadBandwidth is the read rate, in bytes a second, that a rebalance's time estimates assume of a
// worker loading tensors it lacks (page cache or a local NVMe disk; the estimate is only as good as it).
const DefaultLoadBandwidth = 1 << 30

// WorkerMove is one worker's part of a plan change: its rank in the new plan and the tensors (manifest
// entries: this rank's slice of a tensor) it reads, keeps and drops to get there. A worker keeps an entry
// when the old plan gave it the same bytes of the same tensor (shard.TensorShard.Key), whatever the
// group, rank or tp_plan.
type WorkerMove struct {
	MemberID string `json:"member_id"`
	// Group and Rank place the worker in the new plan; both -1 when it holds no rank (idle or drained).
	Group   int  `json:"group"`
	Rank    int  `json:"rank"`
	Drained bool `json:"drained,omitempty"`
	shard.Moves
	// Estimate is LoadedBytes at the load bandwidth.
	Estimate time.Duration `json:"estimate"`
}

// PlanMoves returns what every worker loads, keeps and drops when the cluster goes from plan from (Epoch
// 0 and no groups: nothing is held) to plan to: one WorkerMove per member placed in either plan, drained
// in to, or listed in others (idle members), sorted by member ID. The checkpoint is read at dir (to's
// Model when empty): its config and safetensors headers only. bandwidth is the estimate's read rate in
// bytes a second (0: DefaultLoadBandwidth). A worker keeps nothing of from's weights when from places
// another model or quantisation (its drops are counted only for another quantisation of the same model).
func PlanMoves(dir string, from, to cluster.Plan, others []string, bandwidth float64) ([]WorkerMove, error) {
	if dir == "" {
		dir = to.Model
	}
	if bandwidth <= 0 {
		bandwidth = DefaultLoadBandwidth
	}
	cfg, err := model.LoadConfig(dir)
	if err != nil {
		return nil, fmt.Errorf("plan moves: %w", err)
	}
	ckpt, err := safetensors.OpenCheckpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("plan moves: %w", err)
	}
	defer ckpt.Close()
	view, err := shard.NewView(cfg, ckpt)
	if err != nil {
		return nil, fmt.Errorf("plan moves: %w", err)
	}
	type rankKey struct {
		name, rules, order string
		tp, rank           int
	}
	manifests := make(map[rankKey]*shard.Manifest)
	manifest := func(p cluster.Plan, rank int) (*shard.Manifest, error) {
		k := rankKey{p.PlanName, string(p.PlanRules), orderText(p.Order), p.TP, rank}
		if m, ok := manifests[k]; ok {
			return m, nil
		}
		plan, err := shard.PlanOf(cfg, p.PlanName, p.PlanRules)
		if err != nil {
			return nil, err
		}
		if p.Order != nil {
			plan = plan.WithOrder(p.Order.Unit, p.Order.Layers)
		}
		m, err := shard.NewManifest(cfg, view, plan, p.TP, rank)
		if err != nil {
			return nil, fmt.Errorf("plan %q at TP %d: %w", p.PlanName, p.TP, err)
		}
		manifests[k] = &m
		return &m, nil
	}
	sameWeights := from.Model == to.Model && from.Quantization == to.Quantization && from.QuantizationGroup == to.QuantizationGroup
	type place struct{ group, rank int }
	rankIn := func(p cluster.Plan) map[string]place {
		out := make(map[string]place)
		for _, g := range p.Groups {
			for _, a := range g.Ranks {
				out[a.MemberID] = place{g.ID, a.Rank}
			}
		}
		return out
	}
	before, after := rankIn(from), rankIn(to)
	ids := slices.Concat(others, to.Drained)
	for id := range before {
		ids = append(ids, id)
	}
	for id := range after {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	drained := make(map[string]bool)
	for _, id := range to.Drained {
		drained[id] = true
	}
	out := make([]WorkerMove, 0, len(ids))
	for _, id := range ids {
		mv := WorkerMove{MemberID: id, Group: -1, Rank: -1, Drained: drained[id]}
		var old, cur *shard.Manifest
		if pl, ok := before[id]; ok && sameWeights {
			if old, err = manifest(from, pl.rank); err != nil {
				return nil, fmt.Errorf("plan moves: the old plan: %w", err)
			}
		}
		if pl, ok := after[id]; ok {
			mv.Group, mv.Rank = pl.group, pl.rank
			if cur, err = manifest(to, pl.rank); err != nil {
				return nil, fmt.Errorf("plan moves: %w", err)
			}
		}
		mv.Moves = shard.Diff(old, cur)
		if pl, ok := before[id]; ok && !sameWeights && from.Model == to.Model {
			// Everything held in the other format goes.
			if m, err := manifest(from, pl.rank); err == nil {
				mv.Dropped, mv.DroppedBytes = len(m.Tensors), m.Bytes
			}
		}
		mv.Estimate = time.Duration(float64(mv.LoadedBytes) / bandwidth * float64(time.Second))
		out = append(out, mv)
	}
	slices.SortFunc(out, func(a, b WorkerMove) int { return cmp.Compare(a.MemberID, b.MemberID) })
	return out, nil
}
