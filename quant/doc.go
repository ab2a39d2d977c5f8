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
// # Numerics: what the dequantised weight is
//
// The CPU backend is the reference: it computes with Weight.Dequantize's values in float32, and each
// format's values are those of the HF path it stands for, so that HF float32 logits of the same weights
// (scripts/fixtures/make_quant_fixtures.py, TestQuantGoldens) agree to 1e-4.
//
//   - compressed-tensors FP8 checkpoints (CompressedTensorsFP8, RoundBF16): transformers 5.17 decompresses
//     W_bf16 = (W_fp8.to(float32) * scale.to(float32)).to(bfloat16) (spec §3.4), so Dequantize
//     rounds each q·scale to bf16; the scales are read in the checkpoint's dtype (usually bf16) and widened
//     exactly to float32.
//   - fp8 rowwise of a bf16 checkpoint (--quantization fp8, FbgemmFp8, spec §3.5): scale = max|row|/448 in
//     float32, code = E4M3(clamp(w/scale, ±448)) with w/scale a float32 division (as the spec writes it;
//     fbgemm's kernel multiplies by 448/max, which can differ at a rounding tie), and the dequantised value
//     q·scale stays float32, not rounded to bf16: f8f8bf16_rowwise multiplies the float32 accumulator by
//     the two scales, so its weight is exactly q·scale. Only the GEMM's output is bf16, which a float32
//     reference does not model (the CUDA bound, 3e-2, covers it).
//   - int4: q·scale in float32 (q in [-8, 7], scale bf16-valued); no further rounding.
//
// quant imports only safetensors; the coordinator may import it (it links no backend).
package quant
