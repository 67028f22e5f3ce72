/* Rotary embedding of q and k and the KV-cache write of a step's tokens, fused into one pass (float32 or bfloat16,
 * CPU).
 *
 * In torch this is a chain of small ops (slice, neg, cat, two muls, add, then two index_copy_ into the cache and a
 * copy to make q contiguous), each a separate pass, allocation and OpenMP region: 3-4x slower at 1-512 tokens.
 * Tokens are spread over OpenMP threads (the libgomp torch already loaded). Results are bit-identical to the torch
 * ops: no FMA contraction (torch computes x * cos and rotated * sin as separate products, then adds), and in
 * bfloat16 each product and the sum are rounded to bfloat16 as torch's bfloat16 ops round every result.
 * (silu(gate) * up is left to torch: its vectorized exp is 3x faster than a scalar expf loop here.)
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define NO_FMA __attribute__((optimize("fp-contract=off")))

static inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

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
