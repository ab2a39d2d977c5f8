package coordinator

import (
	"fmt"
	"sync"

	"github.com/tpfleet/tpfleet/memplan"
	pb "github.com/tpfleet/tpfleet/proto/tpfleet/v1"
)

// kvBudget is the KV cache of one serving group, as its workers' memory plans report it (Status.memory):
// the geometry every rank shares and the smallest rank's blocks. A batch admits a sequence only when its
// worst case, Blocks(prompt + max_tokens), fits in what the batch's sequences leave, so no rank ever runs
// out of KV memory. Only its group's goroutine uses it.
type kvBudget struct {
	geom   memplan.Geometry
	blocks int
	used   int
}

// budgetOf is the group's budget from its ranks' plans, for steps that feed a sequence up to piece tokens
// (memplan.Geometry.Piece); nil when a rank has none (a family that declares no KV cache): the group then
// admits by MaxBatch and the token budget alone.
func budgetOf(plans []*pb.MemoryPlan, piece int) (*kvBudget, error) {
	var k *kvBudget
	for i, p := range plans {
		if p == nil || p.GetKvBlocks() <= 0 {
			return nil, nil
		}
		g := memplan.Geometry{BlockSize: int(p.GetBlockSize()), Piece: piece}
		for _, w := range p.GetWindows() {
			g.Layers = append(g.Layers, memplan.Layer{Window: int(w)})
		}
		if k == nil {
			k = &kvBudget{geom: g, blocks: int(p.GetKvBlocks())}
			continue
		}
		if g.BlockSize != k.geom.BlockSize || len(g.Layers) != len(k.geom.Layers) {
			return nil, fmt.Errorf("%w: rank %d's KV cache has %d layers in blocks of %d tokens, rank 0's %d in blocks of %d (same --block-size on every worker)",
				ErrStepFailed, i, len(g.Layers), g.BlockSize, len(k.geom.Layers), k.geom.BlockSize)
		}
		k.blocks = min(k.blocks, int(p.GetKvBlocks()))
	}
	return k, nil
}

// need is the blocks r reserves: its worst case, prompt and every new token.
func (k *kvBudget) need(r *request) int { return k.geom.Blocks(len(r.prompt) + r.maxTokens) }

// capacities is what the serving groups' KV caches hold, by group, for the check at admission: a request
// that fits no group is refused at once. It is safe for concurrent use.
type capacities struct {
	mu     sync.Mutex
	groups map[int]kvBudget // blocks and geometry; used is not tracked here
}

// set records group's budget; nil forgets it (the group stopped).
func (c *capacities) set(group int, k *kvBudget) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if k == nil {
		delete(c.groups, group)
		return
	}
	if c.groups == nil {
		c.groups = map[int]kvBudget{}
	}
	c.groups[group] = kvBudget{geom: k.geom, blocks: k.blocks}
}

// longest is the longest context a serving group's KV cache holds alone (the largest over the groups); 0
// when none reports a budget.
func (c *capacities) longest() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, k := range c.groups {
		n = max(n, k.geom.Longest(k.blocks))
	}
	return n
}

// check refuses r with ErrKVCapacity when serving groups report KV budgets and none of them could ever
// hold r; with no budget known (no group serving yet, or families without plans) it admits.
func (c *capacities) check(r *request) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var best *kvBudget
	for _, k := range c.groups {
		if k.need(r) <= k.blocks {
			return nil
		}
		if best == nil || k.blocks > best.blocks {
			best = &k
		}
	}
	if best == nil {
		return nil
	}
	n := len(r.prompt) + r.maxTokens
	return fmt.Errorf("%w: %d prompt tokens + max_tokens %d = %d tokens need %d KV blocks of %d tokens; the largest group holds %d blocks, a context of at most %d tokens: shorten the prompt or lower max_tokens",
		ErrKVCapacity, len(r.prompt), r.maxTokens, n, best.need(r), best.geom.BlockSize, best.blocks, best.geom.Longest(best.blocks))
}
