/* Weight-streaming matrix-vector kernels for CPUs with AVX2, FMA and F16C but no AVX-512 (most laptops and
   desktops, older servers): the same entry points and parameter block as gemv.c, for bf16, int8 and int4
   weights (quant.h), y[M,N] = x[M,K] @ W[N,K]^T (+ bias) for M <= 16.

   Every product is exact and summed in fp32, as gemv.c's exact paths: bf16 weights become two fp32 with one
   shift (even elements) and one mask (odd elements) against x laid out as even and odd halves; int8 and int4
   weights are widened to fp32 in registers (int4 times its group's scale, exact too). The weights stream
   once: each thread takes a contiguous range of rows, and x rows go in blocks of 4 over each weight row
   while it is in L1. OP_INT8_FAST (16-bit x, VNNI) has no AVX2 form here and runs the exact int8 loop. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

#define MAXM 16
#define XB 4                        /* x rows per pass over a weight row (accumulators fill the 16 registers) */
#define CHUNK_BYTES (64 * 1024)     /* of weights per unit of work */
#define MIN_PARALLEL_BYTES (96 * 1024)
#define PF_BYTES 4096
#define AI __attribute__((always_inline)) inline

enum { DT_F32 = 0, DT_BF16 = 1 };
enum { OP_BF16 = 0, OP_INT8 = 1, OP_INT8_FAST = 2, OP_INT4 = 3 };
enum { P_OP, P_X, P_XDT, P_M, P_K, P_W, P_SCALE, P_N, P_BIAS, P_BDT, P_Y, P_YDT, P_THREADS, P_COUNT };

int ivl_abi_version(void) { return 8; }
int ivl_param_count(void) { return P_COUNT; }
int ivl_amx_available(void) { return 0; }
int ivl_set_amx_min_rows(int m) { (void)m; return 0; }

int ivl_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

typedef struct {
    int op, M, K, N, KH, bdt, ydt;
    const float *x; /* bf16 W: per row, even then odd elements (KH each); else fp32 rows of K */
    const void *w, *bias;
    const float *scale;     /* int8 */
    const uint16_t *gscale; /* int4 */
    void *y;
} job_t;

static __thread void *scratch = NULL;
static __thread size_t scratch_bytes = 0;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_key_init(void) { pthread_key_create(&scratch_key, free); }

static void *scratch_get(size_t bytes) {
    if (bytes > scratch_bytes) {
        pthread_once(&scratch_once, scratch_key_init);
        free(scratch);
        scratch = aligned_alloc(64, (bytes + 63) / 64 * 64);
        scratch_bytes = scratch ? bytes : 0;
        pthread_setspecific(scratch_key, scratch);
    }
    return scratch;
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float x_at(const void *x, int xdt, size_t i) {
    return xdt == DT_BF16 ? q_bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static void store_y(const job_t *j, int m, int n, float v) {
    if (j->scale) v *= j->scale[n];
    if (j->bias) v += j->bdt == DT_BF16 ? q_bf16_to_f32(((const uint16_t *)j->bias)[n]) : ((const float *)j->bias)[n];
    size_t i = (size_t)m * j->N + n;
    if (j->ydt == DT_BF16)
        ((uint16_t *)j->y)[i] = q_f32_to_bf16(v);
    else
        ((float *)j->y)[i] = v;
}

/* ---- one weight row against NM (1..XB) rows of x; NM is a constant after inlining ---- */

static AI void bf16_row(const int NM, const job_t *j, int n, int m0) {
    const int K = j->K, KH = j->KH, K32 = K & ~31;
    const uint16_t *w = (const uint16_t *)j->w + (size_t)n * K;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4 * XB]; /* (even, odd) x (two alternating sets) per x row */
    for (int i = 0; i < 4 * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int k = 0; k < K32; k += 32) {
        _mm_prefetch((const char *)(w + k) + PF_BYTES, _MM_HINT_T0);
        for (int s = 0; s < 2; s++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + k + 16 * s));
            __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            for (int m = 0; m < NM; m++) {
                const float *xe = j->x + (size_t)2 * (m0 + m) * KH + (k + 16 * s) / 2;
                __m256 *a = acc + 4 * m + 2 * s;
                a[0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe), a[0]);
                a[1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xe + KH), a[1]);
            }
        }
    }
    for (int m = 0; m < NM; m++) {
        const float *xe = j->x + (size_t)2 * (m0 + m) * KH;
        float t = hsum8(_mm256_add_ps(_mm256_add_ps(acc[4 * m], acc[4 * m + 1]), _mm256_add_ps(acc[4 * m + 2], acc[4 * m + 3])));
        for (int k = K32; k < K; k++) t += q_bf16_to_f32(w[k]) * xe[(k & 1) * KH + k / 2];
        store_y(j, m0 + m, n, t);
    }
}

