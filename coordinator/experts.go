package coordinator

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"math"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/cluster"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// ExpertLoad is the cluster's expert load: per MoE layer (decoder layer index), the tokens routed to each
// expert (Layers, the checkpoint's numbering) and computed by each slot of the group's expert tensors
// (Slots: the plan's expert order, replicas included, slots rank by rank), since each group's weights were
// loaded, summed over the groups of the plan in force, whose TP size and expert order (nil: the
// checkpoint's) it also gives.
type ExpertLoad struct {
	Epoch  int64
	Groups int // the groups whose counts are summed (those whose rank 0 answered with counts)
	Layers map[int][]int64
	Slots  map[int][]int64
	TP     int
	Order  *cluster.UnitOrder
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
	out := ExpertLoad{Epoch: p.Epoch, Layers: make(map[int][]int64), Slots: make(map[int][]int64), TP: p.TP, Order: p.Order}
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
			out.Slots[int(l.GetLayer())] = addCounts(out.Slots[int(l.GetLayer())], l.GetSlotTokens())
		}
	}
	return out, nil
}

// metricsExperts is the expert load for a metrics scrape: asked of the workers within statusTimeout; false
// on a standby, an error or nothing counted.
func (c *Coordinator) metricsExperts() (ExpertLoad, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout) // a scrape may come before Start
	defer cancel()
	l, err := c.ExpertLoad(ctx)
	return l, err == nil && len(l.Layers) > 0
}

// addCounts adds b to a elementwise, growing a to b's length.
func addCounts(a, b []int64) []int64 {
	if len(a) < len(b) {
		a = append(a, make([]int64, len(b)-len(a))...)
	}
	for i, n := range b {
		a[i] += n
	}
	return a
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
		out = append(out, &pb.ExpertLoad{Layer: int32(i), Tokens: l.Layers[i], SlotTokens: l.Slots[i]})
	}
	return out
}

// expertsUnit is the dimension an expert order permutes: the model's experts.
const expertsUnit = "experts"

// keepRedundant is balanceExperts' redundant that keeps the number of replica slots of the plan in
// force (0 when it has no expert order).
const keepRedundant = -1

// defaultRedundant is the replica slots a rebalance of the experts gives when not told: the plan's, or one
// slot a rank (s.tp) where it has no expert order yet, none at TP 1.
func defaultRedundant(s spec) int {
	if s.unitOrder() != nil || s.tp < 2 {
		return keepRedundant
	}
	return s.tp
}

// redundantOf returns the replica slots of order: its slots beyond the experts, the same in every layer;
// 0 for nil. A layer with no counts to say the experts' number is skipped.
func redundantOf(order *cluster.UnitOrder, load map[int][]int64) int {
	if order == nil {
		return 0
	}
	for l, ord := range order.Layers {
		if counts, ok := load[l]; ok {
			return max(len(ord)-len(counts), 0)
		}
	}
	return 0
}

// balanceExperts places the experts of every counted layer over tp ranks by their load, as vLLM's and
// SGLang's EPLB do: a layer gets E + redundant slots ((E + redundant)/tp a rank, whole experts, the ep
// plan); the redundant slots hold replicas of the experts with the most tokens per replica (one more at a
// time, at most one replica a rank; the hottest expert always gets one), the slots left over replicas of
// the coldest (whichever split of the spare slots between the two packs best), and an expert's tokens
// split evenly among its replicas (the model spreads them by position). Then every replica, the heaviest (tokens over replicas) first, goes to the
// rank with the least load so far among those with a free slot and no replica of it, one that holds the
// expert now (under cur; nil: the checkpoint's order) on a tie, then the lowest; should that leave a
// replica no rank can take, the layer's replicas are dealt round robin instead. So any expert may move,
// the hottest included, and a hot one gains replicas on other ranks. A rank keeps the slots of the
// experts it holds still when the slot count is unchanged, so a rank whose experts do not change reads
// nothing. redundant < 0 keeps cur's replica count (keepRedundant). It returns the new order (of
// the layers cur or load has) and whether any slot changed; an error (ErrInvalidRequest) when the slots do
// not divide over the ranks or would put two replicas of an expert on one rank.
func balanceExperts(load map[int][]int64, cur *cluster.UnitOrder, tp, redundant int) (*cluster.UnitOrder, bool, error) {
	if redundant < 0 {
		redundant = redundantOf(cur, load)
	}
	out := &cluster.UnitOrder{Unit: expertsUnit, Layers: make(map[int][]int)}
	if cur != nil {
		for l, ord := range cur.Layers {
			out.Layers[l] = slices.Clone(ord)
		}
	}
	moved := false
	for _, l := range slices.Sorted(maps.Keys(load)) {
		counts := load[l]
		n := len(counts)
		if tp < 1 || n%tp != 0 {
			return nil, false, fmt.Errorf("%w: %d experts in layer %d do not divide over %d ranks", ErrInvalidRequest, n, l, tp)
		}
		if redundant%tp != 0 || redundant > n*(tp-1) {
			return nil, false, fmt.Errorf("%w: %d redundant experts: want a multiple of tp=%d, at most %d (a replica of each of the %d experts on every other rank)", ErrInvalidRequest, redundant, tp, n*(tp-1), n)
		}
		old := out.Layers[l]
		if !covers(old, n) {
			old = identity(n)
		}
		ord := placeLayer(counts, old, tp, n+redundant)
		moved = moved || !slices.Equal(ord, old)
		out.Layers[l] = ord
	}
	return out, moved, nil
}

