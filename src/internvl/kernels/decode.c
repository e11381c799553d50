/* One decoding step of a Qwen2/Llama-style decoder (RMSNorm, fused q/k/v with RoPE, grouped-query
   attention over a KV cache, fused gate/up SwiGLU, final norm and lm_head) in a single call.

   Decoding reads every weight once per token; between the weight streams a layer runs a dozen small
   ops on a few kilobytes. Run from Python, each small op costs tens of microseconds because the weight
   stream has just evicted the interpreter and its data from the caches. Here one OpenMP team runs the
   whole step: the GEMVs of gemv.c split among the threads, the small ops in between on hot data, a
   barrier after each phase, and each thread prefetching the head of its next weight range before it
   waits, so the memory stream barely pauses.

   Activations are bf16 between ops and every op rounds where the torch modules do (norm output, norm
   weight product, RoPE terms, SiLU, its product with up, residual adds), computing in fp32 inside;
   attention keeps fp32 scores, rounds the softmax numerators to bf16 for the product with the values
   (as SDPA's CPU flash kernel does) and rounds its output. */
#include <math.h>
#include <omp.h>

#include "gemv.h"

/* Layouts shared with kernels/decode.py (ctypes structures of int64 and double fields). */
typedef struct {
    int64_t w, scale, bias, bias_dt, op, n, k; /* op: OP_*; bias 0 or [n] of dtype bias_dt */
} lin_t;

typedef struct {
    int64_t ln1, ln2; /* bf16 [hidden] RMSNorm weights */
    lin_t qkv, o, gate_up, down;
} layer_t;

typedef struct {
    /* per call */
    int64_t batch, capacity, threads;
    int64_t x;                /* bf16 [batch, hidden]: embeddings of the new tokens */
    int64_t lengths;          /* int64 [batch]: tokens already cached per row = position of the new one */
    int64_t inv_freq;         /* fp32 [head_dim / 2] */
    int64_t k_cache, v_cache; /* int64 [layers]: bf16 [batch, kv_heads, capacity, head_dim] per layer */
    int64_t logits;           /* bf16 [batch, head.n] out */
    int64_t advance;          /* int64 [batch] added to lengths at the end (0: one each) */
    /* per model */
    int64_t hidden, layers, heads, kv_heads, head_dim, inter;
    double eps, pos_div; /* RMSNorm epsilon; positions are divided by pos_div (linear RoPE scaling) */
    int64_t layer_table; /* layer_t [layers] */
    int64_t norm;        /* bf16 [hidden] final RMSNorm weight */
    lin_t head;
} step_t;

enum { J_QKV, J_O, J_GATE_UP, J_DOWN, J_HEAD, J_COUNT };
#define MAX_HEAD_DIM 512
#define HEAD_BLOCK 4 /* query heads accumulated together in attention's weighted sum of values */
#ifndef HEAD_LINES
#define HEAD_LINES 128 /* lines of the next weights prefetched before a barrier */
#endif
#ifndef ATTN_PREFETCH_BYTES
#define ATTN_PREFETCH_BYTES (192 * 1024) /* of o_proj, fetched into L2 while attention computes */
#endif

static inline __m512 ld_bf16(const uint16_t *p, __mmask16 mk) { return load_x16(p, DT_BF16, 0, mk); }
static inline void st_bf16(uint16_t *p, __mmask16 mk, __m512 v) {
    _mm256_mask_storeu_epi16(p, mk, f32x16_to_bf16(v));
}
/* The value torch holds after rounding an fp32 result to bf16. */
static inline __m512 rnd(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32x16_to_bf16(v)), 16));
}
static inline float rnd1(float v) {
    _Alignas(64) float f[16];
    _mm512_store_ps(f, rnd(_mm512_set1_ps(v)));
    return f[0];
}

/* e^x to about 1 ulp: 2^n * e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x)); /* NaN stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* ---- the small ops, one row at a time ---- */

/* out = bf16(w * bf16(x / sqrt(mean(x^2) + eps))), as RMSNorm computes it in fp32 then the input dtype. */
static void rmsnorm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int n, float eps) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = ld_bf16(x + i, mask16(n - i));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps));
    for (int i = 0; i < n; i += 16) {
        __mmask16 mk = mask16(n - i);
        st_bf16(out + i, mk, _mm512_mul_ps(ld_bf16(w + i, mk), rnd(_mm512_mul_ps(ld_bf16(x + i, mk), inv))));
    }
}

