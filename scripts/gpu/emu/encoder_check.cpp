// encoder_check.cpp: runs kernels/encoder.cu (layernorm, add_bias, gelu, rotate_pairs, full_attention)
// under the emulator (emu.h) on small random inputs, bf16 and float32 operands, and compares them with a
// float64 host reference: full_attention over several sequences of a length that is not a multiple of
// the block's 16 queries or the chunk's 32 keys, head widths 8, 88 (Llama 4's vision heads) and 128.
// Build and run: scripts/gpu/emu-vision.sh.
#include "src.cu" // made by emu-vision.sh
#include <random>
std::mt19937 rng(11);
float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
int bad = 0;
void check(const char* what, double got, double want, double tol, long i) {
	if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (bad++ < 20) printf("%s [%ld]: got %g want %g\n", what, i, got, want); }
}
std::vector<float> rnd(size_t n, float a = -1, float b = 1) { std::vector<float> v(n); for (auto& x : v) x = urand(a, b); return v; }
// store keeps v as dtype dt (bf16 rounds it; v is updated to the rounded values).
std::vector<unsigned char> store(std::vector<float>& v, int dt) {
	std::vector<unsigned char> out(v.size() * (dt == DT_BF16 ? 2 : 4));
	for (size_t i = 0; i < v.size(); i++) {
		if (dt == DT_BF16) { bf16_t h = f32_to_bf16(v[i]); v[i] = bf16_to_f32(h); memcpy(&out[2 * i], &h, 2); }
		else memcpy(&out[4 * i], &v[i], 4);
	}
	return out;
}
float get(const std::vector<unsigned char>& p, int dt, size_t i) { return ld(p.data(), dt, i); }

void layerNorm(int dt) {
	int rows = 5, n = 300;
	auto x = rnd(rows * n, -2, 3), w = rnd(n), b = rnd(n);
	auto xd = store(x, dt), wd = store(w, dt), bd = store(b, dt);
	std::vector<unsigned char> y(rows * n * 4);
	launch(dim3{(unsigned)rows}, dim3{64}, [&] { layernorm(xd.data(), dt, wd.data(), dt, bd.data(), dt, y.data(), DT_F32, n, 1e-5f); });
	for (int r = 0; r < rows; r++) {
		double mean = 0, var = 0;
		for (int i = 0; i < n; i++) mean += x[r * n + i];
		mean /= n;
		for (int i = 0; i < n; i++) var += (x[r * n + i] - mean) * (x[r * n + i] - mean);
		double inv = 1 / std::sqrt(var / n + 1e-5);
		for (int i = 0; i < n; i++) check("layernorm", get(y, DT_F32, r * n + i), (x[r * n + i] - mean) * inv * w[i] + b[i], 1e-5, r * n + i);
	}
}

void elementwise(int dt) {
	int rows = 7, n = 40;
	long long total = rows * n;
	auto x = rnd(total, -4, 4), b = rnd(n);
	auto xd = store(x, dt), bd = store(b, dt);
	std::vector<unsigned char> y(total * 4), g(total * 4);
	launch(dim3{2}, dim3{64}, [&] { add_bias(xd.data(), dt, bd.data(), dt, y.data(), DT_F32, n, total); });
	launch(dim3{2}, dim3{64}, [&] { gelu(xd.data(), dt, g.data(), DT_F32, total); });
	for (long long i = 0; i < total; i++) {
		check("add_bias", get(y, DT_F32, i), (double)x[i] + b[i % n], 1e-7, i);
		double v = x[i];
		check("gelu", get(g, DT_F32, i), 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))), 1e-6, i);
	}
}

void rotate(int dt) {
	int T = 6, heads = 3, D = 8, half = D / 2;
	auto x = rnd(T * heads * D);
	auto xd = store(x, dt);
	std::vector<float> ang(T * half), cs(T * half), sn(T * half);
	for (int i = 0; i < T * half; i++) { ang[i] = urand(-6, 6); cs[i] = std::cos(ang[i]); sn[i] = std::sin(ang[i]); }
	std::vector<unsigned char> y(T * heads * D * 4);
	long long pairs = T * heads * half;
	launch(dim3{1}, dim3{32}, [&] { rotate_pairs(xd.data(), dt, cs.data(), sn.data(), y.data(), DT_F32, heads, half, pairs); });
	for (int t = 0; t < T; t++) for (int h = 0; h < heads; h++) for (int p = 0; p < half; p++) {
		long long e = (t * heads + h) * D + 2 * p;
		double c = cs[t * half + p], s = sn[t * half + p];
		check("rotate_pairs", get(y, DT_F32, e), x[e] * c - x[e + 1] * s, 1e-6, e);
		check("rotate_pairs", get(y, DT_F32, e + 1), x[e] * s + x[e + 1] * c, 1e-6, e + 1);
	}
}

void attention(int dt, int S, int seq, int heads, int D) {
	size_t n = (size_t)S * seq * heads * D;
	auto q = rnd(n, -2, 2), k = rnd(n, -2, 2), v = rnd(n);
	auto qd = store(q, dt), kd = store(k, dt), vd = store(v, dt);
	std::vector<unsigned char> out(n * 4);
	float scale = 1 / std::sqrt((float)D);
	dim3 grid{(unsigned)((seq + ENC_QB - 1) / ENC_QB), (unsigned)heads, (unsigned)S};
	launch(grid, dim3{ENC_WARPS * 32}, [&] { full_attention(qd.data(), dt, kd.data(), dt, vd.data(), dt, out.data(), DT_F32, heads, D, seq, scale); });
	long long rs = (long long)heads * D;
	for (int s = 0; s < S; s++) for (int i = 0; i < seq; i++) for (int h = 0; h < heads; h++) {
		std::vector<double> p(seq);
		double mx = -1e300, sum = 0;
		for (int j = 0; j < seq; j++) {
			double d = 0;
			for (int e = 0; e < D; e++) d += (double)q[(s * seq + i) * rs + h * D + e] * k[(s * seq + j) * rs + h * D + e];
			p[j] = d * scale; mx = std::max(mx, p[j]);
		}
		for (int j = 0; j < seq; j++) { p[j] = std::exp(p[j] - mx); sum += p[j]; }
		for (int e = 0; e < D; e++) {
			double o = 0;
			for (int j = 0; j < seq; j++) o += p[j] / sum * v[(s * seq + j) * rs + h * D + e];
			long long at = (s * seq + i) * rs + h * D + e;
			check("full_attention", get(out, DT_F32, at), o, 1e-5, at);
		}
	}
}

int main() {
	for (int dt : {DT_F32, DT_BF16}) {
		layerNorm(dt);
		elementwise(dt);
		rotate(dt);
		attention(dt, 2, 37, 2, 8);
	}
	attention(DT_BF16, 2, 50, 2, 88);
	attention(DT_F32, 1, 33, 1, 128);
	if (bad) { printf("%d mismatches\n", bad); return 1; }
	printf("encoder kernels match the float64 reference\n");
	return 0;
}