// placeLayer is balanceExperts for one layer: counts per expert, the slots now (old), the new slot count.
func placeLayer(counts []int64, old []int, tp, slots int) []int {
	n, per, oldPer := len(counts), slots/tp, len(old)/tp
	home := make([][]bool, n) // home[e][r]: rank r holds e now
	for e := range home {
		home[e] = make([]bool, tp)
	}
	for slot, e := range old {
		home[e][slot/oldPer] = true
	}
	// The spare slots hold replicas of the hottest experts, k of them, and of the coldest, the rest (they
	// only fill slots): each k is packed and the busiest rank's load decides, more hot replicas on a tie.
	// The hottest expert always gets a replica where there is a spare slot (k >= 1), as EPLB's do: the
	// counts are the past, and the hottest expert is the likeliest to flood one rank next.
	var members [][]int
	busiest := math.Inf(1)
	for k := slots - n; k >= min(1, slots-n); k-- {
		reps := replicas(counts, tp, k, slots-n-k)
		m, load := pack(counts, reps, home, tp, per)
		if load < busiest {
			members, busiest = m, load
		}
	}
	if len(old) == slots && slices.Max(rankLoad(counts, old, tp)) <= busiest {
		return slices.Clone(old) // no better than now: move nothing
	}
	// Slots: with the slot count unchanged, an expert that stays on its rank keeps its slot; a rank lists
	// the experts it kept in their old order, then those it gains.
	ord := make([]int, slots)
	for i := range ord {
		ord[i] = -1
	}
	for r, es := range members {
		var kept, gained []int
		for _, e := range es {
			if home[e][r] {
				kept = append(kept, e)
			} else {
				gained = append(gained, e)
			}
		}
		var ranked []int
		for slot, e := range old {
			if slot/oldPer == r && slices.Contains(kept, e) && !slices.Contains(ranked, e) {
				ranked = append(ranked, e)
				if oldPer == per {
					ord[slot] = e
				}
			}
		}
		fill := gained
		if oldPer != per {
			fill = append(ranked, gained...)
		}
		for i := r * per; i < (r+1)*per && len(fill) > 0; i++ {
			if ord[i] < 0 {
				ord[i], fill = fill[0], fill[1:]
			}
		}
	}
	return ord
}

// replicas returns each expert's replica count: one each, then hot more, one at a time, to the expert
// with the most tokens per replica, and cold more to the expert with the fewest tokens per replica (the
// lowest expert on a tie), none beyond tp.
func replicas(counts []int64, tp, hot, cold int) []int {
	reps := make([]int, len(counts))
	for e := range reps {
		reps[e] = 1
	}
	add := func(hotter bool) {
		best := -1
		for e := range counts {
			if reps[e] >= tp {
				continue
			}
			if best < 0 {
				best = e
				continue
			}
			// counts[e]/reps[e] against counts[best]/reps[best], without division.
			a, b := counts[e]*int64(reps[best]), counts[best]*int64(reps[e])
			if (hotter && a > b) || (!hotter && a < b) {
				best = e
			}
		}
		reps[best]++
	}
	for range hot {
		add(true)
	}
	for range cold {
		add(false)
	}
	return reps
}

