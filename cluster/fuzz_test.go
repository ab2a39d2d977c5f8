package cluster_test

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/tpfleet/tpfleet/cluster"
)

// FuzzDecodePlan feeds DecodePlan what a stranger could have written to the plan's key: it must
// return a valid plan or ErrInvalid, never panic, and a plan it accepts encodes back to itself. Its
// seeds run in go test.
func FuzzDecodePlan(f *testing.F) {
	good, _ := json.Marshal(cluster.Plan{Epoch: 3, Model: "/models/scout", TP: 2, PlanName: "tp", Groups: []cluster.Group{
		{ID: 0, Ranks: []cluster.Assignment{{Rank: 0, MemberID: "w0", Addr: "10.0.0.1:7000"}, {Rank: 1, MemberID: "w1", Addr: "10.0.0.2:7000"}}},
	}})
	for _, s := range []string{string(good), `{}`, `null`, `[]`, `{"epoch":1,"model":"m","tp":1,"groups":[{"id":0,"ranks":[{"rank":0,"member_id":"a","addr":"h:1"}]}]}`,
		`{"epoch":1,"model":"m","tp":1,"groups":[{"id":0,"ranks":[{"rank":0,"member_id":"a","addr":"h:1"}]},{"id":0,"ranks":[]}]}`,
		`{"epoch":-1}`, `{"epoch":1e400}`, `{"epoch":1,"model":"m","tp":2,"groups":[{"id":0,"ranks":[{"rank":1}]}]}`, "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := cluster.DecodePlan(data)
		if err != nil {
			if !errors.Is(err, cluster.ErrInvalid) {
				t.Fatalf("DecodePlan(%q) = %v, want ErrInvalid", data, err)
			}
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("DecodePlan(%q) accepted an invalid plan: %v", data, err)
		}
		again, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		q, err := cluster.DecodePlan(again)
		if err != nil || !reflect.DeepEqual(p, q) {
			t.Fatalf("DecodePlan(Marshal(%+v)) = %+v, %v", p, q, err)
		}
	})
}
