// Element-wise passes of a Llama-style block on the CPU, each one read of its inputs and one write of its outputs
// where torch runs an op, and a pass over memory, per term: RMSNorm forward and backward (its weight's gradient
// too), the SwiGLU MLP's backward, the rotary embedding both ways, the LM head's cross-entropy both ways (fp32, and
// bf16 rounded where torch's ops round), the softmax of the fp32 head's logits. Rows (tokens) or chunks run on
// torch's own OpenMP threads (see packed_attention.c). Tested against the torch functions they replace
// (tests/test_native.py, tests/test_kernels.py).
#include <omp.h>
#include <stdlib.h>

#include "vectors.h"

// sigmoid(x) = 1 / (1 + exp(-x)), from exp(-|x|) <= 1 so that nothing overflows; NaN kept.
static inline vf vsigmoid(vf x) {
    vf e = vexp(sel(x < 0, x, -x));
    vf s = 1.0f / (1.0f + e);
    return sel(x < 0, e * s, s);
}

// Elements per task: a few pages of each operand, many tasks per thread.
#define CHUNK 4096

// silu(gate) * up's gradients: grad_up = grad * silu(gate), grad_gate = grad * up * silu'(gate), where
// silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x). All arrays n elements, contiguous. In fp32 (swiglu_backward) and
// in bf16, rounding where torch's ops round in kernels._SwiGLU: grad_up = bf16(bf16(silu(gate)) * grad), grad_gate =
// bf16(bf16(grad * up) * silu'(gate)).
#define SWIGLU_BACKWARD(NAME, T, LOAD, STORE, ROUND, TO_FLOAT, ROUND1, FROM_FLOAT)                                     \
    void NAME(const T *grad, const T *gate, const T *up, T *grad_gate, T *grad_up, long n) {                          \
        _Pragma("omp parallel for schedule(static)")                                                                  \
        for (long c = 0; c < n; c += CHUNK) {                                                                         \
            long end = c + CHUNK < n ? c + CHUNK : n, i = c;                                                          \
            for (; i + VL <= end; i += VL) {                                                                          \
                vf x = LOAD(gate + i), s = vsigmoid(x), d = LOAD(grad + i);                                           \
                STORE(grad_up + i, ROUND(x * s) * d);                                                                 \
                STORE(grad_gate + i, ROUND(d * LOAD(up + i)) * (s * (1.0f + x * (1.0f - s))));                        \
            }                                                                                                         \
            for (; i < end; i++) {                                                                                    \
                float x = TO_FLOAT(gate[i]), s = vsigmoid(bc(x))[0], d = TO_FLOAT(grad[i]);                           \
                grad_up[i] = FROM_FLOAT(ROUND1(x * s) * d);                                                           \
                grad_gate[i] = FROM_FLOAT(ROUND1(d * TO_FLOAT(up[i])) * (s * (1.0f + x * (1.0f - s))));               \
            }                                                                                                         \
        }                                                                                                             \
    }

// The identity, where a bf16 kernel rounds to bf16 (rnd, rnd1) and the fp32 one keeps the value.
static inline vf same(vf v) { return v; }
static inline float same1(float f) { return f; }
SWIGLU_BACKWARD(swiglu_backward, float, ld, st, same, same1, same1, same1)
SWIGLU_BACKWARD(swiglu_backward_bf16, uint16_t, ldh, sth, rnd, h2f, rnd1, f2h)

