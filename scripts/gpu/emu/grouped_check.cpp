// grouped_check.cpp: runs the grouped expert GEMMs of kernels/grouped.cu under the emulator (emu.h, which
// stands in for mma.sync, ldmatrix and cp.async) after moe_plan (gemv.cu, packed rows) on small random
// routings, and compares them with a float64 host reference, in both operand formats:
//   - bf16: grouped_gate_up's act (every permuted row: silu(s·g)·(s·u) of the token's row and its
//     expert's gate and up columns, within bf16 rounding), outputs poisoned first;
//   - fp8 (W8A8): fp8_act_codes (quant_fp8.cu) quantises the gathered, score-scaled rows, then
//     grouped_fp8_gate_up's float32 act against silu(g)·u with g = sx·sg·Σ qx·qg over the codes it was
//     given (E4M3 decoded by emu.h's own decoder), then fp8_act_codes quantises act for down;
//   - grouped_down / grouped_fp8_down into y then expert_combine (the top-k > 1 path) against the float64
//     sum over each token's local slots of the down operand (as the kernels stored it) times down, plus
//     the add;
//   - at top-k 1, grouped_fill + the down kernel's combine epilogue against that path, bit for bit.
// The routings have experts with no tokens, experts of more than one 128-row tile, row counts that are
// not a multiple of 16, top-k 1 and 2, experts held elsewhere (first > 0, expert parallelism), more
// than 32 active experts (the tile search's several passes), a decode batch (an expert's one or two
// rows), and widths with K and N tails (not multiples of the 64-byte K slice or of the 128- and 256-column
// tiles; fp8 widths are multiples of 16, as the output-major codes need). Built twice by
// scripts/gpu/emu-grouped.sh: with the emulated m16n8k32 E4M3 mma, and with -DGG_E4M3_VIA_F16 (the
// fallback of two f16 mmas on widened codes, what ptxas before CUDA 12.4 compiles), which runs the fp8
// cases only (argument "fp8").
#include "src.cu" // made by emu-grouped.sh
#include <random>
#include <algorithm>
#include <string>
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

// randcodes returns n E4M3 codes, none NaN, of magnitude at most about 2^mx.
static std::vector<unsigned char> randcodes(size_t n, int mx) {
	std::vector<unsigned char> v(n);
	for (auto& c : v) {
		int e = std::uniform_int_distribution<int>(0, mx + 7)(rng), m = std::uniform_int_distribution<int>(0, 7)(rng);
		c = (unsigned char)((rng() & 1) << 7 | e << 3 | m);
	}
	return v;
}

struct Case {
	const char* name;
	int T, k, C, first, E, H, I;
	std::vector<double> weight; // the router's preference for each of the C experts (0: never chosen)
	int adt;                    // -1: no add
};

// Routed is a case's routing and moe_plan's plan of it.
struct Routed {
	std::vector<int> experts;
	std::vector<float> scores;
	std::vector<int> seg, perm, rowOf, active, meta;
	int rows, R, tiles;
};

Routed route(const Case& c) {
	int T = c.T, k = c.k, E = c.E, n = T * k;
	// The routing: k distinct experts a token, drawn by weight; a random score each.
	std::discrete_distribution<int> pick(c.weight.begin(), c.weight.end());
	Routed p;
	p.experts.resize(n);
	p.scores.resize(n);
	for (int t = 0; t < T; t++)
		for (int j = 0; j < k; j++) {
			int e;
			bool dup;
			do {
				e = pick(rng);
				dup = false;
				for (int i = 0; i < j; i++) dup |= p.experts[t * k + i] == e;
			} while (dup);
			p.experts[t * k + j] = e;
			p.scores[t * k + j] = urand(0.05f, 1.0f);
		}
	p.seg.assign(2 * E, 0), p.perm.assign(std::max(n, 1), -7), p.rowOf.assign(n, 0), p.active.assign(E, 0), p.meta.assign(2, 0);
	launch(dim3{1}, dim3{32}, [&] {
		moe_plan(p.experts.data(), n, c.first, E, 1, p.seg.data(), p.perm.data(), p.rowOf.data(), p.active.data(), p.meta.data());
	});
	p.rows = p.meta[1], p.R = n;
	p.tiles = (p.R + GG_BM - 1) / GG_BM + std::min(E, p.R);
	return p;
}

