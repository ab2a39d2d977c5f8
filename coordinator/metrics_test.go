package coordinator

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// value reads a counter's, gauge's or histogram's (sample count) value.
func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	switch {
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetHistogram() != nil:
		return float64(m.GetHistogram().GetSampleCount())
	}
	t.Fatalf("metric %v has no value", c.Desc())
	return 0
}

// TestMetricsOutcomes: every way a request ends is counted once under its outcome: refused with a full
// queue (rejected), abandoned by its client while queued (abort), finished (length, with its latencies);
// the queue and batch gauges follow.
func TestMetricsOutcomes(t *testing.T) {
	cl := clusterClient(t)
	ws, _ := startWorkers(t, cl, 2)
	entered, release := holdSteps(t, ws[0], 1)
	cfg := testConfig(t)
	cfg.MaxQueue, cfg.MaxBatch, cfg.TokenBudget = 1, 1, 4
	c, _, base := startGateway(t, cfg)
	waitReady(t, c)
	m := c.metrics
	outcome := func(o string) float64 { return value(t, m.requests.WithLabelValues(o)) }

	done := make(chan int, 1)
	go func() {
		resp, err := http.Post(base+"/v1/completions", "application/json", strings.NewReader(`{"prompt":[100,101],"max_tokens":3}`))
		if err != nil {
			done <- 0
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	<-entered // the first request runs, its first step held

	ctx, cancel := context.WithCancel(context.Background())
	queued := make(chan struct{})
	go func() {
		defer close(queued)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", strings.NewReader(`{"prompt":[1],"max_tokens":2}`))
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	eventually(t, "a queued request", func() bool { return c.queue.len() == 1 })
	if got := value(t, m.running); got != 1 {
		t.Errorf("tpfleet_num_requests_running = %v with one request in the batch, want 1", got)
	}

	if code, _ := post(t, base, "/v1/completions", `{"prompt":[1],"max_tokens":2}`); code != http.StatusTooManyRequests {
		t.Fatalf("third request = %d, want 429", code)
	}
	if got := outcome(outcomeRejected); got != 1 {
		t.Errorf("rejected = %v, want 1", got)
	}

	cancel() // the queued request's client goes away
	<-queued
	eventually(t, "the abandoned request counted", func() bool { return outcome(outcomeAbort) == 1 })

	release()
	if code := <-done; code != http.StatusOK {
		t.Fatalf("first request = %d, want 200", code)
	}
	eventually(t, "the finished request counted", func() bool { return outcome(outcomeLength) == 1 })
	for _, tc := range []struct {
		name string
		got  float64
		want float64
	}{
		{"stop", outcome(outcomeStop), 0},
		{"error", outcome(outcomeError), 0},
		{"abort", outcome(outcomeAbort), 1},
		{"ttft count", value(t, m.ttft), 1},
		{"itl count", value(t, m.itl), 2},
		{"e2e count", value(t, m.e2e), 1},
		{"queue time count", value(t, m.queueTime), 1},
		{"prompt tokens", value(t, m.promptTokens), 2},
		{"generated tokens", value(t, m.generatedTokens), 3},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
	eventually(t, "an empty batch", func() bool { return value(t, m.running) == 0 })
}
