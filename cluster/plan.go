package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/internal/wait"
)

// Plan is the placement plan: which member holds which rank of which TP group. It is stored as one
// JSON value under plan and replaced as a whole, epoch by epoch, with compare-and-swap.
type Plan struct {
	// Epoch numbers plans from 1; each stored plan's epoch is the previous one's plus one.
	Epoch int64 `json:"epoch"`
	// Model is the checkpoint directory or name.
	Model string `json:"model"`
	// TP is the tensor-parallel size: the number of ranks in every group.
	TP int `json:"tp"`
	// PlanName names the tp_plan: "tp", "ep" or the name in a plan file.
	PlanName string `json:"plan_name"`
	// PlanRules is the plan file's content (HF's JSON form) when PlanName is not one of the model's
	// built-in plans and the plan came from an operator's file: every worker reads the same rules, whether
	// or not it has the file. Empty: PlanName is built in, or a file at that path on every worker.
	PlanRules json.RawMessage `json:"plan_rules,omitempty"`
	// Replicas caps the number of groups; 0 places as many as the undrained members fill.
	Replicas int `json:"replicas,omitempty"`
	// Drained lists members an operator took out of service (rebalance --drain): they stay registered but
	// hold no rank until undrained. Sorted; they may have left the cluster since.
	Drained []string `json:"drained,omitempty"`
	// Quantization is how every rank holds the quantisable weights of a bf16 checkpoint, so that the ranks
	// of a group agree: "" (as stored), "fp8" or "int4" (quant.ParseFormat's names). QuantizationGroup is
	// int4's input columns per scale (0 otherwise). A pre-quantised checkpoint needs neither.
	Quantization      string `json:"quantization,omitempty"`
	QuantizationGroup int    `json:"quantization_group,omitempty"`
	// Order places the units of one dimension per layer (shard.Plan.WithOrder): rebalance --experts
	// places the experts of each MoE layer over the ranks by their load, hot ones replicated in spare
	// slots. Nil: the checkpoint's order.
	Order *UnitOrder `json:"order,omitempty"`
	// Groups are the TP groups (replicas of the model). It may be empty: a plan that places nothing.
	Groups []Group `json:"groups"`
	// Created is when the plan was made; PutPlan sets it to the current time when zero.
	Created time.Time `json:"created"`
}

// UnitOrder places the units of the dimension named Unit ("experts"), per layer: slot i of that dimension
// over a group (slots rank by rank) holds the checkpoint's unit Layers[L][i] in layer L. It names every
// unit at least once; a unit named more than once is replicated (a hot expert on several ranks).
type UnitOrder struct {
	Unit   string        `json:"unit"`
	Layers map[int][]int `json:"layers"`
}

// Group is one TP group: TP ranks that together hold one replica of the model.
type Group struct {
	ID    int          `json:"id"`
	Ranks []Assignment `json:"ranks"` // Ranks[i].Rank == i
}

// Assignment places one rank of a group on a member.
type Assignment struct {
	Rank     int    `json:"rank"`
	MemberID string `json:"member_id"`
	Addr     string `json:"addr"` // the member's gRPC address, host:port
}

