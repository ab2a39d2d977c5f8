// attention_check.cpp: runs the paged KV cache kernels of kernels/attention.cu under the emulator (emu.h)
// on small random inputs and compares them with a host reference over the logical cache: kv_append into
// blocks named per row (scattered over a pool, in shuffled order) and the block table it writes, then
// attention (one block per query and head) and attention_split + attention_combine (flash-decoding, with
// rows of two caches of different block sizes in one launch, the grouped-head variants), global and
// chunked windows, caches whose first kept position is above 0 (dropped blocks: their table entries
// poisoned), block sizes 1, 5, 16 and 64. Build and run: scripts/gpu/emu-attention.sh.
#include "src.cu" // made by emu-attention.sh
#include <random>
#include <algorithm>
std::mt19937 rng(7);
float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }
int bad = 0;
void check(const char* what, double got, double want, double tol, long i) {
	if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) { if (bad++ < 20) printf("%s [%ld]: got %g want %g\n", what, i, got, want); }
}

// A paged cache: its blocks ([2][bs][kvh][D] bf16) in a pool, and the logical keys and values.
struct Cache {
	int bs, kvh, D, first, n; // positions [first, n) held
	std::vector<long long> table;                // by logical block; device addresses
	std::vector<float> k, v;                     // logical [n, kvh, D], bf16-rounded
};

// fill appends positions [first, n) of random K/V through kv_append, rows in one launch, blocks taken
// from free (shuffled); checks the blocks and the table.
void fill(Cache& c, std::vector<bf16_t>& pool, std::vector<int>& free, int kdt) {
	long long stride = (long long)c.kvh * c.D;
	long long blockElems = 2LL * c.bs * stride;
	int nblk = (c.n + c.bs - 1) / c.bs;
	c.table.assign(nblk, (long long)0xdead0000);
	std::vector<long long> blockOf(nblk, 0);
	for (int b = c.first / c.bs; b < nblk; b++) { int id = free.back(); free.pop_back(); blockOf[b] = (long long)(pool.data() + id * blockElems); }
	int T = c.n - c.first;
	c.k.assign((size_t)c.n * stride, 0); c.v.assign((size_t)c.n * stride, 0);
	std::vector<float> kf(T * stride), vf(T * stride);
	for (auto& x : kf) x = urand(-1, 1);
	for (auto& x : vf) x = urand(-1, 1);
	std::vector<bf16_t> kb(T * stride), vb(T * stride);
	for (long i = 0; i < T * stride; i++) { kb[i] = f32_to_bf16(kf[i]); vb[i] = f32_to_bf16(vf[i]); }
	const void* kp = kdt == DT_BF16 ? (const void*)kb.data() : (const void*)kf.data();
	const void* vp = kdt == DT_BF16 ? (const void*)vb.data() : (const void*)vf.data();
	for (int t = 0; t < T; t++) for (long j = 0; j < stride; j++) {
		c.k[(c.first + t) * stride + j] = bf16_to_f32(kb[t * stride + j]);
		c.v[(c.first + t) * stride + j] = bf16_to_f32(vb[t * stride + j]);
	}
	std::vector<long long> rows(KV_ROW * T);
	for (int t = 0; t < T; t++) { int p = c.first + t; long long* r = &rows[KV_ROW * t];
		r[0] = (long long)c.table.data(); r[1] = c.bs; r[2] = c.first; r[3] = p; r[4] = blockOf[p / c.bs]; }
	long long n = T * stride;
	launch(dim3{3}, dim3{64}, [&] { kv_append(kp, kdt, vp, kdt, rows.data(), stride, n); });
	for (int b = c.first / c.bs; b < nblk; b++) check("table", (double)(c.table[b] == blockOf[b]), 1, 0, b);
	for (int p = c.first; p < c.n; p++) for (long j = 0; j < stride; j++) {
		const bf16_t* blk = (const bf16_t*)blockOf[p / c.bs];
		check("append k", bf16_to_f32(blk[(p % c.bs) * stride + j]), c.k[p * stride + j], 0, p * stride + j);
		check("append v", bf16_to_f32(blk[(c.bs + p % c.bs) * stride + j]), c.v[p * stride + j], 0, p * stride + j);
	}
	// Blocks below the first kept one are dropped: poison their entries (never read).
	for (int b = 0; b < c.first / c.bs; b++) c.table[b] = (long long)0xbad0000;
}

