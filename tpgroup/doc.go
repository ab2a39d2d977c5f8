// Package tpgroup joins one rank of a tensor-parallel group to its peers: the one way a worker (through
// etcd, cluster.Rendezvous) and a `tpfleet generate|score --rank R --rdzv DIR` process (through a
// directory, Dir) build their communicator.
//
// Join picks the communicator by the backend's capability, never by its name: a backend whose Ops
// implement backend.DeviceContext (cuda) joins an NCCL communicator (package comm/nccl) with its device
// context current; any other joins the pure-Go TCP ring (comm.Connect). A group of one is comm.Solo.
// Local does the same for every rank of a group run as goroutines of one process (nccl.NewGroup or
// comm.NewLocalGroup).
//
// The meeting itself is a Rendezvous: every rank publishes a record (its device kind and its ring
// address or, on a device, a name for logs) and waits for all the group's within ctx's deadline; on a
// device, rank 0 then makes the NCCL unique id and publishes it through the same Rendezvous, after every
// rank is there (so all have loaded their weights before NCCL's uninterruptible set-up), and the others
// wait for it. Errors name the missing ranks, rank 0's missing id, or ranks on different devices.
//
// The package sits between worker/cmd and backend/comm: it imports backend, comm and comm/nccl (cgo),
// so it is not in package comm (pure Go) nor in cluster (which the coordinator imports and which must
// build without cgo); cluster implements Rendezvous over etcd without importing this package. The
// coordinator never imports it.
package tpgroup
