/* The decode step's small ops (step.h), written once over a vector interface that the including file
   defines for its instruction set (decode.c: AVX-512, 16 lanes; decode_avx2.c: AVX2, 8 lanes):

     vf, VW (lanes), VPASS (vectors of head_dim per pass of attention's weighted sum)
     v_zero, v_set1, v_add, v_sub, v_mul, v_div, v_fma(a, b, c) = a * b + c, v_fnma(a, b, c) = c - a * b,
     v_min / v_max (x86: the second operand where either is NaN), v_max_n(m, x, n) (v_max in the first n
     lanes, m elsewhere), v_round (to nearest integer), v_exp2i(p, n) = p * 2^n for integral n,
     v_load / v_store (VW floats), v_load_n / v_store_n (the first n lanes; loads zero the rest),
     v_keep(v, n) (lanes past n zeroed),
     v_ld_bf16(p, n) / v_st_bf16(p, n, v) (the first n lanes of a bf16 row; the store rounds to nearest even),
     v_rnd (the value after a bf16 rounding), v_exp, v_sum / v_maxr (over lanes),
     v_hsum_block(v) (lane r = the sum of the lanes of v[r], r < VW)

   Every op rounds where the torch modules do, as step.c's comment says. */
#include <math.h>

#include "step.h"

/* e^x to about 1 ulp: 2^n * e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial. */
static inline vf v_exp(vf x) {
    x = v_max(v_set1(-104.0f), v_min(v_set1(89.0f), x)); /* NaN stays NaN */
    vf n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = v_fnma(n, v_set1(0.693145751953125f), x);
    r = v_fnma(n, v_set1(1.42860682030941723212e-6f), r);
    vf p = v_set1(1.0f / 5040);
    p = v_fma(p, r, v_set1(1.0f / 720));
    p = v_fma(p, r, v_set1(1.0f / 120));
    p = v_fma(p, r, v_set1(1.0f / 24));
    p = v_fma(p, r, v_set1(1.0f / 6));
    p = v_fma(p, r, v_set1(0.5f));
    p = v_fma(p, r, v_set1(1.0f));
    p = v_fma(p, r, v_set1(1.0f));
    return v_exp2i(p, n);
}

void step_rmsnorm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int n, float eps) {
    vf ss = v_zero();
    for (int i = 0; i < n; i += VW) {
        vf v = v_ld_bf16(x + i, n - i);
        ss = v_fma(v, v, ss);
    }
    vf inv = v_set1(1.0f / sqrtf(v_sum(ss) / (float)n + eps));
    for (int i = 0; i < n; i += VW)
        v_st_bf16(out + i, n - i, v_mul(v_ld_bf16(w + i, n - i), v_rnd(v_mul(v_ld_bf16(x + i, n - i), inv))));
}

void step_add_rows(uint16_t *x, const uint16_t *y, int n) {
    for (int i = 0; i < n; i += VW) v_st_bf16(x + i, n - i, v_add(v_ld_bf16(x + i, n - i), v_ld_bf16(y + i, n - i)));
}

/* RoPE of one head with rotate_half and torch's bf16 roundings: bf16(bf16(x cos) + bf16(rot(x) sin)).
   cs holds cos then sin for the D/2 frequencies (values already rounded to bf16). Writes bf16 to
   out16 or the rounded values in fp32 to out32 (the other NULL). */
static void rope_head(const uint16_t *x, const float *cs, int D, uint16_t *out16, float *out32) {
    const int half = D / 2;
    for (int i = 0; i < half; i += VW) {
        const int n = half - i;
        vf x1 = v_ld_bf16(x + i, n), x2 = v_ld_bf16(x + half + i, n);
        vf c = v_load_n(cs + i, n), s = v_load_n(cs + half + i, n);
        vf o1 = v_sub(v_rnd(v_mul(x1, c)), v_rnd(v_mul(x2, s)));
        vf o2 = v_add(v_rnd(v_mul(x2, c)), v_rnd(v_mul(x1, s)));
        if (out16) {
            v_st_bf16(out16 + i, n, o1);
            v_st_bf16(out16 + half + i, n, o2);
        } else {
            v_store_n(out32 + i, n, v_rnd(o1));
            v_store_n(out32 + half + i, n, v_rnd(o2));
        }
    }
}

