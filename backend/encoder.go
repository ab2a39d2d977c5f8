package backend

// EncoderOps is implemented by backends that run bidirectional transformer encoders (ViT-style image
// towers): the ops such an encoder needs beyond Ops. A backend without it cannot run one; callers report
// that with errors.ErrUnsupported. Like Ops, its methods return a new tensor and leave the operands
// unchanged, and an operand of the wrong shape is an error wrapping ErrShape.
type EncoderOps interface {
	// LayerNorm normalises x over its last dimension n: (x − mean) / sqrt(var + eps) · weight + bias,
	// with the biased variance (nn.LayerNorm). weight and bias have shape [n].
	LayerNorm(x, weight, bias Tensor, eps float32) (Tensor, error)
	// AddBias adds bias [n] to every row of x [..., n] (nn.Linear's bias after Linear).
	AddBias(x, bias Tensor) (Tensor, error)
	// GELU is the exact GELU, 0.5·x·(1 + erf(x/√2)) (nn.GELU()), elementwise.
	GELU(x Tensor) (Tensor, error)
	// RotatePairs rotates the interleaved pairs (x[2i], x[2i+1]) of every head of x [T, heads, D] by an
	// angle given per row and pair: cos and sin are [T, D/2] tables (float32). It is RoPE with any
	// positions, such as a 2-D image grid's.
	RotatePairs(x, cos, sin Tensor) (Tensor, error)
	// FullAttention computes softmax(q·kᵀ·scale)·v without a mask within each of the len/seq sequences of
	// q, k, v [S·seq, heads, D]: rows [s·seq, (s+1)·seq) attend to each other only. Returns [S·seq,
	// heads, D].
	FullAttention(q, k, v Tensor, seq int, scale float32) (Tensor, error)
}
