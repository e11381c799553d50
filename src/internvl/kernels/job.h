/* The weight-streaming GEMV as a job, common to every kernel variant (gemv.c for AVX-512, gemv_avx2.c for
   AVX2): one y = x @ W^T (+ bias) for up to MAXM rows of x, run by a team of threads that each walk a
   contiguous range of W's rows and steal from the others' ranges when done (team.c). A variant supplies
   job_init, job_set_x and job_rows (its inner loops); the decode step (step.c) drives jobs through this. */
#ifndef IVL_JOB_H
#define IVL_JOB_H

#include <immintrin.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "quant.h"

#define MAXM 16 /* rows of x per job: one AMX tile's 16 columns (two for fast int8) */
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
/* OP_INT4: quant.h's int4 against fp32 x; OP_INT4_Q8: the same weights against x quantized to int8 per group of
   QK4 (Q8_0-style, see q8.h), multiplied with integer dot products. */
enum { OP_BF16 = 0, OP_INT8 = 1, OP_INT8_FAST = 2, OP_INT4 = 3, OP_INT4_Q8 = 4 };

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

static inline int round_up(int v, int to) { return (v + to - 1) / to * to; }

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

/* Thread t's rows [n0, n1) of a job: the variant's inner loops (called by job_team). */
IVL_HIDDEN void job_rows(const job_t *j, int n0, int n1);
/* The work split of a job_init: chunks of whole `align`-row groups, and how many threads take part. */
IVL_HIDDEN void job_split(job_t *j, int nthreads, int align);

#endif
