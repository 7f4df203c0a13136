/* fedgen's compiled site kernels: one site's logistic IRLS sums for a block of variants, and
 * (at the end of this file) the decoding of a VCF's fixed-width GT calls.
 *
 * The same sums as fedgen.stats.glm.site_logistic_partials (numpy), fused per variant so that
 * a sample's fitted value, weight and residual are computed once and reduced at once, instead
 * of a dozen passes over (variants x samples) float64 work arrays. Built as an optional
 * extension (setup.py) and loaded with ctypes (fedgen.stats.kernel); where it was not built,
 * the numpy kernel runs and gives the same sums up to the order of floating-point additions.
 *
 * No Python API is used: every function is plain C over caller-owned arrays, so ctypes
 * releases the GIL around a call and a site's threads run blocks in parallel.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* One build runs at each machine's speed: GCC/clang compile the kernel for several instruction
 * sets and pick one at load time (x86-64 v4 = AVX-512, v3 = AVX2 + FMA). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FEDGEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDGEN_CLONES
#endif

static inline double dot(const double *restrict a, const double *restrict b, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline double total(const double *restrict a, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i];
    return s;
}

/* e^x for x in [-708, 709] (clamped outside: the callers only form 1/(1 + e^x), where the clamp
 * changes a result below 1e-307), within a few ulp of libm's exp, written so that compilers
 * vectorise it: n = rint(x / ln 2), r = x - n ln 2 in two parts (fdlibm's split: n·LN2_HI is
 * exact), e^r on |r| <= ln 2/2 by its degree-13 Taylor polynomial (remainder < 5e-18), 2^n
 * through the exponent bits of n + 1.5·2^52. */
static inline double vexp(double x) {
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    const double nd = rint(x * 1.44269504088896338700e+00);
    const double r = (x - nd * 6.93147180369123816490e-01) - nd * 1.90821492927058770002e-10;
    double q = 1.0 / 6227020800.0;
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    const double t = nd + 6755399441055744.0; /* exact: nd is a whole number, |nd| < 2^51 */
    int64_t tb, sb;
    memcpy(&tb, &t, sizeof tb);
    sb = (tb - 0x4338000000000000LL + 1023) << 52; /* (n + 1023) << 52: 2^n */
    double scale;
    memcpy(&scale, &sb, sizeof scale);
    return q * scale;
}

/* Logistic IRLS sums of V variants at their own coefficients.
 *
 * g      (V, N) int8: A1 dosage 0/1/2, negative = missing
 * fill   (V) or NULL: with it a missing call takes its variant's value and every sample counts
 * y      (N): 0/1 case status
 * Ct     (k, N): covariates, one row per covariate
 * CC     (kk, N): products Ct[iu[j]] * Ct[ju[j]] over the upper triangle (kk = k(k+1)/2,
 *        numpy.triu_indices order)
 * iu, ju (kk): that triangle's indices
 * beta   (V, p), p = k + 2: [intercept, genotype, covariates...]
 * H      (V, p, p) out: X'WX, W = diag(M p(1-p))
 * grad   (V, p) out: X'M(p - y)
 * n      (V) out: samples used
 * neff   (V) out: Kish's effective n of the weights (Σw)²/Σw²
 * loglik (V) out or NULL: Σ M ln p(y)
 * work   (4N) scratch
 */
