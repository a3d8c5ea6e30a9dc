/* Vector math shared by the fused CPU kernels (lstm_cpu.c, hrnn_cpu.c): 8-lane fp32 vectors
   (GCC/Clang vector extensions, AVX2 where compiled for it), exp/log/sigmoid/tanh
   approximations at fp32 accuracy, and fp32/bf16 state access. */
#ifndef LEARNED_OPTIM_VECMATH_H
#define LEARNED_OPTIM_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline v8 vselect(v8i mask, v8 a, v8 b) { return (v8)((mask & (v8i)a) | (~mask & (v8i)b)); }

/* exp(-k x) for k = 1 or 2 (a compile-time constant once inlined), the exponential of vexp,
   the sigmoid and tanh below: 2^n exp(-k s), n = round(-k x / ln2) and
   s = x + n ln2 / k in [-ln2 / 2k, ln2 / 2k], a degree-6 minimax polynomial for exp(-k s)
   (relative error ~1e-7 in fp32). n is rounded with a magic constant that also holds the
   exponent bias, so the bits of y = -k x / ln2 + 1.5 * 2^23 + 127, shifted left by 23, are
   2^n directly (the constant's own bits shift out). x is clamped so that n stays in
   [-126, 126]: 2^n is then a normal float. */
static inline v8 vexp_neg_scaled(v8 x, const float k) {
    const float limit = 87.0f / k;
#if defined(__AVX2__)
    x = (v8)_mm256_min_ps(_mm256_max_ps((__m256)x, _mm256_set1_ps(-limit)), _mm256_set1_ps(limit));
#else
    x = vselect(x < splat(-limit), splat(-limit), x);
    x = vselect(x > splat(limit), splat(limit), x);
#endif
    const v8 magic = splat(12583039.0f); /* 1.5 * 2^23 + 127 */
    v8 y = x * splat(-k * 1.44269504088896341f) + magic;
    v8 n = y - magic;
    v8 s = x + n * splat(0.693145751953125f / k) + n * splat(1.428606765330187045e-06f / k);
    /* Minimax coefficients c_j of exp(r) on [-ln2/2, ln2/2], evaluated at r = -k s. */
    const float kk = -k;
    v8 p = splat(0.0013836827129125595f * kk * kk * kk * kk * kk * kk);
    p = p * s + splat(0.00837481115013361f * kk * kk * kk * kk * kk);
    p = p * s + splat(0.04166822507977486f * kk * kk * kk * kk);
    p = p * s + splat(0.16666419804096222f * kk * kk * kk);
    p = p * s + splat(0.49999991059303284f * kk * kk);
    p = p * s + splat(1.0f * kk);
    p = p * s + splat(1.0f);
    return p * (v8)((v8i)y << 23);
}

/* exp(x) for x in [-87, 87] (clamped there; exp(87) is 6e37, near fp32's largest, 3.4e38). */
static inline v8 vexp(v8 x) { return vexp_neg_scaled(-x, 1.0f); }

/* 1 / d for d >= 1 from a reciprocal estimate r (12 bits), cheaper than a division: with the
   residual e = 1 - d r (exact under FMA), 1 / d = r (1 + e + e^2 + ...). One Newton step, r (1 + e),
   is always low by about e^2 (6e-8 relative: 1 / 2 gave 0.49999997, and every gate carried that
   bias); the e^2 term, one FMA more, leaves e^3. */
static inline v8 vrecip_ge1(v8 d) {
#if defined(__AVX2__)
    v8 r = (v8)_mm256_rcp_ps((__m256)d);
    v8 e = splat(1.0f) - d * r;
    return r + r * (e + e * e);
#else
    return splat(1.0f) / d;
#endif
}

static inline v8 vsigmoid(v8 x) { return vrecip_ge1(splat(1.0f) + vexp_neg_scaled(x, 1.0f)); }

/* tanh(x) = 2 sigmoid(2x) - 1 (the LSTM eager rule computes it this way too). */
static inline v8 vtanh(v8 x) { return splat(2.0f) * vrecip_ge1(splat(1.0f) + vexp_neg_scaled(x, 2.0f)) - splat(1.0f); }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even, as torch does */
    return (uint16_t)(bits >> 16);
}

static inline float load_state(const void *base, int bf16, int64_t index) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[index]) : ((const float *)base)[index];
}

static inline void store_state(void *base, int bf16, int64_t index, float value) {
    if (bf16)
        ((uint16_t *)base)[index] = f32_to_bf16(value);
    else
        ((float *)base)[index] = value;
}

/* log of positive normal x (Cephes logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8
   polynomial, relative error ~1e-7); +inf stays +inf. */
static inline v8 vlog(v8 x) {
    v8i bits = (v8i)x;
    v8i e = ((bits >> 23) & 0xff) - 126; /* x = m * 2^e with m in [0.5, 1) */
    v8 m = (v8)((bits & 0x807fffff) | 0x3f000000);
    v8i small = m < splat(0.707106781186547524f); /* -1 where true */
    e = e + small;
    v8 t = vselect(small, m + m - splat(1.0f), m - splat(1.0f));
    v8 z = t * t;
    v8 y = splat(7.0376836292E-2f);
    y = y * t + splat(-1.1514610310E-1f);
    y = y * t + splat(1.1676998740E-1f);
    y = y * t + splat(-1.2420140846E-1f);
    y = y * t + splat(1.4249322787E-1f);
    y = y * t + splat(-1.6668057665E-1f);
    y = y * t + splat(2.0000714765E-1f);
    y = y * t + splat(-2.4999993993E-1f);
    y = y * t + splat(3.3333331174E-1f);
    y = y * t * z;
    v8 ef = __builtin_convertvector(e, v8);
    y = y + ef * splat(-2.12194440e-4f);
    y = y - splat(0.5f) * z;
    t = t + y + ef * splat(0.693359375f);
    return vselect(x == splat(INFINITY), x, t);
}

#endif
