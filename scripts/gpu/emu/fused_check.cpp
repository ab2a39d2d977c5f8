// fused_check.cpp: runs the fused decode kernels and the 16-byte elementwise kernels under the emulator
// (emu.h) and compares each with the kernels it replaces, run under the emulator too, on random inputs:
//   - route_plan (kernels/moe.cu) with route, count_experts and moe_plan (align 1), routed here or not,
//     counted or not, local experts a part of the router's;
//   - gemv_gated_N (gemv.cu) with gemv_multi_N and silu_mul, with and without a router product;
//   - expert_gemv_swiglu_N with expert_gemv_N and expert_act, expert_gemv_combine_N with expert_gemv_N and
//     expert_combine (with and without the shared expert's add), and their counters zero afterwards;
//   - the same epilogues on the quantised experts: q4expert_gemv_swiglu_N and q4expert_gemv_combine_N
//     (quant_int4.cu) with q4expert_gemv_N, fp8_expert_gemv(_xs)_swiglu_N and _combine_N (quant_fp8.cu)
//     with fp8_expert_gemv(_xs)_N (after fp8_act_rows where not staged, as fp8.go), expert_act and
//     expert_combine, over grids of several blocks a column range;
//   - qk_append (qkv.cu) with rope_qk (or scale_rows) and kv_append into a paged cache of two sequences;
//   - convert_v8, silu_mul_v8, split_bf16_v8, expert_gather_v8, expert_act_v8, expert_combine_v8 with
//     their elementwise kernels, and add_rmsnorm_v8 with add_rmsnorm.
// Every result must be the same bit for bit (add_rmsnorm_v8 at add_rmsnorm's block size). Build and run:
// scripts/gpu/emu-fused.sh.
#include "src.cu" // made by emu-fused.sh
#include <random>
#include <string>
std::mt19937 rng(7);
float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
int bad = 0;
long compared = 0;

#define CHECK(cond, ...)                                                  \
	do {                                                                  \
		compared++;                                                       \
		if (!(cond) && bad++ < 20) printf(__VA_ARGS__), printf("\n"); \
	} while (0)

static unsigned bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// same compares two arrays of 4-byte or 2-byte elements bit for bit.
template <class T>
void same(const char* what, const std::vector<T>& got, const std::vector<T>& want, size_t n = (size_t)-1) {
	n = std::min(n, std::min(got.size(), want.size()));
	for (size_t i = 0; i < n; i++) {
		bool eq = memcmp(&got[i], &want[i], sizeof(T)) == 0;
		if constexpr (std::is_same_v<T, float>) CHECK(eq, "%s[%zu]: %.9g (%08x), want %.9g (%08x)", what, i, got[i], bits(got[i]), want[i], bits(want[i]));
		else CHECK(eq, "%s[%zu]: %lld, want %lld", what, i, (long long)got[i], (long long)want[i]);
	}
}

// A float32 or bf16 array of random values, kept as bytes, with its float view.
struct Arr {
	int dt;
	std::vector<float> f;
	std::vector<bf16_t> h;
	Arr(int dt_, size_t n, float lo = -1, float hi = 1) : dt(dt_), f(n), h(n) {
		for (size_t i = 0; i < n; i++) {
			f[i] = urand(lo, hi);
			h[i] = f32_to_bf16(f[i]);
			if (dt == DT_BF16) f[i] = bf16_to_f32(h[i]);
		}
	}
	void* p() { return dt == DT_BF16 ? (void*)h.data() : (void*)f.data(); }
};

// An output of n elements of dtype dt, poisoned with NaN.
struct Out {
	int dt;
	std::vector<float> f;
	std::vector<bf16_t> h;
	Out(int dt_, size_t n) : dt(dt_), f(n, NAN), h(n, 0x7fc1) {}
	void* p() { return dt == DT_BF16 ? (void*)h.data() : (void*)f.data(); }
	std::vector<float> vals() const {
		if (dt == DT_F32) return f;
		std::vector<float> v(h.size());
		for (size_t i = 0; i < h.size(); i++) v[i] = bf16_to_f32(h[i]);
		return v;
	}
};

// plan builds a routing plan with route_plan, checked against route + count_experts + moe_plan.
struct Plan {
	std::vector<int> experts, seg, perm, rowOf, active, meta;
	std::vector<float> scores;
};

