/* Weight-streaming matrix-vector kernels for CPU decoding (AVX-512 with VNNI; AMX where present).

   y[M,N] = x[M,K] @ W[N,K]^T (+ bias) for M <= 16, with W row-major in bf16, in int8 with one fp32
   scale per output row, or in int4 with an fp16 scale per 32 weights (quant.h). Decoding is bound by the bytes of W read, so each thread walks a contiguous
   range of rows front to back with a software prefetch ahead of the hardware streamer; a thread that
   finishes early steals chunks from the back of a slower thread's range.

   bf16 W: a 32-bit lane of the weight holds two bf16, which become two fp32 with one shift (even
   element) and one mask (odd element); x is laid out as even and odd fp32 halves to match, and FMA
   multiplies. Products are exact for bf16 and fp32 x alike. (vdpbf16ps retires one per two cycles
   here, a quarter of FMA's rate, and would need x rounded to bf16.)
   int8 W, exact: each weight is widened to fp32 in registers and multiplied with FMA by an fp32 x;
   the row scale is applied once per output. int4 W likewise, or against x quantized to int8 per group
   (OP_INT4_Q8, in int4_q8.c).
   int8 W, fast: x is quantized per row to 16 bits (two signed int8 digits) and vpdpbusd multiplies 64
   weights per instruction with no widening, an integer-exact dot product of the quantized values.
   Rows go in tiles of 16 whose lane sums are formed together, so scale, bias and the bf16 rounding of
   the outputs are vector operations too. With 2+ rows of x (batched decoding), AMX tile multiplies
   take over where the CPU has them (see the AMX section), so the weights still stream at full speed.

   No torch headers: this file compiles in about a second and is loaded with ctypes. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemv.h"

#define FAST_MAX_K 65536 /* int32 sums of the fast int8 path cannot overflow below this K */

int ivl_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

/* ---- x preparation: the layout each inner loop reads, in a per-calling-thread scratch buffer ---- */

/* bf16 W: row m is its even elements then its odd elements in fp32, each half zero-padded to KH. */
static const float *x_even_odd(const void *x, int xdt, int M, int K, int KH, float *out) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int m = 0; m < M; m++) {
        float *xe = out + (size_t)2 * m * KH, *xo = xe + KH;
        size_t base = (size_t)m * K;
        for (int k = 0; k < 2 * KH; k += 32) { /* 32 elements -> 16 even + 16 odd */
            __m512 a = load_x16(x, xdt, base + k, mask16(K - k));
            __m512 b = load_x16(x, xdt, base + k + 16, mask16(K - k - 16));
            _mm512_storeu_ps(xe + k / 2, _mm512_permutex2var_ps(a, ev, b));
            _mm512_storeu_ps(xo + k / 2, _mm512_permutex2var_ps(a, od, b));
        }
    }
    return out;
}

/* int8 W, exact: x as fp32 rows (a bf16 x widened, which is exact). */
static const float *x_f32(const void *x, int xdt, int M, int K, float *out) {
    if (xdt == DT_F32) return (const float *)x;
    int n = M * K;
    for (int i = 0; i < n; i += 16) _mm512_mask_storeu_ps(out + i, mask16(n - i), load_x16(x, xdt, i, mask16(n - i)));
    return out;
}

/* int8 W, fast: per row, x16 = round(x / s) with s = max|x| / 32639, written as x16 = 256 * hi + lo
   with signed int8 digits (|x16| <= 32639 keeps hi in [-128, 127]). Row m holds hi then lo, each
   zero-padded to KP; xs[m] = s and xsum[m] = sum of x16 (to undo the +128 bias of the weights). */
