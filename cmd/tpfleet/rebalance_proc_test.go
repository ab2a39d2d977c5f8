package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tpfleet/tpfleet/client"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/sample"
)

// readBytes asks each worker (by address) for the tensor bytes it has read since it started.
func readBytes(t *testing.T, addrs map[string]string) map[string]int64 {
	t.Helper()
	out := make(map[string]int64)
	for id, addr := range addrs {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := pb.NewWorkerClient(conn).Status(ctx, &pb.StatusRequest{})
		cancel()
		_ = conn.Close()
		if err != nil {
			t.Fatalf("Status of worker %s: %v", id, err)
		}
		out[id] = st.GetReadBytes()
	}
	return out
}

// TestRebalanceProcesses is issue 15's acceptance: etcd, a coordinator and 4 CPU worker processes (two
// replicas of TP=2) serve 16 concurrent greedy streams in a loop while an operator drains a worker,
// undrains it, switches the plan tp → ep → tp and goes from 1 replica to 2 and back, each with
// `rebalance --wait`. Every request completes with its uninterrupted greedy output; after each switch
// every worker has read exactly the bytes the coordinator's moves said it would load (0 for a worker that
// keeps its tensors), and the test prints each switch's longest pause and the bytes each worker read.
func TestRebalanceProcesses(t *testing.T) {
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--listen", "127.0.0.1:0",
		"--http-listen", "", "--settle", "50ms", "--no-gossip")
	addr := coord.line(t)
	ids := []string{"w0", "w1", "w2", "w3"}
	for _, id := range ids {
		startProc(t, "worker "+id, "worker", "--etcd", ep, "--id", id, "--threads", "1", "--op-timeout", "30s", "--no-gossip")
	}
	cli := waitCoordinator(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitFor(t, 30*time.Second, "two groups", func() bool {
		sh, err := cli.Shards(ctx)
		return err == nil && len(sh.Assignments) == 4
	})
	sh, err := cli.Shards(ctx)
	if err != nil {
		t.Fatal(err)
	}
	addrs := make(map[string]string)
	for _, a := range sh.Assignments {
		addrs[a.MemberID] = a.Addr
	}

	// 16 streams, each generating the fixture's greedy continuation again and again.
	var (
		mu       sync.Mutex
		arrivals []time.Time
		done     int
		failures []string
	)
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			for sctx.Err() == nil {
				res, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: len(g.greedy),
					Sampling: &sample.Params{TopP: 1}, IgnoreEOS: true}, func(ids []int, _ string) error {
					mu.Lock()
					arrivals = append(arrivals, time.Now())
					mu.Unlock()
					return nil
				})
				mu.Lock()
				switch {
				case err != nil:
					failures = append(failures, fmt.Sprintf("stream %d: %v", i, err))
				case !slices.Equal(res.IDs, g.greedy):
					failures = append(failures, fmt.Sprintf("stream %d: ids %v, want %v", i, res.IDs, g.greedy))
				default:
					done++
				}
				mu.Unlock()
			}
		})
	}
	// pause is the longest gap between two tokens (of any stream) in [from, to).
	pause := func(from, to time.Time) time.Duration {
		mu.Lock()
		defer mu.Unlock()
		ts := slices.Clone(arrivals)
		slices.SortFunc(ts, func(a, b time.Time) int { return a.Compare(b) })
		var longest time.Duration
		for i := 1; i < len(ts); i++ {
			if !ts[i].Before(from) && ts[i].Before(to) {
				longest = max(longest, ts[i].Sub(ts[i-1]))
			}
		}
		return longest
	}
	completed := func() int {
		mu.Lock()
		defer mu.Unlock()
		return done
	}
	waitFor(t, 60*time.Second, "requests before the first switch", func() bool { return completed() >= 16 })

	var table strings.Builder
	tw := tabwriter.NewWriter(&table, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "switch\tprepare\tswitch\tpause\t%s\n", strings.Join(ids, "\t"))
	// The baseline: the longest gap between tokens while nothing changes.
	from, n := time.Now(), completed()
	waitFor(t, 60*time.Second, "requests without a switch", func() bool { return completed() >= n+16 })
	fmt.Fprintf(tw, "none (baseline)\t-\t-\t%v%s\n", pause(from, time.Now()).Round(time.Millisecond), strings.Repeat("\t-", len(ids)))
	for _, sw := range []struct {
		name string
		args []string
	}{
		{"drain w1", []string{"--drain", "w1"}},
		{"undrain w1", []string{"--undrain", "w1"}},
		{"tp → ep", []string{"--plan", "ep"}},
		{"ep → tp", []string{"--plan", "tp"}},
		{"replicas 1", []string{"--replicas", "1"}},
		{"replicas 2", []string{"--replicas", "2"}},
		{"replicas 1 again", []string{"--replicas", "1"}},
	} {
		before := readBytes(t, addrs)
		from, n := time.Now(), completed()
		var req client.RebalanceRequest
		req.Replicas = client.KeepReplicas
		req.Wait = true
		switch sw.args[0] {
		case "--drain":
			req.Drain = sw.args[1]
		case "--undrain":
			req.Undrain = sw.args[1]
		case "--plan":
			req.Plan = sw.args[1]
		case "--replicas":
			fmt.Sscan(sw.args[1], &req.Replicas)
		}
		res, err := cli.RebalanceWith(ctx, req)
		if err != nil {
			t.Fatalf("rebalance %s: %v", sw.name, err)
		}
		// Let the streams run on the new epoch before the next switch.
		waitFor(t, 60*time.Second, "requests after "+sw.name, func() bool { return completed() >= n+16 })
		after := readBytes(t, addrs)
		fmt.Fprintf(tw, "%s\t%.2fs\t%.2fs\t%v", sw.name, res.PrepareSeconds, res.SwitchSeconds, pause(from, time.Now()).Round(time.Millisecond))
		for _, id := range ids {
			read := after[id] - before[id]
			var want int64
			for _, m := range res.Moves {
				if m.MemberID == id {
					want = m.LoadedBytes
				}
			}
			fmt.Fprintf(tw, "\t%s", shardsSize(read))
			if read != want {
				t.Errorf("%s: worker %s read %d bytes, want %d (the coordinator's moves)", sw.name, id, read, want)
			}
		}
		fmt.Fprintln(tw)
	}
	stop()
	wg.Wait()
	_ = tw.Flush()

	// cluster shards shows what each worker holds under the live plan.
	code, stdout, stderr := tpfleet(t, "cluster", "shards", "--etcd", ep)
	if code != 0 || !strings.Contains(stdout, "MEMBER  GROUP  RANK  TENSORS  BYTES") || !strings.Contains(stdout, "355.1 KiB") {
		t.Errorf("cluster shards = exit %d, %q (%s); want the tensors each worker holds", code, stdout, stderr)
	}
	t.Logf("tpfleet cluster shards:\n%s", stdout)
	t.Logf("%d requests completed; per switch the longest pause between tokens and the bytes each worker read:\n%s", completed(), table.String())
	for _, f := range failures {
		t.Error(f)
	}
}

