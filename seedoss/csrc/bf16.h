/* bfloat16 <-> float32 for the kernels: a bfloat16 is the top half of a float32. */
#ifndef SEEDOSS_BF16_H
#define SEEDOSS_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch converts (NaN stays a quiet NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

/* Element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array, read as float32 / stored from float32 (rounded).
 * `bf16` is whatever name is in scope where these are used: the kernels keep it a literal there (each typed entry
 * point inlines the shared body inside its own OpenMP loop), so every loop is compiled for one type; a runtime value
 * would put the test inside the loops and keep them from vectorizing (paged_attention.c). */
#define LOAD(p, i) (bf16 ? bf16_to_f32(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])
#define STORE(p, i, v) (bf16 ? (void)(((uint16_t *)(p))[i] = f32_to_bf16(v)) : (void)(((float *)(p))[i] = (v)))
#endif
