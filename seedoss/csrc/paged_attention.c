/* Decode attention straight out of the paged KV cache (float32 or bfloat16, CPU).
 *
 * One query token per sequence (a decode step). Sequence b attends to the keys/values stored at flat cache slots
 * slots[b, 0 .. lens[b]-1]; the cache of one layer is [num_slots, kv_heads, head_dim] and query head h reads
 * kv head h / (heads / kv_heads) (grouped-query attention). Reading rows in place avoids the per-layer copy of
 * every context that `k_cache[slots]` + SDPA makes. Sequences are spread over OpenMP threads (the libgomp that
 * torch already loaded, so both share one thread pool). Fewer sequences than threads are split by kv head (each
 * item: one group of query heads over that kv head's slice of the rows), so that a lone sequence uses every thread
 * too (512 cached tokens: 46 -> 35-38 us per layer call in float32, 62 -> 42-43 us in bfloat16, 2 threads,
 * bench/RESULTS.md); more are
 * not: whole rows per item read the cache in longer runs. Each head's arithmetic is the same either way.
 * bfloat16 tensors are read into float32 and everything is computed in float32 (torch's CPU attention accumulates
 * in float32 too); only the output is rounded to bfloat16.
 *
 * Speed: a score is a head_dim-long dot product ending in a horizontal sum, and a value row is added into an
 * accumulator that lives in memory; one key at a time, both are chains of dependent instructions. Scores are
 * computed 8 keys at a time (8 independent sums per pass over the query) and values added 4 keys at a time (one
 * load and store of the accumulator per 4 rows): 32 sequences x 1,100 cached tokens, 2.4 -> 1.35 ms per layer call;
 * x 200 tokens, 0.46 -> 0.25 ms (float32, 2 threads). The softmax is vectorized too (below).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "expf.h"

/* Sequence b's attention for the query heads of kv heads [g, g + kv_count), written to out. Always inlined into
 * the typed entry points below, inside their OpenMP loops: `bf16` is then a literal in the outlined loop body (a
 * value captured by the parallel region would be a runtime test in every inner loop, which kept them from
 * vectorizing: 3.6x slower). */
static inline __attribute__((always_inline)) int attend(
    int64_t b, int64_t g, int64_t kv_count, const void *q, const void *k_cache, const void *v_cache,
    const int64_t *slots, const int64_t *lens, void *out, int64_t all_heads, int64_t kv_heads, int64_t D,
    int64_t max_kv, float scale, const int bf16) {
    const int64_t group = all_heads / kv_heads, heads = kv_count * group, row = kv_heads * D, size = bf16 ? 2 : 4;
    const int64_t len = lens[b], first = (b * all_heads + g * group) * D; /* this item's q and output rows */
    const int64_t *slot = slots + b * max_kv;
    float *buf = malloc(sizeof(float) * heads * (2 * D + len)); /* query, output (float32), scores */
    if (buf == NULL) return 1;
    float *qf = buf, *acc = buf + heads * D, *scores = buf + 2 * heads * D;
    for (int64_t i = 0; i < heads * D; i++) qf[i] = LOAD(q, first + i);
    /* cache row j from kv head g on */
#define ROW(cache, j) ((const char *)(cache) + (slot[j] * row + g * D) * size)

    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        const char *k[8];
        for (int i = 0; i < 8; i++) k[i] = ROW(k_cache, j + i);
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = qf + h * D;
            const int64_t o = (h / group) * D * size;
            const char *k0 = k[0] + o, *k1 = k[1] + o, *k2 = k[2] + o, *k3 = k[3] + o;
            const char *k4 = k[4] + o, *k5 = k[5] + o, *k6 = k[6] + o, *k7 = k[7] + o;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
            for (int64_t d = 0; d < D; d++) {
                const float x = qh[d];
                s0 += x * LOAD(k0, d); s1 += x * LOAD(k1, d); s2 += x * LOAD(k2, d); s3 += x * LOAD(k3, d);
                s4 += x * LOAD(k4, d); s5 += x * LOAD(k5, d); s6 += x * LOAD(k6, d); s7 += x * LOAD(k7, d);
            }
            float *s = scores + h * len + j;
            s[0] = s0 * scale; s[1] = s1 * scale; s[2] = s2 * scale; s[3] = s3 * scale;
            s[4] = s4 * scale; s[5] = s5 * scale; s[6] = s6 * scale; s[7] = s7 * scale;
        }
    }
    for (; j < len; j++) {
        const char *k = ROW(k_cache, j);
        for (int64_t h = 0; h < heads; h++) {
            const float *qh = qf + h * D;
            const char *kh = k + (h / group) * D * size;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; d++) s += qh[d] * LOAD(kh, d);
            scores[h * len + j] = s * scale;
        }
    }

    for (int64_t h = 0; h < heads; h++) {
        float *s = scores + h * len, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < len; i++) m = s[i] > m ? s[i] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < len; i++) {
            s[i] = exp_nonpositive(s[i] - m);
            sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < len; i++) s[i] *= inv;
    }

    memset(acc, 0, sizeof(float) * heads * D);
    for (j = 0; j + 4 <= len; j += 4) {
        const char *v0 = ROW(v_cache, j), *v1 = ROW(v_cache, j + 1);
        const char *v2 = ROW(v_cache, j + 2), *v3 = ROW(v_cache, j + 3);
        for (int64_t h = 0; h < heads; h++) {
            const float *p = scores + h * len + j;
            const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
            const int64_t o = (h / group) * D * size;
            const char *r0 = v0 + o, *r1 = v1 + o, *r2 = v2 + o, *r3 = v3 + o;
            float *a = acc + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++)
                a[d] += p0 * LOAD(r0, d) + p1 * LOAD(r1, d) + p2 * LOAD(r2, d) + p3 * LOAD(r3, d);
        }
    }
    for (; j < len; j++) {
        const char *v = ROW(v_cache, j);
        for (int64_t h = 0; h < heads; h++) {
            const float p = scores[h * len + j];
            const char *vh = v + (h / group) * D * size;
            float *a = acc + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) a[d] += p * LOAD(vh, d);
        }
    }
#undef ROW

    for (int64_t i = 0; i < heads * D; i++) STORE(out, first + i, acc[i]);
    free(buf);
    return 0;
}

int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                           const int64_t *lens, float *out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t max_kv, float scale, int num_threads) {
    int failed = 0;
    const int64_t split = batch < num_threads ? kv_heads : 1, items = batch * split, kv_count = kv_heads / split;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (items > 1) reduction(| : failed)
    for (int64_t item = 0; item < items; item++)
        failed |= attend(item / split, item % split * kv_count, kv_count, q, k_cache, v_cache, slots, lens, out,
                         heads, kv_heads, head_dim, max_kv, scale, 0);
    return failed;
}

int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                const int64_t *slots, const int64_t *lens, uint16_t *out, int64_t batch,
                                int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_kv, float scale,
                                int num_threads) {
    int failed = 0;
    const int64_t split = batch < num_threads ? kv_heads : 1, items = batch * split, kv_count = kv_heads / split;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (items > 1) reduction(| : failed)
    for (int64_t item = 0; item < items; item++)
        failed |= attend(item / split, item % split * kv_count, kv_count, q, k_cache, v_cache, slots, lens, out,
                         heads, kv_heads, head_dim, max_kv, scale, 1);
    return failed;
}
