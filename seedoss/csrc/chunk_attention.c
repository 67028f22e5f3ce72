/* Attention of prompts and prompt chunks straight out of the paged KV cache (float32 or bfloat16, CPU).
 *
 * A run is n > 1 new tokens of one sequence whose first `ctx` tokens are already cached: a whole prompt (ctx 0),
 * a prompt continued after a prefix-cache hit, or a later chunk of a long prompt split over steps. Its query i sits
 * at position ctx + i and attends to keys 0 .. ctx + i (causal, lower right); the run's own keys were written to the
 * cache by `rotary_store_kv` before this runs. In torch a chunk was a gather of its whole context per layer
 * (`k_cache[slots]`) plus a masked SDPA call: 32 requests sharing a 1,024-token system prompt spent a third of each
 * prefill step there (bench/RESULTS.md); whole prompts took torch's causal flash kernel, 1.6x slower at 512 tokens.
 *
 * Flash-attention style, one task per (run, kv head, tile of query positions): the tile's rows are its positions
 * x the query heads that share the kv head (grouped-query attention), so each block of KB keys is read from the
 * cache once per tile and used by all of them. Per block: the keys are gathered transposed (key index fastest)
 * and the values row by row into small buffers, scores are a register-tiled product of 4 rows x KB keys, then an
 * online softmax (running max and sum per row; earlier partial sums rescaled when the max grows) and a 4-row tiled
 * product with the values. Vectors are GCC vector extensions of 16 floats: AVX-512 registers where the CPU has
 * them, pairs of AVX2 registers elsewhere (the library is built with -march=native). Tasks are spread over OpenMP
 * threads (the libgomp torch already loaded). Arithmetic is float32 throughout (bfloat16 is read into float32 and
 * only the output rounded), so results match torch's SDPA within float rounding, not bit for bit: the scale is
 * folded into the query, and sums run in a different order. A row's arithmetic depends only on its own position
 * and context (key blocks start at key 0 whatever the tiling; blocks past its position add exact zeros), so its
 * result does not depend on the other runs of the step, the tiling or the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "expf.h"

#define KB 64        /* keys per block: one cache line of scores per row */
#define TILE_ROWS 128 /* about this many query rows (positions x grouped heads) per task */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* s[r][0..KB) = q[r] . kt[.][0..KB) for rows r0 .. r0+3; kt is [D][KB] (keys transposed). */
static inline __attribute__((always_inline)) void scores4(const float *q, const float *kt, float *s, int64_t D) {
    v16 a[4][KB / 16];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < KB / 16; c++) a[r][c] = (v16){0};
    for (int64_t d = 0; d < D; d++) {
        v16 k[KB / 16];
#pragma GCC unroll 4
        for (int c = 0; c < KB / 16; c++) k[c] = load16(kt + d * KB + c * 16);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const float x = q[r * D + d];
#pragma GCC unroll 4
            for (int c = 0; c < KB / 16; c++) a[r][c] += x * k[c];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < KB / 16; c++) store16(s + r * KB + c * 16, a[r][c]);
}

/* acc[r][d0 .. d0 + 16 * units) += sum_j p[r][j] v[j][...] for rows r0 .. r0+3 over `keys` keys; v is [KB][D]. */
static inline __attribute__((always_inline)) void values4(const float *p, const float *v, float *acc, int64_t D,
                                                          int64_t d0, int64_t keys, const int units) {
    v16 a[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < units; c++) a[r][c] = load16(acc + r * D + d0 + c * 16);
    for (int64_t j = 0; j < keys; j++) {
        v16 x[4];
#pragma GCC unroll 4
        for (int c = 0; c < units; c++) x[c] = load16(v + j * D + d0 + c * 16);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const float w = p[r * KB + j];
#pragma GCC unroll 4
            for (int c = 0; c < units; c++) a[r][c] += w * x[c];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int c = 0; c < units; c++) store16(acc + r * D + d0 + c * 16, a[r][c]);
}

/* One task: query positions [i0, i1) of the run that starts at packed token `start`, over kv head `kvh`.
 * Always inlined into the typed entry points (see paged_attention.c: a captured `bf16` kept loops from
 * vectorizing). */
