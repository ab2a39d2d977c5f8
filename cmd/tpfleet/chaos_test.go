package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// Issue 13's chaos test: etcd, a coordinator and a standby, and 4 CPU workers as 2 replicas of TP=2
// serve 16 concurrent greedy streams (gRPC and HTTP) in a loop while faults are injected in turn. Every
// accepted request must complete with its uninterrupted greedy output; only the leading coordinator's
// SIGKILL may cut streams, and their clients' retry on the standby must complete. The test prints, per
// fault, the streams' longest pause (p50 and max), the requests completed, failed and wrong in its window,
// and those retried (cut in its window, then completed on the other coordinator, maybe in a later
// window; counted among the completed where they complete).
//
// TPFLEET_CHAOS_STOP and TPFLEET_CHAOS_ETCD_STOP set how long a worker and etcd stay SIGSTOPped (3s each
// in CI; the full run uses 10s), TPFLEET_CHAOS_LEADER_TTL the coordinator's --leader-ttl (2s):
//
//	TPFLEET_CHAOS_STOP=10s TPFLEET_CHAOS_ETCD_STOP=10s go test ./cmd/tpfleet -run TestChaos -v

// chaosStream records one client stream's token arrivals and outcomes.
type chaosStream struct {
	mu       sync.Mutex
	arrivals []time.Time
	done     []chaosOutcome
	onToken  func() // nil: none; called after each token's arrival is recorded
}

type chaosOutcome struct {
	at      time.Time
	err     error
	wrong   bool
	retried bool // an attempt was cut (UNAVAILABLE, or an HTTP stream without [DONE]) and retried
	// cuts are when its attempts were cut. A cut is charged to the fault window it happened in, not to
	// the one the request completes in: under -race a request takes longer than a window, so one cut by
	// the leader's SIGKILL may complete on the standby a window or two later.
	cuts []time.Time
}

// cutIn reports whether one of o's attempts was cut in [from, to).
func (o chaosOutcome) cutIn(from, to time.Time) bool {
	for _, c := range o.cuts {
		if !c.Before(from) && c.Before(to) {
			return true
		}
	}
	return false
}

func (s *chaosStream) token(now time.Time) {
	s.mu.Lock()
	s.arrivals = append(s.arrivals, now)
	s.mu.Unlock()
	if s.onToken != nil {
		s.onToken()
	}
}

func (s *chaosStream) end(o chaosOutcome) {
	s.mu.Lock()
	s.done = append(s.done, o)
	s.mu.Unlock()
}

// pause is the longest wait for a token that ended in [from, to) (the gap from the previous token).
func (s *chaosStream) pause(from, to time.Time) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var longest time.Duration
	for i := 1; i < len(s.arrivals); i++ {
		if a := s.arrivals[i]; !a.Before(from) && a.Before(to) {
			longest = max(longest, a.Sub(s.arrivals[i-1]))
		}
	}
	return longest
}

// chaosFault is one step of the test: what it does, and when.
type chaosFault struct {
	name string
	at   time.Time
}