static const int8_t *x_digits(const void *x, int xdt, int M, int K, int KP, float *xs, int64_t *xsum, int8_t *out) {
    const __m512i lim = _mm512_set1_epi32(32639), c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
    for (int m = 0; m < M; m++) {
        size_t base = (size_t)m * K;
        __m512 vmax = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_x16(x, xdt, base + k, mask16(K - k))));
        float amax = _mm512_reduce_max_ps(vmax);
        float s = amax > 0 && isfinite(amax) ? amax / 32639.0f : 1.0f;
        __m512 inv = _mm512_set1_ps(1.0f / s);
        int8_t *hi = out + (size_t)2 * m * KP, *lo = hi + KP;
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < KP; k += 16) { /* lanes past K load as zero and pad with zero digits */
            __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load_x16(x, xdt, base + k, mask16(K - k)), inv));
            v = _mm512_max_epi32(_mm512_min_epi32(v, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
            __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
            __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(v, l), 8);
            _mm_storeu_si128((__m128i *)(hi + k), _mm512_cvtepi32_epi8(h));
            _mm_storeu_si128((__m128i *)(lo + k), _mm512_cvtepi32_epi8(l));
            sum = _mm512_add_epi32(sum, v);
        }
        xs[m] = s;
        xsum[m] = _mm512_reduce_add_epi32(sum); /* |sum| <= K * 32639 < 2^31 for K <= FAST_MAX_K */
    }
    return out;
}


/* ---- 16-row tiles: lane sums of 16 accumulators at once, then scale, bias and store as vectors ---- */

#define PAIR_MIN_M 3 /* from this many x rows, bf16 rows go in pairs */

static inline __m512i hsum16_epi32(const __m512i *v) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
    __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xdd));
}

/* ---- per-row inner loops; NM (rows of x) is a compile-time constant after inlining ---- */

/* One 64-byte line of bf16 weights (32 elements from k) against NM rows of even/odd x. */
static inline __attribute__((always_inline)) void bf16_line(const int NM, __m512i wv, const float *xf, int KH, int k,
                                                            __m512 *acc) {
    __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
    __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, _mm512_set1_epi32((int)0xffff0000u)));
    for (int m = 0; m < NM; m++) {
        const float *xe = xf + (size_t)2 * m * KH + (k >> 1);
        acc[2 * m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xe), acc[2 * m]);
        acc[2 * m + 1] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xe + KH), acc[2 * m + 1]);
    }
}

/* One row of a bf16 W: the NM per-x-row accumulators (lanes still to be summed). Up to 4 x rows, a
   second (even, odd) set for alternate lines hides FMA latency. */
static inline __attribute__((always_inline)) void bf16_row(const int NM, const job_t *j, const uint16_t *w,
                                                           __m512 *out) {
    const int K = j->K, KH = j->KX, NS = NM <= 4 ? 2 : 1;
    const float *xf = (const float *)j->x;
    __m512 acc[2 * VEC_M]; /* 2 * NM * NS <= 16 */
    for (int i = 0; i < 2 * NM * NS; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + PF_BYTES, PF_HINT);
        _mm_prefetch((const char *)(w + k) + PF_BYTES + 64, PF_HINT);
        bf16_line(NM, _mm512_loadu_si512((const void *)(w + k)), xf, KH, k, acc);
        bf16_line(NM, _mm512_loadu_si512((const void *)(w + k + 32)), xf, KH, k + 32, acc + 2 * NM * (NS - 1));
    }
    for (; k < K; k += 32) { /* tail: masked weights against zero-padded x */
        int rem = K - k;
        __mmask32 mk = (__mmask32)(rem >= 32 ? 0xffffffffu : (1u << rem) - 1u);
        bf16_line(NM, _mm512_maskz_loadu_epi16(mk, (const void *)(w + k)), xf, KH, k, acc);
    }
    for (int m = 0; m < NM; m++) {
        __m512 t = _mm512_add_ps(acc[2 * m], acc[2 * m + 1]);
        if (NS == 2) t = _mm512_add_ps(t, _mm512_add_ps(acc[2 * NM + 2 * m], acc[2 * NM + 2 * m + 1]));
        out[m * TILE] = t;
    }
}

/* Two adjacent rows of a bf16 W at once, for 3+ x rows: each x load then feeds four FMAs, which keeps
   the loop from being bound by loads of x. One accumulator per (row, x row). */
