package worker_test

import (
	"slices"
	"testing"

	tpfleetv1 "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// TestMemoryPlan: a worker with --kv-cache-tokens 48 plans 12 blocks of 16 tokens for the fixture's 4
// layers (3 chunked of window 16, 1 global) and reports them in Status with the blocks its sequences
// reserve at their capacity; a step that would start sequences beyond the plan is refused on every rank
// (RESOURCE_EXHAUSTED's text, "worker: KV cache full") and changes nothing, and the blocks of sequences the
// same step releases count as free.
func TestMemoryPlan(t *testing.T) {
	gold := readGolden(t)
	e := startEtcd(t)
	cli := newClient(t, e)
	cfg := testConfig(t, e, "kv")
	cfg.KVCacheTokens = 48
	w := startWorker(t, cfg)
	c := tpfleetv1.NewWorkerClient(dial(t, w.Addr()))
	putPlan(t, cli, plan(1, w), c)

	m := statusOf(t, c).GetMemory()
	if m.GetKvBlocks() != 12 || m.GetBlockSize() != 16 || !slices.Equal(m.GetWindows(), []int32{16, 16, 16, 0}) ||
		m.GetLongestContext() != 96 || m.GetTokenBytes() != 4*2*2*16*4 || !m.GetFromTokens() || m.GetKvBlocksReserved() != 0 {
		t.Fatalf("Status.memory = %v, want 12 blocks of 16, windows [16 16 16 0], longest 96, 1024 bytes a token (float32), none reserved", m)
	}
	if p := w.Status().Memory; p == nil || p.Blocks != 12 {
		t.Fatalf("Status().Memory = %+v, want 12 blocks", p)
	}

	g := newGroup(t, 1, c)
	prompt := gold.Prompt
	g.run(greedy(1, prompt, 42)) // 42 tokens: 3 blocks of the global layer, 2 of each chunked one
	if got := statusOf(t, c).GetMemory().GetKvBlocksReserved(); got != 9 {
		t.Errorf("reserved after starting a 42-token sequence = %d, want 9", got)
	}
	g.wantError(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{greedy(2, prompt, 42)}}, "worker: KV cache full")
	if st := statusOf(t, c); st.GetSequences() != 1 || st.GetMemory().GetKvBlocksReserved() != 9 {
		t.Errorf("after the refused step: %d sequences, %d blocks reserved; want 1 and 9", st.GetSequences(), st.GetMemory().GetKvBlocksReserved())
	}
	// Releasing sequence 1 in the same step frees its blocks for sequence 2.
	resps := g.send(&tpfleetv1.StepRequest{Seqs: []*tpfleetv1.SequenceWork{greedy(2, prompt, 42)}, Release: []uint64{1}})
	if e := resps[0].GetError(); e != "" {
		t.Fatalf("start 2 while releasing 1: %s", e)
	}
	if got := statusOf(t, c).GetMemory().GetKvBlocksReserved(); got != 9 {
		t.Errorf("reserved after the swap = %d, want 9", got)
	}
}
