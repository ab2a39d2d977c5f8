package coordinator

import (
	"fmt"
	"strings"
	"testing"

	"github.com/tpfleet/tpfleet/cluster"
)

// members makes members with the given IDs at addresses "<id>:1".
func members(ids ...string) []cluster.Member {
	ms := make([]cluster.Member, len(ids))
	for i, id := range ids {
		ms[i] = cluster.Member{ID: id, Addr: id + ":1"}
	}
	return ms
}

// groups writes a plan's groups as "0:a,b 1:c,d".
func groups(p cluster.Plan) string {
	var out []string
	for _, g := range p.Groups {
		var ids []string
		for _, a := range g.Ranks {
			ids = append(ids, a.MemberID)
		}
		out = append(out, fmt.Sprintf("%d:%s", g.ID, strings.Join(ids, ",")))
	}
	return strings.Join(out, " ")
}

// planOf parses groups written as "0:a,b 1:c,d" into a plan of spec s.
func planOf(s spec, epoch int64, text string) cluster.Plan {
	p := cluster.Plan{Epoch: epoch, Model: s.model, TP: s.tp, PlanName: s.planName}
	for _, g := range strings.Fields(text) {
		var id int
		var list string
		if _, err := fmt.Sscanf(strings.Replace(g, ":", " ", 1), "%d %s", &id, &list); err != nil {
			panic(err)
		}
		grp := cluster.Group{ID: id}
		for r, m := range strings.Split(list, ",") {
			grp.Ranks = append(grp.Ranks, cluster.Assignment{Rank: r, MemberID: m, Addr: m + ":1"})
		}
		p.Groups = append(p.Groups, grp)
	}
	return p
}

var tp2 = spec{model: "/m/scout", tp: 2, planName: "tp"}

var placeTests = []struct {
	name    string
	members []cluster.Member
	s       spec
	keep    string // groups of the previous plan, of spec tp2 ("": none)
	want    string
}{
	{"no members", nil, tp2, "", ""},
	{"too few for a group", members("a"), tp2, "", ""},
	{"one group", members("a", "b"), tp2, "", "0:a,b"},
	{"sorted by id", members("b", "a"), tp2, "", "0:a,b"},
	{"replicas and an idle member", members("e", "d", "c", "b", "a"), tp2, "", "0:a,b 1:c,d"},
	{"tp 1: one group each", members("a", "b", "c"), spec{model: "/m", tp: 1, planName: "tp"}, "", "0:a 1:b 2:c"},
	{"tp 4", members("a", "b", "c", "d", "e", "f", "g", "h"), spec{model: "/m", tp: 4, planName: "ep"}, "", "0:a,b,c,d 1:e,f,g,h"},
	{"resume: same members", members("a", "b", "c"), tp2, "0:a,b", "0:a,b"},
	{"resume keeps a group whatever the member order", members("a", "b", "c"), tp2, "0:b,c", "0:b,c"},
	{"a new member forms a second group", members("a", "b", "c", "d"), tp2, "0:c,d", "0:c,d 1:a,b"},
	{"a member of a group left: its partner idles", members("a", "c", "d"), tp2, "0:a,b 1:c,d", "1:c,d"},
	{"a member left, another joined: lowest free group id", members("a", "b", "c", "e", "f", "g"), tp2, "0:a,b 1:c,d 2:e,f", "0:a,b 1:c,g 2:e,f"},
	{"another TP: replace everything", members("a", "b", "c", "d"), spec{model: "/m/scout", tp: 4, planName: "tp"}, "0:a,b 1:c,d", "0:a,b,c,d"},
	{"another model: replace everything", members("a", "b", "c", "d"), spec{model: "/m/maverick", tp: 2, planName: "tp"}, "0:c,d", "0:a,b 1:c,d"},
	{"tp to ep: the groups stay", members("a", "b", "c", "d"), spec{model: "/m/scout", tp: 2, planName: "ep"}, "0:b,a 1:c,d", "0:b,a 1:c,d"},
	{"drain a member: a free one takes its rank", members("a", "b", "c"), spec{model: "/m/scout", tp: 2, planName: "tp", drained: "a"}, "0:a,b", "0:c,b"},
	{"drain a member: its group gives way to a whole one", members("a", "b", "c", "d", "e"), spec{model: "/m/scout", tp: 2, planName: "tp", drained: "b"}, "0:a,b 1:c,d", "0:a,e 1:c,d"},
	{"drain the only spare", members("a", "b", "c"), spec{model: "/m/scout", tp: 2, planName: "tp", drained: "c"}, "0:a,b", "0:a,b"},
	{"drain leaves too few", members("a", "b"), spec{model: "/m/scout", tp: 2, planName: "tp", drained: "b"}, "0:a,b", ""},
	{"one replica of two", members("a", "b", "c", "d"), spec{model: "/m/scout", tp: 2, planName: "tp", replicas: 1}, "0:c,d 1:a,b", "0:c,d"},
	{"two replicas of one", members("a", "b", "c", "d"), spec{model: "/m/scout", tp: 2, planName: "tp", replicas: 2}, "1:c,d", "0:a,b 1:c,d"},
	{"tp 2 to 1 with one replica: a holder first", members("a", "b", "c"), spec{model: "/m/scout", tp: 1, planName: "tp", replicas: 1}, "0:c,b", "0:b"},
	{"another quantization: replace everything", members("a", "b", "c", "d"), spec{model: "/m/scout", tp: 2, planName: "tp", quantization: "int4", group: 128}, "0:c,d", "0:a,b 1:c,d"},
}