static inline __attribute__((always_inline)) void bf16_row_pair(const int NM, const job_t *j, const uint16_t *w0,
                                                                __m512 *out) {
    const int K = j->K, KH = j->KX;
    const uint16_t *w1 = w0 + K;
    const float *xf = (const float *)j->x;
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0[VEC_M], a1[VEC_M];
    for (int m = 0; m < NM; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __m512i v0, v1;
        if (k + 32 <= K) {
            _mm_prefetch((const char *)(w0 + k) + PF_BYTES, PF_HINT);
            _mm_prefetch((const char *)(w1 + k) + PF_BYTES, PF_HINT);
            v0 = _mm512_loadu_si512((const void *)(w0 + k));
            v1 = _mm512_loadu_si512((const void *)(w1 + k));
        } else {
            __mmask32 mk = (__mmask32)((1u << (K - k)) - 1u);
            v0 = _mm512_maskz_loadu_epi16(mk, (const void *)(w0 + k));
            v1 = _mm512_maskz_loadu_epi16(mk, (const void *)(w1 + k));
        }
        __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
        __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(v0, hi_mask));
        __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
        __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(v1, hi_mask));
        for (int m = 0; m < NM; m++) {
            const float *xe = xf + (size_t)2 * m * KH + (k >> 1);
            __m512 xev = _mm512_loadu_ps(xe), xov = _mm512_loadu_ps(xe + KH);
            a0[m] = _mm512_fmadd_ps(o0, xov, _mm512_fmadd_ps(e0, xev, a0[m]));
            a1[m] = _mm512_fmadd_ps(o1, xov, _mm512_fmadd_ps(e1, xev, a1[m]));
        }
    }
    for (int m = 0; m < NM; m++) out[m * TILE] = a0[m], out[m * TILE + 1] = a1[m];
}

static inline __attribute__((always_inline)) void rows_bf16(const int NM, const job_t *j, int n0, int n1) {
    __m512 stash[VEC_M][TILE];
    for (int t0 = n0; t0 < n1; t0 += TILE) {
        int cnt = n1 - t0 < TILE ? n1 - t0 : TILE, r = 0;
        const uint16_t *w = (const uint16_t *)j->w + (size_t)t0 * j->K;
        if (NM >= PAIR_MIN_M)
            for (; r + 2 <= cnt; r += 2) bf16_row_pair(NM, j, w + (size_t)r * j->K, &stash[0][r]);
        for (; r < cnt; r++) bf16_row(NM, j, w + (size_t)r * j->K, &stash[0][r]);
        for (; r < TILE; r++) /* short tile: zero lanes that are never stored */
            for (int m = 0; m < NM; m++) stash[m][r] = _mm512_setzero_ps();
        for (int m = 0; m < NM; m++) finish_tile(j, t0, cnt, m, hsum16_ps(stash[m]));
    }
}

static inline __m512 i8x16_to_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __attribute__((always_inline)) void row_int8(const int NM, const job_t *j, int n, __m512 *out) {
    const int K = j->K, NA = NM == 1 ? 4 : 2; /* independent FMA chains per x row */
    const int K64 = K & ~63;
    const float *xf = (const float *)j->x;
    const int8_t *q = (const int8_t *)j->w + (size_t)n * K;
    __m512 acc[VEC_M * 2 + 2];
    for (int i = 0; i < NM * NA; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k < K64; k += 64) {
        _mm_prefetch((const char *)(q + k) + PF_BYTES, PF_HINT);
        __m512 w0 = i8x16_to_f32(q + k), w1 = i8x16_to_f32(q + k + 16);
        __m512 w2 = i8x16_to_f32(q + k + 32), w3 = i8x16_to_f32(q + k + 48);
        for (int m = 0; m < NM; m++) {
            const float *xm = xf + (size_t)m * K + k;
            __m512 *a = acc + m * NA;
            a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), a[0]);
            a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), a[1]);
            a[2 % NA] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), a[2 % NA]);
            a[3 % NA] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), a[3 % NA]);
        }
    }
    for (; k < K; k += 16) { /* tail: masked loads of both weights and x */
        __mmask16 mk = mask16(K - k);
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + k)));
        for (int m = 0; m < NM; m++)
            acc[m * NA] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, xf + (size_t)m * K + k), acc[m * NA]);
    }
    sum_accumulators(NM, NA, acc, out);
}

static inline __attribute__((always_inline)) void rows_int8(const int NM, const job_t *j, int n0, int n1) {
    OVER_TILES(row_int8, NM, j, n0, n1);
}

/* vpdpbusd multiplies unsigned by signed bytes: the weights become q + 128 (one xor), and the
   128 * sum(x16) this adds is taken off at the end. Row totals fit int32 (|sum| <= K * 255 * 128);
   256 * hi + lo - 128 * xsum is formed in double, where it is exact. */