static inline __m256 i8x8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

static AI void int8_row(const int NM, const job_t *j, int n, int m0) {
    const int K = j->K, K32 = K & ~31, NA = NM == 1 ? 4 : 2;
    const int8_t *q = (const int8_t *)j->w + (size_t)n * K;
    __m256 acc[2 * XB + 2];
    for (int i = 0; i < NA * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int k = 0; k < K32; k += 32) {
        if (!(k & 63)) _mm_prefetch((const char *)(q + k) + PF_BYTES, _MM_HINT_T0);
        __m256 w0 = i8x8(q + k), w1 = i8x8(q + k + 8), w2 = i8x8(q + k + 16), w3 = i8x8(q + k + 24);
        for (int m = 0; m < NM; m++) {
            const float *xm = j->x + (size_t)(m0 + m) * K + k;
            __m256 *a = acc + NA * m;
            a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a[0]);
            a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a[1]);
            a[2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a[2 % NA]);
            a[3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a[3 % NA]);
        }
    }
    for (int m = 0; m < NM; m++) {
        const float *xm = j->x + (size_t)(m0 + m) * K;
        __m256 s = acc[NA * m];
        for (int i = 1; i < NA; i++) s = _mm256_add_ps(s, acc[NA * m + i]);
        float t = hsum8(s);
        for (int k = K32; k < K; k++) t += (float)q[k] * xm[k];
        store_y(j, m0 + m, n, t);
    }
}

/* int4: the 16 bytes of a group give elements 0..15 (low nibbles) and 16..31 (high), each u - 8 as int8,
   widened 8 at a time and multiplied by the group's scale (exact in fp32). */
static AI void int4_row(const int NM, const job_t *j, int n, int m0) {
    const int K = j->K, G = K / QK4, NA = NM == 1 ? 4 : 2;
    const uint8_t *q = (const uint8_t *)j->w + (size_t)n * (K / 2);
    const uint16_t *sc = j->gscale + (size_t)n * G;
    _Alignas(32) float ds[INT4_MAX_K / QK4 + 8];
    for (int g = 0; g < G; g += 8) {
        if (g + 8 <= G)
            _mm256_store_ps(ds + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g))));
        else
            for (int i = g; i < G; i++) ds[i] = _cvtsh_ss(sc[i]);
    }
    const __m128i m4 = _mm_set1_epi8(15), c8 = _mm_set1_epi8(8);
    __m256 acc[2 * XB + 2];
    for (int i = 0; i < NA * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        if (!(g & 3)) _mm_prefetch((const char *)(q + 16 * g) + PF_BYTES, _MM_HINT_T0);
        __m128i b = _mm_loadu_si128((const __m128i *)(q + 16 * g));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(b, m4), c8), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m4), c8);
        __m256 d = _mm256_broadcast_ss(ds + g);
        __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d);
        __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d);
        __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d);
        __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d);
        for (int m = 0; m < NM; m++) {
            const float *xm = j->x + (size_t)(m0 + m) * K + (size_t)g * QK4;
            __m256 *a = acc + NA * m;
            a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a[0]);
            a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a[1]);
            a[2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a[2 % NA]);
            a[3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a[3 % NA]);
        }
    }
    for (int m = 0; m < NM; m++) {
        __m256 s = acc[NA * m];
        for (int i = 1; i < NA; i++) s = _mm256_add_ps(s, acc[NA * m + i]);
        store_y(j, m0 + m, n, hsum8(s));
    }
}

#define BY_NM(F, nm, j, n, m0)                                                                          \
    switch (nm) {                                                                                       \
        case 1: F(1, j, n, m0); break; case 2: F(2, j, n, m0); break;                                   \
        case 3: F(3, j, n, m0); break; default: F(4, j, n, m0); break;                                  \
    }

static void do_rows(const job_t *j, int n0, int n1) {
    for (int n = n0; n < n1; n++)
        for (int m0 = 0; m0 < j->M; m0 += XB) {
            int nm = j->M - m0 < XB ? j->M - m0 : XB;
            if (j->op == OP_BF16)
                BY_NM(bf16_row, nm, j, n, m0)
            else if (j->op == OP_INT4)
                BY_NM(int4_row, nm, j, n, m0)
            else
                BY_NM(int8_row, nm, j, n, m0)
        }
}

