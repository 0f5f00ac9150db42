/* The negative-binomial and zero-inflated NB log-likelihood over genes, and PEAKVI's Bernoulli
 * log-likelihood over regions (bce_rows, at the end), in one pass.
 *
 * numpy's kernel (likelihood.py: MinibatchScorer._block) makes 9 (NB) or 18 (ZINB) passes over
 * every (sample, cell, gene) value, each a separate ufunc over a cache-sized block; here every
 * value is read once and its terms are summed as they are made. The formulas are those of
 * _block, term for term:
 *
 *   L = log(1 + mu * inv)                        inv = 1 / (theta + eps)
 *   NB    w L + xm log(mu + eps)                  w = -(xm + theta)
 *   ZINB  b = w L (w = -theta),  e = xm (log(mu + eps) - L),  t = b - pi,  q = exp(-pi):
 *         log((1 + m0 exp(t)) / (1 + q)) + m1 t + e
 *
 * with xm = x (NB), or xm = x m1, m1 = (x > eps), m0 = 1 - m1 (ZINB), made here from the counts
 * x, and w from theta, by the float32 operations MinibatchScorer makes them with for _block (as
 * arrays they would be n x G each, every minibatch). The per-cell terms that no sample changes
 * are the caller's, as for _block.
 *
 * The log and exp below are branch-free float32 functions the compiler vectorises (musl's
 * logf reduction and polynomial; a Cody-Waite exp with a degree-6 polynomial): within ~1 ulp
 * of the correctly rounded values, like numpy's SIMD ones. Each (sample, cell) sum is kept in
 * LANES double accumulators, gene g in lane g % LANES, added in lane order at the end: the
 * order of every operation is fixed by this source, so the result does not depend on the
 * vector width the CPU runs it with (the clones below), nor on the other rows of the call.
 * Compiled with -ffp-contract=off (no fused multiply-adds: they too would change the bits
 * from one instruction set to another).
 *
 * Inputs the functions are not written for (a negative, infinite or NaN mean, a 1 + mu * inv
 * that overflows, a non-finite dropout logit) are counted, not computed: a non-zero return
 * tells the caller to use numpy's kernel, which gives IEEE's answers for them.
 *
 * This file includes no Python header: it is a plain shared library that the runtime opens
 * with ctypes (scvi_onnx.maths.native), built where a C compiler is present at install time.
 */
#include <stdint.h>
#include <stdlib.h>

#define LANES 16

/* The four functions the runtime calls: exported from a Windows DLL (a .pyd that setuptools
 * builds with MSVC or mingw-w64); on other systems every non-static function is. MSVC's C
 * spells inline __inline before C11. */
#if defined(_WIN32)
#define KERNEL_API __declspec(dllexport)
#else
#define KERNEL_API
#endif
#if defined(_MSC_VER) && !defined(__cplusplus) && \
    (!defined(__STDC_VERSION__) || __STDC_VERSION__ < 201112L)
#define inline __inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(SCVI_ONNX_NO_CLONES)
/* one clone per x86-64 level, chosen when the library is loaded (SCVI_ONNX_NO_CLONES: the one
 * instruction set of -march, for the test that compares their bits) */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef union {
    float f;
    uint32_t i;
} bits32;

/* log(x) for finite x >= FLT_MIN (musl's logf without its special cases) */
static inline float log_f(float x) {
    bits32 u = {x};
    uint32_t ix = u.i + (0x3f800000u - 0x3f3504f3u);
    int k = (int)(ix >> 23) - 0x7f;
    u.i = (ix & 0x007fffffu) + 0x3f3504f3u; /* x / 2^k in [sqrt(2)/2, sqrt(2)) */
    float f = u.f - 1.0f;
    float s = f / (2.0f + f);
    float z = s * s, w = z * z;
    float t1 = w * (0.40000972152f + w * 0.24279078841f);
    float t2 = z * (0.66666662693f + w * 0.28498786688f);
    float r = t2 + t1, hfsq = 0.5f * f * f, dk = (float)k;
    return s * (hfsq + r) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
}

