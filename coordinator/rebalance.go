package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/internal/wait"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// KeepReplicas is RebalanceOptions.Replicas that keeps the current cap.
const KeepReplicas = -1

// RebalanceOptions is what an operator changes with a rebalance; the zero value of each field keeps what
// it is about as it is.
type RebalanceOptions struct {
	// TP is the new TP size; 0 keeps it.
	TP int
	// Plan is the new tp_plan: a built-in name ("tp", "ep"), or with PlanFile the name of the file the
	// rules came from; "" keeps it. PlanFile is the file's content (HF's JSON form), which the plan then
	// carries to every worker.
	Plan     string
	PlanFile []byte
	// Replicas caps the number of TP groups (0: no cap); KeepReplicas keeps the cap.
	Replicas int
	// Drain takes a member out of service; Undrain puts a drained one back. "": none.
	Drain, Undrain string
	// DryRun computes the plan and its moves and changes nothing.
	DryRun bool
	// Wait returns only once every group of the new epoch serves (or ctx ends).
	Wait bool
	// Experts places the experts of every MoE layer over the ranks by their load (ExpertLoad), under the
	// ep plan: the most loaded experts go to different ranks, and get replicas in RedundantExperts extra
	// slots a layer (see balanceExperts).
	Experts bool
	// RedundantExperts, when set, is the number of replica slots a layer that Experts fills (a multiple
	// of the TP size; 0: experts only move); nil keeps the plan's, or, where the plan has no expert order
	// yet, one a rank (the TP size; none at TP 1). It needs Experts.
	RedundantExperts *int

	load *ExpertLoad // the load Experts balances, read before the leader computes the plan
}

// RebalanceResult is a rebalance's plan and what it moves.
type RebalanceResult struct {
	// Epoch is the new epoch (with DryRun, the one it would be).
	Epoch  int64
	DryRun bool
	Plan   cluster.Plan
	Moves  []WorkerMove
	// Prepare is how long the workers took to load what they lacked while the old epoch served; Switch is
	// how long from writing the epoch until every group served (with Wait).
	Prepare, Switch time.Duration
}

// rebalanceReq asks the leadership loop for a rebalance's plan: computed only, or written (commit).
type rebalanceReq struct {
	opts   RebalanceOptions
	commit bool
	reply  chan rebalanceReply // buffer 1
}

type rebalanceReply struct {
	res RebalanceResult
	err error
}

// adopt takes over what a stored plan says of the operator's choices that are not flags: its replicas cap
// and drained members (so that a new leader keeps a drain), and, for the same TP and tp_plan, the plan
// file's rules and the expert order.
func (c *Coordinator) adopt(p cluster.Plan) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.replicas, c.drained = p.Replicas, slices.Clone(p.Drained)
	if p.Model == c.model.dir && p.TP == c.tp && len(p.PlanRules) > 0 {
		c.planName, c.planRules = p.PlanName, slices.Clone(p.PlanRules)
	}
	if p.Model == c.model.dir && p.TP == c.tp && p.PlanName == c.planName {
		c.order = orderText(p.Order)
	}
}

// Rebalance changes the plan as opts say and writes it as the next epoch, moving as few weights as it can
// (see place): first every worker of the new plan loads, beside the weights it serves with, the tensors it
// lacks (Prepare), while the current epoch serves; then the epoch is written and the groups switch, each
// worker taking over what it prepared and dropping what it no longer needs. A command that cannot be
// carried out (a TP size or tp_plan the model cannot be split by, an unknown or last worker to drain, a
// plan file that does not parse, a worker that fails to prepare) fails with ErrInvalidRequest (or the
// cause) and leaves the plan as it is. Only the leader rebalances: a standby fails with ErrNotLeader.
func (c *Coordinator) Rebalance(ctx context.Context, opts RebalanceOptions) (RebalanceResult, error) {
	switch {
	case opts.TP < 0:
		return RebalanceResult{}, invalid("tp %d must be >= 0", opts.TP)
	case opts.Replicas < KeepReplicas:
		return RebalanceResult{}, invalid("replicas %d must be >= 0", opts.Replicas)
	case opts.Drain != "" && opts.Drain == opts.Undrain:
		return RebalanceResult{}, invalid("drain and undrain of the same worker %s", opts.Drain)
	case len(opts.PlanFile) > 0 && opts.Plan == "":
		return RebalanceResult{}, invalid("a plan file needs a plan name")
	case opts.RedundantExperts != nil && *opts.RedundantExperts < 0:
		return RebalanceResult{}, invalid("redundant experts %d must be >= 0", *opts.RedundantExperts)
	case opts.RedundantExperts != nil && !opts.Experts:
		return RebalanceResult{}, invalid("redundant experts without --experts: replicas are placed by the expert load")
	}
	if opts.Experts {
		load, err := c.ExpertLoad(ctx)
		if err != nil {
			return RebalanceResult{}, err
		}
		if len(load.Layers) == 0 {
			return RebalanceResult{}, invalid("--experts: no expert load counted yet (serve some requests first; a backend that routes on the device does not count); the plan is unchanged")
		}
		opts.load = &load
	}
	res, err := c.askLeader(ctx, rebalanceReq{opts: opts})
	if err != nil || opts.DryRun {
		res.DryRun = opts.DryRun
		return res, err
	}
	start := time.Now()
	if err := c.prepare(ctx, res.Plan, res.Moves); err != nil {
		return RebalanceResult{}, err
	}
	prepared := time.Since(start)
	res, err = c.askLeader(ctx, rebalanceReq{opts: opts, commit: true})
	if err != nil {
		return RebalanceResult{}, err
	}
	res.Prepare = prepared
	if opts.Wait {
		start := time.Now()
		if err := c.waitEpoch(ctx, res.Epoch); err != nil {
			return res, err
		}
		res.Switch = time.Since(start)
	}
	return res, nil
}

