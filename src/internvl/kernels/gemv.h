/* Internal interface of the weight-streaming GEMV (gemv.c) for the other kernels of this library:
   a job is one y = x @ W^T (+ bias) for up to MAXM rows of x, run by a team of threads that each walk
   a contiguous range of W's rows and steal from the others' ranges when done. The vector loops take
   up to VEC_M rows of x at once (more go in blocks over the same weights, then in L2); AMX tiles take
   all of them at once. */
#ifndef IVL_GEMV_H
#define IVL_GEMV_H

#include <immintrin.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "quant.h"

#define MAXM 16 /* rows of x per job: one AMX tile's 16 columns (two for fast int8) */
#define VEC_M 8  /* rows of x per pass of the AVX-512 loops (their accumulators fill the registers) */
#define TILE 16
#define MAX_THREADS 256
#define IVL_HIDDEN __attribute__((visibility("hidden")))
#ifndef PF_BYTES
#define PF_BYTES 6144 /* software prefetch distance along the weight stream (measured plateau: 4-16 KiB) */
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1 /* into L2; NTA (past L2) halves the decode step's bandwidth here */
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };
enum { OP_BF16 = 0, OP_INT8 = 1, OP_INT8_FAST = 2, OP_INT4 = 3 }; /* OP_INT4: quant.h's int4 */

typedef struct {
    int op, M, K, N, bdt, ydt, xdt, KX; /* KX: row stride of the prepared x, in its elements */
    const void *x;                      /* prepared x */
    const void *w;
    const float *scale;  /* int8: per-row scales, applied by finish_tile */
    const uint16_t *gscale; /* int4: fp16 [N, K / QK4] group scales */
    const void *bias;
    void *y;
    float xs[MAXM];     /* fast int8: per-row x scales */
    int64_t xsum[MAXM]; /* fast int8: per-row sums of quantized x */
    int amx, cu;        /* AMX: in use, and the columns of its x tile */
    const void *xamx;   /* AMX: x laid out as the B tiles */
    size_t vec_bytes, amx_bytes, row_bytes;
    int rows_per_chunk, nchunks, team; /* work split: chunk size in rows, chunks, threads taking part */
} job_t;

typedef struct {
    _Alignas(64) _Atomic uint64_t fb; /* front (low 32 bits) and back (high 32 bits) chunk indices */
    char pad[56];
} range_t;

/* ---- small vector helpers shared by the kernels ---- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int round_up(int v, int to) { return (v + to - 1) / to * to; }

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

/* Describe a job (no x yet) and split it for `nthreads`; nonzero when the arguments are invalid. */
IVL_HIDDEN int job_init(job_t *j, int op, int xdt, int M, int K, const void *w, const float *scale, int N,
                        const void *bias, int bdt, void *y, int ydt, int nthreads);
/* Bytes of scratch job_set_x needs. */
IVL_HIDDEN size_t job_scratch_bytes(const job_t *j);
/* Lay out x as the job's inner loops read it, in `buf` (job_scratch_bytes, 64-byte aligned). */
IVL_HIDDEN void job_set_x(job_t *j, const void *x, char *buf);
/* The initial ranges (job->team of them); must happen before any thread of the team runs the job. */
IVL_HIDDEN void job_reset_ranges(const job_t *j, range_t *ranges);
/* Thread t's share of the job, inside a parallel region; threads t >= j->team return at once. */
IVL_HIDDEN void job_team(const job_t *j, range_t *ranges, int t);
/* The first `bytes` thread t will read of a job: prefetched ahead (pf_step) while the thread still
   waits or computes elsewhere, they are in L2 when the job starts. */
typedef struct {
    const char *p, *end;
} pf_cursor_t;
IVL_HIDDEN pf_cursor_t job_head(const job_t *j, int t, size_t bytes);
static inline void pf_step(pf_cursor_t *c, int lines) {
    for (int i = 0; i < lines && c->p < c->end; i++, c->p += 64) _mm_prefetch(c->p, PF_HINT);
}
/* A 64-byte aligned per-calling-thread buffer of at least `bytes` (kept between calls). */
IVL_HIDDEN void *scratch_get(size_t bytes);

#endif
