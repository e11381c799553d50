/* Quantize and dequantize the weight formats of quant.h: plain C (the compiler vectorizes the loops with each
   variant's flags), matching the torch functions of kernels/ops.py bit for bit. */
#include "quant.h"

#include <immintrin.h>
#include <math.h>

/* Symmetric per-row int8: scale = max|w| / 127 (1 for an all-zero row), q = round_half_even(w * (1 / scale)). */
int ivl_quantize_int8(const void *w, int wdt, int N, int K, int8_t *q, float *scale, int nthreads) {
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t *wb = (const uint16_t *)w + (size_t)n * K;
        const float *wf = (const float *)w + (size_t)n * K;
        float amax = 0.0f;
        for (int k = 0; k < K; k++) {
            float v = wdt == QDT_BF16 ? q_bf16_to_f32(wb[k]) : wf[k];
            amax = fmaxf(amax, v < 0 ? -v : v);
        }
        float s = amax > 0 ? amax / 127.0f : 1.0f, inv = 1.0f / s;
        scale[n] = s;
        for (int k = 0; k < K; k++) {
            float r = __builtin_nearbyintf((wdt == QDT_BF16 ? q_bf16_to_f32(wb[k]) : wf[k]) * inv);
            q[(size_t)n * K + k] = (int8_t)(r > 127.0f ? 127 : (r < -127.0f ? -127 : r));
        }
    }
    return 0;
}

/* n values of v to out + i in fp32 or bf16 (separate loops, so each vectorizes). */
static inline void store_row(void *out, int odt, size_t i, const float *v, int n) {
    if (odt == QDT_BF16) {
        uint16_t *o = (uint16_t *)out + i;
        for (int k = 0; k < n; k++) o[k] = q_f32_to_bf16(v[k]);
    } else {
        memcpy((float *)out + i, v, (size_t)n * 4);
    }
}

/* out[N, K] = q * scale[:, None] in fp32 or bf16: the weight for inputs with too many rows for the
   streaming kernels (prefill), where a dense matmul wins. Blocks of 256 of a row go through a stack buffer. */
int ivl_dequantize_int8(const int8_t *q, const float *scale, int N, int K, void *out, int odt, int nthreads) {
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *qr = q + (size_t)n * K;
        const float s = scale[n];
        float v[256];
        for (int k0 = 0; k0 < K; k0 += 256) {
            int cnt = K - k0 < 256 ? K - k0 : 256;
            for (int k = 0; k < cnt; k++) v[k] = (float)qr[k0 + k] * s;
            store_row(out, odt, (size_t)n * K + k0, v, cnt);
        }
    }
    return 0;
}

/* out[N, K] = (u - 8) * d per group (quant.h's int4), in fp32 or bf16. K must be a multiple of QK4. */
int ivl_dequantize_int4(const uint8_t *q, const uint16_t *scale, int N, int K, void *out, int odt, int nthreads) {
    if (K % QK4) return 1;
    const int G = K / QK4;
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < G; g++) {
            const uint8_t *b = q + (size_t)n * (K / 2) + (size_t)g * (QK4 / 2);
            const float d = _cvtsh_ss(scale[(size_t)n * G + g]);
            float v[QK4];
            for (int i = 0; i < QK4 / 2; i++) {
                v[i] = (float)((int)(b[i] & 15) - 8) * d;
                v[i + QK4 / 2] = (float)((int)(b[i] >> 4) - 8) * d;
            }
            store_row(out, odt, (size_t)n * K + (size_t)g * QK4, v, QK4);
        }
    }
    return 0;
}
