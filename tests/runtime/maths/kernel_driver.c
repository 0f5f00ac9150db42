/* A command-line driver for runtime/maths/_kernels.c, for the test that builds the kernel with
 * other compilers and for other architectures (tests/runtime/maths/test_native.py): where no
 * Python of that build can load the library (an aarch64 build run under qemu), this program
 * calls its four functions on inputs read from a file and writes their outputs to another.
 *
 *     kernel_driver IN OUT
 *
 * IN, native byte order, in this order: int64 S, n, G, R, cells, m; float32 mu[S n G],
 * pi[S n G], inv[G], theta[G], inv_cell[n G], theta_cell[n G], x[n G], px[S n R], neg_d[n],
 * f[R]; int64 indptr[n + 1], cols[indptr[n] - indptr[0]]; uint64 key, start, cell ids[cells].
 * NB runs with the per-gene theta, ZINB with the per-cell one.
 * OUT: float64 nb[S n], zinb[S n], bce[S n]; int8 flags[S n]; int64 the three functions'
 * returns; float64 uniforms[cells m]. Exit status 0, or 2 on a short read or a failed write.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int64_t nb_rows(const float *mu, int64_t S, int64_t n, int64_t G, int64_t mu_s, int64_t mu_c,
                const float *inv, const float *theta, int64_t th_c, const float *x, float eps,
                double *out, int64_t out_s);
int64_t zinb_rows(const float *mu, const float *pi, int64_t S, int64_t n, int64_t G,
                  int64_t mu_s, int64_t mu_c, const float *inv, const float *theta, int64_t th_c,
                  const float *x, float eps, double *out, int64_t out_s);
int64_t bce_rows(const float *px, int64_t S, int64_t n, int64_t R, int64_t px_s, int64_t px_c,
                 const float *neg_d, const float *f, const int64_t *indptr, const int64_t *cols,
                 double *out, int64_t out_s, int8_t *flags);
void splitmix_uniforms(uint64_t key, const uint64_t *cells, int64_t n, int64_t m,
                       uint64_t start, double *out);

static FILE *in;

/* count items of size bytes read from IN into a new buffer (exit 2 if IN is short) */
static void *take(size_t count, size_t size) {
    void *p = malloc(count * size + 1);
    if (p == NULL || fread(p, size, count, in) != count) {
        fprintf(stderr, "kernel_driver: short input\n");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3 || (in = fopen(argv[1], "rb")) == NULL) {
        fprintf(stderr, "usage: kernel_driver IN OUT\n");
        return 2;
    }
    int64_t *h = take(6, sizeof(int64_t));
    const int64_t S = h[0], n = h[1], G = h[2], R = h[3], cells = h[4], m = h[5];
    const size_t sng = (size_t)(S * n * G), ng = (size_t)(n * G), snr = (size_t)(S * n * R);
    float *mu = take(sng, 4), *pi = take(sng, 4), *inv = take(G, 4), *theta = take(G, 4);
    float *inv_cell = take(ng, 4), *theta_cell = take(ng, 4), *x = take(ng, 4);
    float *px = take(snr, 4), *neg_d = take(n, 4), *f = take(R, 4);
    int64_t *indptr = take(n + 1, sizeof(int64_t));
    int64_t *cols = take(indptr[n] - indptr[0], sizeof(int64_t));
    uint64_t *ks = take(2, sizeof(uint64_t)), *ids = take(cells, sizeof(uint64_t));
    fclose(in);

    const size_t sn = (size_t)(S * n);
    double *nb = malloc(sn * 8 + 8), *zinb = malloc(sn * 8 + 8), *bce = malloc(sn * 8 + 8);
    double *u = malloc((size_t)(cells * m) * 8 + 8);
    int8_t *flags = calloc(sn + 1, 1);
    int64_t ret[3];
    ret[0] = nb_rows(mu, S, n, G, n * G, G, inv, theta, 0, x, 1e-8f, nb, n);
    ret[1] = zinb_rows(mu, pi, S, n, G, n * G, G, inv_cell, theta_cell, G, x, 1e-8f, zinb, n);
    ret[2] = bce_rows(px, S, n, R, n * R, R, neg_d, f, indptr, cols, bce, n, flags);
    splitmix_uniforms(ks[0], ids, cells, m, ks[1], u);

    FILE *out = fopen(argv[2], "wb");
    int ok = out != NULL && fwrite(nb, 8, sn, out) == sn && fwrite(zinb, 8, sn, out) == sn &&
             fwrite(bce, 8, sn, out) == sn && fwrite(flags, 1, sn, out) == sn &&
             fwrite(ret, 8, 3, out) == 3 &&
             fwrite(u, 8, (size_t)(cells * m), out) == (size_t)(cells * m);
    if (out == NULL || fclose(out) != 0 || !ok) {
        fprintf(stderr, "kernel_driver: cannot write %s\n", argv[2]);
        return 2;
    }
    return 0;
}
