// attention_check.cpp: runs the paged KV cache kernels of kernels/attention.cu under the emulator (emu.h)
// on small random inputs and compares them with a host reference over the logical cache: kv_append into
// blocks named per row (scattered over a pool, in shuffled order) and the block table it writes, then
// attention (one block per query and head) and attention_split + attention_combine (flash-decoding, with
// rows of two caches of different block sizes in one launch, the grouped-head variants), global and
// chunked windows, caches whose first kept position is above 0 (dropped blocks: their table entries
// poisoned), block sizes 1, 5, 16 and 64; and flash.cu's tensor-core kernels through the emulated mma,
// ldmatrix and cp.async: attention_decode (a batch of queries of several caches, split over the blocks
// by the total work: cut segments merged by the last block, 1-key queries, chunked windows, groups of 1 to
// 8, D 16 to 128, grids of 1 to 64 blocks) and attention_flash. Build and run: scripts/gpu/emu-attention.sh.
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

// newCache makes a cache of positions [first, n) in blocks of bs, in a pool of its own with its blocks in
// shuffled order, filled by kv_append with random keys and values.
Cache newCache(std::vector<bf16_t>& pool, int bs, int kvh, int D, int first, int n) {
	long long stride = (long long)kvh * D;
	int nblk = (n + bs - 1) / bs + 1;
	pool.assign((size_t)nblk * 2 * bs * stride + 64, 0);
	std::vector<int> free(nblk);
	for (int i = 0; i < nblk; i++) free[i] = i;
	std::shuffle(free.begin(), free.end(), rng);
	Cache c{bs, kvh, D, first, n, {}, {}, {}};
	fill(c, pool, free, DT_BF16);
	return c;
}

// DQ is one query of a decode batch: its cache and position.
struct DQ {
	Cache* c;
	int p;
};

// decode_check runs attention_decode (flash.cu) over the queries qs (rows of several caches in one launch)
// at each grid size, and checks every output against the reference (q rounded to bf16 first when qdt is
// bf16); a second launch must give the same bits; and a query of at most AD_MINT tiles (never cut) must
// give the same bits at every grid size. minb is the kernel's fewest tiles a block. The counters (one a segment) say how many pieces each cut
// segment had; min_cut is the fewest cut segments the largest grid must produce (0: any).
void decode_check(const char* name, const std::vector<DQ>& qs, int heads, int kvh, int D, int chunk, int qdt,
	std::vector<int> grids, int min_cut, int t0 = 0, int minb = AD_MINT) {
	int T = (int)qs.size(), G = heads / kvh, before = bad;
	std::vector<long long> rows(KV_ROW * T);
	for (int t = 0; t < T; t++) {
		long long* r = &rows[KV_ROW * t];
		r[0] = (long long)qs[t].c->table.data(); r[1] = qs[t].c->bs; r[2] = qs[t].c->first; r[3] = qs[t].p; r[4] = 0;
	}
	// q [t0 + T, heads, D]: rows before t0 belong to another launch (NaN: must not be read).
	std::vector<float> qf((size_t)(t0 + T) * heads * D, NAN);
	std::vector<bf16_t> qb(qf.size(), f32_to_bf16(NAN));
	for (size_t i = (size_t)t0 * heads * D; i < qf.size(); i++) {
		qf[i] = urand(-2, 2);
		qb[i] = f32_to_bf16(qf[i]);
		if (qdt == DT_BF16) qf[i] = bf16_to_f32(qb[i]);
	}
	const void* qp = qdt == DT_BF16 ? (const void*)qb.data() : (const void*)qf.data();
	int ss = (G * (D + 2) + 31) / 32 * 32;
	double tol = qdt == DT_BF16 ? 4e-3 : 5e-5; // bf16 q: P rounded to bf16 as in attention_flash
	std::vector<std::vector<float>> outs;
	int cut = 0, most = 0;
	for (int grid : grids) {
		std::vector<float> o0;
		for (int rep = 0; rep < 2; rep++) {
			std::vector<float> part((size_t)2 * grid * ss, NAN), o((size_t)(t0 + T) * heads * D, NAN);
			std::vector<int> cnt(T * kvh, 0);
			launch(dim3{(unsigned)grid}, dim3{AD_WARPS * 32}, [&] {
				attention_decode(qp, qdt, rows.data(), cnt.data(), T, t0, part.data(), ss, o.data(), DT_F32, heads, kvh, D, chunk, 1.0f / std::sqrt((float)D), minb); });
			if (rep == 1) {
				for (size_t i = 0; i < o.size(); i++) check("attention_decode deterministic", (double)(memcmp(&o[i], &o0[i], 4) == 0), 1, 0, (long)i);
				break;
			}
			o0 = o;
			if (grid == grids.back()) {
				cut = 0;
				for (int x : cnt) { cut += x > 0; most = std::max(most, x); }
			}
		}
		for (size_t i = 0; i < (size_t)t0 * heads * D; i++) check("attention_decode wrote another launch's row", std::isnan(o0[i]), 1, 0, (long)i);
		std::vector<double> want(D);
		for (int t = 0; t < T; t++) for (int h = 0; h < heads; h++) {
			size_t row = ((size_t)(t0 + t) * heads + h) * D;
			ref(*qs[t].c, &qf[row], qs[t].p, h, heads, chunk, 1.0f / std::sqrt((float)D), want.data());
			for (int e = 0; e < D; e++) check(name, o0[row + e], want[e], tol, (long)(row + e));
		}
		outs.push_back(o0);
	}
	// Short segments are never cut: the same bits at every grid size.
	for (int t = 0; t < T; t++) {
		int p = qs[t].p, from = chunk > 0 ? p - p % chunk : 0;
		from = std::max(from, qs[t].c->first);
		if ((p - from + AD_TK) / AD_TK > AD_MINT) continue;
		for (size_t k = 1; k < outs.size(); k++) for (int e = 0; e < heads * D; e++) {
			size_t i = (size_t)(t0 + t) * heads * D + e;
			check("attention_decode short segment differs across grids", (double)(memcmp(&outs[k][i], &outs[0][i], 4) == 0), 1, 0, (long)i);
		}
	}
	if (cut < min_cut) { printf("%s: %d cut segments at grid %d, want at least %d\n", name, cut, grids.back(), min_cut); bad++; }
	printf("%s: T %d heads %d/%d D %d chunk %d q %s grids", name, T, heads, kvh, D, chunk, qdt == DT_BF16 ? "bf16" : "f32");
	for (int g : grids) printf(" %d", g);
	printf(": %d segments cut (at most %d pieces): bad=%d\n", cut, most, bad - before);
}

