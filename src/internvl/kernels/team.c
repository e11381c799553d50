/* The parts of the GEMV common to every kernel variant: the work split and its thread team (contiguous
   chunk ranges per thread, stealing from the back of another's when done), the per-thread scratch, and
   ivl_run, the entry point for one linear layer. The variant's job_init, job_set_x and job_rows do the rest. */
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>

#include "job.h"

#ifndef CHUNK_BYTES
#define CHUNK_BYTES (64 * 1024) /* unit of work handed between threads */
#endif
#ifndef MIN_PARALLEL_BYTES
#define MIN_PARALLEL_BYTES (96 * 1024)
#endif

/* Layout of the int64 parameter block passed by ivl_run (one ctypes argument instead of thirteen). */
enum { P_OP, P_X, P_XDT, P_M, P_K, P_W, P_SCALE, P_N, P_BIAS, P_BDT, P_Y, P_YDT, P_THREADS, P_COUNT };

int ivl_abi_version(void) { return 10; }
int ivl_param_count(void) { return P_COUNT; }

/* One buffer per calling thread (concurrent callers never share it), freed when that thread exits. */
static __thread void *scratch = NULL;
static __thread size_t scratch_bytes = 0;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_key_init(void) { pthread_key_create(&scratch_key, free); }

void *scratch_get(size_t bytes) {
    if (bytes > scratch_bytes) {
        pthread_once(&scratch_once, scratch_key_init);
        free(scratch);
        if (bytes < scratch_bytes + scratch_bytes / 2) bytes = scratch_bytes + scratch_bytes / 2; /* grow rarely */
        scratch = aligned_alloc(64, (bytes + 63) / 64 * 64);
        scratch_bytes = scratch ? bytes : 0;
        pthread_setspecific(scratch_key, scratch);
    }
    return scratch;
}

void job_split(job_t *j, int nthreads, int align) {
    /* The split: whole groups of `align` rows per chunk; small weights are not worth waking other threads for. */
    int nt = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    int rpc = (int)(CHUNK_BYTES / j->row_bytes) / align * align;
    j->rows_per_chunk = rpc < align ? align : rpc;
    j->nchunks = (j->N + j->rows_per_chunk - 1) / j->rows_per_chunk;
    if (j->row_bytes * (size_t)j->N < MIN_PARALLEL_BYTES) nt = 1;
    j->team = nt > j->nchunks ? j->nchunks : nt;
}

size_t job_scratch_bytes(const job_t *j) { return j->vec_bytes + j->amx_bytes + 64; }

/* ---- threading: contiguous chunk ranges per thread, stealing from the back when done ---- */

static int claim(range_t *r, int from_back) {
    uint64_t v = atomic_load_explicit(&r->fb, memory_order_relaxed);
    for (;;) {
        uint32_t f = (uint32_t)v, b = (uint32_t)(v >> 32);
        if (f >= b) return -1;
        uint64_t nv = from_back ? ((uint64_t)(b - 1) << 32) | f : v + 1;
        if (atomic_compare_exchange_weak_explicit(&r->fb, &v, nv, memory_order_relaxed, memory_order_relaxed))
            return from_back ? (int)(b - 1) : (int)f;
    }
}

/* Where a thread starts reading somewhere new, the loop's prefetches (PF_BYTES ahead) have not
   covered the first PF_BYTES yet: request them all at once rather than one miss at a time. */
static inline void prefetch_rows(const job_t *j, int n0, size_t bytes) {
    const char *p = (const char *)j->w + (size_t)n0 * j->row_bytes;
    size_t len = (size_t)(j->N - n0) * j->row_bytes;
    for (size_t off = 0; off < bytes && off < len; off += 64) _mm_prefetch(p + off, PF_HINT);
}

void job_reset_ranges(const job_t *j, range_t *ranges) {
    for (int t = 0; t < j->team; t++) {
        uint64_t f = (uint64_t)j->nchunks * t / j->team, b = (uint64_t)j->nchunks * (t + 1) / j->team;
        atomic_store_explicit(&ranges[t].fb, f | (b << 32), memory_order_relaxed);
    }
}

pf_cursor_t job_head(const job_t *j, int t, size_t bytes) {
    pf_cursor_t c = {NULL, NULL};
    if (t >= j->team) return c;
    int n0 = (int)((uint64_t)j->nchunks * t / j->team) * j->rows_per_chunk;
    size_t len = (size_t)(j->N - n0) * j->row_bytes;
    c.p = (const char *)j->w + (size_t)n0 * j->row_bytes;
    c.end = c.p + (bytes < len ? bytes : len);
    return c;
}

void job_team(const job_t *j, range_t *ranges, int t) {
    const int nt = j->team, rpc = j->rows_per_chunk;
    if (t >= nt) return;
    int next = -1;
    for (int v = 0; v < nt; v++) { /* own range first (front), then others' (back) */
        int victim = (t + v) % nt, c;
        while ((c = claim(&ranges[victim], v > 0)) >= 0) {
            int n0 = c * rpc, n1 = n0 + rpc < j->N ? n0 + rpc : j->N;
            if (n0 != next) prefetch_rows(j, n0, PF_BYTES);
            job_rows(j, n0, n1);
            next = n1;
        }
    }
}

/* ---- entry points ---- */

/* p: int64 parameter block, see P_*. Returns 0 on success, nonzero when the caller must fall back. */
int ivl_run(const int64_t *p) {
    job_t j;
    if (job_init(&j, (int)p[P_OP], (int)p[P_XDT], (int)p[P_M], (int)p[P_K], (const void *)(intptr_t)p[P_W],
                 (const float *)(intptr_t)p[P_SCALE], (int)p[P_N], (const void *)(intptr_t)p[P_BIAS],
                 (int)p[P_BDT], (void *)(intptr_t)p[P_Y], (int)p[P_YDT], (int)p[P_THREADS]))
        return 1;
    char *buf = (char *)scratch_get(job_scratch_bytes(&j));
    if (!buf) return 2;
    job_set_x(&j, (const void *)(intptr_t)p[P_X], buf);
    range_t ranges[MAX_THREADS]; /* on this caller's stack: concurrent calls never share counters */
    job_reset_ranges(&j, ranges);
    if (j.team == 1) {
        job_team(&j, ranges, 0);
        return 0;
    }
#pragma omp parallel num_threads(j.team)
    job_team(&j, ranges, omp_get_thread_num());
    return 0;
}

