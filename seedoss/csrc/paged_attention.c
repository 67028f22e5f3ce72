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

/* element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array, as a float */
#define LOAD(p, i) (bf16 ? bf16_to_f32(((const uint16_t *)(p))[i]) : ((const float *)(p))[i])

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
        for (int64_t i = 0; i < heads * D; i++) qf[i] = LOAD(q, b * heads * D + i);
        for (int64_t j = 0; j < len; j++) {
            const int64_t k = slot[j] * row;
            for (int64_t h = 0; h < heads; h++) {
                const float *qh = qf + h * D;
                const int64_t kh = k + (h / group) * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qh[d] * LOAD(k_cache, kh + d);
                scores[h * len + j] = dot * scale;
            }
        }
        for (int64_t h = 0; h < heads; h++) {
            float *s = scores + h * len, m = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < len; j++) m = s[j] > m ? s[j] : m;
            for (int64_t j = 0; j < len; j++) {
                s[j] = expf(s[j] - m);
                sum += s[j];
            }
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < len; j++) s[j] *= inv;
        }
        memset(acc, 0, sizeof(float) * heads * D);
        for (int64_t j = 0; j < len; j++) {
            const int64_t v = slot[j] * row;
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[h * len + j];
                const int64_t vh = v + (h / group) * D;
                float *a = acc + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * LOAD(v_cache, vh + d);
            }
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
