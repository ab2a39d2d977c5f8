package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// TestServe: `tpfleet serve --tp 2 --workers 4`, with TLS on and an API key, runs an etcd, a coordinator
// and four workers (two replicas) in one process; concurrent requests return the fixture's greedy ids;
// when its context ends (SIGINT, SIGTERM) it shuts down cleanly and exits 0.
func TestServe(t *testing.T) {
	start := time.Now()
	g := readGolden(t, "moe-top1")
	certs := withTLS(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, stderr := startServe(t, ctx, append([]string{"--model", filepath.Join(fixtures, "moe-top1"), "--tp", "2", "--workers", "4",
		"--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--log-level", "warn", "--api-key", testAPIKey}, certs.Args("node")...)...)
	cli := waitCoordinator(t, addr)
	t.Logf("serving after %v", time.Since(start).Round(time.Millisecond))
	generateConcurrently(t, addr, g, 8)
	if sh, err := cli.Shards(ctx); err != nil || sh.TP != 2 || len(sh.Assignments) != 4 {
		t.Errorf("Shards = %+v, %v; want tp 2, four workers placed", sh, err)
	}
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d after its context ended, want 0:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s of its context ending")
	}
	if s := stderr.String(); strings.Contains(s, "ERROR") || strings.Contains(s, "panic") {
		t.Errorf("serve logged errors:\n%s", s)
	}
}

// startServe runs `tpfleet serve args...` in this process until ctx ends and returns the address it prints
// first (the coordinator's), its exit status channel and its stderr.
func startServe(t *testing.T, ctx context.Context, args ...string) (string, <-chan int, *lockedBuffer) {
	t.Helper()
	addr, code, stderr, err := launchServe(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return addr, code, stderr
}

// launchServe is startServe's start: an error where serve exits or prints nothing within 30 s.
func launchServe(ctx context.Context, args ...string) (string, <-chan int, *lockedBuffer, error) {
	lines, code, stderr := runInProcess(ctx, append([]string{"serve"}, args...)...)
	select {
	case addr := <-lines:
		return addr, code, stderr, nil
	case c := <-code:
		return "", code, stderr, fmt.Errorf("serve exited %d before printing its address:\n%s", c, stderr)
	case <-time.After(30 * time.Second):
		return "", code, stderr, fmt.Errorf("serve printed no address within 30s")
	}
}

// startServeOnFreePort is startServe with the gateway's --port (and whatever else args picks) on a free
// port: args(port) gives serve's arguments. A port found free may be taken by another listener of the
// tests running beside this one before serve binds it, so a start that fails with "address already in
// use" is tried again with new ports, three times in all.
func startServeOnFreePort(t *testing.T, ctx context.Context, args func(port string) []string) (addr, port string, code <-chan int, stderr *lockedBuffer) {
	t.Helper()
	for try := 1; ; try++ {
		_, port, err := net.SplitHostPort(freePort(t))
		if err != nil {
			t.Fatal(err)
		}
		addr, code, stderr, err := launchServe(ctx, args(port)...)
		if err == nil {
			return addr, port, code, stderr
		}
		if try == 3 || !strings.Contains(stderr.String(), "address already in use") {
			t.Fatal(err)
		}
		t.Logf("serve start %d: a port was taken, trying new ones: %v", try, err)
	}
}

func TestServeFlags(t *testing.T) {
	model := filepath.Join(fixtures, "moe-top1")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"serve"}, 2, "--model is required"},
		{[]string{"serve", model, "other"}, 2, `unexpected argument "other"`},
		{[]string{"serve", model, "--max-model-len", "100000", "--listen", "127.0.0.1:0"}, 1, "max model len 100000 must be in [1, 256]"},
		{[]string{"serve", model, "--generation-config", "greedy", "--listen", "127.0.0.1:0"}, 1, `--generation-config "greedy": want auto, vllm or a directory`},
		{[]string{"serve", "--model", model, "--tp", "2", "--workers", "1"}, 2, "fewer than --tp"},
		{[]string{"serve", "--model", model, "--device", "tpu"}, 2, "want cpu or cuda"},
		{[]string{"serve", "--model", model, "--tp", "3", "--listen", "127.0.0.1:0"}, 1, "TP 3"},
	} {
		code, _, stderr := tpfleet(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("tpfleet %s = exit %d, %q; want %d with %q", strings.Join(tc.args, " "), code, stderr, tc.code, tc.want)
		}
	}
}

