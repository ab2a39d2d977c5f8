package client

import (
	"context"

	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// KeepReplicas is RebalanceRequest.Replicas that keeps the current cap.
const KeepReplicas = -1

// RebalanceRequest is what an operator changes with a rebalance; the zero value of each field keeps what
// it is about, except Replicas, which KeepReplicas keeps (0 lifts the cap).
type RebalanceRequest struct {
	TP int
	// Plan is a built-in tp_plan's name ("tp", "ep"), or with PlanFile (its content) a plan file's name.
	Plan     string
	PlanFile []byte
	Replicas int
	// Drain takes a worker out of service, Undrain puts a drained one back (member IDs).
	Drain, Undrain string
	// DryRun computes the moves and changes nothing; Wait returns once the new epoch serves.
	DryRun, Wait bool
	// Experts places the experts of every MoE layer over the ranks by their load (the ep plan).
	Experts bool
	// RedundantExperts, with Experts, is the number of replica slots a layer for the hottest experts (a
	// multiple of the TP size; 0: experts only move); nil leaves it to the coordinator (the plan's, or one
	// slot a rank for a plan without an expert order).
	RedundantExperts *int
}

// Move is what one worker does in a plan change: its place in the new plan (Group and Rank -1: none) and
// the tensors (its slices of them) it loads, keeps and drops.
type Move struct {
	MemberID         string  `json:"member_id"`
	Group            int     `json:"group"`
	Rank             int     `json:"rank"`
	Drained          bool    `json:"drained"`
	Loaded           int     `json:"loaded"`
	LoadedBytes      int64   `json:"loaded_bytes"`
	Kept             int     `json:"kept"`
	KeptBytes        int64   `json:"kept_bytes"`
	Dropped          int     `json:"dropped"`
	DroppedBytes     int64   `json:"dropped_bytes"`
	EstimatedSeconds float64 `json:"estimated_seconds"`
}

// RebalanceResult is the new plan (with DryRun, the one it would be) and its moves.
type RebalanceResult struct {
	Epoch       int64       `json:"epoch"`
	DryRun      bool        `json:"dry_run"`
	TP          int         `json:"tp"`
	Plan        string      `json:"plan"`
	Replicas    int         `json:"replicas"`
	Drained     []string    `json:"drained"`
	Assignments []Placement `json:"assignments"`
	Moves       []Move      `json:"moves"`
	// PrepareSeconds is how long the workers loaded what they lacked while the old epoch served;
	// SwitchSeconds how long from the new epoch's write until it served (with Wait).
	PrepareSeconds float64 `json:"prepare_seconds"`
	SwitchSeconds  float64 `json:"switch_seconds"`
	// ExpertOrder is, per MoE layer, the expert each slot holds (slots rank by rank); empty: the
	// checkpoint's order.
	ExpertOrder map[int][]int `json:"expert_order,omitempty"`
}

// ExpertLoad is the cluster's expert load: per MoE layer, the tokens routed to each expert (Layers, the
// checkpoint's numbering) and computed by each slot of the group's expert tensors (Slots: slots rank by
// rank, TP ranks, Order[layer][slot] the expert a slot holds, replicas included; no Order: the checkpoint's
// order), summed over Groups TP groups of plan Epoch.
type ExpertLoad struct {
	Epoch  int64           `json:"epoch"`
	Groups int             `json:"groups"`
	TP     int             `json:"tp"`
	Layers map[int][]int64 `json:"layers"`
	Slots  map[int][]int64 `json:"slots,omitempty"`
	Order  map[int][]int   `json:"order,omitempty"`
}

// RankLoad returns the tokens each rank computed in layer l (from Slots), nil when they were not counted.
func (l ExpertLoad) RankLoad(layer int) []int64 {
	slots := l.Slots[layer]
	if l.TP < 1 || len(slots) == 0 || len(slots)%l.TP != 0 {
		return nil
	}
	out := make([]int64, l.TP)
	per := len(slots) / l.TP
	for i, n := range slots {
		out[i/per] += n
	}
	return out
}

// Experts reads the expert load through the coordinator's Admin service.
func (c *Client) Experts(ctx context.Context) (ExpertLoad, error) {
	resp, err := c.admin.Experts(ctx, &pb.ExpertsRequest{})
	if err != nil {
		return ExpertLoad{}, err
	}
	out := ExpertLoad{Epoch: resp.GetEpoch(), Groups: int(resp.GetGroups()), TP: int(resp.GetTp()), Layers: make(map[int][]int64)}
	for _, l := range resp.GetLayers() {
		out.Layers[int(l.GetLayer())] = l.GetTokens()
		if len(l.GetSlotTokens()) > 0 {
			if out.Slots == nil {
				out.Slots = make(map[int][]int64)
			}
			out.Slots[int(l.GetLayer())] = l.GetSlotTokens()
		}
	}
	out.Order = expertOrder(resp.GetExpertOrder())
	return out, nil
}

// RebalanceWith asks the leading coordinator for the plan change req describes.
func (c *Client) RebalanceWith(ctx context.Context, req RebalanceRequest) (RebalanceResult, error) {
	in := &pb.RebalanceRequest{Tp: int32(req.TP), Plan: req.Plan, PlanFile: req.PlanFile, Drain: req.Drain,
		Undrain: req.Undrain, DryRun: req.DryRun, Wait: req.Wait, Experts: req.Experts}
	if req.Replicas != KeepReplicas {
		r := int32(req.Replicas)
		in.Replicas = &r
	}
	if req.RedundantExperts != nil {
		r := int32(*req.RedundantExperts)
		in.RedundantExperts = &r
	}
	resp, err := c.admin.Rebalance(ctx, in)
	if err != nil {
		return RebalanceResult{}, err
	}
	out := RebalanceResult{Epoch: resp.GetEpoch(), DryRun: resp.GetDryRun(), TP: int(resp.GetTp()), Plan: resp.GetPlan(),
		Replicas: int(resp.GetReplicas()), Drained: resp.GetDrained(), PrepareSeconds: resp.GetPrepareSeconds(),
		SwitchSeconds: resp.GetSwitchSeconds(), Assignments: []Placement{}, Moves: []Move{}}
	if out.Drained == nil {
		out.Drained = []string{}
	}
	for _, a := range resp.GetAssignments() {
		out.Assignments = append(out.Assignments, Placement{Group: int(a.GetGroup()), Rank: int(a.GetRank()), MemberID: a.GetMemberId(), Addr: a.GetAddr()})
	}
	out.ExpertOrder = expertOrder(resp.GetExpertOrder())
	for _, m := range resp.GetMoves() {
		out.Moves = append(out.Moves, Move{MemberID: m.GetMemberId(), Group: int(m.GetGroup()), Rank: int(m.GetRank()), Drained: m.GetDrained(),
			Loaded: int(m.GetLoaded()), LoadedBytes: m.GetLoadedBytes(), Kept: int(m.GetKept()), KeptBytes: m.GetKeptBytes(),
			Dropped: int(m.GetDropped()), DroppedBytes: m.GetDroppedBytes(), EstimatedSeconds: m.GetEstimatedSeconds()})
	}
	return out, nil
}

// expertOrder is the Go form of the API's expert order; nil for none.
func expertOrder(layers []*pb.ExpertOrder) map[int][]int {
	if len(layers) == 0 {
		return nil
	}
	out := make(map[int][]int, len(layers))
	for _, o := range layers {
		es := make([]int, len(o.GetExperts()))
		for i, e := range o.GetExperts() {
			es[i] = int(e)
		}
		out[int(o.GetLayer())] = es
	}
	return out
}