// askLeader hands req to the leadership loop and returns its answer.
func (c *Coordinator) askLeader(ctx context.Context, req rebalanceReq) (RebalanceResult, error) {
	c.mu.Lock()
	leader := c.leader
	c.mu.Unlock()
	if !leader {
		return RebalanceResult{}, fmt.Errorf("%w: rebalance on the leader", ErrNotLeader)
	}
	req.reply = make(chan rebalanceReply, 1)
	select {
	case c.rebalanceReqs <- req:
	case <-ctx.Done():
		return RebalanceResult{}, ctx.Err()
	case <-c.ctx.Done():
		return RebalanceResult{}, ErrClosed
	}
	select {
	case r := <-req.reply:
		return r.res, r.err
	case <-ctx.Done():
		return RebalanceResult{}, ctx.Err()
	}
}

// prepare has every worker of plan p that must load something (moves) load it now, all at once, and
// waits for them.
func (c *Coordinator) prepare(ctx context.Context, p cluster.Plan, moves []WorkerMove) error {
	loads := make(map[string]bool)
	for _, m := range moves {
		loads[m.MemberID] = m.Loaded > 0
	}
	data, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("coordinator: prepare: %w", err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 0)
	var mu sync.Mutex
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			if !loads[a.MemberID] {
				continue
			}
			wg.Go(func() {
				err := c.prepareOne(ctx, a, data)
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("worker %s (group %d rank %d at %s): %w", a.MemberID, g.ID, a.Rank, a.Addr, err))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if len(errs) > 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: prepare the new plan; the plan is unchanged: %w", ErrStepFailed, errors.Join(errs...))
	}
	return nil
}