static void add_rows(uint16_t *x, const uint16_t *y, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 mk = mask16(n - i);
        st_bf16(x + i, mk, _mm512_add_ps(ld_bf16(x + i, mk), ld_bf16(y + i, mk)));
    }
}

/* RoPE of one head with rotate_half and torch's bf16 roundings: bf16(bf16(x cos) + bf16(rot(x) sin)).
   cs holds cos then sin for the D/2 frequencies (values already rounded to bf16). Writes bf16 to
   out16 or the rounded values in fp32 to out32 (the other NULL). */
static void rope_head(const uint16_t *x, const float *cs, int D, uint16_t *out16, float *out32) {
    const int half = D / 2;
    for (int i = 0; i < half; i += 16) {
        __mmask16 mk = mask16(half - i);
        __m512 x1 = ld_bf16(x + i, mk), x2 = ld_bf16(x + half + i, mk);
        __m512 c = _mm512_maskz_loadu_ps(mk, cs + i), s = _mm512_maskz_loadu_ps(mk, cs + half + i);
        __m512 o1 = _mm512_sub_ps(rnd(_mm512_mul_ps(x1, c)), rnd(_mm512_mul_ps(x2, s)));
        __m512 o2 = _mm512_add_ps(rnd(_mm512_mul_ps(x2, c)), rnd(_mm512_mul_ps(x1, s)));
        if (out16) {
            st_bf16(out16 + i, mk, o1);
            st_bf16(out16 + half + i, mk, o2);
        } else {
            _mm512_mask_storeu_ps(out32 + i, mk, rnd(o1));
            _mm512_mask_storeu_ps(out32 + half + i, mk, rnd(o2));
        }
    }
}

/* Per-thread attention scratch: query heads of one group in fp32 (DP = head_dim padded to 16), one
   16-position block of keys in fp32, and the scores of each query head (SP = positions padded to 16). */
typedef struct {
    float *q, *kblk, *scores, *sums;
    int DP, SP;
} attn_buf_t;

/* One row b and KV head g: rotate and store the new key/value at the row's position, then attention of
   the group's query heads over positions 0..pos, written to att (bf16 [heads * D] of row b). */
