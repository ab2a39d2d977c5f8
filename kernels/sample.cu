// sample.cu: the token choice on the device (backend.Sampler, whose doc is the contract): argmax, and
// temperature / top-k / top-p sampling decided by a uniform draw u that the host makes. One block of
// SAMPLE_THREADS threads a row of logits; only the chosen ids (int32) go back to the host.
//
// Order. Candidates are ordered by logit, descending, ties by lower id first (package sample's order).
// smp_key maps a float to a u32 whose unsigned order is the float order, with -0 folded onto +0 and NaN
// below everything (-inf included), so (key << 32 | ~id), descending, is that order.
//
// Weights. A candidate's weight is exp((x - x_max) * (1/T)) in float32 (exactly 1 for x == x_max), held
// as a fixed-point u64 with 40 fractional bits (truncated, so weights below 2^-40 count as 0). Sums of
// weights are then exact integers: they do not depend on the order threads add them in, and the result
// is deterministic. Every decision is "the first candidate, in order, whose cumulative weight reaches a
// target":
//   top-k  weight 1, target k;
//   top-p  target ceil(p * Z), Z the weight kept by top-k;
//   draw   target floor(u * S) + 1, S the weight kept by top-p: the first candidate whose cumulative
//          weight exceeds u * S, as package sample walks them.
// Every path below answers these queries exactly, so which one runs does not change the result.
//
// Paths (smp_sample). The common case takes two passes over the row: pass A finds every thread's largest
// candidate, which bounds from below the key down to which the first j candidates lie (j = k for top-k,
// else SMP_GUESS); pass B gathers the candidates down to that key into shared memory (at most SMP_CAP)
// and, without top-k, sums the weight Z of all candidates. The gathered prefix is bitonic-sorted and
// prefix-summed, and top-k, top-p and the draw read the sums. Otherwise (too many candidates gathered,
// top-k above SAMPLE_KMAX, a top-p nucleus or a draw beyond the gathered prefix) radix selects over the
// row answer the queries (smp_select: three passes, histograms of weight by 11, 11 and 10 bits of the
// key; a tie at the answer's key is resolved by id, smp_nth_tie). There is no cap on candidates: top-p
// over the whole vocabulary is exact however large the nucleus. The set of candidates still in play is
// always "key > mkey, or key == mkey and id <= mid" (smp_member).

typedef unsigned long long smp_u64;

// SAMPLE_THREADS is the block size of both kernels (backend/cuda's sampleThreads): a power of two, at
// least SAMPLE_KMAX and at most SMP_CAP. Top-k up to SAMPLE_KMAX is found by pass A.
#define SAMPLE_THREADS 1024
#define SAMPLE_KMAX 1024
#define SMP_BINS 2048
#define SMP_CAP 2048  // candidates gathered into shared memory at most
#define SMP_GUESS 256 // without top-k, gather down to the SMP_GUESS-th largest thread maximum
#define SMP_ONE (1ull << 40)

// smp_params is one row's settings, as backend/cuda packs them (32 bytes, little-endian).
struct smp_params {
	double u;       // the draw, in [0, 1)
	double top_p;   // filters when in (0, 1)
	float inv_temp; // 1 / temperature
	int top_k;      // filters when in (0, V)
	int greedy;     // 1: argmax
	int pad;
};

// smp_shared is the sampler's shared memory (32.3 KiB): smp_select's histograms or the gathered candidates.
struct smp_selmem {
	smp_u64 hist[SMP_BINS]; // weight of the members per digit
	u32 count[SMP_BINS];    // members per digit (last level)
	int first[SMP_BINS];    // ~(least id) of the members per digit (last level; atomicMax)
};
struct smp_listmem {
	smp_u64 list[SMP_CAP]; // candidates, (key << 32 | ~id): sorted descending, package sample's order
	smp_u64 cum[SMP_CAP];  // their cumulative weights
};
struct smp_shared {
	union {
		smp_selmem sel;
		smp_listmem lst;
	} u;
	smp_u64 scratch[32];
	smp_u64 v0;
	int i0;
};

