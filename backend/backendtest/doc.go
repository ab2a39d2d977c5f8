// Package backendtest is the conformance suite for backend.Ops. Every backend's tests call [Run]:
//
//	func TestConformance(t *testing.T) {
//		backendtest.Run(t, cpu.New(cpu.Config{}), backendtest.Tolerance{RelL2: 1e-5})
//	}
//
// Run checks each op against plain float64 reference implementations written in this package (they share
// no code with any backend) on seeded random inputs of several shapes, odd ones included. Results are
// compared by relative L2 error, ‖got − want‖₂ / ‖want‖₂, bounded by [Tolerance]; values that must be
// exact (zeros outside an embedding shard or an expert range, loaded constants) are compared exactly.
//
// Besides the math, Run checks the contracts of backend.Ops: wrong shapes give errors wrapping
// backend.ErrShape and never panic; values made by another backend are refused with an error; outputs are
// fully written even when the backend's allocator hands back memory that earlier ops filled with NaN; a
// KV cache with a chunked window drops old chunks (Kept ≤ Chunk + the length of the last Append) yet
// attention over several Appends equals attention over one; Route breaks ties by the lower expert index;
// Experts with a first offset lets expert-parallel halves sum to the full result; Embed with a first
// offset gives zeros outside its rows.
//
// A backend whose Routing can be read back implements [RoutingReader]; Run then also checks Route's
// choice and scores directly, and otherwise checks them through Experts only.
//
// A backend that implements backend.Sampler gets the Sample subtest: greedy and top-1 rows (ties, -0,
// masked -Inf) must give the argmax exactly; sampled rows (top-k 50 / top-p 0.9, the whole-vocabulary
// nucleus, plain temperature, top-k at and beyond 1024, rows of 1 to 202048 logits, bf16 logits through
// Load, N = 1 and 16 mixed rows) must give the definition's id within backend.SampleTolerance of the draw
// and the top-p, against a float64 restatement of the definition.
//
// Collectives are not covered: they need a communicator matched to the backend's memory, so each
// backend tests them itself.
package backendtest