static inline __attribute__((always_inline)) void rows_int8_fast(const int NM, const job_t *j, int n0, int n1) {
    const int K = j->K, KP = j->KX;
    const int8_t *xd = (const int8_t *)j->x;
    const __m512i bias128 = _mm512_set1_epi8((char)0x80);
    __m512i sh[VEC_M][TILE], sl[VEC_M][TILE];
    for (int t0 = n0; t0 < n1; t0 += TILE) {
        int cnt = n1 - t0 < TILE ? n1 - t0 : TILE;
        for (int r = 0; r < TILE; r++) {
            if (r >= cnt) {
                for (int m = 0; m < NM; m++) sh[m][r] = sl[m][r] = _mm512_setzero_si512();
                continue;
            }
            const int8_t *q = (const int8_t *)j->w + (size_t)(t0 + r) * K;
            __m512i ahi[VEC_M], alo[VEC_M];
            for (int m = 0; m < NM; m++) ahi[m] = alo[m] = _mm512_setzero_si512();
            for (int k = 0; k < K; k += 64) {
                __m512i wv;
                if (k + 64 <= K) {
                    _mm_prefetch((const char *)(q + k) + PF_BYTES, PF_HINT);
                    wv = _mm512_loadu_si512((const void *)(q + k));
                } else { /* masked weights read as 128 after the xor, against zero-padded x */
                    wv = _mm512_maskz_loadu_epi8((__mmask64)((1ull << (K - k)) - 1ull), (const void *)(q + k));
                }
                __m512i u = _mm512_xor_si512(wv, bias128);
                for (int m = 0; m < NM; m++) {
                    const int8_t *hi = xd + (size_t)2 * m * KP + k;
                    ahi[m] = _mm512_dpbusd_epi32(ahi[m], u, _mm512_loadu_si512((const void *)hi));
                    alo[m] = _mm512_dpbusd_epi32(alo[m], u, _mm512_loadu_si512((const void *)(hi + KP)));
                }
            }
            for (int m = 0; m < NM; m++) sh[m][r] = ahi[m], sl[m][r] = alo[m];
        }
        for (int m = 0; m < NM; m++) {
            __m512i h = hsum16_epi32(sh[m]), l = hsum16_epi32(sl[m]);
            __m512d c = _mm512_set1_pd(-128.0 * (double)j->xsum[m]), s = _mm512_set1_pd((double)j->xs[m]);
            __m512d d0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)), _mm512_set1_pd(256.0),
                                         _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(l)), c));
            __m512d d1 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)), _mm512_set1_pd(256.0),
                                         _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)), c));
            __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_mul_pd(d0, s))),
                                          _mm512_cvtpd_ps(_mm512_mul_pd(d1, s)), 1);
            finish_tile(j, t0, cnt, m, v);
        }
    }
}

/* int4 W (quant.h): per group of 32, 16 bytes widen to 16 lanes whose low nibbles are elements 0..15 and
   high nibbles 16..31; (u - 8) * d is exact in fp32 and multiplies an fp32 x with FMA, as for exact int8.
   The row's fp16 group scales are widened once into a stack buffer. */
static inline __attribute__((always_inline)) void row_int4(const int NM, const job_t *j, int n, __m512 *out) {
    const int K = j->K, G = K / QK4, NA = NM == 1 ? 4 : 2;
    const float *xf = (const float *)j->x;
    const __m512i m4 = _mm512_set1_epi32(15), c8 = _mm512_set1_epi32(8);
    _Alignas(64) float ds[INT4_MAX_K / QK4 + 16];
    const uint8_t *q = (const uint8_t *)j->w + (size_t)n * (K / 2);
    const uint16_t *sc = j->gscale + (size_t)n * G;
    for (int g = 0; g < G; g += 16)
        _mm512_store_ps(ds + g, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(G - g), sc + g)));
    __m512 acc[VEC_M * 2 + 2];
    for (int i = 0; i < NM * NA; i++) acc[i] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        if (!(g & 3)) _mm_prefetch((const char *)(q + 16 * g) + PF_BYTES, PF_HINT);
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * g)));
        __m512 d = _mm512_set1_ps(ds[g]);
        __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, m4), c8)), d);
        __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), c8)), d);
        const int o = NA == 4 ? 2 * (g & 1) : 0;
        for (int m = 0; m < NM; m++) {
            const float *xm = xf + (size_t)m * K + (size_t)g * QK4;
            __m512 *a = acc + m * NA;
            a[o] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), a[o]);
            a[o + 1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), a[o + 1]);
        }
    }
    sum_accumulators(NM, NA, acc, out);
}

