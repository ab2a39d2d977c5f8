package coordinator

import (
	"cmp"
	"encoding/json"
	"slices"
	"strings"

	"github.com/tpfleet/tpfleet/cluster"
)

// spec is what a plan places: the model (checkpoint directory), the TP size, the tp_plan (its name, and
// its rules when they came from an operator's file), the weights' quantisation, the most groups
// (replicas, 0: as many as fit) and the members drained out of service.
type spec struct {
	model        string
	tp           int
	planName     string
	planRules    string // cluster.Plan.PlanRules as text, so that spec stays comparable
	quantization string
	group        int
	replicas     int
	drained      string // the drained member IDs, sorted, joined by "\n"
	order        string // cluster.Plan.Order as JSON; "": none
}

// specOf is the spec of plan p.
func specOf(p cluster.Plan) spec {
	return spec{model: p.Model, tp: p.TP, planName: p.PlanName, planRules: string(p.PlanRules), quantization: p.Quantization,
		group: p.QuantizationGroup, replicas: p.Replicas, drained: joinDrained(p.Drained), order: orderText(p.Order)}
}

// orderText is spec.order of o.
func orderText(o *cluster.UnitOrder) string {
	if o == nil {
		return ""
	}
	data, _ := json.Marshal(o) // map keys sorted: equal orders give equal text
	return string(data)
}

// unitOrder decodes s.order; nil when s has none.
func (s spec) unitOrder() *cluster.UnitOrder {
	if s.order == "" {
		return nil
	}
	var o cluster.UnitOrder
	if json.Unmarshal([]byte(s.order), &o) != nil {
		return nil
	}
	return &o
}

// joinDrained is spec.drained of a list of member IDs.
func joinDrained(ids []string) string {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	return strings.Join(slices.Compact(ids), "\n")
}

// drainedIDs lists s's drained members, sorted; nil when none.
func (s spec) drainedIDs() []string {
	if s.drained == "" {
		return nil
	}
	return strings.Split(s.drained, "\n")
}

// sameGroups reports whether the groups of a plan of s can stay as a plan of o has them without moving a
// byte, or at least most: same model, TP and quantisation (the tp_plan may differ: the slices both plans
// split alike stay).
func (s spec) sameGroups(o spec) bool {
	return s.model == o.model && s.tp == o.tp && s.quantization == o.quantization && s.group == o.group
}

