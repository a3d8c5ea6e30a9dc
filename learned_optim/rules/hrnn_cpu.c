/* Fused CPU kernel of HierarchicalRNN's per-coordinate step (see hierarchical.py for the
   eager rule it must match).

   hrnn_step runs the parameter level for coordinates [start, stop), 8 at a time (one vector
   lane each): gradient averages and mean squares at K time scales, the 2K+1 features, the
   P-unit GRU (its input biased by the coordinate's tensor), the read-out, the new log
   learning rate. It writes the state in place and exp(log lr) * direction into `update`,
   and adds each tensor's sums (new hidden states, log learning rates, squared directions,
   squared steps) into `sums`, this call's own (S, P + 3) float64 block. The caller adds the
   blocks of all calls, scales every tensor's update (hrnn_scale: 1 / its direction's RMS,
   times the rule's gain and step cap) and advances
   the tensor and global levels in PyTorch. A coordinate of a tensor whose keep flag is 0
   runs on a zero gradient and contributes its sums, but keeps its state and gets a zero
   update, as on the eager path. */

#include "vecmath.h"

#define LANES 8
#define MAX_P 32
#define MAX_K 8
#define MAX_F (2 * MAX_K + 2)

/* State is (n, width) rows. A block's rows are contiguous: read them at once (widening bf16)
   into out[c][b], column c of coordinate b; lanes past `count` get zeros. */