static void attend(const step_t *st, const uint16_t *qkv, uint16_t *kc, uint16_t *vc, const float *cs, int pos,
                   int g, uint16_t *att, attn_buf_t *ab, pf_cursor_t *pf) {
    const int hq = (int)st->heads, hk = (int)st->kv_heads, D = (int)st->head_dim, G = hq / hk;
    const int S = pos + 1, DP = ab->DP, nd = DP / 16;
    const float scale = 1.0f / sqrtf((float)D);
    rope_head(qkv + (size_t)(hq + g) * D, cs, D, kc + (size_t)pos * D, NULL);
    memcpy(vc + (size_t)pos * D, qkv + (size_t)(hq + hk + g) * D, (size_t)D * 2);
    for (int h = 0; h < G; h++) {
        memset(ab->q + (size_t)h * DP, 0, (size_t)DP * 4);
        rope_head(qkv + (size_t)(g * G + h) * D, cs, D, NULL, ab->q + (size_t)h * DP);
    }
    /* scores: 16 keys at a time, widened once and dotted with every query head of the group */
    for (int j0 = 0; j0 < S; j0 += 16) {
        int cnt = S - j0 < 16 ? S - j0 : 16;
        pf_step(pf, 8);
        for (int r = 0; r < 16; r++)
            for (int d = 0; d < DP; d += 16)
                _mm512_store_ps(ab->kblk + (size_t)r * DP + d,
                                r < cnt ? ld_bf16(kc + (size_t)(j0 + r) * D + d, mask16(D - d)) : _mm512_setzero_ps());
        for (int h = 0; h < G; h++) {
            const float *q = ab->q + (size_t)h * DP;
            __m512 acc[16];
            for (int r = 0; r < 16; r++) {
                const float *k = ab->kblk + (size_t)r * DP;
                __m512 a = _mm512_mul_ps(_mm512_load_ps(q), _mm512_load_ps(k));
                for (int v = 1; v < nd; v++)
                    a = _mm512_fmadd_ps(_mm512_load_ps(q + 16 * v), _mm512_load_ps(k + 16 * v), a);
                acc[r] = a;
            }
            _mm512_store_ps(ab->scores + (size_t)h * ab->SP + j0, _mm512_mul_ps(hsum16_ps(acc), _mm512_set1_ps(scale)));
        }
    }
    /* softmax numerators in place, rounded to bf16 for the weighted sum as SDPA's CPU kernel does (its sum
       is of the unrounded values); the division by the sum comes with the output */
    for (int h = 0; h < G; h++) {
        float *s = ab->scores + (size_t)h * ab->SP;
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < S; j += 16) m = _mm512_mask_max_ps(m, mask16(S - j), m, _mm512_load_ps(s + j));
        __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sum = _mm512_setzero_ps();
        for (int j = 0; j < S; j += 16) {
            __mmask16 mk = mask16(S - j);
            __m512 e = _mm512_maskz_mov_ps(mk, exp_ps(_mm512_sub_ps(_mm512_load_ps(s + j), mx)));
            _mm512_store_ps(s + j, rnd(e));
            sum = _mm512_add_ps(sum, e);
        }
        ab->sums[h] = _mm512_reduce_add_ps(sum);
    }
    /* weighted sum of values: HEAD_BLOCK heads x 4 vectors of head_dim per pass over the values */
    for (int d0 = 0; d0 < DP; d0 += 64) {
        int nv = (DP - d0) / 16 < 4 ? (DP - d0) / 16 : 4;
        for (int h0 = 0; h0 < G; h0 += HEAD_BLOCK) {
            int nh = G - h0 < HEAD_BLOCK ? G - h0 : HEAD_BLOCK;
            __m512 acc[HEAD_BLOCK][4];
            for (int h = 0; h < HEAD_BLOCK; h++)
                for (int v = 0; v < 4; v++) acc[h][v] = _mm512_setzero_ps();
            for (int j = 0; j < S; j++) {
                __m512 vv[4];
                if (!(j & 1)) pf_step(pf, 1);
                for (int v = 0; v < nv; v++) vv[v] = ld_bf16(vc + (size_t)j * D + d0 + 16 * v, mask16(D - d0 - 16 * v));
                for (int h = 0; h < nh; h++) {
                    __m512 p = _mm512_set1_ps(ab->scores[(size_t)(h0 + h) * ab->SP + j]);
                    for (int v = 0; v < nv; v++) acc[h][v] = _mm512_fmadd_ps(p, vv[v], acc[h][v]);
                }
            }
            for (int h = 0; h < nh; h++)
                for (int v = 0; v < nv; v++) {
                    int d = d0 + 16 * v;
                    st_bf16(att + (size_t)(g * G + h0 + h) * D + d, mask16(D - d),
                            _mm512_div_ps(acc[h][v], _mm512_set1_ps(ab->sums[h0 + h])));
                }
        }
    }
}