void decode_tests() {
	std::vector<bf16_t> pa, pb, pc, pd, pe, pf, pg;
	{ // Llama 4's group of 5, D 128, float32 q (decode), several caches and block sizes, a 1-key query,
	  // a cache with dropped blocks, a query whose 19 tiles are cut over blocks, and rows t0.. of q.
		Cache a = newCache(pa, 16, 2, 128, 0, 300), b = newCache(pb, 5, 2, 128, 0, 1), c = newCache(pc, 1, 2, 128, 40, 91),
			d = newCache(pd, 64, 2, 128, 0, 70);
		decode_check("G5 D128", {{&a, 299}, {&b, 0}, {&c, 90}, {&a, 150}, {&d, 69}}, 10, 2, 128, 0, DT_F32, {1, 3, 16}, 2);
		decode_check("G5 D128 bf16 q, rows from t0 2", {{&a, 299}, {&d, 69}}, 10, 2, 128, 0, DT_BF16, {5}, 1, 2);
	}
	{ // Chunked windows (chunk 24, and a cache whose blocks below 48 are dropped), D 64, groups of 4.
		Cache e = newCache(pe, 5, 2, 64, 48, 120), f = newCache(pf, 16, 2, 64, 0, 33);
		decode_check("G4 D64 chunk 24", {{&e, 119}, {&e, 100}, {&f, 32}, {&f, 23}}, 8, 2, 64, 24, DT_F32, {1, 5}, 0);
		decode_check("G4 D64 chunk 48 bf16 q", {{&e, 119}, {&e, 96}, {&f, 32}}, 8, 2, 64, 48, DT_BF16, {1, 4}, 0);
		// A chunk of 160 over a cache whose blocks below 170 are dropped: the window of 299 (170..299, 9
		// tiles) is cut; that of 165 (160..165) is not.
		std::vector<bf16_t> ph;
		Cache h = newCache(ph, 16, 2, 64, 170, 300), h2 = newCache(pg, 16, 2, 64, 0, 166);
		decode_check("G4 D64 chunk 160, cut", {{&h, 299}, {&h2, 165}, {&h, 200}}, 8, 2, 64, 160, DT_F32, {1, 6}, 2);
	}
	{ // A full group of 8 at D 32 (two warps hold the head dimension): 1 key, exactly AD_MINT tiles (never
	  // cut), AD_MINT + 1 tiles, and the whole cache.
		Cache g = newCache(pg, 16, 1, 32, 0, 200);
		decode_check("G8 D32", {{&g, 199}, {&g, 0}, {&g, 63}, {&g, 64}}, 8, 1, 32, 0, DT_F32, {1, 2, 7}, 1);
	}
	{ // The fixtures' shape (D 16, one warp holds the head dimension), many short rows: whole segments by
	  // the dozen in a block, boundaries moved to segment starts, blocks past W / AD_MINT idle.
		Cache a = newCache(pa, 16, 2, 16, 0, 40), b = newCache(pb, 5, 2, 16, 0, 23), c = newCache(pc, 1, 2, 16, 7, 30);
		std::vector<DQ> qs;
		for (int i = 0; i < 40; i++) qs.push_back({i % 3 == 0 ? &a : i % 3 == 1 ? &b : &c, i % 3 == 0 ? i : i % 3 == 1 ? i % 23 : 7 + i % 23});
		decode_check("G1 D16 40 rows", qs, 2, 2, 16, 0, DT_F32, {1, 13, 64}, 0);
		decode_check("G2 D16 chunk 16", {{&a, 39}, {&a, 20}, {&b, 22}}, 4, 2, 16, 16, DT_F32, {1, 3}, 0);
	}
	{ // One long query: 94 tiles over 23 blocks, merged by the block that finishes last; and 282 tiles over
	  // 70 blocks (more pieces than the merge's AD_WCH weights at once, not a multiple of AD_MU).
		Cache a = newCache(pa, 16, 1, 64, 0, 1500), b = newCache(pb, 64, 1, 16, 0, 4500);
		decode_check("G1 D64 long", {{&a, 1499}}, 1, 1, 64, 0, DT_F32, {1, 40}, 1);
		decode_check("G2 D16 long, 70 pieces", {{&b, 4499}}, 2, 1, 16, 0, DT_F32, {1, 80}, 1);
		// The backend's 16 tiles a block at least (decodeMinTiles): 94 tiles over 5 blocks at any larger
		// grid, 282 (and two short queries) over 17, the short segments whole.
		decode_check("G1 D64 long, minb 16", {{&a, 1499}}, 1, 1, 64, 0, DT_F32, {1, 40, 528}, 1, 0, 16);
		decode_check("G2 D16 long, minb 16", {{&b, 4499}, {&b, 40}, {&b, 30}}, 2, 1, 16, 0, DT_F32, {1, 80, 528}, 1, 0, 16);
	}
	{ // All 8 kv heads of Scout's 40/8.
		Cache a = newCache(pa, 16, 8, 128, 0, 70);
		decode_check("G5 D128 40/8", {{&a, 69}, {&a, 19}}, 40, 8, 128, 0, DT_F32, {3}, 0);
	}
}