// ref: softmax(q·k·scale)·v over keys [max(first, chunk start), p] in double.
void ref(const Cache& c, const float* q, int p, int h, int heads, int chunk, float scale, double* out) {
	int kvh = h / (heads / c.kvh);
	long long stride = (long long)c.kvh * c.D;
	int from = chunk > 0 ? p - p % chunk : 0; if (from < c.first) from = c.first;
	std::vector<double> s(p - from + 1);
	double m = -1e300;
	for (int j = from; j <= p; j++) { double d = 0; for (int e = 0; e < c.D; e++) d += (double)q[e] * c.k[j * stride + kvh * c.D + e]; s[j - from] = d * scale; m = std::max(m, s[j - from]); }
	double sum = 0; for (auto& x : s) { x = std::exp(x - m); sum += x; }
	for (int e = 0; e < c.D; e++) { double o = 0; for (int j = from; j <= p; j++) o += s[j - from] * c.v[j * stride + kvh * c.D + e]; out[e] = o / sum; }
}

void test(int bs, int bs2, int heads, int kvh, int D, int chunk, int first, int n, int kdt) {
	long long stride = (long long)kvh * D;
	Cache a{bs, kvh, D, first, n, {}, {}, {}}, b{bs2, kvh, D, 0, n / 2 + 3, {}, {}, {}};
	// A pool per cache (blocks of its size), handed out in shuffled order.
	std::vector<bf16_t> poolA((size_t)64 * 2 * bs * stride + 64), poolB((size_t)64 * 2 * bs2 * stride + 64);
	std::vector<int> freeA(64), freeB(64);
	for (int i = 0; i < 64; i++) freeA[i] = freeB[i] = i;
	std::shuffle(freeA.begin(), freeA.end(), rng); std::shuffle(freeB.begin(), freeB.end(), rng);
	fill(a, poolA, freeA, kdt); fill(b, poolB, freeB, kdt);
	float scale = 1.0f / std::sqrt((float)D);
	// Queries: the last few positions of a (prefill-like), for attention.
	int T = std::min(5, n - first);
	std::vector<int> pos(T); for (int t = 0; t < T; t++) pos[t] = n - T + t;
	std::vector<float> q(T * heads * D); for (auto& x : q) x = urand(-2, 2);
	std::vector<float> out(T * heads * D, NAN);
	launch(dim3{(unsigned)T, (unsigned)heads}, dim3{128}, [&] {
		attention(q.data(), DT_F32, a.table.data(), a.bs, pos.data(), out.data(), DT_F32, heads, kvh, D, chunk, a.first, scale); });
	std::vector<double> want(D);
	for (int t = 0; t < T; t++) for (int h = 0; h < heads; h++) {
		ref(a, &q[(t * heads + h) * D], pos[t], h, heads, chunk, scale, want.data());
		for (int e = 0; e < D; e++) check("attention", out[(t * heads + h) * D + e], want[e], 2e-5, (t * heads + h) * D + e);
	}
	// Split decode: query 0 on a at its last position, query 1 on b at its last, query 2 on a earlier.
	struct QR { Cache* c; int p; };
	std::vector<QR> qs = {{&a, n - 1}, {&b, b.n - 1}, {&a, std::max(first, n - 7)}};
	int Tq = (int)qs.size();
	std::vector<long long> rows(KV_ROW * Tq);
	for (int t = 0; t < Tq; t++) { long long* r = &rows[KV_ROW * t]; r[0] = (long long)qs[t].c->table.data(); r[1] = qs[t].c->bs; r[2] = qs[t].c->first; r[3] = qs[t].p; r[4] = 0; }
	std::vector<float> qd(Tq * heads * D); for (auto& x : qd) x = urand(-2, 2);
	for (int splits : {1, 3}) for (int variant = 0; variant < 2; variant++) {
		if (variant == 1 && (D > 128 || heads / kvh > 8)) continue;
		std::vector<float> ml((size_t)Tq * heads * splits * 2, NAN), acc((size_t)Tq * heads * splits * D, NAN), o(Tq * heads * D, NAN);
		launch(dim3{(unsigned)splits, (unsigned)kvh, (unsigned)Tq}, dim3{variant ? 256u : 128u}, [&] {
			if (variant == 0) attention_split(qd.data(), DT_F32, rows.data(), ml.data(), acc.data(), heads, kvh, D, chunk, scale, splits);
			else attention_split_128_g8(qd.data(), DT_F32, rows.data(), ml.data(), acc.data(), heads, kvh, D, chunk, scale, splits); });
		launch(dim3{(unsigned)Tq, (unsigned)heads}, dim3{128}, [&] { attention_combine(ml.data(), acc.data(), o.data(), DT_F32, heads, D, splits); });
		for (int t = 0; t < Tq; t++) for (int h = 0; h < heads; h++) {
			ref(*qs[t].c, &qd[(t * heads + h) * D], qs[t].p, h, heads, chunk, scale, want.data());
			for (int e = 0; e < D; e++) check(variant ? "attention_split_128" : "attention_split", o[(t * heads + h) * D + e], want[e], 2e-5, (t * heads + h) * D + e);
		}
	}
	printf("bs %d/%d heads %d/%d D %d chunk %d first %d n %d kdt %d: bad=%d\n", bs, bs2, heads, kvh, D, chunk, first, n, kdt, bad);
}

