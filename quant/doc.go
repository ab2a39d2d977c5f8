// Package quant defines tpfleet's weight formats and their numerics, model- and backend-neutral: FP8 E4M3
// (OCP FP8, "e4m3fn") encoding and decoding, rowwise FP8 quantisation with FbgemmFp8 semantics (spec
// §3.5: one float32 scale per output row, max|row|/448; activations quantised per token the same way,
// row max clamped to 1200), int4 weight-only group-wise quantisation, and the compressed-tensors
// quantization_config of FP8 checkpoints (spec §3.4).
//
// # Formats
//
// A Format says how a weight lives in memory: bf16 (the checkpoint's dtype, no scales), fp8 (E4M3 codes
// and one float32 scale per output channel) or int4 (two's-complement nibbles and one bf16-valued scale per
// output channel and group of GroupSize input columns). The model never branches on it: backends that can
// hold quantised weights implement backend.QuantizedLoader, and their Linear and Experts ops dispatch on
// the format the weight carries.
//
// # Int4 convention
//
// Symmetric, as Marlin/GPTQ-sym and torchao's int4 "symmetric" mapping: per group of GroupSize input
// columns (the last group may be shorter), s = bf16(max|w| / 7), q = clamp(round_half_even(w / s), -8, 7),
// w ≈ q·s; a zero group has s = 0 and q = 0. No zero points.
//
// # Layout of a Weight
//
// Shape has one input (reduction) dimension, InputDim: 1 for an nn.Linear weight [out, in], 1 for routed
// experts stored input-major [E, in, out]. Scales have the weight's shape with the input dimension
// replaced by the number of groups (1 for fp8). Data is row-major over Shape: one E4M3 code per element
// for fp8; for int4 two elements per byte, element 2k in the low nibble.
//
// quant imports only safetensors; the coordinator may import it (it links no backend).
package quant
