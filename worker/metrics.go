package worker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/model"
	"github.com/tpfleet/tpfleet/model/run"
)

// MetricsPath is where the worker's metrics listener (Config.MetricsAddr) serves its Prometheus metrics.
const MetricsPath = "/metrics"

// Step-time buckets, in seconds: a GPU decode step of a millisecond up to a long prefill on the CPU.
var (
	stepBuckets  = []float64{0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1, 2, 4, 8, 16}
	tokenBuckets = prometheus.ExponentialBuckets(1, 2, 14) // 1 .. 8192
)

// metrics are a worker's Prometheus metrics, in its own registry (never the process-wide default: serve
// runs several workers in one process). State, epoch and weights are read from Status at scrape time;
// load progress, steps and the KV cache are recorded as they change. Safe for concurrent use.
//
// Tokens per expert are not counted: the router's choice stays on the device (a CUDA graph replays the
// whole decode step), and counting it would copy it to the host at every MoE layer of every step.
type metrics struct {
	reg *prometheus.Registry

	// Weight-load progress of the current (or last) load.
	loadTensors, loadTensorsTotal atomic.Int64
	loadBytes, loadBytesTotal     atomic.Int64
	loadStarted, loadDone         atomic.Int64 // unix nanoseconds; 0: none

	steps      *prometheus.CounterVec // result
	stepTime   prometheus.Histogram
	stepTokens prometheus.Histogram
	kvTokens   prometheus.Gauge
	kvCapacity prometheus.Gauge
	kvUsage    prometheus.Gauge
}

