package worker_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
	"github.com/tpfleet/tpfleet/worker"
)

// getMetrics fetches the worker's metrics text.
func getMetrics(t *testing.T, w *worker.Worker) string {
	t.Helper()
	resp, err := http.Get("http://" + w.MetricsAddr() + worker.MetricsPath)
	if err != nil {
		t.Fatalf("GET metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET metrics = %s, %v", resp.Status, err)
	}
	return string(body)
}

// TestMetricsListener: with MetricsAddr a worker serves its metrics: idle before a plan, then serving
// the epoch with its weight load complete, the steps it ran and the KV cache of the sequence it holds;
// Close closes the listener. Without MetricsAddr there is none.
func TestMetricsListener(t *testing.T) {
	gold := readGolden(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	cfg := testConfig(t, e, "w0")
	cfg.MetricsAddr = "127.0.0.1:0"
	w := startWorker(t, cfg)
	if w.MetricsAddr() == "" {
		t.Fatal("MetricsAddr() is empty with Config.MetricsAddr set")
	}
	if m := getMetrics(t, w); !strings.Contains(m, "tpfleet_worker_state{state=\"idle\"} 1\n") || !strings.Contains(m, "tpfleet_weight_load_progress 0\n") {
		t.Errorf("metrics before a plan: want idle, no load:\n%s", m)
	}

	c := tpfleetv1.NewWorkerClient(dial(t, w.Addr()))
	putPlan(t, cli, plan(1, w), c)
	g := newGroup(t, 1, c)
	g.run(greedy(1, gold.Prompt, len(gold.Prompt)+2))
	m := getMetrics(t, w)
	for _, want := range []string{
		"tpfleet_worker_state{state=\"serving\"} 1\n",
		"tpfleet_worker_plan_epoch 1\n",
		"tpfleet_worker_rank 0\n",
		"tpfleet_weight_load_progress 1\n",
		"tpfleet_worker_weight_loads_total 1\n",
		"tpfleet_worker_steps_total{result=\"ok\"} 1\n",
		fmt.Sprintf("tpfleet_kv_cache_tokens %d\n", len(gold.Prompt)),
		fmt.Sprintf("tpfleet_kv_cache_capacity_tokens %d\n", len(gold.Prompt)+2),
		"tpfleet_worker_startup_phase_seconds{phase=\"weight-read\"} ",
		"tpfleet_worker_startup_phase_seconds{phase=\"weight-copy\"} ",
		"tpfleet_worker_startup_phase_seconds{phase=\"nccl\"} ",
		"tpfleet_worker_startup_phase_seconds{phase=\"first-step\"} ",
		"tpfleet_worker_startup_phase_start_seconds{phase=\"weights\"} ",
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics after a step: no %q in\n%s", strings.TrimSpace(want), m)
		}
	}

	// Status reports the same phases, the pipeline's read among them.
	st, err := c.Status(t.Context(), &tpfleetv1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	phases := map[string]*tpfleetv1.StartupPhase{}
	for _, p := range st.GetStartupPhases() {
		phases[p.GetName()] = p
	}
	for _, name := range []string{"process", "device", "weights", "weight-read", "weight-copy", "nccl", "first-step", "ready"} {
		if phases[name] == nil {
			t.Errorf("Status().StartupPhases has no %q: %v", name, st.GetStartupPhases())
		}
	}
	if r := phases["weight-read"]; r != nil && (r.GetTookSeconds() <= 0 || !strings.Contains(r.GetDetail(), "readers")) {
		t.Errorf("weight-read phase = %v, want a positive time and the readers", r)
	}

	addr := w.MetricsAddr()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	client := http.Client{Timeout: 2 * time.Second}
	if resp, err := client.Get("http://" + addr + worker.MetricsPath); err == nil {
		resp.Body.Close()
		t.Errorf("GET metrics after Close = %s, want a refused connection", resp.Status)
	}

	plain := startWorker(t, testConfig(t, e, "w1"))
	if got := plain.MetricsAddr(); got != "" {
		t.Errorf("MetricsAddr() without Config.MetricsAddr = %q, want empty", got)
	}
}
