// expert_map.cu: a routing's choices sent to the replicas of hot experts (backend.ExpertMapper). The
// choice stays in device memory; the table is the step's small upload.

// map_experts maps routing slot s = t·k + j (one thread a slot): its expert e (a router row) goes to
// slots[off[e] + spread[t] mod (off[e+1] - off[e])], where table holds off [E+1], then slots [P] (every
// expert's replica slots in turn), then spread [T]; the score is copied. An expert outside [0, E) maps
// to -1, which no rank holds (the host checks the table, not the device's choice).
extern "C" __global__ void map_experts(const int* experts, const float* scores, int T, int k, const int* table, int E,
	int P, int* out_experts, float* out_scores) {
	PDL_PROLOGUE();
	int s = blockIdx.x * blockDim.x + threadIdx.x;
	if (s >= T * k) return;
	int e = experts[s];
	out_scores[s] = scores[s];
	if (e < 0 || e >= E) {
		out_experts[s] = -1;
		return;
	}
	const int* off = table;
	const int* slots = table + E + 1;
	const int* spread = table + E + 1 + P;
	int n = off[e + 1] - off[e];
	out_experts[s] = slots[off[e] + spread[s / k] % n];
}