Plan check_route_plan(int T, int k, int C, int first, int E, bool route, bool count) {
	int n = T * k;
	Arr logits(rng() % 2 ? DT_F32 : DT_BF16, (size_t)T * C, -4, 4);
	if (T > 1) for (int c = 0; c < C; c++) logits.f[c] = logits.f[C + c], logits.h[c] = logits.h[C + c]; // ties between rows
	if (C > 2) logits.f[1] = logits.f[2], logits.h[1] = logits.h[2];                                        // and within one
	std::vector<int> pre(n);
	for (auto& e : pre) e = (int)(rng() % (C + 2)) - 1; // with ids outside [0, C)
	int countN = C;
	std::vector<unsigned long long> cntA(countN + 2, 0), cntB(countN + 2, 0);
	// reference: route, count_experts, moe_plan
	Plan a;
	a.experts = route ? std::vector<int>(n, -9) : pre;
	a.scores.assign(n, NAN);
	if (route) launch(dim3{(unsigned)((T + 127) / 128)}, dim3{128}, [&] { ::route(logits.p(), logits.dt, T, C, k, a.experts.data(), a.scores.data()); });
	if (count) launch(dim3{(unsigned)((n + 127) / 128)}, dim3{128}, [&] { count_experts(a.experts.data(), n, cntA.data() + 1, countN); });
	a.seg.assign(2 * E, -7); a.perm.assign(n, -7); a.rowOf.assign(n, -7); a.active.assign(E, -7); a.meta.assign(2, -7);
	launch(dim3{1}, dim3{32}, [&] { moe_plan(a.experts.data(), n, first, E, 1, a.seg.data(), a.perm.data(), a.rowOf.data(), a.active.data(), a.meta.data()); });
	// fused
	Plan b;
	b.experts = route ? std::vector<int>(n, -9) : pre;
	b.scores.assign(n, NAN);
	b.seg.assign(2 * E, -7); b.perm.assign(n, -7); b.rowOf.assign(n, -7); b.active.assign(E, -7); b.meta.assign(2, -7);
	launch(dim3{1}, dim3{128}, [&] {
		route_plan(logits.p(), logits.dt, T, C, k, route, b.experts.data(), b.scores.data(), count ? cntB.data() + 1 : nullptr, countN,
			first, E, b.seg.data(), b.perm.data(), b.rowOf.data(), b.active.data(), b.meta.data());
	});
	std::string w = "route_plan T=" + std::to_string(T) + " k=" + std::to_string(k) + " C=" + std::to_string(C) + " first=" +
		std::to_string(first) + " E=" + std::to_string(E) + (route ? " routed" : "") + (count ? " counted" : "");
	same((w + " experts").c_str(), b.experts, a.experts);
	if (route) same((w + " scores").c_str(), b.scores, a.scores);
	same((w + " counts").c_str(), cntB, cntA);
	same((w + " meta").c_str(), b.meta, a.meta);
	same((w + " seg").c_str(), b.seg, a.seg);
	same((w + " active").c_str(), b.active, a.active, a.meta[0]);
	same((w + " perm").c_str(), b.perm, a.perm, a.meta[1]);
	same((w + " row_of").c_str(), b.rowOf, a.rowOf);
	return a;
}

void check_gemv_gated(int T, int K, int n0, int I, int xdt, int adt) {
	Arr x(xdt, (size_t)T * K);
	Arr w0(DT_BF16, (size_t)std::max(n0, 1) * K, -0.2f, 0.2f), g(DT_BF16, (size_t)I * K, -0.2f, 0.2f), u(DT_BF16, (size_t)I * K, -0.2f, 0.2f);
	// reference: gemv_multi (w0, gate, up), silu_mul
	std::vector<float> y0a((size_t)T * std::max(n0, 1), NAN), ga((size_t)T * I, NAN), ua((size_t)T * I, NAN);
	Out acta(adt, (size_t)T * I);
	const bf16_t *pw0 = n0 ? w0.h.data() : g.h.data(), *pg = n0 ? g.h.data() : u.h.data();
	float *py0 = n0 ? y0a.data() : ga.data(), *pga = n0 ? ga.data() : ua.data();
	int m0 = n0 ? n0 : I, m1 = n0 ? I : I, m2 = n0 ? I : 0;
	const bf16_t* pu = n0 ? u.h.data() : nullptr;
	float* pua = n0 ? ua.data() : nullptr;
	launch(dim3{(unsigned)((m0 + m1 + m2) / GEMV_ROWS)}, dim3{GEMV_WARPS * 32}, [&] {
		if (T == 1) gemv_multi_1(x.p(), xdt, pw0, py0, m0, pg, pga, m1, pu, pua, m2, T, K);
		else gemv_multi_2(x.p(), xdt, pw0, py0, m0, pg, pga, m1, pu, pua, m2, T, K);
	});
	long long n = (long long)T * I;
	launch(dim3{(unsigned)((n + 1023) / 1024)}, dim3{256}, [&] { silu_mul(ga.data(), DT_F32, ua.data(), DT_F32, acta.p(), adt, n); });
	// fused
	std::vector<float> y0b((size_t)T * std::max(n0, 1), NAN);
	Out actb(adt, (size_t)T * I);
	launch(dim3{(unsigned)(n0 / GEMV_ROWS + I)}, dim3{GEMV_WARPS * 32}, [&] {
		if (T == 1) gemv_gated_1(x.p(), xdt, w0.h.data(), y0b.data(), n0, g.h.data(), u.h.data(), actb.p(), adt, I, T, K);
		else gemv_gated_2(x.p(), xdt, w0.h.data(), y0b.data(), n0, g.h.data(), u.h.data(), actb.p(), adt, I, T, K);
	});
	std::string w = "gemv_gated_" + std::to_string(T) + " K=" + std::to_string(K) + " n0=" + std::to_string(n0) + " I=" + std::to_string(I);
	if (n0) same((w + " y0").c_str(), y0b, y0a);
	same((w + " act").c_str(), actb.vals(), acta.vals());
}

