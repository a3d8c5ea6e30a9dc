/* Fused CPU kernel of CoordinateLSTM's step (see lstm.py for the eager rule it must match).

   Coordinates are processed in blocks of BLOCK: the block's state is transposed into
   structure-of-arrays scratch that stays in L1, every gate is computed as a register-tiled
   product vectorised over the block's coordinates, and the new state is written back in
   place. Weights use the zero-padded, gate-major layout of lstm_pack.pack_lstm_weights
   (HP units per gate), shared with the Triton kernel. Compiled on first use by
   lstm_cpu.py; threads are the caller's (each call handles one range of coordinates). */

#include "vecmath.h"

#ifndef VECS
#define VECS 2
#endif
#ifndef UNITS_PER_STEP
#define UNITS_PER_STEP 5
#endif
#define LANES 8
#define BLOCK (VECS * LANES)
#define MAX_HP 64
#define MAX_ROW 256 /* layers x hidden */

/* Block state, AoS (coordinate-major rows of `row` values) <-> SoA (soa[column][v] holds 8
   coordinates). Full blocks use 8x8 register transposes (bf16 widened/rounded on the way);
   the rest goes element-wise. */
#if defined(__AVX2__)
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

#if defined(__AVX2__)
static inline __m256 load8(const void *state, int bf16, int64_t index) {
    if (!bf16) return _mm256_loadu_ps((const float *)state + index);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)state + index));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static inline void store8(void *state, int bf16, int64_t index, __m256 value) {
    if (!bf16) {
        _mm256_storeu_ps((float *)state + index, value);
        return;
    }
    /* Round to nearest even, as torch does (finite values: the kernel's state is bounded). */
    __m256i bits = _mm256_castps_si256(value);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)state + index), packed);
}
#endif

static void gather_block(v8 soa[][VECS], const void *state, int bf16, int64_t b0, int count, int64_t row) {
    int col = 0;
#if defined(__AVX2__)
    if (count == BLOCK) {
        for (; col + 8 <= row; col += 8)
            for (int v = 0; v < VECS; v++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = load8(state, bf16, (b0 + v * 8 + i) * row + col);
                transpose8(r);
                for (int i = 0; i < 8; i++) soa[col + i][v] = (v8)r[i];
            }
    }
#endif
    for (; col < row; col++)
        for (int b = 0; b < BLOCK; b++)
            ((float *)soa[col])[b] = b < count ? load_state(state, bf16, (b0 + b) * row + col) : 0.0f;
}

static void scatter_block(const v8 soa[][VECS], void *state, int bf16, int64_t b0, int count, int64_t row,
                          const uint8_t *write, int all_write) {
    int col = 0;
#if defined(__AVX2__)
    if (count == BLOCK && all_write) {
        for (; col + 8 <= row; col += 8)
            for (int v = 0; v < VECS; v++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = (__m256)soa[col + i][v];
                transpose8(r);
                for (int i = 0; i < 8; i++) store8(state, bf16, (b0 + v * 8 + i) * row + col, r[i]);
            }
    }
#endif
    for (int b = 0; b < count; b++) {
        if (!write[b]) continue;
        for (int c = col; c < row; c++) store_state(state, bf16, (b0 + b) * row + c, ((const float *)soa[c])[b]);
    }
}

/* acc[q*hp + j][v] = bias[q*hp + j] + sum_k w1[q][k][j] * in1[k][v] + sum_k w2[q][k][j] * in2[k][v]
   for the first `units` units of the 4 gates (in1: the layer's input, in2: its own h; w1, w2
   their (HP rows, HP cols) tiles per gate). UNITS_PER_STEP units at a time keep
   UNITS_PER_STEP x VECS accumulators in registers from the bias to the last product, enough
   independent FMA chains to hide their latency; the last `units % UNITS_PER_STEP` units go one
   at a time (rounding `units` up instead ran past the HP padded units of the tiles and, for
   the last gate, past `acc` itself, e.g. for hidden sizes 16, 31-32 and 61-64). */