// TestShardStreamingProcesses: a worker whose model directory is empty (no shared volume) receives its
// slices over gRPC from its peer, which has the checkpoint: the group of two serves the fixture's greedy
// ids, and the empty worker read every byte it holds from the peer.
func TestShardStreamingProcesses(t *testing.T) {
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--listen", "127.0.0.1:0",
		"--http-listen", "", "--settle", "50ms", "--no-gossip")
	addr := coord.line(t)
	empty := t.TempDir()
	startProc(t, "worker a", "worker", "--etcd", ep, "--id", "a", "--threads", "1", "--no-gossip")
	startProc(t, "worker b", "worker", "--etcd", ep, "--id", "b", "--threads", "1", "--no-gossip", "--model", empty)
	cli := waitCoordinator(t, addr)
	generateConcurrently(t, addr, g, 4)

	sh, err := cli.Shards(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i, st := range workerStatuses(t, sh) {
		id := sh.Assignments[i].MemberID
		t.Logf("worker %s: holds %d bytes, read %d, of them %d streamed from a peer", id, st.GetWeightBytes(), st.GetReadBytes(), st.GetStreamedBytes())
		want := int64(0)
		if id == "b" {
			want = st.GetWeightBytes()
		}
		if st.GetStreamedBytes() != want || st.GetReadBytes() != st.GetWeightBytes() {
			t.Errorf("worker %s: streamed %d of %d bytes read, holds %d; want %d streamed", id, st.GetStreamedBytes(), st.GetReadBytes(), st.GetWeightBytes(), want)
		}
	}
}

