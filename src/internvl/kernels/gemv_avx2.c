/* Weight-streaming matrix-vector kernels for CPUs with AVX2, FMA and F16C but no AVX-512 (most laptops and
   desktops, older servers): job.h's job_init, job_set_x and job_rows (team.c runs them, step.c chains them into
   the decode step), for bf16, int8 and int4 weights (quant.h), y[M,N] = x[M,K] @ W[N,K]^T (+ bias), M <= 16.

   Every product is exact and summed in fp32, as gemv.c's exact paths: bf16 weights become two fp32 with one
   shift (even elements) and one mask (odd elements) against x laid out as even and odd halves; int8 and int4
   weights are widened to fp32 in registers (int4 times its group's scale, exact too). The weights stream
   once: each thread takes a contiguous range of rows (team.c), and x rows go in blocks of 4 over each weight row
   while it is in L1. OP_INT8_FAST (16-bit x, VNNI) has no AVX2 form here and runs the exact int8 loop.
   OP_INT4_Q8 quantizes x to int8 per group of 32 instead and multiplies bytes (pmaddubsw), see int4_q8_row. */
#include <math.h>
#include <omp.h>

#include "job.h"

#define XB 4 /* x rows per pass over a weight row (accumulators fill the 16 registers) */
#define AVX2_PF_BYTES 4096
#define AI __attribute__((always_inline)) inline

int ivl_amx_available(void) { return 0; }
int ivl_set_amx_min_rows(int m) { (void)m; return 0; }

int ivl_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
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
    const int K = j->K, KH = j->KX, K32 = K & ~31;
    const uint16_t *w = (const uint16_t *)j->w + (size_t)n * K;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4 * XB]; /* (even, odd) x (two alternating sets) per x row */
    for (int i = 0; i < 4 * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int k = 0; k < K32; k += 32) {
        _mm_prefetch((const char *)(w + k) + AVX2_PF_BYTES, _MM_HINT_T0);
        for (int s = 0; s < 2; s++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + k + 16 * s));
            __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            for (int m = 0; m < NM; m++) {
                const float *xe = (const float *)j->x + (size_t)2 * (m0 + m) * KH + (k + 16 * s) / 2;
                __m256 *a = acc + 4 * m + 2 * s;
                a[0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe), a[0]);
                a[1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xe + KH), a[1]);
            }
        }
    }
    for (int m = 0; m < NM; m++) {
        const float *xe = (const float *)j->x + (size_t)2 * (m0 + m) * KH;
        float t = hsum8(_mm256_add_ps(_mm256_add_ps(acc[4 * m], acc[4 * m + 1]), _mm256_add_ps(acc[4 * m + 2], acc[4 * m + 3])));
        for (int k = K32; k < K; k++) t += q_bf16_to_f32(w[k]) * xe[(k & 1) * KH + k / 2];
        store_y(j, m0 + m, n, t);
    }
}

static inline __m256 i8x8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

/* 32 widened weights times 32 inputs at column k of each of the NM rows from m0, into NA accumulators a row. */
static AI void fma32(const int NM, const int NA, const job_t *j, int m0, size_t k, __m256 *acc, __m256 w0, __m256 w1,
                     __m256 w2, __m256 w3) {
    for (int m = 0; m < NM; m++) {
        const float *xm = (const float *)j->x + (size_t)(m0 + m) * j->K + k;
        __m256 *a = acc + NA * m;
        a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a[0]);
        a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a[1]);
        a[2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a[2 % NA]);
        a[3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a[3 % NA]);
    }
}