static inline __attribute__((always_inline)) void rows_int4(const int NM, const job_t *j, int n0, int n1) {
    OVER_TILES(row_int4, NM, j, n0, n1);
}

#define DISPATCH(F)                                                                                  \
    switch (j->M) {                                                                                  \
        case 1: F(1, j, n0, n1); break; case 2: F(2, j, n0, n1); break;                              \
        case 3: F(3, j, n0, n1); break; case 4: F(4, j, n0, n1); break;                              \
        case 5: F(5, j, n0, n1); break; case 6: F(6, j, n0, n1); break;                              \
        case 7: F(7, j, n0, n1); break; case 8: F(8, j, n0, n1); break;                              \
    }

static void rows_avx(const job_t *j, int n0, int n1) {
    if (j->op == OP_BF16)
        DISPATCH(rows_bf16)
    else if (j->op == OP_INT8)
        DISPATCH(rows_int8)
    else if (j->op == OP_INT4)
        DISPATCH(rows_int4)
    else if (j->op == OP_INT4_Q8)
        q8_rows(j, n0, n1);
    else
        DISPATCH(rows_int8_fast)
}

/* More than VEC_M rows of x: blocks of VEC_M rows, each a job of its own over the same weight rows
   [n0, n1) (one chunk: the blocks after the first read it from L2). */
static void do_rows_avx(const job_t *j, int n0, int n1) {
    if (j->M <= VEC_M) {
        rows_avx(j, n0, n1);
        return;
    }
    const size_t xrow = j->op == OP_BF16      ? (size_t)8 * j->KX
                        : j->op == OP_INT4_Q8 ? (size_t)j->KX
                        : (j->op == OP_INT8 || j->op == OP_INT4 ? (size_t)4 * j->K : (size_t)2 * j->KX);
    const size_t yrow = (size_t)j->N * (j->ydt == DT_BF16 ? 2 : 4);
    for (int m0 = 0; m0 < j->M; m0 += VEC_M) {
        job_t s = *j;
        s.M = j->M - m0 < VEC_M ? j->M - m0 : VEC_M;
        s.x = (const char *)j->x + m0 * xrow;
        s.y = (char *)j->y + m0 * yrow;
        for (int m = 0; m < s.M; m++) s.xs[m] = j->xs[m0 + m], s.xsum[m] = j->xsum[m0 + m];
        rows_avx(&s, n0, n1);
    }
}

/* ---- AMX (Sapphire Rapids and later): for 2+ rows of x, tile multiplies make the arithmetic nearly
   free, so batched decoding stays bound by the weight stream. A = 16 rows of W read in place, B = x
   (one column per x row), C = 16 outputs x columns. Only where the result is the same as the vector
   path's: bf16 x for bf16 and exact int8 weights (bf16 products are exact), any x for fast int8. ---- */
#ifdef IVL_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static int amx_probed = 0, amx_min_m = 2; /* amx_min_m 0: AMX off */
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    if (!((d >> 22) & 1) || !((d >> 24) & 1) || !((d >> 25) & 1)) return; /* amx-bf16, amx-tile, amx-int8 */
    /* Linux grants the tile register state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
    amx_probed = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

int ivl_amx_available(void) {
    pthread_once(&amx_once, amx_probe);
    return amx_probed;
}

/* From how many rows of x the AMX path runs (0: never). Returns the previous setting. */
int ivl_set_amx_min_rows(int m) {
    int old = amx_min_m;
    amx_min_m = m;
    return old;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Tiles: 1 = A (16 W rows x 64 bytes); 0 and 2 = C and B for x columns 0..15, 3 and 4 for columns
   16..cu-1 when there are more than 16 (fast int8 with 9 to 16 rows of x: two digit columns per row). */
static void amx_config(int cu) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    int c0 = cu < 16 ? cu : 16, c1 = cu - c0;
    c.rows[0] = c.rows[1] = c.rows[2] = 16;
    c.colsb[0] = c.colsb[2] = (uint16_t)(c0 * 4); /* C and B: columns of 4 bytes */
    c.colsb[1] = 64;                              /* A: 64 bytes of a W row */
    if (c1 > 0) {
        c.rows[3] = c.rows[4] = 16;
        c.colsb[3] = c.colsb[4] = (uint16_t)(c1 * 4);
    }
    _tile_loadconfig(&c);
}