// check_expert_gemv runs gate_up (swiglu) and down (combine) of a MoE layer both ways.
void check_expert_gemv(int T, int k, int E, int H, int I, int ksplitGU, int ksplitD, int NS, bool withAdd, int addDt) {
	int C = E, first = 0;
	Plan p = check_route_plan(T, k, C, first, E, true, false);
	int R = T * k;
	Arr x(DT_F32, (size_t)T * H);
	Arr gu(DT_BF16, (size_t)E * H * 2 * I, -0.2f, 0.2f), down(DT_BF16, (size_t)E * I * H, -0.2f, 0.2f);
	int N1 = 2 * I, S1 = (H + ksplitGU - 1) / ksplitGU, z = std::min(R, E);
	dim3 g1{(unsigned)((N1 + EG_COLS - 1) / EG_COLS), (unsigned)S1, (unsigned)z};
	// reference gate_up, expert_act
	std::vector<float> P1((size_t)S1 * R * N1, 0.0f), acta((size_t)R * I, NAN);
	launch(g1, dim3{EG_WARPS * 32}, [&] {
		if (NS == 1) expert_gemv_1(x.p(), DT_F32, 0, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), gu.h.data(), H, N1, ksplitGU, P1.data(), R);
		else expert_gemv_8(x.p(), DT_F32, 0, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), gu.h.data(), H, N1, ksplitGU, P1.data(), R);
	});
	launch(dim3{(unsigned)((R * I + 255) / 256)}, dim3{256}, [&] { expert_act(P1.data(), S1, R, I, p.meta.data(), acta.data(), DT_F32); });
	// fused gate_up
	std::vector<int> ctr(1024, 0);
	std::vector<float> P1b((size_t)S1 * R * N1, 0.0f), actb((size_t)R * I, NAN);
	launch(g1, dim3{EG_WARPS * 32}, [&] {
		if (NS == 1) expert_gemv_swiglu_1(x.p(), DT_F32, 0, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), gu.h.data(), H, N1, ksplitGU, P1b.data(), R, ctr.data(), actb.data(), DT_F32);
		else expert_gemv_swiglu_8(x.p(), DT_F32, 0, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), gu.h.data(), H, N1, ksplitGU, P1b.data(), R, ctr.data(), actb.data(), DT_F32);
	});
	std::string w = "expert_gemv NS=" + std::to_string(NS) + " T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) +
		" H=" + std::to_string(H) + " I=" + std::to_string(I);
	same((w + " swiglu act").c_str(), actb, acta, (size_t)p.meta[1] * I);
	for (int c : ctr) CHECK(c == 0, "%s: a swiglu counter is %d after the launch, want 0", w.c_str(), c);
	// reference down, expert_combine
	int S2 = (I + ksplitD - 1) / ksplitD;
	dim3 g2{(unsigned)((H + EG_COLS - 1) / EG_COLS), (unsigned)S2, (unsigned)z};
	std::vector<float> P2((size_t)S2 * R * H, 0.0f);
	Arr add(addDt, (size_t)T * H);
	const void* ap = withAdd ? add.p() : nullptr;
	std::vector<float> outa((size_t)T * H, NAN), outb((size_t)T * H, NAN);
	launch(g2, dim3{EG_WARPS * 32}, [&] {
		if (NS == 1) expert_gemv_1(acta.data(), DT_F32, 1, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), down.h.data(), I, H, ksplitD, P2.data(), R);
		else expert_gemv_8(acta.data(), DT_F32, 1, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), down.h.data(), I, H, ksplitD, P2.data(), R);
	});
	long long n = (long long)T * H;
	launch(dim3{(unsigned)((n + 255) / 256)}, dim3{256}, [&] { expert_combine(P2.data(), S2, R, H, p.rowOf.data(), k, outa.data(), DT_F32, n, ap, addDt); });
	std::vector<float> P2b((size_t)S2 * R * H, 0.0f);
	launch(g2, dim3{EG_WARPS * 32}, [&] {
		if (NS == 1) expert_gemv_combine_1(actb.data(), DT_F32, 1, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), down.h.data(), I, H, ksplitD, P2b.data(), R, ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, addDt);
		else expert_gemv_combine_8(actb.data(), DT_F32, 1, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), down.h.data(), I, H, ksplitD, P2b.data(), R, ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, addDt);
	});
	same((w + (withAdd ? " combine+add" : " combine") + " out").c_str(), outb, outa);
	for (int c : ctr) CHECK(c == 0, "%s: a combine counter is %d after the launch, want 0", w.c_str(), c);
	// the v8 elementwise kernels on the same data
	std::vector<float> act8((size_t)R * I, NAN), out8((size_t)T * H, NAN);
	launch(dim3{(unsigned)((R * I / 8 + 255) / 256)}, dim3{256}, [&] { expert_act_v8(P1.data(), S1, R, I, p.meta.data(), act8.data(), DT_F32); });
	same((w + " expert_act_v8").c_str(), act8, acta, (size_t)p.meta[1] * I);
	launch(dim3{(unsigned)((n / 8 + 255) / 256)}, dim3{256}, [&] { expert_combine_v8(P2.data(), S2, R, H, p.rowOf.data(), k, out8.data(), DT_F32, n / 8, ap, addDt); });
	same((w + " expert_combine_v8").c_str(), out8, outa);
	// expert_gather on a plan with gap rows (perm -1)
	std::vector<int> gperm(R + 5, -1);
	for (int r = 0; r < R; r++) gperm[r + (r > R / 2 ? 5 : 0)] = p.perm[r];
	int GR = R + 5;
	for (int xdt : {DT_F32, DT_BF16}) {
		Arr xg(xdt, (size_t)T * H);
		std::vector<bf16_t> xa((size_t)GR * H, 0x7fc1), xb((size_t)GR * H, 0x7fc1);
		long long gn = (long long)GR * H;
		launch(dim3{(unsigned)((gn + 1023) / 1024)}, dim3{256}, [&] { expert_gather(xg.p(), xdt, gperm.data(), p.scores.data(), k, H, xa.data(), gn); });
		launch(dim3{(unsigned)((gn / 8 + 255) / 256)}, dim3{256}, [&] { expert_gather_v8(xg.p(), xdt, gperm.data(), p.scores.data(), k, H, xb.data(), gn / 8); });
		same((w + " expert_gather_v8").c_str(), xb, xa);
	}
}