FEDGEN_CLONES void fedgen_logistic_sums(int64_t V, int64_t N, int64_t k, const int8_t *g, const double *fill,
                          const double *y, const double *Ct, const double *CC, const int64_t *iu,
                          const int64_t *ju, const double *beta, double *H, double *grad, int64_t *n,
                          double *neff, double *loglik, double *work) {
    const int64_t p = k + 2, kk = k * (k + 1) / 2;
    double *restrict w = work, *restrict r = work + N, *restrict gd = work + 2 * N, *restrict mk = work + 3 * N;
    for (int64_t v = 0; v < V; v++) {
        const int8_t *restrict gv = g + v * N;
        const double *b = beta + v * p;
        double *h = H + v * p * p, *gr = grad + v * p;
        /* the covariates' share of η, then the genotype's */
        for (int64_t i = 0; i < N; i++) w[i] = b[0];
        for (int64_t c = 0; c < k; c++) {
            const double bc = b[2 + c], *restrict ct = Ct + c * N;
            for (int64_t i = 0; i < N; i++) w[i] += bc * ct[i];
        }
        const double bg = b[1], fv = fill ? fill[v] : 0.0, mfill = fill ? 1.0 : 0.0;
        if (loglik) { /* Σ M ln p(y) = -Σ M log(1 + e^(∓η)), with libm, before w is overwritten */
            double ll = 0.0;
            for (int64_t i = 0; i < N; i++) {
                const int gi = gv[i];
                if (gi < 0 && !fill) continue;
                const double eta = w[i] + bg * (gi < 0 ? fv : (double)gi);
                const double t = y[i] > 0.5 ? -eta : eta;
                ll -= t > 0.0 ? t + log1p(exp(-t)) : log1p(exp(t));
            }
            loglik[v] = ll;
        }
        for (int64_t i = 0; i < N; i++) { /* the call, or the fill; m = 0 for a missing call */
            const int ok = gv[i] >= 0;
            mk[i] = ok ? 1.0 : mfill;
            gd[i] = ok ? (double)gv[i] : fv * mfill;
        }
        for (int64_t i = 0; i < N; i++) { /* branch-free: vectorised */
            const double m = mk[i];
            const double pr = 1.0 / (1.0 + vexp(-(w[i] + bg * gd[i])));
            w[i] = m * (pr * (1.0 - pr));
            r[i] = m * (pr - y[i]);
        }
        const double cnt = total(mk, N);
        const double sw = total(w, N), sww = dot(w, w, N);
        gr[0] = total(r, N);
        gr[1] = dot(r, gd, N);
        for (int64_t c = 0; c < k; c++) gr[2 + c] = dot(r, Ct + c * N, N);
        h[0] = sw;
        for (int64_t c = 0; c < k; c++) h[2 + c] = h[(2 + c) * p] = dot(w, Ct + c * N, N);
        for (int64_t j = 0; j < kk; j++) {
            const double s = dot(w, CC + j * N, N);
            h[(2 + iu[j]) * p + 2 + ju[j]] = h[(2 + ju[j]) * p + 2 + iu[j]] = s;
        }
        double swgg = 0.0;
#pragma omp simd reduction(+ : swgg)
        for (int64_t i = 0; i < N; i++) swgg += w[i] * gd[i] * gd[i];
        h[1] = h[p] = dot(w, gd, N);
        h[p + 1] = swgg;
        for (int64_t i = 0; i < N; i++) gd[i] *= w[i]; /* w g */
        for (int64_t c = 0; c < k; c++) h[p + 2 + c] = h[(2 + c) * p + 1] = dot(gd, Ct + c * N, N);
        n[v] = (int64_t)(cnt + 0.5);
        neff[v] = sww > 0.0 ? sw * sw / sww : 0.0;
    }
}

/* ------------------------------------------------------------------ VCF genotype calls
 *
 * fedgen.cohort.vcf.parse_records' fast path: records whose sample columns are all fixed-width
 * GT calls ("a/b" or "a|b", one character per allele, '.' missing, tab-separated). The same
 * decoding as its numpy code, in one pass: a record with any other call is flagged (row_ok 0),
 * left unwritten, and parsed by the general path.
 *
 * chunk   the decompressed text; record r's sample columns start at starts[r] and are 4n - 1
 *         bytes long (the caller checked both)
 * rows    first output row of record r; nalt[r] its ALT count: row rows[r] + j - 1 gets the
 *         copies of ALT j (the other ALTs count as REF, as `bcftools norm -m-any` splits)
 * dosage  (rows, n) int8 out: 0/1/2, -1 for a call with a missing allele
 */
static inline int allele_of(uint8_t c) { return c >= '0' && c <= '9' ? c - '0' : (c == '.' ? -1 : 99); }

void fedgen_decode_gt(const uint8_t *chunk, int64_t n_rec, int64_t n, const int64_t *starts, const int64_t *rows,
                      const int64_t *nalt, int8_t *dosage, uint8_t *row_ok) {
    for (int64_t r = 0; r < n_rec; r++) {
        const uint8_t *s = chunk + starts[r];
        const int64_t k = nalt[r];
        int ok = k >= 1;
        for (int64_t i = 0; i < n && ok; i++) {
            const uint8_t *c = s + 4 * i;
            ok = (c[1] == '/' || c[1] == '|') && (i == n - 1 || c[3] == '\t') && allele_of(c[0]) <= k
                 && allele_of(c[2]) <= k;
        }
        row_ok[r] = (uint8_t)ok;
        if (!ok) continue;
        for (int64_t j = 1; j <= k; j++) {
            int8_t *out = dosage + (rows[r] + j - 1) * n;
            for (int64_t i = 0; i < n; i++) {
                const int a0 = allele_of(s[4 * i]), a1 = allele_of(s[4 * i + 2]);
                out[i] = (a0 < 0 || a1 < 0) ? (int8_t)-1 : (int8_t)((a0 == j) + (a1 == j));
            }
        }
    }
}