func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos: separate processes for a minute or more")
	}
	stop, etcdStop, leaderTTL := 3*time.Second, 3*time.Second, "2s"
	if d, err := time.ParseDuration(os.Getenv("TPFLEET_CHAOS_STOP")); err == nil {
		stop = d
	}
	if d, err := time.ParseDuration(os.Getenv("TPFLEET_CHAOS_ETCD_STOP")); err == nil {
		etcdStop = d
	}
	if v := os.Getenv("TPFLEET_CHAOS_LEADER_TTL"); v != "" {
		leaderTTL = v
	}
	t.Setenv("TPFLEET_TEST_LIFETIME", "10m")
	start := time.Now()
	model := filepath.Join(fixtures, "moe-top1")
	etcdDir, etcdPeer := t.TempDir(), freePort(t)
	etcd := startProc(t, "etcd", "etcd", "--listen", "127.0.0.1:0", "--peer-listen", etcdPeer, "--data-dir", etcdDir)
	ep := etcd.line(t)
	var err error
	httpAddr := freePort(t)
	httpAddrs := []string{httpAddr, freePort(t)}
	grpcAddrs := []string{freePort(t), freePort(t)} // fixed across a restart, for the gateway
	coordArgs := func(i int) []string {
		return []string{"coordinator", "--etcd", ep, "--model", model, "--tp", "2", "--listen", grpcAddrs[i],
			"--http-listen", httpAddrs[i], "--leader-ttl", leaderTTL, "--settle", "100ms", "--step-timeout", "2s", "--max-batch", "16",
			"--log-level", "info"}
	}
	coords := []*proc{startProc(t, "coordinator 0", coordArgs(0)...)}
	addr := coords[0].line(t)
	workerArgs := []string{"worker", "--etcd", ep, "--threads", "1", "--op-timeout", "20s", "--log-level", "info"}
	var workers []*proc
	for i := range 4 {
		workers = append(workers, startProc(t, fmt.Sprintf("worker %d", i), workerArgs...))
	}
	cli := waitCoordinator(t, addr)
	// The standby: the clients below retry through whichever of the two leads.
	coords = append(coords, startProc(t, "coordinator 1 (standby)", coordArgs(1)...))
	cli1, err := client.Dial(coords[1].line(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli1.Close() })
	var climu sync.Mutex
	clis := []*client.Client{cli, cli1}
	leaderIdx := func() int { // the coordinator that leads now, by its Shards answer (0 when unknown)
		climu.Lock()
		cs := slices.Clone(clis)
		climu.Unlock()
		for i, c := range cs {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			sh, err := c.Shards(ctx)
			cancel()
			if err == nil && sh.LeaderID != "" {
				return i
			}
		}
		return 0
	}
	leaderCli := func() *client.Client {
		i := leaderIdx()
		climu.Lock()
		defer climu.Unlock()
		return clis[i]
	}
	waitFor(t, 60*time.Second, "two groups", func() bool {
		sh, err := cli.Shards(context.Background())
		return err == nil && len(sh.Assignments) == 4
	})
	t.Logf("serving 2 groups after %v", time.Since(start).Round(time.Millisecond))
	// The HTTP API in a process of its own, over both coordinators.
	gwAddr := startProc(t, "gateway", "gateway", "--coordinators", strings.Join(grpcAddrs, ","), "--model", model,
		"--http-listen", "127.0.0.1:0").line(t)
	var bareCuts atomic.Int64 // gateway streams cut without an error event: must stay 0

	// The uninterrupted greedy output of each prompt, from the cluster before any fault.
	const nPrompts, maxTokens = 8, 120
	greedy := &sample.Params{TopP: 1}
	prompts := make([][]int, nPrompts)
	want := make([][]int, nPrompts)
	for i := range prompts {
		prompts[i] = []int{1, 17 + 31*i, 200 + i, 311 + 7*i, 42}
		res, err := cli.Generate(context.Background(), client.GenerateRequest{PromptIDs: prompts[i], MaxTokens: maxTokens, Sampling: greedy, IgnoreEOS: true}, nil)
		if err != nil || len(res.IDs) != maxTokens {
			t.Fatalf("reference generate %d = %+v, %v", i, res, err)
		}
		want[i] = res.IDs
	}

	// 16 streams, every fourth over HTTP (half of those on a coordinator's own HTTP port, half through
	// the gateway process), each running requests in a loop until the faults are over. An attempt that
	// ends with UNAVAILABLE (gRPC: a cut connection, a standby's NOT_LEADER) or, over HTTP, a refused
	// connection, a 503, a stream cut without [DONE] or the gateway's coordinator_lost event is retried
	// from scratch on the other coordinator (through the gateway: on the gateway), for up to 30 s: what a
	// client does when its coordinator dies.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	streams := make([]*chaosStream, 16)
	var wg sync.WaitGroup
	for k := range streams {
		s := &chaosStream{}
		streams[k] = s
		wg.Go(func() {
			c := 0 // the coordinator this stream tries first
			for n := 0; ctx.Err() == nil; n++ {
				i := (k + n) % nPrompts
				var got []int
				var err error
				retried := false
				var cuts []time.Time
				var deadline time.Time // 30 s after the first cut: a client retries that long
				for {
					switch {
					case k%8 == 7:
						got, err = chaosHTTP(ctx, gwAddr, prompts[i], maxTokens, s)
						if err != nil && ctx.Err() == nil && strings.Contains(err.Error(), "without [DONE]") {
							bareCuts.Add(1)
						}
					case k%4 == 3:
						got, err = chaosHTTP(ctx, httpAddrs[c], prompts[i], maxTokens, s)
					default:
						climu.Lock()
						cl := clis[c]
						climu.Unlock()
						var res client.GenerateResult
						res, err = cl.Generate(ctx, client.GenerateRequest{PromptIDs: prompts[i], MaxTokens: maxTokens, Sampling: greedy, IgnoreEOS: true},
							func(ids []int, _ string) error {
								now := time.Now()
								for range ids {
									s.token(now)
								}
								return nil
							})
						got = res.IDs
					}
					if err == nil || ctx.Err() != nil || !chaosRetryable(err) {
						break
					}
					if deadline.IsZero() {
						deadline = time.Now().Add(30 * time.Second)
					} else if time.Now().After(deadline) {
						break
					}
					retried, c = true, 1-c
					cuts = append(cuts, time.Now())
					time.Sleep(50 * time.Millisecond)
				}
				if ctx.Err() != nil {
					return
				}
				s.end(chaosOutcome{at: time.Now(), err: err, wrong: err == nil && !slices.Equal(got, want[i]), retried: retried, cuts: cuts})
			}
		})
	}

	settle := func(what string) {
		t.Helper()
		waitFor(t, 60*time.Second, what, func() bool {
			sh, err := leaderCli().Shards(context.Background())
			return err == nil && len(sh.Assignments) == 4
		})
		time.Sleep(2 * time.Second) // let the streams run on the settled plan
	}
	var faults []chaosFault
	mark := func(name string) { faults = append(faults, chaosFault{name, time.Now()}) }

	time.Sleep(2 * time.Second)
	mark("none (baseline)")
	time.Sleep(3 * time.Second)
	for i := range 3 {
		mark(fmt.Sprintf("rebalance %d", i+1))
		if _, err := leaderCli().Rebalance(context.Background(), 0); err != nil {
			t.Fatalf("rebalance %d: %v", i+1, err)
		}
		time.Sleep(3 * time.Second)
	}
	mark("SIGKILL worker")
	workers[1].signal(t, syscall.SIGKILL)
	time.Sleep(5 * time.Second)
	mark("restart worker")
	workers[1] = startProc(t, "worker 1 (restarted)", workerArgs...)
	settle("two groups after the restart")
	mark(fmt.Sprintf("SIGSTOP worker %v", stop))
	workers[2].signal(t, syscall.SIGSTOP)
	time.Sleep(stop)
	workers[2].signal(t, syscall.SIGCONT)
	settle("two groups after SIGCONT")

	// SIGKILL the leading coordinator: the standby takes over (gossip declares the leader dead and the
	// standby deposes it in etcd); the streams cut on the dead leader end with UNAVAILABLE (an HTTP stream
	// without [DONE]) and their clients retry on the standby. The killed coordinator then restarts as the
	// new standby.
	loadsBefore := 0
	for _, w := range workers {
		loadsBefore += countLine(w.stderr.String(), "weights loaded")
	}
	old := leaderIdx()
	shBefore, err := clis[old].Shards(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	mark("SIGKILL coordinator")
	kill := time.Now()
	coords[old].signal(t, syscall.SIGKILL)
	takeover := serveTime(t, clis[1-old], kill, prompts[0])
	t.Logf("standby serving %v after the leader's SIGKILL", takeover.Round(time.Millisecond))
	// The 2 s target is TestCoordinatorFailover's check; here the first request after the take-over
	// queues behind 16 re-admitted streams on two -race cores, so the bound is looser.
	if bound := 2 * takeoverBound(); takeover > bound {
		t.Errorf("the standby served %v after the leader's SIGKILL, want within %v", takeover, bound)
	}
	// 5 s later no worker holds a sequence of the dead leader: every worker has been stepped by the new
	// leadership (which drops older leaderships' sequences), and the ranks of a group hold the same
	// sequences. A Step stream of the dead leader still open on a worker is reported, not failed (see
	// docs/operations.md).
	time.Sleep(time.Until(kill.Add(5 * time.Second)))
	sts := workerStatuses(t, shBefore)
	seqs := make(map[int32][]int32) // group -> each rank's sequence count
	for i, st := range sts {
		if st.GetLeaderRev() != sts[0].GetLeaderRev() || st.GetLeaderRev() == 0 {
			t.Errorf("worker %s 5s after the leader's SIGKILL: stepped by leadership %d, want %d (the new leader's) on every worker",
				st.GetMemberId(), st.GetLeaderRev(), sts[0].GetLeaderRev())
		}
		g := int32(shBefore.Assignments[i].Group)
		seqs[g] = append(seqs[g], st.GetSequences())
		if st.GetStepStreams() != 1 {
			t.Logf("worker %s 5s after the leader's SIGKILL: %d Step streams open (want 1), %d sequences", st.GetMemberId(), st.GetStepStreams(), st.GetSequences())
		}
	}
	for g, n := range seqs {
		// The two Status calls may straddle a step that starts or releases sequences: look again.
		for try := 0; len(n) > 1 && n[0] != n[1] && try < 10; try++ {
			time.Sleep(100 * time.Millisecond)
			n = n[:0]
			for i, st := range workerStatuses(t, shBefore) {
				if int32(shBefore.Assignments[i].Group) == g {
					n = append(n, st.GetSequences())
				}
			}
		}
		if len(n) > 1 && n[0] != n[1] {
			t.Errorf("group %d 5s after the leader's SIGKILL: its ranks hold %v sequences, want the same (none of the dead leader's)", g, n)
		}
	}
	mark("restart coordinator")
	coords[old] = startProc(t, fmt.Sprintf("coordinator %d (restarted)", old), coordArgs(old)...)
	restarted, err := client.Dial(coords[old].line(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = restarted.Close() })
	climu.Lock()
	clis[old] = restarted
	climu.Unlock()
	settle("two groups after the coordinator's restart")

	mark(fmt.Sprintf("SIGSTOP etcd %v", etcdStop))
	// The leader is found before the stop: while etcd is stopped, Shards on a coordinator that has not
	// yet noticed waits for etcd, which would lengthen the outage.
	leadIdx := leaderIdx()
	climu.Lock()
	lead := clis[leadIdx]
	climu.Unlock()
	etcd.signal(t, syscall.SIGSTOP)
	reported := false
	for stop := time.Now().Add(etcdStop); time.Now().Before(stop); time.Sleep(100 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		sh, err := lead.Shards(ctx)
		cancel()
		reported = reported || (err == nil && sh.EtcdUnreachable && len(sh.Assignments) == 4)
	}
	etcd.signal(t, syscall.SIGCONT)
	t.Logf("Shards reported etcd unreachable during the outage: %v", reported)
	if !reported && etcdStop >= 5*time.Second {
		t.Errorf("the leader's Shards never reported etcd unreachable (with the plan in force) during a %v outage", etcdStop)
	}
	settle("two groups after etcd's SIGCONT")

	// etcd dies and comes back on its data directory and ports, as a supervisor restarts it: its
	// clients reconnect, the leases it kept are renewed, and nothing is re-planned or reloaded.
	mark("SIGKILL etcd, restart")
	etcd.signal(t, syscall.SIGKILL)
	etcd.wait(t, 10*time.Second)
	time.Sleep(time.Second)
	etcd = startProc(t, "etcd (restarted)", "etcd", "--listen", strings.TrimPrefix(ep, "http://"), "--peer-listen", etcdPeer, "--data-dir", etcdDir)
	if got := etcd.line(t); got != ep {
		t.Fatalf("the restarted etcd serves %s, want %s", got, ep)
	}
	settle("two groups after etcd's restart")
	mark("end")
	// An etcd outage never moves the lead away from a live leader: when the leader's lease lapsed, it
	// leads again and the standby stands by.
	if i := leaderIdx(); i != leadIdx {
		t.Errorf("after the etcd outages coordinator %d leads, want %d (the leader before them)", i, leadIdx)
	}
	t.Logf("across the etcd outages: the leader regained its lapsed leadership %d times; the standby waited for it %d times",
		strings.Count(coords[leadIdx].stderr.String(), "leadership regained"),
		strings.Count(coords[1-leadIdx].stderr.String(), "waiting for it to lead again"))
	loads := 0
	for _, w := range workers {
		loads += countLine(w.stderr.String(), "weights loaded")
	}
	if loads != loadsBefore {
		t.Errorf("weights loaded %d times during and after the etcd outages, want 0", loads-loadsBefore)
	}
	cancel()
	wg.Wait()
	if n := bareCuts.Load(); n > 0 {
		t.Errorf("%d HTTP streams through the gateway were cut without an error event, want 0", n)
	}

	// The table: per fault window, the streams' longest pause and the outcomes.
	var b strings.Builder
	fmt.Fprintf(&b, "%-22s %10s %10s %9s %7s %7s %6s\n", "fault", "pause p50", "pause max", "completed", "retried", "failed", "wrong")
	failed := 0
	for i := 0; i+1 < len(faults); i++ {
		from, to := faults[i].at, faults[i+1].at
		var pauses []time.Duration
		completed, retried, nfailed, wrong := 0, 0, 0, 0
		for _, s := range streams {
			if p := s.pause(from, to); p > 0 {
				pauses = append(pauses, p)
			}
			s.mu.Lock()
			for _, o := range s.done {
				// A retried request's cuts are charged to the window they happened in (see chaosOutcome.cuts).
				if o.err == nil && o.retried && o.cutIn(from, to) {
					retried++
					if !strings.Contains(faults[i].name, "coordinator") {
						t.Errorf("%s: a request was cut and retried; only a coordinator's death may cut one (cut at %v, completed at %v)",
							faults[i].name, o.cuts, o.at.Format("15:04:05.000"))
					}
				}
				if o.at.Before(from) || !o.at.Before(to) {
					continue
				}
				switch {
				case o.err != nil:
					nfailed++
					if nfailed <= 3 {
						t.Errorf("%s: a request failed: %v", faults[i].name, o.err)
					}
				case o.wrong:
					wrong++
					t.Errorf("%s: a request's output differs from its uninterrupted greedy output", faults[i].name)
				default:
					completed++
				}
			}
			s.mu.Unlock()
		}
		failed += nfailed + wrong
		sort.Slice(pauses, func(a, b int) bool { return pauses[a] < pauses[b] })
		var p50, pmax time.Duration
		if len(pauses) > 0 {
			p50, pmax = pauses[len(pauses)/2], pauses[len(pauses)-1]
		}
		fmt.Fprintf(&b, "%-22s %10v %10v %9d %7d %7d %6d\n", faults[i].name, p50.Round(time.Millisecond), pmax.Round(time.Millisecond), completed, retried, nfailed, wrong)
	}
	t.Logf("chaos (%v):\n%s", time.Since(start).Round(time.Second), b.String())
	fmt.Print(b.String())
}

