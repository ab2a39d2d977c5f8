package coordinator

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MetricsPath is where the coordinator's HTTP gateway serves its Prometheus metrics (text format).
const MetricsPath = "/metrics"

// Request outcomes, the outcome label of tpfleet_requests_total.
const (
	outcomeStop     = FinishStop   // finished at an eos, stop id or stop string
	outcomeLength   = FinishLength // finished at max_tokens
	outcomeError    = "error"      // ended with an error after it was admitted (a failed step, not placed)
	outcomeAbort    = "abort"      // its client went away before it ended
	outcomeRejected = "rejected"   // refused at admission: queue full, standby, no plan, shutting down
)

// Histogram buckets, in seconds. vLLM's, with finer steps at the short end for GPU decode steps of a
// millisecond or two.
var (
	ttftBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560}
	itlBuckets  = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80}
	e2eBuckets  = []float64{0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680}
	stepBuckets = []float64{0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1, 2, 4, 8, 16}
	// Sizes of a step: sequences and tokens, powers of two.
	batchBuckets = prometheus.ExponentialBuckets(1, 2, 10)     // 1 .. 512
	tokenBuckets = prometheus.ExponentialBuckets(1, 2, 14)     // 1 .. 8192
	countBuckets = prometheus.ExponentialBuckets(1, 4, 10)     // request lengths: 1 .. 262144
	queueBuckets = prometheus.ExponentialBuckets(0.001, 4, 12) // 1 ms .. ~70 min
)

// metrics are a coordinator's Prometheus metrics, in their own registry (never the process-wide default,
// so that several coordinators in one process, as in tests, keep theirs apart). The names mirror vLLM's
// (vllm:num_requests_running becomes tpfleet_num_requests_running, ...), so that its dashboards port by
// a prefix change; what only tpfleet has (plan epoch, per-group steps, leadership) is added. Safe for
// concurrent use.
type metrics struct {
	reg *prometheus.Registry

	requests        *prometheus.CounterVec // outcome
	requestSuccess  *prometheus.CounterVec // finished_reason, as vLLM's
	running         prometheus.Gauge
	promptTokens    prometheus.Counter
	generatedTokens prometheus.Counter
	ttft            prometheus.Histogram
	itl             prometheus.Histogram
	e2e             prometheus.Histogram
	queueTime       prometheus.Histogram
	promptLen       prometheus.Histogram
	generationLen   prometheus.Histogram

	stepTime     *prometheus.HistogramVec // group
	stepSeqs     *prometheus.HistogramVec // group
	stepTokens   *prometheus.HistogramVec // group
	stepFailures *prometheus.CounterVec   // group
	groupRunning *prometheus.GaugeVec     // group
	resumedTotal prometheus.Counter
	kvBlocks     *prometheus.GaugeVec // group
	kvUsed       *prometheus.GaugeVec // group
	kvWaited     prometheus.Counter
}

