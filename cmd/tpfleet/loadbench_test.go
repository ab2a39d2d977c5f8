package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBenchAddr: tpfleet bench --addr against tpfleet serve on the fixture completes every request and
// prints vLLM benchmark_serving's table (and, with --json, its numbers); --duration bounds a run by time.
func TestBenchAddr(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, stderr := startServe(t, ctx, "--model", filepath.Join(fixtures, "moe-top1"), "--tp", "2",
		"--http-listen", "", "--listen", "127.0.0.1:0", "--log-level", "warn")
	waitCoordinator(t, addr)

	c, stdout, errOut := tpfleet(t, "bench", "--addr", addr, "--concurrency", "2", "--prompt-len", "8", "--max-tokens", "4", "--requests", "4")
	if c != 0 {
		t.Fatalf("bench --addr = exit %d (%s)", c, errOut)
	}
	t.Logf("bench --addr:\n%s", stdout)
	for _, want := range []string{"Serving Benchmark Result", "Successful requests:", "Output token throughput (tok/s):", "TTFT", "ITL", "E2E", "p99"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("bench --addr printed no %q:\n%s", want, stdout)
		}
	}

	c, stdout, errOut = tpfleet(t, "bench", "--addr="+addr, "--concurrency", "3", "--prompt-len", "5", "--max-tokens", "3", "--requests", "6", "--json")
	var r loadResult
	if err := json.Unmarshal([]byte(stdout), &r); c != 0 || err != nil {
		t.Fatalf("bench --addr --json = exit %d, %q (%s): %v", c, stdout, errOut, err)
	}
	if r.Completed != 6 || r.Errors != 0 || r.OutputTokens != 18 || r.PromptTokens != 30 || r.TTFT.N != 6 || r.ITL.N != 12 || r.E2E.N != 6 ||
		r.OutputTokRate <= 0 || !(r.TTFT.P50 > 0 && r.TTFT.P50 <= r.TTFT.P99 && r.E2E.P50 >= r.TTFT.P50) {
		t.Errorf("bench --addr --json = %+v; want 6 requests of 3 tokens, sane latencies", r)
	}

	start := time.Now()
	c, stdout, errOut = tpfleet(t, "bench", "--addr", addr, "--concurrency", "2", "--prompt-len", "4", "--max-tokens", "2", "--duration", "300ms", "--json")
	if err := json.Unmarshal([]byte(stdout), &r); c != 0 || err != nil || r.Completed < 1 || r.Errors != 0 {
		t.Errorf("bench --addr --duration 300ms = exit %d, %q (%s): %v", c, stdout, errOut, err)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("bench --duration 300ms took %v", took)
	}

	for _, args := range [][]string{
		{"bench", "--addr", addr, "--concurrency", "0"},
		{"bench", "--addr", addr, "extra"},
	} {
		if c, _, _ := tpfleet(t, args...); c != 2 {
			t.Errorf("tpfleet %s = exit %d, want 2", strings.Join(args, " "), c)
		}
	}
	cancel()
	select {
	case <-code:
	case <-time.After(30 * time.Second):
		t.Errorf("serve did not stop:\n%s", stderr)
	}
}

func TestSummarize(t *testing.T) {
	got := summarize([]float64{0.004, 0.001, 0.003, 0.002})
	want := latency{Mean: 2.5, P50: 2.5, P90: 3.7, P99: 3.97, N: 4}
	if got != want {
		t.Errorf("summarize(1..4 ms) = %+v, want %+v", got, want)
	}
	if got := summarize(nil); got != (latency{}) {
		t.Errorf("summarize(nil) = %+v, want zero", got)
	}
}
