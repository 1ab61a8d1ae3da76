"""The C source of the compiled numerics kernels (the one job of this module: hold it; :mod:`.kernels` builds it).

Every function computes bit for bit what the PyTorch reference in :mod:`.rounding`, :mod:`.noise` and
:mod:`.reductions` computes: Philox4x32-10 noise addressed by (key, op, iteration, rounding address); stochastic
rounding of float64 results to float32 (SR, with its subnormal grid and overflow rule) or Verificarlo's random
rounding at t bits; per-instruction dot products in the lane order of :mod:`.reductions`. It is compiled with
``-ffp-contract=off`` and without fast-math, so float64 arithmetic is IEEE round-to-nearest exactly as written;
``directed`` replaces the random words by all ones (1) or zeros (2) for the directed-rounding tests.
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define MASK29 ((uint64_t)0x1FFFFFFF)

static inline void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)M0 * c[0], p1 = (uint64_t)M1 * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0; c[1] = (uint32_t)p1; c[2] = n2; c[3] = (uint32_t)p0;
        k0 += W0; k1 += W1;
    }
}

typedef struct { uint32_t k0, k1, op, iter; int directed; } noise_t;

/* the 4 words of block b */
static inline void block_words(const noise_t* nz, uint64_t b, uint32_t w[4]) {
    if (nz->directed) { uint32_t v = nz->directed == 1 ? 0xFFFFFFFFu : 0u; w[0] = w[1] = w[2] = w[3] = v; return; }
    w[0] = (uint32_t)b; w[1] = (uint32_t)(b >> 32); w[2] = nz->op; w[3] = nz->iter;
    philox(w, nz->k0, nz->k1);
}

/* one word for rounding address a (SR) */
static inline uint32_t word1(const noise_t* nz, uint64_t a) {
    uint32_t w[4]; block_words(nz, a >> 2, w); return w[a & 3];
}

static inline float sr32(double x, uint32_t u) {
    uint64_t b; memcpy(&b, &x, 8);
    uint64_t e = (b >> 52) & 0x7FF;
    if (e == 0x7FF) return (float)x;
    uint64_t m = u & MASK29;
    if (e >= 1023 - 126) { b = (b + m) & ~MASK29; memcpy(&x, &b, 8); return (float)x; }
    double s = fabs(x) * 0x1p149, whole = floor(s);
    uint64_t thr = (uint64_t)((s - whole) * 0x1p29);
    double r = (whole + (double)((m + thr) >> 29)) * 0x1p-149;
    return (float)copysign(r, x);
}

static inline float rr32(double x, int t, uint32_t w0, uint32_t w1) {
    uint64_t b; memcpy(&b, &x, 8);
    int e = (int)((b >> 52) & 0x7FF);
    if (e == 0x7FF || x == 0.0 || (b & ((1ull << (53 - t)) - 1)) == 0) return (float)x;
    int64_t k = ((int64_t)(w0 & 0x7FFFF) << 32) | (int64_t)w1;
    double xi = (double)(2 * k + 1 - (1ll << 51)) * 0x1p-52;
    return (float)(x + ldexp(xi, e - 1023 - (t - 1)));
}

/* words of roundings base..base+n-1, per = 1 or 2 words each */
void nv_words(uint32_t k0, uint32_t k1, uint32_t op, uint32_t iter, int directed, uint64_t base, int64_t n,
              int per, uint32_t* out) {
    noise_t nz = {k0, k1, op, iter, directed};
    uint32_t w[4];
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = base + (uint64_t)i;
        if (per == 1) { block_words(&nz, a >> 2, w); out[i] = w[a & 3]; }
        else { block_words(&nz, a >> 1, w); out[2 * i] = w[2 * (a & 1)]; out[2 * i + 1] = w[2 * (a & 1) + 1]; }
    }
}

/* one rounding of x to float32 at address a */
static inline float round1(const noise_t* nz, int t, uint64_t a, double x) {
    uint32_t w[4];
    if (t == 24) { block_words(nz, a >> 2, w); return sr32(x, w[a & 3]); }
    block_words(nz, a >> 1, w); return rr32(x, t, w[2 * (a & 1)], w[2 * (a & 1) + 1]);
}

/* round x[0..3] at the 4-aligned addresses a..a+3 */
static inline void round4(const noise_t* nz, int t, uint64_t a, const double* x, float* y) {
    uint32_t w[4];
    if (t == 24) {
        block_words(nz, a >> 2, w);
        y[0] = sr32(x[0], w[0]); y[1] = sr32(x[1], w[1]); y[2] = sr32(x[2], w[2]); y[3] = sr32(x[3], w[3]);
    } else {
        block_words(nz, a >> 1, w);
        y[0] = rr32(x[0], t, w[0], w[1]); y[1] = rr32(x[1], t, w[2], w[3]);
        block_words(nz, (a >> 1) + 1, w);
        y[2] = rr32(x[2], t, w[0], w[1]); y[3] = rr32(x[3], t, w[2], w[3]);
    }
}

/* the halving tree over acc[0..L) (L a power of two >= 8); addresses from a (4-aligned) */
static inline float lane_tree(const noise_t* nz, int t, uint64_t a, float* acc, int L) {
    double x[4];
    for (int half = L / 2; half >= 1; half /= 2) {
        uint64_t at = a + (uint64_t)(L - 2 * half);
        if (half >= 4) {
            for (int j = 0; j < half; j += 4) {
                for (int q = 0; q < 4; q++) x[q] = (double)acc[j + q] + (double)acc[j + half + q];
                round4(nz, t, at + (uint64_t)j, x, acc + j);
            }
        } else {
            for (int j = 0; j < half; j++) acc[j] = round1(nz, t, at + (uint64_t)j, (double)acc[j] + (double)acc[j + half]);
        }
    }
    return acc[0];
}


#if defined(__AVX2__)
#include <immintrin.h>
#define HAVE_VECTOR 1
/* round keys, broadcast */
typedef struct { __m256i k0[10], k1[10]; } vkeys_t;

static inline void vkeys_init(const noise_t* nz, vkeys_t* vk) {
    uint32_t k0 = nz->k0, k1 = nz->k1;
    for (int r = 0; r < 10; r++) {
        vk->k0[r] = _mm256_set1_epi64x(k0); vk->k1[r] = _mm256_set1_epi64x(k1); k0 += W0; k1 += W1;
    }
}

/* Philox of the 4 blocks in the 64-bit lanes of `blocks`; out[i] = the 4 words of lane i's block */
static inline void philox_v(const noise_t* nz, const vkeys_t* vk, __m256i blocks, __m256i out[4]) {
    if (nz->directed) {
        __m256i v = _mm256_set1_epi64x(nz->directed == 1 ? 0xFFFFFFFFll : 0);
        out[0] = out[1] = out[2] = out[3] = v; return;
    }
    const __m256i lo = _mm256_set1_epi64x(0xFFFFFFFFll), m0 = _mm256_set1_epi64x(M0), m1 = _mm256_set1_epi64x(M1);
    __m256i c0 = _mm256_and_si256(blocks, lo), c1 = _mm256_srli_epi64(blocks, 32);
    __m256i c2 = _mm256_set1_epi64x(nz->op), c3 = _mm256_set1_epi64x(nz->iter);
    for (int r = 0; r < 10; r++) {
        __m256i p0 = _mm256_mul_epu32(c0, m0), p1 = _mm256_mul_epu32(c2, m1);
        __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), vk->k0[r]);
        __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), vk->k1[r]);
        c1 = _mm256_and_si256(p1, lo); c3 = _mm256_and_si256(p0, lo); c0 = n0; c2 = n2;
    }
    __m256i t0 = _mm256_unpacklo_epi64(c0, c1), t1 = _mm256_unpackhi_epi64(c0, c1);
    __m256i t2 = _mm256_unpacklo_epi64(c2, c3), t3 = _mm256_unpackhi_epi64(c2, c3);
    out[0] = _mm256_permute2x128_si256(t0, t2, 0x20); out[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    out[2] = _mm256_permute2x128_si256(t0, t2, 0x31); out[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

/* two independent philox_v computations interleaved (8 blocks), for instruction-level parallelism */
static inline void philox_v2(const noise_t* nz, const vkeys_t* vk, __m256i ba, __m256i bb, __m256i oa[4],
                             __m256i ob[4]) {
    if (nz->directed) { philox_v(nz, vk, ba, oa); philox_v(nz, vk, bb, ob); return; }
    const __m256i lo = _mm256_set1_epi64x(0xFFFFFFFFll), m0 = _mm256_set1_epi64x(M0), m1 = _mm256_set1_epi64x(M1);
    __m256i a0 = _mm256_and_si256(ba, lo), a1 = _mm256_srli_epi64(ba, 32);
    __m256i b0 = _mm256_and_si256(bb, lo), b1 = _mm256_srli_epi64(bb, 32);
    __m256i a2 = _mm256_set1_epi64x(nz->op), a3 = _mm256_set1_epi64x(nz->iter), b2 = a2, b3 = a3;
    for (int r = 0; r < 10; r++) {
        __m256i pa0 = _mm256_mul_epu32(a0, m0), pa1 = _mm256_mul_epu32(a2, m1);
        __m256i pb0 = _mm256_mul_epu32(b0, m0), pb1 = _mm256_mul_epu32(b2, m1);
        __m256i na0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), vk->k0[r]);
        __m256i na2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), vk->k1[r]);
        __m256i nb0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), vk->k0[r]);
        __m256i nb2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), vk->k1[r]);
        a1 = _mm256_and_si256(pa1, lo); a3 = _mm256_and_si256(pa0, lo); a0 = na0; a2 = na2;
        b1 = _mm256_and_si256(pb1, lo); b3 = _mm256_and_si256(pb0, lo); b0 = nb0; b2 = nb2;
    }
    __m256i t0 = _mm256_unpacklo_epi64(a0, a1), t1 = _mm256_unpackhi_epi64(a0, a1);
    __m256i t2 = _mm256_unpacklo_epi64(a2, a3), t3 = _mm256_unpackhi_epi64(a2, a3);
    oa[0] = _mm256_permute2x128_si256(t0, t2, 0x20); oa[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    oa[2] = _mm256_permute2x128_si256(t0, t2, 0x31); oa[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
    t0 = _mm256_unpacklo_epi64(b0, b1); t1 = _mm256_unpackhi_epi64(b0, b1);
    t2 = _mm256_unpacklo_epi64(b2, b3); t3 = _mm256_unpackhi_epi64(b2, b3);
    ob[0] = _mm256_permute2x128_si256(t0, t2, 0x20); ob[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
    ob[2] = _mm256_permute2x128_si256(t0, t2, 0x31); ob[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
}

/* SR of 4 doubles with the words in the low halves of u's 64-bit lanes (as sr32) */
static inline __m128 sr_v(__m256d x, __m256i u) {
    const __m256i mask = _mm256_set1_epi64x((long long)MASK29);
    __m256i b = _mm256_castpd_si256(x);
    __m256i e = _mm256_and_si256(_mm256_srli_epi64(b, 52), _mm256_set1_epi64x(0x7FF));
    __m256i mag = _mm256_and_si256(b, _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    __m256i fast = _mm256_or_si256(
        _mm256_and_si256(_mm256_cmpgt_epi64(e, _mm256_set1_epi64x(896)),
                         _mm256_cmpgt_epi64(_mm256_set1_epi64x(2047), e)),
        _mm256_cmpeq_epi64(mag, _mm256_setzero_si256()));
    if (_mm256_movemask_pd(_mm256_castsi256_pd(fast)) != 0xF) {
        double xs[4]; uint64_t us[4]; float ys[4];
        _mm256_storeu_pd(xs, x); _mm256_storeu_si256((__m256i*)us, u);
        for (int q = 0; q < 4; q++) ys[q] = sr32(xs[q], (uint32_t)us[q]);
        return _mm_loadu_ps(ys);
    }
    b = _mm256_andnot_si256(mask, _mm256_add_epi64(b, _mm256_and_si256(u, mask)));
    return _mm256_cvtpd_ps(_mm256_castsi256_pd(b));
}

/* SR of the 8 doubles (lo, hi) with the words of two blocks */
static inline __m256 sr_v8(__m256d lo, __m256d hi, __m256i ulo, __m256i uhi) {
    return _mm256_set_m128(sr_v(hi, uhi), sr_v(lo, ulo));
}

static inline __m256i four_blocks(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
    return _mm256_set_epi64x((long long)d, (long long)c, (long long)b, (long long)a);
}

/* the halving tree over acc[0..L) (L a multiple of 8) with its L - 1 words from vectorised Philox; addresses
   from a (a multiple of 8), as lane_tree */
static inline float lane_tree_v(const noise_t* nz, const vkeys_t* vk, uint64_t a, float* acc, int L) {
    uint32_t words[L];
    uint64_t lanes[4];
    __m256i w[4];
    for (int b = 0; b < L / 4; b += 4) {
        uint64_t blk = (a >> 2) + (uint64_t)b;
        philox_v(nz, vk, four_blocks(blk, blk + 1, blk + 2, blk + 3), w);
        for (int q = 0; q < 4 && b + q < L / 4; q++) {
            _mm256_storeu_si256((__m256i*)lanes, w[q]);
            for (int r = 0; r < 4; r++) words[4 * (b + q) + r] = (uint32_t)lanes[r];
        }
    }
    for (int half = L / 2; half >= 1; half /= 2)
        for (int j = 0; j < half; j++)
            acc[j] = sr32((double)acc[j] + (double)acc[j + half], words[L - 2 * half + j]);
    return acc[0];
}

/* products (lo, hi) of the 8 terms a[k..k+8), b[k..k+8), zeros beyond K */
static inline void products8(const float* a, const float* b, int64_t k, int64_t K, __m256d* plo, __m256d* phi) {
    __m256 av, bv;
    if (k + 8 <= K) { av = _mm256_loadu_ps(a + k); bv = _mm256_loadu_ps(b + k); }
    else {
        float ta[8], tb[8];
        for (int q = 0; q < 8; q++) { ta[q] = k + q < K ? a[k + q] : 0.0f; tb[q] = k + q < K ? b[k + q] : 0.0f; }
        av = _mm256_loadu_ps(ta); bv = _mm256_loadu_ps(tb);
    }
    *plo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(av)), _mm256_cvtps_pd(_mm256_castps256_ps128(bv)));
    *phi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(av, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(bv, 1)));
}

/* one step of 8 lanes: p = SR(products) with words w[0], w[1]; acc = p (first step) or SR(acc + p) with w[2], w[3] */
static inline void lane_step(float* acc, __m256d plo, __m256d phi, const __m256i* w, int first) {
    __m256 p = sr_v8(plo, phi, w[0], w[1]);
    if (first) { _mm256_storeu_ps(acc, p); return; }
    __m256 c = _mm256_loadu_ps(acc);
    __m256d slo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(c)), _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
    __m256d shi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
    _mm256_storeu_ps(acc, sr_v8(slo, shi, w[2], w[3]));
}

/* a dot product of K <= 8 terms (one step of 8 lanes): its 15 roundings lie in the 4 blocks from ob / 4 (products
   at ob + 0..7, tree at ob + 8..14); w holds those blocks' words */
static inline float dot8_words(const float* a, const float* b, int64_t K, const __m256i* w) {
    __m256d plo, phi;
    products8(a, b, 0, K, &plo, &phi);
    float acc[8];
    uint64_t tw[8];
    _mm256_storeu_ps(acc, sr_v8(plo, phi, w[0], w[1]));
    _mm256_storeu_si256((__m256i*)tw, w[2]);
    _mm256_storeu_si256((__m256i*)(tw + 4), w[3]);
    for (int half = 4; half >= 1; half /= 2)
        for (int j = 0; j < half; j++)
            acc[j] = sr32((double)acc[j] + (double)acc[j + half], (uint32_t)tw[8 - 2 * half + j]);
    return acc[0];
}

static inline float dot1_v(const noise_t* nz, const vkeys_t* vk, const float* a, const float* b, int64_t K, int L,
                           int64_t S, uint64_t ob, float* acc) {
    uint64_t SL = (uint64_t)S * (uint64_t)L;
    __m256i w[4], v[4];
    int64_t units = S * (L / 8);  /* (step, 8-lane group) pairs, in step order: unit u is step u / (L/8), lanes
                                     8 (u % (L/8)); both kept as running counters (no division in the loop) */
    int64_t s0 = 0, l0 = 0;
    for (int64_t u = 0; u < units; u += 2) {
        int64_t k0 = s0 * L + l0;
        uint64_t pb0 = (ob + (uint64_t)k0) >> 2;
        uint64_t ab0 = s0 ? (ob + SL + (uint64_t)((s0 - 1) * L + l0)) >> 2 : pb0;
        __m256d plo, phi, qlo, qhi;
        products8(a, b, k0, K, &plo, &phi);
        int64_t s1 = s0, l1 = l0 + 8;
        if (l1 == L) { s1++; l1 = 0; }
        if (u + 1 < units) {
            int64_t k1 = s1 * L + l1;
            uint64_t pb1 = (ob + (uint64_t)k1) >> 2;
            uint64_t ab1 = s1 ? (ob + SL + (uint64_t)((s1 - 1) * L + l1)) >> 2 : pb1;
            philox_v2(nz, vk, four_blocks(pb0, pb0 + 1, ab0, ab0 + 1), four_blocks(pb1, pb1 + 1, ab1, ab1 + 1), w, v);
            lane_step(acc + l0, plo, phi, w, s0 == 0);
            products8(a, b, k1, K, &qlo, &qhi);
            lane_step(acc + l1, qlo, qhi, v, s1 == 0);
        } else {
            philox_v(nz, vk, four_blocks(pb0, pb0 + 1, ab0, ab0 + 1), w);
            lane_step(acc + l0, plo, phi, w, s0 == 0);
        }
        s0 = s1; l0 = l1 + 8;
        if (l0 == L) { s0++; l0 = 0; }
    }
    return lane_tree_v(nz, vk, ob + SL + (uint64_t)((S - 1) * L), acc, L);
}

/* lane additions of a per-instruction sum, L a multiple of 8: unit (step s >= 1, 8-lane group) adds the 8 terms
   to the group's lanes with addresses (s - 1) L + l; two units per Philox call */
static inline void add8(float* acc, const float* row, int64_t k, int64_t K, const __m256i* w) {
    __m256 x;
    if (k + 8 <= K) x = _mm256_loadu_ps(row + k);
    else { float t[8]; for (int q = 0; q < 8; q++) t[q] = k + q < K ? row[k + q] : 0.0f; x = _mm256_loadu_ps(t); }
    __m256 c = _mm256_loadu_ps(acc);
    __m256d slo = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(c)), _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    __m256d shi = _mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    _mm256_storeu_ps(acc, sr_v8(slo, shi, w[0], w[1]));
}

static inline float sum1_v(const noise_t* nz, const vkeys_t* vk, const float* row, int64_t K, int L, int64_t S,
                           uint64_t ob, float* acc) {
    __m256i w[4];
    for (int q = 0; q < L; q++) acc[q] = q < K ? row[q] : 0.0f;
    int64_t groups = L / 8, units = (S - 1) * groups;
    int64_t l0 = 0;  /* unit u: step 1 + u / groups, lanes l0 = 8 (u % groups), kept as a running counter */
    for (int64_t u = 0; u < units; u += 2) {
        int64_t k0 = L + u * 8;
        int64_t l1 = l0 + 8 == L ? 0 : l0 + 8;
        uint64_t b0 = (ob + (uint64_t)(u * 8)) >> 2;
        philox_v(nz, vk, four_blocks(b0, b0 + 1, b0 + 2, b0 + 3), w);
        add8(acc + l0, row, k0, K, w);
        if (u + 1 < units) add8(acc + l1, row, k0 + 8, K, w + 2);
        l0 = l1 + 8 == L ? 0 : l1 + 8;
    }
    return lane_tree_v(nz, vk, ob + (uint64_t)((S - 1) * L), acc, L);
}
#endif

/* per-instruction dot product of a[0..K) and b[0..K) (L lanes, S steps; layout of lanes.py: products at
   [0, SL), lane additions at SL + (s-1)L + l, tree at SL + (S-1)L + L - 2 half + j), addresses from ob */
static inline float dot1(const noise_t* nz, int t, const float* a, const float* b, int64_t K, int L, int64_t S,
                         uint64_t ob, float* acc) {
    float p[4];
    double x[4];
    uint64_t SL = (uint64_t)S * (uint64_t)L;
    for (int64_t s = 0; s < S; s++) {
        for (int l = 0; l < L; l += 4) {
            for (int q = 0; q < 4; q++) {
                int64_t k = s * L + l + q;
                x[q] = k < K ? (double)a[k] * (double)b[k] : 0.0;
            }
            round4(nz, t, ob + (uint64_t)(s * L + l), x, p);
            if (s == 0) { for (int q = 0; q < 4; q++) acc[l + q] = p[q]; }
            else {
                for (int q = 0; q < 4; q++) x[q] = (double)acc[l + q] + (double)p[q];
                round4(nz, t, ob + SL + (uint64_t)((s - 1) * L + l), x, acc + l);
            }
        }
    }
    return lane_tree(nz, t, ob + SL + (uint64_t)((S - 1) * L), acc, L);
}

/* out[i*nb + j] = dot(A[i], B[j]) for i < ma, j0 <= j < j1; output o takes addresses base + o * 2SL */
void nv_sr_dot(const float* A, int64_t lda, const float* B, int64_t ldb, float* out, int64_t ma, int64_t nb,
               int64_t j0, int64_t j1, int64_t K, int L, int64_t S, int t, uint32_t k0, uint32_t k1,
               uint32_t op, uint32_t iter, int directed, uint64_t base) {
    noise_t nz = {k0, k1, op, iter, directed};
    float acc[L];
    uint64_t I = 2 * (uint64_t)S * (uint64_t)L;
#ifdef HAVE_VECTOR
    vkeys_t vk; vkeys_init(&nz, &vk);
    if (t == 24 && L == 8 && S == 1) {  /* short dots: two outputs per interleaved Philox call */
        __m256i w[4], v[4];
        int64_t count = (j1 - j0) * ma;
        for (int64_t q = 0; q < count; q += 2) {
            int64_t j = j0 + q / ma, i = q % ma;
            uint64_t o = (uint64_t)(i * nb + j), blk = (base + o * I) >> 2;
            if (q + 1 < count) {
                int64_t j2 = j0 + (q + 1) / ma, i2 = (q + 1) % ma;
                uint64_t o2 = (uint64_t)(i2 * nb + j2), blk2 = (base + o2 * I) >> 2;
                philox_v2(&nz, &vk, four_blocks(blk, blk + 1, blk + 2, blk + 3),
                          four_blocks(blk2, blk2 + 1, blk2 + 2, blk2 + 3), w, v);
                out[o2] = dot8_words(A + i2 * lda, B + j2 * ldb, K, v);
            } else {
                philox_v(&nz, &vk, four_blocks(blk, blk + 1, blk + 2, blk + 3), w);
            }
            out[o] = dot8_words(A + i * lda, B + j * ldb, K, w);
        }
        return;
    }
    if (t == 24 && L % 8 == 0) {
        for (int64_t j = j0; j < j1; j++)
            for (int64_t i = 0; i < ma; i++)
                out[i * nb + j] = dot1_v(&nz, &vk, A + i * lda, B + j * ldb, K, L, S, base + (uint64_t)(i * nb + j) * I, acc);
        return;
    }
#endif
    for (int64_t j = j0; j < j1; j++)
        for (int64_t i = 0; i < ma; i++)
            out[i * nb + j] = dot1(&nz, t, A + i * lda, B + j * ldb, K, L, S, base + (uint64_t)(i * nb + j) * I, acc);
}

/* out[r] = dot(A[r], B[r]) for r0 <= r < r1; row r takes addresses base + r * 2SL */
void nv_sr_rowdot(const float* A, const float* B, int64_t ld, float* out, int64_t r0, int64_t r1, int64_t K,
                  int L, int64_t S, int t, uint32_t k0, uint32_t k1, uint32_t op, uint32_t iter, int directed,
                  uint64_t base) {
    noise_t nz = {k0, k1, op, iter, directed};
    float acc[L];
    uint64_t I = 2 * (uint64_t)S * (uint64_t)L;
#ifdef HAVE_VECTOR
    vkeys_t vk; vkeys_init(&nz, &vk);
    if (t == 24 && L % 8 == 0) {
        for (int64_t r = r0; r < r1; r++)
            out[r] = dot1_v(&nz, &vk, A + r * ld, B + r * ld, K, L, S, base + (uint64_t)r * I, acc);
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r++)
        out[r] = dot1(&nz, t, A + r * ld, B + r * ld, K, L, S, base + (uint64_t)r * I, acc);
}

/* out[r] = per-instruction SR sum of row X[r] (K terms, L lanes, S steps; lane additions at (s-1)L + l, tree at
   (S-1)L + L - 2 half + j), r0 <= r < r1; row r takes addresses base + r * SL */
void nv_sr_sum(const float* X, int64_t ldx, float* out, int64_t r0, int64_t r1, int64_t K, int L, int64_t S,
               int t, uint32_t k0, uint32_t k1, uint32_t op, uint32_t iter, int directed, uint64_t base) {
    noise_t nz = {k0, k1, op, iter, directed};
    float acc[L];
    double x[4];
    uint64_t SL = (uint64_t)S * (uint64_t)L;
#ifdef HAVE_VECTOR
    vkeys_t vk; vkeys_init(&nz, &vk);
    if (t == 24 && L % 8 == 0) {
        for (int64_t r = r0; r < r1; r++) out[r] = sum1_v(&nz, &vk, X + r * ldx, K, L, S, base + (uint64_t)r * SL, acc);
        return;
    }
#endif
    for (int64_t r = r0; r < r1; r++) {
        const float* row = X + r * ldx;
        uint64_t ob = base + (uint64_t)r * SL;
        for (int l = 0; l < L; l++) acc[l] = l < K ? row[l] : 0.0f;
        for (int64_t s = 1; s < S; s++) {
            for (int l = 0; l < L; l += 4) {
                for (int q = 0; q < 4; q++) {
                    int64_t k = s * L + l + q;
                    x[q] = (double)acc[l + q] + (k < K ? (double)row[k] : 0.0);
                }
                round4(&nz, t, ob + (uint64_t)((s - 1) * L + l), x, acc + l);
            }
        }
        out[r] = lane_tree(&nz, t, ob + (uint64_t)((S - 1) * L), acc, L);
    }
}
/* y[i] = round(x[i]) to float32: SR (t == 24) or random rounding at t bits, rounding address base + i */
void nv_round_f32(const double* x, float* y, int64_t n, int t, uint32_t k0, uint32_t k1, uint32_t op,
                  uint32_t iter, int directed, uint64_t base) {
    noise_t nz = {k0, k1, op, iter, directed};
    uint32_t w[4];
    int64_t i = 0;
    if (t == 24) {
        while (i < n && ((base + (uint64_t)i) & 3)) { y[i] = sr32(x[i], word1(&nz, base + (uint64_t)i)); i++; }
#ifdef HAVE_VECTOR
        vkeys_t vk; vkeys_init(&nz, &vk);
        __m256i u[4];
        for (; i + 16 <= n; i += 16) {
            uint64_t blk = (base + (uint64_t)i) >> 2;
            philox_v(&nz, &vk, four_blocks(blk, blk + 1, blk + 2, blk + 3), u);
            for (int q = 0; q < 4; q++) _mm_storeu_ps(y + i + 4 * q, sr_v(_mm256_loadu_pd(x + i + 4 * q), u[q]));
        }
#endif
        for (; i + 4 <= n; i += 4) {
            block_words(&nz, (base + (uint64_t)i) >> 2, w);
            y[i] = sr32(x[i], w[0]); y[i + 1] = sr32(x[i + 1], w[1]);
            y[i + 2] = sr32(x[i + 2], w[2]); y[i + 3] = sr32(x[i + 3], w[3]);
        }
        for (; i < n; i++) y[i] = sr32(x[i], word1(&nz, base + (uint64_t)i));
    } else {
        for (; i < n; i++) {
            uint64_t a = base + (uint64_t)i;
            block_words(&nz, a >> 1, w);
            y[i] = rr32(x[i], t, w[2 * (a & 1)], w[2 * (a & 1) + 1]);
        }
    }
}

/* y[i] = SR(a[i] OP b[i]) with b a tensor (b_step 1) or a scalar (b_step 0): OP 0: a + alpha b, 1: a * b, 2: a / b;
   computed in float64 (products of float32 exact), rounding address base + i */
static inline double binop(int op, double a, double b, double alpha) {
    return op == 0 ? a + alpha * b : (op == 1 ? a * b : a / b);
}

void nv_binary_f32(const float* a, const float* b, int b_step, double bscalar, double alpha, int op, float* y,
                   int64_t n, uint32_t k0, uint32_t k1, uint32_t opi, uint32_t iter, int directed, uint64_t base) {
    noise_t nz = {k0, k1, opi, iter, directed};
    int64_t i = 0;
    while (i < n && ((base + (uint64_t)i) & 3)) {
        double bv = b_step ? (double)b[i] : bscalar;
        y[i] = sr32(binop(op, (double)a[i], bv, alpha), word1(&nz, base + (uint64_t)i)); i++;
    }
#ifdef HAVE_VECTOR
    vkeys_t vk; vkeys_init(&nz, &vk);
    __m256i u[4];
    const __m256d al = _mm256_set1_pd(alpha), bs = _mm256_set1_pd(bscalar);
    for (; i + 16 <= n; i += 16) {
        uint64_t blk = (base + (uint64_t)i) >> 2;
        philox_v(&nz, &vk, four_blocks(blk, blk + 1, blk + 2, blk + 3), u);
        for (int q = 0; q < 4; q++) {
            __m256d av = _mm256_cvtps_pd(_mm_loadu_ps(a + i + 4 * q));
            __m256d bv = b_step ? _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4 * q)) : bs;
            __m256d r = op == 0 ? _mm256_add_pd(av, _mm256_mul_pd(al, bv))
                      : (op == 1 ? _mm256_mul_pd(av, bv) : _mm256_div_pd(av, bv));
            _mm_storeu_ps(y + i + 4 * q, sr_v(r, u[q]));
        }
    }
#endif
    for (; i < n; i++) {
        double bv = b_step ? (double)b[i] : bscalar;
        y[i] = sr32(binop(op, (double)a[i], bv, alpha), word1(&nz, base + (uint64_t)i));
    }
}
"""