/* p: int64 parameter block (see P_*). Returns 0 on success, nonzero when the caller must fall back. */
int ivl_run(const int64_t *p) {
    job_t j = {(int)p[P_OP], (int)p[P_M], (int)p[P_K], (int)p[P_N], 0, (int)p[P_BDT], (int)p[P_YDT], NULL,
               (const void *)(intptr_t)p[P_W], (const void *)(intptr_t)p[P_BIAS], NULL, NULL, (void *)(intptr_t)p[P_Y]};
    const int xdt = (int)p[P_XDT], M = j.M, K = j.K;
    const void *x = (const void *)(intptr_t)p[P_X];
    if (M < 1 || M > MAXM || K < 1 || j.N < 1 || (xdt != DT_F32 && xdt != DT_BF16) || j.op < 0 || j.op > OP_INT4)
        return 1;
    if (j.op != OP_BF16 && !p[P_SCALE]) return 1;
    if (j.op == OP_INT4 && (K % QK4 || K > INT4_MAX_K)) return 1;
    if (j.op == OP_INT4)
        j.gscale = (const uint16_t *)(intptr_t)p[P_SCALE];
    else if (j.op != OP_BF16)
        j.scale = (const float *)(intptr_t)p[P_SCALE];
    j.KH = (K + 1) / 2;
    float *xb = (float *)scratch_get((size_t)4 * M * (j.op == OP_BF16 ? 2 * j.KH : K) + 64);
    if (!xb) return 2;
    for (int m = 0; m < M; m++) /* bf16 W: even then odd elements; else the row as fp32 */
        for (int k = 0; k < K; k++) {
            float v = x_at(x, xdt, (size_t)m * K + k);
            if (j.op == OP_BF16)
                xb[(size_t)2 * m * j.KH + (k & 1) * j.KH + k / 2] = v;
            else
                xb[(size_t)m * K + k] = v;
        }
    if (j.op == OP_BF16 && (K & 1))
        for (int m = 0; m < M; m++) xb[(size_t)2 * m * j.KH + 2 * j.KH - 1] = 0.0f;
    j.x = xb;
    size_t row_bytes = j.op == OP_INT4 ? (size_t)K / 2 : (size_t)K * (j.op == OP_BF16 ? 2 : 1);
    int rpc = (int)(CHUNK_BYTES / row_bytes);
    rpc = rpc < 1 ? 1 : rpc;
    int nchunks = (j.N + rpc - 1) / rpc, nt = (int)p[P_THREADS];
    nt = row_bytes * j.N < MIN_PARALLEL_BYTES || nt < 1 ? 1 : (nt > nchunks ? nchunks : nt);
    if (nt == 1) {
        do_rows(&j, 0, j.N);
        return 0;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int c = 0; c < nchunks; c++) do_rows(&j, c * rpc, (c + 1) * rpc < j.N ? (c + 1) * rpc : j.N);
    return 0;
}

/* Greedy sampling: out[r] = the index of the first maximum of row r (bf16 or fp32, rows `ld` apart), or of
   its first NaN, as torch.argmax answers. */
int ivl_argmax_rows(const void *x, int64_t dt, int64_t rows, int64_t n, int64_t ld, int64_t *out, int64_t threads) {
    if (!x || !out || rows < 0 || n < 1 || ld < n || (dt != DT_F32 && dt != DT_BF16)) return 1;
#pragma omp parallel for num_threads(threads < 1 ? 1 : (int)threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t best = 0;
        float bv = x_at(x, (int)dt, (size_t)(r * ld));
        for (int64_t i = 1; i < n && !isnan(bv); i++) {
            float v = x_at(x, (int)dt, (size_t)(r * ld + i));
            if (v > bv || isnan(v)) best = i, bv = v;
        }
        out[r] = best;
    }
    return 0;
}

/* A pure read of a buffer with the kernels' threading: the bandwidth ceiling they are measured against. */
double ivl_read_pass(const void *p, size_t bytes, int nthreads) {
    double total = 0;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        size_t blocks = bytes / 128;
        const char *c = (const char *)p;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t l = blocks * t / T; l < blocks * (t + 1) / T; l++) {
            const char *b = c + l * 128;
            _mm_prefetch(b + PF_BYTES, _MM_HINT_T0);
            _mm_prefetch(b + PF_BYTES + 64, _MM_HINT_T0);
            a0 = _mm256_add_ps(a0, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)b)));
            a1 = _mm256_add_ps(a1, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 32))));
            a2 = _mm256_add_ps(a2, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 64))));
            a3 = _mm256_add_ps(a3, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 96))));
        }
        total += hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    return total;
}