static AI void int8_row(const int NM, const job_t *j, int n, int m0) {
    const int K = j->K, K32 = K & ~31, NA = NM == 1 ? 4 : 2;
    const int8_t *q = (const int8_t *)j->w + (size_t)n * K;
    __m256 acc[2 * XB + 2];
    for (int i = 0; i < NA * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int k = 0; k < K32; k += 32) {
        if (!(k & 63)) _mm_prefetch((const char *)(q + k) + AVX2_PF_BYTES, _MM_HINT_T0);
        __m256 w0 = i8x8(q + k), w1 = i8x8(q + k + 8), w2 = i8x8(q + k + 16), w3 = i8x8(q + k + 24);
        fma32(NM, NA, j, m0, (size_t)k, acc, w0, w1, w2, w3);
    }
    for (int m = 0; m < NM; m++) {
        const float *xm = (const float *)j->x + (size_t)(m0 + m) * K;
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
        if (!(g & 3)) _mm_prefetch((const char *)(q + 16 * g) + AVX2_PF_BYTES, _MM_HINT_T0);
        __m128i b = _mm_loadu_si128((const __m128i *)(q + 16 * g));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(b, m4), c8), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m4), c8);
        __m256 d = _mm256_broadcast_ss(ds + g);
        __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d);
        __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d);
        __m256 w2 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d);
        __m256 w3 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d);
        fma32(NM, NA, j, m0, (size_t)g * QK4, acc, w0, w1, w2, w3);
    }
    for (int m = 0; m < NM; m++) {
        __m256 s = acc[NA * m];
        for (int i = 1; i < NA; i++) s = _mm256_add_ps(s, acc[NA * m + i]);
        store_y(j, m0 + m, n, hsum8(s));
    }
}

/* int4 against int8 x (OP_INT4_Q8, llama.cpp's Q4_0 x Q8_0): x quantized per group of 32 as int4_q8.c does
   (dx = max|x| / 127, q = round_half_even(x / dx) in [-127, 127]), laid out per row (KX bytes apart) in blocks of 2
   groups: the first 16 values of each then the last 16 of each, the order of the nibbles of 32 weight bytes; then
   fp32 dx[GP] and xs[GP] = -8 * dx * (sum of the group's q), zero past G. pmaddubsw multiplies the unsigned nibbles
   by q (|two products| <= 3810, no saturation), pmaddwd sums them into 4 int32 lanes per group, and one fp32
   multiply-add per 2 groups applies the weight scale times dx; the -8 of the nibbles is the xs dot. */
static inline int q8_groups(int K) { return round_up(K / QK4, 8); }
static inline int q8_kp(int K) { return round_up(K, 2 * QK4); }

static void q8_set_x(job_t *j, const void *x, char *buf) {
    const int K = j->K, G = K / QK4, GP = q8_groups(K), KP = q8_kp(K);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), nlim = _mm256_set1_epi32(-127);
    for (int m = 0; m < j->M; m++) {
        int8_t *xq = (int8_t *)(buf + (size_t)m * j->KX);
        float *dx = (float *)(xq + KP), *xs = dx + GP;
        memset(xq + (size_t)(G / 2) * 2 * QK4, 0, (size_t)(KP - G / 2 * 2 * QK4)); /* a half block's other group */
        for (int g = G; g < GP; g++) dx[g] = xs[g] = 0.0f;
        for (int g = 0; g < G; g++) {
            size_t base = (size_t)m * K + (size_t)g * QK4;
            __m256 v[4], mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                if (j->xdt == DT_BF16)
                    v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + base + 8 * i))), 16));
                else
                    v[i] = _mm256_loadu_ps((const float *)x + base + 8 * i);
                mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
            }
            float amax = hmax8(mx), d = _mm256_movemask_ps(nan) ? NAN : amax / 127.0f;
            __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f); /* NaN > 0 is false */
            __m256i q[4], sum = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) { /* |x * inv| <= 127 up to rounding: packs saturates to 127 above */
                q[i] = _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)), nlim);
                sum = _mm256_add_epi32(sum, q[i]);
            }
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            p = _mm256_permutevar8x32_epi32(p, order); /* packs interleaves 128-bit lanes: back to 0..31 */
            int8_t *dst = xq + (size_t)(g / 2) * 2 * QK4 + (g % 2) * 16;
            _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(p));
            _mm_storeu_si128((__m128i *)(dst + 32), _mm256_extracti128_si256(p, 1));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            dx[g] = d;
            xs[g] = -8.0f * d * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

