// Package comm owns the collectives of a TP group: the [Comm] interface through which the ranks of a
// tensor-parallel group all-reduce, all-gather and broadcast activations, and its pure-Go
// implementations. The GPU one, NCCL, is package comm/nccl (cgo).
//
//   - [Solo] is the one-rank communicator of TP=1: every collective is a no-op or a copy.
//   - [NewLocalGroup] runs n ranks as goroutines of one process over shared memory, for tests and for
//     `--tp N` on one CPU.
//   - [Listen] and [Connect] join one rank per process into a TCP ring, for CPU worker processes; with
//     RingConfig's ServerTLS and ClientTLS its connections are TLS, and the configurations decide which
//     peers may join (the worker admits only workers of its cluster).
//   - Package comm/nccl joins GPUs into an NCCL communicator (nccl.NewGroup in one process, nccl.Join one
//     rank per process); its collectives take [DeviceBuffer] values, which only a device communicator
//     accepts ([AcceptsDeviceBuffers]).
//
// # Determinism
//
// After AllReduce every rank holds bitwise-identical values, and the same inputs give the same bits on
// every run: the summation order depends only on the implementation and the group size, never on
// timing. Ranks can therefore take discrete decisions (top-k expert choice, greedy sampling) on reduced values
// and still agree. The local group adds rank 0, 1, ..., n-1 in that order; the TCP ring adds chunk c of
// the buffer in ring order starting at rank c (reduce-scatter) and then copies the owners' final values
// to every rank (all-gather). BFloat16 values are summed in float32 and rounded once.
//
// # Failures
//
// A failed collective breaks the communicator on every rank: the rank that fails tells its peers (the
// local group through shared state, the ring by an abort frame and by closing its connections), so no
// rank hangs waiting for a dead or cancelled peer, and the error names the rank where the failure
// started. Build a new communicator after any error.
//
// The package knows nothing of Llama, gRPC or cluster membership: callers publish ring addresses however
// they like (etcd, files) and pass them to Connect. It imports only the standard library. Its
// conformance suite is [github.com/tpfleet/tpfleet/comm/commtest.Run].
package comm