static inline void gate_products(v8 acc[][VECS], const float *bias, const v8 in1[][VECS], int k1, const float *w1,
                                 const v8 in2[][VECS], int k2, const float *w2, int hp, int units) {
    for (int q = 0; q < 4; q++) {
        const float *w1q = w1 + (int64_t)q * hp * hp, *w2q = w2 + (int64_t)q * hp * hp;
        int j = 0;
        for (; j + UNITS_PER_STEP <= units; j += UNITS_PER_STEP) {
            v8 a[UNITS_PER_STEP][VECS];
            for (int u = 0; u < UNITS_PER_STEP; u++)
                for (int v = 0; v < VECS; v++) a[u][v] = splat(bias[q * hp + j + u]);
            for (int k = 0; k < k1; k++) {
                const float *wk = w1q + k * hp + j;
                for (int v = 0; v < VECS; v++) {
                    v8 x = in1[k][v];
                    for (int u = 0; u < UNITS_PER_STEP; u++) a[u][v] += splat(wk[u]) * x;
                }
            }
            for (int k = 0; k < k2; k++) {
                const float *wk = w2q + k * hp + j;
                for (int v = 0; v < VECS; v++) {
                    v8 x = in2[k][v];
                    for (int u = 0; u < UNITS_PER_STEP; u++) a[u][v] += splat(wk[u]) * x;
                }
            }
            for (int u = 0; u < UNITS_PER_STEP; u++)
                for (int v = 0; v < VECS; v++) acc[q * hp + j + u][v] = a[u][v];
        }
        for (; j < units; j++) {
            v8 a[VECS];
            for (int v = 0; v < VECS; v++) a[v] = splat(bias[q * hp + j]);
            for (int k = 0; k < k1; k++)
                for (int v = 0; v < VECS; v++) a[v] += splat(w1q[k * hp + j]) * in1[k][v];
            for (int k = 0; k < k2; k++)
                for (int v = 0; v < VECS; v++) a[v] += splat(w2q[k * hp + j]) * in2[k][v];
            for (int v = 0; v < VECS; v++) acc[q * hp + j][v] = a[v];
        }
    }
}

/* The scale-free momentum inputs of a block (CoordinateLSTM.momentum_features): per
   coordinate, m_i <- d_i m_i + (1 - d_i) g and v <- r v + (1 - r) g^2 (both start at the first
   gradient, where v is still 0), input i = m_i / sqrt(v). Written back where write[b]. Scalar
   code: a few operations per coordinate beside the LSTM's hundreds. */
static void momentum_inputs(v8 feat[][VECS], const float *g, void *m_state, void *v_state, int bf16, int64_t b0,
                            int count, const uint8_t *write, int momenta, const float *decays, float rms_decay,
                            float rms_rest) {
    for (int b = 0; b < BLOCK; b++) {
        if (b >= count) {
            for (int i = 0; i < momenta; i++) ((float *)feat[i])[b] = 0.0f;
            continue;
        }
        /* Clipped as in CoordinateLSTM.momentum_features (MOMENTUM_GRAD_LIMIT): v stays finite. */
        const float gb = fminf(fmaxf(g[b], -1e15f), 1e15f), squared = gb * gb, v = load_state(v_state, bf16, b0 + b);
        const int fresh = v == 0.0f;
        const float v_new = fresh ? squared : rms_decay * v + rms_rest * squared;
        /* 1e-30 keeps 0 / 0 at 0 for coordinates whose gradients are all zero. */
        const float scale = 1.0f / sqrtf(v_new + 1e-30f);
        for (int i = 0; i < momenta; i++) {
            const int64_t index = (b0 + b) * momenta + i;
            const float m = load_state(m_state, bf16, index);
            const float m_new = fresh ? gb : decays[i] * m + (1.0f - decays[i]) * gb;
            ((float *)feat[i])[b] = m_new * scale;
            if (write[b]) store_state(m_state, bf16, index, m_new);
        }
        if (write[b]) store_state(v_state, bf16, b0 + b, v_new);
    }
}

/* One step over coordinates [start, stop). State h, c: (n, L, H) contiguous, fp32 or bf16;
   with momenta > 0 also m (n, momenta) and v (n,) in the same dtype. keep (per tensor, via
   segment) may be NULL: then every coordinate steps. agreement (num_tensors, agreements), via
   segment, holds inputs shared by all coordinates of a tensor (CoordinateLSTM's tensor
   agreement, computed before the kernel); NULL when agreements is 0. */