func TestPlace(t *testing.T) {
	for _, tc := range placeTests {
		t.Run(tc.name, func(t *testing.T) {
			var keep *cluster.Plan
			if tc.keep != "" {
				k := planOf(tp2, 3, tc.keep)
				keep = &k
			}
			got := place(tc.members, tc.s, keep)
			want := tc.want
			if groups(got) != want || got.Epoch != 0 || specOf(got) != tc.s {
				t.Errorf("place(%d members, %+v, keep %q) = %q (epoch %d, %s, tp %d, %s), want %q",
					len(tc.members), tc.s, tc.keep, groups(got), got.Epoch, got.Model, got.TP, got.PlanName, want)
			}
			if len(got.Groups) > 0 {
				got.Epoch = 1
				if err := got.Validate(); err != nil {
					t.Errorf("place(...) is not a valid plan: %v", err)
				}
			}
		})
	}
}

func TestPlaceMovedMember(t *testing.T) {
	// A member that re-registered at another address (a restarted worker) breaks its group.
	keep := planOf(tp2, 1, "0:a,b")
	ms := members("a", "b")
	ms[1].Addr = "b:2"
	got := place(ms, tp2, &keep)
	if len(got.Groups) != 1 || got.Groups[0].Ranks[1].Addr != "b:2" {
		t.Errorf("place after b moved = %+v, want one group with b at b:2", got.Groups)
	}
	if samePlacement(keep, got) {
		t.Errorf("samePlacement(old, new) = true after b moved, want false")
	}
}

func TestSamePlacement(t *testing.T) {
	a := planOf(tp2, 1, "0:a,b 1:c,d")
	for _, tc := range []struct {
		name string
		b    cluster.Plan
		want bool
	}{
		{"same, other epoch", planOf(tp2, 7, "0:a,b 1:c,d"), true},
		{"other ranks", planOf(tp2, 1, "0:b,a 1:c,d"), false},
		{"fewer groups", planOf(tp2, 1, "0:a,b"), false},
		{"other group ids", planOf(tp2, 1, "0:a,b 2:c,d"), false},
		{"other plan name", planOf(spec{model: tp2.model, tp: 2, planName: "ep"}, 1, "0:a,b 1:c,d"), false},
	} {
		if got := samePlacement(a, tc.b); got != tc.want {
			t.Errorf("samePlacement(%q, %s: %q) = %v, want %v", groups(a), tc.name, groups(tc.b), got, tc.want)
		}
	}
}
