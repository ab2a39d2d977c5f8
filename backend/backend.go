package backend

import (
	"context"
	"errors"

	"github.com/tpfleet/tpfleet/comm"
	"github.com/tpfleet/tpfleet/safetensors"
)

// ErrShape reports operands whose shapes do not fit the op. Ops wrap it with the op name and shapes.
var ErrShape = errors.New("backend: shape mismatch")

// Tensor is an n-dimensional array owned by a backend. Its contents live wherever the backend keeps them
// (host memory for cpu, device memory for cuda); read them back with Ops.Float32. Tensors are immutable
// from the model's point of view: every op returns a new tensor and leaves its operands unchanged, except
// the collectives, which work in place as their doc says.
type Tensor interface {
	// Shape is the tensor's dimensions, outermost first. The caller must not modify the slice.
	Shape() []int
}

// Window selects which cached keys a query may attend to, besides causality (key position <= query
// position). Chunk == 0 means global attention; Chunk > 0 means local attention within aligned chunks:
// key j is visible to query p only when j/Chunk == p/Chunk (Llama 4's chunked attention, spec §2.3e).
type Window struct {
	Chunk int
}

// Visible reports whether a key at position key may be attended by a query at position query.
func (w Window) Visible(query, key int) bool {
	if key > query {
		return false
	}
	return w.Chunk == 0 || key/w.Chunk == query/w.Chunk
}

// KVCache holds the keys and values of one attention layer for one sequence, paged: in blocks of its
// BlockPool, through a block table. Keys are stored after RoPE and qk-norm, as attention consumes them.
// A cache drops the positions that Window says no later query can see (chunked layers keep only the
// current chunk: at most ceil(chunk/block size)+1 blocks between decode steps) and returns their blocks to
// the pool; global layers keep every block.
type KVCache interface {
	// Append stores k and v ([T, kvHeads, headDim]) for the absolute positions pos (len T, consecutive,
	// continuing right after the last appended position). A failed Append leaves the cache unchanged.
	Append(k, v Tensor, pos []int) error
	// Len is the number of positions appended so far (not the number kept).
	Len() int
	// Kept is the number of positions currently held in memory.
	Kept() int
	// Free returns every block to the pool. The cache holds nothing afterwards: Append and Attention on
	// it fail. Freeing twice is harmless.
	Free()
}

// Routing is the expert choice for a batch of tokens: for each token, TopK experts and their scores. It
// stays wherever the backend computed it (on the device for cuda).
type Routing interface {
	// TopK is the number of experts chosen per token.
	TopK() int
}

// ExpertCounter is implemented by a Routing whose choices the host reads without a copy from the device
// (cpu's): the model counts the tokens each expert gets (expert load, for rebalancing hot experts). A
// device backend whose routing stays on the device leaves it out and counts there (ExpertTallier).
type ExpertCounter interface {
	// CountExperts adds to counts[e] the number of (token, choice) pairs routed to expert e. counts has one
	// entry per expert of the router's logits; a shorter one is an error wrapping ErrShape.
	CountExperts(counts []int64) error
}

// ExpertTallier is implemented by a backend whose routing stays on the device (cuda's): rather than the host
// reading every step's choice (ExpertCounter, which would cost a device round trip per MoE layer and break
// recorded steps), the device counts the choices into counters of its own, and the host reads them only
// when it asks. A model that finds it counts through it and leaves ExpertCounter alone.
type ExpertTallier interface {
	// NewExpertTally returns a tally of n counters, all zero. Call it outside StepRecorder.Step (at load
	// time): the counters keep their device address for the tally's life, so recorded steps replay their
	// counting. The counters' memory returns to the backend when the tally becomes unreachable.
	NewExpertTally(n int) (ExpertTally, error)
}

// ExpertTally is a set of expert counters on a device (ExpertTallier).
type ExpertTally interface {
	// Add counts r's choices into counters [first, first+n): each (token, choice) pair routed to expert e
	// adds one to counter first+e when 0 <= e < n; others are not counted. It is enqueued like an op, on
	// the goroutine that drives the backend, and a recorded step (StepRecorder) counts at every replay. A
	// range outside the tally is an error wrapping ErrShape.
	Add(r Routing, first, n int) error
	// Counts returns every counter: the tokens of the Adds the device has finished (all those of a step
	// whose output was read or after Synchronizer.Synchronize). Unlike the ops, it is safe to call from
	// any goroutine while another drives the backend (a worker's Status during a step); it waits for its
	// copy only, never for the backend's work.
	Counts() ([]int64, error)
}

// ExpertMapper is implemented by a backend that sends each token's choice of an expert to one of the
// expert's replicas: the slots of a layer's expert tensors over the group (shard.Plan.WithOrder, hot experts
// held on several ranks) are then not the router's experts one for one. A model whose slots differ from
// its router's experts needs it; one whose do not never calls it.
type ExpertMapper interface {
	// MapExperts returns a Routing with r's choices and scores in r's order, where token t's choice of
	// expert e (an index of the router's logits) becomes slot slots[e][spread[t] mod len(slots[e])]: the
	// model picks the spread (the token's position) so that every rank picks the same replica and an
	// expert's tokens split evenly among its replicas. slots has an entry for every expert, none empty;
	// spread has one entry (>= 0) per token. An expert beyond slots, an empty entry or a spread of the
	// wrong length is an error wrapping ErrShape. r is not changed; the result, like r, may be used
	// until the step ends.
	MapExperts(r Routing, slots [][]int, spread []int) (Routing, error)
}

