package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// TestWarmup: warmup runs without a model, prints its phases (as a table or JSON), and refuses a kernel
// cache for a backend that compiles nothing.
func TestWarmup(t *testing.T) {
	var out, errOut bytes.Buffer
	if err := runWarmup(context.Background(), []string{"--device", "cpu"}, &out, &errOut); err != nil {
		t.Fatalf("warmup --device cpu = %v (stderr %q)", err, errOut.String())
	}
	if s := out.String(); !strings.Contains(s, "phase") || !strings.Contains(s, "process") || !strings.Contains(s, "no kernels to compile") {
		t.Errorf("warmup --device cpu printed %q, want the phase table", s)
	}
	out.Reset()
	if err := runWarmup(context.Background(), []string{"--device", "cpu", "--json"}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	var res warmupResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || res.Device != "cpu" || len(res.Phases) < 2 || res.Phases[0].Name != "process" {
		t.Errorf("warmup --json = %s (%v), want the device and its phases", out.String(), err)
	}
	err := runWarmup(context.Background(), []string{"--device", "cpu", "--kernel-cache", t.TempDir()}, &out, &errOut)
	if !errors.Is(err, errUsage) {
		t.Errorf("warmup --device cpu --kernel-cache = %v, want a usage error", err)
	}
}
