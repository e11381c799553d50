/* The AVX2 build of the decode step's small ops: step_ops.h over 8-lane vectors (AVX2 + FMA; masked
   tails through small stack copies, since AVX2 has no masked 16-bit loads). */
#include <immintrin.h>
#include <math.h>

#include "job.h"

typedef __m256 vf;
#define VW 8
#define VPASS 2 /* HEAD_BLOCK x VPASS accumulators and VPASS values in the 16 registers */
#define v_zero _mm256_setzero_ps
#define v_set1 _mm256_set1_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_min _mm256_min_ps
#define v_max _mm256_max_ps
#define v_fma _mm256_fmadd_ps
#define v_fnma _mm256_fnmadd_ps
#define v_load _mm256_load_ps
#define v_store _mm256_store_ps

static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf v_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_max_n(vf m, vf x, int n) {
    return _mm256_blendv_ps(m, _mm256_max_ps(m, x), _mm256_castsi256_ps(lanes_below(n)));
}
static inline vf v_load_n(const float *p, int n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes_below(n)); }
static inline void v_store_n(float *p, int n, vf v) {
    if (n >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, lanes_below(n), v);
}
static inline vf v_keep(vf v, int n) { return _mm256_and_ps(v, _mm256_castsi256_ps(lanes_below(n))); }

static inline vf v_ld_bf16(const uint16_t *p, int n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128((const __m128i *)p);
    } else {
        _Alignas(16) uint16_t t[8] = {0};
        memcpy(t, p, (size_t)(n > 0 ? n : 0) * 2);
        h = _mm_load_si128((const __m128i *)t);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/* fp32 bits rounded to the nearest even bf16 in their high half (NaN kept quiet), low half left as is. */
static inline __m256i bf16_bits(vf v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
static inline vf v_rnd(vf v) {
    return _mm256_castsi256_ps(_mm256_and_si256(bf16_bits(v), _mm256_set1_epi32((int)0xffff0000u)));
}
static inline void v_st_bf16(uint16_t *p, int n, vf v) {
    __m256i r = _mm256_srli_epi32(bf16_bits(v), 16);
    __m128i h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    if (n >= 8) {
        _mm_storeu_si128((__m128i *)p, h);
    } else if (n > 0) {
        _Alignas(16) uint16_t t[8];
        _mm_store_si128((__m128i *)t, h);
        memcpy(p, t, (size_t)n * 2);
    }
}
/* p * 2^n in two factors, so n down to -150 (denormal results) and up to 128 stay exact as scalef's. */
static inline vf v_exp2i(vf p, vf n) {
    __m256i i = _mm256_cvtps_epi32(n), i1 = _mm256_srai_epi32(i, 1), i2 = _mm256_sub_epi32(i, i1);
    vf f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(i1, _mm256_set1_epi32(127)), 23));
    vf f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(i2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}
static inline float v_sum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float v_maxr(vf v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
/* Lane r = the sum of the lanes of v[r]: pairwise horizontal adds, then the two 128-bit halves. */
static inline vf v_hsum_block(const vf *v) {
    vf u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    vf u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#include "step_ops.h"
