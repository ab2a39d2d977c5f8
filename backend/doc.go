// Package backend defines Ops, the operations Llama 4's forward pass is written over, the Tensor, KVCache
// and Routing values they exchange, the registry of backends and their optional capabilities. The
// package knows nothing of Llama: ops are named for the math they do (RMSNorm, RoPE, Attention,
// Experts), not for the layer that calls them.
//
// # Registry
//
// Backends register themselves by name in their package's init (Register with a Driver): backend/cpu
// as "cpu" (pure Go, float32, the reference) and the cuda backend as "cuda". A binary offers the backends
// it imports for their side effect only (cmd/tpfleet/backends.go); everything else opens them with
// Open(ctx, name, Options) (device index, threads, and the backend's own settings, bound to flags
// with BindFlags), lists them with Names, and asks the registry, before anything is open, whether a
// backend has devices of its own (HasDevices, DeviceCount) and whether its groups need a device
// communicator (Driver.DeviceComm). An unknown name is an error wrapping ErrUnknown that lists the
// registered ones; a backend that cannot run on this machine (cuda without a GPU) returns an error
// wrapping ErrUnavailable that names what is missing.
//
// # Optional capabilities
//
// What only some backends can do is a small interface, found by a type assertion on an Ops, never by
// a backend's name or concrete type: fused ops (AddNormer, QKRotator, MultiLinear, ExpertsAdder,
// BatchAttender, GatedLinear, QKAttender; their docs name the unfused ops they must equal), recorded steps (StepRecorder,
// GraphReporter), on-device sampling (Sampler), Synchronizer, MemoryReporter, KVSizer, Describer, Threader,
// Profiler, BandwidthMeter, QuantizedLoader (weights in package quant's formats: fp8 rowwise, compressed-tensors
// FP8, int4 group-wise; Linear and Experts dispatch on the format a weight carries; CheckQuantized reports a
// backend without it as errors.ErrUnsupported before anything loads), expert counting (ExpertCounter on a
// host Routing, ExpertTallier's counters on a device), ExpertMapper, and DeviceContext, which makes a TP group of the backend join through NCCL
// instead of the TCP ring (package tpgroup).
package backend
