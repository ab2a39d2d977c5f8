package worker_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/backend"
	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/worker"
)

// TestGenerateTP2: two workers of one process form a TP=2 group through etcd; the test, acting as the
// coordinator, drives them over Step streams and gets HF's greedy ids, for one sequence and for two
// interleaved in the same steps. Bad requests are answered with errors and the streams keep working.
func TestGenerateTP2(t *testing.T) {
	gold := readGolden(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	w0 := startWorker(t, testConfig(t, e, "w0"))
	w1 := startWorker(t, testConfig(t, e, "w1"))
	if got := members(t, cli); !slices.Equal(got, []string{"w0", "w1"}) {
		t.Fatalf("members after Start = %v, want [w0 w1]", got)
	}
	for _, w := range []*worker.Worker{w0, w1} {
		select {
		case <-w.Ready(): // no plan yet: idle is ready
		default:
			t.Fatalf("%s: Ready not closed after Start with no plan", w.ID())
		}
	}
	conn0, conn1 := dial(t, w0.Addr()), dial(t, w1.Addr())
	c0, c1 := tpfleetv1.NewWorkerClient(conn0), tpfleetv1.NewWorkerClient(conn1)
	putPlan(t, cli, plan(1, w0, w1), c0, c1)
	g := newGroup(t, 1, c0, c1)

	t.Run("one sequence", func(t *testing.T) {
		g.t = t
		if got := g.generate(1, gold.Prompt, len(gold.Greedy)); !equalIDs(got, gold.Greedy) {
			t.Errorf("TP=2 greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy))
		}
		g.run(&tpfleetv1.SequenceWork{SeqId: 2, Ids: gold.Prompt[:1], Start: true, Capacity: 4}) // no sample: no result
		for i, w := range []*worker.Worker{w0, w1} {
			// Sequence 1 holds its prompt and greedy ids, 2 one position: every layer holds blocks.
			if used, total, size := w.KVBlocks(); used == 0 || total < used || size != 16 {
				t.Errorf("rank %d: KV blocks before release = %d of %d of %d positions, want some of 16", i, used, total, size)
			}
		}
		g.send(&tpfleetv1.StepRequest{Release: []uint64{1, 2}})
		for i, c := range []tpfleetv1.WorkerClient{c0, c1} {
			if n := statusOf(t, c).GetSequences(); n != 0 {
				t.Errorf("rank %d: sequences after release = %d, want 0", i, n)
			}
		}
		for i, w := range []*worker.Worker{w0, w1} {
			if used, _, _ := w.KVBlocks(); used != 0 {
				t.Errorf("rank %d: KV blocks in use after release = %d, want 0", i, used)
			}
		}
	})

	t.Run("interleaved", func(t *testing.T) {
		g.t = t
		// Sequence 10 starts at once, with its prompt in two pieces; 11 joins two steps later.
		// Both must give HF's greedy ids.
		n := len(gold.Greedy)
		var got10, got11 []int32
		capacity := len(gold.Prompt) + n
		res := g.run(
			&tpfleetv1.SequenceWork{SeqId: 10, Ids: gold.Prompt[:5], Start: true, Capacity: int32(capacity),
				Sampling: &tpfleetv1.SamplingParams{}}, // unset would sample as generation_config.json says
			&tpfleetv1.SequenceWork{SeqId: 10, Ids: gold.Prompt[5:], Sample: true},
		)
		got10 = append(got10, res[10])
		for len(got10) < n || len(got11) < n {
			var work []*tpfleetv1.SequenceWork
			if len(got11) == 0 && len(got10) >= 3 {
				work = append(work, greedy(11, gold.Prompt, capacity))
			} else if len(got11) > 0 && len(got11) < n {
				work = append(work, next(11, got11[len(got11)-1]))
			}
			if len(got10) < n {
				work = append(work, next(10, got10[len(got10)-1]))
			}
			res := g.run(work...)
			if len(got10) < n {
				got10 = append(got10, res[10])
			}
			if id, ok := res[11]; ok {
				got11 = append(got11, id)
			}
		}
		if !equalIDs(got10, gold.Greedy) || !equalIDs(got11, gold.Greedy) {
			t.Errorf("interleaved greedy ids:\n seq 10 %s\n seq 11 %s\nwant %s", fmtIDs(got10), fmtIDs(got11), fmtIDs(gold.Greedy))
		}
		for i, c := range []tpfleetv1.WorkerClient{c0, c1} {
			if n := statusOf(t, c).GetSequences(); n != 2 {
				t.Errorf("rank %d: sequences = %d, want 2", i, n)
			}
		}
	})

	t.Run("logprobs and bias", func(t *testing.T) {
		g.t = t
		// Greedy with logprobs: the chosen id is the top one, with its logprob. A bias of +100 on
		// another id makes it the choice, and its logprob stays the raw one (lower than the top's).
		biased := (gold.Greedy[0] + 1) % 16
		for _, tc := range []struct {
			name string
			sp   *tpfleetv1.SamplingParams
			want int32
		}{
			{"greedy", &tpfleetv1.SamplingParams{Logprobs: true, TopLogprobs: 3}, gold.Greedy[0]},
			{"biased", &tpfleetv1.SamplingParams{Logprobs: true, TopLogprobs: 3, LogitBias: map[int32]float64{biased: 100}}, biased},
			{"min tokens", &tpfleetv1.SamplingParams{Logprobs: true, TopLogprobs: 3, MinTokens: 1, MinTokensStopIds: []int32{gold.Greedy[0]}}, -1},
		} {
			work := &tpfleetv1.SequenceWork{SeqId: 40, Ids: gold.Prompt, Start: true, Capacity: int32(len(gold.Prompt) + 1), Sampling: tc.sp, Sample: true}
			resps := g.send(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{work}, Release: []uint64{40}})
			if len(resps[0].GetResults()) != 1 {
				t.Fatalf("%s: results %v, want one", tc.name, resps[0].GetResults())
			}
			res := resps[0].GetResults()[0]
			lp, top := res.GetLogprobs().GetLogprob(), res.GetLogprobs().GetTop()
			if len(top) != 3 || top[0].GetLogprob() < top[1].GetLogprob() || top[1].GetLogprob() < top[2].GetLogprob() || top[0].GetId() != gold.Greedy[0] {
				t.Fatalf("%s: top logprobs %v, want 3, highest first, HF's greedy id %d first", tc.name, top, gold.Greedy[0])
			}
			switch {
			case tc.want >= 0 && res.GetNextId() != tc.want:
				t.Errorf("%s: next id %d, want %d", tc.name, res.GetNextId(), tc.want)
			case tc.want < 0 && res.GetNextId() == gold.Greedy[0]:
				t.Errorf("%s: next id %d, the id min_tokens holds back", tc.name, res.GetNextId())
			case res.GetNextId() == gold.Greedy[0] && lp != top[0].GetLogprob():
				t.Errorf("%s: logprob %v, want the top one %v", tc.name, lp, top[0].GetLogprob())
			case res.GetNextId() != gold.Greedy[0] && !(lp < top[0].GetLogprob() && lp < 0):
				t.Errorf("%s: logprob of id %d %v, want below the top's %v", tc.name, res.GetNextId(), lp, top[0].GetLogprob())
			}
		}
	})

	t.Run("prompt logprobs", func(t *testing.T) {
		g.t = t
		// The prompt's logprobs come with the first token and are HF's (the log-softmax of the golden
		// logits before each prompt token), whether the prompt comes whole or in pieces batched with
		// another sequence's decode; TP=2 all-gathers every position's logits on both ranks.
		want := goldenPromptLogprobs(t, gold)
		const top = 2
		for _, pieces := range [][2]int{{0, len(gold.Prompt)}, {0, 3}, {0, 1}} {
			name := fmt.Sprintf("first piece %d", pieces[1])
			capacity := int32(len(gold.Prompt) + 2)
			n := int32(top)
			first := &tpfleetv1.SequenceWork{SeqId: 50, Ids: gold.Prompt[:pieces[1]], Start: true, Capacity: capacity,
				Sampling: &tpfleetv1.SamplingParams{}, PromptLogprobs: &n, Sample: pieces[1] == len(gold.Prompt)}
			var resps []*tpfleetv1.StepResponse
			if first.Sample {
				resps = g.send(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{first}})
			} else {
				// A decoding sequence shares the steps: its result has no prompt logprobs.
				g.run(greedy(51, gold.Prompt, int(capacity)+4), first)
				resps = g.send(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{
					{SeqId: 50, Ids: gold.Prompt[pieces[1]:], Sample: true}, next(51, gold.Greedy[0])}})
			}
			if e := resps[0].GetError() + resps[1].GetError(); e != "" {
				t.Fatalf("%s: %s", name, e)
			}
			var res *tpfleetv1.SequenceResult
			for _, r := range resps[0].GetResults() {
				switch r.GetSeqId() {
				case 50:
					res = r
				case 51:
					if len(r.GetPromptLogprobs()) != 0 {
						t.Errorf("%s: sequence 51 (not asked) got %d prompt logprobs", name, len(r.GetPromptLogprobs()))
					}
				}
			}
			if res == nil || res.GetNextId() != gold.Greedy[0] {
				t.Fatalf("%s: results %v, want sequence 50's HF greedy id %d", name, resps[0].GetResults(), gold.Greedy[0])
			}
			got := res.GetPromptLogprobs()
			if len(got) != len(gold.Prompt)-1 {
				t.Fatalf("%s: %d prompt logprobs for a prompt of %d, want %d", name, len(got), len(gold.Prompt), len(gold.Prompt)-1)
			}
			worst := 0.0
			for i, lp := range got {
				w := want[i]
				worst = max(worst, math.Abs(float64(lp.GetLogprob())-w[gold.Prompt[i+1]]))
				if len(lp.GetTop()) != top {
					t.Fatalf("%s: entry %d: %d top logprobs, want %d", name, i, len(lp.GetTop()), top)
				}
				for _, tl := range lp.GetTop() {
					worst = max(worst, math.Abs(float64(tl.GetLogprob())-w[tl.GetId()]))
				}
			}
			t.Logf("%s: %d prompt logprobs, max |Δ| vs HF log-softmax %.3g", name, len(got), worst)
			if worst > 1e-4 {
				t.Errorf("%s: max |prompt logprob - HF| = %.3g, want <= 1e-4", name, worst)
			}
			// The next token has the prompt behind it: it runs as a plain decode, without them.
			resps = g.send(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(50, res.GetNextId())}, Release: []uint64{50, 51}})
			if r := resps[0].GetResults(); resps[0].GetError() != "" || len(r) != 1 || r[0].GetNextId() != gold.Greedy[1] || len(r[0].GetPromptLogprobs()) != 0 {
				t.Errorf("%s: second token: %v %q, want HF's %d without prompt logprobs", name, r, resps[0].GetError(), gold.Greedy[1])
			}
		}
		bad := int32(21)
		g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{{SeqId: 52, Ids: gold.Prompt, Start: true, Capacity: 64, PromptLogprobs: &bad}}}, "worker: invalid request")
	})

	t.Run("errors", func(t *testing.T) {
		g.t = t
		g.run(greedy(20, gold.Prompt, len(gold.Prompt)+4))
		for _, tc := range []struct {
			name   string
			req    *tpfleetv1.StepRequest
			prefix string
		}{
			{"wrong epoch", &tpfleetv1.StepRequest{Epoch: 7, Seqs: []*tpfleetv1.SequenceWork{next(20, 1)}}, "worker: epoch mismatch"},
			{"unknown sequence", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(99, 1)}}, "worker: unknown sequence"},
			{"id outside vocab", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(20, 512)}}, "worker: invalid request"},
			{"negative id", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(20, -1)}}, "worker: invalid request"},
			{"no ids", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{{SeqId: 20}}}, "worker: invalid request"},
			{"past capacity", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{{SeqId: 20, Ids: make([]int32, 5)}}}, "worker: invalid request"},
			{"capacity 0", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{greedy(21, gold.Prompt, 0)}}, "worker: invalid request"},
			{"bad sampling", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{{SeqId: 21, Ids: gold.Prompt, Start: true,
				Capacity: 64, Sampling: &tpfleetv1.SamplingParams{Temperature: -1}}}}, "worker: invalid request"},
			// The valid first entry must not run when a later one is bad.
			{"bad second entry", &tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(20, 1), next(99, 1)}}, "worker: unknown sequence"},
			{"protocol", &tpfleetv1.StepRequest{Protocol: tpfleetv1.StepProtocol(2), Seqs: []*tpfleetv1.SequenceWork{next(20, 1)}}, "worker: unsupported step protocol"},
		} {
			g.wantError(tc.req, tc.prefix)
		}
		// Sequence 20 is untouched: its continuation is still the greedy one.
		var got []int32
		res := g.run(greedy(20, gold.Prompt, len(gold.Prompt)+4))[20]
		got = append(got, res)
		for range 3 {
			res = g.run(next(20, res))[20]
			got = append(got, res)
		}
		if !equalIDs(got, gold.Greedy[:4]) {
			t.Errorf("after errors, greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy[:4]))
		}
		// 15 of its 16 positions are used: two more tokens do not fit.
		g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{{SeqId: 20, Ids: []int32{res, res}}}}, "worker: invalid request")
	})

	t.Run("stream end drops its sequences", func(t *testing.T) {
		// A coordinator that goes away (crash, closed stream) leaves nothing behind: the sequences its
		// streams started are dropped when they end; those of other streams stay.
		g.t = t
		g.send(&tpfleetv1.StepRequest{Release: []uint64{10, 11, 20, 21}})
		g.run(greedy(30, gold.Prompt, len(gold.Prompt)+4))
		other := newGroup(t, 1, c0, c1)
		other.run(greedy(31, gold.Prompt, len(gold.Prompt)+4))
		for _, s := range other.streams {
			if err := s.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Recv(); err != io.EOF {
				t.Fatalf("Recv after CloseSend = %v, want EOF", err)
			}
		}
		for i, c := range []tpfleetv1.WorkerClient{c0, c1} {
			eventually(t, 10*time.Second, func() error {
				if n := statusOf(t, c).GetSequences(); n != 1 {
					return fmt.Errorf("rank %d: sequences after the other stream ended = %d, want 1", i, n)
				}
				return nil
			})
		}
		g.run(next(30, 1)) // the first stream's sequence is still there
		g.send(&tpfleetv1.StepRequest{Release: []uint64{30}})
		for i, w := range []*worker.Worker{w0, w1} {
			// Sequence 31 went with its stream, 30 with its release: their blocks are back.
			if used, _, _ := w.KVBlocks(); used != 0 {
				t.Errorf("rank %d: KV blocks in use after the stream ended and the release = %d, want 0", i, used)
			}
		}
	})

	t.Run("status and health", func(t *testing.T) {
		for r, c := range []tpfleetv1.WorkerClient{c0, c1} {
			st := statusOf(t, c)
			if st.GetState() != "serving" || st.GetEpoch() != 1 || st.GetGroup() != 0 || st.GetRank() != int32(r) ||
				st.GetTp() != 2 || st.GetWeightBytes() <= 0 || st.GetDevice() != "cpu" || st.GetMemberId() != []string{"w0", "w1"}[r] {
				t.Errorf("rank %d: Status = %v, want serving epoch 1 group 0 rank %d tp 2 with weights on cpu", r, st, r)
			}
		}
		for _, conn := range []string{"", "tpfleet.v1.Worker"} {
			if got := health(t, conn0, conn); got != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("health(%q) = %v, want SERVING", conn, got)
			}
		}
	})
}