/* exp(x), x clamped to [-87, 88] (exp(-87) = 1.6e-38: 0 for every use below); Cephes' expf */
static inline float exp_f(float x) {
    /* the clamp as a bit select: fminf / fmaxf, or ternaries, keep GCC from vectorising
     * the loop for AVX2 and SSE2 (their NaN semantics) */
    bits32 c = {x};
    uint32_t lo = -(uint32_t)(x < -87.0f), hi = -(uint32_t)(x > 88.0f);
    c.i = (c.i & ~(lo | hi)) | (0xC2AE0000u & lo) | (0x42B00000u & hi); /* -87.0f, 88.0f */
    x = c.f;
    float k = x * 1.44269504089f + 12582912.0f; /* 1.5 * 2^23: rounds x / ln 2 to an integer */
    float n = k - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f; /* r = x - n ln 2, |r| <= ln(2) / 2 */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    bits32 u;
    u.i = (uint32_t)((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    return p * u.f;
}

static inline int bad_mean(float mm, float y) {
    /* mean negative or NaN, or mean / 1 + mu * inv not finite */
    return !(mm >= 0.0f) | !(mm <= 3.4028234e38f) | !(y <= 3.4028234e38f);
}

/* One (sample, cell, gene) value's NB term: w L + xm log(mu + eps), with w = -(xm + theta) and
 * xm = x (NB applies x log to every count); *flag set for a value the function is not written
 * for. */
static inline float nb_term(float mm, float iv, float th, float x, float eps, int *flag) {
    float y = 1.0f + mm * iv;
    *flag |= bad_mean(mm, y);
    float w = -(x + th);
    return w * log_f(y) + x * log_f(mm + eps);
}

/* The same for ZINB: log((1 + m0 exp(t)) / (1 + exp(-pi))) + m1 t + e (see the top), with
 * w = -theta and the masks made here as _block's numpy makes them (m1 = x > eps as 0 / 1,
 * m0 = 1 - m1, xm = x m1: the same float32 operations, so the same bits). */
static inline float zinb_term(float mm, float pp, float iv, float th, float x, float eps,
                              int *flag) {
    float y = 1.0f + mm * iv;
    *flag |= bad_mean(mm, y) | !(pp >= -80.0f) | !(pp <= 3.4028234e38f);
    float z1 = x > eps ? 1.0f : 0.0f, z0 = 1.0f - z1, xm = x * z1;
    float L = log_f(y);
    float e = xm * (log_f(mm + eps) - L);
    float t = -th * L - pp;
    float q = 1.0f + exp_f(-pp);
    return log_f((1.0f + z0 * exp_f(t)) / q) + z1 * t + e;
}

/* A row's sum: its lanes added in lane order; their flags added to *bad. */
static inline double lanes_total(const double *acc, const int *flag, int64_t *bad) {
    double tot = 0.0;
    for (int j = 0; j < LANES; j++) {
        tot += acc[j];
        *bad += flag[j];
    }
    return tot;
}

/* NB: out[s * out_s + c] = sum_g w[c, g] L + x[c, g] log(mu + eps), w = -(x + theta).
 * mu[s * mu_s + c * mu_c + g]; inv = 1 / (theta + eps) and theta: row c at c * th_c (0: one
 * row for all cells); the counts x: row c at c * G. Gene g goes to lane g % LANES (the last
 * G % LANES genes too). Returns the number of values the function is not written for. */
CLONES
KERNEL_API
int64_t nb_rows(const float *mu, int64_t S, int64_t n, int64_t G, int64_t mu_s, int64_t mu_c,
                const float *inv, const float *theta, int64_t th_c, const float *x, float eps,
                double *out, int64_t out_s) {
    int64_t bad = 0;
    for (int64_t c = 0; c < n; c++) {
        const float *iv = inv + c * th_c, *tc = theta + c * th_c, *xc = x + c * G;
        for (int64_t s = 0; s < S; s++) {
            const float *m = mu + s * mu_s + c * mu_c;
            double acc[LANES] = {0};
            int flag[LANES] = {0};
            int64_t g = 0;
            for (; g + LANES <= G; g += LANES)
                for (int j = 0; j < LANES; j++)
                    acc[j] += (double)nb_term(m[g + j], iv[g + j], tc[g + j], xc[g + j], eps,
                                              &flag[j]);
            for (int j = 0; g + j < G; j++)
                acc[j] +=
                    (double)nb_term(m[g + j], iv[g + j], tc[g + j], xc[g + j], eps, &flag[j]);
            out[s * out_s + c] = lanes_total(acc, flag, &bad);
        }
    }
    return bad;
}

/* ZINB (a dropout logit below -80, where exp(-pi) could overflow, is counted as not written
 * for): as nb_rows, with pi laid out as mu. */
CLONES
KERNEL_API
int64_t zinb_rows(const float *mu, const float *pi, int64_t S, int64_t n, int64_t G,
                  int64_t mu_s, int64_t mu_c, const float *inv, const float *theta, int64_t th_c,
                  const float *x, float eps, double *out, int64_t out_s) {
    int64_t bad = 0;
    for (int64_t c = 0; c < n; c++) {
        const float *iv = inv + c * th_c, *tc = theta + c * th_c, *xc = x + c * G;
        for (int64_t s = 0; s < S; s++) {
            const float *m = mu + s * mu_s + c * mu_c, *p = pi + s * mu_s + c * mu_c;
            double acc[LANES] = {0};
            int flag[LANES] = {0};
            int64_t g = 0;
            for (; g + LANES <= G; g += LANES)
                for (int j = 0; j < LANES; j++)
                    acc[j] += (double)zinb_term(m[g + j], p[g + j], iv[g + j], tc[g + j],
                                                xc[g + j], eps, &flag[j]);
            for (int j = 0; g + j < G; j++)
                acc[j] += (double)zinb_term(m[g + j], p[g + j], iv[g + j], tc[g + j], xc[g + j],
                                            eps, &flag[j]);
            out[s * out_s + c] = lanes_total(acc, flag, &bad);
        }
    }
    return bad;
}

/* Region r's factor: 1 - q, or q where accessible (mask 1), with -q = p * nd[r * nd_r]. */
static inline float bce_factor(const float *p, const float *nd, int64_t nd_r, const float *mask,
                               int64_t r) {
    float nq = p[r] * nd[r * nd_r], m = mask[r];
    return (1.0f - m) + nq * (1.0f - 2.0f * m);
}

/* The factors of regions r, r + Q, r + 2Q, r + 3Q multiplied in that order (numpy's). */
static inline float bce_product(const float *p, const float *nd, int64_t nd_r, const float *mask,
                                int64_t r, int64_t Q) {
    float prod = 1.0f;
    for (int k = 0; k < 4; k++) prod = prod * bce_factor(p, nd, nd_r, mask, r + k * Q);
    return prod;
}

/* PEAKVI's Bernoulli log-likelihood of one (sample, cell) row: the sum over regions of
 * log(factor), factor = q where accessible (mask 1), 1 - q elsewhere, q = p * (d f) given as
 * nq = p * ndf with ndf = -(d f) (region r's at nd[r * nd_r]: nd_r 0 without region factors).
 * As BernoulliScorer's numpy kernel: the factors of regions j, j + Q, j + 2Q, j + 3Q (Q = R / 4)
 * multiplied, one log per product, the last R % 4 one log each. *flag set where a product or a
 * last factor is at most FLT_MIN or not a number (a factor of 0 needs torch's clamp; a tiny
 * product has lost bits): the caller sums that row element by element. */
static inline double bce_row(const float *p, const float *nd, int64_t nd_r, const float *mask,
                             int64_t R, int *flag) {
    const int64_t Q = R / 4;
    double acc[LANES] = {0};
    int fl[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= Q; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float prod = bce_product(p, nd, nd_r, mask, j + l, Q);
            fl[l] |= !(prod > 1.17549435e-38f);
            acc[l] += (double)log_f(prod);
        }
    for (int l = 0; j + l < Q; l++) {
        float prod = bce_product(p, nd, nd_r, mask, j + l, Q);
        fl[l] |= !(prod > 1.17549435e-38f);
        acc[l] += (double)log_f(prod);
    }
    for (int64_t r = 4 * Q; r < R; r++) { /* the last R % 4 regions */
        float fac = bce_factor(p, nd, nd_r, mask, r);
        fl[0] |= !(fac > 1.17549435e-38f);
        acc[0] += (double)log_f(fac);
    }
    int64_t bad = 0;
    double tot = lanes_total(acc, fl, &bad);
    *flag = bad != 0;
    return tot;
}

/* Every (sample, cell) of px (laid out as mu above) into out. Cell c's -d is neg_d[c]; its
 * -(d f) per region is neg_d[c] * f[r] (f NULL: without region factors), the product numpy's
 * kernel forms; its accessible regions are cols[indptr[c] - indptr[0] ...] (the non-zero
 * entries). flags[s * out_s + c] as bce_row's. Returns the number of rows flagged, or -1
 * where a work row could not be allocated. */
CLONES
KERNEL_API
int64_t bce_rows(const float *px, int64_t S, int64_t n, int64_t R, int64_t px_s, int64_t px_c,
                 const float *neg_d, const float *f, const int64_t *indptr, const int64_t *cols,
                 double *out, int64_t out_s, int8_t *flags) {
    float *work = malloc(2 * (size_t)(R > 0 ? R : 1) * sizeof(float));
    if (work == NULL) return -1;
    float *mask = work, *nd = work + R;
    int64_t bad = 0;
    for (int64_t c = 0; c < n; c++) {
        for (int64_t r = 0; r < R; r++) mask[r] = 0.0f;
        for (int64_t k = indptr[c]; k < indptr[c + 1]; k++) mask[cols[k - indptr[0]]] = 1.0f;
        if (f != NULL)
            for (int64_t r = 0; r < R; r++) nd[r] = neg_d[c] * f[r];
        for (int64_t s = 0; s < S; s++) {
            int flag = 0;
            const float *p = px + s * px_s + c * px_c;
            out[s * out_s + c] = f != NULL ? bce_row(p, nd, 1, mask, R, &flag)
                                           : bce_row(p, neg_d + c, 0, mask, R, &flag);
            flags[s * out_s + c] = (int8_t)flag;
            bad += flag;
        }
    }
    free(work);
    return bad;
}

/* The uniforms of rng.normals (scvi_onnx.maths.rng, which specifies them and computes them in
 * numpy where this library is not built): SplitMix64's finaliser on counters, wrapping uint64
 * arithmetic, then u = ((bits >> 11) + 0.5) / 2^53 in double. Integer arithmetic and one
 * double addition and product, the same on every instruction set: numpy's bits exactly.
 * out[i * m + j] is draw start + j of cells[i], keyed by key (rng._key). */
static inline uint64_t splitmix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

CLONES
KERNEL_API
void splitmix_uniforms(uint64_t key, const uint64_t *cells, int64_t n, int64_t m,
                       uint64_t start, double *out) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t c = splitmix((cells[i] + golden) ^ key);
        double *o = out + i * m;
        for (int64_t j = 0; j < m; j++) {
            uint64_t bits = splitmix((c + (start + (uint64_t)j) * golden) ^ key);
            o[j] = ((double)(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
        }
    }
}
