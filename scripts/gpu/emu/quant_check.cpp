// quant_check.cpp: runs the kernels of kernels/quant*.cu under the emulator (emu.h) on small random inputs
// and compares them with host references written from package quant's rules (qgemv_N, dequant_bf16,
// qexpert_gemv_N in both modes, quantize_bf16; of quant_fp8.cu fp8_act_rows gathered, in place, to bf16
// and on unaligned widths, fp8_gemv_N and fp8_gemv_xs_N with one to three weights, fp8_expert_gemv_N
// and _xs_N in both modes, fp8_dequant_experts; fp8_act_codes and fp8_scale_out around a host GEMM of
// their codes), and the int4 kernels of quant_int4.cu (q4_xprep, q4gemv_N(w), q4gemv_multi_1(w),
// q4expert_gemv_N, dequant_int4_bf16, q4gemm, q4gemm_experts(_swiglu); the emulator stands in for
// mma.sync, ldmatrix, cp.async and fma.rn.bf16x2, emu.h). The
// scalar helpers (E4M3 decode, rounding, encoding, FP8RowScale) are those of quant.cu itself, checked
// against package quant bit for bit when this was written. The emulator runs the
// software E4M3 decode and bf16 rounding (the PTX of sm_80+/sm_89+ is the GPU tests' to check). Build and
// run: scripts/gpu/emu-quant.sh (scripts/gpu/emu-quant.sh int4: the int4 kernels only).
#include "src.cu" // made by emu-quant.sh
#include <random>
#include <string>
std::mt19937 rng(1);
float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
int bad = 0;
void check(const char* what, double got, double want, double tol, long i) {
	if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (bad++ < 10) printf("%s [%ld]: got %g want %g\n", what, i, got, want); }
}
// int4_at is quant's int4 rule: code idx (two's complement, element 2j in the low nibble of byte j) times
// the bf16 scale of its output channel and group, in float32.
float int4_at(const unsigned char* w, const bf16_t* scales, long idx, long in, long inner, int gs, int G) {
	long c = idx % inner, oi = idx / inner, i = oi % in, o = oi / in;
	int n = (w[idx >> 1] >> (4 * (idx & 1))) & 15, q = n >= 8 ? n - 16 : n;
	return (float)q * bf16_to_f32(scales[(o * G + i / gs) * inner + c]);
}
// quantised weight [outer, in, inner]
struct QW { std::vector<unsigned char> codes; std::vector<float> sf; std::vector<bf16_t> sb; int fmt, gs, G; long outer, in, inner;
	const void* scales() const { return fmt == QF_INT4 ? (const void*)sb.data() : (const void*)sf.data(); }
	float at(long idx) const {
		if (fmt == QF_INT4) return int4_at(codes.data(), sb.data(), idx, in, inner, gs, G);
		return qweight_at(codes.data(), scales(), fmt, idx, in, inner, gs, G); } };