// Adds are the shared expert's add in f32 and bf16.
struct Adds {
	std::vector<float> f;
	std::vector<bf16_t> h;
	int adt;
	const void* ptr() const { return adt < 0 ? nullptr : adt == DT_BF16 ? (const void*)h.data() : (const void*)f.data(); }
	double at(long i) const { return adt < 0 ? 0.0 : adt == DT_BF16 ? bf(h[i]) : (double)f[i]; }
};

Adds adds(const Case& c) {
	Adds a{std::vector<float>((size_t)c.T * c.H), std::vector<bf16_t>((size_t)c.T * c.H), c.adt};
	for (size_t i = 0; i < a.f.size(); i++) {
		a.f[i] = urand(-1, 1);
		a.h[i] = f32_to_bf16(a.f[i]);
	}
	return a;
}

// checkDown runs a down kernel (down(y, out, odt, add, adt)) into y, then expert_combine, against the
// float64 sum over each token's local slots of A(r, i)·W(e, i, h) plus the add; at top-k 1 also with the
// combine in the down kernel's epilogue (after grouped_fill), which must give expert_combine's bits.
template <class Down, class AV, class WV>
void checkDown(const Case& c, const Routed& p, const Adds& ad, Down down, AV A, WV W) {
	int T = c.T, k = c.k, H = c.H, I = c.I, R = p.R;
	int adt = ad.adt < 0 ? DT_F32 : ad.adt;
	std::vector<float> y((size_t)R * H, NAN), out1((size_t)T * H, NAN);
	down(y.data(), nullptr, DT_F32, nullptr, DT_F32);
	launch(dim3{(unsigned)((T * H + 255) / 256)}, dim3{256}, [&] {
		expert_combine(y.data(), 1, R, H, p.rowOf.data(), k, out1.data(), DT_F32, (long long)T * H, ad.ptr(), adt);
	});
	for (int t = 0; t < T; t++)
		for (int h = 0; h < H; h++) {
			double want = 0, abs = 0;
			for (int j = 0; j < k; j++) {
				int r = p.rowOf[t * k + j];
				if (r < 0) continue;
				int e = p.experts[t * k + j] - c.first;
				for (int i = 0; i < I; i++) {
					double v = A(r, i) * W(e, i, h);
					want += v, abs += std::fabs(v);
				}
			}
			double a = ad.at((long)t * H + h);
			want += a, abs += std::fabs(a);
			double got = out1[(size_t)t * H + h];
			CHECK(std::fabs(got - want) <= 2e-5 * abs + 1e-7, "%s: out token %d h %d: %.7g, want %.7g", c.name, t, h, got, want);
		}
	if (k != 1) return;
	// top-k 1: the combine in the down kernel's epilogue, grouped_fill for the tokens held elsewhere.
	std::vector<float> out2((size_t)T * H, NAN);
	launch(dim3{(unsigned)std::min(T, 65535)}, dim3{64}, [&] { grouped_fill(p.rowOf.data(), k, T, H, out2.data(), DT_F32, ad.ptr(), adt); });
	down(nullptr, out2.data(), DT_F32, ad.ptr(), adt);
	for (size_t i = 0; i < out2.size(); i++)
		CHECK(bits(out2[i]) == bits(out1[i]), "%s: fused combine [%zu] = %.9g, expert_combine %.9g", c.name, i, out2[i], out1[i]);
}

// checkAct compares a gate_up kernel's act row r, channel ch (got) with silu(g)·u for the float64 g and u
// and the sums of their terms' magnitudes ga, ua.
void checkAct(const Case& c, const Routed& p, int r, int ch, double got, double g, double u, double ga, double ua, int ulpBits) {
	double want = g / (1 + std::exp(-g)) * u;
	double tol = std::ldexp(std::fabs(want), -ulpBits) + 1e-5 * (1 + ga) * (1 + ua);
	int slot = p.perm[r];
	CHECK(std::fabs(got - want) <= tol, "%s: act row %d (slot %d, token %d, expert %d) ch %d: %.7g, want %.7g", c.name, r, slot, slot / c.k,
		p.experts[slot] - c.first, ch, got, want);
}

void printCase(const char* fmt, const Case& c, const Routed& p) {
	printf("  %s %-34s T %3d k %d experts %d..%d of %d, H %3d I %3d: rows", fmt, c.name, c.T, c.k, c.first, c.first + c.E - 1, c.C, c.H, c.I);
	for (int e = 0; e < c.E; e++) printf(" %d", p.seg[2 * e + 1]);
	printf("\n");
}