// TestEpochs: a new epoch with the same assignment reuses the weights; an epoch without the worker
// makes it idle; a communicator failure fails the epoch; Close deregisters.
func TestEpochs(t *testing.T) {
	gold := readGolden(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	w0 := startWorker(t, testConfig(t, e, "w0"))
	cfg1 := testConfig(t, e, "w1")
	cfg1.Labels = map[string]string{"RANK": "1"}
	w1 := startWorker(t, cfg1)
	conn0, conn1 := dial(t, w0.Addr()), dial(t, w1.Addr())
	c0, c1 := tpfleetv1.NewWorkerClient(conn0), tpfleetv1.NewWorkerClient(conn1)

	putPlan(t, cli, plan(1, w0, w1), c0, c1)
	for _, w := range []*worker.Worker{w0, w1} {
		if st := w.Status(); st.Loads != 1 || st.State != worker.StateServing {
			t.Fatalf("%s after epoch 1: Status = %+v, want serving after 1 load", w.ID(), st)
		}
	}
	g := newGroup(t, 1, c0, c1)
	g.run(greedy(1, gold.Prompt, 64))

	// Epoch 2 keeps the assignment (a coordinator restart): no reload, sequences dropped, new ring.
	putPlan(t, cli, plan(2, w0, w1), c0, c1)
	for _, w := range []*worker.Worker{w0, w1} {
		if st := w.Status(); st.Loads != 1 || st.State != worker.StateServing || st.Epoch != 2 || st.Sequences != 0 {
			t.Errorf("%s after epoch 2: Status = %+v, want serving epoch 2, no sequences, still 1 load", w.ID(), st)
		}
	}
	g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(1, 1)}}, "worker: epoch mismatch")
	g.epoch = 2
	g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(1, 1)}}, "worker: unknown sequence")
	if got := g.generate(2, gold.Prompt, 5); !equalIDs(got, gold.Greedy[:5]) {
		t.Errorf("epoch 2: greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy[:5]))
	}
	if _, err := c0.LoadPlan(testCtx(t), &tpfleetv1.LoadPlanRequest{Epoch: 1}); status.Code(err) != codes.Aborted {
		t.Errorf("LoadPlan(1) on epoch 2 = %v, want code Aborted", err)
	}

	// Epoch 3 runs the model on w0 alone (TP=1): w0 loads again, w1 is idle and frees its weights.
	putPlan(t, cli, plan(3, w0), c0, c1)
	if st := w0.Status(); st.Loads != 2 || st.State != worker.StateServing || st.TP != 1 {
		t.Errorf("w0 after epoch 3: Status = %+v, want serving TP 1 after 2 loads", st)
	}
	if st := statusOf(t, c1); st.GetState() != "idle" || st.GetWeightBytes() != 0 || st.GetTp() != 0 || st.GetGroup() != -1 {
		t.Errorf("w1 after epoch 3: Status = %v, want idle without weights or group", st)
	}
	if got := health(t, conn1, ""); got != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("idle worker: health(\"\") = %v, want SERVING", got)
	}
	if got := health(t, conn1, "tpfleet.v1.Worker"); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("idle worker: health(tpfleet.v1.Worker) = %v, want NOT_SERVING", got)
	}
	solo := newGroup(t, 3, c0)
	if got := solo.generate(1, gold.Prompt, len(gold.Greedy)); !equalIDs(got, gold.Greedy) {
		t.Errorf("TP=1 greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy))
	}
	idle := newGroup(t, 3, c1)
	idle.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{greedy(1, gold.Prompt, 64)}}, "worker: not serving")

	// Epoch 4 swaps the ranks; then w1 closes: w0's next step fails its collective, and w0 is failed.
	putPlan(t, cli, plan(4, w1, w0), c0, c1)
	if st0, st1 := w0.Status(), w1.Status(); st0.Loads != 3 || st0.Rank != 1 || st1.Loads != 2 || st1.Rank != 0 {
		t.Errorf("after epoch 4: w0 %+v, w1 %+v; want w0 rank 1 after 3 loads, w1 rank 0 after 2", st0, st1)
	}
	g4 := newGroup(t, 4, c1, c0)
	g4.run(greedy(1, gold.Prompt, 64))
	rank1 := newGroup(t, 4, c0)
	rank1.step = g4.step
	if err := w1.Close(); err != nil {
		t.Fatalf("Close w1: %v", err)
	}
	if got := members(t, cli); !slices.Equal(got, []string{"w0"}) {
		t.Errorf("members after w1.Close = %v, want [w0]", got)
	}
	if _, err := g4.streams[0].Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("w1's Step stream after Close: Recv = %v, want code Unavailable", err)
	}
	rank1.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(1, 1)}}, "worker: failed")
	rank1.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{next(1, 1)}}, "worker: failed") // and stays failed
	if st := w0.Status(); st.State != worker.StateFailed || st.Err == nil {
		t.Errorf("w0 after its peer closed: Status = %+v, want failed with an error", st)
	}
	if got := health(t, conn0, ""); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("failed worker: health = %v, want NOT_SERVING", got)
	}
	// The coordinator re-plans without w1; w0 serves again.
	putPlan(t, cli, plan(5, w0), c0)
	solo5 := newGroup(t, 5, c0)
	if got := solo5.generate(1, gold.Prompt, 3); !equalIDs(got, gold.Greedy[:3]) {
		t.Errorf("epoch 5: greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy[:3]))
	}
}