__device__ __forceinline__ u32 smp_key(float v) {
	u32 u = __float_as_uint(v);
	if ((u & 0x7fffffffu) > 0x7f800000u) return 0u; // NaN
	if (u == 0x80000000u) u = 0u;                     // -0
	return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// smp_value inverts smp_key (NaN for key 0).
__device__ __forceinline__ float smp_value(u32 k) {
	return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ bool smp_member(u32 key, int i, u32 mkey, int mid) {
	return key > mkey || (key == mkey && i <= mid);
}

// smp_weight is x's weight in fixed point: 0 for NaN and for weights below 2^-40.
__device__ __forceinline__ smp_u64 smp_weight(float x, float xmax, float inv_temp) {
	if (x == xmax) return SMP_ONE;
	float w = expf((x - xmax) * inv_temp) * (float)SMP_ONE;
	return w >= 1.0f ? (smp_u64)w : 0ull;
}

__device__ __forceinline__ smp_u64 smp_shfl64(smp_u64 v, int src) {
	u32 hi = __shfl_sync(0xffffffffu, (u32)(v >> 32), src);
	u32 lo = __shfl_sync(0xffffffffu, (u32)v, src);
	return ((smp_u64)hi << 32) | lo;
}

__device__ __forceinline__ smp_u64 smp_shfl_xor64(smp_u64 v, int o) {
	u32 hi = __shfl_xor_sync(0xffffffffu, (u32)(v >> 32), o);
	u32 lo = __shfl_xor_sync(0xffffffffu, (u32)v, o);
	return ((smp_u64)hi << 32) | lo;
}

// smp_block_max returns the largest v of the block to every thread.
__device__ smp_u64 smp_block_max(smp_u64 v, smp_u64* scratch) {
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	for (int o = 16; o > 0; o >>= 1) {
		smp_u64 w = smp_shfl_xor64(v, o);
		v = w > v ? w : v;
	}
	__syncthreads();
	if (lane == 0) scratch[warp] = v;
	__syncthreads();
	v = 0;
	for (int w = 0; w < warps; w++) v = scratch[w] > v ? scratch[w] : v;
	return v;
}

// smp_block_scan returns the sum of v over the threads before this one and sets *total to the block's sum.
__device__ smp_u64 smp_block_scan(smp_u64 v, smp_u64* scratch, smp_u64* total) {
	int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
	smp_u64 x = v;
	for (int o = 1; o < 32; o <<= 1) {
		smp_u64 y = smp_shfl64(x, (lane - o) & 31);
		if (lane >= o) x += y;
	}
	__syncthreads();
	if (lane == 31) scratch[warp] = x;
	__syncthreads();
	smp_u64 before = 0, all = 0;
	for (int w = 0; w < warps; w++) {
		if (w < warp) before += scratch[w];
		all += scratch[w];
	}
	*total = all;
	return before + x - v;
}

// smp_argmax returns to every thread (key << 32 | ~id) of the row's largest logit, ties to the lowest id
// (NaN below every number): ~(u32)result is the id.
__device__ smp_u64 smp_argmax(const void* x, int dt, long long off, int V, smp_u64* scratch) {
	smp_u64 best = 0;
	for (int i = threadIdx.x; i < V; i += blockDim.x) {
		smp_u64 c = ((smp_u64)smp_key(ld(x, dt, off + i)) << 32) | (u32)~i;
		best = c > best ? c : best;
	}
	return smp_block_max(best, scratch);
}

#define SMP_COUNT 0 // weight 1, target k
#define SMP_TOPP 1  // target ceil(frac * total), at least 1
#define SMP_DRAW 2  // target floor(frac * total) + 1, at most total

// smp_sel is smp_select's answer: the member at which the cumulative weight (in order) first reaches the
// target has key key; the members with larger keys weigh above, and the count members with that key each
// weigh each (the least id among them is first). total is the members' weight; ok is false when it is 0.
struct smp_sel {
	u32 key;
	smp_u64 above, target, total, each;
	u32 count;
	int first;
	bool ok;
};

// smp_select runs the radix select of a query over the members (mkey, mid) of the row at off: three
// passes over the row, one per digit of the key (11, 11 and 10 bits, high to low), each histogramming the
// weight of the members that share the digits found so far and finding the digit at which the cumulative
// weight, from the highest digit down, reaches the target. In count mode a warp adds its members of one
// digit with a single atomic; in the weighted modes members of weight 0 are skipped (most of the row).
__device__ smp_sel smp_select(const void* x, int dt, long long off, int V, u32 mkey, int mid, int mode,
	smp_u64 k, double frac, float xmax, float inv_temp, smp_shared* sh) {
	smp_sel s;
	s.key = 0;
	s.above = 0;
	s.target = k;
	s.total = 0;
	s.each = 0;
	s.count = 0;
	s.first = 0;
	s.ok = true;
	int lane = threadIdx.x & 31;
	u32 prefix = 0;
	__syncthreads(); // shared memory may still be read by the caller's last step
	for (int level = 0; level < 3; level++) {
		int shift = level == 0 ? 21 : level == 1 ? 10 : 0;
		int bins = level == 2 ? 1024 : 2048;
		u32 himask = level == 0 ? 0u : level == 1 ? 0xffe00000u : 0xfffffc00u; // digits already found
		bool last = level == 2;
		for (int b = threadIdx.x; b < bins; b += blockDim.x) {
			sh->u.sel.hist[b] = 0;
			sh->u.sel.count[b] = 0;
			sh->u.sel.first[b] = (int)0x80000000u;
		}
		__syncthreads();
		for (int base = 0; base < V; base += blockDim.x) { // uniform trip count: the warp votes below
			int i = base + threadIdx.x;
			float v = 0.0f;
			u32 key = 0;
			bool in = false;
			if (i < V) {
				v = ld(x, dt, off + i);
				key = smp_key(v);
				in = smp_member(key, i, mkey, mid) && (key & himask) == prefix;
			}
			int d = (int)((key >> shift) & (u32)(bins - 1));
			if (mode == SMP_COUNT) {
				if (__ballot_sync(0xffffffffu, in) == 0u) continue; // uniform over the warp
				u32 peers = __match_any_sync(0xffffffffu, in ? d : -1);
				if (in && lane == __ffs((int)peers) - 1) { // the lowest lane: the least id of its peers
					u32 n = (u32)__popc(peers);
					atomicAdd(&sh->u.sel.hist[d], (smp_u64)n);
					if (last) {
						atomicAdd(&sh->u.sel.count[d], n);
						atomicMax(&sh->u.sel.first[d], ~i);
					}
				}
			} else if (in) {
				smp_u64 w = smp_weight(v, xmax, inv_temp);
				if (w != 0) {
					atomicAdd(&sh->u.sel.hist[d], w);
					if (last) {
						atomicAdd(&sh->u.sel.count[d], 1u);
						atomicMax(&sh->u.sel.first[d], ~i);
					}
				}
			}
		}
		__syncthreads();
		// Thread t owns the digits at positions [t*per, (t+1)*per) counted from the highest digit down.
		int per = (bins + blockDim.x - 1) / blockDim.x;
		int q0 = threadIdx.x * per;
		smp_u64 mine = 0;
		for (int q = q0; q < q0 + per && q < bins; q++) mine += sh->u.sel.hist[bins - 1 - q];
		smp_u64 all;
		smp_u64 before = smp_block_scan(mine, sh->scratch, &all);
		if (level == 0) {
			s.total = all;
			if (all == 0) {
				s.ok = false;
				return s;
			}
			if (mode == SMP_TOPP) {
				double t = frac * (double)all;
				smp_u64 c = (smp_u64)t;
				if ((double)c < t) c++;
				s.target = c < 1 ? 1 : c > all ? all : c;
			} else if (mode == SMP_DRAW) {
				smp_u64 c = (smp_u64)(frac * (double)all);
				s.target = (c >= all ? all - 1 : c) + 1;
			}
		}
		// Invariant: s.above < s.target <= s.above + all; exactly one thread's digits cross the target.
		if (s.above + before < s.target && s.target <= s.above + before + mine) {
			smp_u64 acc = s.above + before;
			for (int q = q0; q < q0 + per && q < bins; q++) {
				int d = bins - 1 - q;
				if (acc + sh->u.sel.hist[d] >= s.target) {
					sh->i0 = d;
					sh->v0 = acc;
					break;
				}
				acc += sh->u.sel.hist[d];
			}
		}
		__syncthreads();
		int d = sh->i0;
		s.above = sh->v0;
		prefix |= (u32)d << shift;
		if (last) {
			s.key = prefix;
			s.count = sh->u.sel.count[d];
			s.first = ~sh->u.sel.first[d];
			s.each = s.count ? sh->u.sel.hist[d] / s.count : 0;
		}
		__syncthreads(); // everyone has read sh before the next level clears it
	}
	return s;
}

// smp_nth_tie returns to every thread the id of the j-th (0-based, in id order) member of (mkey, mid)
// whose key is key; first is the least of them (j == 0 needs no pass). Otherwise it scans the row in
// tiles of blockDim ids, counting the tie's members with a block prefix sum.
__device__ int smp_nth_tie(const void* x, int dt, long long off, int V, u32 mkey, int mid, u32 key, u32 j,
	int first, smp_shared* sh) {
	if (j == 0) return first;
	__syncthreads();
	if (threadIdx.x == 0) sh->i0 = first;
	smp_u64 seen = 0;
	for (int base = 0; base < V; base += blockDim.x) {
		int i = base + threadIdx.x;
		bool hit = false;
		if (i < V) {
			u32 k = smp_key(ld(x, dt, off + i));
			hit = k == key && smp_member(k, i, mkey, mid);
		}
		smp_u64 tile;
		smp_u64 before = smp_block_scan(hit ? 1ull : 0ull, sh->scratch, &tile);
		if (hit && seen + before == j) sh->i0 = i;
		seen += tile;
		if (seen > j) break; // uniform: every thread has the same seen
	}
	__syncthreads();
	int id = sh->i0;
	__syncthreads();
	return id;
}

// smp_ties_cut returns the mid that keeps the first n of the count members with key (in id order): all
// of them keep the old bound (mid when key is mkey, any id otherwise).
__device__ int smp_ties_cut(const void* x, int dt, long long off, int V, u32 mkey, int mid, const smp_sel& s,
	u32 n, smp_shared* sh) {
	if (n == s.count) return s.key == mkey ? mid : V - 1;
	return smp_nth_tie(x, dt, off, V, mkey, mid, s.key, n - 1, s.first, sh);
}

// smp_bitonic sorts a[0, n) descending, n a power of two; the caller has synchronized after writing a.
// It returns synchronized.
__device__ void smp_bitonic(smp_u64* a, int n) {
	for (int size = 2; size <= n; size <<= 1) {
		for (int stride = size >> 1; stride > 0; stride >>= 1) {
			for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
				int q = 2 * stride * (t / stride) + t % stride, r = q + stride;
				smp_u64 x = a[q], y = a[r];
				if ((x < y) == ((q & size) == 0)) {
					a[q] = y;
					a[r] = x;
				}
			}
			__syncthreads();
		}
	}
}

// smp_find returns to every thread the first q < n with cum[q] >= target (cum non-decreasing and
// cum[n - 1] >= target).
__device__ int smp_find(const smp_u64* cum, int n, smp_u64 target, smp_shared* sh) {
	for (int q = threadIdx.x; q < n; q += blockDim.x)
		if (cum[q] >= target && (q == 0 || cum[q - 1] < target)) sh->i0 = q;
	__syncthreads();
	int q = sh->i0;
	__syncthreads();
	return q;
}

// smp_list_pick applies top-p and the draw to the candidates list[0, n), sorted: the first n members in
// order. Z is the weight of all members, 0 when the list holds them all. It returns the id, or -1 when
// the answer lies beyond the list (only possible with Z != 0).
__device__ int smp_list_pick(int n, smp_u64 Z, float xmax, const smp_params& p, smp_shared* sh) {
	const smp_u64* list = sh->u.lst.list;
	smp_u64* cum = sh->u.lst.cum;
	int per = (n + blockDim.x - 1) / blockDim.x, q0 = threadIdx.x * per, q1 = q0 + per < n ? q0 + per : n;
	smp_u64 local = 0;
	for (int q = q0; q < q1; q++) local += smp_weight(smp_value((u32)(list[q] >> 32)), xmax, p.inv_temp);
	smp_u64 G;
	smp_u64 acc = smp_block_scan(local, sh->scratch, &G);
	for (int q = q0; q < q1; q++) {
		acc += smp_weight(smp_value((u32)(list[q] >> 32)), xmax, p.inv_temp);
		cum[q] = acc;
	}
	__syncthreads();
	if (Z == 0) Z = G;
	if (Z == 0) return (int)~(u32)list[0]; // no weight at all (non-finite row): the argmax
	int kept = n;
	smp_u64 S = Z;
	if (p.top_p > 0.0 && p.top_p < 1.0) {
		double t = p.top_p * (double)Z;
		smp_u64 target = (smp_u64)t;
		if ((double)target < t) target++;
		target = target < 1 ? 1 : target > Z ? Z : target;
		if (target > G) return -1;
		kept = smp_find(cum, n, target, sh) + 1;
		S = cum[kept - 1];
	}
	smp_u64 c = (smp_u64)(p.u * (double)S);
	smp_u64 target = (c >= S ? S - 1 : c) + 1;
	if (target > G) return -1;
	return (int)~(u32)list[smp_find(cum, kept, target, sh)];
}

// smp_sample chooses the id of a sampled (not greedy) row, V > 1.
//
// Top-k above SAMPLE_KMAX is a radix select first, and the members become those k. Then pass A takes
// every thread's largest member: the j-th largest of those is a key that at least j members reach, so the
// members down to that key are a prefix of the order holding the first j members (j = k for top-k, else
// SMP_GUESS). Pass B gathers that prefix into shared memory (and, without top-k, sums the weight Z of all
// members). When it fits (SMP_CAP) it is sorted, and top-k, top-p and the draw are read from its prefix
// sums, unless (without top-k) their targets lie beyond it. What does not fit or lies beyond falls back to
// radix selects over the row: the exact k-th member, the top-p cut, the draw.
__device__ int smp_sample(const void* x, int dt, long long off, int V, const smp_params& p, smp_shared* sh) {
	int k = p.top_k > 0 && p.top_k < V ? p.top_k : 0;
	u32 mkey = 0u; // the members: every id
	int mid = V - 1;
	if (k > SAMPLE_KMAX) {
		smp_sel s = smp_select(x, dt, off, V, mkey, mid, SMP_COUNT, (smp_u64)k, 0.0, 0.0f, 0.0f, sh);
		mid = smp_ties_cut(x, dt, off, V, mkey, mid, s, (u32)((smp_u64)k - s.above), sh);
		mkey = s.key;
		k = 0;
	}
	smp_u64* list = sh->u.lst.list;
	smp_u64 mine = 0; // pass A
	for (int i = threadIdx.x; i < V; i += blockDim.x) {
		u32 key = smp_key(ld(x, dt, off + i));
		smp_u64 c = ((smp_u64)key << 32) | (u32)~i;
		if (smp_member(key, i, mkey, mid) && c > mine) mine = c;
	}
	__syncthreads();
	list[threadIdx.x] = mine; // blockDim.x == SAMPLE_THREADS <= SMP_CAP
	__syncthreads();
	smp_bitonic(list, blockDim.x);
	smp_u64 top = list[0];
	u32 tkey = (u32)(list[(k ? k : SMP_GUESS) - 1] >> 32);
	int argmax = (int)~(u32)top;
	float xmax = smp_value((u32)(top >> 32));
	if (!(xmax > NEG_INF && xmax < -NEG_INF)) return argmax; // NaN, +inf or only -inf: no distribution
	__syncthreads();
	if (threadIdx.x == 0) sh->i0 = 0;
	__syncthreads();
	smp_u64 z = 0; // pass B
	for (int i = threadIdx.x; i < V; i += blockDim.x) {
		float v = ld(x, dt, off + i);
		u32 key = smp_key(v);
		if (!smp_member(key, i, mkey, mid)) continue;
		if (!k) z += smp_weight(v, xmax, p.inv_temp);
		if (key >= tkey) {
			int slot = atomicAdd(&sh->i0, 1);
			if (slot < SMP_CAP) list[slot] = ((smp_u64)key << 32) | (u32)~i;
		}
	}
	smp_u64 Z;
	smp_block_scan(z, sh->scratch, &Z); // also completes the gather
	int n = sh->i0;
	if (k && n > SMP_CAP) { // the exact k-th by radix select among ids down to tkey, then gather k
		u32 fkey = tkey ? tkey - 1 : 0u;
		int fmid = tkey ? -1 : V - 1;
		smp_sel s = smp_select(x, dt, off, V, fkey, fmid, SMP_COUNT, (smp_u64)k, 0.0, 0.0f, 0.0f, sh);
		int cut = smp_ties_cut(x, dt, off, V, fkey, fmid, s, (u32)((smp_u64)k - s.above), sh);
		__syncthreads();
		if (threadIdx.x == 0) sh->i0 = 0;
		__syncthreads();
		for (int i = threadIdx.x; i < V; i += blockDim.x) {
			u32 key = smp_key(ld(x, dt, off + i));
			if (smp_member(key, i, s.key, cut)) {
				int slot = atomicAdd(&sh->i0, 1);
				if (slot < SMP_CAP) list[slot] = ((smp_u64)key << 32) | (u32)~i;
			}
		}
		n = k;
	}
	if (n <= SMP_CAP) {
		int n2 = 1;
		while (n2 < n) n2 <<= 1;
		for (int q = n + (int)threadIdx.x; q < n2; q += blockDim.x) list[q] = 0; // sorts last
		__syncthreads();
		smp_bitonic(list, n2);
		int id = k ? smp_list_pick(k, 0, xmax, p, sh) : smp_list_pick(n, Z, xmax, p, sh);
		if (id >= 0) return id;
	}
	if (p.top_p > 0.0 && p.top_p < 1.0) {
		smp_sel s = smp_select(x, dt, off, V, mkey, mid, SMP_TOPP, 0, p.top_p, xmax, p.inv_temp, sh);
		if (!s.ok) return argmax;
		u32 j = (u32)((s.target - s.above - 1) / s.each); // the nucleus ends at the j-th member of the tie
		mid = smp_ties_cut(x, dt, off, V, mkey, mid, s, j + 1, sh);
		mkey = s.key;
	}
	smp_sel s = smp_select(x, dt, off, V, mkey, mid, SMP_DRAW, 0, p.u, xmax, p.inv_temp, sh);
	if (!s.ok) return argmax;
	u32 j = (u32)((s.target - s.above - 1) / s.each);
	return smp_nth_tie(x, dt, off, V, mkey, mid, s.key, j, s.first, sh);
}

// sample_argmax writes, for each row r = blockIdx.x of logits [N, V], the index of the row's largest
// logit (ties to the lowest index) to ids[r].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_argmax(const void* logits, int dt, int V, int* ids) {
	PDL_PROLOGUE();
	__shared__ smp_u64 scratch[32];
	smp_u64 best = smp_argmax(logits, dt, (long long)blockIdx.x * V, V, scratch);
	if (threadIdx.x == 0) ids[blockIdx.x] = (int)~(u32)best;
}

// sample_rows writes, for each row r = blockIdx.x of logits [N, V], the id that params[r] chooses to
// ids[r]: the argmax for greedy rows, else a draw after temperature, top-k and top-p.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(const void* logits, int dt, int V,
	const smp_params* params, int* ids) {
	PDL_PROLOGUE();
	__shared__ smp_shared sh;
	const smp_params p = params[blockIdx.x];
	long long off = (long long)blockIdx.x * V;
	int id;
	if (p.greedy || V == 1) id = (int)~(u32)smp_argmax(logits, dt, off, V, sh.scratch);
	else id = smp_sample(logits, dt, off, V, p, &sh);
	if (threadIdx.x == 0) ids[blockIdx.x] = id;
}
