package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// loadFlags are bench --addr's flags: load on a running coordinator.
type loadFlags struct {
	addr        string
	model       string
	concurrency int
	promptLen   int
	maxTokens   int
	requests    int
	duration    time.Duration
	idRange     int
	seed        uint64
	wait        time.Duration
	json        bool
	token       string
	tls         tlsFlags
}

// loadResult is what bench --addr reports, as vLLM's benchmark_serving does. Latencies are in
// milliseconds.
type loadResult struct {
	Addr          string  `json:"addr"`
	Concurrency   int     `json:"concurrency"`
	PromptLen     int     `json:"prompt_len"`
	MaxTokens     int     `json:"max_tokens"`
	Completed     int     `json:"completed"`
	Errors        int     `json:"errors"`
	FirstError    string  `json:"first_error,omitempty"`
	DurationS     float64 `json:"duration_s"`
	PromptTokens  int     `json:"total_prompt_tokens"`
	OutputTokens  int     `json:"total_output_tokens"`
	RequestRate   float64 `json:"request_throughput"`     // completed requests per second
	OutputTokRate float64 `json:"output_throughput"`      // generated tokens per second
	TotalTokRate  float64 `json:"total_token_throughput"` // prompt and generated tokens per second
	TTFT          latency `json:"ttft_ms"`                // time to first token
	ITL           latency `json:"itl_ms"`                 // time between tokens of a request
	TPOT          latency `json:"tpot_ms"`                // (e2e - ttft) / (tokens - 1), per request
	E2E           latency `json:"e2e_ms"`                 // request latency
	StartedAt     string  `json:"started_at"`             // RFC 3339, UTC
	Note          string  `json:"note,omitempty"`         // how the load was made
}