// Validate reports a Plan that PutPlan would refuse: epoch below 1, no model, TP below 1, negative
// replicas or more groups than Replicas, a group whose size is not TP, ranks out of order, a duplicate
// group ID, a member placed twice or placed while drained, a missing member ID or address.
func (p Plan) Validate() error {
	switch {
	case p.Epoch < 1:
		return fmt.Errorf("%w: plan: epoch %d, want >= 1", ErrInvalid, p.Epoch)
	case p.Model == "":
		return fmt.Errorf("%w: plan %d: no model", ErrInvalid, p.Epoch)
	case p.TP < 1:
		return fmt.Errorf("%w: plan %d: TP %d, want >= 1", ErrInvalid, p.Epoch, p.TP)
	case p.Replicas < 0:
		return fmt.Errorf("%w: plan %d: replicas %d, want >= 0", ErrInvalid, p.Epoch, p.Replicas)
	case p.Replicas > 0 && len(p.Groups) > p.Replicas:
		return fmt.Errorf("%w: plan %d: %d groups, more than replicas = %d", ErrInvalid, p.Epoch, len(p.Groups), p.Replicas)
	}
	drained := make(map[string]bool, len(p.Drained))
	for _, id := range p.Drained {
		drained[id] = true
	}
	groups := make(map[int]bool, len(p.Groups))
	members := make(map[string]string)
	for gi, g := range p.Groups {
		if g.ID < 0 || groups[g.ID] {
			return fmt.Errorf("%w: plan %d: group %d: ID %d negative or repeated", ErrInvalid, p.Epoch, gi, g.ID)
		}
		groups[g.ID] = true
		if len(g.Ranks) != p.TP {
			return fmt.Errorf("%w: plan %d: group %d has %d ranks, want TP = %d", ErrInvalid, p.Epoch, g.ID, len(g.Ranks), p.TP)
		}
		for i, a := range g.Ranks {
			where := fmt.Sprintf("group %d rank %d", g.ID, i)
			switch {
			case a.Rank != i:
				return fmt.Errorf("%w: plan %d: %s: Rank = %d, want %d", ErrInvalid, p.Epoch, where, a.Rank, i)
			case a.MemberID == "":
				return fmt.Errorf("%w: plan %d: %s: no member", ErrInvalid, p.Epoch, where)
			case a.Addr == "":
				return fmt.Errorf("%w: plan %d: %s: member %s has no address", ErrInvalid, p.Epoch, where, a.MemberID)
			}
			if drained[a.MemberID] {
				return fmt.Errorf("%w: plan %d: %s: member %s is drained", ErrInvalid, p.Epoch, where, a.MemberID)
			}
			if prev, dup := members[a.MemberID]; dup {
				return fmt.Errorf("%w: plan %d: member %s placed twice (%s and %s)", ErrInvalid, p.Epoch, a.MemberID, prev, where)
			}
			members[a.MemberID] = where
		}
	}
	return nil
}

// Plan returns the stored plan, and false when none is stored yet.
func (c *Client) Plan(ctx context.Context) (Plan, bool, error) {
	ctx, cancel := c.bind(ctx)
	defer cancel()
	resp, err := c.cli.Get(ctx, c.key(keyPlan))
	if err != nil {
		return Plan{}, false, fmt.Errorf("cluster: read plan: %w", c.ctxErr(ctx, err))
	}
	if len(resp.Kvs) == 0 {
		return Plan{}, false, nil
	}
	p, err := DecodePlan(resp.Kvs[0].Value)
	if err != nil {
		return Plan{}, false, fmt.Errorf("cluster: plan at %s: %w", c.key(keyPlan), err)
	}
	return p, true, nil
}

// DecodePlan decodes a plan as stored in etcd and checks it (Validate): what anyone who can write to
// etcd puts there is outside input, and a plan that PutPlan would refuse is refused on the way in too.
func DecodePlan(data []byte) (Plan, error) {
	var p Plan
	if err := json.Unmarshal(data, &p); err != nil {
		return Plan{}, fmt.Errorf("%w: decode plan: %v", ErrInvalid, err)
	}
	if err := p.Validate(); err != nil {
		return Plan{}, err
	}
	return p, nil
}

// PutPlan stores p if the stored plan's epoch is prevEpoch (0: no plan stored) and p.Epoch is
// prevEpoch+1. Otherwise it fails with ErrConflict, naming the stored epoch; the caller reads the plan
// again and recomputes. A zero p.Created is set to the current time.
func (c *Client) PutPlan(ctx context.Context, p Plan, prevEpoch int64) error {
	return c.putPlan(ctx, p, prevEpoch, nil)
}

// planGuard is an extra condition of a plan write: a leadership that must still hold.
type planGuard struct {
	key string
	rev int64
}

