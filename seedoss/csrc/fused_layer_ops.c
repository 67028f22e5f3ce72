/* Rotary embedding of q and k and the KV-cache write of a step's tokens, fused into one pass (float32 or bfloat16,
 * CPU).
 *
 * In torch this is a chain of small ops (slice, neg, cat, two muls, add, then two index_copy_ into the cache and a
 * copy to make q contiguous), each a separate pass, allocation and OpenMP region: 3-4x slower at 1-512 tokens.
 * Tokens are spread over OpenMP threads (the libgomp torch already loaded). Results are bit-identical to the torch
 * ops: no FMA contraction (torch computes x * cos and rotated * sin as separate products, then adds), and in
 * bfloat16 each product and the sum are rounded to bfloat16 as torch's bfloat16 ops round every result.
 *
 * Also RMSNorm (optionally after the residual add) and SiLU(gate) * up: in torch 4-7 ops each (F.rms_norm runs
 * pow, mean, add, rsqrt and two muls on CPU), one pass here. These follow torch's arithmetic op for op (the residual
 * sum, x * rsqrt(mean(x^2) + eps) then weight * that; x / (1 + exp(-x)) then * up) except the order of the sum of
 * squares and the exp (csrc/expf.h, to about 1 ulp), so results match torch's within float rounding, not bit for
 * bit; in bfloat16 each value torch rounds to bfloat16 is rounded here too. Rows are independent and each row's
 * arithmetic is fixed, so a row's result does not depend on its batch.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "expf.h"

#define NO_FMA __attribute__((optimize("fp-contract=off")))

/* x [half * 2] rotated NeoX style (rotate halves) into out: out = x * cos + rotate_half(x) * sin. */
static inline NO_FMA void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < dim; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

static inline NO_FMA void rotate_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out,
                               int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < dim; i++) {
        const float rotated = i < half ? -bf16_to_f32(x[i + half]) : bf16_to_f32(x[i - half]);
        out[i] = f32_to_bf16(round_bf16(bf16_to_f32(x[i]) * bf16_to_f32(cos[i]))
                             + round_bf16(rotated * bf16_to_f32(sin[i])));
    }
}

/* qkv [tokens, heads + 2 * kv_heads, dim]: the fused q/k/v projection of a step's tokens; cos, sin [tokens, dim].
 * Writes rotated q to q_out [tokens, heads, dim] and rotated k to k_out [tokens, kv_heads, dim], and stores
 * token t's rotated k and its v at flat cache slot write[t] of k_cache / v_cache [slots, kv_heads, dim].
 * `size`: bytes per element, 4 (float32) or 2 (bfloat16); inlined with a constant, so each entry point is
 * specialized. */
static inline __attribute__((always_inline)) NO_FMA void rotary_store(
    const void *qkv, const void *cos, const void *sin, void *q_out, void *k_out, void *k_cache, void *v_cache,
    const int64_t *write, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, int num_threads,
    const int size) {
    const int64_t width = (heads + 2 * kv_heads) * dim, kv_row = kv_heads * dim;
#define AT(p, i) ((char *)(p) + (i) * size)
#pragma omp parallel for num_threads(num_threads) if (tokens > 1)
    for (int64_t t = 0; t < tokens; t++) {
        const char *x = AT(qkv, t * width), *c = AT(cos, t * dim), *s = AT(sin, t * dim);
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            void *dst = h < heads ? AT(q_out, (t * heads + h) * dim) : AT(k_out, t * kv_row + (h - heads) * dim);
            if (size == 2)
                rotate_bf16((const uint16_t *)x + h * dim, (const uint16_t *)c, (const uint16_t *)s, dst, dim);
            else
                rotate((const float *)x + h * dim, (const float *)c, (const float *)s, dst, dim);
        }
        memcpy(AT(k_cache, write[t] * kv_row), AT(k_out, t * kv_row), size * kv_row);
        memcpy(AT(v_cache, write[t] * kv_row), x + (heads + kv_heads) * dim * size, size * kv_row);
    }
#undef AT
}

NO_FMA void rotary_store_kv(const float *qkv, const float *cos, const float *sin, float *q_out, float *k_out,
                            float *k_cache, float *v_cache, const int64_t *write, int64_t tokens, int64_t heads,
                            int64_t kv_heads, int64_t dim, int num_threads) {
    rotary_store(qkv, cos, sin, q_out, k_out, k_cache, v_cache, write, tokens, heads, kv_heads, dim, num_threads, 4);
}

NO_FMA void rotary_store_kv_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *q_out,
                                 uint16_t *k_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *write,
                                 int64_t tokens, int64_t heads, int64_t kv_heads, int64_t dim, int num_threads) {
    rotary_store(qkv, cos, sin, q_out, k_out, k_cache, v_cache, write, tokens, heads, kv_heads, dim, num_threads, 2);
}

/* Row `o / dim` of rows x dim: out = weight * rms_norm(x) (residual_out == NULL), or residual_out = x + residual and
 * out = weight * rms_norm(residual_out) (the residual add of a decoder layer and the next norm in one pass).
 * bfloat16 as the reference model does it: the sum rounded, normalized in float32, rounded, then times the weight
 * and rounded. Inlined into the typed entry points' OpenMP loops, so `bf16` is a literal there (paged_attention.c
 * says why). */
static inline __attribute__((always_inline)) NO_FMA void add_rms_norm_row(
    const void *x, const void *residual, const void *weight, void *residual_out, void *out, int64_t o, int64_t dim,
    float eps, const int bf16) {
    const void *h = x;
    if (residual_out != NULL) {
        for (int64_t i = 0; i < dim; i++) STORE(residual_out, o + i, LOAD(x, o + i) + LOAD(residual, o + i));
        h = residual_out;
    }
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < dim; i++) squares += LOAD(h, o + i) * LOAD(h, o + i);
    const float inv = 1.f / sqrtf(squares / (float)dim + eps);
    for (int64_t i = 0; i < dim; i++) {
        const float normed = LOAD(h, o + i) * inv;
        STORE(out, o + i, LOAD(weight, i) * (bf16 ? round_bf16(normed) : normed));
    }
}

NO_FMA void rms_norm(const float *x, const float *residual, const float *weight, float *residual_out, float *out,
                     int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) add_rms_norm_row(x, residual, weight, residual_out, out, r * dim, dim, eps, 0);
}

NO_FMA void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *residual_out,
                          uint16_t *out, int64_t rows, int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) add_rms_norm_row(x, residual, weight, residual_out, out, r * dim, dim, eps, 1);
}

/* Row r of gate_up [rows, 2 * inter] (gate ; up) -> out [rows, inter] = silu(gate) * up, silu(g) = g / (1 + exp(-g))
 * written with exp of a non-positive argument only (g * e / (1 + e), e = exp(g), for g < 0), so nothing overflows. */
static inline __attribute__((always_inline)) NO_FMA void silu_mul_row(const void *gate_up, void *out, int64_t r,
                                                                      int64_t inter, const int bf16) {
    const int64_t in = r * 2 * inter, o = r * inter;
#pragma omp simd
    for (int64_t i = 0; i < inter; i++) {
        const float g = LOAD(gate_up, in + i);
        const float e = exp_nonpositive(g < 0.f ? g : -g);
        float s = (g < 0.f ? g * e : g) / (1.f + e);
        if (bf16) s = round_bf16(s);
        STORE(out, o + i, s * LOAD(gate_up, in + inter + i));
    }
}

NO_FMA void silu_and_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up, out, r, inter, 0);
}

NO_FMA void silu_and_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * inter >= 65536)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate_up, out, r, inter, 1);
}