// check_q4expert runs an int4 MoE layer's gate_up and down both ways: q4expert_gemv_N and expert_act /
// expert_combine against q4expert_gemv_swiglu_N and q4expert_gemv_combine_N (NT = 1: 4 rows a pass, 2: 8).
void check_q4expert(int T, int k, int E, int H, int I, int gs, int ksplitGU, int ksplitD, int NT, bool withAdd) {
	Plan p = check_route_plan(T, k, E, 0, E, true, false);
	int R = T * k, z = std::min(R, E), N1 = 2 * I;
	Arr x(DT_BF16, (size_t)T * H);
	auto codes = [](size_t n) { std::vector<unsigned char> v(n); for (auto& b : v) b = (unsigned char)rng(); return v; };
	auto scales = [](size_t n) { std::vector<bf16_t> v(n); for (auto& s : v) s = f32_to_bf16(urand(0.001f, 0.02f)); return v; };
	std::vector<unsigned char> wgu = codes((size_t)E * H * N1 / 2), wd = codes((size_t)E * I * H / 2);
	std::vector<bf16_t> sgu = scales((size_t)E * ((H + gs - 1) / gs) * N1), sd = scales((size_t)E * ((I + gs - 1) / gs) * H);
	std::string w = "q4expert NT=" + std::to_string(NT) + " T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) +
		" H=" + std::to_string(H) + " I=" + std::to_string(I);
	std::vector<int> ctr(1024, 0);
	// gate_up
	int S1 = (H + ksplitGU - 1) / ksplitGU;
	dim3 g1{(unsigned)((N1 + Q4E_COLS - 1) / Q4E_COLS), (unsigned)S1, (unsigned)z};
	std::vector<float> P1((size_t)S1 * R * N1, 0.0f), P1b(P1), acta((size_t)R * I, NAN), actb(acta);
#define Q4E_GU x.p(), DT_BF16, 0, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), wgu.data(), sgu.data(), gs, H, N1, ksplitGU
	launch(g1, dim3{Q4E_WARPS * 32}, [&] { if (NT == 1) q4expert_gemv_1(Q4E_GU, P1.data(), R); else q4expert_gemv_2(Q4E_GU, P1.data(), R); });
	launch(dim3{(unsigned)((R * I + 255) / 256)}, dim3{256}, [&] { expert_act(P1.data(), S1, R, I, p.meta.data(), acta.data(), DT_F32); });
	launch(g1, dim3{Q4E_WARPS * 32}, [&] {
		if (NT == 1) q4expert_gemv_swiglu_1(Q4E_GU, P1b.data(), R, ctr.data(), actb.data(), DT_F32);
		else q4expert_gemv_swiglu_2(Q4E_GU, P1b.data(), R, ctr.data(), actb.data(), DT_F32);
	});
	same((w + " swiglu act").c_str(), actb, acta, (size_t)p.meta[1] * I);
	for (int c : ctr) CHECK(c == 0, "%s: a swiglu counter is %d after the launch, want 0", w.c_str(), c);
	// down
	int S2 = (I + ksplitD - 1) / ksplitD;
	dim3 g2{(unsigned)((H + Q4E_COLS - 1) / Q4E_COLS), (unsigned)S2, (unsigned)z};
	std::vector<float> P2((size_t)S2 * R * H, 0.0f), P2b(P2), outa((size_t)T * H, NAN), outb(outa);
	Arr add(DT_BF16, (size_t)T * H);
	const void* ap = withAdd ? add.p() : nullptr;
	long long n = (long long)T * H;
#define Q4E_D acta.data(), DT_F32, 1, p.perm.data(), p.scores.data(), k, p.seg.data(), p.active.data(), p.meta.data(), wd.data(), sd.data(), gs, I, H, ksplitD
	launch(g2, dim3{Q4E_WARPS * 32}, [&] { if (NT == 1) q4expert_gemv_1(Q4E_D, P2.data(), R); else q4expert_gemv_2(Q4E_D, P2.data(), R); });
	launch(dim3{(unsigned)((n + 255) / 256)}, dim3{256}, [&] { expert_combine(P2.data(), S2, R, H, p.rowOf.data(), k, outa.data(), DT_F32, n, ap, DT_BF16); });
	launch(g2, dim3{Q4E_WARPS * 32}, [&] {
		if (NT == 1) q4expert_gemv_combine_1(Q4E_D, P2b.data(), R, ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_BF16);
		else q4expert_gemv_combine_2(Q4E_D, P2b.data(), R, ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_BF16);
	});
	same((w + (withAdd ? " combine+add" : " combine") + " out").c_str(), outb, outa);
	for (int c : ctr) CHECK(c == 0, "%s: a combine counter is %d after the launch, want 0", w.c_str(), c);
#undef Q4E_GU
#undef Q4E_D
}

