// expert_count_check.cpp: runs count_experts (kernels/expert_count.cu) under the emulator (emu.h), after
// map_experts (kernels/expert_map.cu) as the model runs them, and compares with host counts. Each trial is
// a model of a few MoE layers sharing one counter array (one range of slots a layer, as
// model/llama4/experts.go lays them out); several steps of random routings (some ids out of range) are
// mapped to replica slots and counted into the layer's range. Checked: the slot counters equal the host's
// count of the mapped choices, counters outside the layer's range stay untouched, and the tokens per
// expert summed over each expert's slots equal the host's count of the router's choices (what
// backend.ExpertCounter gives on cpu). Build and run: scripts/gpu/emu-expert-count.sh.
#include "src.cu" // made by emu-expert-count.sh
#include <random>
#include <vector>
std::mt19937 rng(15);
int bad = 0;

#define CHECK(cond, ...)                                        \
	do {                                                        \
		if (!(cond) && bad++ < 20) printf(__VA_ARGS__), printf("\n"); \
	} while (0)

int main() {
	long long counted = 0;
	for (int trial = 0; trial < 12; trial++) {
		int layers = 1 + rng() % 3, k = 1 + rng() % 2;
		std::vector<int> E(layers), first(layers);
		std::vector<std::vector<int>> slotUnit(layers);           // slot → expert
		std::vector<std::vector<std::vector<int>>> slots(layers); // expert → its slots
		int total = 0;
		for (int l = 0; l < layers; l++) {
			E[l] = 2 + rng() % 14;
			slots[l].resize(E[l]);
			for (int e = 0; e < E[l]; e++) {
				int n = 1 + (rng() % 4 == 0 ? 1 + rng() % 3 : 0);
				for (int i = 0; i < n; i++) {
					slots[l][e].push_back((int)slotUnit[l].size());
					slotUnit[l].push_back(e);
				}
			}
			first[l] = total;
			total += (int)slotUnit[l].size();
		}
		// Sentinels around the counters: nothing may be written outside [0, total).
		const unsigned long long guard = 0x5a5a5a5a5a5a5a5aull;
		std::vector<unsigned long long> mem(total + 2, 0);
		mem[0] = mem[total + 1] = guard;
		unsigned long long* counts = mem.data() + 1;
		std::vector<std::vector<long long>> wantSlots(layers), wantTokens(layers);
		for (int l = 0; l < layers; l++) wantSlots[l].assign(slotUnit[l].size(), 0), wantTokens[l].assign(E[l], 0);
		for (int step = 0; step < 4; step++) {
			for (int l = 0; l < layers; l++) {
				int T = step == 0 ? 1 + rng() % 300 : 1 + rng() % 8; // a prefill, then decode steps
				int P = (int)slotUnit[l].size();
				std::vector<int> table{0};
				for (int e = 0; e < E[l]; e++) table.push_back(table.back() + (int)slots[l][e].size());
				for (auto& s : slots[l]) table.insert(table.end(), s.begin(), s.end());
				std::vector<int> spread(T);
				for (auto& s : spread) s = rng() % 100000;
				table.insert(table.end(), spread.begin(), spread.end());
				int n = T * k;
				std::vector<int> experts(n), mapped(n, -7);
				std::vector<float> scores(n, 0.5f), outScores(n);
				for (int s = 0; s < n; s++) {
					experts[s] = rng() % 25 == 0 ? E[l] + (int)(rng() % 3) : (int)(rng() % E[l]);
					if (experts[s] < E[l]) wantTokens[l][experts[s]]++;
				}
				dim3 grid{(unsigned)((n + 127) / 128)}, block{128};
				launch(grid, block, [&] { map_experts(experts.data(), scores.data(), T, k, table.data(), E[l], P, mapped.data(), outScores.data()); });
				launch(grid, block, [&] { count_experts(mapped.data(), n, counts + first[l], P); });
				for (int s = 0; s < n; s++)
					if (mapped[s] >= 0 && mapped[s] < P) wantSlots[l][mapped[s]]++;
				counted += n;
			}
		}
		CHECK(mem[0] == guard && mem[total + 1] == guard, "trial %d: a counter outside the tally was written", trial);
		for (int l = 0; l < layers; l++) {
			std::vector<long long> tokens(E[l], 0);
			for (size_t s = 0; s < slotUnit[l].size(); s++) {
				long long got = (long long)counts[first[l] + s];
				CHECK(got == wantSlots[l][s], "trial %d layer %d slot %zu: counted %lld, want %lld", trial, l, s, got, wantSlots[l][s]);
				tokens[slotUnit[l][s]] += got;
			}
			for (int e = 0; e < E[l]; e++)
				CHECK(tokens[e] == wantTokens[l][e], "trial %d layer %d expert %d: %lld tokens over its slots, want %lld", trial, l, e, tokens[e], wantTokens[l][e]);
		}
	}
	if (bad) {
		printf("%d mismatches\n", bad);
		return 1;
	}
	printf("count_experts: 12 trials, %lld routed choices, slot and expert totals exact\n", counted);
	return 0;
}
