package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/internal/gputest"
	"github.com/tpfleet/tpfleet/tpgroup"
)

// The GPU paths that can be checked without a GPU: the errors where CUDA is missing and serve's worker
// processes (the rendezvous directory that carries rank 0's NCCL unique id is tested in package
// tpgroup). scripts/gpu/multiproc.sh runs the real thing on a GPU machine.

// skipWithCUDA skips where the machine has a GPU: the tests check the paths of a machine without one.
func skipWithCUDA(t *testing.T) {
	t.Helper()
	gputest.SkipIfPresent(t)
}

// TestCUDAUnavailable: every command asked for --device cuda on a machine without CUDA exits 1 at once,
// without panicking or waiting for peers, with one line on stderr that names the missing library.
func TestCUDAUnavailable(t *testing.T) {
	skipWithCUDA(t)
	model := filepath.Join(fixtures, "moe-top1")
	rdzv := t.TempDir()
	out := filepath.Join(t.TempDir(), "logits.safetensors")
	for _, args := range [][]string{
		{"score", "--model", model, "--device", "cuda", "--tp", "2", "--rank", "0", "--rdzv", rdzv, "--ids", "1,2,3", "--out", out},
		{"score", "--model", model, "--device", "cuda", "--tp", "2", "--rank", "1", "--gpu", "1", "--rdzv", rdzv, "--ids", "1,2,3", "--out", out},
		{"generate", "--model", model, "--device", "cuda", "--tp", "2", "--rank", "1", "--rdzv", rdzv, "--ids", "1,2,3"},
		{"generate", "--model", model, "--device", "cuda", "--ids", "1,2,3"},
		{"serve", "--model", model, "--device", "cuda", "--tp", "2", "--listen", "127.0.0.1:0", "--http-listen", ""},
		{"launch", "--nproc-per-node", "gpu"},
		{"launch", "--device", "cuda", "--nproc-per-node", "auto"},
	} {
		start := time.Now()
		code, stdout, stderr := tpfleet(t, args...)
		lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
		name := "tpfleet " + strings.Join(args, " ")
		switch {
		case code != 1:
			t.Errorf("%s: exit %d, want 1; stderr:\n%s", name, code, stderr)
		case len(lines) != 1 || !strings.HasPrefix(lines[0], "tpfleet "+args[0]+": "):
			t.Errorf("%s: stderr has %d lines, want one error line:\n%s", name, len(lines), stderr)
		case !strings.Contains(stderr, "libcuda.so.1"):
			t.Errorf("%s: stderr %q does not name libcuda.so.1", name, stderr)
		case strings.Contains(stderr, "panic"):
			t.Errorf("%s: panicked:\n%s", name, stderr)
		case stdout != "":
			t.Errorf("%s: printed %q on stdout", name, stdout)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("%s took %v", name, d)
		}
	}
	if entries, _ := os.ReadDir(rdzv); len(entries) != 0 {
		t.Errorf("ranks that failed before the rendezvous left %d files in it", len(entries))
	}

	// A worker fails at Start, before it touches etcd (none listens at port 1): its last line says why.
	code, _, stderr := tpfleet(t, "worker", "--etcd", "http://127.0.0.1:1", "--device", "cuda", "--gpu", "1", "--no-gossip")
	lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
	last := lines[len(lines)-1]
	if code != 1 || !strings.HasPrefix(last, "tpfleet worker: worker: device unavailable: cuda:1: ") || !strings.Contains(last, "libcuda.so.1") {
		t.Errorf("worker --device cuda = exit %d, last line %q; want 1 and the unavailable device naming libcuda.so.1", code, last)
	}
}

// TestServeCUDAStartsWorkerProcesses: serve --device cuda starts one `tpfleet worker --device cuda --gpu
// i` process per GPU (here 2 pretended GPUs; the workers then find no CUDA) and, when they fail, exits 1
// naming the failure instead of hanging.
func TestServeCUDAStartsWorkerProcesses(t *testing.T) {
	skipWithCUDA(t)
	t.Setenv("TPFLEET_TEST_AS_MAIN", "1") // the children are this test binary acting as tpfleet
	old := gpuCount
	gpuCount = func(string) (int, error) { return 2, nil }
	t.Cleanup(func() { gpuCount = old })

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, code, stderr := runInProcess(ctx, "serve", "--model", filepath.Join(fixtures, "moe-top1"), "--device", "cuda",
		"--listen", "127.0.0.1:0", "--http-listen", "", "--log-level", "info")
	select {
	case c := <-code:
		s := stderr.String()
		if c != 1 {
			t.Errorf("serve with failing GPU workers exited %d, want 1:\n%s", c, tail(s, 40))
		}
		// Whichever worker fails first stops serve, so the other may never get to say anything.
		for _, want := range []string{`"workers": 2`, `"device": "cuda"`, "[worker", "worker: device unavailable: cuda:", "libcuda.so.1",
			"tpfleet serve: worker processes: launch: local rank"} {
			if !strings.Contains(s, want) {
				t.Errorf("serve's stderr has no %q:\n%s", want, tail(s, 40))
			}
		}
		if strings.Contains(s, "panic") {
			t.Errorf("serve panicked:\n%s", s)
		}
	case <-time.After(45 * time.Second):
		t.Fatalf("serve did not exit within 45s of its workers failing:\n%s", tail(stderr.String(), 40))
	}
}

