package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/tpfleet/tpfleet/backend"
	"github.com/tpfleet/tpfleet/internal/phase"
)

// warmupResult is what warmup --json prints.
type warmupResult struct {
	Device  string            `json:"device"`
	Card    string            `json:"card,omitempty"`
	Details map[string]string `json:"details,omitempty"`
	Phases  []phaseJSON       `json:"phases"`
}

// phaseJSON is a start-up phase in JSON (warmup --json, bench --json).
type phaseJSON struct {
	Name   string  `json:"name"`
	StartS float64 `json:"start_s"`
	TookS  float64 `json:"took_s"`
	Detail string  `json:"detail,omitempty"`
}

func phasesJSON(r *phase.Recorder) []phaseJSON {
	var out []phaseJSON
	for _, p := range r.Phases() {
		out = append(out, phaseJSON{Name: p.Name, StartS: p.Start.Sub(r.Start()).Seconds(), TookS: p.Took.Seconds(), Detail: p.Detail})
	}
	return out
}

// runWarmup opens a backend and exits: on cuda that compiles the kernels into the kernel cache (or finds
// them there), so an image build or an init container can ship a filled cache and a later start skips
// NVRTC. It needs no model.
func runWarmup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("warmup", flag.ContinueOnError)
	fs.SetOutput(stderr)
	device := fs.String("device", "cuda", "the backend to warm up: "+deviceChoices())
	gpu := fs.Int("gpu", 0, "device ordinal (the kernels are compiled for its architecture)")
	cache := fs.String("kernel-cache", "", "kernel cache directory to fill (default: $TPFLEET_KERNEL_CACHE, else ~/.cache/tpfleet/kernels); same as --cuda-kernel-cache")
	asJSON := fs.Bool("json", false, "print one JSON object: device, details and the phases")
	cfgs := backend.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if err := checkDevice(*device); err != nil {
		return err
	}
	if *cache != "" {
		fl := fs.Lookup(*device + "-kernel-cache")
		if fl == nil {
			return usagef("--kernel-cache: the %s backend compiles no kernels", *device)
		}
		if err := fl.Value.Set(*cache); err != nil {
			return usagef("--kernel-cache: %v", err)
		}
	}
	phases := phase.NewRecorder(phase.ProcessStart())
	start := time.Now()
	ops, err := backend.Open(ctx, *device, backend.Options{Device: *gpu, Config: cfgs[*device]})
	if err != nil {
		return err
	}
	defer func() {
		if c, ok := ops.(io.Closer); ok {
			c.Close()
		}
	}()
	if sr, ok := ops.(backend.StartupReporter); ok {
		phases.AddAll(sr.StartupPhases())
	} else {
		phases.Since("device", start, ops.Name()+": no kernels to compile")
	}
	res := warmupResult{Device: ops.Name(), Phases: phasesJSON(phases)}
	if d, ok := ops.(backend.Describer); ok {
		desc := d.Describe()
		res.Card, res.Details = desc.Name, desc.Details
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(stdout, "%s %s", res.Device, res.Card)
	if dir := res.Details["kernel-cache"]; dir != "" {
		fmt.Fprintf(stdout, ", kernel cache %s", dir)
	}
	fmt.Fprintf(stdout, "\n%s", phases.Table())
	return nil
}
