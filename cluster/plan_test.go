package cluster_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/cluster"
)

// testPlan returns a valid plan of epoch with groups × tp ranks.
func testPlan(epoch int64, groups, tp int) cluster.Plan {
	p := cluster.Plan{Epoch: epoch, Model: "testdata/tiny-llama4", TP: tp, PlanName: "tp"}
	for g := range groups {
		grp := cluster.Group{ID: g}
		for r := range tp {
			id := fmt.Sprintf("w-%d-%d", g, r)
			grp.Ranks = append(grp.Ranks, cluster.Assignment{Rank: r, MemberID: id, Addr: fmt.Sprintf("127.0.0.1:%d", 7000+g*tp+r)})
		}
		p.Groups = append(p.Groups, grp)
	}
	return p
}

func TestPlanValidate(t *testing.T) {
	t.Parallel()
	edit := func(f func(*cluster.Plan)) cluster.Plan {
		p := testPlan(1, 2, 2)
		f(&p)
		return p
	}
	tests := []struct {
		name string
		p    cluster.Plan
		ok   bool
	}{
		{"good", testPlan(1, 2, 2), true},
		{"no groups", testPlan(3, 0, 4), true},
		{"epoch 0", edit(func(p *cluster.Plan) { p.Epoch = 0 }), false},
		{"no model", edit(func(p *cluster.Plan) { p.Model = "" }), false},
		{"TP 0", edit(func(p *cluster.Plan) { p.TP = 0 }), false},
		{"group size", edit(func(p *cluster.Plan) { p.Groups[1].Ranks = p.Groups[1].Ranks[:1] }), false},
		{"rank order", edit(func(p *cluster.Plan) { p.Groups[0].Ranks[0].Rank = 1 }), false},
		{"duplicate group", edit(func(p *cluster.Plan) { p.Groups[1].ID = 0 }), false},
		{"member twice", edit(func(p *cluster.Plan) { p.Groups[1].Ranks[0].MemberID = "w-0-0" }), false},
		{"no member", edit(func(p *cluster.Plan) { p.Groups[0].Ranks[1].MemberID = "" }), false},
		{"no address", edit(func(p *cluster.Plan) { p.Groups[0].Ranks[1].Addr = "" }), false},
		{"replicas cap kept", edit(func(p *cluster.Plan) { p.Replicas = 2 }), true},
		{"more groups than replicas", edit(func(p *cluster.Plan) { p.Replicas = 1 }), false},
		{"negative replicas", edit(func(p *cluster.Plan) { p.Replicas = -1 }), false},
		{"drained idle member", edit(func(p *cluster.Plan) { p.Drained = []string{"w-9-9"} }), true},
		{"drained member placed", edit(func(p *cluster.Plan) { p.Drained = []string{"w-1-0"} }), false},
	}
	for _, tt := range tests {
		err := tt.p.Validate()
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, cluster.ErrInvalid)) {
			t.Errorf("%s: Validate() = %v, want ok=%v", tt.name, err, tt.ok)
		}
	}
}

func TestPutPlanCAS(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	c := newClient(t, e, "plan")
	other := newClient(t, e, "plan")
	ctx := testCtx(t)

	if _, ok, err := c.Plan(ctx); ok || err != nil {
		t.Fatalf("Plan() on an empty cluster = _, %v, %v, want false, nil", ok, err)
	}
	watch := c.WatchPlan(ctx)

	if err := c.PutPlan(ctx, testPlan(1, 1, 2), 0); err != nil {
		t.Fatalf("PutPlan(epoch 1, prev 0): %v", err)
	}
	// A second writer that also read "no plan" loses.
	err := other.PutPlan(ctx, testPlan(1, 2, 1), 0)
	if !errors.Is(err, cluster.ErrConflict) || !strings.Contains(err.Error(), "stored epoch is 1") {
		t.Fatalf("conflicting PutPlan(epoch 1, prev 0) = %v, want ErrConflict naming stored epoch 1", err)
	}
	// An epoch that does not follow prevEpoch, a prevEpoch that is not stored, an invalid plan.
	if err := c.PutPlan(ctx, testPlan(3, 1, 2), 1); !errors.Is(err, cluster.ErrConflict) {
		t.Errorf("PutPlan(epoch 3, prev 1) = %v, want ErrConflict", err)
	}
	if err := c.PutPlan(ctx, testPlan(6, 1, 2), 5); !errors.Is(err, cluster.ErrConflict) || !strings.Contains(err.Error(), "stored epoch is 1") {
		t.Errorf("PutPlan(epoch 6, prev 5) = %v, want ErrConflict naming stored epoch 1", err)
	}
	bad := testPlan(2, 1, 2)
	bad.Model = ""
	if err := c.PutPlan(ctx, bad, 1); !errors.Is(err, cluster.ErrInvalid) {
		t.Errorf("PutPlan(no model) = %v, want ErrInvalid", err)
	}
	for epoch := int64(2); epoch <= 4; epoch++ {
		if err := other.PutPlan(ctx, testPlan(epoch, 2, 1), epoch-1); err != nil {
			t.Fatalf("PutPlan(epoch %d, prev %d): %v", epoch, epoch-1, err)
		}
	}
	p, ok, err := c.Plan(ctx)
	if err != nil || !ok || p.Epoch != 4 || p.TP != 1 || len(p.Groups) != 2 || p.Created.IsZero() || p.Groups[1].Ranks[0].MemberID != "w-1-0" {
		t.Fatalf("Plan() = %+v, %v, %v, want epoch 4 as written", p, ok, err)
	}
	// The watch began before the first write, but its goroutine reads the stored plan when it starts,
	// which may be after several writes (CI failed here with epoch 2 first on two busy cores): it delivers
	// the plan it finds, then each newer one, in increasing epochs, up to the newest.
	for last := int64(0); last < 4; {
		got := recvUntil(t, watch, 10*time.Second, fmt.Sprintf("an epoch after %d", last), func(cluster.Plan) bool { return true })
		if got.Epoch <= last || got.Epoch > 4 {
			t.Fatalf("WatchPlan delivered epoch %d after %d, want increasing epochs up to 4", got.Epoch, last)
		}
		last = got.Epoch
	}

	// A watch started now sees the current plan first.
	w2 := c.WatchPlan(ctx)
	if got := recvUntil(t, w2, 10*time.Second, "current plan", func(cluster.Plan) bool { return true }); got.Epoch != 4 {
		t.Errorf("new WatchPlan's first plan has epoch %d, want 4", got.Epoch)
	}
}

// TestPutPlanRace has several coordinators write the next epoch at once: exactly one wins.
func TestPutPlanRace(t *testing.T) {
	t.Parallel()
	e := startEtcd(t)
	ctx := testCtx(t)
	const writers = 6
	clients := make([]*cluster.Client, writers)
	for i := range clients {
		clients[i] = newClient(t, e, "race")
	}
	for prev := int64(0); prev < 3; prev++ {
		var wg sync.WaitGroup
		errs := make([]error, writers)
		for i, c := range clients {
			wg.Go(func() { errs[i] = c.PutPlan(ctx, testPlan(prev+1, 1, 1), prev) })
		}
		wg.Wait()
		won := 0
		for i, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, cluster.ErrConflict):
				t.Errorf("writer %d: PutPlan(epoch %d) = %v, want nil or ErrConflict", i, prev+1, err)
			}
		}
		if won != 1 {
			t.Errorf("epoch %d: %d writers won, want 1", prev+1, won)
		}
	}
}