func (c *Client) putPlan(ctx context.Context, p Plan, prevEpoch int64, guard *planGuard) error {
	if p.Epoch != prevEpoch+1 {
		return fmt.Errorf("%w: plan epoch %d does not follow %d", ErrConflict, p.Epoch, prevEpoch)
	}
	if p.Created.IsZero() {
		p.Created = time.Now().UTC()
	}
	if err := p.Validate(); err != nil {
		return err
	}
	val, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("cluster: put plan %d: %w", p.Epoch, err)
	}
	ctx, cancel := c.bind(ctx)
	defer cancel()
	key := c.key(keyPlan)

	// The epoch lives inside the JSON value, so the swap compares the key's revision: none when
	// prevEpoch is 0, else the revision of the value read here, checked to hold prevEpoch.
	cond := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	if prevEpoch != 0 {
		resp, err := c.cli.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("cluster: put plan %d: %w", p.Epoch, c.ctxErr(ctx, err))
		}
		stored, err := storedEpoch(resp.Kvs)
		if err != nil {
			return fmt.Errorf("cluster: put plan %d: %w", p.Epoch, err)
		}
		if stored != prevEpoch {
			return fmt.Errorf("%w: put plan %d: stored epoch is %d, want %d", ErrConflict, p.Epoch, stored, prevEpoch)
		}
		cond = clientv3.Compare(clientv3.ModRevision(key), "=", resp.Kvs[0].ModRevision)
	}
	conds := []clientv3.Cmp{cond}
	orElse := []clientv3.Op{clientv3.OpGet(key)}
	if guard != nil {
		conds = append(conds, clientv3.Compare(clientv3.CreateRevision(guard.key), "=", guard.rev))
		orElse = append(orElse, clientv3.OpGet(guard.key))
	}
	resp, err := c.cli.Txn(ctx).If(conds...).Then(clientv3.OpPut(key, string(val))).Else(orElse...).Commit()
	if err != nil {
		return fmt.Errorf("cluster: put plan %d: %w", p.Epoch, c.ctxErr(ctx, err))
	}
	if !resp.Succeeded {
		if guard != nil {
			kvs := resp.Responses[1].GetResponseRange().Kvs
			if len(kvs) == 0 || kvs[0].CreateRevision != guard.rev {
				return fmt.Errorf("%w: put plan %d: leader key %s is gone", ErrNotLeader, p.Epoch, guard.key)
			}
		}
		stored, err := storedEpoch(resp.Responses[0].GetResponseRange().Kvs)
		if err != nil {
			return fmt.Errorf("cluster: put plan %d: %w", p.Epoch, err)
		}
		return fmt.Errorf("%w: put plan %d: stored epoch is %d, want %d", ErrConflict, p.Epoch, stored, prevEpoch)
	}
	c.lg.Info("plan stored", zap.Int64("epoch", p.Epoch), zap.Int("tp", p.TP), zap.Int("groups", len(p.Groups)),
		zap.String("model", p.Model), zap.String("plan-name", p.PlanName),
		zap.String("quantization", p.Quantization))
	return nil
}

// storedEpoch decodes the epoch of the plan value in kvs, 0 when there is none.
func storedEpoch(kvs []*mvccpb.KeyValue) (int64, error) {
	if len(kvs) == 0 {
		return 0, nil
	}
	var e struct {
		Epoch int64 `json:"epoch"`
	}
	if err := json.Unmarshal(kvs[0].Value, &e); err != nil {
		return 0, fmt.Errorf("decode stored plan: %w", err)
	}
	return e.Epoch, nil
}

// WatchPlan returns a channel that receives the stored plan first (if any), then every newer epoch, in
// increasing epoch order. The channel is unbuffered and nothing is dropped: while the reader is busy,
// etcd's watch holds the later plans (a reader that falls behind etcd's compaction sees the latest plan
// next, skipping the compacted ones). Plans that do not decode or are not valid (DecodePlan) are logged
// and skipped, as are deletions.
// The channel is closed when ctx ends or the client is closed.
func (c *Client) WatchPlan(ctx context.Context) <-chan Plan {
	out := make(chan Plan)
	key := c.key(keyPlan)
	c.goWatch(ctx, func(ctx context.Context) {
		defer close(out)
		var last int64
		send := func(value []byte) bool {
			p, err := DecodePlan(value)
			if err != nil {
				c.lg.Warn("skipping undecodable or invalid plan", zap.String("key", key), zap.Error(err))
				return true
			}
			if p.Epoch <= last {
				return true
			}
			select {
			case out <- p:
				last = p.Epoch
				return true
			case <-ctx.Done():
				return false
			}
		}
		for ctx.Err() == nil {
			resp, err := c.cli.Get(ctx, key)
			if err != nil {
				if ctx.Err() == nil {
					c.lg.Warn("reading plan failed; retrying", zap.Error(err))
				}
				wait.Sleep(ctx, retryWait)
				continue
			}
			if len(resp.Kvs) > 0 && !send(resp.Kvs[0].Value) {
				return
			}
			wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
			for wr := range c.cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1)) {
				if err := wr.Err(); err != nil {
					if ctx.Err() == nil {
						c.lg.Warn("plan watch failed; reading again", zap.Error(err))
					}
					break
				}
				for _, ev := range wr.Events {
					if ev.Type == clientv3.EventTypePut && !send(ev.Kv.Value) {
						wcancel()
						return
					}
				}
			}
			wcancel()
			wait.Sleep(ctx, retryWait)
		}
	})
	return out
}
