package coordinator

import (
	"cmp"
	"slices"

	"github.com/tpfleet/tpfleet/cluster"
)

// spec is what a plan places: the model (checkpoint directory), the TP size, the tp_plan's name and the
// weights' quantisation.
type spec struct {
	model        string
	tp           int
	planName     string
	quantization string
	group        int
}

// specOf is the spec of plan p.
func specOf(p cluster.Plan) spec {
	return spec{model: p.Model, tp: p.TP, planName: p.PlanName, quantization: p.Quantization, group: p.QuantizationGroup}
}

func (s spec) of(p cluster.Plan) bool { return specOf(p) == s }

// place computes the groups of a plan for members under s. When keep is a plan of the same spec, its
// groups whose members are all still registered at the same addresses stay as they are (same group ID,
// same ranks), so that their workers keep their shards. The remaining members, sorted by ID, fill new
// groups of s.tp consecutive members, numbered with the lowest free group IDs; fewer than s.tp left over
// stay idle. The result has Epoch 0: the caller numbers it.
func place(members []cluster.Member, s spec, keep *cluster.Plan) cluster.Plan {
	p := cluster.Plan{Model: s.model, TP: s.tp, PlanName: s.planName, Quantization: s.quantization,
		QuantizationGroup: s.group, Groups: []cluster.Group{}}
	if s.tp < 1 {
		return p
	}
	byID := make(map[string]cluster.Member, len(members))
	for _, m := range members {
		byID[m.ID] = m
	}
	used := make(map[string]bool)
	usedGroup := make(map[int]bool)
	if keep != nil && s.of(*keep) {
		for _, g := range keep.Groups {
			if !groupAlive(g, byID) {
				continue
			}
			p.Groups = append(p.Groups, cluster.Group{ID: g.ID, Ranks: slices.Clone(g.Ranks)})
			usedGroup[g.ID] = true
			for _, a := range g.Ranks {
				used[a.MemberID] = true
			}
		}
	}
	free := make([]cluster.Member, 0, len(members))
	for _, m := range members {
		if !used[m.ID] {
			free = append(free, m)
		}
	}
	slices.SortFunc(free, func(a, b cluster.Member) int { return cmp.Compare(a.ID, b.ID) })
	nextID := 0
	for len(free) >= s.tp {
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

// groupAlive reports whether every rank of g is a registered member at the address the plan has.
func groupAlive(g cluster.Group, byID map[string]cluster.Member) bool {
	for _, a := range g.Ranks {
		m, ok := byID[a.MemberID]
		if !ok || m.Addr != a.Addr {
			return false
		}
	}
	return true
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
