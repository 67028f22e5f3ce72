/* Rotary embedding of q and k and the KV-cache write of a step's tokens, fused into one pass (float32, CPU).
 *
 * In torch this is a chain of small ops (slice, neg, cat, two muls, add, then two index_copy_ into the cache and a
 * copy to make q contiguous), each a separate pass, allocation and OpenMP region: 3-4x slower at 1-512 tokens.
 * Tokens are spread over OpenMP threads (the libgomp torch already loaded). Results are bit-identical to the torch
 * ops: no FMA contraction (torch computes x * cos and rotated * sin as separate products, then adds).
 * (silu(gate) * up is left to torch: its vectorized exp is 3x faster than a scalar expf loop here.)
 */
#include <stdint.h>
#include <string.h>

#define NO_FMA __attribute__((optimize("fp-contract=off")))

/* x [half * 2] rotated NeoX style (rotate halves) into out: out = x * cos + rotate_half(x) * sin. */
static inline NO_FMA void rotate(const float *x, const float *cos, const float *sin, float *out, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < dim; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* qkv [tokens, heads + 2 * kv_heads, dim]: the fused q/k/v projection of a step's tokens; cos, sin [tokens, dim].
 * Writes rotated q to q_out [tokens, heads, dim] and rotated k to k_out [tokens, kv_heads, dim], and stores
 * token t's rotated k and its v at flat cache slot write[t] of k_cache / v_cache [slots, kv_heads, dim]. */
NO_FMA void rotary_store_kv(const float *qkv, const float *cos, const float *sin, float *q_out, float *k_out,
                            float *k_cache, float *v_cache, const int64_t *write, int64_t tokens, int64_t heads,
                            int64_t kv_heads, int64_t dim, int num_threads) {
    const int64_t width = (heads + 2 * kv_heads) * dim, kv_row = kv_heads * dim;
#pragma omp parallel for num_threads(num_threads) if (tokens > 1)
    for (int64_t t = 0; t < tokens; t++) {
        const float *x = qkv + t * width, *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) rotate(x + h * dim, c, s, q_out + (t * heads + h) * dim, dim);
        for (int64_t h = 0; h < kv_heads; h++) rotate(x + (heads + h) * dim, c, s, k_out + t * kv_row + h * dim, dim);
        memcpy(k_cache + write[t] * kv_row, k_out + t * kv_row, sizeof(float) * kv_row);
        memcpy(v_cache + write[t] * kv_row, x + (heads + kv_heads) * dim, sizeof(float) * kv_row);
    }
}
