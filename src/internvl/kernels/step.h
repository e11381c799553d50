/* The one-call decode step (step.c) and the small ops between its GEMVs, which each kernel variant supplies
   (decode.c for AVX-512, decode_avx2.c for AVX2, both from step_ops.h). */
#ifndef IVL_STEP_H
#define IVL_STEP_H

#include "job.h"

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

#define MAX_HEAD_DIM 512
#define HEAD_BLOCK 4 /* query heads accumulated together in attention's weighted sum of values */

/* Per-thread attention scratch: query heads of one group in fp32 (DP = head_dim padded to 16), one
   16-position block of keys in fp32, and the scores of each query head (SP = positions padded to 16). */
typedef struct {
    float *q, *kblk, *scores, *sums;
    int DP, SP;
} attn_buf_t;

/* out = bf16(w * bf16(x / sqrt(mean(x^2) + eps))), as RMSNorm computes it in fp32 then the input dtype. */
IVL_HIDDEN void step_rmsnorm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int n, float eps);
/* x += y in bf16 (a residual add). */
IVL_HIDDEN void step_add_rows(uint16_t *x, const uint16_t *y, int n);
/* One row and KV head g: rotate and store the new key/value at the row's position `pos` of the caches, then
   attention of the group's query heads over positions 0..pos, written to att (bf16 [heads * D] of the row). */
IVL_HIDDEN void step_attend(const step_t *st, const uint16_t *qkv, uint16_t *kc, uint16_t *vc, const float *cs,
                            int pos, int g, uint16_t *att, attn_buf_t *ab, pf_cursor_t *pf);
/* act = bf16(bf16(silu(gate)) * up) for columns [i0, i1) of every row; gate_up rows are [gate | up]. */
IVL_HIDDEN void step_silu_mul(const uint16_t *gu, uint16_t *act, int B, int I, int i0, int i1);

#endif