// fp8_proj runs one projection of an fp8 MoE layer as fp8.go enqueues it: staged (the kernel quantises its
// rows) or fp8_act_rows into word-major rows first; kern launches the GEMV (plain or fused) on x, xdt, mode.
template <class F>
void fp8_proj(Plan& p, int k, int R, bool staged, const void* x, int xdt, int mode, int K, int dyn, unsigned blocks, int z, F kern) {
	std::vector<float> tmp;
	if (!staged) {
		tmp.assign((size_t)R * K, NAN);
		const int* perm = mode == 0 ? p.perm.data() : nullptr;
		const float* sc = mode == 0 ? p.scores.data() : nullptr;
		launch(dim3{(unsigned)R}, dim3{256}, [&] { fp8_act_rows(x, xdt, perm, sc, mode == 0 ? k : 1, K, dyn, tmp.data(), DT_F32, p.meta.data() + 1, 1); });
		x = tmp.data(), xdt = DT_F32, mode = 1;
	}
	launch(dim3{blocks, 1, (unsigned)z}, dim3{FP8_THREADS}, [&] { kern(x, xdt, mode); });
}

// check_fp8expert runs an fp8 (output-major codes) MoE layer's gate_up and down both ways: fp8_expert_gemv
// and expert_act / expert_combine against the fused kernels, on blocks gate_up blocks (dividing I / 16)
// and down blocks (any).
void check_fp8expert(int T, int k, int E, int H, int I, int fmt, int dyn, bool staged, unsigned guBlocks, unsigned dBlocks, bool withAdd) {
	Plan p = check_route_plan(T, k, E, 0, E, true, false);
	int R = T * k, z = std::min(R, E), N1 = 2 * I;
	Arr x(DT_BF16, (size_t)T * H);
	auto codes = [](size_t n) {
		std::vector<unsigned char> v(n);
		for (auto& b : v) { b = (unsigned char)rng(); if ((b & 0x7f) == 0x7f) b ^= 1; } // no NaN codes
		return v;
	};
	auto scales = [](size_t n) { std::vector<float> v(n); for (auto& s : v) s = urand(0.001f, 0.01f); return v; };
	std::vector<unsigned char> wgu = codes((size_t)E * N1 * H), wd = codes((size_t)E * H * I);
	std::vector<float> sgu = scales((size_t)E * N1), sd = scales((size_t)E * H);
	std::string w = "fp8expert fmt=" + std::to_string(fmt) + " dyn=" + std::to_string(dyn) + " staged=" + std::to_string(staged) +
		" T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) + " H=" + std::to_string(H) + " I=" + std::to_string(I) +
		" blocks=" + std::to_string(guBlocks) + "," + std::to_string(dBlocks);
	std::vector<int> ctr(1024, 0);
	const int* pm = p.perm.data(); const float* ps = p.scores.data(); const int *sg = p.seg.data(), *ac = p.active.data(), *mt = p.meta.data();
	// gate_up: P [R, 2I], one split
	std::vector<float> P1((size_t)R * N1, 0.0f), P1b(P1), acta((size_t)R * I, NAN), actb(acta);
	unsigned guPlain = (unsigned)((N1 / 2 + 7) / 8);
	fp8_proj(p, k, R, staged, x.p(), DT_BF16, 0, H, dyn, guPlain, z, [&](const void* xx, int xdt, int mode) {
		if (staged) { if (T == 1) fp8_expert_gemv_xs_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1.data());
			else fp8_expert_gemv_xs_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1.data()); }
		else if (T == 1) fp8_expert_gemv_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1.data());
		else fp8_expert_gemv_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1.data());
	});
	launch(dim3{(unsigned)((R * I + 255) / 256)}, dim3{256}, [&] { expert_act(P1.data(), 1, R, I, p.meta.data(), acta.data(), DT_F32); });
	fp8_proj(p, k, R, staged, x.p(), DT_BF16, 0, H, dyn, guBlocks, z, [&](const void* xx, int xdt, int mode) {
		if (staged) { if (T == 1) fp8_expert_gemv_xs_swiglu_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1b.data(), actb.data(), DT_F32);
			else fp8_expert_gemv_xs_swiglu_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1b.data(), actb.data(), DT_F32); }
		else if (T == 1) fp8_expert_gemv_swiglu_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1b.data(), actb.data(), DT_F32);
		else fp8_expert_gemv_swiglu_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wgu.data(), sgu.data(), fmt, dyn, H, N1, P1b.data(), actb.data(), DT_F32);
	});
	same((w + " swiglu act").c_str(), actb, acta, (size_t)p.meta[1] * I);
	// down: P [R, H]; the input is act (float32, mode 1), quantised again per token where dyn
	std::vector<float> P2((size_t)R * H, 0.0f), P2b(P2), outa((size_t)T * H, NAN), outb(outa);
	Arr add(DT_F32, (size_t)T * H);
	const void* ap = withAdd ? add.p() : nullptr;
	long long n = (long long)T * H;
	fp8_proj(p, k, R, staged, acta.data(), DT_F32, 1, I, dyn, (unsigned)((H + 15) / 16), z, [&](const void* xx, int xdt, int mode) {
		if (staged) { if (T == 1) fp8_expert_gemv_xs_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2.data());
			else fp8_expert_gemv_xs_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2.data()); }
		else if (T == 1) fp8_expert_gemv_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2.data());
		else fp8_expert_gemv_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2.data());
	});
	launch(dim3{(unsigned)((n + 255) / 256)}, dim3{256}, [&] { expert_combine(P2.data(), 1, R, H, p.rowOf.data(), k, outa.data(), DT_F32, n, ap, DT_F32); });
	fp8_proj(p, k, R, staged, actb.data(), DT_F32, 1, I, dyn, dBlocks, z, [&](const void* xx, int xdt, int mode) {
		if (staged) { if (T == 1) fp8_expert_gemv_xs_combine_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2b.data(), ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_F32);
			else fp8_expert_gemv_xs_combine_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2b.data(), ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_F32); }
		else if (T == 1) fp8_expert_gemv_combine_1(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2b.data(), ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_F32);
		else fp8_expert_gemv_combine_4(xx, xdt, mode, pm, ps, k, sg, ac, mt, wd.data(), sd.data(), fmt, dyn, I, H, P2b.data(), ctr.data(), p.rowOf.data(), T, outb.data(), DT_F32, ap, DT_F32);
	});
	same((w + (withAdd ? " combine+add" : " combine") + " out").c_str(), outb, outa);
	for (int c : ctr) CHECK(c == 0, "%s: a combine counter is %d after the launch, want 0", w.c_str(), c);
}