// TestServeGPUCount: serve takes its worker count from --workers (or --nproc-per-node), else from the
// GPUs it sees, in whole TP groups; too few GPUs is an error naming the counts.
func TestServeGPUCount(t *testing.T) {
	old := gpuCount
	t.Cleanup(func() { gpuCount = old })
	gpuCount = func(string) (int, error) { return 5, nil }
	for _, tc := range []struct {
		f       serveFlags
		workers int
		err     string
	}{
		{serveFlags{tp: 1}, 5, ""},
		{serveFlags{tp: 2}, 4, ""}, // two groups; the fifth GPU idle
		{serveFlags{tp: 1, workers: 3}, 3, ""},
		{serveFlags{tp: 1, workers: 6}, 0, "--workers 6: 5 GPUs visible"},
	} {
		f := tc.f
		if tc.f.tp > 1 {
			if err := tpgroup.CheckDeviceComm(); err != nil {
				continue // serveGPUs checks NCCL first for TP > 1
			}
		}
		err := serveGPUs(&f)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("serveGPUs(%+v) = %v, want %q", tc.f, err, tc.err)
			}
			continue
		}
		if err != nil || f.workers != tc.workers {
			t.Errorf("serveGPUs(%+v) = workers %d, %v; want %d", tc.f, f.workers, err, tc.workers)
		}
	}
	gpuCount = func(string) (int, error) { return 1, nil }
	f := serveFlags{tp: 2}
	if err := tpgroup.CheckDeviceComm(); err == nil {
		if err := serveGPUs(&f); err == nil || !strings.Contains(err.Error(), "--tp 2 needs 2 GPUs; 1 visible") {
			t.Errorf("serveGPUs(tp 2, 1 GPU) = %v, want an error naming the counts", err)
		}
	}
}

// TestLaunchDevice: launch --device cuda passes --device cuda to its workers (each then opens GPU
// LOCAL_RANK) and no --threads; --nproc-per-node gpu counts the GPUs and implies cuda; auto counts GPUs
// only with cuda.
func TestLaunchDevice(t *testing.T) {
	old := gpuCount
	t.Cleanup(func() { gpuCount = old })
	gpuCount = func(string) (int, error) { return 3, nil }

	f, sub, err := parseLaunch([]string{"--nproc-per-node", "gpu"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if _, nproc, err := f.sizes(); err != nil || nproc != 3 || f.device != "cuda" || !slices.Equal(sub, []string{"worker"}) {
		t.Errorf("--nproc-per-node gpu = nproc %d (%v), device %q, sub %v; want 3 GPUs, cuda, worker", nproc, err, f.device, sub)
	}
	g := &localGroup{sub: "worker", args: []string{"--op-timeout", "9s"}, nproc: 3, etcd: "http://127.0.0.1:2379", cluster: "c", device: f.device}
	args := g.childArgs()
	if !slices.Contains(args, "--device") || args[slices.Index(args, "--device")+1] != "cuda" || slices.Contains(args, "--threads") ||
		!slices.Equal(args[len(args)-2:], []string{"--op-timeout", "9s"}) {
		t.Errorf("childArgs() with cuda = %v, want --device cuda, no --threads, the user's arguments last", args)
	}
	if env := g.env(2, 0); !slices.Contains(env, "LOCAL_RANK=2") {
		t.Errorf("env of local rank 2 has no LOCAL_RANK=2 (the worker's GPU)")
	}

	f, _, err = parseLaunch([]string{"--device", "cuda", "--nproc-per-node", "auto"}, io.Discard)
	if _, nproc, _ := f.sizes(); err != nil || nproc != 3 {
		t.Errorf("--device cuda --nproc-per-node auto = %d, %v; want the 3 GPUs", nproc, err)
	}
	f, _, err = parseLaunch([]string{"--nproc-per-node", "auto"}, io.Discard)
	if _, nproc, _ := f.sizes(); err != nil || nproc != runtime.NumCPU() || f.device != "" {
		t.Errorf("--nproc-per-node auto = %d, device %q, %v; want the CPUs and the workers' default device", nproc, f.device, err)
	}
	if _, _, err := parseLaunch([]string{"--device", "tpu"}, io.Discard); err == nil || !strings.Contains(err.Error(), "want cpu or cuda") {
		t.Errorf("--device tpu = %v, want a usage error", err)
	}
	gpuCount = func(string) (int, error) { return 0, nil }
	if _, _, err := parseLaunch([]string{"--nproc-per-node", "gpu"}, io.Discard); err == nil || !strings.Contains(err.Error(), "no GPU visible") {
		t.Errorf("--nproc-per-node gpu with no GPU = %v, want an error", err)
	}
}