// newMetrics makes the coordinator's metrics and registers them, with the Go runtime's and the
// process's collectors, in a new registry. queueLen and state are read at scrape time.
func newMetrics(queueLen func() int, state func() (leader bool, epoch int64, tp, groups, ready int), experts func() (ExpertLoad, bool)) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	f := factory{m.reg}
	m.requests = f.counterVec("tpfleet_requests_total", "Requests by outcome: stop and length (finished), error (failed after admission), abort (the client went away), rejected (refused at admission).", "outcome")
	m.requestSuccess = f.counterVec("tpfleet_request_success_total", "Finished requests by finish reason (vLLM's vllm:request_success_total).", "finished_reason")
	m.running = f.gauge("tpfleet_num_requests_running", "Requests in a TP group's batch.")
	m.promptTokens = f.counter("tpfleet_prompt_tokens_total", "Prompt tokens of admitted requests.")
	m.generatedTokens = f.counter("tpfleet_generation_tokens_total", "Tokens generated and streamed to clients.")
	m.ttft = f.histogram("tpfleet_time_to_first_token_seconds", "Time from admission to the first generated token.", ttftBuckets)
	m.itl = f.histogram("tpfleet_inter_token_latency_seconds", "Time between two generated tokens of a request.", itlBuckets)
	m.e2e = f.histogram("tpfleet_e2e_request_latency_seconds", "Time from admission to the end of a request that finished.", e2eBuckets)
	m.queueTime = f.histogram("tpfleet_request_queue_time_seconds", "Time a request waited in the queue before its group took it first.", queueBuckets)
	m.promptLen = f.histogram("tpfleet_request_prompt_tokens", "Prompt tokens per finished request.", countBuckets)
	m.generationLen = f.histogram("tpfleet_request_generation_tokens", "Generated tokens per finished request.", countBuckets)
	m.stepTime = f.histogramVec("tpfleet_step_duration_seconds", "Time of one step of a TP group: the StepRequest to every rank until the last rank answers.", stepBuckets, "group")
	m.stepSeqs = f.histogramVec("tpfleet_step_batch_size", "Sequences fed in one step of a TP group.", batchBuckets, "group")
	m.stepTokens = f.histogramVec("tpfleet_iteration_tokens", "Tokens fed in one step of a TP group: decodes plus prompt pieces (vLLM's vllm:iteration_tokens_total).", tokenBuckets, "group")
	m.stepFailures = f.counterVec("tpfleet_step_failures_total", "Steps of a TP group that failed (a lost worker, a failed or late step); the requests resume elsewhere.", "group")
	m.groupRunning = f.gaugeVec("tpfleet_group_running_sequences", "Sequences in a TP group's batch.", "group")
	m.resumedTotal = f.counter("tpfleet_requests_resumed_total", "Requests handed back by a group that stopped or failed, to run again elsewhere (re-prefill).")
	m.kvBlocks = f.gaugeVec("tpfleet_kv_blocks", "KV cache blocks of a TP group: the smallest of its workers' memory plans.", "group")
	m.kvUsed = f.gaugeVec("tpfleet_kv_blocks_used", "KV cache blocks a TP group's batch reserves, each sequence at its worst case (prompt + max_tokens).", "group")
	m.kvWaited = f.counter("tpfleet_requests_kv_waited_total", "Requests that waited at the head of the queue for KV blocks to free (admission control).")
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tpfleet_num_requests_waiting", Help: "Requests waiting in the queue for a place in a batch."},
			func() float64 { return float64(queueLen()) }),
		newStateCollector(state),
		newExpertsCollector(experts),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	for _, o := range []string{outcomeStop, outcomeLength, outcomeError, outcomeAbort, outcomeRejected} {
		m.requests.WithLabelValues(o) // every outcome is exported from the start, at 0
	}
	for _, r := range []string{FinishStop, FinishLength} {
		m.requestSuccess.WithLabelValues(r)
	}
	return m
}

// handler serves the registry in Prometheus' exposition formats.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// rejected counts a request refused at admission.
func (m *metrics) rejected() { m.requests.WithLabelValues(outcomeRejected).Inc() }

// admitted starts a request's clock; the caller queues it next.
func (m *metrics) admitted(r *request) {
	r.obs = &requestObs{m: m, admitted: time.Now(), prompt: len(r.prompt)}
}

// requestObs is one request's timing, for its latency histograms. Its methods are called under the
// request's mutex.
type requestObs struct {
	m         *metrics
	admitted  time.Time
	prompt    int
	scheduled bool
	first     time.Time // the first token; zero before it
	last      time.Time // the latest token
	tokens    int
	ended     bool
}

// schedule records that a group took the request: the first time, its queue time and its prompt tokens
// (prefill starts).
func (o *requestObs) schedule() {
	if o == nil || o.scheduled {
		return
	}
	o.scheduled = true
	o.m.queueTime.Observe(time.Since(o.admitted).Seconds())
	o.m.promptTokens.Add(float64(o.prompt))
}