/* r[c] (row c, 16 words) becomes r[i] = word i of every row: a 16 x 16 transpose of 32-bit words. */
static inline void transpose16_epi32(__m512i *r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* u[4b + j], 128-bit lane l: rows 4b..4b+3 of word 4l + j */
        __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
        __m512i x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(x0, y0, 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xdd);
    }
}

/* Pair of k that row i of a 16-row B block must hold for the int8 A rows packus builds: A position t
   holds k = 16 * ((t % 8) / 4) + 4 * (t / 8) + t % 4, and pairs stay adjacent. */
static const int AMX_INT8_ORDER[16] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};

/* B for bf16 tiles: out[p][m] = bf16 pair (x[m][2p], x[m][2p + 1]) of a bf16 x, K padded to 32 with zeros.
   B for int8 tiles: out[p][c] = 4 digits (k = 4p..4p+3) of the hi (c < M) or lo (c >= M) digit plane. */
static uint32_t *x_amx(const job_t *j, const void *x, int cu, uint32_t *out) {
    const int K = j->K, M = j->M, fast = j->op == OP_INT8_FAST;
    const int step = fast ? 64 : 32, KP = round_up(K, step), per_word = fast ? 4 : 2;
    __m512i r[16];
    for (int k = 0; k < KP; k += step) /* 16 words of each column, then transposed into 16 rows of B */
        for (int c0 = 0; c0 < cu; c0 += 16) {
            for (int i = 0; i < 16; i++) {
                int c = c0 + i;
                if (c >= cu)
                    r[i] = _mm512_setzero_si512();
                else if (fast) /* column c: the hi (c < M) or lo digits of x row c % M, zero-padded to 64 */
                    r[i] = _mm512_loadu_si512((const int8_t *)j->x + (size_t)(2 * (c % M) + (c >= M)) * j->KX + k);
                else {
                    int rem = K - k;
                    __mmask32 mk = (__mmask32)(rem >= 32 ? 0xffffffffu : (1u << rem) - 1u);
                    r[i] = _mm512_maskz_loadu_epi16(mk, (const uint16_t *)x + (size_t)c * K + k);
                }
            }
            transpose16_epi32(r);
            for (int i = 0; i < 16; i++) {
                __m512i row = r[j->op == OP_INT8 ? AMX_INT8_ORDER[i] : i];
                _mm512_mask_storeu_epi32(out + (size_t)(k / per_word + i) * cu + c0, mask16(cu - c0), row);
            }
        }
    return out;
}

/* The next group of 16 W rows is fetched while this one is multiplied: 16 lines per k step. */
static inline void amx_prefetch_next(const job_t *j, const char *next, int step_bytes, int kb) {
    const char *end = (const char *)j->w + (size_t)j->N * (j->op == OP_BF16 ? 2 : 1) * j->K;
    for (int i = 0; i < step_bytes; i += 64)
        if (next + (size_t)kb * step_bytes + i < end) _mm_prefetch(next + (size_t)kb * step_bytes + i, PF_HINT);
}