// TestStartWithPlan: a worker that starts after the plan is stored loads it and closes Ready; LoadPlan
// of an epoch the watch has not delivered reads it from etcd.
func TestStartWithPlan(t *testing.T) {
	gold := readGolden(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	cfg := testConfig(t, e, "late")
	cfg.ListenAddr = "127.0.0.1:0"
	w := startWorker(t, cfg)
	if err := cli.PutPlan(testCtx(t), plan(1, w), 0); err != nil {
		t.Fatal(err)
	}
	c := tpfleetv1.NewWorkerClient(dial(t, w.Addr()))
	if _, err := c.LoadPlan(testCtx(t), &tpfleetv1.LoadPlanRequest{Epoch: 1}); err != nil {
		t.Fatalf("LoadPlan(1): %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	// A second worker with the same ID finds the plan at Start.
	w2 := startWorker(t, cfg)
	if err := cli.PutPlan(testCtx(t), plan(2, w2), 1); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w2.Ready():
	case <-testCtx(t).Done():
		t.Fatal("Ready not closed")
	}
	eventually(t, 20*time.Second, func() error {
		if st := w2.Status(); st.State != worker.StateServing || st.Epoch != 2 {
			return errors.New("w2 not serving epoch 2: " + string(st.State))
		}
		return nil
	})
	g := newGroup(t, 2, tpfleetv1.NewWorkerClient(dial(t, w2.Addr())))
	if got := g.generate(1, gold.Prompt, 3); !equalIDs(got, gold.Greedy[:3]) {
		t.Errorf("greedy ids = %s, want %s", fmtIDs(got), fmtIDs(gold.Greedy[:3]))
	}
	if _, err := c.LoadPlan(testCtx(t), &tpfleetv1.LoadPlanRequest{Epoch: 0}); status.Code(err) == codes.OK {
		t.Errorf("LoadPlan(0) on a closed worker succeeded")
	}
}

// TestConfigValidate: the Config errors.
func TestConfigValidate(t *testing.T) {
	base := worker.DefaultConfig()
	base.Etcd.Endpoints = []string{"http://127.0.0.1:2379"}
	for _, tc := range []struct {
		name   string
		mutate func(*worker.Config)
		want   error
	}{
		{"default", func(*worker.Config) {}, nil},
		{"zero durations mean defaults", func(c *worker.Config) { c.LeaseTTL, c.OpTimeout = 0, 0 }, nil},
		{"registered device", func(c *worker.Config) { c.Device = "nogpu" }, nil},
		{"tpu", func(c *worker.Config) { c.Device = "tpu" }, worker.ErrInvalidConfig},
		{"bad id", func(c *worker.Config) { c.ID = "a b" }, worker.ErrInvalidConfig},
		{"bad listen", func(c *worker.Config) { c.ListenAddr = "nowhere" }, worker.ErrInvalidConfig},
		{"bad metrics listen", func(c *worker.Config) { c.MetricsAddr = "9400" }, worker.ErrInvalidConfig},
		{"metrics listen", func(c *worker.Config) { c.MetricsAddr = "127.0.0.1:0" }, nil},
		{"negative threads", func(c *worker.Config) { c.Threads = -1 }, worker.ErrInvalidConfig},
		{"negative ttl", func(c *worker.Config) { c.LeaseTTL = -time.Second }, worker.ErrInvalidConfig},
		{"no etcd", func(c *worker.Config) { c.Etcd.Endpoints = nil }, worker.ErrInvalidConfig},
		{"gossip bind host name", func(c *worker.Config) { c.Gossip.BindAddr = "localhost" }, worker.ErrInvalidConfig},
		{"gossip join without port", func(c *worker.Config) { c.Gossip.Join = []string{"10.0.0.1"} }, worker.ErrInvalidConfig},
		{"no gossip ignores its config", func(c *worker.Config) { c.NoGossip, c.Gossip.BindAddr = true, "localhost" }, nil},
	} {
		cfg := base
		tc.mutate(&cfg)
		err := cfg.Validate()
		if (tc.want == nil) != (err == nil) || (tc.want != nil && !errors.Is(err, tc.want)) {
			t.Errorf("%s: Validate() = %v, want %v", tc.name, err, tc.want)
		}
		if _, nerr := worker.New(cfg); (nerr == nil) != (err == nil) {
			t.Errorf("%s: New() = %v, Validate() = %v: want both to agree", tc.name, nerr, err)
		}
	}
}

// TestApplyTorchrunEnv: torchrun's variables become labels, and LOCAL_RANK the device index unless the
// flag was given.
func TestApplyTorchrunEnv(t *testing.T) {
	env := map[string]string{"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
	getenv := func(k string) string { return env[k] }
	var cfg worker.Config
	if err := cfg.ApplyTorchrunEnv(getenv, false); err != nil {
		t.Fatal(err)
	}
	if cfg.DeviceIndex != 1 || len(cfg.Labels) != 3 || cfg.Labels["RANK"] != "5" || cfg.Labels["WORLD_SIZE"] != "8" {
		t.Errorf("ApplyTorchrunEnv(%v) = index %d, labels %v; want index 1 and the three variables", env, cfg.DeviceIndex, cfg.Labels)
	}
	cfg = worker.Config{DeviceIndex: 3}
	if err := cfg.ApplyTorchrunEnv(getenv, true); err != nil || cfg.DeviceIndex != 3 {
		t.Errorf("ApplyTorchrunEnv with --device-index 3 = index %d, %v; want 3, nil", cfg.DeviceIndex, err)
	}
	env["LOCAL_RANK"] = "x"
	if err := cfg.ApplyTorchrunEnv(getenv, false); !errors.Is(err, worker.ErrInvalidConfig) {
		t.Errorf("ApplyTorchrunEnv with LOCAL_RANK=x = %v, want ErrInvalidConfig", err)
	}
}

// nogpu is a device backend registered for these tests that cannot open on this host, as cuda where there
// is no GPU: its error wraps backend.ErrUnavailable and names the missing library.
func init() {
	backend.Register("nogpu", backend.Driver{
		Open: func(context.Context, backend.Options) (backend.Ops, error) {
			return nil, fmt.Errorf("nogpu: %w: libnogpu.so.1 not found", backend.ErrUnavailable)
		},
		Devices:    func() (int, error) { return 0, nil },
		DeviceComm: true,
	})
}

// TestStartUnavailableDevice: where a registered backend cannot open (cuda without a GPU), Start fails at
// once with ErrDeviceUnavailable and the backend's one-line error naming the library, before it
// registers anything. cmd/tpfleet's tests check the same with the real cuda backend.
func TestStartUnavailableDevice(t *testing.T) {
	e := startEtcd(t)
	cfg := testConfig(t, e, "gpu-less")
	cfg.Device, cfg.DeviceIndex = "nogpu", 1
	w, err := worker.New(cfg)
	if err != nil {
		t.Fatalf("New(nogpu) = %v, want nil: New opens nothing", err)
	}
	start := time.Now()
	err = w.Start(testCtx(t))
	if !errors.Is(err, worker.ErrDeviceUnavailable) || !errors.Is(err, backend.ErrUnavailable) ||
		!strings.Contains(err.Error(), "nogpu:1") || !strings.Contains(err.Error(), "libnogpu.so.1") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Start(nogpu) = %v, want one line wrapping ErrDeviceUnavailable and backend.ErrUnavailable, naming nogpu:1 and the library", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("Start(nogpu) took %v", d)
	}
	if err := w.Close(); err != nil {
		t.Errorf("Close after a failed Start: %v", err)
	}
	members, _, err := newClient(t, e).Members(testCtx(t))
	if err != nil || len(members) != 0 {
		t.Errorf("members after a failed Start = %v, %v; want none", members, err)
	}
}
