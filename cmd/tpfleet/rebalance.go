package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tpfleet/tpfleet/client"
)

// runRebalance asks the leading coordinator for a plan change: another TP size, tp_plan or number of
// replicas, a worker drained or undrained, or only a new epoch; --dry-run prints the moves without them.
func runRebalance(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rebalance", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:7070", "the coordinator's gRPC address")
	var req client.RebalanceRequest
	fs.IntVar(&req.TP, "tp", 0, "new tensor-parallel size (0: keep the current one)")
	plan := fs.String("plan", "", "new tp_plan: tp, ep or a plan file in HF's format (read here and sent to the workers; empty: keep)")
	fs.IntVar(&req.Replicas, "replicas", client.KeepReplicas, "most TP groups (0: as many as the workers fill; -1: keep)")
	fs.StringVar(&req.Drain, "drain", "", "take this worker (member ID) out of service: its group is re-planned without it")
	fs.StringVar(&req.Undrain, "undrain", "", "put a drained worker back")
	fs.BoolVar(&req.DryRun, "dry-run", false, "print the moves (per worker the tensors loaded, kept and dropped) and change nothing")
	fs.BoolVar(&req.Wait, "wait", false, "return once every group of the new epoch serves")
	fs.BoolVar(&req.Experts, "experts", false, "place the experts of every MoE layer over the ranks by their load (the ep plan): the hottest on the least loaded ranks, with replicas in spare slots (--redundant-experts)")
	redundant := fs.Int("redundant-experts", -1, "with --experts: spare expert slots a MoE layer, a multiple of the TP size, for replicas of the hottest experts (0: only move experts; -1: the plan's, or one a rank where the plan has no expert order yet)")
	timeout := fs.Duration("timeout", 5*time.Minute, "how long to wait for the coordinator (loads and --wait included)")
	asJSON := fs.Bool("json", false, "print one JSON object")
	var token string
	tokenFlag(fs, &token, "an admin key of the coordinator (else the admin role of --tls-cert)")
	var tf tlsFlags
	tf.add(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case req.TP < 0:
		return usagef("--tp %d must be >= 0", req.TP)
	case req.Replicas < client.KeepReplicas:
		return usagef("--replicas %d must be >= 0 (or -1: keep)", req.Replicas)
	case req.Drain != "" && req.Drain == req.Undrain:
		return usagef("--drain and --undrain name the same worker %s", req.Drain)
	case *redundant < -1:
		return usagef("--redundant-experts %d must be >= 0 (or -1: the coordinator's choice)", *redundant)
	case *redundant >= 0 && !req.Experts:
		return usagef("--redundant-experts needs --experts")
	case *timeout <= 0:
		return usagef("--timeout must be positive")
	}
	if *redundant >= 0 {
		req.RedundantExperts = redundant
	}
	if *plan != "" {
		var err error
		if req.Plan, req.PlanFile, err = readPlanFlag(*plan); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	tc, err := tf.clientTLS()
	if err != nil {
		return usagef("%v", err)
	}
	cli, err := client.Dial(*addr, client.WithTLS(tc), client.WithToken(token))
	if err != nil {
		return err
	}
	defer cli.Close()
	var load client.ExpertLoad
	if req.Experts {
		if load, err = cli.Experts(ctx); err != nil {
			return fmt.Errorf("expert load via %s: %w", *addr, err)
		}
	}
	res, err := cli.RebalanceWith(ctx, req)
	if err != nil {
		return fmt.Errorf("rebalance via %s: %w", *addr, err)
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(rebalanceJSON(res))
	}
	if req.Experts {
		if err := writeExperts(stdout, load, res); err != nil {
			return err
		}
	}
	return writeRebalance(stdout, res)
}