// newMetrics makes a worker's metrics; status is read at scrape time.
func newMetrics(status func() Status) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.steps = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tpfleet_worker_steps_total", Help: "Step requests run, by result (ok, error)."}, []string{"result"})
	m.stepTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tpfleet_worker_step_duration_seconds", Help: "Time this rank took for one step request, collectives included.", Buckets: stepBuckets})
	m.stepTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tpfleet_worker_step_tokens", Help: "Token ids fed in one step request.", Buckets: tokenBuckets})
	m.kvTokens = prometheus.NewGauge(prometheus.GaugeOpts{Name: "tpfleet_kv_cache_tokens", Help: "Tokens held in the KV caches of this rank's sequences."})
	m.kvCapacity = prometheus.NewGauge(prometheus.GaugeOpts{Name: "tpfleet_kv_cache_capacity_tokens", Help: "Tokens the KV caches of this rank's sequences have room for (prompt plus max tokens of each)."})
	m.kvUsage = prometheus.NewGauge(prometheus.GaugeOpts{Name: "tpfleet_kv_cache_usage_perc", Help: "Fraction of the reserved KV cache in use: tokens held over capacity (0 with no sequence)."})
	m.reg.MustRegister(m.steps, m.stepTime, m.stepTokens, m.kvTokens, m.kvCapacity, m.kvUsage,
		&stateCollector{status: status, m: m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.steps.WithLabelValues("ok")
	m.steps.WithLabelValues("error")
	return m
}

// step records one step request.
func (m *metrics) step(took time.Duration, tokens int, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.steps.WithLabelValues(result).Inc()
	m.stepTime.Observe(took.Seconds())
	m.stepTokens.Observe(float64(tokens))
}

// kv records the sequences' KV cache use; runMu is held.
func (m *metrics) kv(seqs map[uint64]*sequence) {
	var used, capacity int
	for _, s := range seqs {
		used += s.seq.Len()
		capacity += s.capacity
	}
	m.kvTokens.Set(float64(used))
	m.kvCapacity.Set(float64(capacity))
	if capacity > 0 {
		m.kvUsage.Set(float64(used) / float64(capacity))
	} else {
		m.kvUsage.Set(0)
	}
}

// loadStart resets the load progress for a load of tensors tensors and bytes bytes.
func (m *metrics) loadStart(tensors int, bytes int64) {
	m.loadTensors.Store(0)
	m.loadBytes.Store(0)
	m.loadTensorsTotal.Store(int64(tensors))
	m.loadBytesTotal.Store(bytes)
	m.loadDone.Store(0)
	m.loadStarted.Store(time.Now().UnixNano())
}

// loadEnd records the end of the load (successful or not).
func (m *metrics) loadEnd() { m.loadDone.Store(time.Now().UnixNano()) }

// progressWeights counts the tensors and bytes loaded through it into m.
type progressWeights struct {
	run.Weights
	m       *metrics
	bytesOf func(name string) int64
}

var _ run.Weights = (*progressWeights)(nil)

func (p *progressWeights) Load(ctx context.Context, name string) (backend.Tensor, model.Layout, error) {
	t, lay, err := p.Weights.Load(ctx, name)
	if err == nil {
		p.m.loadTensors.Add(1)
		p.m.loadBytes.Add(p.bytesOf(name))
	}
	return t, lay, err
}

// stateCollector exports the worker's state, place in the plan and load progress at scrape time.
type stateCollector struct {
	status func() Status
	m      *metrics
}

var (
	descState         = prometheus.NewDesc("tpfleet_worker_state", "1 for the worker's state (idle, loading, serving, failed), 0 for the others.", []string{"state"}, nil)
	descEpoch         = prometheus.NewDesc("tpfleet_worker_plan_epoch", "The plan epoch the worker is on (0: none seen).", nil, nil)
	descRank          = prometheus.NewDesc("tpfleet_worker_rank", "The worker's rank in its TP group (-1: unassigned).", nil, nil)
	descGroup         = prometheus.NewDesc("tpfleet_worker_group", "The worker's TP group (-1: unassigned).", nil, nil)
	descSeqs          = prometheus.NewDesc("tpfleet_worker_sequences", "Sequences (KV caches) held.", nil, nil)
	descStreams       = prometheus.NewDesc("tpfleet_worker_step_streams", "Step streams open (one per coordinator driving the worker).", nil, nil)
	descWeights       = prometheus.NewDesc("tpfleet_worker_weight_bytes", "Bytes of the loaded weights as read from the checkpoint.", nil, nil)
	descLoads         = prometheus.NewDesc("tpfleet_worker_weight_loads_total", "Times weights were read from the checkpoint (epochs that reuse them do not count).", nil, nil)
	descLoadTensors   = prometheus.NewDesc("tpfleet_weight_load_tensors", "Tensors of the current (or last) weight load read so far.", nil, nil)
	descLoadTensorsOf = prometheus.NewDesc("tpfleet_weight_load_tensors_total", "Tensors the current (or last) weight load reads.", nil, nil)
	descLoadBytes     = prometheus.NewDesc("tpfleet_weight_load_bytes", "Checkpoint bytes of the current (or last) weight load read so far.", nil, nil)
	descLoadBytesOf   = prometheus.NewDesc("tpfleet_weight_load_bytes_total", "Checkpoint bytes the current (or last) weight load reads.", nil, nil)
	descLoadProgress  = prometheus.NewDesc("tpfleet_weight_load_progress", "Fraction of the current (or last) weight load done, by bytes (0 before any load).", nil, nil)
	descExpertTokens  = prometheus.NewDesc("tpfleet_worker_expert_tokens_total", "Tokens routed to each expert of each MoE layer since the served weights were loaded (checkpoint numbering; cpu routing only).", []string{"layer", "expert"}, nil)
	descSlotTokens    = prometheus.NewDesc("tpfleet_worker_expert_slot_tokens_total", "Tokens each slot of the group's expert tensors computed since the served weights were loaded (the plan's expert order, replicas included, slots rank by rank; cpu routing only).", []string{"layer", "slot"}, nil)
	descReadBytes     = prometheus.NewDesc("tpfleet_worker_read_bytes_total", "Tensor bytes read (from the checkpoint or a peer) since the worker started; tensors kept across a plan change are not read again.", nil, nil)
	descLoadSeconds   = prometheus.NewDesc("tpfleet_weight_load_seconds", "Time the current (or last) weight load has taken.", nil, nil)
	descPhaseSeconds  = prometheus.NewDesc("tpfleet_worker_startup_phase_seconds", "Duration of each start-up phase (process, cuda-context, kernel-compile, weights, weight-read, weight-copy, quantize, nccl, first-step, graph-capture, ready); phases overlap.", []string{"phase"}, nil)
	descPhaseStart    = prometheus.NewDesc("tpfleet_worker_startup_phase_start_seconds", "When each start-up phase began, in seconds from the process's start.", []string{"phase"}, nil)
)

func (s *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descState, descEpoch, descRank, descGroup, descSeqs, descStreams, descWeights, descLoads,
		descLoadTensors, descLoadTensorsOf, descLoadBytes, descLoadBytesOf, descLoadProgress, descLoadSeconds, descExpertTokens, descSlotTokens, descReadBytes,
		descPhaseSeconds, descPhaseStart} {
		ch <- d
	}
}

