// expert_count.cu: tokens per expert counted where the routing is, on the device (backend.ExpertTally).
// The counters are 64-bit, so a long-running worker never wraps them, and integer atomics make the totals
// exact whatever the order the threads run in.

// count_experts adds one to counts[e] for each of the n routing slots (one thread a slot) whose expert e
// lies in [0, E); other ids (map_experts' -1, another rank's numbering) are not counted.
extern "C" __global__ void count_experts(const int* experts, int n, unsigned long long* counts, int E) {
	PDL_PROLOGUE();
	int s = blockIdx.x * blockDim.x + threadIdx.x;
	if (s >= n) return;
	int e = experts[s];
	if (e >= 0 && e < E) atomicAdd(&counts[e], 1ull);
}
