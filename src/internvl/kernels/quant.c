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

static inline void store(void *out, int odt, size_t i, float v) {
    if (odt == QDT_BF16)
        ((uint16_t *)out)[i] = q_f32_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* out[N, K] = q * scale[:, None] in fp32 or bf16: the weight for inputs with too many rows for the
   streaming kernels (prefill), where a dense matmul wins. */
int ivl_dequantize_int8(const int8_t *q, const float *scale, int N, int K, void *out, int odt, int nthreads) {
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *qr = q + (size_t)n * K;
        const float s = scale[n];
        size_t base = (size_t)n * K;
        if (odt == QDT_BF16)
            for (int k = 0; k < K; k++) ((uint16_t *)out)[base + k] = q_f32_to_bf16((float)qr[k] * s);
        else
            for (int k = 0; k < K; k++) ((float *)out)[base + k] = (float)qr[k] * s;
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
            size_t base = (size_t)n * K + (size_t)g * QK4;
            for (int i = 0; i < QK4 / 2; i++) {
                store(out, odt, base + i, (float)((int)(b[i] & 15) - 8) * d);
                store(out, odt, base + i + QK4 / 2, (float)((int)(b[i] >> 4) - 8) * d);
            }
        }
    }
    return 0;
}