void runBF16(const Case& c) {
	Routed p = route(c);
	Adds ad = adds(c);
	int T = c.T, k = c.k, E = c.E, H = c.H, I = c.I, R = p.R;
	std::vector<bf16_t> x = randbf((size_t)T * H, 1.0f), gu = randbf((size_t)E * H * 2 * I, 0.2f), down = randbf((size_t)E * I * H, 0.2f);

	std::vector<bf16_t> act((size_t)R * I, 0x7fc1);
	launch(dim3{(unsigned)p.tiles, (unsigned)((I + GG_BN / 2 - 1) / (GG_BN / 2))}, dim3{GG_THREADS}, [&] {
		grouped_gate_up(x.data(), p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), gu.data(), H, I, act.data());
	});
	for (int r = 0; r < p.rows; r++) {
		int slot = p.perm[r], t = slot / k, e = p.experts[slot] - c.first;
		double s = p.scores[slot];
		for (int ch = 0; ch < I; ch++) {
			double g = 0, u = 0, ga = 0, ua = 0;
			for (int h = 0; h < H; h++) {
				double xv = bf(x[(size_t)t * H + h]);
				double wg = bf(gu[((size_t)e * H + h) * 2 * I + ch]), wu = bf(gu[((size_t)e * H + h) * 2 * I + I + ch]);
				g += xv * wg, u += xv * wu, ga += std::fabs(xv * wg), ua += std::fabs(xv * wu);
			}
			checkAct(c, p, r, ch, bf(act[(size_t)r * I + ch]), g * s, u * s, ga * s, ua * s, 8);
		}
	}
	checkDown(
		c, p, ad,
		[&](float* y, void* out, int odt, const void* add, int adt) {
			launch(dim3{(unsigned)p.tiles, (unsigned)((H + GG_BN - 1) / GG_BN)}, dim3{GG_THREADS}, [&] {
				grouped_down(act.data(), p.perm.data(), p.seg.data(), p.active.data(), p.meta.data(), down.data(), I, H, y, out, odt, add, adt);
			});
		},
		[&](int r, int i) { return bf(act[(size_t)r * I + i]); }, [&](int e, int i, int h) { return bf(down[((size_t)e * I + i) * H + h]); });
	printCase("bf16", c, p);
}

// actCodes runs fp8_act_codes (32 threads a block: any multiple of 32 serves) over the permuted rows.
void actCodes(const Routed& p, const void* x, int xdt, const int* perm, int k, int n, std::vector<unsigned char>& codes,
	std::vector<float>& scales) {
	codes.assign((size_t)p.R * n, 0xff), scales.assign(p.R, NAN); // poisoned
	const float* sc = perm ? p.scores.data() : nullptr;
	launch(dim3{(unsigned)p.R}, dim3{32}, [&] { fp8_act_codes(x, xdt, perm, sc, k, n, codes.data(), scales.data(), &p.meta[1]); });
}

