package coordinator

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// ExpertLoad is the cluster's expert load: per MoE layer (decoder layer index), the tokens routed to each
// expert since each group's weights were loaded, summed over the groups of the plan in force.
type ExpertLoad struct {
	Epoch  int64
	Groups int // the groups whose counts are summed (those whose rank 0 answered with counts)
	Layers map[int][]int64
}

// Hottest returns the expert with the most tokens over all layers, its tokens, and the layers' sum per
// expert; -1 when nothing was counted.
func (l ExpertLoad) Hottest() (expert int, tokens int64, perExpert []int64) {
	for _, counts := range l.Layers {
		if len(perExpert) < len(counts) {
			perExpert = append(perExpert, make([]int64, len(counts)-len(perExpert))...)
		}
		for e, c := range counts {
			perExpert[e] += c
		}
	}
	expert = -1
	for e, c := range perExpert {
		if c > tokens {
			expert, tokens = e, c
		}
	}
	return expert, tokens, perExpert
}

// ExpertLoad asks rank 0 of every group of the plan in force for its expert counts (every rank of a
// group routes every token, so rank 0 speaks for its group) and sums them. A group whose rank 0 does not
// answer is left out.
func (c *Coordinator) ExpertLoad(ctx context.Context) (ExpertLoad, error) {
	c.mu.Lock()
	p, leader := c.plan, c.leader
	c.mu.Unlock()
	if !leader {
		return ExpertLoad{}, fmt.Errorf("%w: expert load on the leader", ErrNotLeader)
	}
	out := ExpertLoad{Epoch: p.Epoch, Layers: make(map[int][]int64)}
	for _, g := range p.Groups {
		if len(g.Ranks) == 0 {
			continue
		}
		a := g.Ranks[0]
		conn, err := c.dial(a.Addr)
		if err != nil {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, statusTimeout)
		st, err := pb.NewWorkerClient(conn).Status(sctx, &pb.StatusRequest{})
		cancel()
		_ = conn.Close()
		if err != nil || st.GetEpoch() != p.Epoch || len(st.GetExpertLoad()) == 0 {
			if ctx.Err() != nil {
				return ExpertLoad{}, ctx.Err()
			}
			continue
		}
		out.Groups++
		for _, l := range st.GetExpertLoad() {
			sum := out.Layers[int(l.GetLayer())]
			if len(sum) < len(l.GetTokens()) {
				sum = append(sum, make([]int64, len(l.GetTokens())-len(sum))...)
			}
			for e, n := range l.GetTokens() {
				sum[e] += n
			}
			out.Layers[int(l.GetLayer())] = sum
		}
	}
	return out, nil
}

// expertLoadProto is the API form of l, layers in order.
func expertLoadProto(l ExpertLoad) []*pb.ExpertLoad {
	layers := make([]int, 0, len(l.Layers))
	for i := range l.Layers {
		layers = append(layers, i)
	}
	slices.Sort(layers)
	out := make([]*pb.ExpertLoad, 0, len(layers))
	for _, i := range layers {
		out = append(out, &pb.ExpertLoad{Layer: int32(i), Tokens: l.Layers[i]})
	}
	return out
}

// expertsUnit is the dimension an expert order permutes: the model's experts.
const expertsUnit = "experts"

