/* Weight formats shared by every kernel variant (quant.c is portable C, compiled into each library).

   int8: one fp32 scale per output row, q in [-127, 127].
   int4 (llama.cpp's Q4_0 layout): groups of QK4 = 32 consecutive weights of a row share one fp16 scale d;
   a weight is (u - 8) * d with u in [0, 15]. Byte i of a group's 16 holds u[i] in its low nibble and
   u[i + 16] in its high nibble, so the low nibbles of 16 bytes are elements 0..15, the high 16..31. */
#ifndef IVL_QUANT_H
#define IVL_QUANT_H

#include <stdint.h>
#include <string.h>

#define QK4 32
#define INT4_MAX_K 65536 /* per-row scale buffers on the stack stay small */

enum { QDT_F32 = 0, QDT_BF16 = 1 };

static inline float q_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, round to nearest even, NaN kept quiet (as torch's .to(torch.bfloat16)); branch-free, so loops
of it vectorize. */
static inline uint16_t q_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    return (uint16_t)(nan ? (u >> 16) | 0x40 : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif
