package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tpfleet/tpfleet/client"
	"github.com/tpfleet/tpfleet/sample"
)

// TestAdmissionByKVBlocks is issue 12's admission acceptance, with separate processes (etcd, a coordinator,
// a CPU worker whose KV cache is sized for 48 tokens of its 4 layers by --kv-cache-tokens: 12 blocks of
// 16). The fixture's request (12 prompt tokens + 30 new) needs 12 blocks: 3 of the global layer and 3 of
// each chunked layer of window 16 (the coordinator counts a step's piece, up to the 512-token budget, on
// top of a chunk), so one runs at a time: concurrent requests wait at the
// head of the queue (tpfleet_requests_kv_waited_total counts them), and every one completes with HF's
// greedy ids, with no step failing (a worker refuses a sequence beyond its plan) and none resumed. A
// request of 12 + 100 tokens (28 blocks: more than the longest context the cache holds, 48 tokens) is refused at once over
// gRPC (INVALID_ARGUMENT) and HTTP (400), naming the numbers.
func TestAdmissionByKVBlocks(t *testing.T) {
	g := readGolden(t, "moe-top1")
	fixture := filepath.Join(fixtures, "moe-top1")
	_, ep := startEtcd(t)
	hm := freePort(t)
	w := startProc(t, "worker", "worker", "--etcd", ep, "--threads", "1", "--kv-cache-tokens", "48")
	coord := startProc(t, "coordinator", "coordinator", "--etcd", ep, "--model", fixture, "--tp", "1",
		"--listen", "127.0.0.1:0", "--http-listen", hm, "--settle", "50ms")
	addr := coord.line(t)
	cli := waitCoordinator(t, addr)
	curl := "http://" + hm + "/metrics"

	m := scrape(t, curl)
	if got := metricValue(m, "tpfleet_kv_blocks"); got != 12 {
		t.Fatalf("tpfleet_kv_blocks = %v, want 12 (48 tokens of 4 layers in blocks of 16)", got)
	}
	if !strings.Contains(w.stderr.String(), "memory plan") {
		t.Errorf("worker log has no memory plan:\n%s", w.stderr.String())
	}

	code, stdout, stderr := tpfleet(t, "cluster", "memory", "--etcd", ep, "--json")
	var rows []memoryRow
	if err := json.Unmarshal([]byte(stdout), &rows); code != 0 || err != nil || len(rows) != 1 || rows[0].Memory == nil {
		t.Fatalf("cluster memory --json = %d, %q (%s), want one worker with a memory plan", code, stdout, stderr)
	}
	if p := rows[0].Memory; p.GetKvBlocks() != 12 || p.GetBlockSize() != 16 || p.GetLongestContext() != 96 || !slices.Equal(p.GetWindows(), []int32{16, 16, 16, 0}) || !p.GetFromTokens() {
		t.Errorf("cluster memory: plan %v, want 12 blocks of 16, longest 96, windows [16 16 16 0], from --kv-cache-tokens", p)
	}
	if code, stdout, _ := tpfleet(t, "cluster", "memory", "--etcd", ep); code != 0 || !strings.Contains(stdout, "12×16") {
		t.Errorf("cluster memory = %d, %q, want a table with 12×16 blocks", code, stdout)
	}

	greedy := &sample.Params{TopP: 1}
	run := func(n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make([]string, n)
		for i := range n {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				res, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: len(g.greedy), Sampling: greedy, IgnoreEOS: true}, nil)
				switch {
				case err != nil:
					errs[i] = err.Error()
				case !slices.Equal(res.IDs, g.greedy):
					errs[i] = fmt.Sprintf("ids %v, want %v", res.IDs, g.greedy)
				}
			})
		}
		wg.Wait()
		for i, e := range errs {
			if e != "" {
				t.Errorf("request %d of %d: %s", i, n, e)
			}
		}
	}
	// Waves of concurrent requests until some waited for blocks (the first usually suffices: each request
	// runs ~30 steps while the others arrive); the assertion is on the counter, not on timing.
	total := 0
	for wave := 0; wave < 8 && metricValue(scrape(t, curl), "tpfleet_requests_kv_waited_total") <= 0; wave++ {
		run(6)
		total += 6
	}
	m = scrape(t, curl)
	waited := metricValue(m, "tpfleet_requests_kv_waited_total")
	t.Logf("%d requests, %v waited for KV blocks", total, waited)
	if waited <= 0 {
		t.Errorf("tpfleet_requests_kv_waited_total = %v after %d concurrent requests, want > 0", waited, total)
	}
	for _, c := range []struct {
		name string
		want float64
	}{
		{"tpfleet_step_failures_total", 0}, {"tpfleet_requests_resumed_total", 0}, {"tpfleet_kv_blocks_used", 0},
	} {
		if got := metricValue(m, c.name); got > c.want {
			t.Errorf("%s = %v, want %v", c.name, got, c.want)
		}
	}
	if got := metricValue(m, "tpfleet_requests_total", "outcome=length"); got != float64(total) {
		t.Errorf("tpfleet_requests_total{outcome=length} = %v, want %d", got, total)
	}

	// Never fits: refused at once, over gRPC and HTTP.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := cli.Generate(ctx, client.GenerateRequest{PromptIDs: g.prompt, MaxTokens: 100, Sampling: greedy}, nil)
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "need 28 KV blocks of 16 tokens; the largest group holds 12 blocks, a context of at most 48 tokens") {
		t.Errorf("Generate(12 + 100 tokens) = %v, want INVALID_ARGUMENT naming 28 blocks of 12, 48 tokens", err)
	}
	body, _ := json.Marshal(map[string]any{"model": "moe-top1", "prompt": g.prompt, "max_tokens": 100})
	resp, err := http.Post("http://"+hm+"/v1/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(text), "KV blocks") {
		t.Errorf("POST /v1/completions (12 + 100 tokens) = %s %s, want 400 naming the KV blocks", resp.Status, text)
	}
	if got := metricValue(scrape(t, curl), "tpfleet_requests_total", "outcome=rejected"); got < 2 {
		t.Errorf("tpfleet_requests_total{outcome=rejected} = %v, want >= 2", got)
	}
}
