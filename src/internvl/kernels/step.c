/* One decoding step of a Qwen2/Llama-style decoder (RMSNorm, fused q/k/v with RoPE, grouped-query
   attention over a KV cache, fused gate/up SwiGLU, final norm and lm_head) in a single call.

   Decoding reads every weight once per token; between the weight streams a layer runs a dozen small
   ops on a few kilobytes. Run from Python, each small op costs tens of microseconds because the weight
   stream has just evicted the interpreter and its data from the caches. Here one OpenMP team runs the
   whole step: the GEMVs of the variant (job.h) split among the threads, the small ops in between on hot data, a
   barrier after each phase, and each thread prefetching the head of its next weight range before it
   waits, so the memory stream barely pauses.

   Activations are bf16 between ops and every op rounds where the torch modules do (norm output, norm
   weight product, RoPE terms, SiLU, its product with up, residual adds), computing in fp32 inside;
   attention keeps fp32 scores, rounds the softmax numerators to bf16 for the product with the values
   (as SDPA's CPU flash kernel does) and rounds its output. Every variant compiles this file; the small
   ops come from its decode file (step.h). */
#include <math.h>
#include <omp.h>

#include "step.h"

enum { J_QKV, J_O, J_GATE_UP, J_DOWN, J_HEAD, J_COUNT };
#ifndef HEAD_LINES
#define HEAD_LINES 128 /* lines of the next weights prefetched before a barrier */
#endif
#ifndef ATTN_PREFETCH_BYTES
#define ATTN_PREFETCH_BYTES (192 * 1024) /* of o_proj, fetched into L2 while attention computes */
#endif

/* The value torch holds after rounding an fp32 result to bf16. */
static inline float rnd1(float v) { return q_bf16_to_f32(q_f32_to_bf16(v)); }

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
                    if (l > 0) step_add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                    step_rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)ly->ln1, h + (size_t)b * H, H, eps);
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
                step_attend(st, qkv + (size_t)b * QKV, kc + off, vc + off, cs + (size_t)b * D, (int)lengths[b], g,
                       att + (size_t)b * hq * D, &ab, &pf);
            }
#pragma omp barrier
            job_set_x(&jo, att, xbuf);
            job_team(&jo, ro, t);
            prefetch_head(&jg, t);
#pragma omp barrier
            if (t == 0)
                for (int b = 0; b < B; b++) {
                    step_add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                    step_rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)ly->ln2, h + (size_t)b * H, H, eps);
                }
#pragma omp barrier
            job_set_x(&jg, h, xbuf);
            job_team(&jg, rg, t);
            prefetch_head(&jd, t);
#pragma omp barrier
            {
                int per = round_up((I + nt - 1) / nt, 16), i0 = t * per, i1 = i0 + per < I ? i0 + per : I;
                if (i0 < i1) step_silu_mul(gu, act, B, I, i0, i1);
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
                if (L > 0) step_add_rows(xr + (size_t)b * H, y + (size_t)b * H, H);
                step_rmsnorm_row(xr + (size_t)b * H, (const uint16_t *)(intptr_t)st->norm, h + (size_t)b * H, H, eps);
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

