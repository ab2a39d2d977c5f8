// Package kernels holds the CUDA C sources of the GPU backend's kernels (*.cu), embedded in the binary.
//
// The cuda backend compiles [Source] with NVRTC at start-up for the GPU it finds, so no CUDA toolchain is
// needed at build time. The sources include no CUDA headers: bfloat16 values are handled as bit
// patterns (prelude.cuh), and every tensor operand is passed with a dtype code (DT_BF16 or DT_F32) so
// one kernel serves both storage types. Kernels are declared extern "C" so the backend finds them by
// their plain names.
package kernels
