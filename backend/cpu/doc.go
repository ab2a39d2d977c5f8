// Package cpu implements backend.Ops in pure Go on host memory, computing in float32.
//
// It is the reference backend: the one the model runs on when no GPU is found, the one the golden tests
// compare HF against, and the yardstick the cuda backend is checked with (package backendtest runs the
// same conformance suite against both).
//
// # Tensors
//
// A tensor is a row-major []float32 plus its shape. [Backend.Load] converts any dtype that
// safetensors.ToFloat32 knows (BF16, F16, F32, F8, integers, …) to float32 and keeps no reference to the
// caller's bytes; [Backend.FromFloat32] copies its values. Tensors are immutable, so [Backend.Reshape]
// and [Backend.Rows] return views that share storage with their operand instead of copying. The one
// exception is [Backend.AllReduce], which sums in place as backend.Ops documents: it also changes every
// view that shares the reduced tensor's storage. [Data] exposes the storage without copying.
//
// # Threads and determinism
//
// Linear, Attention, Experts and the larger elementwise ops spread their work over Config.Threads
// goroutines, started and waited for inside each call (no goroutine outlives the call, so there is no
// pool to close). Work is split by output elements: every output element is computed by exactly one
// goroutine, in an order that depends on neither the number of threads nor how the work was split.
// Results are therefore bit-identical for any Threads value, and Linear's row t does not depend on the
// other rows of x (a one-token decode step gives the same bits as the same token inside a prefill).
//
// # KV cache
//
// A cache made with a chunked window (Window.Chunk > 0) drops the positions of chunks that no later query
// can see. It drops lazily, at the start of the next Append: everything before the chunk of the last
// appended position goes. A prefill whose queries span several chunks is attended after its own Append,
// so all of its positions must still be there at that point; Kept is at most Chunk + the number of
// positions of the last Append. Positions must be appended consecutively.
//
// # Concurrency
//
// A Backend holds no mutable state and is safe for concurrent use. A KVCache is not: one goroutine
// appends to it and attends over it.
package cpu