// out = weight * (x * r) per row of `width` elements, r = 1 / sqrt(mean(x^2) + eps) kept in inverse_rms (fp32) for
// the backward; x and out rows x width, contiguous. Its input gradient: r * g - x * r^3 * mean(g * x), g = grad *
// weight. In fp32 (rms_norm_forward, rms_norm_backward) and in bf16 (x, weight, out and grad bf16), rounding where
// torch's ops round in kernels._RMSNorm: forward weight * bf16(x * r); backward from g = bf16(grad * weight), the
// rest in fp32 and rounded once. Where the weight trains (grad_weight not NULL, width fp32 zeros), its gradient, the
// sum over rows of bf16(grad * bf16(x * r)), is added into grad_weight in fp32 (the caller rounds it once, as torch's
// sum of bf16 does).
#define RMS_NORM(FORWARD, BACKWARD, T, LOAD, STORE, ROUND, TO_FLOAT, ROUND1, FROM_FLOAT)                               \
    void FORWARD(const T *x, const T *weight, float eps, T *out, float *inverse_rms, long rows, int width) {           \
        _Pragma("omp parallel for schedule(static)")                                                                  \
        for (long r = 0; r < rows; r++) {                                                                             \
            const T *row = x + r * width;                                                                             \
            T *o = out + r * width;                                                                                   \
            vf acc = {};                                                                                              \
            int i = 0;                                                                                                \
            for (; i + VL <= width; i += VL) { vf v = LOAD(row + i); acc += v * v; }                                  \
            float squares = hsum(acc);                                                                                \
            for (; i < width; i++) squares += TO_FLOAT(row[i]) * TO_FLOAT(row[i]);                                    \
            float inverse = 1.0f / sqrtf(squares / width + eps);                                                      \
            inverse_rms[r] = inverse;                                                                                 \
            for (i = 0; i + VL <= width; i += VL) STORE(o + i, LOAD(weight + i) * ROUND(LOAD(row + i) * inverse));    \
            for (; i < width; i++) o[i] = FROM_FLOAT(TO_FLOAT(weight[i]) * ROUND1(TO_FLOAT(row[i]) * inverse));       \
        }                                                                                                             \
    }                                                                                                                 \
                                                                                                                      \
    void BACKWARD(const T *grad, const T *x, const T *weight, const float *inverse_rms, T *grad_x,                   \
                  float *grad_weight, long rows, int width) {                                                         \
        /* The weight's gradient, a sum over rows: each thread's rows into its own fp32 row, those added in thread    \
           order after (the same sum every run) */                                                                    \
        int threads = omp_get_max_threads();                                                                          \
        float *partials = grad_weight ? calloc((size_t)threads * width, sizeof(float)) : NULL;                        \
        if (grad_weight && !partials) abort(); /* a lost gradient must not pass for a zero one */                     \
        _Pragma("omp parallel num_threads(threads)")                                                                  \
        {                                                                                                             \
            float *mine = partials ? partials + (long)omp_get_thread_num() * width : NULL;                            \
            _Pragma("omp for schedule(static)")                                                                       \
            for (long r = 0; r < rows; r++) {                                                                         \
                const T *row = x + r * width, *d = grad + r * width;                                                  \
                T *o = grad_x + r * width;                                                                            \
                float inverse = inverse_rms[r];                                                                       \
                vf acc = {};                                                                                          \
                int i = 0;                                                                                            \
                for (; i + VL <= width; i += VL) acc += ROUND(LOAD(d + i) * LOAD(weight + i)) * LOAD(row + i);        \
                float along = hsum(acc);                                                                              \
                for (; i < width; i++) along += ROUND1(TO_FLOAT(d[i]) * TO_FLOAT(weight[i])) * TO_FLOAT(row[i]);      \
                float c = -along * inverse * inverse * inverse / width;                                               \
                for (i = 0; i + VL <= width; i += VL)                                                                 \
                    STORE(o + i, ROUND(LOAD(d + i) * LOAD(weight + i)) * inverse + LOAD(row + i) * c);                \
                for (; i < width; i++)                                                                                \
                    o[i] = FROM_FLOAT(ROUND1(TO_FLOAT(d[i]) * TO_FLOAT(weight[i])) * inverse + TO_FLOAT(row[i]) * c); \
                if (!mine) continue;                                                                                  \
                /* grad * bf16(x * r): the forward's normalised input as it multiplied the weight */                  \
                for (i = 0; i + VL <= width; i += VL)                                                                 \
                    st(mine + i, ld(mine + i) + ROUND(LOAD(d + i) * ROUND(LOAD(row + i) * inverse)));                 \
                for (; i < width; i++) mine[i] += ROUND1(TO_FLOAT(d[i]) * ROUND1(TO_FLOAT(row[i]) * inverse));        \
            }                                                                                                         \
        }                                                                                                             \
        if (!partials) return;                                                                                        \
        for (int t = 0; t < threads; t++)                                                                             \
            for (int i = 0; i < width; i++) grad_weight[i] += partials[(long)t * width + i];                          \
        free(partials);                                                                                               \
    }

RMS_NORM(rms_norm_forward, rms_norm_backward, float, ld, st, same, same1, same1, same1)
RMS_NORM(rms_norm_forward_bf16, rms_norm_backward_bf16, uint16_t, ldh, sth, rnd, h2f, rnd1, f2h)

