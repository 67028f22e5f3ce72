/* Decode attention straight out of the paged KV cache (float32 or bfloat16, CPU).
 *
 * One query token per sequence (a decode step). Sequence b attends to the keys/values stored at flat cache slots
 * slots[b, 0 .. lens[b]-1]; the cache of one layer is [num_slots, kv_heads, head_dim] and query head h reads
 * kv head h / (heads / kv_heads) (grouped-query attention). Reading rows in place avoids the per-layer copy of
 * every context that `k_cache[slots]` + SDPA makes. Sequences are spread over OpenMP threads (the libgomp that
 * torch already loaded, so both share one thread pool); a single sequence skips the thread team's fork and join.
 * bfloat16 tensors are read into float32 and everything is computed in float32 (torch's CPU attention accumulates
 * in float32 too); only the output is rounded to bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* exp(x) for x <= 0 (softmax weights: a score minus the row's maximum), to about 1 ulp: Cephes' expf (x = n ln2 + r,
 * a degree-6 polynomial in r, times 2^n), in plain arithmetic so that a loop of it vectorizes; libm's expf is a
 * scalar call per score, which made it most of this kernel's time at 32 sequences x 200 tokens. Below -87.3 (where
 * expf leaves the normal range) it returns exp(-87.3) ~ 1e-38 instead of a denormal or 0. */
static inline float exp_nonpositive(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n: n is in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* q . row and acc += p * row over D elements of a cache row of float32 (bf16 = 0) or bfloat16 (bf16 = 1); the type
 * test sits outside each loop so both loops vectorize. */
static inline float dot(const float *q, const void *row, int64_t D, const int bf16) {
    float sum = 0.f;
    if (bf16) {
        const uint16_t *r = row;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < D; d++) sum += q[d] * bf16_to_f32(r[d]);
    } else {
        const float *r = row;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < D; d++) sum += q[d] * r[d];
    }
    return sum;
}

static inline void axpy(float *acc, float p, const void *row, int64_t D, const int bf16) {
    if (bf16) {
        const uint16_t *r = row;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) acc[d] += p * bf16_to_f32(r[d]);
    } else {
        const float *r = row;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) acc[d] += p * r[d];
    }
}

/* The kernel for both element types: inlined into each entry point with `bf16` a constant, so the compiler
 * specializes it (no per-element branch). */
static inline __attribute__((always_inline)) int decode_attention(
    const void *q, const void *k_cache, const void *v_cache, const int64_t *slots, const int64_t *lens, void *out,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_kv, float scale, int num_threads,
    const int bf16) {
    const int64_t group = heads / kv_heads, D = head_dim, row = kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (batch > 1)
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b];
        const int64_t *slot = slots + b * max_kv;
        float *buf = malloc(sizeof(float) * heads * (2 * D + len));  /* query, output (float32), scores */
        if (buf == NULL) {
            failed = 1;
            continue;
        }
        float *qf = buf, *acc = buf + heads * D, *scores = buf + 2 * heads * D;
        for (int64_t i = 0; i < heads * D; i++)
            qf[i] = bf16 ? bf16_to_f32(((const uint16_t *)q)[b * heads * D + i]) : ((const float *)q)[b * heads * D + i];
        const int64_t size = bf16 ? 2 : 4;  /* bytes per element */
        for (int64_t j = 0; j < len; j++) {
            const char *k = (const char *)k_cache + slot[j] * row * size;
            for (int64_t h = 0; h < heads; h++)
                scores[h * len + j] = dot(qf + h * D, k + (h / group) * D * size, D, bf16) * scale;
        }
        for (int64_t h = 0; h < heads; h++) {
            float *s = scores + h * len, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < len; j++) m = s[j] > m ? s[j] : m;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < len; j++) {
                s[j] = exp_nonpositive(s[j] - m);
                sum += s[j];
            }
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < len; j++) s[j] *= inv;
        }
        memset(acc, 0, sizeof(float) * heads * D);
        for (int64_t j = 0; j < len; j++) {
            const char *v = (const char *)v_cache + slot[j] * row * size;
            for (int64_t h = 0; h < heads; h++) axpy(acc + h * D, scores[h * len + j], v + (h / group) * D * size, D, bf16);
        }
        for (int64_t i = 0; i < heads * D; i++) {
            if (bf16)
                ((uint16_t *)out)[b * heads * D + i] = f32_to_bf16(acc[i]);
            else
                ((float *)out)[b * heads * D + i] = acc[i];
        }
        free(buf);
    }
    return failed;
}

int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                           const int64_t *lens, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t max_kv, float scale, int num_threads) {
    return decode_attention(q, k_cache, v_cache, slots, lens, out, batch, heads, kv_heads, head_dim, max_kv, scale,
                            num_threads, 0);
}

int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int64_t *slots, const int64_t *lens, uint16_t *out, int64_t batch,
                                int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_kv, float scale,
                                int num_threads) {
    return decode_attention(q, k_cache, v_cache, slots, lens, out, batch, heads, kv_heads, head_dim, max_kv, scale,
                            num_threads, 1);
}