/* act = bf16(bf16(silu(gate)) * up) for columns [i0, i1) of every row; gate_up rows are [gate | up]. */
static void silu_mul(const uint16_t *gu, uint16_t *act, int B, int I, int i0, int i1) {
    for (int b = 0; b < B; b++) {
        const uint16_t *g = gu + (size_t)b * 2 * I, *u = g + I;
        uint16_t *a = act + (size_t)b * I;
        for (int i = i0; i < i1; i += 16) {
            __mmask16 mk = mask16(i1 - i);
            __m512 x = ld_bf16(g + i, mk);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
            __m512 s = rnd(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            st_bf16(a + i, mk, _mm512_mul_ps(s, ld_bf16(u + i, mk)));
        }
    }
}

/* Burst-prefetch the start of thread t's part of a job before it waits at a barrier. */
static inline void prefetch_head(const job_t *j, int t) {
    pf_cursor_t c = job_head(j, t, HEAD_LINES * 64);
    pf_step(&c, HEAD_LINES);
}

static int lin_job(job_t *j, const lin_t *l, int B, void *y, int nthreads) {
    return job_init(j, (int)l->op, DT_BF16, B, (int)l->k, (const void *)(intptr_t)l->w,
                    (const float *)(intptr_t)l->scale, (int)l->n, (const void *)(intptr_t)l->bias,
                    (int)l->bias_dt, y, DT_BF16, nthreads);
}

static inline char *carve(char **p, size_t bytes) {
    char *r = *p;
    *p += (bytes + 63) / 64 * 64;
    return r;
}

/* Returns 0 on success; nonzero (nothing written, the caller runs its own path) for invalid input. */
int ivl_decode_step(const step_t *st) {
    const int B = (int)st->batch, H = (int)st->hidden, L = (int)st->layers, hq = (int)st->heads;
    const int hk = (int)st->kv_heads, D = (int)st->head_dim, I = (int)st->inter, cap = (int)st->capacity;
    const layer_t *layers = (const layer_t *)(intptr_t)st->layer_table;
    const int64_t *lengths = (const int64_t *)(intptr_t)st->lengths;
    const int64_t *kcs = (const int64_t *)(intptr_t)st->k_cache, *vcs = (const int64_t *)(intptr_t)st->v_cache;
    const int QKV = (hq + 2 * hk) * D;
    if (B < 1 || B > MAXM || H < 1 || L < 0 || hk < 1 || hq < 1 || hq % hk || D < 2 || D % 2 || D > MAX_HEAD_DIM ||
        I < 1 || cap < 1 || !st->x || !lengths || !st->inv_freq || !st->norm || !st->logits || !st->head.w ||
        st->head.k != H || (L && (!layers || !kcs || !vcs)))
        return 1;
    int max_len = 0;
    for (int b = 0; b < B; b++) {
        if (lengths[b] < 0 || lengths[b] >= cap) return 1;
        if (lengths[b] > max_len) max_len = (int)lengths[b];
    }
    int T = st->threads < 1 ? 1 : (st->threads > MAX_THREADS ? MAX_THREADS : (int)st->threads);
    /* Check every layer and size the per-thread x scratch for the largest job. */
    job_t probe;
    size_t xbytes = 0;
    for (int l = 0; l <= L; l++) {
        const lin_t *ls[4] = {&st->head, NULL, NULL, NULL};
        if (l < L) {
            const layer_t *ly = &layers[l];
            if (!ly->ln1 || !ly->ln2 || !kcs[l] || !vcs[l] || ly->qkv.k != H || ly->qkv.n != QKV ||
                ly->o.k != (int64_t)hq * D || ly->o.n != H || ly->gate_up.k != H || ly->gate_up.n != 2 * (int64_t)I ||
                ly->down.k != I || ly->down.n != H)
                return 1;
            ls[0] = &ly->qkv, ls[1] = &ly->o, ls[2] = &ly->gate_up, ls[3] = &ly->down;
        }
        for (int i = 0; i < 4 && ls[i]; i++) {
            if (lin_job(&probe, ls[i], B, (void *)1, T)) return 1;
            size_t need = job_scratch_bytes(&probe);
            if (need > xbytes) xbytes = need;
        }
    }
    /* Workspace: activations, RoPE tables, ranges, then per thread x scratch and attention buffers. */
    const int G = hq / hk, DP = round_up(D, 16), SP = round_up(max_len + 1, 16);
    size_t attn_bytes = ((size_t)G * DP + (size_t)16 * DP + (size_t)G * SP + G) * 4 + 4 * 64;
    size_t per_thread = (xbytes + 63) / 64 * 64 + (attn_bytes + 63) / 64 * 64;
    size_t shared = ((size_t)B * H * 2 + 63) / 64 * 64 * 3 + ((size_t)B * QKV * 2 + 63) / 64 * 64 +
                    ((size_t)B * hq * D * 2 + 63) / 64 * 64 + ((size_t)B * 2 * I * 2 + 63) / 64 * 64 +
                    ((size_t)B * I * 2 + 63) / 64 * 64 + ((size_t)B * D * 4 + 63) / 64 * 64 +
                    (size_t)J_COUNT * T * sizeof(range_t);
    char *ws = (char *)scratch_get(shared + per_thread * T + 64);
    if (!ws) return 2;
    char *p = ws;
    uint16_t *xr = (uint16_t *)carve(&p, (size_t)B * H * 2), *h = (uint16_t *)carve(&p, (size_t)B * H * 2);
    uint16_t *y = (uint16_t *)carve(&p, (size_t)B * H * 2), *qkv = (uint16_t *)carve(&p, (size_t)B * QKV * 2);
    uint16_t *att = (uint16_t *)carve(&p, (size_t)B * hq * D * 2), *gu = (uint16_t *)carve(&p, (size_t)B * 2 * I * 2);
    uint16_t *act = (uint16_t *)carve(&p, (size_t)B * I * 2);
    float *cs = (float *)carve(&p, (size_t)B * D * 4);
    range_t *ranges = (range_t *)carve(&p, (size_t)J_COUNT * T * sizeof(range_t));
    char *thread_area = p;

    memcpy(xr, (const void *)(intptr_t)st->x, (size_t)B * H * 2);
    /* cos and sin of each row's position, rounded to bf16 as the torch path's tables are */
    const float *inv_freq = (const float *)(intptr_t)st->inv_freq;
    for (int b = 0; b < B; b++) {
        float pos = (float)lengths[b];
        if (st->pos_div != 1.0) pos = pos / (float)st->pos_div;
        for (int i = 0; i < D / 2; i++) {
            float f = pos * inv_freq[i];
            cs[(size_t)b * D + i] = rnd1(cosf(f));
            cs[(size_t)b * D + D / 2 + i] = rnd1(sinf(f));
        }
    }
    const float eps = (float)st->eps;

#pragma omp parallel num_threads(T)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        char *mine = thread_area + per_thread * t, *xbuf = mine;
        char *ap = mine + (xbytes + 63) / 64 * 64;
        attn_buf_t ab = {(float *)carve(&ap, (size_t)G * DP * 4), (float *)carve(&ap, (size_t)16 * DP * 4),
                         (float *)carve(&ap, (size_t)G * SP * 4), (float *)carve(&ap, (size_t)G * 4), DP, SP};
        job_t jq, jo, jg, jd, jh;
        range_t *rq = ranges, *ro = ranges + T, *rg = ranges + 2 * T, *rd = ranges + 3 * T, *rh = ranges + 4 * T;
        for (int l = 0; l < L; l++) {
            const layer_t *ly = &layers[l];
            uint16_t *kc = (uint16_t *)(intptr_t)kcs[l], *vc = (uint16_t *)(intptr_t)vcs[l];
            lin_job(&jq, &ly->qkv, B, qkv, nt);
            lin_job(&jo, &ly->o, B, y, nt);
            lin_job(&jg, &ly->gate_up, B, gu, nt);
            lin_job(&jd, &ly->down, B, y, nt);
            if (t == 0) {
                for (int b = 0; b < B; b++) {
                    if (l > 0) add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                    rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)ly->ln1, h + (size_t)b * H, H, eps);
                }
                job_reset_ranges(&jq, rq), job_reset_ranges(&jo, ro);
                job_reset_ranges(&jg, rg), job_reset_ranges(&jd, rd);
            }
#pragma omp barrier
            job_set_x(&jq, h, xbuf);
            job_team(&jq, rq, t);
            /* the head of o_proj: a burst now, then more at the pace of the attention arithmetic */
            pf_cursor_t pf = job_head(&jo, t, ATTN_PREFETCH_BYTES);
            pf_step(&pf, HEAD_LINES);
#pragma omp barrier
            for (int pr = t; pr < B * hk; pr += nt) {
                int b = pr / hk, g = pr % hk;
                size_t off = ((size_t)b * hk + g) * cap * D;
                attend(st, qkv + (size_t)b * QKV, kc + off, vc + off, cs + (size_t)b * D, (int)lengths[b], g,
                       att + (size_t)b * hq * D, &ab, &pf);
            }
#pragma omp barrier
            job_set_x(&jo, att, xbuf);
            job_team(&jo, ro, t);
            prefetch_head(&jg, t);
#pragma omp barrier
            if (t == 0)
                for (int b = 0; b < B; b++) {
                    add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                    rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)ly->ln2, h + (size_t)b * H, H, eps);
                }