func (s *stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := s.status()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, state := range []State{StateIdle, StateLoading, StateServing, StateFailed} {
		v := 0.0
		if st.State == state {
			v = 1
		}
		gauge(descState, v, string(state))
	}
	gauge(descEpoch, float64(st.Epoch))
	gauge(descRank, float64(st.Rank))
	gauge(descGroup, float64(st.Group))
	gauge(descSeqs, float64(st.Sequences))
	gauge(descStreams, float64(st.StepStreams))
	gauge(descWeights, float64(st.WeightBytes))
	ch <- prometheus.MustNewConstMetric(descLoads, prometheus.CounterValue, float64(st.Loads))
	ch <- prometheus.MustNewConstMetric(descReadBytes, prometheus.CounterValue, float64(st.ReadBytes))
	for _, p := range st.Phases {
		gauge(descPhaseSeconds, p.Took.Seconds(), p.Name)
		gauge(descPhaseStart, p.Start.Sub(st.ProcessStart).Seconds(), p.Name)
	}
	for l, counts := range st.ExpertLoad {
		for e, n := range counts {
			ch <- prometheus.MustNewConstMetric(descExpertTokens, prometheus.CounterValue, float64(n), strconv.Itoa(l), strconv.Itoa(e))
		}
	}
	for l, counts := range st.SlotLoad {
		for slot, n := range counts {
			ch <- prometheus.MustNewConstMetric(descSlotTokens, prometheus.CounterValue, float64(n), strconv.Itoa(l), strconv.Itoa(slot))
		}
	}

	m := s.m
	bytes, total := m.loadBytes.Load(), m.loadBytesTotal.Load()
	gauge(descLoadTensors, float64(m.loadTensors.Load()))
	gauge(descLoadTensorsOf, float64(m.loadTensorsTotal.Load()))
	gauge(descLoadBytes, float64(bytes))
	gauge(descLoadBytesOf, float64(total))
	progress := 0.0
	switch {
	case total > 0:
		progress = float64(bytes) / float64(total)
	case m.loadDone.Load() != 0:
		progress = 1
	}
	gauge(descLoadProgress, progress)
	secs := 0.0
	if start := m.loadStarted.Load(); start != 0 {
		end := m.loadDone.Load()
		if end == 0 {
			end = time.Now().UnixNano()
		}
		secs = time.Duration(end - start).Seconds()
	}
	gauge(descLoadSeconds, secs)
}

// MetricsAddr returns the address the metrics listener is bound to, or "" without one
// (Config.MetricsAddr empty) or before Start.
func (w *Worker) MetricsAddr() string {
	if w.metricsLis == nil {
		return ""
	}
	return w.metricsLis.Addr().String()
}

// startMetrics opens the metrics listener when Config.MetricsAddr is set and serves MetricsPath on it
// in a goroutine of serveWG; Close stops it (stopMetrics).
func (w *Worker) startMetrics() error {
	if w.cfg.MetricsAddr == "" {
		return nil
	}
	lis, err := net.Listen("tcp", w.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("worker: listen (metrics) %s: %w", w.cfg.MetricsAddr, err)
	}
	if w.cfg.TLS != nil { // HTTPS: Prometheus scrapes with the CA (a client certificate is verified if sent)
		lis = tls.NewListener(lis, w.cfg.TLS.ServerConfig(false))
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, promhttp.HandlerFor(w.metrics.reg, promhttp.HandlerOpts{Registry: w.metrics.reg}))
	w.metricsLis = lis
	w.metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	w.serveWG.Go(func() {
		if err := w.metricsSrv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.lg.Warn("metrics server stopped", zap.Error(err))
		}
	})
	w.lg.Info("serving metrics", zap.String("addr", lis.Addr().String()), zap.String("path", MetricsPath))
	return nil
}

// stopMetrics closes the metrics server, if any.
func (w *Worker) stopMetrics() {
	if w.metricsSrv != nil {
		_ = w.metricsSrv.Close()
	}
}