// flash_check runs attention_flash (flash.cu) on a prefill of T bf16 queries at the end of a cache and
// compares it with the reference (P is rounded to bf16 in the kernel).
void flash_check(int bs, int heads, int kvh, int D, int chunk, int first, int n, int T) {
	int before = bad;
	std::vector<bf16_t> pool;
	Cache c = newCache(pool, bs, kvh, D, first, n);
	std::vector<int> pos(T);
	for (int t = 0; t < T; t++) pos[t] = n - T + t;
	std::vector<bf16_t> qb((size_t)T * heads * D);
	std::vector<float> qf(qb.size());
	for (size_t i = 0; i < qb.size(); i++) { qb[i] = f32_to_bf16(urand(-2, 2)); qf[i] = bf16_to_f32(qb[i]); }
	std::vector<float> out(qb.size(), NAN);
	float scale = 1.0f / std::sqrt((float)D);
	launch(dim3{(unsigned)((T + FA_BM - 1) / FA_BM), (unsigned)heads}, dim3{FA_WARPS * 32}, [&] {
		attention_flash(qb.data(), c.table.data(), c.bs, pos.data(), out.data(), DT_F32, T, heads, kvh, D, chunk, c.first, scale); });
	std::vector<double> want(D);
	for (int t = 0; t < T; t++) for (int h = 0; h < heads; h++) {
		ref(c, &qf[((size_t)t * heads + h) * D], pos[t], h, heads, chunk, scale, want.data());
		for (int e = 0; e < D; e++) check("attention_flash", out[((size_t)t * heads + h) * D + e], want[e], 4e-3, ((long)t * heads + h) * D + e);
	}
	printf("attention_flash: T %d at %d, bs %d heads %d/%d D %d chunk %d first %d: bad=%d\n", T, n - T, bs, heads, kvh, D, chunk, first, bad - before);
}

int main() {
	setvbuf(stdout, nullptr, _IONBF, 0); // progress as it goes: the emulated cases take minutes
	decode_tests();
	flash_check(16, 4, 2, 64, 0, 0, 100, 70);
	flash_check(5, 4, 2, 64, 24, 48, 130, 66);
	model_chunked(208, 208); // the prompt whole: one append of 208 rows (13 chunks), 208 queries
	model_chunked(208, 37);
	test(16, 5, 4, 2, 64, 0, 0, 70, DT_F32);
	test(5, 16, 8, 2, 64, 16, 32, 75, DT_BF16);  // chunked, blocks below 32 dropped (5 does not divide 32)
	test(1, 64, 4, 4, 32, 0, 3, 40, DT_F32);     // one position a block
	test(64, 1, 10, 2, 128, 24, 48, 110, DT_F32); // G5, chunk not a multiple of the block
	return bad != 0;
}