void step_attend(const step_t *st, const uint16_t *qkv, uint16_t *kc, uint16_t *vc, const float *cs, int pos, int g,
                 uint16_t *att, attn_buf_t *ab, pf_cursor_t *pf) {
    const int hq = (int)st->heads, hk = (int)st->kv_heads, D = (int)st->head_dim, G = hq / hk;
    const int S = pos + 1, DP = ab->DP, nd = DP / VW;
    const float scale = 1.0f / sqrtf((float)D);
    rope_head(qkv + (size_t)(hq + g) * D, cs, D, kc + (size_t)pos * D, NULL);
    memcpy(vc + (size_t)pos * D, qkv + (size_t)(hq + hk + g) * D, (size_t)D * 2);
    for (int h = 0; h < G; h++) {
        memset(ab->q + (size_t)h * DP, 0, (size_t)DP * 4);
        rope_head(qkv + (size_t)(g * G + h) * D, cs, D, NULL, ab->q + (size_t)h * DP);
    }
    /* scores: VW keys at a time, widened once and dotted with every query head of the group */
    for (int j0 = 0; j0 < S; j0 += VW) {
        int cnt = S - j0 < VW ? S - j0 : VW;
        pf_step(pf, VW / 2);
        for (int r = 0; r < VW; r++)
            for (int d = 0; d < DP; d += VW)
                v_store(ab->kblk + (size_t)r * DP + d, r < cnt ? v_ld_bf16(kc + (size_t)(j0 + r) * D + d, D - d) : v_zero());
        for (int h = 0; h < G; h++) {
            const float *q = ab->q + (size_t)h * DP;
            vf acc[VW];
            for (int r = 0; r < VW; r++) {
                const float *k = ab->kblk + (size_t)r * DP;
                vf a = v_mul(v_load(q), v_load(k));
                for (int v = 1; v < nd; v++) a = v_fma(v_load(q + VW * v), v_load(k + VW * v), a);
                acc[r] = a;
            }
            v_store(ab->scores + (size_t)h * ab->SP + j0, v_mul(v_hsum_block(acc), v_set1(scale)));
        }
    }
    /* softmax numerators in place, rounded to bf16 for the weighted sum as SDPA's CPU kernel does (its sum
       is of the unrounded values); the division by the sum comes with the output */
    for (int h = 0; h < G; h++) {
        float *s = ab->scores + (size_t)h * ab->SP;
        vf m = v_set1(-INFINITY);
        for (int j = 0; j < S; j += VW) m = v_max_n(m, v_load(s + j), S - j);
        vf mx = v_set1(v_maxr(m)), sum = v_zero();
        for (int j = 0; j < S; j += VW) {
            vf e = v_keep(v_exp(v_sub(v_load(s + j), mx)), S - j);
            v_store(s + j, v_rnd(e));
            sum = v_add(sum, e);
        }
        ab->sums[h] = v_sum(sum);
    }
    /* weighted sum of values: HEAD_BLOCK heads x VPASS vectors of head_dim per pass over the values */
    for (int d0 = 0; d0 < DP; d0 += VPASS * VW) {
        int nv = (DP - d0) / VW < VPASS ? (DP - d0) / VW : VPASS;
        for (int h0 = 0; h0 < G; h0 += HEAD_BLOCK) {
            int nh = G - h0 < HEAD_BLOCK ? G - h0 : HEAD_BLOCK;
            vf acc[HEAD_BLOCK][VPASS];
            for (int h = 0; h < HEAD_BLOCK; h++)
                for (int v = 0; v < VPASS; v++) acc[h][v] = v_zero();
            for (int j = 0; j < S; j++) {
                vf vv[VPASS];
                if (!(j & 1)) pf_step(pf, 1);
                for (int v = 0; v < nv; v++) vv[v] = v_ld_bf16(vc + (size_t)j * D + d0 + VW * v, D - d0 - VW * v);
                for (int h = 0; h < nh; h++) {
                    vf p = v_set1(ab->scores[(size_t)(h0 + h) * ab->SP + j]);
                    for (int v = 0; v < nv; v++) acc[h][v] = v_fma(p, vv[v], acc[h][v]);
                }
            }
            for (int h = 0; h < nh; h++)
                for (int v = 0; v < nv; v++) {
                    int d = d0 + VW * v;
                    v_st_bf16(att + (size_t)(g * G + h0 + h) * D + d, D - d, v_div(acc[h][v], v_set1(ab->sums[h0 + h])));
                }
        }
    }
}

void step_silu_mul(const uint16_t *gu, uint16_t *act, int B, int I, int i0, int i1) {
    for (int b = 0; b < B; b++) {
        const uint16_t *g = gu + (size_t)b * 2 * I, *u = g + I;
        uint16_t *a = act + (size_t)b * I;
        for (int i = i0; i < i1; i += VW) {
            vf x = v_ld_bf16(g + i, i1 - i);
            vf e = v_exp(v_sub(v_zero(), x));
            vf s = v_rnd(v_div(x, v_add(v_set1(1.0f), e)));
            v_st_bf16(a + i, i1 - i, v_mul(s, v_ld_bf16(u + i, i1 - i)));
        }
    }
}