// token records a generated token.
func (o *requestObs) token() {
	if o == nil {
		return
	}
	now := time.Now()
	if o.first.IsZero() {
		o.first = now
		o.m.ttft.Observe(now.Sub(o.admitted).Seconds())
	} else {
		o.m.itl.Observe(now.Sub(o.last).Seconds())
	}
	o.last = now
	o.tokens++
	o.m.generatedTokens.Inc()
}

// end records the request's outcome once: a finish reason, an error, or an abort by its client.
func (o *requestObs) end(finish string, err error, aborted bool) {
	if o == nil || o.ended {
		return
	}
	o.ended = true
	switch {
	case aborted:
		o.m.requests.WithLabelValues(outcomeAbort).Inc()
	case err != nil:
		o.m.requests.WithLabelValues(outcomeError).Inc()
	default:
		o.m.requests.WithLabelValues(finish).Inc()
		o.m.requestSuccess.WithLabelValues(finish).Inc()
		o.m.e2e.Observe(time.Since(o.admitted).Seconds())
		o.m.promptLen.Observe(float64(o.prompt))
		o.m.generationLen.Observe(float64(o.tokens))
	}
}

// groupObs is one TP group's step metrics.
type groupObs struct {
	m       *metrics
	label   string
	running int // sequences last reported in tpfleet_num_requests_running
}

// group returns the step metrics of group id; nil metrics give a nil groupObs, whose methods do nothing.
func (m *metrics) group(id int) *groupObs {
	if m == nil {
		return nil
	}
	return &groupObs{m: m, label: strconv.Itoa(id)}
}

// step records one step: its time, sequences and tokens, and whether it failed.
func (g *groupObs) step(took time.Duration, seqs, tokens int, err error) {
	if g == nil {
		return
	}
	if err != nil {
		g.m.stepFailures.WithLabelValues(g.label).Inc()
		return
	}
	g.m.stepTime.WithLabelValues(g.label).Observe(took.Seconds())
	g.m.stepSeqs.WithLabelValues(g.label).Observe(float64(seqs))
	g.m.stepTokens.WithLabelValues(g.label).Observe(float64(tokens))
}

// setRunning reports the group's batch size.
func (g *groupObs) setRunning(n int) {
	if g == nil || n == g.running {
		return
	}
	g.m.running.Add(float64(n - g.running))
	g.m.groupRunning.WithLabelValues(g.label).Set(float64(n))
	g.running = n
}

// setKV reports the group's KV blocks.
func (g *groupObs) setKV(k *kvBudget) {
	if g != nil {
		g.m.kvBlocks.WithLabelValues(g.label).Set(float64(k.blocks))
		g.m.kvUsed.WithLabelValues(g.label).Set(float64(k.used))
	}
}

// setKVUsed reports the blocks the group's batch reserves.
func (g *groupObs) setKVUsed(n int) {
	if g != nil {
		g.m.kvUsed.WithLabelValues(g.label).Set(float64(n))
	}
}

// kvWaited counts a request that waited at the head of the queue for KV blocks.
func (g *groupObs) kvWaited() {
	if g != nil {
		g.m.kvWaited.Inc()
	}
}

// resumed counts requests a group handed back.
func (g *groupObs) resumed(n int) {
	if g != nil && n > 0 {
		g.m.resumedTotal.Add(float64(n))
	}
}

// stateCollector exports the coordinator's leadership and plan, read at scrape time.
type stateCollector struct {
	state                                func() (leader bool, epoch int64, tp, groups, ready int)
	leader, epoch, tp, groups, readyDesc *prometheus.Desc
}