#pragma omp barrier
            job_set_x(&jg, h, xbuf);
            job_team(&jg, rg, t);
            prefetch_head(&jd, t);
#pragma omp barrier
            {
                int per = round_up((I + nt - 1) / nt, 16), i0 = t * per, i1 = i0 + per < I ? i0 + per : I;
                if (i0 < i1) silu_mul(gu, act, B, I, i0, i1);
            }
#pragma omp barrier
            job_set_x(&jd, act, xbuf);
            job_team(&jd, rd, t);
            if (l + 1 < L) {
                lin_job(&jq, &layers[l + 1].qkv, B, qkv, nt);
                prefetch_head(&jq, t);
            }
#pragma omp barrier
        }
        lin_job(&jh, &st->head, B, (void *)(intptr_t)st->logits, nt);
        if (t == 0) {
            for (int b = 0; b < B; b++) {
                if (L > 0) add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)st->norm, h + (size_t)b * H, H, eps);
            }
            job_reset_ranges(&jh, rh);
        }
        prefetch_head(&jh, t);
#pragma omp barrier
        job_set_x(&jh, h, xbuf);
        job_team(&jh, rh, t);
    }
    const int64_t *adv = (const int64_t *)(intptr_t)st->advance;
    for (int b = 0; b < B; b++) ((int64_t *)lengths)[b] += adv ? adv[b] : 1;
    return 0;
}

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