// chaosRetryable reports whether a client should retry a request on the other coordinator: its
// coordinator is gone or not the leader (gRPC UNAVAILABLE; over HTTP a refused or cut connection, a
// stream without [DONE], or 503).
func chaosRetryable(err error) bool {
	if st, ok := status.FromError(err); ok {
		return st.Code() == codes.Unavailable
	}
	var http503 chaosHTTPError
	if errors.As(err, &http503) {
		return http503.code == http.StatusServiceUnavailable
	}
	// The gateway's event for a stream its coordinator's death cut; other error events are final.
	return !strings.HasPrefix(err.Error(), "error event") || strings.HasPrefix(err.Error(), "error event coordinator_lost")
}

// chaosHTTPError is a completion answered with an HTTP error status.
type chaosHTTPError struct {
	code int
	body string
}

func (e chaosHTTPError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.code, e.body) }

// chaosHTTP runs one streaming completion over the OpenAI-compatible API and returns its token ids.
func chaosHTTP(ctx context.Context, addr string, prompt []int, maxTokens int, s *chaosStream) ([]int, error) {
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "max_tokens": maxTokens, "temperature": 0, "ignore_eos": true,
		"return_token_ids": true, "stream": true})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var buf bytes.Buffer
		_, _ = buf.ReadFrom(resp.Body)
		return nil, chaosHTTPError{resp.StatusCode, strings.TrimSpace(buf.String())}
	}
	var ids []int
	dec := newSSE(resp.Body)
	for {
		data, ok := dec.next()
		if !ok {
			return ids, fmt.Errorf("stream ended without [DONE]")
		}
		if data == "[DONE]" {
			return ids, nil
		}
		var ev struct {
			Choices []struct {
				TokenIDs []int `json:"token_ids"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
				Code    string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			return ids, fmt.Errorf("event %q: %w", data, err)
		}
		if ev.Error != nil {
			return ids, fmt.Errorf("error event %s: %s", ev.Error.Code, ev.Error.Message)
		}
		now := time.Now()
		for _, c := range ev.Choices {
			for range c.TokenIDs {
				s.token(now)
			}
			ids = append(ids, c.TokenIDs...)
		}
	}
}

// sse reads the data lines of a Server-Sent Events stream.
type sse struct{ sc *bufio.Scanner }

func newSSE(r io.Reader) *sse {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<22)
	return &sse{sc}
}

// next returns the next event's data, or false at the end of the stream.
func (s *sse) next() (string, bool) {
	for s.sc.Scan() {
		if d, ok := strings.CutPrefix(s.sc.Text(), "data: "); ok {
			return d, true
		}
	}
	return "", false
}