static inline __attribute__((always_inline)) int chunk_task(
    int64_t start, int64_t ctx, const int64_t *slot, int64_t kvh, int64_t i0, int64_t i1, const void *q,
    const void *k_cache, const void *v_cache, void *out, int64_t heads, int64_t kv_heads, int64_t D, float scale,
    const int bf16) {
    const int64_t group = heads / kv_heads, rows = (i1 - i0) * group, padded = (rows + 3) & ~(int64_t)3;
    const int64_t size = bf16 ? 2 : 4, kv_row = kv_heads * D, end = ctx + i1; /* keys [0, end) */
    const size_t floats = 2 * padded * D + padded * KB + 2 * KB * D + 2 * padded;
    float *buf = aligned_alloc(64, (sizeof(float) * floats + 63) & ~(size_t)63);
    if (buf == NULL) return 1;
    float *qf = buf, *acc = qf + padded * D, *s = acc + padded * D, *kt = s + padded * KB, *vb = kt + KB * D;
    float *m = vb + KB * D, *l = m + padded;
    /* row r: position i0 + r / group, query head kvh * group + r % group */
#define QROW(r) (((start + i0 + (r) / group) * heads + kvh * group + (r) % group) * D)
    for (int64_t r = 0; r < padded; r++) {
        for (int64_t d = 0; d < D; d++) qf[r * D + d] = r < rows ? LOAD(q, QROW(r) + d) * scale : 0.f;
        m[r] = -INFINITY;
        l[r] = 0.f;
    }
    memset(acc, 0, sizeof(float) * padded * D);

    for (int64_t kb = 0; kb < end; kb += KB) {
        const int64_t keys = end - kb < KB ? end - kb : KB;
        for (int64_t j = 0; j < KB; j++) {
            if (j < keys) {
                const char *kr = (const char *)k_cache + (slot[kb + j] * kv_row + kvh * D) * size;
                const char *vr = (const char *)v_cache + (slot[kb + j] * kv_row + kvh * D) * size;
                for (int64_t d = 0; d < D; d++) kt[d * KB + j] = LOAD(kr, d);
                for (int64_t d = 0; d < D; d++) vb[j * D + d] = LOAD(vr, d);
            } else {
                for (int64_t d = 0; d < D; d++) kt[d * KB + j] = 0.f;
                memset(vb + j * D, 0, sizeof(float) * D);
            }
        }
        for (int64_t r = 0; r < padded; r += 4) scores4(qf + r * D, kt, s + r * KB, D);

        for (int64_t r = 0; r < padded; r++) {
            float *p = s + r * KB;
            /* keys this row sees in the block: up to its own position ctx + i (padding rows see none) */
            const int64_t last = r < rows ? ctx + i0 + r / group - kb : -1, seen = last + 1 < keys ? last + 1 : keys;
            if (seen <= 0) {
                memset(p, 0, sizeof(float) * KB);
                continue;
            }
            float mx = m[r];
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < seen; j++) mx = p[j] > mx ? p[j] : mx;
            const float alpha = m[r] == -INFINITY ? 0.f : exp_nonpositive(m[r] - mx);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < seen; j++) {
                p[j] = exp_nonpositive(p[j] - mx);
                sum += p[j];
            }
            for (int64_t j = seen; j < KB; j++) p[j] = 0.f;
            if (alpha != 1.f)
                for (int64_t d = 0; d < D; d++) acc[r * D + d] *= alpha;
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
        }

        for (int64_t r = 0; r < padded; r += 4)
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int64_t left = (D - d0) / 16;
                float *p = s + r * KB, *a = acc + r * D;
                if (left >= 4) values4(p, vb, a, D, d0, keys, 4);
                else if (left == 3) values4(p, vb, a, D, d0, keys, 3);
                else if (left == 2) values4(p, vb, a, D, d0, keys, 2);
                else values4(p, vb, a, D, d0, keys, 1);
            }
    }

    for (int64_t r = 0; r < rows; r++) {
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < D; d++) STORE(out, QROW(r) + d, acc[r * D + d] * inv);
    }
#undef QROW
    free(buf);
    return 0;
}

/* Tasks of run c: kv_heads x tiles, a tile of ceil(n / tiles) positions, tiles = ceil(n * group / TILE_ROWS). */
static int64_t tiles_of(int64_t n, int64_t group) {
    const int64_t t = (n * group + TILE_ROWS - 1) / TILE_ROWS;
    return t < 1 ? 1 : t;
}

struct task {
    int64_t run, kv_head, i0, i1; /* query positions [i0, i1) of `run` over `kv_head` */
};

static int64_t count_tasks(const int64_t *runs, int64_t num_runs, int64_t group, int64_t kv_heads) {
    int64_t tasks = 0;
    for (int64_t c = 0; c < num_runs; c++) tasks += kv_heads * tiles_of(runs[c * 4 + 1], group);
    return tasks;
}

static struct task task_of(int64_t t, const int64_t *runs, int64_t group, int64_t kv_heads) {
    int64_t c = 0;
    for (int64_t size; t >= (size = kv_heads * tiles_of(runs[c * 4 + 1], group)); c++) t -= size;
    const int64_t n = runs[c * 4 + 1], tiles = tiles_of(n, group), per = (n + tiles - 1) / tiles;
    const int64_t i0 = t % tiles * per;
    return (struct task){c, t / tiles, i0, i0 + per < n ? i0 + per : n};
}

/* runs [num_runs, 4] int64: (first packed token, new tokens n, cached tokens ctx, row of `slots`) per run;
 * q, out [tokens, heads, head_dim] (only the runs' rows of `out` are written); k_cache / v_cache [num_slots,
 * kv_heads, head_dim] (one layer); slots [rows, max_kv] int64 flat cache slots of each sequence's positions.
 * head_dim must be a multiple of 16. Returns nonzero when out of memory. The task loop is written out in both entry
 * points so that `bf16` is a literal inside it. */
int paged_chunk_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                          const int64_t *runs, float *out, int64_t num_runs, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, int64_t max_kv, float scale, int num_threads) {
    const int64_t group = heads / kv_heads, tasks = count_tasks(runs, num_runs, group, kv_heads);
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t t = 0; t < tasks; t++) {
        const struct task k = task_of(t, runs, group, kv_heads);
        const int64_t *run = runs + k.run * 4;
        if (k.i0 < k.i1)
            failed |= chunk_task(run[0], run[2], slots + run[3] * max_kv, k.kv_head, k.i0, k.i1, q, k_cache, v_cache,
                                 out, heads, kv_heads, head_dim, scale, 0);
    }
    return failed;
}

int paged_chunk_attention_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                               const int64_t *slots, const int64_t *runs, uint16_t *out, int64_t num_runs,
                               int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_kv, float scale,
                               int num_threads) {
    const int64_t group = heads / kv_heads, tasks = count_tasks(runs, num_runs, group, kv_heads);
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int64_t t = 0; t < tasks; t++) {
        const struct task k = task_of(t, runs, group, kv_heads);
        const int64_t *run = runs + k.run * 4;
        if (k.i0 < k.i1)
            failed |= chunk_task(run[0], run[2], slots + run[3] * max_kv, k.kv_head, k.i0, k.i1, q, k_cache, v_cache,
                                 out, heads, kv_heads, head_dim, scale, 1);
    }
    return failed;
}
