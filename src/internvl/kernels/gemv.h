/* AVX-512 helpers shared by gemv.c and decode.c, over the job interface of job.h. The vector loops take up
   to VEC_M rows of x at once (more go in blocks over the same weights, then in L2); AMX tiles take all of
   them at once. */
#ifndef IVL_GEMV_H
#define IVL_GEMV_H

#include "job.h"

#define VEC_M 8  /* rows of x per pass of the AVX-512 loops (their accumulators fill the registers) */

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

#endif