void runFP8(const Case& c) {
	Routed p = route(c);
	Adds ad = adds(c);
	int T = c.T, k = c.k, E = c.E, H = c.H, I = c.I, R = p.R;
	std::vector<bf16_t> x = randbf((size_t)T * H, 2.0f);
	// Output-major codes: gu [E, 2I, H] (gate channels, then up), down [E, H, I]; a scale a channel.
	std::vector<unsigned char> gu = randcodes((size_t)E * 2 * I * H, 2), down = randcodes((size_t)E * H * I, 2);
	std::vector<float> gus((size_t)E * 2 * I), ds((size_t)E * H);
	for (auto& s : gus) s = urand(0.01f, 0.05f);
	for (auto& s : ds) s = urand(0.01f, 0.05f);

	std::vector<unsigned char> xc, ac;
	std::vector<float> xs, as;
	actCodes(p, x.data(), DT_BF16, p.perm.data(), k, H, xc, xs);
	std::vector<float> act((size_t)R * I, NAN);
	launch(dim3{(unsigned)p.tiles, (unsigned)((I + GG_BN / 2 - 1) / (GG_BN / 2))}, dim3{GG_THREADS}, [&] {
		grouped_fp8_gate_up(xc.data(), xs.data(), p.seg.data(), p.active.data(), p.meta.data(), gu.data(), gus.data(), H, I, act.data());
	});
	for (int r = 0; r < p.rows; r++) {
		int e = p.experts[p.perm[r]] - c.first;
		double sx = xs[r];
		for (int ch = 0; ch < I; ch++) {
			double g = 0, u = 0, ga = 0, ua = 0;
			const unsigned char* wg = &gu[((size_t)e * 2 * I + ch) * H];
			const unsigned char* wu = &gu[((size_t)e * 2 * I + I + ch) * H];
			for (int h = 0; h < H; h++) {
				double xv = emu_e4m3(xc[(size_t)r * H + h]);
				double pg = xv * emu_e4m3(wg[h]), pu = xv * emu_e4m3(wu[h]);
				g += pg, u += pu, ga += std::fabs(pg), ua += std::fabs(pu);
			}
			double fg = sx * gus[(size_t)e * 2 * I + ch], fu = sx * gus[(size_t)e * 2 * I + I + ch];
			checkAct(c, p, r, ch, act[(size_t)r * I + ch], g * fg, u * fu, ga * fg, ua * fu, 20);
		}
	}
	actCodes(p, act.data(), DT_F32, nullptr, 1, I, ac, as);
	checkDown(
		c, p, ad,
		[&](float* y, void* out, int odt, const void* add, int adt) {
			launch(dim3{(unsigned)p.tiles, (unsigned)((H + GG_BN - 1) / GG_BN)}, dim3{GG_THREADS}, [&] {
				grouped_fp8_down(ac.data(), as.data(), p.perm.data(), p.seg.data(), p.active.data(), p.meta.data(), down.data(), ds.data(), I, H, y,
					out, odt, add, adt);
			});
		},
		[&](int r, int i) { return emu_e4m3(ac[(size_t)r * I + i]) * (double)as[r]; },
		[&](int e, int i, int h) { return emu_e4m3(down[((size_t)e * H + h) * I + i]) * (double)ds[(size_t)e * H + h]; });
	printCase("fp8 ", c, p);
}

int main(int argc, char** argv) {
	bool fp8only = argc > 1 && std::string(argv[1]) == "fp8";
	// More than 32 active experts: the tile search's prefix sum runs over several passes of a warp.
	std::vector<double> many(70, 1.0);
	many[3] = many[40] = many[65] = 0;
	many[33] = 30;
	std::vector<Case> cases = {
		{"uneven, an expert without tokens", 40, 1, 6, 0, 6, 64, 48, {1, 6, 1, 0, 2, 1}, DT_F32},
		{"top-2, two row tiles, K tails", 150, 2, 4, 0, 4, 72, 40, {12, 1, 2, 1}, -1},
		{"expert parallel, top-1", 70, 1, 6, 2, 3, 64, 32, {1, 1, 3, 1, 0, 2}, DT_F32},
		{"N tails of both tiles, bf16 add", 200, 1, 2, 0, 2, 264, 136, {3, 1}, DT_BF16},
		{"129 rows: a one-row tile", 129, 1, 1, 0, 1, 32, 16, {1}, -1},
		{"expert parallel, top-2", 90, 2, 4, 1, 2, 48, 24, {1, 2, 1, 1}, DT_F32},
		{"decode batch of 16, 16 experts", 16, 1, 16, 0, 16, 64, 32, std::vector<double>(16, 1.0), DT_F32},
		{"70 experts, top-1", 160, 1, 70, 0, 70, 32, 16, many, DT_F32},
		{"70 experts, top-2, 60 held here", 100, 2, 70, 8, 60, 40, 24, many, -1},
	};
	for (auto& c : cases) {
		if (!fp8only) runBF16(c);
		// fp8 widths are multiples of 16 (the output-major codes' 16-byte chunks): 72 → 80 keeps a K tail
		// past the 64-code slice, 264 → 272 and 136 → 144 the N tails.
		Case f = c;
		f.H = (c.H + 15) / 16 * 16, f.I = (c.I + 15) / 16 * 16;
		runFP8(f);
	}
	if (bad) {
		printf("grouped_check: %d of %ld comparisons failed\n", bad, compared);
		return 1;
	}
	printf("grouped_check: %ld comparisons, all within bounds (the fused combine bit for bit)\n", compared);
	return 0;
}