// readPlanFlag reads --plan: a plan file when one is at that path (its name and content), else a built-in
// plan's name for the coordinator to resolve.
func readPlanFlag(plan string) (string, []byte, error) {
	data, err := os.ReadFile(plan)
	switch {
	case err == nil:
		return filepath.Base(plan), data, nil
	case errors.Is(err, fs.ErrNotExist) && !strings.ContainsAny(plan, `/\.`):
		return plan, nil, nil
	default:
		return "", nil, usagef("--plan %s: %v", plan, err)
	}
}

// placementJSON is one rank of the plan in --json output.
type placementJSON struct {
	Group    int    `json:"group"`
	Rank     int    `json:"rank"`
	MemberID string `json:"member_id"`
	Addr     string `json:"addr"`
}

// rebalanceJSON is `rebalance --json`: snake_case throughout.
func rebalanceJSON(res client.RebalanceResult) any {
	type out struct {
		client.RebalanceResult
		Assignments []placementJSON `json:"assignments"`
	}
	o := out{RebalanceResult: res, Assignments: []placementJSON{}}
	for _, a := range res.Assignments {
		o.Assignments = append(o.Assignments, placementJSON{a.Group, a.Rank, a.MemberID, a.Addr})
	}
	return o
}

// writeRebalance prints a rebalance's plan and its moves.
func writeRebalance(w io.Writer, res client.RebalanceResult) error {
	verb := "epoch %d: "
	if res.DryRun {
		verb = "dry run, nothing changed; epoch %d would be: "
	}
	replicas := "as many as fit"
	if res.Replicas > 0 {
		replicas = fmt.Sprint(res.Replicas)
	}
	fmt.Fprintf(w, verb+"tp %d, plan %s, replicas %s, %d group(s), drained: %s\n", res.Epoch, res.TP, res.Plan, replicas,
		groupCount(res.Assignments), orNone(res.Drained))
	if err := writeMoves(w, res.Moves, false); err != nil {
		return err
	}
	if !res.DryRun {
		fmt.Fprintf(w, "prepared in %.2f s", res.PrepareSeconds)
		if res.SwitchSeconds > 0 {
			fmt.Fprintf(w, "; every group served %.2f s after the switch", res.SwitchSeconds)
		}
		fmt.Fprintln(w)
	}
	return nil
}