// The rotary embedding of one of q, k (Llama's: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)) and its
// transpose for the backward (x * cos + (x2 * sin2, -x1 * sin1)): x [batch, heads, tokens, dim] with the strides
// given (elements; the last dimension contiguous), cos and sin [batch or 1, tokens, dim] contiguous (cs: their batch
// stride, 0 where one serves every batch), out with its own strides. One read and one write of x. In fp32 (rotary)
// and in bf16 (rotary_bf16, every array bf16), where x * cos is rounded before the rest is added, as torch's mul and
// addcmul_ in kernels._Rotary round.
#define ROTARY(NAME, T, LOAD, STORE, ROUND, TO_FLOAT, ROUND1, FROM_FLOAT)                                              \
    void NAME(const T *x, long xbs, long xhs, long xts, const T *cos, const T *sin, long cs, T *out, long obs,       \
              long ohs, long ots, int batch, int heads, long tokens, int dim, int transpose) {                       \
        int half = dim / 2;                                                                                           \
        _Pragma("omp parallel for schedule(static)")                                                                  \
        for (long row = 0; row < (long)batch * heads * tokens; row++) {                                               \
            long b = row / ((long)heads * tokens), h = row / tokens % heads, t = row % tokens;                        \
            const T *in = x + b * xbs + h * xhs + t * xts, *c = cos + b * cs + t * dim, *s = sin + b * cs + t * dim;  \
            T *o = out + b * obs + h * ohs + t * ots;                                                                 \
            /* first half: x1 * c1 - x2 * s1 (forward), x1 * c1 + x2 * s2 (transpose); second: x2 * c2 + x1 * s2,    \
               x2 * c2 - x1 * s1 */                                                                                   \
            const T *s_first = transpose ? s + half : s, *s_second = transpose ? s : s + half;                        \
            float sign = transpose ? 1.0f : -1.0f;                                                                    \
            int j = 0;                                                                                                \
            for (; j + VL <= half; j += VL) {                                                                         \
                vf x1 = LOAD(in + j), x2 = LOAD(in + half + j);                                                       \
                STORE(o + j, ROUND(x1 * LOAD(c + j)) + sign * (x2 * LOAD(s_first + j)));                              \
                STORE(o + half + j, ROUND(x2 * LOAD(c + half + j)) - sign * (x1 * LOAD(s_second + j)));               \
            }                                                                                                         \
            for (; j < half; j++) {                                                                                   \
                float x1 = TO_FLOAT(in[j]), x2 = TO_FLOAT(in[half + j]);                                              \
                o[j] = FROM_FLOAT(ROUND1(x1 * TO_FLOAT(c[j])) + sign * (x2 * TO_FLOAT(s_first[j])));                  \
                o[half + j] = FROM_FLOAT(ROUND1(x2 * TO_FLOAT(c[half + j])) - sign * (x1 * TO_FLOAT(s_second[j])));   \
            }                                                                                                         \
        }                                                                                                             \
    }

ROTARY(rotary, float, ld, st, same, same1, same1, same1)
ROTARY(rotary_bf16, uint16_t, ldh, sth, rnd, h2f, rnd1, f2h)

// Each of `rows` rows of `width` logits (contiguous, fp32) becomes its softmax, in place, and its log-sum-exp goes to
// lse: a pass for the row's maximum, one that writes exp(x - max) and sums it, one that scales by the sum's inverse.
// One exp per logit, where logsumexp then exp(x - lse) computed two, each over its own passes (the fp32 LM head's
// loss, lm_head._BlockedHead: ~10 ms of the SFT bench's fp32 step). A NaN logit makes its row NaN.
void softmax_rows(float *logits, long rows, int width, float *lse) {
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *x = logits + r * width;
        vf top_v = bc(-INFINITY);
        int j = 0;
        for (; j + VL <= width; j += VL) {
            vf v = ld(x + j);
            top_v = sel(v > top_v, v, top_v);
        }
        float top = -INFINITY;
        for (int c = 0; c < VL; c++) top = top_v[c] > top ? top_v[c] : top;
        for (; j < width; j++) top = x[j] > top ? x[j] : top;
        if (top == -INFINITY) top = 0.0f;  // a row of -inf only: a sum of 0, so NaN and an lse of -inf, as torch
        vf sum_v = {};
        for (j = 0; j + VL <= width; j += VL) {
            vf e = vexp(ld(x + j) - top);
            st(x + j, e);
            sum_v += e;
        }
        float sum = hsum(sum_v);
        for (; j < width; j++) {
            float e = vexp(bc(x[j] - top))[0];
            x[j] = e;
            sum += e;
        }
        float inverse = 1.0f / sum;
        for (j = 0; j + VL <= width; j += VL) st(x + j, ld(x + j) * inverse);
        for (; j < width; j++) x[j] *= inverse;
        lse[r] = top + logf(sum);
    }
}

