package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/cluster"
	"github.com/tpfleet/tpfleet/coordinator"
)

// runCluster dispatches the tools that read the cluster's state straight from etcd.
func runCluster(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runSubcommand(ctx, "cluster", "--etcd ENDPOINTS [flags]", []command{
		{"members", "list the registered workers", runClusterMembers},
		{"shards", "show the plan: the epoch and which worker holds which rank of which TP group", runClusterShards},
		{"memory", "show each worker's memory plan: weights, activations, KV blocks, the longest context", runClusterMemory},
	}, args, stdout, stderr)
}

// clusterFlags are the flags of the cluster tools.
type clusterFlags struct {
	etcd  cluster.Config
	json  bool
	model string // cluster shards: where to read the checkpoint's headers ("": the plan's model)
	tls   tlsFlags
}

func parseClusterFlags(name string, args []string, stderr io.Writer) (clusterFlags, error) {
	var f clusterFlags
	fs := flag.NewFlagSet("cluster "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	f.etcd.AddFlags(fs)
	etcdFlag(fs, &f.etcd)
	fs.BoolVar(&f.json, "json", false, "print JSON instead of a table")
	if name == "shards" {
		fs.StringVar(&f.model, "model", "", "the checkpoint directory, for the tensors each worker holds (default: the plan's model)")
	}
	f.tls.add(fs)
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	tc, err := f.tls.etcdTLS()
	if err != nil {
		return f, usagef("%v", err)
	}
	f.etcd.TLS = tc
	switch {
	case fs.NArg() > 0:
		return f, usagef("unexpected argument %q", fs.Arg(0))
	case len(f.etcd.Endpoints) == 0:
		return f, usagef("--etcd is required")
	}
	return f, nil
}

// openCluster parses the flags of cluster tool name and connects to etcd; the caller closes the client.
func openCluster(ctx context.Context, name string, args []string, stderr io.Writer) (clusterFlags, *cluster.Client, error) {
	f, err := parseClusterFlags(name, args, stderr)
	if err != nil {
		return f, nil, err
	}
	cl, err := cluster.New(ctx, f.etcd)
	return f, cl, err
}

// runClusterMembers lists the registered workers.
func runClusterMembers(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, cl, err := openCluster(ctx, "members", args, stderr)
	if err != nil {
		return err
	}
	defer cl.Close()
	ms, _, err := cl.Members(ctx)
	if err != nil {
		return err
	}
	if f.json {
		if ms == nil {
			ms = []cluster.Member{}
		}
		return printJSON(stdout, ms)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tADDR\tHOST\tDEVICES\tSTARTED")
	for _, m := range ms {
		var devs []string
		for _, d := range m.Devices {
			devs = append(devs, fmt.Sprintf("%s:%d", d.Kind, d.Index))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.ID, m.Addr, m.Host, strings.Join(devs, ","), m.Started.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

// shardsView is `cluster shards --json`: the plan, the members it leaves idle and what each worker holds.
type shardsView struct {
	Plan *cluster.Plan `json:"plan"` // null when no plan is stored
	Idle []string      `json:"idle"` // registered members with no rank in the plan
	// Workers is what each member holds of the checkpoint under the plan (loaded: the tensors, their
	// bytes); absent when the checkpoint could not be read here.
	Workers []client.Move `json:"workers,omitempty"`
}

// runClusterShards shows the stored plan.
func runClusterShards(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, cl, err := openCluster(ctx, "shards", args, stderr)
	if err != nil {
		return err
	}
	defer cl.Close()
	p, ok, err := cl.Plan(ctx)
	if err != nil {
		return err
	}
	ms, _, err := cl.Members(ctx)
	if err != nil {
		return err
	}
	placed := make(map[string]bool)
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			placed[a.MemberID] = true
		}
	}
	v := shardsView{Idle: []string{}}
	if ok {
		v.Plan = &p
	}
	for _, m := range ms {
		if !placed[m.ID] {
			v.Idle = append(v.Idle, m.ID)
		}
	}
	var holdErr error
	if ok {
		v.Workers, holdErr = heldTensors(f.model, p, v.Idle)
	}
	if f.json {
		return printJSON(stdout, v)
	}
	if !ok {
		fmt.Fprintf(stdout, "no plan under %s (idle members: %s)\n", cl.Prefix(), orNone(v.Idle))
		return nil
	}
	fmt.Fprintf(stdout, "epoch %d: model %s, tp %d, plan %s, %d group(s), written %s\n",
		p.Epoch, p.Model, p.TP, p.PlanName, len(p.Groups), p.Created.Local().Format(time.DateTime))
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GROUP\tRANK\tMEMBER\tADDR")
	for _, g := range p.Groups {
		for _, a := range g.Ranks {
			fmt.Fprintf(tw, "%d\t%d\t%s\t%s\n", g.ID, a.Rank, a.MemberID, a.Addr)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err = fmt.Fprintf(stdout, "idle: %s\n", orNone(v.Idle)); err != nil {
		return err
	}
	if holdErr != nil {
		_, err = fmt.Fprintf(stdout, "tensors held: not shown (%v; see --model)\n", holdErr)
		return err
	}
	return writeMoves(stdout, v.Workers, true)
}

// heldTensors is what every worker holds under plan p: the moves from nothing to p, read from the
// checkpoint at dir (p's model when empty).
func heldTensors(dir string, p cluster.Plan, idle []string) ([]client.Move, error) {
	moves, err := coordinator.PlanMoves(dir, cluster.Plan{}, p, idle, 0)
	if err != nil {
		return nil, err
	}
	return clientMoves(moves), nil
}

// clientMoves converts the coordinator's moves to the client's (and --json's) form.
func clientMoves(moves []coordinator.WorkerMove) []client.Move {
	out := make([]client.Move, 0, len(moves))
	for _, m := range moves {
		out = append(out, client.Move{MemberID: m.MemberID, Group: m.Group, Rank: m.Rank, Drained: m.Drained,
			Loaded: m.Loaded, LoadedBytes: m.LoadedBytes, Kept: m.Kept, KeptBytes: m.KeptBytes, Dropped: m.Dropped,
			DroppedBytes: m.DroppedBytes, EstimatedSeconds: m.Estimate.Seconds()})
	}
	return out
}

func orNone(ids []string) string {
	if len(ids) == 0 {
		return "none"
	}
	return strings.Join(ids, ", ")
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