// place computes the groups of a plan for members under s, moving as few weights as it can. When keep is a
// plan of the same model, TP and quantisation, each of its groups keeps its ID and each of its undrained,
// registered members its rank: a group whose members all remain stays as it is; a group that lost members
// is completed from free members (those that hold no rank), the groups that keep the most members first;
// a group that cannot be completed gives its members back. Then the remaining free members, sorted by ID,
// (those that held a rank of keep's model first) fill new groups of s.tp consecutive members, numbered with
// the lowest free group IDs; fewer than s.tp left over stay idle. At most s.replicas groups are placed (0: no limit), those of keep first, in the
// order above. Drained members hold no rank. The result has Epoch 0: the caller numbers it.
func place(members []cluster.Member, s spec, keep *cluster.Plan) cluster.Plan {
	p := cluster.Plan{Model: s.model, TP: s.tp, PlanName: s.planName, Quantization: s.quantization,
		QuantizationGroup: s.group, Replicas: s.replicas, Drained: s.drainedIDs(), Groups: []cluster.Group{}}
	if s.planRules != "" {
		p.PlanRules = json.RawMessage(s.planRules)
	}
	p.Order = s.unitOrder()
	if s.tp < 1 {
		return p
	}
	drained := make(map[string]bool)
	for _, id := range s.drainedIDs() {
		drained[id] = true
	}
	byID := make(map[string]cluster.Member, len(members))
	for _, m := range members {
		if !drained[m.ID] {
			byID[m.ID] = m
		}
	}
	full := func() bool { return s.replicas > 0 && len(p.Groups) >= s.replicas }
	used := make(map[string]bool)
	usedGroup := make(map[int]bool)

	// The groups of keep, with the members that remain at their ranks.
	type partial struct {
		g    cluster.Group
		left int // members that remain
	}
	var parts []partial
	if keep != nil && specOf(*keep).sameGroups(s) {
		for _, g := range keep.Groups {
			pg := partial{g: cluster.Group{ID: g.ID, Ranks: make([]cluster.Assignment, s.tp)}}
			for _, a := range g.Ranks {
				if m, ok := byID[a.MemberID]; ok && a.Rank < s.tp {
					pg.g.Ranks[a.Rank] = cluster.Assignment{Rank: a.Rank, MemberID: m.ID, Addr: m.Addr}
					pg.left++
				}
			}
			if pg.left > 0 {
				parts = append(parts, pg)
			}
		}
	}
	// Whole groups first, in ID order, then those that keep more members.
	slices.SortStableFunc(parts, func(a, b partial) int {
		if c := cmp.Compare(b.left, a.left); c != 0 {
			return c
		}
		return cmp.Compare(a.g.ID, b.g.ID)
	})
	for _, pg := range parts {
		for _, a := range pg.g.Ranks {
			if a.MemberID != "" {
				used[a.MemberID] = true
			}
		}
	}
	free := make([]cluster.Member, 0, len(byID))
	for _, m := range members {
		if _, ok := byID[m.ID]; ok && !used[m.ID] {
			free = append(free, m)
		}
	}
	slices.SortFunc(free, func(a, b cluster.Member) int { return cmp.Compare(a.ID, b.ID) })
	for _, pg := range parts {
		missing := s.tp - pg.left
		if full() || missing > len(free) {
			// Its members go back to the free ones, for the new groups.
			for _, a := range pg.g.Ranks {
				if a.MemberID != "" {
					free = append(free, byID[a.MemberID])
				}
			}
			continue
		}
		for r := range pg.g.Ranks {
			if pg.g.Ranks[r].MemberID == "" {
				m := free[0]
				free = free[1:]
				pg.g.Ranks[r] = cluster.Assignment{Rank: r, MemberID: m.ID, Addr: m.Addr}
			}
		}
		p.Groups = append(p.Groups, pg.g)
		usedGroup[pg.g.ID] = true
	}
	// New groups take the members that hold weights of the model first (they keep the tensors both plans
	// hold alike, such as the unsplit ones), then the others, each by ID.
	held := make(map[string]bool)
	if keep != nil && keep.Model == s.model && keep.Quantization == s.quantization && keep.QuantizationGroup == s.group {
		for _, g := range keep.Groups {
			for _, a := range g.Ranks {
				held[a.MemberID] = true
			}
		}
	}
	slices.SortFunc(free, func(a, b cluster.Member) int {
		if held[a.ID] != held[b.ID] {
			if held[a.ID] {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.ID, b.ID)
	})
	nextID := 0
	for len(free) >= s.tp && !full() {
		for usedGroup[nextID] {
			nextID++
		}
		g := cluster.Group{ID: nextID}
		for r, m := range free[:s.tp] {
			g.Ranks = append(g.Ranks, cluster.Assignment{Rank: r, MemberID: m.ID, Addr: m.Addr})
		}
		p.Groups = append(p.Groups, g)
		usedGroup[nextID] = true
		free = free[s.tp:]
	}
	slices.SortFunc(p.Groups, func(a, b cluster.Group) int { return cmp.Compare(a.ID, b.ID) })
	return p
}

// samePlacement reports whether two plans place the same model the same way, epochs aside.
func samePlacement(a, b cluster.Plan) bool {
	if specOf(a) != specOf(b) || len(a.Groups) != len(b.Groups) {
		return false
	}
	for i := range a.Groups {
		if a.Groups[i].ID != b.Groups[i].ID || !slices.Equal(a.Groups[i].Ranks, b.Groups[i].Ranks) {
			return false
		}
	}
	return true
}
