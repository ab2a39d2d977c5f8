// grouped_check.cpp: runs the grouped expert GEMMs of kernels/grouped.cu under the emulator (emu.h, which
// stands in for mma.sync, ldmatrix and cp.async) after moe_plan (gemv.cu, packed rows) on small random
// routings, and compares them with a float64 host reference:
//   - grouped_gate_up's act (every permuted row: silu(s·g)·(s·u) of the token's row and its expert's
//     gate and up columns, within bf16 rounding), outputs poisoned first;
//   - grouped_down into y then expert_combine (the top-k > 1 path) against the float64 sum over each
//     token's local slots of act (as the kernel stored it) times down, plus the add;
//   - at top-k 1, grouped_fill + grouped_down's combine epilogue against that path, bit for bit.
// The routings have experts with no tokens, experts of more than one 128-row tile, row counts that are
// not a multiple of 16, top-k 1 and 2, experts held elsewhere (first > 0, expert parallelism), more
// than 32 active experts (the tile search's several passes), and widths with K and N tails (H, I not
// multiples of 32 and of the 128- and 256-column tiles). Build and run:
// scripts/gpu/emu-grouped.sh.
#include "src.cu" // made by emu-grouped.sh
#include <random>
#include <algorithm>
std::mt19937 rng(11);
float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
int bad = 0;
long compared = 0;

#define CHECK(cond, ...)                                              \
	do {                                                              \
		compared++;                                                   \
		if (!(cond) && bad++ < 20) printf(__VA_ARGS__), printf("\n"); \
	} while (0)

static unsigned bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static double bf(bf16_t h) { return (double)bf16_to_f32(h); }

static std::vector<bf16_t> randbf(size_t n, float scale) {
	std::vector<bf16_t> v(n);
	for (auto& h : v) h = f32_to_bf16(urand(-scale, scale));
	return v;
}

struct Case {
	const char* name;
	int T, k, C, first, E, H, I;
	std::vector<double> weight; // the router's preference for each of the C experts (0: never chosen)
	int adt;                    // -1: no add
};

