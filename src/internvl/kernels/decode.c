/* The AVX-512 build of the decode step's small ops (step_ops.h over 16-lane vectors) and greedy sampling. */
#include <math.h>
#include <omp.h>

#include "gemv.h"

typedef __m512 vf;
#define VW 16
#define VPASS 4
#define v_zero _mm512_setzero_ps
#define v_set1 _mm512_set1_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_min _mm512_min_ps
#define v_max _mm512_max_ps
#define v_fma _mm512_fmadd_ps
#define v_fnma _mm512_fnmadd_ps
#define v_load _mm512_load_ps
#define v_store _mm512_store_ps
#define v_sum _mm512_reduce_add_ps
#define v_maxr _mm512_reduce_max_ps
#define v_hsum_block hsum16_ps
#define v_exp2i _mm512_scalef_ps
static inline vf v_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_max_n(vf m, vf x, int n) { return _mm512_mask_max_ps(m, mask16(n), m, x); }
static inline vf v_load_n(const float *p, int n) { return _mm512_maskz_loadu_ps(mask16(n), p); }
static inline void v_store_n(float *p, int n, vf v) { _mm512_mask_storeu_ps(p, mask16(n), v); }
static inline vf v_keep(vf v, int n) { return _mm512_maskz_mov_ps(mask16(n), v); }
static inline vf v_ld_bf16(const uint16_t *p, int n) { return load_x16(p, DT_BF16, 0, mask16(n)); }
static inline void v_st_bf16(uint16_t *p, int n, vf v) { _mm256_mask_storeu_epi16(p, mask16(n), f32x16_to_bf16(v)); }
static inline vf v_rnd(vf v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32x16_to_bf16(v)), 16));
}

#include "step_ops.h"

/* Greedy sampling for a batch: out[r] = the index of the first maximum of row r of x (bf16 or fp32,
   rows `ld` elements apart), or of its first NaN if it has one, as torch.argmax answers. torch's own
   argmax over a [16, 151674] bf16 batch takes milliseconds; this is one read of it. */
int ivl_argmax_rows(const void *x, int64_t dt, int64_t rows, int64_t n, int64_t ld, int64_t *out, int64_t threads) {
    if (!x || !out || rows < 0 || n < 1 || ld < n || (dt != DT_F32 && dt != DT_BF16)) return 1;
    const size_t esz = dt == DT_BF16 ? 2 : 4;
    const int T = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : (int)threads);
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + (size_t)r * ld * esz;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 mk = mask16((int)(n - i < 16 ? n - i : 16));
            __m512 v = load_x16(row, (int)dt, (size_t)i, mk);
            nan |= _mm512_mask_cmp_ps_mask(mk, v, v, _CMP_UNORD_Q);
            mx = _mm512_mask_max_ps(mx, mk, mx, v);
        }
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        int64_t found = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 mk = mask16((int)(n - i < 16 ? n - i : 16));
            __m512 v = load_x16(row, (int)dt, (size_t)i, mk);
            __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(mk, v, v, _CMP_UNORD_Q) : _mm512_mask_cmp_ps_mask(mk, v, m, _CMP_EQ_OQ);
            if (hit) {
                found = i + __builtin_ctz((unsigned)hit);
                break;
            }
        }
        out[r] = found;
    }
    return 0;
}