// A paged cache of two sequences (block sizes 4 and 8) for qk_append and kv_append, rows of KV_ROW words.
void check_qk_append(int T, int qh, int kh, int half, int ydt, bool rope, bool norm, bool qscale) {
	int D = 2 * half;
	long long stride = (long long)kh * D;
	int bsz[2] = {4, 8};
	std::vector<std::vector<bf16_t>> poolA(2), poolB(2);
	std::vector<std::vector<long long>> tabA(2, std::vector<long long>(8, 0)), tabB(2, std::vector<long long>(8, 0));
	for (int c = 0; c < 2; c++) {
		poolA[c].assign((size_t)8 * 2 * bsz[c] * stride, 0x7fc1);
		poolB[c] = poolA[c];
	}
	std::vector<long long> rowsA, rowsB;
	std::vector<int> pos(T);
	for (int t = 0; t < T; t++) {
		int c = t % 2, p = 3 + 5 * t + (int)(rng() % 3);
		pos[t] = p;
		int blk = (5 * t + 3) % 8; // a block of its own, anywhere in the pool
		for (int side = 0; side < 2; side++) {
			auto& pool = side ? poolB[c] : poolA[c];
			auto& tab = side ? tabB[c] : tabA[c];
			auto& rows = side ? rowsB : rowsA;
			long long w[KV_ROW] = {(long long)(intptr_t)tab.data(), bsz[c], 0, p, (long long)(intptr_t)(pool.data() + (size_t)blk * 2 * bsz[c] * stride)};
			rows.insert(rows.end(), w, w + KV_ROW);
		}
	}
	Arr q(DT_F32, (size_t)T * qh * D, -2, 2), k(DT_F32, (size_t)T * kh * D, -2, 2), v(rng() % 2 ? DT_F32 : DT_BF16, (size_t)T * kh * D, -2, 2);
	std::vector<float> inv(half), scale(T);
	for (int i = 0; i < half; i++) inv[i] = (float)std::pow(500000.0, -2.0 * i / D);
	for (auto& s : scale) s = urand(0.5f, 2.0f);
	float eps = 1e-5f;
	// reference: rope_qk (rope) then scale_rows (qscale) then kv_append
	Out qa(ydt, (size_t)T * qh * D), ka(ydt, (size_t)T * kh * D), qs(ydt, (size_t)T * qh * D);
	const void* qsrc = q.p();
	int qsdt = DT_F32;
	const void* ksrc = k.p();
	int ksdt = DT_F32;
	if (rope) {
		launch(dim3{(unsigned)T, (unsigned)(qh + kh)}, dim3{32}, [&] {
			rope_qk(q.p(), DT_F32, k.p(), DT_F32, pos.data(), inv.data(), qa.p(), ka.p(), ydt, qh, kh, half, norm, eps);
		});
		qsrc = qa.p(), qsdt = ydt, ksrc = ka.p(), ksdt = ydt;
	}
	const void* qref = qsrc;
	int qrefdt = qsdt;
	if (qscale) {
		long long n = (long long)T * qh * D;
		launch(dim3{(unsigned)((n + 255) / 256)}, dim3{256}, [&] { scale_rows(qsrc, qsdt, scale.data(), qs.p(), ydt, (long long)qh * D, n); });
		qref = qs.p(), qrefdt = ydt;
	}
	long long n = (long long)T * stride;
	launch(dim3{(unsigned)((n + 255) / 256)}, dim3{256}, [&] { kv_append(ksrc, ksdt, v.p(), v.dt, rowsA.data(), stride, n); });
	// fused
	Out qb(ydt, (size_t)T * qh * D);
	launch(dim3{(unsigned)T, (unsigned)(qh + kh)}, dim3{32}, [&] {
		qk_append(q.p(), DT_F32, k.p(), DT_F32, v.p(), v.dt, rowsB.data(), inv.data(), rope, norm, eps, qscale ? scale.data() : nullptr, qb.p(), ydt, qh, kh, half);
	});
	std::string w = "qk_append T=" + std::to_string(T) + " heads " + std::to_string(qh) + "/" + std::to_string(kh) + " D=" + std::to_string(D) +
		(ydt == DT_BF16 ? " bf16" : " f32") + (rope ? " rope" : "") + (norm ? " norm" : "") + (qscale ? " qscale" : "");
	std::vector<float> want(qb.f.size());
	for (size_t i = 0; i < want.size(); i++) want[i] = qrefdt == DT_BF16 ? bf16_to_f32(((const bf16_t*)qref)[i]) : ((const float*)qref)[i];
	if (!rope && !qscale) want = q.f; // q passes through
	same((w + " q").c_str(), qb.vals(), want);
	for (int c = 0; c < 2; c++) {
		same((w + " cache").c_str(), poolB[c], poolA[c]);
		for (int b = 0; b < 8; b++) {
			long long a = tabA[c][b] ? tabA[c][b] - (long long)(intptr_t)poolA[c].data() : -1;
			long long bb = tabB[c][b] ? tabB[c][b] - (long long)(intptr_t)poolB[c].data() : -1;
			CHECK(a == bb, "%s: cache %d table[%d] at offset %lld, want %lld", w.c_str(), c, b, bb, a);
		}
	}
}