// prepareOne calls one worker's Prepare.
func (c *Coordinator) prepareOne(ctx context.Context, a cluster.Assignment, plan []byte) error {
	conn, err := c.dial(a.Addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	start := time.Now()
	resp, err := pb.NewWorkerClient(conn).Prepare(ctx, &pb.PrepareRequest{Plan: plan})
	if status.Code(err) == codes.Unimplemented {
		c.log.Info("worker cannot prepare; it loads at the switch", zap.String("member-id", a.MemberID))
		return nil
	}
	if err != nil {
		return ctxErr(ctx, err)
	}
	c.log.Info("worker prepared", zap.String("member-id", a.MemberID), zap.Int32("loaded", resp.GetLoaded()),
		zap.Int64("loaded-bytes", resp.GetLoadedBytes()), zap.Int32("kept", resp.GetKept()), zap.Int64("kept-bytes", resp.GetKeptBytes()),
		zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return nil
}

// waitEpoch waits until every group of epoch serves; it fails when a newer epoch replaces it first.
func (c *Coordinator) waitEpoch(ctx context.Context, epoch int64) error {
	for {
		c.mu.Lock()
		cur, ready, groups := c.plan.Epoch, len(c.readyGroups), len(c.plan.Groups)
		c.mu.Unlock()
		switch {
		case cur == epoch && ready == groups:
			return nil
		case cur > epoch:
			return fmt.Errorf("%w: epoch %d was replaced by epoch %d before it served", ErrNoPlan, epoch, cur)
		}
		if !wait.Sleep(ctx, 20*time.Millisecond) {
			return ctx.Err()
		}
	}
}

// rebalance computes the plan req asks for from the members and the stored plan, and its moves; with
// req.commit it makes the request's choices the leader's and writes the plan as the next epoch.
func (ld *leader) rebalance(req rebalanceReq) (RebalanceResult, error) {
	c := ld.c
	s, err := ld.rebalanceSpec(req.opts)
	if err != nil {
		return RebalanceResult{}, err
	}
	var keep *cluster.Plan
	if ld.plan.Epoch > 0 {
		keep = &ld.plan
	}
	live := ld.live()
	want := place(live, s, keep)
	if len(want.Groups) == 0 {
		n := 0
		for _, m := range live {
			if !slices.Contains(s.drainedIDs(), m.ID) {
				n++
			}
		}
		what := "the plan"
		if req.opts.Drain != "" {
			what = "draining " + req.opts.Drain
		}
		return RebalanceResult{}, invalid("%s would place no TP group: %d undrained live worker(s) for TP %d; the plan is unchanged", what, n, s.tp)
	}
	var idle []string
	for _, m := range live {
		idle = append(idle, m.ID)
	}
	moves, err := PlanMoves(c.model.dir, ld.plan, want, idle, c.cfg.LoadBandwidth)
	if err != nil {
		return RebalanceResult{}, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	if !req.commit {
		want.Epoch = ld.plan.Epoch + 1
		return RebalanceResult{Epoch: want.Epoch, Plan: want, Moves: moves}, nil
	}
	c.mu.Lock()
	c.tp, c.planName, c.planRules, c.replicas, c.drained, c.order = s.tp, s.planName, []byte(s.planRules), s.replicas, s.drainedIDs(), s.order
	c.mu.Unlock()
	for range 5 {
		err := ld.put(place(ld.live(), s, keep))
		if errors.Is(err, cluster.ErrConflict) {
			if p, ok, err := c.cl.Plan(ld.ctx); err == nil && ok {
				ld.plan = p
				keep = &ld.plan
			}
			continue
		}
		if err != nil {
			return RebalanceResult{}, err
		}
		ld.log.Info("rebalanced", zap.Int64("epoch", ld.plan.Epoch), zap.Int("tp", s.tp), zap.String("plan", s.planName),
			zap.Int("replicas", s.replicas), zap.Strings("drained", s.drainedIDs()))
		return RebalanceResult{Epoch: ld.plan.Epoch, Plan: ld.plan, Moves: moves}, nil
	}
	return RebalanceResult{}, fmt.Errorf("coordinator: rebalance: %w five times in a row", cluster.ErrConflict)
}

// rebalanceSpec is the spec the leader would place with opts applied, checked: the model must split at the
// TP size under the tp_plan, a worker to drain must be registered (or already drained) and one to undrain
// drained.
func (ld *leader) rebalanceSpec(opts RebalanceOptions) (spec, error) {
	c := ld.c
	s := c.spec()
	if opts.TP > 0 {
		s.tp = opts.TP
	}
	if opts.Plan != "" {
		s.planName, s.planRules = opts.Plan, string(opts.PlanFile)
	}
	if opts.Replicas != KeepReplicas {
		s.replicas = opts.Replicas
	}
	if opts.TP > 0 || opts.Plan != "" {
		if err := checkTP(c.model, s.planName, []byte(s.planRules), s.tp); err != nil {
			return spec{}, fmt.Errorf("%w: %w; the plan is unchanged", ErrInvalidRequest, err)
		}
	}
	if opts.TP > 0 || opts.Plan != "" {
		s.order = "" // an order balanced for other ranks, or a plan that cannot hold one
	}
	if opts.Experts {
		if s.planName != "ep" {
			return spec{}, invalid("--experts places whole experts per rank: it needs the ep plan (--plan ep), not %q; the plan is unchanged", s.planName)
		}
		redundant := defaultRedundant(s)
		if opts.RedundantExperts != nil {
			redundant = *opts.RedundantExperts
		}
		ord, _, err := balanceExperts(opts.load.Layers, s.unitOrder(), s.tp, redundant)
		if err != nil {
			return spec{}, fmt.Errorf("%w; the plan is unchanged", err)
		}
		s.order = orderText(ord)
	}
	drained := s.drainedIDs()
	if id := opts.Drain; id != "" {
		known := slices.Contains(drained, id) || slices.ContainsFunc(ld.members, func(m cluster.Member) bool { return m.ID == id })
		if !known {
			return spec{}, invalid("drain %s: no such worker (see tpfleet cluster members); the plan is unchanged", id)
		}
		drained = append(drained, id)
	}
	if id := opts.Undrain; id != "" {
		if !slices.Contains(drained, id) {
			return spec{}, invalid("undrain %s: the worker is not drained (drained: %v); the plan is unchanged", id, drained)
		}
		drained = slices.DeleteFunc(drained, func(d string) bool { return d == id })
	}
	s.drained = joinDrained(drained)
	return s, nil
}