static void amx_group(const job_t *j, int g) {
    const int K = j->K, cu = j->cu, M = j->M;
    const int esz = j->op == OP_BF16 ? 2 : 1, kstep = j->op == OP_INT8_FAST ? 64 : 32;
    const size_t ld = (size_t)K * esz;
    const char *w = (const char *)j->w + (size_t)g * ld, *next = w + 16 * ld;
    const uint32_t *b = (const uint32_t *)j->xamx;
    _Alignas(64) uint8_t abuf[16 * 64];
    _Alignas(64) int32_t cbuf[16 * 2 * MAXM];
    const int wide = cu > 16; /* a second C/B tile pair for columns 16.. */
    _tile_zero(0);
    if (wide) _tile_zero(3);
    for (int k = 0, kb = 0; k < K; k += kstep, kb++) {
        amx_prefetch_next(j, next, 16 * kstep * esz, kb); /* what this step consumes of the group */
        if (j->op == OP_INT8) {
            /* Widen 16 x 32 int8 to bf16 into the A buffer: fp32 of an int8 is exact and its low half is
               zero, so the bf16 is its high half. packus interleaves the two halves of k by 128-bit
               lane; x_amx puts B's rows in the same order (AMX_INT8_ORDER). */
            for (int r = 0; r < 16; r++) {
                const int8_t *q = (const int8_t *)(w + r * ld) + k;
                __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask16(K - k), q)));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask16(K - k - 16), q + 16)));
                _mm512_store_si512(abuf + r * 64, _mm512_packus_epi32(_mm512_srli_epi32(_mm512_castps_si512(lo), 16),
                                                                      _mm512_srli_epi32(_mm512_castps_si512(hi), 16)));
            }
            _tile_loadd(1, abuf, 64);
        } else if (k + kstep <= K) {
            _tile_loadd(1, w + (size_t)k * esz, ld);
        } else { /* K tail: the rest of each row, zero-filled, never reading past the row */
            int rem = (K - k) * esz;
            __mmask64 mk = (__mmask64)((1ull << rem) - 1ull);
            for (int r = 0; r < 16; r++)
                _mm512_store_si512(abuf + r * 64, _mm512_maskz_loadu_epi8(mk, w + r * ld + (size_t)k * esz));
            _tile_loadd(1, abuf, 64);
        }
        _tile_loadd(2, b + (size_t)kb * 16 * cu, cu * 4);
        if (j->op == OP_INT8_FAST)
            _tile_dpbssd(0, 1, 2);
        else
            _tile_dpbf16ps(0, 1, 2);
        if (wide) {
            _tile_loadd(4, b + (size_t)kb * 16 * cu + 16, cu * 4);
            if (j->op == OP_INT8_FAST)
                _tile_dpbssd(3, 1, 4);
            else
                _tile_dpbf16ps(3, 1, 4);
        }
    }
    _tile_stored(0, cbuf, cu * 4);
    if (wide) _tile_stored(3, cbuf + 16, cu * 4);
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(cu));
    for (int m = 0; m < M; m++) {
        __m512 v;
        if (j->op == OP_INT8_FAST) { /* 256 * hi + lo digits, in double, times the x row's scale */
            __m512i h = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(m)), cbuf, 4);
            __m512i l = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(M + m)), cbuf, 4);
            __m512d s = _mm512_set1_pd((double)j->xs[m]), c256 = _mm512_set1_pd(256.0);
            __m512d d0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)), c256,
                                         _mm512_cvtepi32_pd(_mm512_castsi512_si256(l)));
            __m512d d1 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)), c256,
                                         _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)));
            v = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_mul_pd(d0, s))),
                                   _mm512_cvtpd_ps(_mm512_mul_pd(d1, s)), 1);
        } else {
            v = _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(m)), cbuf, 4);
        }
        finish_tile(j, g, 16, m, v);
    }
}
#else
int ivl_amx_available(void) { return 0; }
int ivl_set_amx_min_rows(int m) { (void)m; return 0; }
#endif

void job_rows(const job_t *j, int n0, int n1) {
#ifdef IVL_AMX
    if (j->amx) {
        int full = n0 + (n1 - n0) / TILE * TILE;
        if (full > n0) {
            amx_config(j->cu);
            for (int g = n0; g < full; g += TILE) amx_group(j, g);
            _tile_release();
        }
        n0 = full; /* fewer than 16 rows left: the vector path */
    }
#endif
    if (n0 < n1) do_rows_avx(j, n0, n1);
}