// model_chunked mimics a chunked layer of the long-context fixture (testdata/longctx: 4 heads over 2 kv
// heads of 16, attention_chunk_size 16, blocks of 16) as the cuda backend runs it: the cache's capacity is
// the sequence's (llama4.Model.NewSequence: 208 positions, so a device table of ceil(208/16) = 13 entries,
// followed here by canaries that must survive), the prompt appended in pieces of piece rows (kv_append, one
// launch a piece; the first kept position and the dropped blocks follow backend.KVPositions: a chunked cache
// drops, at the start of an append, the positions before the chunk of the last position appended so far),
// and each piece's queries attended right after its append (attention, bf16 q as prefill stores it for more
// than 64 rows, one block per query and head). Every output is compared with the reference over all keys.
void model_chunked(int n, int piece) {
	const int bs = 16, heads = 4, kvh = 2, D = 16, chunk = 16, canaries = 4;
	const long long canary = 0x5a5a5a5a5a5aLL;
	long long stride = (long long)kvh * D, blockElems = 2LL * bs * stride;
	int nblk = (n + bs - 1) / bs;
	Cache c{bs, kvh, D, 0, n, {}, {}, {}};
	std::vector<long long> dtab(nblk + canaries, canary); // the device table: 8 bytes per block of capacity
	std::vector<bf16_t> pool((size_t)(nblk + 2) * blockElems);
	std::vector<int> free(nblk + 2);
	for (int i = 0; i < (int)free.size(); i++) free[i] = i;
	std::shuffle(free.begin(), free.end(), rng);
	std::vector<long long> blockOf(nblk, 0);
	c.k.assign((size_t)n * stride, 0); c.v.assign((size_t)n * stride, 0);
	std::vector<bf16_t> kb((size_t)n * stride), vb((size_t)n * stride);
	for (long i = 0; i < n * stride; i++) {
		kb[i] = f32_to_bf16(urand(-1, 1)); vb[i] = f32_to_bf16(urand(-1, 1));
		c.k[i] = bf16_to_f32(kb[i]); c.v[i] = bf16_to_f32(vb[i]);
	}
	std::vector<bf16_t> qb((size_t)n * heads * D);
	for (auto& x : qb) x = f32_to_bf16(urand(-2, 2));
	std::vector<float> out((size_t)n * heads * D, NAN);
	float scale = 1.0f / std::sqrt((float)D);
	int first = 0;
	for (int p0 = 0; p0 < n; p0 += piece) {
		int T = std::min(piece, n - p0);
		if (p0 > 0) { // backend.KVPositions.Append: drop before the last appended position's chunk
			int last = p0 - 1;
			first = std::max(first, last - last % chunk);
		}
		for (int b = p0 / bs; b <= (p0 + T - 1) / bs; b++) if (!blockOf[b]) { blockOf[b] = (long long)(pool.data() + free.back() * blockElems); free.pop_back(); }
		for (int b = 0; b < first / bs; b++) if (blockOf[b] > 0) { // returned to the pool: poisoned
			bf16_t* blk = (bf16_t*)blockOf[b];
			for (long long i = 0; i < blockElems; i++) blk[i] = f32_to_bf16(NAN);
			dtab[b] = (long long)0xbad0000; blockOf[b] = -1;
		}
		std::vector<long long> rows(KV_ROW * T);
		std::vector<int> pos(T);
		for (int t = 0; t < T; t++) { int p = p0 + t; long long* r = &rows[KV_ROW * t]; pos[t] = p;
			r[0] = (long long)dtab.data(); r[1] = bs; r[2] = first; r[3] = p; r[4] = blockOf[p / bs]; }
		long long m = T * stride;
		launch(dim3{3}, dim3{64}, [&] { kv_append(&kb[p0 * stride], DT_BF16, &vb[p0 * stride], DT_BF16, rows.data(), stride, m); });
		c.table = dtab; c.first = first;
		launch(dim3{(unsigned)T, (unsigned)heads}, dim3{128}, [&] {
			attention(&qb[(size_t)p0 * heads * D], DT_BF16, dtab.data(), bs, pos.data(), &out[(size_t)p0 * heads * D], DT_F32, heads, kvh, D, chunk, first, scale); });
	}
	for (int i = 0; i < canaries; i++) check("table canary", (double)(dtab[nblk + i] == canary), 1, 0, nblk + i);
	std::vector<double> want(D);
	std::vector<float> q(D);
	int before = bad;
	for (int p = 0; p < n; p++) for (int h = 0; h < heads; h++) {
		for (int e = 0; e < D; e++) q[e] = bf16_to_f32(qb[((size_t)p * heads + h) * D + e]);
		c.first = 0;
		ref(c, q.data(), p, h, heads, chunk, scale, want.data());
		for (int e = 0; e < D; e++) check("model chunked layer", out[((size_t)p * heads + h) * D + e], want[e], 2e-5, ((long)p * heads + h) * D + e);
	}
	printf("model chunked layer: %d positions in pieces of %d, chunk %d, blocks of %d, table of %d: bad=%d\n", n, piece, chunk, bs, nblk, bad - before);
}

int main() {
	model_chunked(208, 208); // the prompt whole: one append of 208 rows (13 chunks), 208 queries
	model_chunked(208, 37);
	test(16, 5, 4, 2, 64, 0, 0, 70, DT_F32);
	test(5, 16, 8, 2, 64, 16, 32, 75, DT_BF16);  // chunked, blocks below 32 dropped (5 does not divide 32)
	test(1, 64, 4, 4, 32, 0, 3, 40, DT_F32);     // one position a block
	test(64, 1, 10, 2, 128, 24, 48, 110, DT_F32); // G5, chunk not a multiple of the block
	return bad != 0;
}
