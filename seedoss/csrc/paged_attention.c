/* Decode attention straight out of the paged KV cache (float32, CPU).
 *
 * One query token per sequence (a decode step). Sequence b attends to the keys/values stored at flat cache slots
 * slots[b, 0 .. lens[b]-1]; the cache of one layer is [num_slots, kv_heads, head_dim] and query head h reads
 * kv head h / (heads / kv_heads) (grouped-query attention). Reading rows in place avoids the per-layer copy of
 * every context that `k_cache[slots]` + SDPA makes. Sequences are spread over OpenMP threads (the libgomp that
 * torch already loaded, so both share one thread pool); a single sequence skips the thread team's fork and join.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                           const int64_t *lens, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t max_kv, float scale, int num_threads) {
    const int64_t group = heads / kv_heads, D = head_dim, row = kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (batch > 1)
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b];
        const int64_t *slot = slots + b * max_kv;
        const float *qb = q + b * heads * D;
        float *acc = out + b * heads * D;
        float *scores = malloc(sizeof(float) * heads * len);
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        for (int64_t j = 0; j < len; j++) {
            const float *k = k_cache + slot[j] * row;
            for (int64_t h = 0; h < heads; h++) {
                const float *qh = qb + h * D, *kh = k + (h / group) * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qh[d] * kh[d];
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
            const float *v = v_cache + slot[j] * row;
            for (int64_t h = 0; h < heads; h++) {
                const float p = scores[h * len + j], *vh = v + (h / group) * D;
                float *a = acc + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * vh[d];
            }
        }
        free(scores);
    }
    return failed;
}