// writeExperts prints, per MoE layer, the tokens each expert got and the ranks that hold it before and
// after the change (slots rank by rank; an expert with replicas on several ranks), then the tokens each
// rank computed and those it would have computed under the new order, an expert's tokens split evenly
// among its replicas.
func writeExperts(w io.Writer, load client.ExpertLoad, res client.RebalanceResult) error {
	layers := make([]int, 0, len(load.Layers))
	for l := range load.Layers {
		layers = append(layers, l)
	}
	sort.Ints(layers)
	fmt.Fprintf(w, "expert load of epoch %d (%d group(s)):\n", load.Epoch, load.Groups)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tEXPERT\tTOKENS\tRANKS\tNEW RANKS")
	for _, l := range layers {
		counts := load.Layers[l]
		now, next := ranksOf(load.Order[l], len(counts), load.TP), ranksOf(res.ExpertOrder[l], len(counts), res.TP)
		for e, n := range counts {
			fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\n", l, e, n, joinInts(now[e]), joinInts(next[e]))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tTOKENS A RANK\tEXPECTED UNDER THE NEW ORDER")
	for _, l := range layers {
		counted := "-"
		if r := load.RankLoad(l); r != nil {
			counted = joinInt64s(r)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\n", l, counted, joinInt64s(expectedRankLoad(load.Layers[l], res.ExpertOrder[l], res.TP)))
	}
	return tw.Flush()
}

// ranksOf returns, per expert, the ranks whose slots hold it under ord (slots rank by rank over tp ranks;
// nil: the checkpoint's order).
func ranksOf(ord []int, experts, tp int) [][]int {
	if len(ord) == 0 {
		ord = make([]int, experts)
		for i := range ord {
			ord[i] = i
		}
	}
	per := max(len(ord)/max(tp, 1), 1)
	out := make([][]int, experts)
	for slot, e := range ord {
		if e >= 0 && e < experts && !slices.Contains(out[e], slot/per) {
			out[e] = append(out[e], slot/per)
		}
	}
	return out
}

// expectedRankLoad returns the tokens each of tp ranks would compute with the experts in ord (nil: the
// checkpoint's order) and each expert's tokens split evenly among its replicas (rounded down).
func expectedRankLoad(counts []int64, ord []int, tp int) []int64 {
	tp = max(tp, 1)
	if len(ord) == 0 {
		ord = make([]int, len(counts))
		for i := range ord {
			ord[i] = i
		}
	}
	reps := make([]int64, len(counts))
	for _, e := range ord {
		if e >= 0 && e < len(counts) {
			reps[e]++
		}
	}
	per := max(len(ord)/tp, 1)
	out := make([]int64, tp)
	for slot, e := range ord {
		if e >= 0 && e < len(counts) && slot/per < tp {
			out[slot/per] += counts[e] / reps[e]
		}
	}
	return out
}

func joinInts(v []int) string {
	parts := make([]string, len(v))
	for i, n := range v {
		parts[i] = strconv.Itoa(n)
	}
	return strings.Join(parts, ",")
}

func joinInt64s(v []int64) string {
	parts := make([]string, len(v))
	for i, n := range v {
		parts[i] = strconv.FormatInt(n, 10)
	}
	return strings.Join(parts, "/")
}

func groupCount(as []client.Placement) int {
	seen := make(map[int]bool)
	for _, a := range as {
		seen[a.Group] = true
	}
	return len(seen)
}

// writeMoves prints one line per worker: its group and rank (or idle, drained) and the tensors it loads,
// keeps and drops, with their bytes and the estimated load time, then the totals. held prints only what
// each worker holds (the live plan: what it loaded from nothing).
func writeMoves(w io.Writer, moves []client.Move, held bool) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if held {
		fmt.Fprintln(tw, "MEMBER\tGROUP\tRANK\tTENSORS\tBYTES")
	} else {
		fmt.Fprintln(tw, "MEMBER\tGROUP\tRANK\tLOAD\tLOAD BYTES\tKEEP\tKEEP BYTES\tDROP\tDROP BYTES\tEST")
	}
	var tot client.Move
	for _, m := range moves {
		group, rank := fmt.Sprint(m.Group), fmt.Sprint(m.Rank)
		switch {
		case m.Drained:
			group, rank = "drained", "-"
		case m.Group < 0:
			group, rank = "idle", "-"
		}
		if held {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", m.MemberID, group, rank, m.Loaded, shardsSize(m.LoadedBytes))
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\t%d\t%s\t%.2f s\n", m.MemberID, group, rank, m.Loaded, shardsSize(m.LoadedBytes),
				m.Kept, shardsSize(m.KeptBytes), m.Dropped, shardsSize(m.DroppedBytes), m.EstimatedSeconds)
		}
		tot.Loaded += m.Loaded
		tot.LoadedBytes += m.LoadedBytes
		tot.Kept += m.Kept
		tot.KeptBytes += m.KeptBytes
		tot.Dropped += m.Dropped
		tot.DroppedBytes += m.DroppedBytes
		tot.EstimatedSeconds = max(tot.EstimatedSeconds, m.EstimatedSeconds)
	}
	if held {
		fmt.Fprintf(tw, "total\t\t\t%d\t%s\n", tot.Loaded, shardsSize(tot.LoadedBytes))
	} else {
		fmt.Fprintf(tw, "total\t\t\t%d\t%s\t%d\t%s\t%d\t%s\t%.2f s\n", tot.Loaded, shardsSize(tot.LoadedBytes),
			tot.Kept, shardsSize(tot.KeptBytes), tot.Dropped, shardsSize(tot.DroppedBytes), tot.EstimatedSeconds)
	}
	return tw.Flush()
}