// balanceExperts places the experts of every counted layer over tp ranks of E/tp slots each (whole experts
// per rank, the ep plan) by their load, as a greedy longest-processing-time split: the most loaded expert
// first, each to the rank with the least load so far among those with a free slot, its current rank
// (under cur; nil: the checkpoint's order) on a tie, then the lowest. An expert that stays on its rank
// keeps its slot, so a rank whose experts do not change reads nothing. It returns the new order (of the
// layers cur or load has) and whether any expert moved.
func balanceExperts(load map[int][]int64, cur *cluster.UnitOrder, tp int) (*cluster.UnitOrder, bool, error) {
	out := &cluster.UnitOrder{Unit: expertsUnit, Layers: make(map[int][]int)}
	if cur != nil {
		for l, ord := range cur.Layers {
			out.Layers[l] = slices.Clone(ord)
		}
	}
	moved := false
	for l, counts := range load {
		n := len(counts)
		if tp < 1 || n%tp != 0 {
			return nil, false, fmt.Errorf("%w: %d experts in layer %d do not divide over %d ranks", ErrInvalidRequest, n, l, tp)
		}
		per := n / tp
		old := out.Layers[l]
		if len(old) != n {
			old = make([]int, n)
			for i := range old {
				old[i] = i
			}
		}
		slotOf := make([]int, n) // expert → its slot now
		for i, e := range old {
			slotOf[e] = i
		}
		experts := make([]int, n)
		for i := range experts {
			experts[i] = i
		}
		slices.SortStableFunc(experts, func(a, b int) int { return -cmp.Compare(counts[a], counts[b]) })
		sum := make([]int64, tp)
		members := make([][]int, tp)
		for _, e := range experts {
			home := slotOf[e] / per
			best := -1
			for r := range tp {
				if len(members[r]) == per {
					continue
				}
				if best < 0 || sum[r] < sum[best] || (sum[r] == sum[best] && r == home && best != home) {
					best = r
				}
			}
			members[best] = append(members[best], e)
			sum[best] += counts[e]
		}
		ord := make([]int, n)
		for i := range ord {
			ord[i] = -1
		}
		for r, es := range members {
			var movers []int
			for _, e := range es {
				if slotOf[e]/per == r {
					ord[slotOf[e]] = e // stays in its slot
				} else {
					movers = append(movers, e)
					moved = true
				}
			}
			for i := r * per; i < (r+1)*per && len(movers) > 0; i++ {
				if ord[i] < 0 {
					ord[i], movers = movers[0], movers[1:]
				}
			}
		}
		out.Layers[l] = ord
	}
	return out, moved, nil
}

// imbalance is the largest ratio, over the layers, of the busiest rank's tokens to the mean rank's when
// each layer's experts lie in order (nil: the checkpoint's) over tp ranks; 1 when perfectly balanced or
// nothing was counted.
func imbalance(load map[int][]int64, order *cluster.UnitOrder, tp int) float64 {
	worst := 1.0
	for l, counts := range load {
		if tp < 1 || len(counts)%tp != 0 {
			continue
		}
		per := len(counts) / tp
		ranks := make([]int64, tp)
		var total int64
		for slot := range counts {
			e := slot
			if order != nil && len(order.Layers[l]) == len(counts) {
				e = order.Layers[l][slot]
			}
			ranks[slot/per] += counts[e]
			total += counts[e]
		}
		if total == 0 {
			continue
		}
		worst = max(worst, float64(slices.Max(ranks))*float64(tp)/float64(total))
	}
	return worst
}

// autoExperts is the automatic expert rebalancing (Config.ExpertsEvery): while this coordinator leads
// under the ep plan, it looks at the expert load every ExpertsEvery and rebalances the experts when a
// layer's busiest rank carries more than ExpertsImbalance times the mean and balancing would move an
// expert. The counts restart with the weights of each new placement. It ends with the coordinator.
func (c *Coordinator) autoExperts() {
	threshold := c.cfg.ExpertsImbalance
	if threshold == 0 {
		threshold = DefaultExpertsImbalance
	}
	t := time.NewTicker(c.cfg.ExpertsEvery)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		s := c.spec()
		c.mu.Lock()
		leader := c.leader
		c.mu.Unlock()
		if !leader || s.planName != "ep" {
			continue
		}
		ctx, cancel := context.WithTimeout(c.ctx, max(c.cfg.ExpertsEvery, time.Minute))
		load, err := c.ExpertLoad(ctx)
		if err != nil || len(load.Layers) == 0 {
			cancel()
			continue
		}
		cur := s.unitOrder()
		_, moved, err := balanceExperts(load.Layers, cur, s.tp)
		if r := imbalance(load.Layers, cur, s.tp); err == nil && moved && r > threshold {
			c.log.Info("rebalancing experts", zap.Float64("imbalance", r), zap.Float64("threshold", threshold))
			if _, err := c.Rebalance(ctx, RebalanceOptions{Replicas: KeepReplicas, Experts: true}); err != nil {
				c.log.Warn("rebalancing experts failed", zap.Error(err))
			}
		}
		cancel()
	}
}