// TestExpertsProcesses is issue 15's hot-experts acceptance: etcd, a coordinator and two CPU worker
// processes (TP=2, the ep plan, 4 experts a layer) serve the fixture's prompt, whose tokens favour some
// experts. The counts are visible per expert and per slot (Admin.Experts; `rebalance --experts --dry-run`
// prints them). `rebalance --experts --wait` (one spare slot a rank by default) gives every layer's
// hottest expert a place on a rank that did not hold it; each worker reads exactly the bytes the
// coordinator's moves said; the same traffic again gives the same counts per expert, split so that the
// busiest rank carries less than before in the layers summed (also on the coordinator's /metrics), and
// every request its greedy output.
func TestExpertsProcesses(t *testing.T) {
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	hm := freePort(t)
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--plan", "ep",
		"--listen", "127.0.0.1:0", "--http-listen", hm, "--settle", "50ms", "--no-gossip")
	addr := coord.line(t)
	for _, id := range []string{"a", "b"} {
		startProc(t, "worker "+id, "worker", "--etcd", ep, "--id", id, "--threads", "1", "--no-gossip")
	}
	cli := waitCoordinator(t, addr)
	ctx := context.Background()
	waitFor(t, 30*time.Second, "one group", func() bool {
		sh, err := cli.Shards(ctx)
		return err == nil && len(sh.Assignments) == 2
	})
	sh, err := cli.Shards(ctx)
	if err != nil {
		t.Fatal(err)
	}
	addrs := make(map[string]string)
	for _, a := range sh.Assignments {
		addrs[a.MemberID] = a.Addr
	}
	generateConcurrently(t, addr, g, 4)

	before, err := cli.Experts(ctx)
	if err != nil || before.Groups != 1 || before.TP != 2 || len(before.Layers) == 0 {
		t.Fatalf("Experts() = %+v, %v; want the counts of one group of TP 2", before, err)
	}
	for l, counts := range before.Layers {
		var tokens, slots int64
		for _, n := range counts {
			tokens += n
		}
		for _, n := range before.Slots[l] {
			slots += n
		}
		if tokens == 0 || slots != tokens || before.RankLoad(l) == nil {
			t.Errorf("layer %d: %d tokens over the experts %v, %d over the slots %v; want the same, more than 0", l, tokens, counts, slots, before.Slots[l])
		}
	}
	exit, stdout, errOut := tpfleet(t, "rebalance", "--addr", addr, "--experts", "--dry-run")
	if exit != 0 || !strings.Contains(stdout, "LAYER  EXPERT  TOKENS  RANKS  NEW RANKS") || !strings.Contains(stdout, "TOKENS A RANK") {
		t.Fatalf("rebalance --experts --dry-run = exit %d, %q (%s); want the expert load", exit, stdout, errOut)
	}
	t.Logf("tpfleet rebalance --experts --dry-run:\n%s", stdout)
	for _, bad := range []struct {
		args []string
		exit int
		want string
	}{
		{[]string{"--redundant-experts", "2"}, 2, "--redundant-experts needs --experts"},
		{[]string{"--experts", "--redundant-experts", "1"}, 1, "multiple of tp=2"},
		{[]string{"--experts", "--redundant-experts", "6"}, 1, "at most 4"},
	} {
		if exit, _, errOut := tpfleet(t, append([]string{"rebalance", "--addr", addr}, bad.args...)...); exit != bad.exit || !strings.Contains(errOut, bad.want) {
			t.Errorf("rebalance %v = exit %d, %q; want %d and %q", bad.args, exit, errOut, bad.exit, bad.want)
		}
	}

	read := readBytes(t, addrs)
	exit, stdout, errOut = tpfleet(t, "rebalance", "--addr", addr, "--experts", "--wait", "--json")
	var res struct {
		ExpertOrder map[int][]int `json:"expert_order"`
		Moves       []client.Move `json:"moves"`
	}
	if exit != 0 || json.Unmarshal([]byte(stdout), &res) != nil || len(res.ExpertOrder) == 0 {
		t.Fatalf("rebalance --experts --wait --json = exit %d, %q (%s); want the expert order", exit, stdout, errOut)
	}
	for id, n := range readBytes(t, addrs) {
		var want int64
		for _, m := range res.Moves {
			if m.MemberID == id {
				want = m.LoadedBytes
			}
		}
		t.Logf("worker %s read %d bytes for the new order; the coordinator's moves said %d", id, n-read[id], want)
		if n-read[id] != want || want == 0 {
			t.Errorf("worker %s read %d bytes, want %d (the coordinator's moves, more than 0)", id, n-read[id], want)
		}
	}
	for l, counts := range before.Layers {
		hot := 0
		for e := range counts {
			if counts[e] > counts[hot] {
				hot = e
			}
		}
		ord := res.ExpertOrder[l]
		was, now := ranksOf(nil, len(counts), 2)[hot], ranksOf(ord, len(counts), 2)[hot]
		t.Logf("layer %d: tokens per expert %v; slots %v (rank 0 | rank 1: %v | %v); hottest expert %d on ranks %v → %v",
			l, counts, ord, ord[:len(ord)/2], ord[len(ord)/2:], hot, was, now)
		if !slices.ContainsFunc(now, func(r int) bool { return !slices.Contains(was, r) }) {
			t.Errorf("layer %d: the hottest expert %d stays on ranks %v (order %v); want it, or a replica, on another", l, hot, was, ord)
		}
	}

	generateConcurrently(t, addr, g, 4)
	after, err := cli.Experts(ctx)
	if err != nil || len(after.Layers) == 0 || after.Epoch <= before.Epoch {
		t.Fatalf("Experts() after the switch = %+v, %v; want counts of a later epoch", after, err)
	}
	metrics := scrape(t, "http://"+hm+"/metrics")
	var busiestBefore, busiestAfter int64
	for l, counts := range before.Layers {
		if !slices.Equal(after.Layers[l], counts) {
			t.Errorf("layer %d: tokens per expert %v after, %v before; want the same (the same requests)", l, after.Layers[l], counts)
		}
		rb, ra := before.RankLoad(l), after.RankLoad(l)
		if ra == nil {
			t.Fatalf("layer %d: no slot counts after the switch: %+v", l, after)
		}
		busiestBefore += slices.Max(rb)
		busiestAfter += slices.Max(ra)
		for r, n := range ra {
			if got := metricValue(metrics, "tpfleet_expert_rank_tokens", fmt.Sprintf("layer=%d", l), fmt.Sprintf("rank=%d", r)); got != float64(n) {
				t.Errorf("coordinator metric tpfleet_expert_rank_tokens{layer=%d,rank=%d} = %g, want %d", l, r, got, n)
			}
		}
		t.Logf("layer %d: tokens per rank %v before, %v after (slots %v: %v)", l, rb, ra, after.Order[l], after.Slots[l])
	}
	t.Logf("busiest rank's tokens summed over the layers: %d before, %d after", busiestBefore, busiestAfter)
	if busiestAfter >= busiestBefore {
		t.Errorf("busiest rank's tokens summed over the layers: %d before, %d after --experts; want fewer", busiestBefore, busiestAfter)
	}
}