// The cross-entropy of rows of logits against one target each (the LM head's loss, lm_head._TargetsCrossEntropy),
// fp32 or bf16 logits, every sum and exp in fp32. Forward: each row's log-sum-exp into lse, and where sums is not
// NULL (label smoothing) the row's sum: one read of the logits, where torch's cast, logsumexp and sum read them
// three times and wrote a copy. Backward: the gradient of scale * (sum over rows of the loss) as the loss's torch
// path computes it, scale * softmax(x) + target_delta at the target, then - uniform_delta, rounded once (bf16), into
// grad (which may be the logits themselves): one pass, where the cast, subtraction, exp, scatter and cast back took
// five.
#define CROSS_ENTROPY(FORWARD, BACKWARD, T, LOAD, STORE, TO_FLOAT, FROM_FLOAT)                                         \
    void FORWARD(const T *logits, long rows, int width, float *lse, float *sums) {                                    \
        _Pragma("omp parallel for schedule(static)")                                                                  \
        for (long r = 0; r < rows; r++) {                                                                             \
            const T *x = logits + r * width;                                                                          \
            vf top_v = bc(-INFINITY), all_v = {};                                                                     \
            int j = 0;                                                                                                \
            for (; j + VL <= width; j += VL) {                                                                        \
                vf v = LOAD(x + j);                                                                                   \
                top_v = sel(v > top_v, v, top_v);                                                                     \
                all_v += v;                                                                                           \
            }                                                                                                         \
            float top = -INFINITY, all = hsum(all_v);                                                                 \
            for (int c = 0; c < VL; c++) top = top_v[c] > top ? top_v[c] : top;                                       \
            for (; j < width; j++) {                                                                                  \
                float v = TO_FLOAT(x[j]);                                                                             \
                top = v > top ? v : top;                                                                              \
                all += v;                                                                                             \
            }                                                                                                         \
            vf sum_v = {};                                                                                            \
            for (j = 0; j + VL <= width; j += VL) sum_v += vexp(LOAD(x + j) - top);                                   \
            float sum = hsum(sum_v);                                                                                  \
            for (; j < width; j++) sum += vexp(bc(TO_FLOAT(x[j]) - top))[0];                                          \
            lse[r] = top + logf(sum);                                                                                 \
            if (sums) sums[r] = all;                                                                                  \
        }                                                                                                             \
    }                                                                                                                 \
                                                                                                                      \
    void BACKWARD(const T *logits, const float *lse, const long *targets, float scale, float target_delta,            \
                  float uniform_delta, T *grad, long rows, int width) {                                               \
        _Pragma("omp parallel for schedule(static)")                                                                  \
        for (long r = 0; r < rows; r++) {                                                                             \
            const T *x = logits + r * width;                                                                          \
            T *g = grad + r * width;                                                                                  \
            float shift = lse[r];                                                                                     \
            long target = targets[r];                                                                                 \
            float at_target = vexp(bc(TO_FLOAT(x[target]) - shift))[0] * scale + target_delta;                        \
            int j = 0;                                                                                                \
            for (; j + VL <= width; j += VL) STORE(g + j, vexp(LOAD(x + j) - shift) * scale - uniform_delta);         \
            for (; j < width; j++) g[j] = FROM_FLOAT(vexp(bc(TO_FLOAT(x[j]) - shift))[0] * scale - uniform_delta);    \
            g[target] = FROM_FLOAT(at_target - uniform_delta);                                                        \
        }                                                                                                             \
    }

CROSS_ENTROPY(cross_entropy_forward, cross_entropy_backward, float, ld, st, same1, same1)
CROSS_ENTROPY(cross_entropy_forward_bf16, cross_entropy_backward_bf16, uint16_t, ldh, sth, h2f, f2h)
