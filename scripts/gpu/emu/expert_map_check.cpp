// expert_map_check.cpp: runs map_experts (kernels/expert_map.cu) under the emulator (emu.h) on random
// routings and compares it with the host rule of backend.ExpertMapper: token t's choice of expert e goes to
// slots[e][spread[t] mod len(slots[e])], scores copied, an expert outside [0, E) to -1. Build and run:
// scripts/gpu/emu-expert-map.sh.
#include "src.cu" // made by emu-expert-map.sh
#include <random>
#include <vector>
std::mt19937 rng(11);
int bad = 0;

int main() {
	for (int trial = 0; trial < 50; trial++) {
		int E = 2 + rng() % 14, k = 1 + rng() % 2, T = 1 + rng() % 300;
		// Every expert one slot, some more: P slots.
		std::vector<std::vector<int>> slots(E);
		int P = 0;
		for (int e = 0; e < E; e++) {
			int n = 1 + (rng() % 4 == 0 ? 1 + rng() % 3 : 0);
			for (int i = 0; i < n; i++) slots[e].push_back(P++);
		}
		std::vector<int> table{0};
		for (int e = 0; e < E; e++) table.push_back(table.back() + (int)slots[e].size());
		for (auto& s : slots) table.insert(table.end(), s.begin(), s.end());
		std::vector<int> spread(T);
		for (auto& s : spread) s = rng() % 100000;
		table.insert(table.end(), spread.begin(), spread.end());
		std::vector<int> experts(T * k), out(T * k, -7);
		std::vector<float> scores(T * k), outScores(T * k, -7);
		for (int s = 0; s < T * k; s++) {
			experts[s] = rng() % 20 == 0 ? E + (int)(rng() % 3) : (int)(rng() % E); // some out of range
			scores[s] = (float)(rng() % 1000) / 1000.0f;
		}
		int n = T * k;
		launch(dim3{(unsigned)((n + 127) / 128)}, dim3{128}, [&] {
			map_experts(experts.data(), scores.data(), T, k, table.data(), E, P, out.data(), outScores.data());
		});
		for (int s = 0; s < n; s++) {
			int e = experts[s], want = -1;
			if (e >= 0 && e < E) want = slots[e][spread[s / k] % slots[e].size()];
			if (out[s] != want || outScores[s] != scores[s]) {
				if (bad++ < 20) printf("trial %d slot %d (expert %d, spread %d): got %d (score %g), want %d (score %g)\n", trial, s, e, spread[s / k], out[s], outScores[s], want, scores[s]);
			}
		}
	}
	if (bad) {
		printf("%d mismatches\n", bad);
		return 1;
	}
	return 0;
}