// latency summarises samples in milliseconds.
type latency struct {
	Mean float64 `json:"mean"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	N    int     `json:"n"`
}

// summarize returns the mean and the 50th, 90th and 99th percentiles (linear interpolation, as numpy's
// default) of samples given in seconds.
func summarize(samples []float64) latency {
	if len(samples) == 0 {
		return latency{}
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	sum := 0.0
	for _, v := range s {
		sum += v
	}
	pct := func(p float64) float64 {
		pos := p / 100 * float64(len(s)-1)
		lo := int(math.Floor(pos))
		hi := min(lo+1, len(s)-1)
		return s[lo] + (s[hi]-s[lo])*(pos-float64(lo))
	}
	ms := func(v float64) float64 { return math.Round(v*1e6) / 1e3 }
	return latency{Mean: ms(sum / float64(len(s))), P50: ms(pct(50)), P90: ms(pct(90)), P99: ms(pct(99)), N: len(s)}
}

// isLoadBench reports whether bench's arguments ask for the serving benchmark (--addr).
func isLoadBench(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && name == "addr" {
			return true
		}
	}
	return false
}

// runLoadBench is `tpfleet bench --addr HOST:PORT`: --concurrency clients send greedy requests of
// --prompt-len random prompt ids and --max-tokens new tokens (eos ignored) to a coordinator's Generate
// stream, for --duration or until --requests have been sent, and it reports time to first token,
// inter-token latency, time per output token and end-to-end latency (mean, p50, p90, p99), throughput
// and errors: vLLM's benchmark_serving numbers.
func runLoadBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f loadFlags
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.addr, "addr", "", "the coordinator's gRPC address, host:port (tpfleet serve's --listen)")
	fs.StringVar(&f.model, "model", "", "the served model's name (empty: the only one)")
	fs.IntVar(&f.concurrency, "concurrency", 4, "requests in flight at once")
	fs.IntVar(&f.promptLen, "prompt-len", 32, "prompt tokens of each request")
	fs.IntVar(&f.maxTokens, "max-tokens", 32, "new tokens of each request (eos ignored, so every request generates this many)")
	fs.IntVar(&f.requests, "requests", 0, "requests to send, without --duration (0: 4 × --concurrency)")
	fs.DurationVar(&f.duration, "duration", 0, "send requests for this long instead of a fixed number (0: --requests)")
	fs.IntVar(&f.idRange, "id-range", 256, "prompt ids are drawn uniformly from [1, id-range); keep it within the model's vocabulary")
	fs.Uint64Var(&f.seed, "seed", 1, "seed of the prompt ids")
	fs.DurationVar(&f.wait, "wait", 30*time.Second, "wait up to this long for the coordinator to serve first")
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of the table")
	tokenFlag(fs, &f.token, "the API key the coordinator requires")
	f.tls.add(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case f.addr == "":
		return usagef("--addr is required")
	case f.concurrency < 1 || f.promptLen < 1 || f.maxTokens < 1 || f.requests < 0 || f.duration < 0 || f.idRange < 2:
		return usagef("--concurrency, --prompt-len and --max-tokens must be positive, --requests and --duration not negative, --id-range at least 2")
	}
	if f.requests == 0 && f.duration == 0 {
		f.requests = 4 * f.concurrency
	}
	tc, err := f.tls.clientTLS()
	if err != nil {
		return usagef("%v", err)
	}
	cli, err := client.Dial(f.addr, client.WithTLS(tc), client.WithToken(f.token))
	if err != nil {
		return err
	}
	defer cli.Close()
	if f.wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, f.wait)
		err := cli.WaitReady(wctx, 100*time.Millisecond)
		cancel()
		if err != nil {
			return fmt.Errorf("coordinator at %s: %w", f.addr, err)
		}
	}
	res, err := loadBench(ctx, cli, f)
	if err != nil {
		return err
	}
	if f.json {
		return json.NewEncoder(stdout).Encode(res)
	}
	return writeLoadTable(stdout, res)
}

// reqStats is one request's measurements, in seconds.
type reqStats struct {
	ttft, e2e float64
	itl       []float64
	tokens    int
	err       error
}

// loadBench runs the load and summarises it.
func loadBench(ctx context.Context, cli *client.Client, f loadFlags) (loadResult, error) {
	var deadline time.Time
	if f.duration > 0 {
		deadline = time.Now().Add(f.duration)
	}
	var (
		mu    sync.Mutex
		sent  int
		stats []reqStats
	)
	// next reserves the next request's number, or reports that the load is over.
	next := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if ctx.Err() != nil || (!deadline.IsZero() && time.Now().After(deadline)) || (deadline.IsZero() && sent >= f.requests) {
			return 0, false
		}
		sent++
		return sent, true
	}
	start := time.Now()
	var wg sync.WaitGroup
	for range f.concurrency {
		wg.Go(func() {
			for {
				n, ok := next()
				if !ok {
					return
				}
				s := oneRequest(ctx, cli, f, n)
				mu.Lock()
				stats = append(stats, s)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	took := time.Since(start).Seconds()
	if ctx.Err() != nil {
		return loadResult{}, ctx.Err()
	}
	r := loadResult{Addr: f.addr, Concurrency: f.concurrency, PromptLen: f.promptLen, MaxTokens: f.maxTokens,
		DurationS: math.Round(took*1e3) / 1e3, StartedAt: start.UTC().Format(time.RFC3339),
		Note: "greedy, eos ignored, random prompt ids; gRPC Generate streams"}
	var ttft, itl, tpot, e2e []float64
	for _, s := range stats {
		if s.err != nil {
			r.Errors++
			if r.FirstError == "" {
				r.FirstError = s.err.Error()
			}
			continue
		}
		r.Completed++
		r.PromptTokens += f.promptLen
		r.OutputTokens += s.tokens
		ttft = append(ttft, s.ttft)
		e2e = append(e2e, s.e2e)
		itl = append(itl, s.itl...)
		if s.tokens > 1 {
			tpot = append(tpot, (s.e2e-s.ttft)/float64(s.tokens-1))
		}
	}
	r.TTFT, r.ITL, r.TPOT, r.E2E = summarize(ttft), summarize(itl), summarize(tpot), summarize(e2e)
	if took > 0 {
		r.RequestRate = math.Round(float64(r.Completed)/took*1e3) / 1e3
		r.OutputTokRate = math.Round(float64(r.OutputTokens)/took*10) / 10
		r.TotalTokRate = math.Round(float64(r.OutputTokens+r.PromptTokens)/took*10) / 10
	}
	return r, nil
}

// oneRequest sends request n and times its stream. A chunk of k ids that arrives d after the previous
// one counts as k inter-token gaps of d/k.
func oneRequest(ctx context.Context, cli *client.Client, f loadFlags, n int) reqStats {
	rng := rand.New(rand.NewPCG(f.seed, uint64(n)))
	prompt := make([]int, f.promptLen)
	for i := range prompt {
		prompt[i] = 1 + rng.IntN(f.idRange-1)
	}
	req := client.GenerateRequest{Model: f.model, PromptIDs: prompt, MaxTokens: f.maxTokens, IgnoreEOS: true, Sampling: &sample.Params{TopP: 1}}
	var s reqStats
	start := time.Now()
	last := start
	_, err := cli.Generate(ctx, req, func(ids []int, _ string) error {
		if len(ids) == 0 {
			return nil
		}
		now := time.Now()
		if s.tokens == 0 {
			s.ttft = now.Sub(start).Seconds()
			for range len(ids) - 1 {
				s.itl = append(s.itl, 0)
			}
		} else {
			gap := now.Sub(last).Seconds() / float64(len(ids))
			for range ids {
				s.itl = append(s.itl, gap)
			}
		}
		s.tokens += len(ids)
		last = now
		return nil
	})
	s.e2e = time.Since(start).Seconds()
	if err != nil {
		if st, ok := status.FromError(err); ok {
			err = fmt.Errorf("%s: %s", st.Code(), st.Message())
		}
		s.err = err
	} else if s.tokens == 0 {
		s.err = errors.New("no tokens generated")
	}
	return s
}

// writeLoadTable prints r as a table.
func writeLoadTable(w io.Writer, r loadResult) error {
	if _, err := fmt.Fprintln(w, "============ Serving Benchmark Result ============"); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "Coordinator:\t%s\n", r.Addr)
	fmt.Fprintf(tw, "Concurrency:\t%d\n", r.Concurrency)
	fmt.Fprintf(tw, "Successful requests:\t%d\n", r.Completed)
	fmt.Fprintf(tw, "Failed requests:\t%d\n", r.Errors)
	fmt.Fprintf(tw, "Benchmark duration (s):\t%.2f\n", r.DurationS)
	fmt.Fprintf(tw, "Total input tokens:\t%d\n", r.PromptTokens)
	fmt.Fprintf(tw, "Total generated tokens:\t%d\n", r.OutputTokens)
	fmt.Fprintf(tw, "Request throughput (req/s):\t%.2f\n", r.RequestRate)
	fmt.Fprintf(tw, "Output token throughput (tok/s):\t%.1f\n", r.OutputTokRate)
	fmt.Fprintf(tw, "Total token throughput (tok/s):\t%.1f\n", r.TotalTokRate)
	if err := tw.Flush(); err != nil {
		return err
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "(ms)\tmean\tp50\tp90\tp99\t\n")
	for _, row := range []struct {
		name string
		l    latency
	}{{"TTFT", r.TTFT}, {"TPOT", r.TPOT}, {"ITL", r.ITL}, {"E2E", r.E2E}} {
		fmt.Fprintf(tw, "%s\t%.2f\t%.2f\t%.2f\t%.2f\t\n", row.name, row.l.Mean, row.l.P50, row.l.P90, row.l.P99)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.FirstError != "" {
		if _, err := fmt.Fprintf(w, "first error: %s\n", r.FirstError); err != nil {
			return err
		}
	}
	_, err := fmt.Fprintln(w, "==================================================")
	return err
}