void check_elementwise(long long n, int xdt, int ydt) {
	Arr a(xdt, n, -3, 3), b(xdt, n, -3, 3);
	unsigned grid = (unsigned)((n + 1023) / 1024), grid8 = (unsigned)((n / 8 + 255) / 256);
	std::string w = "n=" + std::to_string(n) + (xdt == DT_BF16 ? " bf16" : " f32") + "→" + (ydt == DT_BF16 ? "bf16" : "f32");
	{
		Out ya(ydt, n), yb(ydt, n);
		launch(dim3{grid}, dim3{256}, [&] { convert(a.p(), xdt, ya.p(), ydt, n); });
		launch(dim3{grid8}, dim3{256}, [&] { convert_v8(a.p(), xdt, yb.p(), ydt, n / 8); });
		same(("convert_v8 " + w).c_str(), yb.vals(), ya.vals());
	}
	{
		Out ya(ydt, n), yb(ydt, n);
		launch(dim3{grid}, dim3{256}, [&] { silu_mul(a.p(), xdt, b.p(), xdt, ya.p(), ydt, n); });
		launch(dim3{grid8}, dim3{256}, [&] { silu_mul_v8(a.p(), xdt, b.p(), xdt, yb.p(), ydt, n / 8); });
		same(("silu_mul_v8 " + w).c_str(), yb.vals(), ya.vals());
	}
	{
		std::vector<bf16_t> ya(2 * n, 1), yb(2 * n, 2);
		launch(dim3{grid}, dim3{256}, [&] { split_bf16(a.p(), xdt, ya.data(), n); });
		launch(dim3{grid8}, dim3{256}, [&] { split_bf16_v8(a.p(), xdt, yb.data(), n / 8); });
		same(("split_bf16_v8 " + w).c_str(), yb, ya);
	}
}

