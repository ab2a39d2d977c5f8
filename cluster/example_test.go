package cluster_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/tpfleet/tpfleet/cluster"
)

// Example runs the whole flow on one machine: an embedded etcd, a worker that registers, a
// coordinator that leads and stores a plan, and the worker's rendezvous for the plan's epoch.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, err := os.MkdirTemp("", "tpfleet-etcd-")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)

	etcd, err := cluster.StartEmbedded(ctx, cluster.EmbedConfig{Dir: dir, ClientAddr: "127.0.0.1:0", PeerAddr: "127.0.0.1:0"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer etcd.Close()
	c, err := cluster.New(ctx, cluster.Config{Endpoints: etcd.Endpoints(), Cluster: "example"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()

	// The worker.
	reg, err := c.Register(ctx, cluster.Member{ID: "host-1-0", Addr: "127.0.0.1:7001", Host: "host"}, 10*time.Second)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer reg.Close(ctx)

	// The coordinator.
	lead, err := c.Campaign(ctx, "coordinator-1", 10*time.Second)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer lead.Resign(ctx)
	members, _, _ := c.Members(ctx)
	plan := cluster.Plan{Epoch: 1, Model: "tiny", TP: 1, PlanName: "tp", Groups: []cluster.Group{{
		ID: 0, Ranks: []cluster.Assignment{{Rank: 0, MemberID: members[0].ID, Addr: members[0].Addr}},
	}}}
	if err := lead.PutPlan(ctx, plan, 0); err != nil {
		fmt.Println(err)
		return
	}

	// The worker again: the plan, then the rendezvous of its group.
	p, _, _ := c.Plan(ctx)
	_ = c.PutRendezvous(ctx, p.Epoch, 0, 0, []byte("127.0.0.1:29500"))
	peers, err := c.WaitRendezvous(ctx, p.Epoch, 0, p.TP)
	if err != nil {
		fmt.Println(err)
		return
	}
	leader, _, _ := c.Leader(ctx)
	fmt.Printf("leader %s stored plan %d; rank 0 of group 0 is %s at %s\n", leader, p.Epoch, p.Groups[0].Ranks[0].MemberID, peers[0])
	// Output: leader coordinator-1 stored plan 1; rank 0 of group 0 is host-1-0 at 127.0.0.1:29500
}
