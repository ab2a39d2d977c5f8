// Package memplan is the memory planner: per rank, it splits a device's memory into the weights, the
// activations of the largest step and a paged key/value cache of fixed-size blocks, and answers how many
// blocks a sequence of L tokens needs under a hybrid attention policy (layers with a window hold at most
// one window of blocks, global layers hold every token).
//
// It is pure and model-neutral: the model declares its cache per layer (model.Memory: KV heads, head
// size, window) and its step activations, the backend reports its memory (backend.MemoryReporter, or the
// host's), and the planner does arithmetic. The coordinator uses the same Geometry to admit requests by
// their worst-case blocks, so it imports this package without linking a backend.
//
// # The formula
//
// A block holds BlockSize tokens of keys and values of one layer on one rank. With h = the layer's KV heads
// per rank (num_key_value_heads / tp, or 1 when tp exceeds them: heads are then replicated), d = head_dim
// and e = the cache's bytes per element (2 for bf16, 4 for the CPU backend's float32):
//
//	bytes per token per layer  = 2 · h · d · e            (keys and values)
//	bytes per block            = BlockSize · 2 · h · d · e
//	blocks(L), global layer    = ceil(L / BlockSize)
//	blocks(L), windowed layer  = min(ceil(L / BlockSize), ceil(window / BlockSize) + 1)
//	blocks(L)                  = Σ over layers
//
// While a step appends a piece of P tokens of a sequence, a windowed layer holds up to a window and the
// piece (it drops its past chunks at the start of an append): the coordinator's admission counts
// min(ceil(L/B), ceil((window+P-1)/B)+1) for it (Geometry.Piece), which is the formula above at P = 1.
//
// docs/operations.md works it through for Llama 4 Scout and Maverick.
package memplan