void check_add_rmsnorm(int rows, int n, int adt, int wdt, int threads) {
	Arr a(adt, (size_t)rows * n, -2, 2), b(DT_F32, (size_t)rows * n, -2, 2), w(wdt, n, 0.5f, 1.5f);
	std::vector<float> sa((size_t)rows * n, NAN), sb((size_t)rows * n, NAN), ya((size_t)rows * n, NAN), yb((size_t)rows * n, NAN);
	launch(dim3{(unsigned)rows}, dim3{(unsigned)threads}, [&] { add_rmsnorm(a.p(), adt, b.p(), DT_F32, sa.data(), w.p(), wdt, ya.data(), DT_F32, n, 1e-5f); });
	launch(dim3{(unsigned)rows}, dim3{(unsigned)threads}, [&] { add_rmsnorm_v8(a.p(), adt, b.p(), DT_F32, sb.data(), w.p(), wdt, yb.data(), DT_F32, n, 1e-5f); });
	std::string what = "add_rmsnorm_v8 rows=" + std::to_string(rows) + " n=" + std::to_string(n) + " threads=" + std::to_string(threads);
	same((what + " sum").c_str(), sb, sa);
	same((what + " norm").c_str(), yb, ya);
}

int main() {
	for (int trial = 0; trial < 16; trial++) {
		int T = 1 + (trial % 4 == 0 ? rng() % 64 : rng() % 4), k = 1 + rng() % 2, C = 2 + rng() % 30;
		int E = 1 + rng() % C, first = rng() % 3 == 0 ? (int)(rng() % (C - E + 1)) : 0;
		check_route_plan(T, k, C, first, E, trial % 3 != 2, trial % 2 == 0);
	}
	check_route_plan(64, 1, 128, 0, 128, true, true);
	check_route_plan(1, 1, 16, 0, 16, true, true);
	for (int xdt : {DT_F32, DT_BF16})
		for (int adt : {DT_F32, DT_BF16}) {
			check_gemv_gated(1, 72, 8, 12, xdt, adt);
			check_gemv_gated(2, 200, 0, 6, xdt, adt);
		}
	check_gemv_gated(1, 4104, 16, 4, DT_F32, DT_F32); // K long enough for the four-chunks-in-flight loop
	check_expert_gemv(1, 1, 4, 264, 256, 64, 96, 1, true, DT_F32);
	check_expert_gemv(3, 2, 4, 96, 256, 32, 40, 8, false, DT_F32);
	check_expert_gemv(5, 1, 3, 520, 512, 192, 256, 8, true, DT_BF16);
	// int4: T, k, E, H, I, gs, ksplits, NT, add (splits ending inside scale groups; a partial last tile of H)
	check_q4expert(1, 1, 4, 256, 256, 32, 64, 64, 1, true);
	check_q4expert(3, 2, 4, 192, 256, 64, 64, 128, 1, false);
	check_q4expert(5, 2, 3, 272, 512, 16, 128, 192, 2, true);
	// fp8: T, k, E, H, I, format, dyn, staged, gate_up blocks (dividing I / 16), down blocks, add
	check_fp8expert(1, 1, 4, 64, 64, QF_FP8, 1, true, 2, 3, true);
	check_fp8expert(1, 2, 4, 48, 96, QF_FP8_BF16, 0, true, 3, 1, false);
	check_fp8expert(3, 2, 4, 80, 64, QF_FP8, 1, false, 4, 5, true);
	check_fp8expert(4, 1, 3, 48, 32, QF_FP8, 0, false, 1, 2, true);
	for (int ydt : {DT_F32, DT_BF16})
		for (int f = 0; f < 8; f++)
			if ((f & 1) || (f & 4)) check_qk_append(3, 4, 2, f < 4 ? 32 : 64, ydt, f & 1, (f & 1) && (f & 2), f & 4);
	check_qk_append(2, 2, 1, 128, DT_F32, true, true, false);
	check_qk_append(2, 5, 1, 64, DT_BF16, true, true, true);
	for (int xdt : {DT_F32, DT_BF16})
		for (int ydt : {DT_F32, DT_BF16}) check_elementwise(2048 + 8 * (rng() % 100), xdt, ydt);
	check_add_rmsnorm(3, 640, DT_F32, DT_BF16, 32);
	check_add_rmsnorm(2, 5120, DT_BF16, DT_BF16, 256);
	check_add_rmsnorm(1, 5120, DT_F32, DT_F32, 1024);
	check_add_rmsnorm(1, 8192, DT_F32, DT_BF16, 1024);
	if (bad) {
		printf("fused_check: %d of %ld comparisons failed\n", bad, compared);
		return 1;
	}
	printf("fused_check: %ld comparisons, all equal\n", compared);
	return 0;
}