/* The fp16 scales sc[g .. G) (fewer than 8) in the low lanes, zeros above, read without passing sc[G - 1] and without
   a store the prepass would then reload (a failed store-to-load forwarding costs as much as a block). */
static inline __m128i tail_scales(const uint16_t *sc, int g, int G) {
    if (G < 8) {
        _Alignas(16) uint16_t t[8] = {0};
        memcpy(t, sc + g, (size_t)(G - g) * 2);
        return _mm_load_si128((const __m128i *)t);
    }
    __m128i idx = _mm_add_epi8(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                               _mm_set1_epi8((char)(2 * (g - G + 8))));
    idx = _mm_or_si128(idx, _mm_cmpgt_epi8(idx, _mm_set1_epi8(15))); /* past the end: high bit, a zero byte */
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(sc + G - 8)), idx);
}

/* Block b (32 weight bytes, 2 groups) against NM rows of x from m0, into acc[NA * m]. */
static AI void q8_block(const int NM, const int NA, const job_t *j, int m0, __m256i wv, int b, const float *ds, int GP,
                        __m256 *acc) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), rep = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256i lo = _mm256_and_si256(wv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
    for (int m = 0; m < NM; m++) {
        const int8_t *xq = (const int8_t *)j->x + (size_t)(m0 + m) * j->KX + 64 * b;
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32))));
        __m256 sv = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_broadcast_sd((const double *)(ds + (size_t)m * GP + 2 * b))), rep);
        acc[NA * m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), sv, acc[NA * m]);
    }
}

/* One weight row: ds = weight scale * dx per group and x row, the xs dot into each x row's first accumulator, then
   the blocks in pairs into two accumulators per x row (a block-dependent index would keep them in memory). */
static AI void int4_q8_row(const int NM, const job_t *j, int n, int m0) {
    const int K = j->K, G = K / QK4, GP = q8_groups(K), KP = q8_kp(K), NA = NM <= 2 ? 2 : 1, full = G / 2;
    const uint8_t *q = (const uint8_t *)j->w + (size_t)n * (K / 2);
    const uint16_t *sc = j->gscale + (size_t)n * G;
    float ds[NM][GP];
    __m256 acc[2 * XB];
    for (int i = 0; i < NA * NM; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0; g < G; g += 8) {
        __m256 dw = _mm256_cvtph_ps(g + 8 <= G ? _mm_loadu_si128((const __m128i *)(sc + g)) : tail_scales(sc, g, G));
        for (int m = 0; m < NM; m++) {
            const float *dx = (const float *)((const char *)j->x + (size_t)(m0 + m) * j->KX + KP);
            _mm256_storeu_ps(ds[m] + g, _mm256_mul_ps(dw, _mm256_loadu_ps(dx + g)));
            acc[NA * m] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(dx + GP + g), acc[NA * m]);
        }
    }
    int b = 0;
    for (; b + 2 <= full; b += 2) {
        _mm_prefetch((const char *)(q + 32 * b) + AVX2_PF_BYTES, _MM_HINT_T0);
        q8_block(NM, NA, j, m0, _mm256_loadu_si256((const __m256i *)(q + 32 * b)), b, &ds[0][0], GP, acc);
        q8_block(NM, NA, j, m0, _mm256_loadu_si256((const __m256i *)(q + 32 * b + 32)), b + 1, &ds[0][0], GP, acc + NA - 1);
    }
    _mm_prefetch((const char *)(q + 32 * b) + AVX2_PF_BYTES, _MM_HINT_T0); /* the rest of the row: every line */
    if (b < full)
        q8_block(NM, NA, j, m0, _mm256_loadu_si256((const __m256i *)(q + 32 * b)), b, &ds[0][0], GP, acc), b++;
    if (G & 1) /* an odd last group: its 16 bytes, zeros against zero x and ds */
        q8_block(NM, NA, j, m0, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(q + 32 * b))), b, &ds[0][0], GP, acc);
    for (int m = 0; m < NM; m++)
        store_y(j, m0 + m, n, hsum8(NA == 2 ? _mm256_add_ps(acc[2 * m], acc[2 * m + 1]) : acc[m]));
}

