// Package nccl is the comm.Comm of GPUs: NCCL, dlopened at run time through a thin cgo layer with our own
// declarations (package internal/dl finds libnccl.so.2 and libcuda.so.1), so the binary builds with no
// CUDA present.
//
// [NewGroup] joins n GPUs of one process into one communicator; [Join] (or [New]) joins one rank per
// process. Rank 0 makes the group's [UniqueID] with [NewUniqueID] and publishes it (its base64 text,
// UniqueID.MarshalText, in a rendezvous file; its raw bytes in etcd); the other ranks read it and join
// with the same id. Its collectives take comm.DeviceBuffer values and are stream-ordered; a watchdog
// turns a dead peer into an error instead of a hang. NCCL_NVLS_ENABLE is set to 0 when unset.
package nccl