static inline void load_block(v8 *out, const void *state, int bf16, int64_t b0, int count, int width) {
    float rows[LANES * (2 * MAX_P)];
    const int64_t total = (int64_t)count * width;
    if (bf16) {
        const uint16_t *src = (const uint16_t *)state + b0 * width;
        for (int64_t i = 0; i < total; i++) rows[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(rows, (const float *)state + b0 * width, (size_t)total * sizeof(float));
    }
    if (count == LANES) {
        for (int c = 0; c < width; c++)
            for (int b = 0; b < LANES; b++) out[c][b] = rows[b * width + c];
        return;
    }
    for (int c = 0; c < width; c++)
        for (int b = 0; b < LANES; b++) out[c][b] = b < count ? rows[b * width + c] : 0.0f;
}

/* The inverse of load_block for the lanes whose write flag is set (all of them when all_write). */
static inline void store_block(const v8 *in, void *state, int bf16, int64_t b0, int count, int width,
                               const int *write, int all_write) {
    float rows[LANES * (2 * MAX_P)];
    for (int c = 0; c < width; c++)
        for (int b = 0; b < count; b++) rows[b * width + c] = in[c][b];
    if (all_write) {
        const int64_t total = (int64_t)count * width;
        if (bf16) {
            uint16_t *dst = (uint16_t *)state + b0 * width;
            for (int64_t i = 0; i < total; i++) dst[i] = f32_to_bf16(rows[i]);
        } else {
            memcpy((float *)state + b0 * width, rows, (size_t)total * sizeof(float));
        }
        return;
    }
    for (int b = 0; b < count; b++)
        if (write[b])
            for (int c = 0; c < width; c++) store_state(state, bf16, (b0 + b) * width + c, rows[b * width + c]);
}

static inline float lane_sum(v8 x) {
    float total = 0.0f;
    for (int b = 0; b < LANES; b++) total += x[b];
    return total;
}

/* The step for any P and K; inlined into hrnn_step with the default sizes as constants, so
   that the compiler unrolls the small loops over units, time scales and features. */
static inline __attribute__((always_inline)) void hrnn_range(
    int64_t start, int64_t stop, const float *grad, void *h_state, void *m_state, void *v_state, void *lr_state,
    int bf16, float *update, const uint8_t *keep, const int32_t *segment, const float *segment_gates,
    const float *segment_mean_log_lr, const float *w_in, const float *w_hh, const float *b_hh, const float *w_out,
    const float *b_out, const float *w_direct, const float *decays, const float *initial_log_lr, const int P, const int K,
    const int A, float lr_change_scale, float lr_leak, float log_min_lr, float log_max_lr, double *sums) {
    const int F = 2 * K + 1 + A, G = 3 * P;
    for (int64_t b0 = start; b0 < stop; b0 += LANES) {
        const int count = (int)(stop - b0 < LANES ? stop - b0 : LANES);
        int write[LANES], seg[LANES], all_write = 1;
        v8 g = splat(0.0f);
        for (int b = 0; b < LANES; b++) {
            seg[b] = b < count ? segment[b0 + b] : segment[b0];
            write[b] = b < count && (keep == NULL || keep[seg[b]]);
            all_write &= write[b];
            if (write[b]) {
                /* Clipped as in the eager rule (GRAD_LIMIT): g * g must stay finite in fp32. */
                const float x = grad[b0 + b];
                g[b] = x > 1e18f ? 1e18f : (x < -1e18f ? -1e18f : x);
            }
        }
        /* Almost always: all 8 coordinates belong to one tensor. */
        const int uniform = count == LANES && seg[0] == seg[LANES - 1];
        v8 m_old[MAX_K], v_old[MAX_K], lr_old[1];
        load_block(m_old, m_state, bf16, b0, count, K);
        load_block(v_old, v_state, bf16, b0, count, K);
        load_block(lr_old, lr_state, bf16, b0, count, 1);

        /* Gradient averages and mean squares; features (scaled momenta, relative log RMS,
           relative log learning rate). */
        v8 feat[MAX_F], m[MAX_K], v[MAX_K], log_rms[MAX_K];
        v8 mean_log_rms = splat(0.0f);
        for (int k = 0; k < K; k++) {
            const v8 d = splat(decays[k]), one_minus_d = splat(1.0f - decays[k]);
            m[k] = d * m_old[k] + one_minus_d * g;
            v[k] = d * v_old[k] + one_minus_d * g * g;
            log_rms[k] = splat(0.5f) * vlog(v[k] + splat(1e-24f));
            feat[k] = m[k] * vexp(-log_rms[k]);
            mean_log_rms += log_rms[k];
        }
        mean_log_rms = mean_log_rms / splat((float)K);
        for (int k = 0; k < K; k++) {
            v8 rel = log_rms[k] - mean_log_rms;
            rel = vselect(rel < splat(-10.0f), splat(-10.0f), rel);
            rel = vselect(rel > splat(10.0f), splat(10.0f), rel);
            feat[K + k] = rel / splat(10.0f);
        }
        v8 log_lr = lr_old[0];
        v8 seg_mean = splat(segment_mean_log_lr[seg[0]]);
        if (!uniform)
            for (int b = 0; b < LANES; b++) seg_mean[b] = segment_mean_log_lr[seg[b]];
        feat[2 * K] = log_lr - seg_mean;
        if (A) {
            /* The agreement feature: (g / rms) * (m before this step / rms) at the longest scale. */
            v8 agree = g * m_old[K - 1] * vexp(splat(-2.0f) * log_rms[K - 1]);
            agree = vselect(agree < splat(-1.0f), splat(-1.0f), agree);
            feat[2 * K + 1] = vselect(agree > splat(1.0f), splat(1.0f), agree);
        }

        /* GRU: input gates (the tensor's bias, incl. the input layer's bias, plus w_in . f)
           and hidden gates (b_hh + w_hh . h), gate order reset, update, new. */
        v8 h[MAX_P], xg[3 * MAX_P], hg[3 * MAX_P];
        load_block(h, h_state, bf16, b0, count, P);
        const float *gates0 = segment_gates + (int64_t)seg[0] * G;
        /* Three gates at a time (reset, update and new gate of one unit j share nothing):
           six independent FMA chains hide the FMA latency. */
        for (int j = 0; j < P; j++) {
            v8 a0 = splat(gates0[j]), a1 = splat(gates0[P + j]), a2 = splat(gates0[2 * P + j]);
            if (!uniform)
                for (int b = 0; b < LANES; b++) {
                    const float *row = segment_gates + (int64_t)seg[b] * G;
                    a0[b] = row[j];
                    a1[b] = row[P + j];
                    a2[b] = row[2 * P + j];
                }
            const float *w0 = w_in + (int64_t)j * F, *w1 = w_in + (int64_t)(P + j) * F, *w2 = w_in + (int64_t)(2 * P + j) * F;
            for (int f = 0; f < F; f++) {
                a0 += splat(w0[f]) * feat[f];
                a1 += splat(w1[f]) * feat[f];
                a2 += splat(w2[f]) * feat[f];
            }
            v8 c0 = splat(b_hh[j]), c1 = splat(b_hh[P + j]), c2 = splat(b_hh[2 * P + j]);
            const float *u0 = w_hh + (int64_t)j * P, *u1 = w_hh + (int64_t)(P + j) * P, *u2 = w_hh + (int64_t)(2 * P + j) * P;
            for (int i = 0; i < P; i++) {
                c0 += splat(u0[i]) * h[i];
                c1 += splat(u1[i]) * h[i];
                c2 += splat(u2[i]) * h[i];
            }
            xg[j] = a0, xg[P + j] = a1, xg[2 * P + j] = a2;
            hg[j] = c0, hg[P + j] = c1, hg[2 * P + j] = c2;
        }
        /* In passes (a sigmoid is a long dependency chain; the units' are independent): the
           reset and update gates of all units, then the candidates, then the new state. */
        for (int j = 0; j < 2 * P; j++) xg[j] = vsigmoid(xg[j] + hg[j]);
        for (int j = 0; j < P; j++) xg[2 * P + j] = vtanh(xg[2 * P + j] + xg[j] * hg[2 * P + j]);
        v8 out0 = splat(b_out[0]), out1 = splat(b_out[1]);
        for (int j = 0; j < P; j++) {
            const v8 cand = xg[2 * P + j];
            h[j] = cand + xg[P + j] * (h[j] - cand);
            out0 += splat(w_out[j]) * h[j];
            out1 += splat(w_out[P + j]) * h[j];
        }
        v8 direction = out0;
        for (int f = 0; f < F; f++) direction += splat(w_direct[f]) * feat[f];
        /* The leak towards the learned initial log lr (a no-op at lr_leak 0, as in the eager rule). */
        log_lr = log_lr - splat(lr_leak) * (log_lr - splat(initial_log_lr[0]));
        log_lr = log_lr + splat(lr_change_scale) * out1;
        log_lr = vselect(log_lr < splat(log_min_lr), splat(log_min_lr), log_lr);
        log_lr = vselect(log_lr > splat(log_max_lr), splat(log_max_lr), log_lr);
        v8 step = vexp(log_lr) * direction;

        store_block(m, m_state, bf16, b0, count, K, write, all_write);
        store_block(v, v_state, bf16, b0, count, K, write, all_write);
        store_block(h, h_state, bf16, b0, count, P, write, all_write);
        store_block(&log_lr, lr_state, bf16, b0, count, 1, write, all_write);
        for (int b = 0; b < count; b++) update[b0 + b] = write[b] ? step[b] : 0.0f;
        if (uniform) {
            /* Eight coordinates of one tensor: added up in fp32 first (eight terms), then into
               the float64 running sums. */
            double *row = sums + (int64_t)seg[0] * (P + 3);
            for (int j = 0; j < P; j++) row[j] += lane_sum(h[j]);
            row[P] += lane_sum(log_lr);
            row[P + 1] += lane_sum(direction * direction);
            row[P + 2] += lane_sum(step * step);
        } else {
            for (int b = 0; b < count; b++) {
                double *row = sums + (int64_t)seg[b] * (P + 3);
                for (int j = 0; j < P; j++) row[j] += h[j][b];
                row[P] += log_lr[b];
                row[P + 1] += (double)direction[b] * direction[b];
                row[P + 2] += (double)step[b] * step[b];
            }
        }
    }
}

void hrnn_step(int64_t start, int64_t stop, const float *grad, void *h_state, void *m_state, void *v_state,
               void *lr_state, int bf16, float *update, const uint8_t *keep, const int32_t *segment,
               const float *segment_gates, const float *segment_mean_log_lr, const float *w_in, const float *w_hh,
               const float *b_hh, const float *w_out, const float *b_out, const float *w_direct,
               const float *decays, const float *initial_log_lr, int P, int K, int A, float lr_change_scale,
               float lr_leak, float log_min_lr, float log_max_lr, double *sums) {
#define HRNN_ARGS(p, k, a)                                                                                        \
    start, stop, grad, h_state, m_state, v_state, lr_state, bf16, update, keep, segment, segment_gates,          \
        segment_mean_log_lr, w_in, w_hh, b_hh, w_out, b_out, w_direct, decays, initial_log_lr, p, k, a,         \
        lr_change_scale, lr_leak, log_min_lr, log_max_lr, sums
    /* The paper's sizes (HierarchicalRNN's defaults) with and without the agreement feature. */
    if (P == 10 && K == 4 && !A)
        hrnn_range(HRNN_ARGS(10, 4, 0));
    else if (P == 10 && K == 4 && A)
        hrnn_range(HRNN_ARGS(10, 4, 1));
    else
        hrnn_range(HRNN_ARGS(P, K, A));
#undef HRNN_ARGS
}

/* update[i] *= scale[segment[i]] for i in [start, stop). */
void hrnn_scale(int64_t start, int64_t stop, float *update, const int32_t *segment, const float *scale) {
    for (int64_t i = start; i < stop; i++) update[i] *= scale[segment[i]];
}
