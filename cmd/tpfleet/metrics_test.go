package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// freePort returns a loopback host:port that was free a moment ago, for a flag that cannot take port 0
// and report the port back.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// scrape fetches url and parses it with Prometheus' text parser.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s = %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: parse: %v", url, err)
	}
	return fams
}

// metricValue is a metric's value in fams: a counter's or gauge's value, a histogram's sample count,
// selected by labels ("k=v" pairs); -1 when absent.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	f, ok := fams[name]
	if !ok {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for _, kv := range labels {
			k, v, _ := strings.Cut(kv, "=")
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue()
		case m.GetHistogram() != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// TestMetrics is issue 17's metrics acceptance: separate processes (etcd, a coordinator, a CPU worker)
// serve /metrics in Prometheus' text format, which expfmt parses; the worker's show its weight load done
// (bytes read = bytes planned), and after requests the coordinator's counters and latency histograms have
// moved by what the requests did, as have the worker's step counters.
func TestMetrics(t *testing.T) {
	g := readGolden(t, "moe-top1")
	fixture := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	wm, hm := freePort(t), freePort(t)
	startProc(t, "worker", "worker", "--etcd", ep, "--threads", "1", "--metrics-listen", wm)
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", fixture, "--tp", "1",
		"--listen", "127.0.0.1:0", "--http-listen", hm, "--settle", "50ms")
	addr := coord.line(t)
	waitCoordinator(t, addr)

	wurl, curl := "http://"+wm+"/metrics", "http://"+hm+"/metrics"
	w := scrape(t, wurl)
	for _, c := range []struct {
		name string
		cond bool
	}{
		{"tpfleet_weight_load_bytes_total > 0", metricValue(w, "tpfleet_weight_load_bytes_total") > 0},
		{"tpfleet_weight_load_bytes = _total", metricValue(w, "tpfleet_weight_load_bytes") == metricValue(w, "tpfleet_weight_load_bytes_total")},
		{"tpfleet_weight_load_tensors = _total > 0", metricValue(w, "tpfleet_weight_load_tensors") == metricValue(w, "tpfleet_weight_load_tensors_total") && metricValue(w, "tpfleet_weight_load_tensors") > 0},
		{"tpfleet_weight_load_progress = 1", metricValue(w, "tpfleet_weight_load_progress") == 1},
		{"tpfleet_worker_weight_loads_total = 1", metricValue(w, "tpfleet_worker_weight_loads_total") == 1},
		{"tpfleet_worker_state{state=serving} = 1", metricValue(w, "tpfleet_worker_state", "state=serving") == 1},
		{"tpfleet_worker_plan_epoch >= 1", metricValue(w, "tpfleet_worker_plan_epoch") >= 1},
		{"tpfleet_worker_rank = 0", metricValue(w, "tpfleet_worker_rank") == 0},
	} {
		if !c.cond {
			t.Errorf("worker metrics: want %s", c.name)
		}
	}

	before := scrape(t, curl)
	const n = 3
	generateConcurrently(t, addr, g, n)
	after := scrape(t, curl)
	delta := func(name string, labels ...string) float64 {
		return metricValue(after, name, labels...) - max(0, metricValue(before, name, labels...))
	}
	steps := len(g.greedy) // a greedy request of len(g.greedy) tokens
	for _, c := range []struct {
		name        string
		got, want   float64
		atLeastWant bool
	}{
		{"tpfleet_requests_total{outcome=length}", delta("tpfleet_requests_total", "outcome=length"), n, false},
		{"tpfleet_request_success_total{finished_reason=length}", delta("tpfleet_request_success_total", "finished_reason=length"), n, false},
		{"tpfleet_prompt_tokens_total", delta("tpfleet_prompt_tokens_total"), float64(n * len(g.prompt)), false},
		{"tpfleet_generation_tokens_total", delta("tpfleet_generation_tokens_total"), float64(n * steps), false},
		{"tpfleet_time_to_first_token_seconds count", delta("tpfleet_time_to_first_token_seconds"), n, false},
		{"tpfleet_inter_token_latency_seconds count", delta("tpfleet_inter_token_latency_seconds"), float64(n * (steps - 1)), false},
		{"tpfleet_e2e_request_latency_seconds count", delta("tpfleet_e2e_request_latency_seconds"), n, false},
		{"tpfleet_request_queue_time_seconds count", delta("tpfleet_request_queue_time_seconds"), n, false},
		{"tpfleet_step_duration_seconds{group=0} count", delta("tpfleet_step_duration_seconds", "group=0"), float64(steps), true},
		{"tpfleet_step_batch_size{group=0} count", delta("tpfleet_step_batch_size", "group=0"), float64(steps), true},
		{"tpfleet_num_requests_waiting", metricValue(after, "tpfleet_num_requests_waiting"), 0, false},
		{"tpfleet_num_requests_running", metricValue(after, "tpfleet_num_requests_running"), 0, false},
		{"tpfleet_coordinator_leader", metricValue(after, "tpfleet_coordinator_leader"), 1, false},
		{"tpfleet_plan_epoch", metricValue(after, "tpfleet_plan_epoch"), 1, true},
		{"tpfleet_plan_groups_ready", metricValue(after, "tpfleet_plan_groups_ready"), 1, false},
		{"tpfleet_requests_total{outcome=error}", delta("tpfleet_requests_total", "outcome=error"), 0, false},
	} {
		if ok := c.got == c.want || (c.atLeastWant && c.got >= c.want); !ok {
			t.Errorf("coordinator metrics after %d requests: %s moved by %v, want %s%v", n, c.name, c.got, map[bool]string{true: ">= "}[c.atLeastWant], c.want)
		}
	}

	// The worker's steps and KV cache: the sequences are released (the step after a request ends
	// releases them, so wait for it).
	err := retry(10*time.Second, func() error {
		w := scrape(t, wurl)
		if got := metricValue(w, "tpfleet_worker_steps_total", "result=ok"); got < float64(steps) {
			return fmt.Errorf("tpfleet_worker_steps_total{result=ok} = %v, want >= %d", got, steps)
		}
		if got := metricValue(w, "tpfleet_worker_step_duration_seconds"); got < float64(steps) {
			return fmt.Errorf("tpfleet_worker_step_duration_seconds count = %v, want >= %d", got, steps)
		}
		if got := metricValue(w, "tpfleet_kv_cache_usage_perc"); got < 0 || got > 1 {
			return fmt.Errorf("tpfleet_kv_cache_usage_perc = %v, want in [0, 1]", got)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// retry calls f every 20 ms until it returns nil or d has passed; it returns f's last error.
func retry(d time.Duration, f func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