int job_init(job_t *j, int op, int xdt, int M, int K, const void *w, const float *scale, int N, const void *bias,
             int bdt, void *y, int ydt, int nthreads) {
    if (M < 1 || M > MAXM || K < 1 || N < 1 || (xdt != DT_F32 && xdt != DT_BF16)) return 1;
    if (op == OP_INT8_FAST && K > FAST_MAX_K) op = OP_INT8;
    const int int4 = op == OP_INT4 || op == OP_INT4_Q8;
    if (op != OP_BF16 && !scale) return 1;
    if (int4 && (K % QK4 || K > INT4_MAX_K)) return 1;
    if (op != OP_BF16 && op != OP_INT8 && op != OP_INT8_FAST && !int4) return 1;
    const int exact = op == OP_INT8 || op == OP_INT4; /* fp32 x rows */
    j->op = op, j->xdt = xdt, j->M = M, j->K = K, j->N = N, j->bdt = bdt, j->ydt = ydt;
    j->w = w, j->scale = op == OP_BF16 || int4 ? NULL : scale, j->bias = bias, j->y = y;
    j->gscale = int4 ? (const uint16_t *)scale : NULL;
    j->x = j->xamx = NULL;
    /* Scratch: x for the vector path (also serving rows that do not fill an AMX tile), then AMX's B. */
    j->row_bytes = int4 ? (size_t)K / 2 : (size_t)K * (op == OP_BF16 ? 2 : 1);
    j->KX = op == OP_BF16 ? round_up((K + 1) / 2, 16)
            : op == OP_INT4_Q8 ? (int)q8_row_bytes(K) : (exact ? K : round_up(K, 64));
    size_t vec_bytes;
    if (op == OP_INT4_Q8)
        vec_bytes = (size_t)M * j->KX;
    else if (op == OP_BF16)
        vec_bytes = (size_t)8 * M * j->KX; /* even and odd fp32 halves */
    else if (exact)
        vec_bytes = xdt == DT_F32 ? 0 : (size_t)4 * M * K; /* fp32 rows */
    else
        vec_bytes = (size_t)2 * M * j->KX; /* two digit planes */
    j->vec_bytes = (vec_bytes + 63) / 64 * 64;
    j->amx_bytes = 0;
    j->amx = 0;
    j->cu = op == OP_INT8_FAST ? 2 * M : M;
#ifdef IVL_AMX
    /* Widening int8 for exact tiles costs about what 3 rows of vector FMAs do: AMX pays from 4 rows. */
    int min_m = op == OP_INT8 && amx_min_m > 0 && amx_min_m < 4 ? 4 : amx_min_m;
    j->amx = min_m > 0 && M >= min_m && N >= TILE && !int4 && (op == OP_INT8_FAST || xdt == DT_BF16) &&
             ivl_amx_available();
    if (j->amx) j->amx_bytes = (size_t)round_up(K, 64) * j->cu * 4;
#endif
    job_split(j, nthreads, TILE);
    return 0;
}

void job_set_x(job_t *j, const void *x, char *buf) {
    if (j->op == OP_BF16)
        j->x = x_even_odd(x, j->xdt, j->M, j->K, j->KX, (float *)buf);
    else if (j->op == OP_INT8 || j->op == OP_INT4)
        j->x = x_f32(x, j->xdt, j->M, j->K, (float *)buf);
    else if (j->op == OP_INT4_Q8)
        q8_set_x(j, x, buf), j->x = buf;
    else
        j->x = x_digits(x, j->xdt, j->M, j->K, j->KX, j->xs, j->xsum, (int8_t *)buf);
#ifdef IVL_AMX
    if (j->amx) j->xamx = x_amx(j, x, j->cu, (uint32_t *)(buf + j->vec_bytes));
#endif
}

/* A pure read of a buffer with the kernels' prefetch distance and threading: the bandwidth ceiling
   the kernels are measured against. Returns a checksum so the reads cannot be optimized away. */
double ivl_read_pass(const void *p, size_t bytes, int nthreads) {
    double total = 0;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        size_t blocks = bytes / 256;
        const char *c = (const char *)p;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t l = blocks * t / T; l < blocks * (t + 1) / T; l++) {
            const char *b = c + l * 256;
            for (int i = 0; i < 256; i += 64) _mm_prefetch(b + PF_BYTES + i, PF_HINT);
            a0 = _mm512_add_ps(a0, _mm512_castsi512_ps(_mm512_loadu_si512(b)));
            a1 = _mm512_add_ps(a1, _mm512_castsi512_ps(_mm512_loadu_si512(b + 64)));
            a2 = _mm512_add_ps(a2, _mm512_castsi512_ps(_mm512_loadu_si512(b + 128)));
            a3 = _mm512_add_ps(a3, _mm512_castsi512_ps(_mm512_loadu_si512(b + 192)));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    return total;
}