// Ops is the set of operations the model's forward pass is written over. Every shape is given outermost
// first; "[T, n]" means T rows of n elements. Implementations compute in float32 or better unless their doc
// says otherwise. An op with operands of the wrong shape returns an error wrapping ErrShape, never panics.
//
// Ops values are not safe for concurrent use unless the implementation says so: one goroutine drives a
// backend, as one stream drives a GPU.
type Ops interface {
	// Name identifies the backend in logs ("cpu", "cuda:0").
	Name() string

	// Load makes a tensor from host bytes of the given dtype and shape (a checkpoint slice). The backend
	// may convert it (cpu keeps float32) and must not keep a reference to data.
	Load(dt safetensors.DType, shape []int, data []byte) (Tensor, error)
	// FromFloat32 makes a tensor from host float32 values (len = product of shape).
	FromFloat32(shape []int, values []float32) (Tensor, error)
	// Float32 copies a tensor's values to the host, row-major.
	Float32(t Tensor) ([]float32, error)
	// Reshape returns t viewed with a new shape of the same element count.
	Reshape(t Tensor, shape ...int) (Tensor, error)
	// Rows returns rows [start, end) of t along its first dimension.
	Rows(t Tensor, start, end int) (Tensor, error)
	// Concat joins tensors along their first dimension; the other dimensions must agree. It is how a
	// batch of sequences is put back together after each sequence's attention.
	Concat(ts ...Tensor) (Tensor, error)

	// Embed gathers rows of table [V, H] for ids: out[i] = table[ids[i]-first] when first <= ids[i] <
	// first+V, else zeros (so vocab-parallel ranks each fill their own rows and an all-reduce completes
	// the embedding). Returns [len(ids), H].
	Embed(table Tensor, ids []int, first int) (Tensor, error)
	// RMSNorm normalises x over its last dimension: x / sqrt(mean(x²) + eps), then multiplies by weight
	// (shape = last dim) when weight is not nil. With a nil weight it is Llama 4's weightless qk-norm.
	RMSNorm(x, weight Tensor, eps float32) (Tensor, error)
	// Linear computes x · wᵀ: x [T, in], w [out, in] (nn.Linear layout) → [T, out].
	Linear(x, w Tensor) (Tensor, error)
	// Add returns a + b elementwise (same shape).
	Add(a, b Tensor) (Tensor, error)
	// SiLUMul returns silu(gate) * up elementwise (same shape): the SwiGLU product.
	SiLUMul(gate, up Tensor) (Tensor, error)
	// ScaleRows multiplies row i of x ([T, ...]) by scale[i] (len T).
	ScaleRows(x Tensor, scale []float32) (Tensor, error)
	// RoPE rotates x [T, heads, D] by position: for pair i of each head (elements 2i and 2i+1, the
	// interleaved layout of spec §2.3a) the angle is pos[t]·invFreq[i] (len D/2), computed in float32.
	RoPE(x Tensor, pos []int, invFreq []float32) (Tensor, error)

	// NewBlockPool makes a pool of KV blocks of blockSize positions for caches of kvHeads heads of
	// headDim: blocks of them, allocated now, or (blocks == 0) a pool that grows as caches need blocks.
	NewBlockPool(kvHeads, headDim, blockSize, blocks int) (BlockPool, error)
	// NewKVCache makes an empty cache for one layer of one sequence in pool's blocks: room for capacity
	// positions (the largest position + 1 it will see), dropping what window hides. It takes no block
	// until its first Append.
	NewKVCache(pool BlockPool, capacity int, window Window) (KVCache, error)
	// Attention computes, for q [T, heads, D] at positions pos (len T), softmax(q·kᵀ·scale)·v over the
	// cached keys each query may see under window, with grouped heads: query head h reads kv head
	// h / (heads / kvHeads). Returns [T, heads, D]. The cache must already hold the queries' own positions.
	Attention(q Tensor, cache KVCache, pos []int, window Window, scale float32) (Tensor, error)

	// Route picks, for each row of logits [T, E], the k largest raw logits (ties: lower index first) and
	// scores them with sigmoid (spec §2.4: top-k before sigmoid, no renormalisation).
	Route(logits Tensor, k int) (Routing, error)
	// Experts computes, for each row t of x [T, H], Σ over the row's chosen experts e with score s of
	// (up ⊙ silu(gate)) · down[e], where [gate | up] = (x[t]·s) · gateUp[e]. gateUp is [E, H, 2I] (gate in
	// the first I columns, up in the last I: HF's packed layout, used as x·W), down is [E, I, H]. The
	// tensors hold experts first .. first+E-1 of the model's; chosen experts outside that range add
	// nothing, so expert-parallel ranks each add their own. Returns [T, H].
	Experts(x Tensor, r Routing, gateUp, down Tensor, first int) (Tensor, error)

	// AllReduce sums t across the ranks of c, in place.
	AllReduce(ctx context.Context, c comm.Comm, t Tensor) error
	// AllGather concatenates each rank's t [T, n] along the last dimension in rank order → [T, n·size].
	AllGather(ctx context.Context, c comm.Comm, t Tensor) (Tensor, error)
}