// TestExpertsAutomatic: with --experts-every the leader rebalances the experts by itself once the load is
// uneven (off by default), and the group still answers with the fixture's greedy ids.
func TestExpertsAutomatic(t *testing.T) {
	g := readGolden(t, "moe-top1")
	model := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--plan", "ep",
		"--listen", "127.0.0.1:0", "--http-listen", "", "--settle", "50ms", "--no-gossip", "--experts-every", "300ms", "--experts-imbalance", "1.05")
	addr := coord.line(t)
	for _, id := range []string{"a", "b"} {
		startProc(t, "worker "+id, "worker", "--etcd", ep, "--id", id, "--threads", "1", "--no-gossip")
	}
	waitCoordinator(t, addr)
	generateConcurrently(t, addr, g, 4)
	ordered := func() bool {
		code, stdout, _ := tpfleet(t, "cluster", "shards", "--etcd", ep, "--json")
		var v struct {
			Plan *struct {
				Order *struct {
					Layers map[string][]int `json:"layers"`
				} `json:"order"`
			} `json:"plan"`
		}
		return code == 0 && json.Unmarshal([]byte(stdout), &v) == nil && v.Plan != nil && v.Plan.Order != nil && len(v.Plan.Order.Layers) > 0
	}
	waitFor(t, 60*time.Second, "an expert order in the plan", ordered)
	generateConcurrently(t, addr, g, 4)
	if s := coord.stderr.String(); !strings.Contains(s, "rebalancing experts") {
		t.Errorf("the coordinator logged no automatic rebalance:\n%s", tail(s, 20))
	}
}