void lstm_step(int64_t start, int64_t stop, const float *grad, void *h_state, void *c_state, int bf16,
               float *update, const uint8_t *keep, const int32_t *segment, const float *wx, const float *wh,
               const float *bias, const float *out, int layers, int hidden, int hp, int preprocess,
               float preprocess_p, float input_scale, float output_scale, void *m_state, void *v_state,
               int momenta, const float *decays, float rms_decay, float rms_rest, const float *agreement,
               int agreements) {
    v8 inp[MAX_HP][VECS] __attribute__((aligned(32)));
    v8 hs[MAX_ROW][VECS] __attribute__((aligned(32)));
    v8 cs[MAX_ROW][VECS] __attribute__((aligned(32)));
    v8 acc[4 * MAX_HP][VECS] __attribute__((aligned(32)));
    float g[BLOCK], upd[BLOCK];
    uint8_t write[BLOCK];
    const float floor_ = expf(-preprocess_p), ceil_ = expf(preprocess_p);
    const int64_t row = (int64_t)layers * hidden;
    const int units = hidden; /* padded units beyond it are not computed */

    for (int64_t b0 = start; b0 < stop; b0 += BLOCK) {
        const int count = (int)(stop - b0 < BLOCK ? stop - b0 : BLOCK);
        int all_write = 1;
        for (int b = 0; b < BLOCK; b++) {
            int ok = b < count && (keep == NULL || keep[segment[b0 + b]]);
            write[b] = (uint8_t)ok;
            all_write &= ok;
            g[b] = ok ? grad[b0 + b] : 0.0f;
        }
        /* Every layer's state of the block at once; lanes past `count` compute on zeros. */
        /* The next block's state is read from memory while this one computes, into L2 (locality
           2): into L1 these prefetches were no faster than none (1M coordinates, one thread: 218 ns
           per coordinate either way, 202 into L2). */
        if (b0 + 2 * BLOCK <= stop) {
            const int64_t bytes = (int64_t)BLOCK * row * (bf16 ? 2 : 4), next = (b0 + BLOCK) * row * (bf16 ? 2 : 4);
            for (int64_t off = 0; off < bytes; off += 64) {
                __builtin_prefetch((const char *)h_state + next + off, 0, 2);
                __builtin_prefetch((const char *)c_state + next + off, 0, 2);
            }
        }
        gather_block(hs, h_state, bf16, b0, count, row);
        gather_block(cs, c_state, bf16, b0, count, row);
        for (int v = 0; v < VECS; v++) {
            v8 gv;
            memcpy(&gv, g + v * LANES, sizeof gv);
            if (preprocess) {
                /* Log/sign preprocessing: (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g). */
                v8i sign_bit = (v8i)gv & (v8i)splat(-0.0f);
                v8 m = (v8)((v8i)gv & ~(v8i)splat(-0.0f));
                v8i large = m >= splat(floor_);
                v8 sign = vselect(gv == splat(0.0f), splat(0.0f), (v8)((v8i)splat(1.0f) | sign_bit));
                inp[0][v] = vselect(large, vlog(vselect(large, m, splat(1.0f))) * splat(1.0f / preprocess_p), splat(-1.0f));
                inp[1][v] = vselect(large, sign, gv * splat(ceil_));
            } else {
                inp[0][v] = gv * splat(input_scale);
            }
        }
        int k_count = preprocess ? 2 : 1;
        if (momenta > 0) {
            momentum_inputs(inp + k_count, g, m_state, v_state, bf16, b0, count, write, momenta, decays, rms_decay,
                            rms_rest);
            k_count += momenta;
        }
        for (int i = 0; i < agreements; i++) {
            float *feat = (float *)inp[k_count + i];
            for (int b = 0; b < BLOCK; b++)
                feat[b] = b < count ? agreement[(int64_t)segment[b0 + b] * agreements + i] : 0.0f;
        }
        k_count += agreements;
        for (int l = 0; l < layers; l++) {
            v8(*hl)[VECS] = hs + l * hidden;
            v8(*cl)[VECS] = cs + l * hidden;
            gate_products(acc, bias + (int64_t)l * 4 * hp, (const v8(*)[VECS])inp, k_count, wx + (int64_t)l * 4 * hp * hp,
                          (const v8(*)[VECS])hl, hidden, wh + (int64_t)l * 4 * hp * hp, hp, units);
            /* In passes: a sigmoid is a ~70-cycle dependency chain, so the gates of all units
               first (many independent chains for out-of-order execution to overlap), then the
               cells, then their tanh. */
            for (int j = 0; j < hidden; j++)
                for (int v = 0; v < VECS; v++) {
                    acc[j][v] = vsigmoid(acc[j][v]);
                    acc[hp + j][v] = vsigmoid(acc[hp + j][v]);
                    acc[2 * hp + j][v] = vsigmoid(acc[2 * hp + j][v]);
                    acc[3 * hp + j][v] = vtanh(acc[3 * hp + j][v]);
                }
            for (int j = 0; j < hidden; j++)
                for (int v = 0; v < VECS; v++) cl[j][v] = acc[hp + j][v] * cl[j][v] + acc[j][v] * acc[3 * hp + j][v];
            for (int j = 0; j < hidden; j++)
                for (int v = 0; v < VECS; v++) hl[j][v] = acc[2 * hp + j][v] * vtanh(cl[j][v]);
            /* The next layer's input (and the read-out's) is this layer's new h. */
            for (int j = 0; j < hidden; j++)
                for (int v = 0; v < VECS; v++) inp[j][v] = hl[j][v];
            k_count = hidden;
        }
        scatter_block((const v8(*)[VECS])hs, h_state, bf16, b0, count, row, write, all_write);
        scatter_block((const v8(*)[VECS])cs, c_state, bf16, b0, count, row, write, all_write);
        for (int v = 0; v < VECS; v++) {
            v8 sum = splat(out[hp]);
            for (int j = 0; j < hidden; j++) sum += splat(out[j]) * inp[j][v];
            memcpy(upd + v * LANES, &sum, sizeof sum);
        }
        for (int b = 0; b < count; b++) update[b0 + b] = write[b] ? upd[b] * output_scale : 0.0f;
    }
}
