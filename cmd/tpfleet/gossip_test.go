package main

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
	"github.com/tpfleet/tpfleet/sample"
)

// TestGossipFailover: a coordinator (in this process, with an embedded etcd) and three worker processes
// at TP 1 form three groups and one gossip cluster. One worker is killed (SIGKILL: no gossip leave, no
// deregistration); gossip reports it dead and the coordinator writes a plan without it within about
// two seconds, while its member key, under the default 10 s lease, is still in etcd. The two groups
// left serve the fixture's greedy ids.
func TestGossipFailover(t *testing.T) {
	const leaseTTL = 10 * time.Second // worker.DefaultLeaseTTL
	start := time.Now()
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: t.TempDir(), ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0", UnsafeNoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	etcd := cluster.Config{Endpoints: e.Endpoints(), Logger: zap.NewNop()}
	cl, err := cluster.New(ctx, etcd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cl.Close() })

	var workers []*proc
	for i := range 3 {
		workers = append(workers, startProc(t, fmt.Sprintf("worker %d", i), "worker", "--etcd", e.Endpoints()[0],
			"--id", fmt.Sprintf("w%d", i), "--threads", "1", "--lease-ttl", leaseTTL.String()))
	}
	// The coordinator closes first at the end (cleanups run last first), before the workers are killed.
	c, err := coordinator.New(coordinator.Config{
		ListenAddr: "127.0.0.1:0", Etcd: etcd, Model: model, TP: 1, Settle: 50 * time.Millisecond,
		Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	cli := waitCoordinator(t, c.Addr())

	// Wait for three groups, and for one gossip cluster of the coordinator and the workers, seen by a
	// node of the test's that joins a worker: workers start their nodes alone, so it sees them all only
	// once the coordinator has joined each of them.
	var members []cluster.Member
	waitFor(t, 30*time.Second, "three groups placed", func() bool {
		sh, err := cli.Shards(ctx)
		if err != nil || len(sh.Assignments) != 3 {
			return false
		}
		members, _, err = cl.Members(ctx)
		return err == nil && len(members) == 3
	})
	watcher, err := cluster.StartGossip(ctx, cluster.GossipConfig{Name: "test-watcher", BindAddr: "127.0.0.1", Join: []string{members[0].Gossip}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = watcher.Close() })
	waitFor(t, 10*time.Second, "one gossip cluster", func() bool {
		got := watcher.Members()
		return len(got) == 5 && slices.Contains(got, "w1") && slices.Contains(got, "w2")
	})
	before, _, err := cl.Plan(ctx)
	if err != nil {
		t.Fatal(err)
	}
	greedy := &sample.Params{TopP: 1}
	generate := func(what string) {
		t.Helper()
		for range 3 {
			res, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: len(g.greedy), Sampling: greedy, IgnoreEOS: true}, nil)
			if err != nil || !slices.Equal(res.IDs, g.greedy) {
				t.Errorf("Generate %s = %v, %v; want %v", what, res.IDs, err, g.greedy)
			}
		}
	}
	generate("with three groups")
	t.Logf("three groups serving after %v", time.Since(start).Round(time.Millisecond))

	killed := time.Now()
	workers[1].signal(t, syscall.SIGKILL)
	var after cluster.Plan
	waitFor(t, leaseTTL, "a plan without w1", func() bool {
		p, _, err := cl.Plan(ctx)
		if err != nil || p.Epoch == before.Epoch {
			return false
		}
		after = p
		return true
	})
	took := time.Since(killed)
	ms, _, err := cl.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("plan epoch %d written %v after the kill; members still registered: %v", after.Epoch, took.Round(time.Millisecond), memberIDs(ms))
	var placed []string
	for _, grp := range after.Groups {
		for _, a := range grp.Ranks {
			placed = append(placed, a.MemberID)
		}
	}
	// Group order follows the order the workers were first placed in, which depends on when each
	// registered; what matters is who is placed.
	slices.Sort(placed)
	if !slices.Equal(placed, []string{"w0", "w2"}) {
		t.Errorf("plan after the kill places %v, want w0 and w2", placed)
	}
	if took > 3*time.Second {
		t.Errorf("re-planned %v after the kill, want about 2 s (gossip), well before the %v lease expires", took, leaseTTL)
	}
	if !slices.Contains(memberIDs(ms), "w1") {
		t.Errorf("w1 is no longer registered %v after the kill: the re-plan cannot be told apart from the lease's", time.Since(killed))
	}
	waitFor(t, 10*time.Second, "two groups serving", func() bool {
		_, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: []int{1}, MaxTokens: 1, Sampling: greedy}, nil)
		return err == nil
	})
	generate("after the kill")
}

// waitFor polls cond every 20 ms until it holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func memberIDs(ms []cluster.Member) []string {
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.ID
	}
	return ids
}