// TestServeVLLMFlags: `tpfleet serve MODEL --tensor-parallel-size 2 --host H --port P` as vllm serve
// takes it; --served-model-name names the model, --max-model-len bounds its context, --api-key guards
// /v1 and --allowed-origins answers CORS.
func TestServeVLLMFlags(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(lis.Addr().(*net.TCPAddr).Port)
	lis.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, code, stderr := startServe(t, ctx, filepath.Join(fixtures, "moe-top1"), "--tensor-parallel-size", "2", "--host", "127.0.0.1", "--port", port,
		"--served-model-name", "tiny", "--max-model-len", "64", "--api-key", "k3y", "--allowed-origins", "http://a.example",
		"--listen", "127.0.0.1:0", "--log-level", "warn")
	waitCoordinator(t, addr)
	base := "http://127.0.0.1:" + port
	get := func(path, key, origin string) (int, http.Header, string) {
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header, string(body)
	}
	if c, _, body := get("/v1/models", "k3y", ""); c != 200 || !strings.Contains(body, `"id":"tiny"`) || !strings.Contains(body, `"max_model_len":64`) {
		t.Errorf("GET /v1/models = %d %s; want the model tiny with max_model_len 64", c, body)
	}
	if c, _, body := get("/v1/models", "wrong", ""); c != 401 {
		t.Errorf("GET /v1/models with a wrong key = %d %s; want 401", c, body)
	}
	if c, h, _ := get("/health", "", "http://a.example"); c != 200 || h.Get("Access-Control-Allow-Origin") != "http://a.example" {
		t.Errorf("GET /health from an allowed origin = %d, Access-Control-Allow-Origin %q; want 200, the origin", c, h.Get("Access-Control-Allow-Origin"))
	}
	if _, h, _ := get("/health", "", "http://b.example"); h.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("GET /health from another origin: Access-Control-Allow-Origin %q, want none", h.Get("Access-Control-Allow-Origin"))
	}
	cancel()
	select {
	case c := <-code:
		if c != 0 {
			t.Errorf("serve exited %d, want 0:\n%s", c, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop within 30s")
	}
}

// TestServeDummyWeights: serve --load-format dummy runs a model directory that holds only config.json
// (the workers generate their slices); TP 2 chooses the same greedy ids as TP 1, each rank having
// generated only its own slices; without --load-format dummy the same directory is refused at start.
func TestServeDummyWeights(t *testing.T) {
	dir := t.TempDir()
	data, err := os.ReadFile(filepath.Join(fixtures, "moe-top1", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	prompt := []int{1, 475, 188, 269, 460, 492}
	greedy := &sample.Params{TopP: 1}
	var ids [][]int
	for _, tp := range []string{"1", "2"} {
		ctx, cancel := context.WithCancel(context.Background())
		addr, code, stderr := startServe(t, ctx, "--model", dir, "--load-format", "dummy", "--tp", tp, "--threads", "1",
			"--http-listen", "", "--listen", "127.0.0.1:0", "--log-level", "info")
		cli := waitCoordinator(t, addr)
		gctx, gcancel := context.WithTimeout(ctx, time.Minute)
		res, err := cli.Generate(gctx, client.GenerateRequest{PromptIDs: prompt, MaxTokens: 8, Sampling: greedy, IgnoreEOS: true}, nil)
		gcancel()
		if err != nil {
			t.Fatalf("tp %s: Generate: %v\n%s", tp, err, stderr)
		}
		ids = append(ids, res.IDs)
		if s := stderr.String(); !strings.Contains(s, "memory plan") {
			t.Errorf("tp %s: serve logged no memory plan", tp)
		}
		cancel()
		<-code
	}
	if len(ids[0]) != 8 || !slices.Equal(ids[0], ids[1]) {
		t.Errorf("dummy weights: TP 1 ids %v, TP 2 ids %v, want 8 equal ids", ids[0], ids[1])
	}
	if code, _, stderr := tpfleet(t, "serve", "--model", dir, "--http-listen", "", "--listen", "127.0.0.1:0"); code == 0 || !strings.Contains(stderr, "--load-format dummy") {
		t.Errorf("serve of a config-only directory without --load-format dummy = %d, %q; want an error pointing at --load-format dummy", code, stderr)
	}
}
