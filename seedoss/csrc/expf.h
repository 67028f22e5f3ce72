/* A vectorizable exp for softmax weights, shared by the attention kernels. */
#ifndef SEEDOSS_EXPF_H
#define SEEDOSS_EXPF_H
#include <math.h>
#include <stdint.h>
#include <string.h>

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
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n: n is in [-126, 0] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}
#endif