#define BY_NM(F, nm, j, n, m0)                                                                          \
    switch (nm) {                                                                                       \
        case 1: F(1, j, n, m0); break; case 2: F(2, j, n, m0); break;                                   \
        case 3: F(3, j, n, m0); break; default: F(4, j, n, m0); break;                                  \
    }

void job_rows(const job_t *j, int n0, int n1) {
    for (int n = n0; n < n1; n++)
        for (int m0 = 0; m0 < j->M; m0 += XB) {
            int nm = j->M - m0 < XB ? j->M - m0 : XB;
            if (j->op == OP_BF16)
                BY_NM(bf16_row, nm, j, n, m0)
            else if (j->op == OP_INT4)
                BY_NM(int4_row, nm, j, n, m0)
            else if (j->op == OP_INT4_Q8)
                BY_NM(int4_q8_row, nm, j, n, m0)
            else
                BY_NM(int8_row, nm, j, n, m0)
        }
}

/* OP_INT8_FAST runs the exact int8 loop. Scratch: x in fp32, as even then odd halves (KX each) for bf16 W; the
   int8 rows of q8_set_x for OP_INT4_Q8. */
int job_init(job_t *j, int op, int xdt, int M, int K, const void *w, const float *scale, int N, const void *bias,
             int bdt, void *y, int ydt, int nthreads) {
    if (M < 1 || M > MAXM || K < 1 || N < 1 || (xdt != DT_F32 && xdt != DT_BF16) || op < OP_BF16 || op > OP_INT4_Q8)
        return 1;
    if (op == OP_INT8_FAST) op = OP_INT8;
    const int int4 = op == OP_INT4 || op == OP_INT4_Q8;
    if ((op != OP_BF16 && !scale) || (int4 && (K % QK4 || K > INT4_MAX_K))) return 1;
    memset(j, 0, sizeof *j);
    j->op = op, j->xdt = xdt, j->M = M, j->K = K, j->N = N, j->bdt = bdt, j->ydt = ydt;
    j->w = w, j->bias = bias, j->y = y;
    j->scale = op == OP_INT8 ? scale : NULL;
    j->gscale = int4 ? (const uint16_t *)scale : NULL;
    j->KX = op == OP_BF16 ? (K + 1) / 2 : (op == OP_INT4_Q8 ? q8_kp(K) + 8 * q8_groups(K) : K);
    j->vec_bytes = ((op == OP_INT4_Q8 ? (size_t)M * j->KX : (size_t)4 * M * (op == OP_BF16 ? 2 * j->KX : K)) + 63) / 64 * 64;
    j->row_bytes = int4 ? (size_t)K / 2 : (size_t)K * (op == OP_BF16 ? 2 : 1);
    job_split(j, nthreads, 1);
    return 0;
}

void job_set_x(job_t *j, const void *x, char *buf) {
    if (j->op == OP_INT4_Q8) {
        q8_set_x(j, x, buf);
        j->x = buf;
        return;
    }
    const int M = j->M, K = j->K, KH = j->KX;
    float *xb = (float *)buf;
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) {
            float v = x_at(x, j->xdt, (size_t)m * K + k);
            if (j->op == OP_BF16)
                xb[(size_t)2 * m * KH + (k & 1) * KH + k / 2] = v;
            else
                xb[(size_t)m * K + k] = v;
        }
    if (j->op == OP_BF16 && (K & 1))
        for (int m = 0; m < M; m++) xb[(size_t)2 * m * KH + 2 * KH - 1] = 0.0f;
    j->x = xb;
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
            _mm_prefetch(b + AVX2_PF_BYTES, _MM_HINT_T0);
            _mm_prefetch(b + AVX2_PF_BYTES + 64, _MM_HINT_T0);
            a0 = _mm256_add_ps(a0, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)b)));
            a1 = _mm256_add_ps(a1, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 32))));
            a2 = _mm256_add_ps(a2, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 64))));
            a3 = _mm256_add_ps(a3, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(b + 96))));
        }
        total += hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    return total;
}
