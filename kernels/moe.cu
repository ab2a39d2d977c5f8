// moe.cu: router top-k and the routed experts. The chosen expert ids stay in device memory: the expert
// kernels read them there, so a MoE layer needs no host round trip.

// route picks, for each row t of logits [T, E] (one thread a row), the k largest logits in order, ties
// to the lower index, NaN never larger than a number; experts[t·k + j] is the j-th choice and
// scores[t·k + j] its sigmoid, evaluated in float64 and rounded.
extern "C" __global__ void route(const void* logits, int dt, int T, int E, int k, int* experts, float* scores) {
	PDL_PROLOGUE();
	int t = blockIdx.x * blockDim.x + threadIdx.x;
	if (t >= T) return;
	long long off = (long long)t * E;
	for (int j = 0; j < k; j++) {
		int best = -1;
		float bv = 0.0f;
		for (int e = 0; e < E; e++) {
			bool taken = false;
			for (int i = 0; i < j; i++) taken |= experts[t * k + i] == e;
			if (taken) continue;
			float v = ld(logits, dt, off + e);
			if (best < 0 || v > bv || (bv != bv && v == v)) {
				best = e;
				bv = v;
			}
		}
		experts[t * k + j] = best;
		scores[t * k + j] = (float)(1.0 / (1.0 + exp(-(double)bv)));
	}
}

// expert_gate_up computes, for routing slot s = blockIdx.x (token s / k) whose expert e is held here
// (first <= e < first + E), act[s] = up ⊙ silu(gate) with [gate | up] = (x[t]·score) · gu[e - first],
// gu [E, H, 2I] input-major. Slots whose expert is elsewhere get zeros. One thread an output column;
// dynamic shared memory holds the scaled input row (H floats).
extern "C" __global__ void expert_gate_up(const void* x, int xdt, const int* experts, const float* scores, int k,
	const void* gu, int gdt, int first, int E, int H, int I, float* act) {
	PDL_PROLOGUE();
	extern __shared__ float u[];
	int slot = blockIdx.x;
	int t = slot / k;
	int e = experts[slot] - first;
	int c = blockIdx.y * blockDim.x + threadIdx.x;
	if (e < 0 || e >= E) { // uniform over the block
		if (c < I) act[(long long)slot * I + c] = 0.0f;
		return;
	}
	float s = scores[slot];
	for (int i = threadIdx.x; i < H; i += blockDim.x) u[i] = ld(x, xdt, (long long)t * H + i) * s;
	__syncthreads();
	if (c >= I) return;
	long long base = (long long)e * H * 2 * I;
	float g = 0.0f, up = 0.0f;
	for (int i = 0; i < H; i++) {
		long long r = base + (long long)i * 2 * I;
		g += u[i] * ld(gu, gdt, r + c);
		up += u[i] * ld(gu, gdt, r + I + c);
	}
	act[(long long)slot * I + c] = silu(g) * up;
}

// expert_down computes out[t] = Σ over token t's slots j (in routing order) whose expert e is held here
// of act[t·k + j] · down[e - first], down [E, I, H]. One thread an output column; dynamic shared memory
// holds one slot's activation (I floats). Every output element is written, zeros when no expert is held.
extern "C" __global__ void expert_down(const float* act, const int* experts, int k, const void* down, int ddt,
	int first, int E, int H, int I, void* out, int odt) {
	PDL_PROLOGUE();
	extern __shared__ float a[];
	int t = blockIdx.x;
	int o = blockIdx.y * blockDim.x + threadIdx.x;
	float sum = 0.0f;
	for (int j = 0; j < k; j++) {
		long long slot = (long long)t * k + j;
		int e = experts[slot] - first;
		if (e < 0 || e >= E) continue; // uniform over the block
		__syncthreads();
		for (int c = threadIdx.x; c < I; c += blockDim.x) a[c] = act[slot * I + c];
		__syncthreads();
		if (o < H) {
			float y = 0.0f;
			long long base = (long long)e * I * H;
			for (int c = 0; c < I; c++) y += a[c] * ld(down, ddt, base + (long long)c * H + o);
			sum += y;
		}
	}
	if (o < H) st(out, odt, (long long)t * H + o, sum);
}