func newStateCollector(state func() (bool, int64, int, int, int)) *stateCollector {
	return &stateCollector{
		state:     state,
		leader:    prometheus.NewDesc("tpfleet_coordinator_leader", "1 while this coordinator leads the cluster, 0 while it is a standby.", nil, nil),
		epoch:     prometheus.NewDesc("tpfleet_plan_epoch", "The plan epoch in force (0: none, or a standby).", nil, nil),
		tp:        prometheus.NewDesc("tpfleet_plan_tp_size", "Tensor-parallel size of the plan's groups.", nil, nil),
		groups:    prometheus.NewDesc("tpfleet_plan_groups", "TP groups (replicas) the plan places.", nil, nil),
		readyDesc: prometheus.NewDesc("tpfleet_plan_groups_ready", "TP groups of the plan whose workers serve.", nil, nil),
	}
}

func (s *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- s.leader
	ch <- s.epoch
	ch <- s.tp
	ch <- s.groups
	ch <- s.readyDesc
}

func (s *stateCollector) Collect(ch chan<- prometheus.Metric) {
	leader, epoch, tp, groups, ready := s.state()
	l := 0.0
	if leader {
		l = 1
	}
	ch <- prometheus.MustNewConstMetric(s.leader, prometheus.GaugeValue, l)
	ch <- prometheus.MustNewConstMetric(s.epoch, prometheus.GaugeValue, float64(epoch))
	ch <- prometheus.MustNewConstMetric(s.tp, prometheus.GaugeValue, float64(tp))
	ch <- prometheus.MustNewConstMetric(s.groups, prometheus.GaugeValue, float64(groups))
	ch <- prometheus.MustNewConstMetric(s.readyDesc, prometheus.GaugeValue, float64(ready))
}

// expertsCollector exports the cluster's expert load (Coordinator.ExpertLoad), asked of the workers at
// scrape time; nothing while this coordinator does not lead or nothing was counted.
type expertsCollector struct {
	load         func() (ExpertLoad, bool)
	tokens, rank *prometheus.Desc
}

func newExpertsCollector(load func() (ExpertLoad, bool)) *expertsCollector {
	return &expertsCollector{
		load:   load,
		tokens: prometheus.NewDesc("tpfleet_expert_tokens", "Tokens routed to each expert of each MoE layer (checkpoint numbering) under the plan in force, summed over its groups (cpu routing only).", []string{"layer", "expert"}, nil),
		rank:   prometheus.NewDesc("tpfleet_expert_rank_tokens", "Tokens the experts of each rank computed in each MoE layer under the plan in force (replicas included), summed over its groups (cpu routing only).", []string{"layer", "rank"}, nil),
	}
}

func (e *expertsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- e.tokens
	ch <- e.rank
}

func (e *expertsCollector) Collect(ch chan<- prometheus.Metric) {
	if e.load == nil {
		return
	}
	l, ok := e.load()
	if !ok {
		return
	}
	for layer, counts := range l.Layers {
		for ex, n := range counts {
			ch <- prometheus.MustNewConstMetric(e.tokens, prometheus.GaugeValue, float64(n), strconv.Itoa(layer), strconv.Itoa(ex))
		}
		slots := l.Slots[layer]
		if l.TP < 1 || len(slots) == 0 || len(slots)%l.TP != 0 {
			continue
		}
		ranks := make([]int64, l.TP)
		for i, n := range slots {
			ranks[i/(len(slots)/l.TP)] += n
		}
		for r, n := range ranks {
			ch <- prometheus.MustNewConstMetric(e.rank, prometheus.GaugeValue, float64(n), strconv.Itoa(layer), strconv.Itoa(r))
		}
	}
}

// factory makes metrics and registers them in one registry.
type factory struct{ reg *prometheus.Registry }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	f.reg.MustRegister(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	f.reg.MustRegister(g)
	return g
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
	f.reg.MustRegister(g)
	return g
}

func (f factory) histogram(name, help string, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets})
	f.reg.MustRegister(h)
	return h
}

func (f factory) histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, labels)
	f.reg.MustRegister(h)
	return h
}
