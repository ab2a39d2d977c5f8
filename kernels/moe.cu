// moe.cu: router top-k and the routed experts. The chosen expert ids stay in device memory: the expert
// kernels read them there, so a MoE layer needs no host round trip.

// route_token picks token t's k largest logits of logits [T, E] in order, ties to the lower index, NaN
// never larger than a number: experts[t·k + j] is the j-th choice and scores[t·k + j] its sigmoid,
// evaluated in float64 and rounded.
__device__ __forceinline__ void route_token(const void* logits, int dt, int t, int E, int k, int* experts, float* scores) {
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

// route runs route_token for each row t of logits [T, E], one thread a row.
extern "C" __global__ void route(const void* logits, int dt, int T, int E, int k, int* experts, float* scores) {
	PDL_PROLOGUE();
	int t = blockIdx.x * blockDim.x + threadIdx.x;
	if (t >= T) return;
	route_token(logits, dt, t, E, k, experts, scores);
}

// route_plan is a decode step's route, count_experts and moe_plan (with align 1) in one launch of one
// block, with the same results: with route_rows, route_token for each of the T rows of logits [T, C]
// (else experts already holds the n = T·k choices); with counts (not null), one count for each choice e
// in [0, count_n) into counts[e], as count_experts; then moe_plan's seg, perm, row_of, active and meta
// for the local experts first .. first+E-1, each local expert's slots in their order. Threads stride over
// tokens, slots and experts, so it takes any T·k, but is meant for a few: each thread scans every slot
// for its experts. Dynamic shared memory holds n + E ints.
extern "C" __global__ void route_plan(const void* logits, int dt, int T, int C, int k, int route_rows, int* experts,
	float* scores, unsigned long long* counts, int count_n, int first, int E, int* seg, int* perm, int* row_of,
	int* active, int* meta) {
	PDL_PROLOGUE();
	extern __shared__ int rp_sh[];
	int n = T * k;
	int* ids = rp_sh; // [n]: the choices
	int* cur = rp_sh + n; // [E]: each local expert's slot count, then its next permuted row
	if (route_rows) {
		for (int t = threadIdx.x; t < T; t += blockDim.x) route_token(logits, dt, t, C, k, experts, scores);
		__syncthreads(); // the choices in global memory, for every thread of the block
	}
	for (int s = threadIdx.x; s < n; s += blockDim.x) {
		int e = experts[s];
		ids[s] = e;
		if (counts && e >= 0 && e < count_n) atomicAdd(&counts[e], 1ull);
	}
	__syncthreads();
	for (int e = threadIdx.x; e < E; e += blockDim.x) {
		int c = 0;
		for (int s = 0; s < n; s++) c += ids[s] - first == e;
		cur[e] = c;
	}
	__syncthreads();
	if (threadIdx.x == 0) {
		int off = 0, na = 0;
		for (int e = 0; e < E; e++) {
			int c = cur[e];
			seg[2 * e] = off;
			seg[2 * e + 1] = c;
			cur[e] = off;
			if (c > 0) {
				active[na++] = e;
				off += c;
			}
		}
		meta[0] = na;
		meta[1] = off;
	}
	__syncthreads();
	for (int e = threadIdx.x; e < E; e += blockDim.x) {
		int r = cur[e];
		for (int s = 0; s < n; s++) {
			if (ids[s] - first == e) {
				perm[r] = s;
				row_of[s] = r++;
			}
		}
	}
	for (int s = threadIdx.x; s < n; s += blockDim.x) {
		int e = ids[s] - first;
		if (e < 0 || e >= E) row_of[s] = -1;
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