// pack places every replica, the heaviest (tokens over replicas; more replicas first on a tie) first, on
// the rank with the least load so far among those with a free slot of per and no replica of its expert,
// one that holds the expert now (home) on a tie, then the lowest; should that leave a replica no rank can
// take, the replicas are dealt round robin instead. It returns each rank's experts and the busiest rank's
// load.
func pack(counts []int64, reps []int, home [][]bool, tp, per int) ([][]int, float64) {
	weight := func(e int) float64 { return float64(counts[e]) / float64(reps[e]) }
	type replica struct{ e, j int }
	var items []replica
	for e := range counts {
		for j := range reps[e] {
			items = append(items, replica{e, j})
		}
	}
	slices.SortStableFunc(items, func(a, b replica) int {
		if c := cmp.Compare(weight(b.e), weight(a.e)); c != 0 {
			return c
		}
		return cmp.Compare(reps[b.e], reps[a.e]) // more replicas first: they need more distinct ranks
	})
	sum := make([]float64, tp)
	members := make([][]int, tp)
	for _, it := range items {
		best := -1
		for r := range tp {
			if len(members[r]) == per || slices.Contains(members[r], it.e) {
				continue
			}
			if best < 0 || sum[r] < sum[best] || (sum[r] == sum[best] && home[it.e][r] && !home[it.e][best]) {
				best = r
			}
		}
		if best < 0 { // the greedy cornered itself: deal the replicas round robin, which always fits
			members = roundRobin(reps, tp)
			clear(sum)
			for r, es := range members {
				for _, e := range es {
					sum[r] += weight(e)
				}
			}
			break
		}
		members[best] = append(members[best], it.e)
		sum[best] += weight(it.e)
	}
	return members, slices.Max(sum)
}

// roundRobin deals each expert's replicas to consecutive ranks, experts in order: replica k of the lot to
// rank k mod tp, so an expert's (at most tp) replicas land on distinct ranks and every rank gets as many.
func roundRobin(reps []int, tp int) [][]int {
	members := make([][]int, tp)
	k := 0
	for e, n := range reps {
		for range n {
			members[k%tp] = append(members[k%tp], e)
			k++
		}
	}
	return members
}

// covers reports whether ord names every expert of [0, n) at least once and nothing else.
func covers(ord []int, n int) bool {
	if len(ord) < n {
		return false
	}
	seen := make([]bool, n)
	left := n
	for _, e := range ord {
		if e < 0 || e >= n {
			return false
		}
		if !seen[e] {
			seen[e] = true
			left--
		}
	}
	return left == 0
}

func identity(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// rankLoad returns the tokens each of tp ranks computes when a layer's experts lie in ord (slots rank by
// rank; nil or foreign: the checkpoint's order) and an expert's tokens split evenly among its replicas.
func rankLoad(counts []int64, ord []int, tp int) []float64 {
	if !covers(ord, len(counts)) || len(ord)%tp != 0 {
		ord = identity(len(counts))
	}
	reps := make([]int, len(counts))
	for _, e := range ord {
		reps[e]++
	}
	per := len(ord) / tp
	ranks := make([]float64, tp)
	for slot, e := range ord {
		ranks[slot/per] += float64(counts[e]) / float64(reps[e])
	}
	return ranks
}

// imbalance is the largest ratio, over the layers, of the busiest rank's tokens to the mean rank's when
// each layer's experts lie in order (nil: the checkpoint's) over tp ranks, an expert's tokens split evenly
// among its replicas; 1 when perfectly balanced or nothing was counted.
func imbalance(load map[int][]int64, order *cluster.UnitOrder, tp int) float64 {
	worst := 1.0
	for l, counts := range load {
		if tp < 1 || len(counts)%tp != 0 {
			continue
		}
		var ord []int
		if order != nil {
			ord = order.Layers[l]
		}
		ranks := rankLoad(counts, ord, tp)
		var total float64
		for _, c := range ranks {
			total += c
		}
		if total == 0 {
			continue
		}
		worst = max(worst, slices.Max(ranks)*float64(tp)/total)
	}
	return worst
}

// expertsDecision is the automatic mode's choice (Config.ExpertsEvery): rebalance the experts when a
// layer's busiest rank carries more than threshold times the mean under cur and balancing with redundant
// replica slots (keepRedundant: cur's) lowers that. It returns the imbalance now and after.
func expertsDecision(load map[int][]int64, cur *cluster.UnitOrder, tp, redundant int, threshold float64) (act bool, now, after float64) {
	now = imbalance(load, cur, tp)
	if now <= threshold {
		return false, now, now
	}
	ord, moved, err := balanceExperts(load, cur, tp, redundant)
	if err != nil || !moved {
		return false, now, now
	}
	after = imbalance(load, ord, tp)
	return after < now, now, after
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
		if act, now, after := expertsDecision(load.Layers, s.unitOrder(), s.tp, defaultRedundant(s), threshold); act {
			c.log.Info("rebalancing experts", zap.Float64("imbalance", now), zap.Float64("imbalance-after", after), zap.Float64("threshold", threshold))
			if _, err := c.Rebalance(ctx, RebalanceOptions{Replicas: KeepReplicas, Experts: true}); err != nil {
				c.log.Warn("rebalancing experts failed", zap.Error(err))
			}
		}
		cancel()
	}
}