QW make(int fmt, int gs, long outer, long in, long inner) {
	QW q; q.fmt = fmt; q.outer = outer; q.in = in; q.inner = inner;
	long n = outer * in * inner;
	if (fmt == QF_INT4) { q.gs = gs; q.G = (in + gs - 1) / gs; q.codes.resize((n + 1) / 2 + 16); for (auto& c : q.codes) c = rng() & 0xff;
		q.sb.resize(outer * q.G * inner); for (auto& s : q.sb) s = f32_to_bf16(urand(0.01f, 1.0f)); }
	else { q.gs = in; q.G = 1; q.codes.resize(n + 16); for (auto& c : q.codes) { c = rng() & 0xff; if ((c & 0x7f) == 0x7f) c = 0x10; }
		q.sf.resize(outer * inner); for (auto& s : q.sf) s = urand(0.001f, 0.1f); }
	return q;
}
void test_qgemv(int fmt, int gs, int T, int K, int N, int xdt, bool split = false) {
	QW w = make(fmt, gs, N, K, 1);
	// align the codes to 16 bytes
	std::vector<float> xf(T * K); for (auto& v : xf) v = urand(-1, 1);
	std::vector<bf16_t> xb(T * K); for (int i = 0; i < T * K; i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	std::vector<float> y(T * N, NAN);
	dim3 grid{(unsigned)((N + GEMV_WARPS * GEMV_ROWS - 1) / (GEMV_WARPS * GEMV_ROWS))}, block{GEMV_WARPS * 32};
	if (split) grid = dim3{(unsigned)((N + GEMV_ROWS - 1) / GEMV_ROWS)};
	launch(grid, block, [&] {
		if (split && T == 1) qgemv_split_1(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N);
		else if (split) qgemv_split_2(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N);
		else if (T == 1) qgemv_1(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N);
		else if (T == 2) qgemv_2(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N);
		else if (T <= 4) qgemv_4(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N);
		else qgemv_8(x, xdt, w.codes.data(), w.scales(), fmt, gs, y.data(), T, K, N); });
	for (int t = 0; t < T; t++) for (int n = 0; n < N; n++) {
		double s = 0, a = 0; for (int i = 0; i < K; i++) { double p = (double)xf[t * K + i] * w.at((long)n * K + i); s += p; a += std::fabs(p); }
		check("qgemv", y[t * N + n], s, 1e-5 * (1 + a), t * N + n);
	}
}
void test_dequant(int fmt, int gs) {
	long E = 3, K = 40, N = 24; QW w = make(fmt, gs, E, K, N);
	for (long e = 0; e < E; e++) {
		long n = K * N; std::vector<bf16_t> out(n);
		launch(dim3{4}, dim3{64}, [&] { dequant_bf16(w.codes.data(), w.scales(), fmt, K, N, w.gs, w.G, e * n, n, out.data()); });
		for (long i = 0; i < n; i++) check("dequant", bf16_to_f32(out[i]), bf16_to_f32(f32_to_bf16(w.at(e * n + i))), 0, i);
	}
}
void test_expert(int fmt, int gs, int mode, int NS) {
	int E = 3, K = 40, N = 24, T = 3, k = 2;
	QW w = make(fmt, gs, E, K, N);
	int experts[] = {0, 2, 2, 1, 0, 2}; float scores[6]; for (auto& s : scores) s = urand(0.1f, 1);
	if (NS == 1) { T = 1; experts[0] = 2; experts[1] = 0; }
	int R = T * k;
	// plan (align 1)
	std::vector<int> seg(2 * E), perm(R), rowOf(R), active, meta(2);
	int off = 0; for (int e = 0; e < E; e++) { int c = 0; for (int s = 0; s < R; s++) c += experts[s] == e; seg[2 * e] = off; seg[2 * e + 1] = c;
		int r = off; for (int s = 0; s < R; s++) if (experts[s] == e) { perm[r] = s; rowOf[s] = r; r++; }
		if (c) active.push_back(e); off += c; }
	meta[0] = active.size(); meta[1] = off;
	int Kx = K;
	std::vector<float> x(mode == 0 ? T * K : R * K); for (auto& v : x) v = urand(-1, 1);
	int ksplit = 32, S = (K + ksplit - 1) / ksplit;
	std::vector<float> P(S * R * N, NAN);
	dim3 grid{(unsigned)((N + EG_COLS - 1) / EG_COLS), (unsigned)S, (unsigned)active.size()};
	launch(grid, dim3{EG_WARPS * 32}, [&] {
		if (NS == 1) qexpert_gemv_1(x.data(), DT_F32, mode, perm.data(), scores, k, seg.data(), active.data(), meta.data(), w.codes.data(), w.scales(), fmt, gs, Kx, N, ksplit, P.data(), R);
		else qexpert_gemv_8(x.data(), DT_F32, mode, perm.data(), scores, k, seg.data(), active.data(), meta.data(), w.codes.data(), w.scales(), fmt, gs, Kx, N, ksplit, P.data(), R); });
	for (int r = 0; r < R; r++) { int s = perm[r], e = experts[s];
		for (int c = 0; c < N; c++) { double got = 0; for (int sp = 0; sp < S; sp++) got += P[((long)sp * R + r) * N + c];
			double want = 0, a = 0; for (int kk = 0; kk < K; kk++) { float in = mode == 0 ? x[(s / k) * K + kk] * scores[s] : x[r * K + kk];
				double p = (double)in * w.at(((long)e * K + kk) * N + c); want += p; a += std::fabs(p); }
			check("qexpert", got, want, 1e-5 * (1 + a), r * N + c); } }
}
void test_act_quant() {
	int T = 3, k = 2, n = 300, rows = 7;
	std::vector<float> x(T * n); for (auto& v : x) v = urand(-3, 3);
	x[5] = 2000; // clamped by the upper bound
	float scores[6]; for (auto& s : scores) s = urand(0.1f, 1);
	int perm[7] = {3, 0, -1, 5, 1, 2, 4};
	int nrows = 6;
	std::vector<float> out(rows * n, NAN);
	launch(dim3{(unsigned)rows}, dim3{256}, [&] { fp8_act_rows(x.data(), DT_F32, perm, scores, k, n, 1, out.data(), DT_F32, &nrows, 0); });
	for (int r = 0; r < rows; r++) {
		if (r >= nrows) { for (int i = 0; i < n; i++) if (!std::isnan(out[r * n + i])) { bad++; printf("act row %d written\n", r); break; } continue; }
		float amax = 0; std::vector<float> v(n);
		for (int i = 0; i < n; i++) { v[i] = perm[r] < 0 ? 0.0f : x[(perm[r] / k) * n + i] * scores[perm[r]]; amax = std::max(amax, std::fabs(v[i])); }
		float s = fp8_row_scale(amax, 1200.0f);
		for (int i = 0; i < n; i++) { float want = perm[r] < 0 ? 0.0f : fake_quant_fp8(v[i], s); if (__float_as_uint(want) != __float_as_uint(out[r * n + i])) { if (bad++ < 10) printf("act [%d][%d] %g %g\n", r, i, out[r * n + i], want); } }
	}
	// in place, plain rows
	std::vector<float> y = x;
	launch(dim3{(unsigned)T}, dim3{128}, [&] { fp8_act_rows(y.data(), DT_F32, nullptr, nullptr, 1, n, 1, y.data(), DT_F32, nullptr, 0); });
	for (int r = 0; r < T; r++) { float amax = 0; for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(x[r * n + i]));
		float s = fp8_row_scale(amax, 1200.0f);
		for (int i = 0; i < n; i++) { float want = fake_quant_fp8(x[r * n + i], s); if (__float_as_uint(want) != __float_as_uint(y[r * n + i])) { if (bad++ < 10) printf("act inplace [%d][%d] %g %g\n", r, i, y[r * n + i], want); } } }
}
void test_quantize(int fmt, int gs, long outer, long in, long inner) {
	long n = outer * in * inner; std::vector<bf16_t> v(n); for (auto& b : v) b = f32_to_bf16(urand(-1, 1) * (rng() % 7 == 0 ? 0.0f : 1.0f));
	int G = fmt == QF_INT4 ? (in + gs - 1) / gs : 1; if (fmt != QF_INT4) gs = in;
	long ns = outer * G * inner;
	std::vector<unsigned char> codes((n + 1) / 2 * 2 + 64, 0); std::vector<float> sf(ns); std::vector<bf16_t> sb(ns);
	void* sc = fmt == QF_INT4 ? (void*)sb.data() : (void*)sf.data();
	launch(dim3{3}, dim3{64}, [&] { quantize_bf16(v.data(), in, inner, fmt, gs, G, ns, codes.data(), sc); });
	// host reference of quant.Quantize
	for (long o = 0; o < outer; o++) for (long g = 0; g < G; g++) for (long c = 0; c < inner; c++) {
		long lo = g * gs, hi = std::min(lo + gs, in); float amax = 0;
		for (long i = lo; i < hi; i++) amax = std::max(amax, std::fabs(bf16_to_f32(v[(o * in + i) * inner + c])));
		long s = (o * G + g) * inner + c;
		float scale = fmt == QF_INT4 ? bf16_to_f32(f32_to_bf16(amax / 7)) : (amax == 0 ? 1.0f / 448 : amax / 448);
		float got = fmt == QF_INT4 ? bf16_to_f32(sb[s]) : sf[s];
		check("qscale", got, scale, 0, s);
		for (long i = lo; i < hi; i++) { long idx = (o * in + i) * inner + c; float x = bf16_to_f32(v[idx]);
			if (fmt == QF_INT4) { int q = scale == 0 ? 0 : (int)std::min(std::max(std::nearbyint(x / scale), -8.0f), 7.0f);
				int gq = (int)(signed char)((codes[idx / 2] >> (4 * (idx & 1))) << 4) >> 4; check("qint4", gq, q, 0, idx); }
			else { unsigned want = e4m3_encode(round_e4m3(std::min(std::max(x / scale, -448.0f), 448.0f))); check("qfp8", codes[idx], want, 0, idx); } }
	}
}
// test_fp8gemm: fp8_act_codes' codes and scales decode to fp8_act_rows' values bit for bit, and
// fp8_act_codes → a float32 product of the codes (the host stands in for cuBLASLt) → fp8_scale_out gives
// the product of the fake-quantised rows with the dequantised fp8 weight [N, K].
void test_fp8gemm(int T, int K, int N, int xdt) {
	std::vector<float> xf(T * K); for (auto& v : xf) v = urand(-3, 3) * (rng() % 11 == 0 ? 0.0f : 1.0f);
	if (T > 1) { xf[K + 3] = 2500; for (int i = 0; i < K; i++) xf[2 * K % (T * K) + i] *= (T > 2 ? 0.0f : 1.0f); } // a clamped row, a zero row
	std::vector<bf16_t> xb(T * K); for (int i = 0; i < T * K; i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	std::vector<unsigned char> codes(T * K); std::vector<float> sx(T, NAN);
	launch(dim3{(unsigned)T}, dim3{128}, [&] { fp8_act_codes(x, xdt, nullptr, nullptr, 1, K, codes.data(), sx.data(), nullptr); });
	std::vector<float> fq(T * K);
	launch(dim3{(unsigned)T}, dim3{64}, [&] { fp8_act_rows(x, xdt, nullptr, nullptr, 1, K, 1, fq.data(), DT_F32, nullptr, 0); });
	for (int i = 0; i < T * K; i++) { float got = e4m3_to_f32(codes[i]) * sx[i / K];
		if (__float_as_uint(got) != __float_as_uint(fq[i])) { if (bad++ < 10) printf("fp8_act_codes [%d] %g want %g\n", i, got, fq[i]); } }
	QW w = make(QF_FP8, 0, N, K, 1);
	std::vector<float> y(T * N), want(T * N);
	for (int t = 0; t < T; t++) for (int o = 0; o < N; o++) { double acc = 0, ref = 0;
		for (int k = 0; k < K; k++) { acc += (double)e4m3_to_f32(codes[t * K + k]) * e4m3_to_f32(w.codes[o * K + k]); ref += (double)fq[t * K + k] * w.at((long)o * K + k); }
		y[t * N + o] = (float)acc; want[t * N + o] = (float)ref; }
	launch(dim3{1, 2}, dim3{32}, [&] { fp8_scale_out(y.data(), sx.data(), w.sf.data(), T, N); }); // N % 4 == 0: four a thread
	for (int i = 0; i < T * N; i++) check("fp8gemm", y[i], want[i], 1e-5, i);
}
// test_fp8_gather: fp8_act_codes over gathered rows (perm, scores, nrows) decodes to fp8_act_rows' values,
// with zero codes and scale for gap rows and rows at or past nrows untouched; transpose_u8 transposes.
void test_fp8_gather() {
	int T = 3, k = 2, n = 200, rows = 7, nrows = 6;
	std::vector<float> x(T * n); for (auto& v : x) v = urand(-3, 3);
	x[7] = 3000;
	float scores[6]; for (auto& s : scores) s = urand(0.1f, 1);
	int perm[7] = {3, 0, -1, 5, 1, 2, 4};
	std::vector<unsigned char> codes(rows * n, 0xAB); std::vector<float> sx(rows, NAN), fq(rows * n, NAN);
	launch(dim3{(unsigned)rows}, dim3{96}, [&] { fp8_act_codes(x.data(), DT_F32, perm, scores, k, n, codes.data(), sx.data(), &nrows); });
	launch(dim3{(unsigned)rows}, dim3{64}, [&] { fp8_act_rows(x.data(), DT_F32, perm, scores, k, n, 1, fq.data(), DT_F32, &nrows, 0); });
	for (int r = 0; r < rows; r++) for (int i = 0; i < n; i++) {
		if (r >= nrows) { if (codes[r * n + i] != 0xAB || !std::isnan(sx[r])) { if (bad++ < 10) printf("fp8 gather row %d written\n", r); } continue; }
		float got = e4m3_to_f32(codes[r * n + i]) * sx[r];
		if (__float_as_uint(got) != __float_as_uint(fq[r * n + i])) { if (bad++ < 10) printf("fp8 gather [%d][%d] %g want %g\n", r, i, got, fq[r * n + i]); }
	}
	for (long R : {1L, 63L, 64L, 130L}) for (long C : {1L, 65L, 128L, 200L}) {
		std::vector<unsigned char> a(R * C), t(R * C, 0);
		for (auto& v : a) v = rng() & 0xff;
		launch(dim3{(unsigned)((C + 63) / 64), (unsigned)((R + 63) / 64)}, dim3{256}, [&] { transpose_u8(a.data(), R, C, t.data()); });
		for (long r = 0; r < R; r++) for (long c = 0; c < C; c++) if (t[c * R + r] != a[r * C + c]) { if (bad++ < 10) printf("transpose %ldx%ld [%ld][%ld]\n", R, C, r, c); }
	}
}
// host_fq returns row [0, n) of src·mul, fake-quantised per token when dyn (quant.FakeQuantFP8Rows).
std::vector<float> host_fq(const float* src, float mul, int n, bool dyn) {
	std::vector<float> v(n); float amax = 0;
	for (int i = 0; i < n; i++) { v[i] = src[i] * mul; amax = std::max(amax, std::fabs(v[i])); }
	if (dyn) { float s = fp8_row_scale(amax, 1200.0f); for (auto& a : v) a = fake_quant_fp8(a, s); }
	return v;
}
// test_fp8_act: fp8_act_rows to bf16, on a width that is not a multiple of 4 (the one-element path), and
// in word-major order (fp8_wm), against the host rule.
void test_fp8_act(int n, int odt) {
	int T = 3; std::vector<float> x(T * n); for (auto& v : x) v = urand(-3, 3);
	x[n + 1] = 1500;
	std::vector<float> of(T * n, NAN); std::vector<bf16_t> ob(T * n, 0xffff);
	void* out = odt == DT_F32 ? (void*)of.data() : (void*)ob.data();
	int wm = odt == DT_F32 && n % 16 == 0;
	launch(dim3{(unsigned)T}, dim3{64}, [&] { fp8_act_rows(x.data(), DT_F32, nullptr, nullptr, 1, n, 1, out, odt, nullptr, wm); });
	for (int r = 0; r < T; r++) { auto want = host_fq(&x[r * n], 1.0f, n, true);
		for (int i = 0; i < n; i++) { int c = i / 16, q = (i / 4) % 4, at = wm ? (q * (n / 16) + c) * 4 + i % 4 : i; // word-major: run q, chunk c
			float got = odt == DT_F32 ? of[r * n + at] : bf16_to_f32(ob[r * n + i]); float w = odt == DT_F32 ? want[i] : bf16_to_f32(f32_to_bf16(want[i]));
			if (__float_as_uint(got) != __float_as_uint(w)) { if (bad++ < 10) printf("fp8_act_rows n %d wm %d [%d][%d] %g want %g\n", n, wm, r, i, got, w); } } }
}
// test_fp8_gemv: fp8_gemv_N / fp8_gemv_xs_N on one to three weights [N_s, K] of one input x [T, K]
// (float32 or bf16), against the host product of the (fake-quantised, where dyn) rows with the
// dequantised weights. Without staging the rows go through fp8_act_rows first (quantised where dyn, in
// word-major order), as fp8.go does.
void test_fp8_gemv(int fmt, int T, int K, std::vector<int> Ns, int xdt, bool staged, bool dyn, unsigned threads = 64, unsigned cap = 2) {
	std::vector<QW> ws; for (int N : Ns) ws.push_back(make(fmt, 0, N, K, 1));
	std::vector<float> xf(T * K); for (auto& v : xf) v = urand(-2, 2);
	if (T > 1) { xf[K + 2] = 3000; for (int i = 0; i < K && T > 2; i++) xf[2 * K + i] = 0; } // a clamped row, a zero row
	std::vector<bf16_t> xb(T * K); for (int i = 0; i < T * K; i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	int xd = xdt; std::vector<float> xq;
	if (!staged) { xq.assign(T * K, NAN); launch(dim3{(unsigned)T}, dim3{96}, [&] { fp8_act_rows(x, xdt, nullptr, nullptr, 1, K, (int)dyn, xq.data(), DT_F32, nullptr, 1); }); x = xq.data(); xd = DT_F32; }
	std::vector<std::vector<float>> y; for (int N : Ns) y.emplace_back(T * N + 8, NAN);
	int pairs = 0; for (int N : Ns) pairs += (N + 1) / 2;
	unsigned blocks = (pairs + threads / 32 - 1) / (threads / 32); if (staged) blocks = std::min(blocks, cap);
	const unsigned char* w[3] = {}; const float* sc[3] = {}; float* yp[3] = {}; int n[3] = {};
	for (size_t s = 0; s < Ns.size(); s++) { w[s] = ws[s].codes.data(); sc[s] = ws[s].sf.data(); yp[s] = y[s].data(); n[s] = Ns[s]; }
	launch(dim3{blocks}, dim3{threads}, [&] {
		auto args = [&](auto f) { f(x, xd, (int)dyn, fmt, T, K, w[0], sc[0], yp[0], n[0], w[1], sc[1], yp[1], n[1], w[2], sc[2], yp[2], n[2]); };
		if (staged) { if (T == 1) args(fp8_gemv_xs_1); else if (T == 2) args(fp8_gemv_xs_2); else if (T <= 4) args(fp8_gemv_xs_4); else args(fp8_gemv_xs_8); }
		else { if (T == 1) args(fp8_gemv_1); else if (T == 2) args(fp8_gemv_2); else if (T <= 4) args(fp8_gemv_4); else args(fp8_gemv_8); } });
	for (size_t s = 0; s < Ns.size(); s++) { int N = Ns[s];
		for (int t = 0; t < T; t++) { auto xr = host_fq(&xf[t * K], 1.0f, K, dyn);
			for (int o = 0; o < N; o++) { double want = 0, a = 0; for (int k = 0; k < K; k++) { double p = (double)xr[k] * ws[s].at((long)o * K + k); want += p; a += std::fabs(p); }
				check("fp8_gemv", y[s][t * N + o], want, 1e-5 * (1 + a), s * 100000 + t * N + o); } }
		for (int i = T * N; i < T * N + 8; i++) if (!std::isnan(y[s][i])) { if (bad++ < 10) printf("fp8_gemv wrote past y %zu\n", s); } }
}
// test_fp8_expert: fp8_expert_gemv_N / _xs_N on output-major codes [E, N, K] for an uneven routing (one
// expert with most slots), mode 0 (gathered, score-scaled rows of x [T, K]) and mode 1 (rows of x [R, K]),
// against the host; without staging the rows are gathered and quantised by fp8_act_rows first (fp8.go).
void test_fp8_expert(int fmt, int mode, int T, int K, int N, bool staged, bool dyn, int xdt) {
	int E = 4, k = 2, R = T * k;
	QW w = make(fmt, 0, (long)E * N, K, 1); // stored [E·N, K]: W_e[n][kk] = w.at((e·N + n)·K + kk)
	std::vector<int> experts(R); for (int s = 0; s < R; s++) experts[s] = s % 5 == 4 ? 3 : (s % 3 == 0 ? 1 : 0); // expert 2 idle
	if (T == 1) { experts[0] = 3; experts[1] = 1; }
	std::vector<float> scores(R); for (auto& v : scores) v = urand(0.1f, 1);
	std::vector<int> seg(2 * E), perm(R), rowOf(R), active, meta(2);
	int off = 0; for (int e = 0; e < E; e++) { int c = 0; for (int s = 0; s < R; s++) c += experts[s] == e; seg[2 * e] = off; seg[2 * e + 1] = c;
		int r = off; for (int s = 0; s < R; s++) if (experts[s] == e) { perm[r] = s; rowOf[s] = r; r++; }
		if (c) active.push_back(e); off += c; }
	meta[0] = active.size(); meta[1] = off;
	int rows = mode == 0 ? T : R;
	std::vector<float> xf(rows * K); for (auto& v : xf) v = urand(-2, 2);
	if (rows > 1) xf[K + 5] = 2500; // a clamped row
	std::vector<bf16_t> xb(rows * K); for (int i = 0; i < rows * K; i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	int xd = xdt, md = mode; std::vector<float> xq;
	if (!staged) { // as fp8ExpertGEMV: gather (mode 0) and quantise (dyn) into [R, K] float32
		xq.assign(R * K, NAN);
		launch(dim3{(unsigned)R}, dim3{64}, [&] { fp8_act_rows(x, xdt, mode == 0 ? perm.data() : nullptr, scores.data(), mode == 0 ? k : 1, K, (int)dyn, xq.data(), DT_F32, &meta[1], 1); });
		x = xq.data(); xd = DT_F32; md = 1;
	}
	std::vector<float> P(R * N, NAN);
	unsigned blocks = staged ? 2 : (unsigned)((N / 2 + 1) / 2);
	launch(dim3{blocks, 1, (unsigned)active.size() + 1}, dim3{64}, [&] {
		auto args = [&](auto f) { f(x, xd, md, perm.data(), scores.data(), k, seg.data(), active.data(), meta.data(), w.codes.data(), w.sf.data(), fmt, (int)dyn, K, N, P.data()); };
		if (staged) { if (T == 1) args(fp8_expert_gemv_xs_1); else args(fp8_expert_gemv_xs_4); }
		else { if (T == 1) args(fp8_expert_gemv_1); else args(fp8_expert_gemv_4); } });
	for (int r = 0; r < R; r++) { int s = perm[r], e = experts[s];
		std::vector<float> in = mode == 0 ? host_fq(&xf[(s / k) * K], scores[s], K, dyn) : host_fq(&xf[r * K], 1.0f, K, dyn);
		for (int c = 0; c < N; c++) { double want = 0, a = 0; for (int kk = 0; kk < K; kk++) { double p = (double)in[kk] * w.at(((long)e * N + c) * K + kk); want += p; a += std::fabs(p); }
			check("fp8_expert", P[(long)r * N + c], want, 1e-5 * (1 + a), r * N + c); } }
}
// test_fp8_dequant_experts: the output-major experts weight dequantised in logical [E, K, N] order.
void test_fp8_dequant_experts(int fmt) {
	long E = 3, K = 32, N = 16; QW w = make(fmt, 0, E * N, K, 1);
	long n = E * K * N - 7, off = 5; std::vector<bf16_t> out(n);
	launch(dim3{3}, dim3{64}, [&] { fp8_dequant_experts(w.codes.data(), w.sf.data(), fmt, K, N, off, n, out.data()); });
	for (long i = 0; i < n; i++) { long idx = off + i, c = idx % N, kk = (idx / N) % K, e = idx / (N * K);
		check("fp8_dequant_experts", bf16_to_f32(out[i]), bf16_to_f32(f32_to_bf16(w.at((e * N + c) * K + kk))), 0, i); }
}
// ---- quant_int4.cu ----
// test_q4gemv: q4gemv_N (by T: _1 to 4 rows, _2 to 8 and _4 to 16 on q4_xprep's records; q4gemv_Nw with
// wide) with W warps a block and S K splits (gridDim.y: partial slabs, the last block of a row tile adds
// them; its counters must be back at zero after the launch) against the float64 product of x and quant's
// dequantised weight. x enters as hi + lo bf16 (2^-16 relative), the sums in float32: 3e-5 of the sum of
// |products| covers both.
void test_q4gemv(int T, int K, int N, int gs, int xdt, int W, bool wide = false, int S = 1) {
	QW w = make(QF_INT4, gs, N, K, 1);
	std::vector<float> xf(T * K); for (auto& v : xf) v = urand(-1, 1) * (rng() % 9 == 0 ? 1e-3f : 1.0f);
	std::vector<bf16_t> xb(T * K); for (int i = 0; i < T * K; i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	std::vector<float> y(T * N + 1, NAN);
	int MT = T <= 4 ? 4 : 2;
	// Above 4 rows the GEMV reads q4_xprep's records of x (2·T·K/8 of 16 bytes).
	std::vector<q4_u32x4> xq(T > 4 ? 2 * T * K / 8 : 0);
	if (T > 4) launch(dim3{2}, dim3{64}, [&] { q4_xprep(x, xdt, T, K, xq.data()); });
	dim3 grid{(unsigned)((N + 16 * MT - 1) / (16 * MT)), (unsigned)S}, block{(unsigned)(32 * W)};
	int NT = T <= 4 ? 1 : T <= 8 ? 2 : 4;
	std::vector<float> part(S > 1 ? (size_t)S * grid.x * 16 * MT * 4 * NT : 0, NAN);
	std::vector<int> ctr(grid.x, 0);
	float* pp = S > 1 ? part.data() : nullptr;
	int* cp = S > 1 ? ctr.data() : nullptr;
	launch(grid, block, [&] {
		if (wide && T <= 4) q4gemv_1w(x, xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp);
		else if (wide && T <= 8) q4gemv_2w(xq.data(), xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp);
		else if (wide) q4gemv_4w(xq.data(), xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp);
		else if (T <= 4) q4gemv_1(x, xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp);
		else if (T <= 8) q4gemv_2(xq.data(), xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp);
		else q4gemv_4(xq.data(), xdt, w.codes.data(), w.sb.data(), gs, y.data(), T, K, N, pp, cp); });
	for (unsigned i = 0; i < grid.x; i++) if (ctr[i] != 0) { bad++; printf("q4gemv S %d: counter %u left at %d\n", S, i, ctr[i]); break; }
	for (int t = 0; t < T; t++) for (int n = 0; n < N; n++) {
		double s = 0, a = 0; for (int i = 0; i < K; i++) { double p = (double)xf[t * K + i] * w.at((long)n * K + i); s += p; a += std::fabs(p); }
		check("q4gemv", y[t * N + n], s, 3e-5 * (1 + a), t * N + n);
	}
	if (!std::isnan(y[T * N])) { bad++; printf("q4gemv wrote past y\n"); }
}
// test_q4gemv_multi: q4gemv_multi_1 over three weights of one x (row counts not multiples of 64, the last
// one empty when n2 == 0) against the float64 products.
void test_q4gemv_multi(int T, int K, int n0, int n1, int n2, int gs, int W, bool wide = false, int S = 1) {
	QW w[3] = {make(QF_INT4, gs, n0, K, 1), make(QF_INT4, gs, n1, K, 1), make(QF_INT4, gs, std::max(n2, 1), K, 1)};
	int ns[3] = {n0, n1, n2};
	std::vector<float> x(T * K); for (auto& v : x) v = urand(-1, 1);
	std::vector<float> y[3]; for (int s = 0; s < 3; s++) y[s].assign(T * std::max(ns[s], 1) + 1, NAN);
	unsigned blocks = (n0 + 63) / 64 + (n1 + 63) / 64 + (n2 + 63) / 64;
	std::vector<float> part(S > 1 ? (size_t)S * blocks * 64 * 4 : 0, NAN);
	std::vector<int> ctr(blocks, 0);
	float* pp = S > 1 ? part.data() : nullptr;
	int* cp = S > 1 ? ctr.data() : nullptr;
	launch(dim3{blocks, (unsigned)S}, dim3{(unsigned)(32 * W)}, [&] {
		(wide ? q4gemv_multi_1w : q4gemv_multi_1)(x.data(), DT_F32, w[0].codes.data(), w[0].sb.data(), y[0].data(), n0, w[1].codes.data(), w[1].sb.data(), y[1].data(), n1,
			n2 ? w[2].codes.data() : nullptr, n2 ? w[2].sb.data() : nullptr, n2 ? y[2].data() : nullptr, n2, gs, T, K, pp, cp); });
	for (unsigned i = 0; i < blocks; i++) if (ctr[i] != 0) { bad++; printf("q4gemv_multi S %d: counter %u left at %d\n", S, i, ctr[i]); break; }
	for (int s = 0; s < 3; s++) {
		for (int t = 0; t < T; t++) for (int n = 0; n < ns[s]; n++) {
			double r = 0, a = 0; for (int i = 0; i < K; i++) { double p = (double)x[t * K + i] * w[s].at((long)n * K + i); r += p; a += std::fabs(p); }
			check("q4gemv_multi", y[s][t * ns[s] + n], r, 3e-5 * (1 + a), s * 100000 + t * ns[s] + n);
		}
		if (ns[s] && !std::isnan(y[s][T * ns[s]])) { bad++; printf("q4gemv_multi wrote past y%d\n", s); }
	}
}
// test_q4expert: q4expert_gemv_N (NT = 1: 4 rows a pass, 2: 8) over E experts with uneven token counts
// (one expert without tokens, one with more rows than a pass), in both modes, over K splits that end
// inside scale groups, against the float64 reference of each permuted row.
void test_q4expert(int mode, int NT, int K, int N, int gs, int ksplit, int xdt) {
	const int E = 4, T = 7, k = 2, R = T * k;
	QW w = make(QF_INT4, gs, E, K, N);
	int experts[R] = {1, 0, 1, 2, 1, 2, 1, 2, 1, 3, 1, 3, 1, 3}; // expert 0: 1 row, 1: 7, 2: 3, 3: 3
	if (NT == 2) { experts[9] = 1; experts[11] = 1; experts[13] = 2; experts[3] = 0; } // 1: 9 rows (two passes of 8), 3: 0
	float scores[R]; for (auto& s : scores) s = urand(0.1f, 1);
	std::vector<int> seg(2 * E), perm(R), rowOf(R), active, meta(2);
	int off = 0; for (int e = 0; e < E; e++) { int c = 0; for (int s = 0; s < R; s++) c += experts[s] == e; seg[2 * e] = off; seg[2 * e + 1] = c;
		int r = off; for (int s = 0; s < R; s++) if (experts[s] == e) { perm[r] = s; rowOf[s] = r; r++; }
		if (c) active.push_back(e); off += c; }
	meta[0] = active.size(); meta[1] = off;
	std::vector<float> xf(mode == 0 ? T * K : R * K); for (auto& v : xf) v = urand(-1, 1);
	std::vector<bf16_t> xb(xf.size()); for (size_t i = 0; i < xf.size(); i++) { xb[i] = f32_to_bf16(xf[i]); if (xdt == DT_BF16) xf[i] = bf16_to_f32(xb[i]); }
	const void* x = xdt == DT_BF16 ? (const void*)xb.data() : (const void*)xf.data();
	int S = (K + ksplit - 1) / ksplit;
	std::vector<float> P((long)S * R * N, NAN);
	dim3 grid{(unsigned)((N + Q4E_COLS - 1) / Q4E_COLS), (unsigned)S, (unsigned)active.size() + 1}; // one block past meta[0]
	launch(grid, dim3{Q4E_WARPS * 32}, [&] {
		if (NT == 1) q4expert_gemv_1(x, xdt, mode, perm.data(), scores, k, seg.data(), active.data(), meta.data(), w.codes.data(), w.sb.data(), gs, K, N, ksplit, P.data(), R);
		else q4expert_gemv_2(x, xdt, mode, perm.data(), scores, k, seg.data(), active.data(), meta.data(), w.codes.data(), w.sb.data(), gs, K, N, ksplit, P.data(), R); });
	for (int r = 0; r < R; r++) { int s = perm[r], e = experts[s];
		for (int c = 0; c < N; c++) { double got = 0; for (int sp = 0; sp < S; sp++) got += P[((long)sp * R + r) * N + c];
			double want = 0, a = 0; for (int kk = 0; kk < K; kk++) { float in = mode == 0 ? xf[(s / k) * K + kk] * scores[s] : xf[r * K + kk];
				double p = (double)in * w.at(((long)e * K + kk) * N + c); want += p; a += std::fabs(p); }
			check("q4expert", got, want, 3e-5 * (1 + a), r * N + c); } }
}
// test_q4dequant: dequant_int4_bf16 of [outer, in, inner] elements [off, off + n) gives bf16(q·s) bit for
// bit, on the vector path (vec) and the element-wise one; nothing past n is written.
void test_q4dequant(long outer, long in, long inner, int gs, long off, long n, int vec) {
	QW w = make(QF_INT4, gs, outer, in, inner);
	std::vector<bf16_t> out(n + 40, 0xABCD);
	launch(dim3{3}, dim3{64}, [&] { dequant_int4_bf16(w.codes.data(), w.sb.data(), in, inner, gs, w.G, off, n, vec, out.data()); });
	for (long i = 0; i < n; i++) check("q4dequant", bf16_to_f32(out[i]), bf16_to_f32(f32_to_bf16(w.at(off + i))), 0, i);
	for (long i = n; i < n + 40; i++) if (out[i] != 0xABCD) { bad++; printf("q4dequant wrote past n at %ld\n", i); break; }
}
// bf16r is v rounded to bf16 (what dequant_int4_bf16 writes for a weight, and q4gemm's fragments hold).
float bf16r(float v) { return bf16_to_f32(f32_to_bf16(v)); }
// test_q4gemm: q4gemm (x [T, K] bf16 times w [N, K] int4) against the float64 product of x and the weights
// rounded to bf16 (bf16(q·s): the dequantised path's and the kernel's fragments), float32 sums: 1e-5 of the
// sum of |products|. Row and channel tails (T, N not multiples of the tile), several scale groups and a
// last group shorter than gs; nothing is written past y.
void test_q4gemm(int T, int K, int N, int gs) {
	QW w = make(QF_INT4, gs, N, K, 1);
	std::vector<bf16_t> xb(T * K); for (auto& v : xb) v = f32_to_bf16(urand(-1, 1) * (rng() % 9 == 0 ? 1e-3f : 1.0f));
	std::vector<float> y(T * N + 1, NAN);
	dim3 grid{(unsigned)((N + 64 * Q4G_DMT - 1) / (64 * Q4G_DMT)), (unsigned)((T + 8 * Q4G_DNT - 1) / (8 * Q4G_DNT))};
	launch(grid, dim3{Q4G_WARPS * 32}, [&] { q4gemm(xb.data(), w.codes.data(), w.sb.data(), gs, y.data(), T, K, N); });
	for (int t = 0; t < T; t++) for (int n = 0; n < N; n++) {
		double s = 0, a = 0; for (int i = 0; i < K; i++) { double p = (double)bf16_to_f32(xb[t * K + i]) * bf16r(w.at((long)n * K + i)); s += p; a += std::fabs(p); }
		check("q4gemm", y[t * N + n], s, 1e-5 * (1 + a), t * N + n);
	}
	if (!std::isnan(y[T * N])) { bad++; printf("q4gemm wrote past y\n"); }
}
// test_q4gemm_experts: q4gemm_experts (swiglu false: y [R, N] float32) and q4gemm_experts_swiglu (act [R,
// I] bf16 = bf16(silu(gate)·up), N = 2I) over E experts with the given row counts (experts with none, one
// row, more rows than a tile, a tile and a row), rows packed in expert order as moe_plan's align 1 leaves
// them, and spare rows after them that no expert owns (left unwritten); the grid has the host's bound of
// row-tile slots, so most slots find no tile and return.
void test_q4gemm_experts(bool swiglu, int K, int N, int gs, std::vector<int> counts) {
	int E = counts.size(), rows = 0; for (int n : counts) rows += n;
	int R = rows + 3, I = N / 2;
	QW w = make(QF_INT4, gs, E, K, N);
	std::vector<int> seg(2 * E), active, meta(2);
	for (int e = 0, off = 0; e < E; e++) { seg[2 * e] = off; seg[2 * e + 1] = counts[e]; if (counts[e]) active.push_back(e); off += counts[e]; }
	meta[0] = active.size(); meta[1] = rows;
	std::vector<bf16_t> xb((long)R * K); for (auto& v : xb) v = f32_to_bf16(urand(-1, 1));
	int cols = swiglu ? I : N;
	std::vector<float> y((long)R * N, NAN);
	std::vector<bf16_t> act((long)R * I, 0xFFFF); // NaN
	unsigned slots = (R + Q4G_EBM - 1) / Q4G_EBM + std::min(E, R);
	unsigned bn = 64 * Q4G_EMT, cols_a = swiglu ? bn / 2 : bn;
	dim3 grid{(unsigned)((cols + cols_a - 1) / cols_a), slots};
	launch(grid, dim3{Q4G_WARPS * 32}, [&] {
		if (swiglu) q4gemm_experts_swiglu(xb.data(), seg.data(), active.data(), meta.data(), w.codes.data(), w.sb.data(), gs, K, I, act.data());
		else q4gemm_experts(xb.data(), seg.data(), active.data(), meta.data(), w.codes.data(), w.sb.data(), gs, K, N, y.data()); });
	auto dot = [&](int r, int e, int col, double& a) {
		double s = 0; for (int kk = 0; kk < K; kk++) { double p = (double)bf16_to_f32(xb[(long)r * K + kk]) * bf16r(w.at(((long)e * K + kk) * N + col)); s += p; a += std::fabs(p); }
		return s; };
	for (int e = 0; e < E; e++) for (int r = seg[2 * e]; r < seg[2 * e] + counts[e]; r++) for (int col = 0; col < cols; col++) {
		double a = 0;
		if (!swiglu) { double want = dot(r, e, col, a); check("q4gemm_experts", y[(long)r * N + col], want, 1e-5 * (1 + a), (long)r * N + col); continue; }
		double ag = 0, au = 0, gv = dot(r, e, col, ag), uv = dot(r, e, I + col, au);
		float want = silu((float)gv) * (float)uv;
		// bf16 rounding (2^-9 of the value) and the float32 sums' error carried through silu·up.
		double tol = std::ldexp(std::fabs(want), -8) + 1e-5 * (ag * std::fabs(uv) + au * std::fabs(gv) + 1);
		check("q4gemm_experts_swiglu", bf16_to_f32(act[(long)r * I + col]), want, tol / (1 + std::fabs(want)), (long)r * I + col);
	}
	for (long i = (long)rows * cols; i < (long)R * cols; i++)
		if (swiglu ? act[i] != 0xFFFF : !std::isnan(y[i])) { bad++; printf("q4gemm_experts wrote row %ld, owned by no expert\n", i / cols); break; }
}
void int4_checks() {
	for (int xdt : {DT_F32, DT_BF16}) for (int T : {1, 2, 4, 5, 8, 9, 16}) {
		test_q4gemv(T, 96, 11, 32, xdt, 2); test_q4gemv(T, 256, 40, 128, xdt, 3); }
	// Many blocks a warp (the unrolled loop and its tail), groups of 64 and 96, one warp and 16, rows past N.
	test_q4gemv(1, 1056, 70, 64, DT_F32, 1); test_q4gemv(3, 1056, 5, 96, DT_F32, 16); test_q4gemv(12, 640, 33, 32, DT_BF16, 8);
	test_q4gemv(1, 32, 3, 32, DT_F32, 4);
	test_q4gemv_multi(1, 256, 80, 16, 24, 128, 4); test_q4gemv_multi(3, 96, 64, 70, 0, 32, 2);
	// WIDE loads (K and groups multiples of 128): ranges of whole 128-input tiles, warps without one.
	for (int T : {1, 3, 6, 13}) { test_q4gemv(T, 256, 40, 128, DT_F32, 3, true); test_q4gemv(T, 640, 17, 128, DT_BF16, 2, true); }
	test_q4gemv(2, 1152, 70, 384, DT_F32, 16, true); test_q4gemv(16, 512, 33, 256, DT_F32, 4, true);
	test_q4gemv_multi(2, 384, 80, 16, 24, 128, 3, true);
	// K split over the blocks (gridDim.y): even and uneven shares, splits with no units left (S above the
	// units), with one and several warps, every kernel size.
	for (int S : {2, 3, 5}) {
		test_q4gemv(1, 640, 70, 128, DT_F32, 2, true, S); test_q4gemv(4, 1152, 40, 384, DT_BF16, 1, true, S);
		test_q4gemv(6, 512, 33, 128, DT_F32, 2, true, S); test_q4gemv(13, 384, 20, 128, DT_F32, 1, true, S);
		test_q4gemv(3, 1056, 5, 96, DT_F32, 2, false, S); test_q4gemv(9, 160, 17, 32, DT_BF16, 1, false, S);
		test_q4gemv_multi(1, 640, 80, 16, 24, 128, 2, true, S); test_q4gemv_multi(3, 96, 64, 70, 0, 32, 1, false, S);
	}
	test_q4gemv(2, 256, 40, 128, DT_F32, 1, true, 7); // 2 tiles over 7 splits: five blocks have none
	printf("q4gemv done bad=%d\n", bad);
	for (int mode : {0, 1}) for (int NT : {1, 2}) {
		test_q4expert(mode, NT, 96, 24, 16, 32, DT_F32); test_q4expert(mode, NT, 256, 72, 32, 80, DT_F32); }
	test_q4expert(0, 1, 128, 264, 128, 64, DT_BF16); test_q4expert(1, 2, 160, 16, 48, 160, DT_F32);
	printf("q4expert done bad=%d\n", bad);
	test_q4dequant(5, 96, 1, 32, 0, 5 * 96, 1); test_q4dequant(3, 40, 64, 8, 64 * 40, 64 * 40, 1); test_q4dequant(3, 40, 64, 128, 0, 3 * 40 * 64, 1);
	test_q4dequant(5, 37, 1, 16, 0, 5 * 37, 0); test_q4dequant(3, 20, 24, 8, 20 * 24, 20 * 24, 0); test_q4dequant(2, 64, 1, 32, 64, 64, 1);
	printf("q4dequant done bad=%d\n", bad);
	// q4gemm: groups of 32, 64 (a short last group), 96 and 128; rows and channels off the 128 × 128 tile.
	test_q4gemm(70, 128, 300, 32); test_q4gemm(128, 256, 256, 128); test_q4gemm(1, 160, 40, 64); test_q4gemm(130, 192, 264, 96);
	printf("q4gemm done bad=%d\n", bad);
	for (bool sw : {false, true}) {
		test_q4gemm_experts(sw, 128, 320, 32, {0, 70, 1, 0, 65, 3});
		test_q4gemm_experts(sw, 160, 256, 64, {5, 0, 64});
		test_q4gemm_experts(sw, 256, 576, 128, {2, 130, 0});
	}
	printf("q4gemm experts done bad=%d\n", bad);
}
int main(int argc, char** argv) {
	if (argc > 1 && std::string(argv[1]) == "int4") { // quant_int4.cu alone
		int4_checks();
		return bad != 0;
	}
	for (int xdt : {DT_F32, DT_BF16}) for (int T : {1, 2, 3, 5, 8}) {
		test_qgemv(QF_FP8, 0, T, 64, 10, xdt); test_qgemv(QF_FP8_BF16, 0, T, 48, 9, xdt); }
	// Several chunks a lane (the stride loop): 65 chunks a row.
	test_qgemv(QF_FP8, 0, 2, 1040, 5, DT_F32);
	// The split-K variant (a block's warps share a row pair): chunk counts below, at and above 4·32.
	for (int T : {1, 2}) { test_qgemv(QF_FP8, 0, T, 48, 7, DT_F32, true); test_qgemv(QF_FP8_BF16, 0, T, 2048, 5, DT_BF16, true); }
	printf("qgemv done bad=%d\n", bad);
	for (int f : {QF_FP8, QF_FP8_BF16}) test_dequant(f, 0);
	printf("dequant done bad=%d\n", bad);
	for (int mode : {0, 1}) for (int NS : {1, 8}) { test_expert(QF_FP8, 0, mode, NS); test_expert(QF_FP8_BF16, 0, mode, NS); }
	printf("expert done bad=%d\n", bad);
	int4_checks();
	test_act_quant();
	printf("act done bad=%d\n", bad);
	test_quantize(QF_FP8, 0, 5, 33, 1); test_quantize(QF_FP8, 0, 3, 20, 24); test_quantize(QF_INT4, 16, 5, 37, 1); test_quantize(QF_INT4, 8, 3, 20, 24); test_quantize(QF_INT4, 128, 2, 40, 3);
	printf("quantize done bad=%d\n", bad);
	for (int xdt : {DT_F32, DT_BF16}) { test_fp8gemm(1, 64, 5, xdt); test_fp8gemm(3, 160, 7, xdt); test_fp8gemm(5, 48, 16, xdt); }
	test_fp8_gather();
	printf("fp8gemm done bad=%d\n", bad);
	for (int odt : {DT_F32, DT_BF16}) { test_fp8_act(300, odt); test_fp8_act(301, odt); test_fp8_act(320, odt); }
	printf("fp8 act done bad=%d\n", bad);
	for (int xdt : {DT_F32, DT_BF16}) for (int fmt : {QF_FP8, QF_FP8_BF16}) {
		for (int T : {1, 2, 3, 8}) { test_fp8_gemv(fmt, T, 64, {10}, xdt, false, false); test_fp8_gemv(fmt, T, 96, {7}, xdt, false, true); test_fp8_gemv(fmt, T, 64, {6, 4, 9}, xdt, T <= 2, true); }
		test_fp8_gemv(fmt, 1, 2080, {6, 2, 5}, xdt, true, true, 128, 1); // staged, several chunks a lane, the grid-stride loop
		test_fp8_gemv(fmt, 2, 2080, {7}, xdt, false, true);
		test_fp8_gemv(fmt, 5, 1056, {4, 3}, xdt, true, true, 64, 1);
	}
	test_fp8_gemv(QF_FP8, 1, 4096, {16, 16, 8}, DT_BF16, true, true, 256, 1);
	printf("fp8 gemv done bad=%d\n", bad);
	for (int fmt : {QF_FP8, QF_FP8_BF16}) for (int mode : {0, 1}) for (bool dyn : {false, true}) {
		for (int T : {1, 7}) { test_fp8_expert(fmt, mode, T, 48, 24, true, dyn, DT_F32); test_fp8_expert(fmt, mode, T, 64, 40, false, dyn, mode ? DT_F32 : DT_BF16); }
		test_fp8_expert(fmt, mode, 1, 2080, 8, true, dyn, DT_BF16);
		test_fp8_expert(fmt, mode, 3, 2080, 6, false, dyn, DT_F32);
	}
	for (int fmt : {QF_FP8, QF_FP8_BF16}) test_fp8_dequant_experts(fmt);
	printf("fp8 expert done bad=%d\n", bad);
	return bad != 0;
}