void run(const Case& c) {
	int T = c.T, k = c.k, E = c.E, H = c.H, I = c.I, n = T * k;
	// The routing: k distinct experts a token, drawn by weight; a random score each.
	std::discrete_distribution<int> pick(c.weight.begin(), c.weight.end());
	std::vector<int> experts(n);
	std::vector<float> scores(n);
	for (int t = 0; t < T; t++)
		for (int j = 0; j < k; j++) {
			int e;
			bool dup;
			do {
				e = pick(rng);
				dup = false;
				for (int i = 0; i < j; i++) dup |= experts[t * k + i] == e;
			} while (dup);
			experts[t * k + j] = e;
			scores[t * k + j] = urand(0.05f, 1.0f);
		}
	std::vector<int> seg(2 * E), perm(std::max(n, 1), -7), rowOf(n), active(E), meta(2);
	launch(dim3{1}, dim3{32}, [&] { moe_plan(experts.data(), n, c.first, E, 1, seg.data(), perm.data(), rowOf.data(), active.data(), meta.data()); });
	int rows = meta[1], R = n;
	int tiles = (R + GG_BM - 1) / GG_BM + std::min(E, R);
	std::vector<int> counts(E);
	for (int e = 0; e < E; e++) counts[e] = seg[2 * e + 1];

	std::vector<bf16_t> x = randbf((size_t)T * H, 1.0f), gu = randbf((size_t)E * H * 2 * I, 0.2f), down = randbf((size_t)E * I * H, 0.2f);
	std::vector<float> addf((size_t)T * H);
	std::vector<bf16_t> addh((size_t)T * H);
	for (size_t i = 0; i < addf.size(); i++) {
		addf[i] = urand(-1, 1);
		addh[i] = f32_to_bf16(addf[i]);
	}
	const void* add = c.adt < 0 ? nullptr : c.adt == DT_BF16 ? (const void*)addh.data() : (const void*)addf.data();
	int adt = c.adt < 0 ? DT_F32 : c.adt;
	auto addAt = [&](long i) { return c.adt < 0 ? 0.0 : c.adt == DT_BF16 ? bf(addh[i]) : (double)addf[i]; };

	// gate_up
	std::vector<bf16_t> act((size_t)R * I, 0x7fc1);
	launch(dim3{(unsigned)tiles, (unsigned)((I + GG_BN / 2 - 1) / (GG_BN / 2))}, dim3{GG_THREADS}, [&] {
		grouped_gate_up(x.data(), perm.data(), scores.data(), k, seg.data(), active.data(), meta.data(), gu.data(), H, I, act.data());
	});
	for (int r = 0; r < rows; r++) {
		int slot = perm[r], t = slot / k, e = experts[slot] - c.first;
		double s = scores[slot];
		for (int ch = 0; ch < I; ch++) {
			double g = 0, u = 0, ga = 0, ua = 0;
			for (int h = 0; h < H; h++) {
				double xv = bf(x[(size_t)t * H + h]);
				double wg = bf(gu[((size_t)e * H + h) * 2 * I + ch]), wu = bf(gu[((size_t)e * H + h) * 2 * I + I + ch]);
				g += xv * wg, u += xv * wu, ga += std::fabs(xv * wg), ua += std::fabs(xv * wu);
			}
			g *= s, u *= s, ga *= s, ua *= s;
			double want = g / (1 + std::exp(-g)) * u;
			double got = bf(act[(size_t)r * I + ch]);
			double tol = std::ldexp(std::fabs(want), -8) + 1e-5 * (1 + ga) * (1 + ua);
			CHECK(std::fabs(got - want) <= tol, "%s: act row %d (slot %d, token %d, expert %d) ch %d: %.7g, want %.7g", c.name, r, slot, t, e, ch, got, want);
		}
	}

	// down into y, then expert_combine
	std::vector<float> y((size_t)R * H, NAN), out1((size_t)T * H, NAN);
	launch(dim3{(unsigned)tiles, (unsigned)((H + GG_BN - 1) / GG_BN)}, dim3{GG_THREADS}, [&] {
		grouped_down(act.data(), perm.data(), seg.data(), active.data(), meta.data(), down.data(), I, H, y.data(), nullptr, DT_F32, nullptr, DT_F32);
	});
	launch(dim3{(unsigned)((T * H + 255) / 256)}, dim3{256}, [&] {
		expert_combine(y.data(), 1, R, H, rowOf.data(), k, out1.data(), DT_F32, (long long)T * H, add, adt);
	});
	for (int t = 0; t < T; t++)
		for (int h = 0; h < H; h++) {
			double want = 0, abs = 0;
			for (int j = 0; j < k; j++) {
				int r = rowOf[t * k + j];
				if (r < 0) continue;
				int e = experts[t * k + j] - c.first;
				for (int i = 0; i < I; i++) {
					double p = bf(act[(size_t)r * I + i]) * bf(down[((size_t)e * I + i) * H + h]);
					want += p, abs += std::fabs(p);
				}
			}
			double a = addAt((long)t * H + h);
			want += a, abs += std::fabs(a);
			double got = out1[(size_t)t * H + h];
			CHECK(std::fabs(got - want) <= 2e-5 * abs + 1e-7, "%s: out token %d h %d: %.7g, want %.7g", c.name, t, h, got, want);
		}

	// top-k 1: the combine in grouped_down's epilogue, grouped_fill for the tokens held elsewhere.
	if (k == 1) {
		std::vector<float> out2((size_t)T * H, NAN);
		launch(dim3{(unsigned)std::min(T, 65535)}, dim3{64}, [&] { grouped_fill(rowOf.data(), k, T, H, out2.data(), DT_F32, add, adt); });
		launch(dim3{(unsigned)tiles, (unsigned)((H + GG_BN - 1) / GG_BN)}, dim3{GG_THREADS}, [&] {
			grouped_down(act.data(), perm.data(), seg.data(), active.data(), meta.data(), down.data(), I, H, nullptr, out2.data(), DT_F32, add, adt);
		});
		for (size_t i = 0; i < out2.size(); i++)
			CHECK(bits(out2[i]) == bits(out1[i]), "%s: fused combine [%zu] = %.9g, expert_combine %.9g", c.name, i, out2[i], out1[i]);
	}
	printf("  %-34s T %3d k %d experts %d..%d of %d, H %3d I %3d: rows", c.name, T, k, c.first, c.first + E - 1, c.C, H, I);
	for (int e = 0; e < E; e++) printf(" %d", counts[e]);
	printf("\n");
}

int main() {
	std::vector<Case> cases = {
		{"uneven, an expert without tokens", 40, 1, 6, 0, 6, 64, 48, {1, 6, 1, 0, 2, 1}, DT_F32},
		{"top-2, two row tiles, K tails", 150, 2, 4, 0, 4, 72, 40, {12, 1, 2, 1}, -1},
		{"expert parallel, top-1", 70, 1, 6, 2, 3, 64, 32, {1, 1, 3, 1, 0, 2}, DT_F32},
		{"N tails of both tiles, bf16 add", 200, 1, 2, 0, 2, 264, 136, {3, 1}, DT_BF16},
		{"129 rows: a one-row tile", 129, 1, 1, 0, 1, 32, 16, {1}, -1},
		{"expert parallel, top-2", 90, 2, 4, 1, 2, 48, 24, {1, 2, 1, 1}, DT_F32},
	};
	// More than 32 active experts: the tile search's prefix sum runs over several passes of a warp.
	std::vector<double> many(70, 1.0);
	many[3] = many[40] = many[65] = 0;
	many[33] = 30;
	cases.push_back({"70 experts, top-1", 160, 1, 70, 0, 70, 32, 16, many, DT_F32});
	cases.push_back({"70 experts, top-2, 60 held here", 100, 2, 70, 8, 60, 40, 24, many, -1});
	for (auto& c : cases) run(c);
	if (bad) {
		printf("grouped_check: %d of %ld comparisons failed\n", bad, compared);
		return 1;
	}
	printf("grouped_check: %ld comparisons, all within bounds (the fused combine bit for bit)\n", compared);
	return 0;
}
