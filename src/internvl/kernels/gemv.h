/* AVX-512 helpers shared by gemv.c, int4_q8.c and decode.c, over the job interface of job.h. The vector loops take up
   to VEC_M rows of x at once (more go in blocks over the same weights, then in L2); AMX tiles take all of
   them at once. */
#ifndef IVL_GEMV_H
#define IVL_GEMV_H

#include <math.h>

#include "job.h"

#define VEC_M 8  /* rows of x per pass of the AVX-512 loops (their accumulators fill the registers) */

/* int4 weights against int8 x (int4_q8.c): bytes of one prepared x row, x quantized into buf (M rows, KX bytes
   apart), and rows [n0, n1) for up to VEC_M rows of x. */
IVL_HIDDEN size_t q8_row_bytes(int K);
IVL_HIDDEN void q8_set_x(job_t *j, const void *x, char *buf);
IVL_HIDDEN void q8_rows(const job_t *j, int n0, int n1);

/* ---- small vector helpers shared by the kernels ---- */

/* Up to 16 fp32 values from a bf16 or fp32 x (masked: lanes past the end read as zero). */
static inline __m512 load_x16(const void *x, int xdt, size_t i, __mmask16 mk) {
    if (xdt == DT_BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + i)), 16));
    return _mm512_maskz_loadu_ps(mk, (const float *)x + i);
}

static inline __mmask16 mask16(int r) { return (__mmask16)(r >= 16 ? 0xffff : (r <= 0 ? 0 : (1u << r) - 1u)); }

/* Lane r of the result is the sum of the lanes of v[r] (a 16 x 16 transpose-and-add, ~45 instructions). */
static inline __m512 hsum16_ps(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xdd));
}

/* fp32 -> bf16, round to nearest even, NaN kept quiet (no AVX512-BF16 needed). */
static inline __m256i f32x16_to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* y[m, n0 : n0 + cnt] = v * scale + bias, for the 16-row tile starting at n0. */
static inline void finish_tile(const job_t *j, int n0, int cnt, int m, __m512 v) {
    __mmask16 mk = mask16(cnt);
    if (j->scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mk, j->scale + n0));
    if (j->bias) v = _mm512_add_ps(v, load_x16(j->bias, j->bdt, (size_t)n0, mk));
    size_t idx = (size_t)m * j->N + n0;
    if (j->ydt == DT_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)j->y + idx, mk, f32x16_to_bf16(v));
    else
        _mm512_mask_storeu_ps((float *)j->y + idx, mk, v);
}

/* out[m * TILE] = the sum of row m's NA accumulators acc[m * NA .. m * NA + NA): the end of a ROW of OVER_TILES. */
static inline __attribute__((always_inline)) void sum_accumulators(const int NM, const int NA, const __m512 *acc,
                                                                   __m512 *out) {
    for (int m = 0; m < NM; m++) {
        __m512 t = acc[m * NA];
        for (int i = 1; i < NA; i++) t = _mm512_add_ps(t, acc[m * NA + i]);
        out[m * TILE] = t;
    }
}

/* The frame of the AVX-512 fp32-accumulating row loops: rows [n0, n1) in tiles of TILE; ROW(NM, j, n, out) leaves
   row n's 16 partial sums against x row m in out[m * TILE]; rows past n1 are zero; each tile is summed and
   finished at once. */
#define OVER_TILES(ROW, NM, j, n0, n1)                                                               \
    do {                                                                                             \
        __m512 stash_[VEC_M][TILE];                                                                  \
        for (int t0_ = (n0); t0_ < (n1); t0_ += TILE) {                                              \
            int cnt_ = (n1) - t0_ < TILE ? (n1) - t0_ : TILE;                                        \
            for (int r_ = 0; r_ < TILE; r_++) {                                                      \
                if (r_ < cnt_) ROW(NM, j, t0_ + r_, &stash_[0][r_]);                                 \
                else for (int m_ = 0; m_ < NM; m_++) stash_[m_][r_] = _mm512_setzero_ps();          \
            }                                                                                        \
            for (int m_ = 0; m_ < NM; m_++) finish_tile(j, t0_, cnt_, m_, hsum16_ps(stash_[m_]));    \
        }                                                                                            \
    } while (0)

#endif
