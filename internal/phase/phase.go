// Package phase times a process's start-up: each phase (CUDA context, kernel compile or cache hit, NCCL
// set-up, weight read, copy, quantise, graph capture, first step) with when it began and how long it
// took, so that the worker's Status, its metrics and the one-process commands report where start-up
// time goes. Phases may overlap (reads run beside copies); the table shows each one's start.
package phase

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The phases' names, in the order they usually begin.
const (
	Process   = "process"        // from the process's start to the recorder's creation (main)
	Context   = "cuda-context"   // loading the CUDA libraries and opening the device
	Compile   = "kernel-compile" // NVRTC compiles, or the kernel cache's hits
	NCCL      = "nccl"           // joining the TP group's communicator
	Weights   = "weights"        // the whole weight load: from the first read to the model built
	Read      = "weight-read"    // from the load's start to its last read
	Copy      = "weight-copy"    // the loader's time in host-to-device copies (and Ops.Load)
	Quantize  = "quantize"       // on-device quantisation after the copies
	Graph     = "graph-capture"  // CUDA graph capture (with the first decode step that records it)
	FirstStep = "first-step"     // the first forward pass
	Ready     = "ready"          // from the process's start to ready (the model loaded and joined)
)

// Phase is one timed phase.
type Phase struct {
	Name  string
	Start time.Time
	Took  time.Duration
	// Detail says more: "cache hit", "4 units in parallel", "22.1 GB at 15.2 GB/s".
	Detail string
}

// Recorder collects phases. It is safe for concurrent use.
type Recorder struct {
	start time.Time

	mu     sync.Mutex
	phases []Phase
}

// NewRecorder records phases of a process that started at start (ProcessStart) and adds the Process
// phase up to now.
func NewRecorder(start time.Time) *Recorder {
	r := &Recorder{start: start}
	r.Add(Process, start, time.Since(start), "")
	return r
}

// Start is when the process started.
func (r *Recorder) Start() time.Time { return r.start }

// Add records a phase; a phase of the same name replaces the earlier one.
func (r *Recorder) Add(name string, start time.Time, took time.Duration, detail string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := Phase{Name: name, Start: start, Took: took, Detail: detail}
	for i := range r.phases {
		if r.phases[i].Name == name {
			r.phases[i] = p
			return
		}
	}
	r.phases = append(r.phases, p)
}

// Since records a phase that began at start and ends now.
func (r *Recorder) Since(name string, start time.Time, detail string) {
	r.Add(name, start, time.Since(start), detail)
}

// AddAll records phases (a backend's).
func (r *Recorder) AddAll(ps []Phase) {
	for _, p := range ps {
		r.Add(p.Name, p.Start, p.Took, p.Detail)
	}
}

// Phases returns the phases recorded, in order of their start, Ready (process start to ready) last.
func (r *Recorder) Phases() []Phase {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	out := append([]Phase(nil), r.phases...)
	// Insertion sort by start (stable; the list is short and nearly sorted); Ready, the summary, last.
	before := func(a, b Phase) bool {
		if (a.Name == Ready) != (b.Name == Ready) {
			return b.Name == Ready
		}
		return a.Start.Before(b.Start)
	}
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && before(out[j], out[j-1]); j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

// Table formats the phases as an aligned text table: name, start (from the process's start), duration,
// detail.
func (r *Recorder) Table() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-15s %10s %10s  %s\n", "phase", "start", "took", "detail")
	for _, p := range r.Phases() {
		fmt.Fprintf(&sb, "%-15s %9.3fs %9.3fs  %s\n", p.Name, p.Start.Sub(r.start).Seconds(), p.Took.Seconds(), p.Detail)
	}
	return sb.String()
}

// Field is the phases as one structured log field ("phases": {name: {start, took, detail}}).
func (r *Recorder) Field() zap.Field {
	return zap.Object("phases", zapcore.ObjectMarshalerFunc(func(enc zapcore.ObjectEncoder) error {
		for _, p := range r.Phases() {
			err := enc.AddObject(p.Name, zapcore.ObjectMarshalerFunc(func(e zapcore.ObjectEncoder) error {
				e.AddDuration("start", p.Start.Sub(r.start).Round(time.Millisecond))
				e.AddDuration("took", p.Took.Round(time.Microsecond))
				if p.Detail != "" {
					e.AddString("detail", p.Detail)
				}
				return nil
			}))
			if err != nil {
				return err
			}
		}
		return nil
	}))
}

// ProcessStart returns when this process started, from /proc/self/stat's start time and /proc/uptime
// (10 ms resolution on Linux); where they cannot be read, now.
func ProcessStart() time.Time {
	now := time.Now()
	stat, err1 := os.ReadFile("/proc/self/stat")
	up, err2 := os.ReadFile("/proc/uptime")
	if err1 != nil || err2 != nil {
		return now
	}
	// The command name (field 2) may hold spaces; the fields after it follow its closing parenthesis.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return now
	}
	f := strings.Fields(s[i+1:])
	const startField = 22 - 3 // field 22 (starttime) counted after field 2
	if len(f) <= startField {
		return now
	}
	ticks, err := strconv.ParseFloat(f[startField], 64)
	uf := strings.Fields(string(up))
	if err != nil || len(uf) == 0 {
		return now
	}
	uptime, err := strconv.ParseFloat(uf[0], 64)
	if err != nil {
		return now
	}
	const hz = 100 // USER_HZ on every Linux ABI Go supports
	age := time.Duration((uptime - ticks/hz) * float64(time.Second))
	if age < 0 || age > time.Hour*24*365 {
		return now
	}
	return now.Add(-age)
}
