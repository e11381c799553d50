/* int4 weights (quant.h, llama.cpp's Q4_0) against x quantized to int8 per group of 32 (Q8_0-style), for AVX-512 VNNI:
   OP_INT4_Q8 of job.h. Widening every weight to fp32 made the int4 GEMV compute-bound (it ran at bf16's speed on
   a quarter of the bytes); here vpdpbusd multiplies 64 weight nibbles by 64 int8 x per instruction, and one fp32
   multiply-add per 4 groups applies the weight scale times the x scale, as llama.cpp's Q4_0 x Q8_0 dot does.

   x, per group g of 32: dx = max|x| / 127, q = round_half_even(x * (1 / dx)) in [-127, 127] (q = 0, dx = 0 for a
   zero group; NaN or inf in a group gives NaN outputs). The nibbles u in [0, 15] are the unsigned operand:
   sum (u - 8) * q = sum u * q - 8 * sum q, and the second term is one fp32 dot per row over the groups. */
#include "gemv.h"

#define BG 4 /* groups per block: 64 weight bytes, one zmm */

/* The prepared x of one row, RS = q8_row_bytes(K) bytes apart: int8 values in blocks of BG groups, each block the
   first 16 values of its groups in order then their last 16 (the order of the low and high nibbles of the block's
   weight bytes); then fp32 dx[GP] and fp32 xs[GP] = -8 * dx * (sum of the group's q), zero past G. */
static inline int padded_k(int K) { return round_up(K, BG * QK4); }
static inline int padded_g(int K) { return round_up(K / QK4, 16); }

size_t q8_row_bytes(int K) { return (size_t)padded_k(K) + (size_t)8 * padded_g(K); }

void q8_set_x(job_t *j, const void *x, char *buf) {
    const int K = j->K, G = K / QK4, GP = padded_g(K), KP = padded_k(K);
    for (int m = 0; m < j->M; m++) {
        int8_t *xq = (int8_t *)(buf + (size_t)m * j->KX);
        float *dx = (float *)(xq + KP), *xs = dx + GP;
        memset(xq + (size_t)(G / BG) * BG * QK4, 0, (size_t)(KP - G / BG * BG * QK4)); /* a part block's rest */
        for (int g = G; g < GP; g++) dx[g] = xs[g] = 0.0f;
        for (int g = 0; g < G; g++) {
            size_t base = (size_t)m * K + (size_t)g * QK4;
            __m512 a = load_x16(x, j->xdt, base, 0xffff), b = load_x16(x, j->xdt, base + 16, 0xffff);
            __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            float d = nan ? NAN : amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f; /* NaN > 0 is false */
            const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)));
            qa = _mm512_max_epi32(_mm512_min_epi32(qa, lim), nlim);
            qb = _mm512_max_epi32(_mm512_min_epi32(qb, lim), nlim);
            int8_t *p = xq + (size_t)(g / BG) * BG * QK4 + (g % BG) * 16;
            _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(p + BG * 16), _mm512_cvtepi32_epi8(qb));
            dx[g] = d;
            xs[g] = -8.0f * d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        }
    }
}

/* One block (64 weight bytes, BG groups) of a row against NM rows of x, into one accumulator per x row (acc[m * NA]):
   the int32 lanes of two vpdpbusd hold 4 lanes per group; their group's ds, repeated 4 times, scales them. */
static inline __attribute__((always_inline)) void block(const int NM, const int NA, const job_t *j, __m512i wv,
                                                        int b, float (*ds)[], int GP, __m512 *acc) {
    const __m512i m4 = _mm512_set1_epi8(15), rep = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
    for (int m = 0; m < NM; m++) {
        const int8_t *xq = (const int8_t *)j->x + (size_t)m * j->KX + (size_t)b * BG * QK4;
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xq));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512((const void *)(xq + 64)));
        /* a 16-byte load inside one of the prepass's 64-byte stores: forwarded, never stalled */
        const float *d = (const float *)ds + (size_t)m * GP + BG * b;
        __m512 sv = _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(_mm_loadu_ps(d)));
        acc[m * NA] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sv, acc[m * NA]);
    }
}

/* One row of W against NM rows of x (OVER_TILES runs the rows in tiles). The group scales are widened once and multiplied by
   each x row's dx (ds), and the -8 * sum q terms summed into that row's accumulator; blocks go in pairs into two
   accumulators per x row (registers: an index that changes with the block would keep them in memory). */
static inline __attribute__((always_inline)) void row(const int NM, const job_t *j, int n, __m512 *out) {
    const int K = j->K, G = K / QK4, GP = padded_g(K), KP = padded_k(K), RB = K / 2, NA = NM <= 4 ? 2 : 1;
    const int NB = KP / (BG * QK4), full = RB / 64;
    const char *xb = (const char *)j->x;
    float ds[NM][GP];
    const uint8_t *q = (const uint8_t *)j->w + (size_t)n * RB;
    const uint16_t *sc = j->gscale + (size_t)n * G;
    __m512 acc[2 * VEC_M];
    for (int i = 0; i < NM * NA; i++) acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < GP; g += 16) {
        __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(G - g), sc + g));
        for (int m = 0; m < NM; m++) {
            const float *dx = (const float *)(xb + (size_t)m * j->KX + KP);
            _mm512_storeu_ps(ds[m] + g, _mm512_mul_ps(dw, _mm512_loadu_ps(dx + g)));
            acc[m * NA] = _mm512_fmadd_ps(dw, _mm512_loadu_ps(dx + GP + g), acc[m * NA]);
        }
    }
    int b = 0;
    for (; b + 2 <= full; b += 2) {
        _mm_prefetch((const char *)(q + 64 * b) + PF_BYTES, PF_HINT);
        _mm_prefetch((const char *)(q + 64 * b) + PF_BYTES + 64, PF_HINT);
        block(NM, NA, j, _mm512_loadu_si512((const void *)(q + 64 * b)), b, ds, GP, acc);
        block(NM, NA, j, _mm512_loadu_si512((const void *)(q + 64 * b + 64)), b + 1, ds, GP, acc + NA - 1);
    }
    for (; b < NB; b++) { /* an odd last block, or 1 to 3 groups masked: zero bytes against zero x */
        int left = RB - 64 * b;
        _mm_prefetch((const char *)(q + 64 * b) + PF_BYTES, PF_HINT); /* a row's every line, or a miss */
        __m512i wv = _mm512_maskz_loadu_epi8(left >= 64 ? ~0ull : (1ull << left) - 1ull, (const void *)(q + 64 * b));
        block(NM, NA, j, wv, b, ds, GP, acc);
    }
    for (int m = 0; m < NM; m++) out[m * TILE] = NA == 2 ? _mm512_add_ps(acc[2 * m], acc[2 * m + 1]) : acc[m];
}

static inline __attribute__((always_inline)) void rows(const int NM, const job_t *j, int n0, int n1) {
    OVER_TILES(row, NM, j, n0, n1);
}

void q8_rows(const job_t *j, int n0, int n1) {
    switch (j->M) {
        case 1: rows(1, j, n0, n1); break; case 2: rows(2, j, n0, n1); break;
        case 3: rows(3, j, n0, n1); break; case 4: rows(4, j, n0, n1); break;
        case 5: rows(5, j, n0, n1); break; case 6: rows(6, j, n0, n1); break;
        case 7: rows(7, j, n0, n1); break; case 8: rows(8, j, n0, n1); break;
    }
}
