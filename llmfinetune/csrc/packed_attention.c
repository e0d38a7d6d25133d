// Causal attention of every example of a flattened packed row, fp32, on a CPU with AVX-512 or AVX2: forward and
// backward.
//
// Why: torch's CPU flash kernel runs at 10-75 GFLOP/s on the 30-250-token examples of a packed SFT row (it works in
// 32-query blocks below 192 tokens, with a GEMM call, a mask pass and several softmax passes per block), which made
// attention ~11% of an fp32 step and ~14% of a bf16 one on the SFT bench. Here one call runs a whole layer: tasks are
// (example, key/value head), each keeps its keys transposed in cache and runs its query heads (grouped-query
// attention) in 4-row blocks against tiles of KEY_TILE keys, only up to the diagonal, with the softmax in registers;
// the probabilities are saved for the backward instead of recomputed. Tasks run on torch's own OpenMP threads (this
// file is compiled with -fopenmp and loaded after torch, so it shares torch's libgomp: a second runtime's threads would
// compete with torch's spinning ones).
//
// Layouts (elements): q [T, H, HEAD_DIM] with token stride qts and head stride qhs; k, v likewise with KV heads; out,
// dout, dq [T, H, HEAD_DIM] contiguous; dk, dv [KV, T, HEAD_DIM] contiguous. p holds each (example, head)'s
// probabilities at poff[example] + head * head_size(L), as its 4-row blocks one after the other, each block's rows
// as wide as the keys the block reaches rounded up to KEY_TILE: about half of L x L, the causal part and its tiles'
// margin. packed_attention_layout computes starts and poff (and the caller allocates p from its total). Tested
// against torch's SDPA (tests/test_cpu_attention.py).
//
// With bf16 set, q, k, v, out, dout, dq, dk and dv are bf16 (p stays fp32): a task widens its example's rows into
// fp32 buffers as it starts (in cache) and rounds its results back (to nearest even) as it ends, so the arithmetic
// is the fp32 kernel's and bf16 tensors need no cast before and after it (a pass over memory each, 64 a step on the
// SFT bench). The forward then also writes its output in fp32 (out32), which the backward reads as out, so that its
// dO . O is the fp32 kernel's too: the results are the fp32 kernel's on the same inputs, rounded, except that with
// avx512_bf16 Q K^T and dO V^T are summed in pairs (BF16_PAIRS below: the same exact products in another order).
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

#define HEAD_DIM 64
#if VL == 16
// 32 vector registers of 16 floats: a 4-row block against 32 keys, and the whole head (4 vectors) at once.
#define KEY_TILE 32
#define DIM_VECTORS 4
#else
// AVX2's 16 registers of 8 floats: 16 keys, and a quarter of the head (2 vectors) per pass, so that accumulators,
// loads and broadcasts fit in the registers (the AVX-512 shapes split in halves spill them: 7x slower than torch).
#define KEY_TILE 16
#define DIM_VECTORS 2
#endif
#define KEY_VECTORS (KEY_TILE / VL)

// With avx512_bf16, the two products whose operands are both bf16 already (Q K^T and dO V^T) run on vdpbf16ps, two
// products a lane per instruction from bf16 pairs: exact products summed in fp32 (in pairs, so in another order than
// the fp32 kernel's), 2.8x the fp32 FMAs' rate on a query-key tile (bench/README.md, #12, session 28).
#if VL == 16 && defined(__AVX512BF16__)
#include <immintrin.h>
#define BF16_PAIRS 1
#else
#define BF16_PAIRS 0
#endif

// The vector width this build runs on, and whether its bf16 products run on bf16 pairs (tests read them: a machine's
// build is the one they test).
int packed_attention_vector_width(void) { return VL; }
int packed_attention_bf16_pairs(void) { return BF16_PAIRS; }

static inline int padded(int n) { return (n + KEY_TILE - 1) & ~(KEY_TILE - 1); }
static inline int block_rows(int L, int i0) { return L - i0 < 4 ? L - i0 : 4; }

static long head_size(int L) {
    long size = 0;
    for (int i0 = 0; i0 < L; i0 += 4) size += (long)block_rows(L, i0) * padded(i0 + block_rows(L, i0));
    return size;
}

// Each example's first token (starts) and the offset of its probabilities in p (poff), from the examples' lengths;
// returns the floats p needs.
long packed_attention_layout(const int *lens, int examples, int H, int *starts, long *poff) {
    long total = 0;
    int start = 0;
    for (int e = 0; e < examples; e++) {
        starts[e] = start;
        poff[e] = total;
        start += lens[e];
        total += H * head_size(lens[e]);
    }
    return total;
}

// c[r][0:jmax rounded up to KEY_TILE] = scale * a[r] . bt[:, j] for the rows r < rows (at most 4) of a (stride as);
// bt is HEAD_DIM x lp (a block of keys or values, transposed); c's rows are cs apart.
static void rows_by_keys(const float *a, long as, int rows, const float *bt, int lp, int jmax, float *c, int cs,
                         float scale) {
    const float *ar[4];
    for (int r = 0; r < 4; r++) ar[r] = a + (r < rows ? r : 0) * as;
    for (int j = 0; j < jmax; j += KEY_TILE) {
        vf x[4][KEY_VECTORS] = {};
        for (int d = 0; d < HEAD_DIM; d++) {
            vf k[KEY_VECTORS];
            for (int u = 0; u < KEY_VECTORS; u++) k[u] = ld(bt + (long)d * lp + j + VL * u);
            for (int r = 0; r < 4; r++) {
                float s = ar[r][d];
                for (int u = 0; u < KEY_VECTORS; u++) x[r][u] += k[u] * s;
            }
        }
        for (int r = 0; r < rows; r++)
            for (int u = 0; u < KEY_VECTORS; u++) st(c + (long)r * cs + j + VL * u, x[r][u] * scale);
    }
}

// out[r] = sum over j < jmax of w[r][j] * b[j] for the rows r < rows of w (rows ws apart); b rows have stride bs.
static void weights_by_rows(const float *w, int ws, int rows, int jmax, const float *b, long bs, float *out, long os) {
    for (int d0 = 0; d0 < HEAD_DIM; d0 += VL * DIM_VECTORS) {
        vf o[4][DIM_VECTORS] = {};
        for (int j = 0; j < jmax; j++) {
            const float *bj = b + (long)j * bs + d0;
            vf bv[DIM_VECTORS];
            for (int c = 0; c < DIM_VECTORS; c++) bv[c] = ld(bj + VL * c);
            for (int r = 0; r < rows; r++) {
                float x = w[(long)r * ws + j];
                for (int c = 0; c < DIM_VECTORS; c++) o[r][c] += bv[c] * x;
            }
        }
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < DIM_VECTORS; c++) st(out + (long)r * os + d0 + VL * c, o[r][c]);
    }
}

// acc[j] += sum over r < rows of w[r][j] * a[r], for j < jmax (acc rows HEAD_DIM floats apart).
static void rows_into_keys(const float *w, int ws, int rows, int jmax, const float *a, long as, float *acc) {
    for (int d0 = 0; d0 < HEAD_DIM; d0 += VL * DIM_VECTORS) {
        vf av[4][DIM_VECTORS];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < DIM_VECTORS; c++) av[r][c] = r < rows ? ld(a + (long)r * as + d0 + VL * c) : bc(0.0f);
        for (int j = 0; j < jmax; j++) {
            float x[4];  // zero for the rows past the block's: 0 * a NaN weight would be NaN
            for (int r = 0; r < 4; r++) x[r] = r < rows ? w[(long)r * ws + j] : 0.0f;
            float *aj = acc + (long)j * HEAD_DIM + d0;
            for (int c = 0; c < DIM_VECTORS; c++)
                st(aj + VL * c,
                   ld(aj + VL * c) + av[0][c] * x[0] + av[1][c] * x[1] + av[2][c] * x[2] + av[3][c] * x[3]);
        }
    }
}

// The bf16 rows x (stride xs) as HEAD_DIM / 2 rows of lp pairs: (x[j][d], x[j][d + 1]) at [d / 2][j], zero past L.
static void pairs(const uint16_t *x, long xs, int L, int lp, uint32_t *xp) {
    for (int j = 0; j < lp; j++)
        for (int d = 0; d < HEAD_DIM; d += 2) {
            uint32_t pair = 0;
            if (j < L) memcpy(&pair, x + (long)j * xs + d, sizeof pair);
            xp[(long)(d / 2) * lp + j] = pair;
        }
}

// rows_by_keys with a's rows bf16 (stride as) and the keys as pairs (see pairs). Called only where BF16_PAIRS is set.
static void rows_by_key_pairs(const uint16_t *a, long as, int rows, const uint32_t *bp, int lp, int jmax, float *c,
                              int cs, float scale) {
#if BF16_PAIRS
    const uint16_t *ar[4];
    for (int r = 0; r < 4; r++) ar[r] = a + (r < rows ? r : 0) * as;
    for (int j = 0; j < jmax; j += KEY_TILE) {
        __m512 x[4][KEY_VECTORS];
        for (int r = 0; r < 4; r++)
            for (int u = 0; u < KEY_VECTORS; u++) x[r][u] = _mm512_setzero_ps();
        for (int d = 0; d < HEAD_DIM / 2; d++) {
            __m512bh k[KEY_VECTORS];
            for (int u = 0; u < KEY_VECTORS; u++)
                k[u] = (__m512bh)_mm512_loadu_si512(bp + (long)d * lp + j + VL * u);
            for (int r = 0; r < 4; r++) {
                uint32_t pair;
                memcpy(&pair, ar[r] + 2 * d, sizeof pair);
                __m512bh s = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int u = 0; u < KEY_VECTORS; u++) x[r][u] = _mm512_dpbf16_ps(x[r][u], k[u], s);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int u = 0; u < KEY_VECTORS; u++) st(c + (long)r * cs + j + VL * u, (vf)x[r][u] * scale);
    }
#endif
}

// HEAD_DIM x lp, zero past the L rows of x (stride xs; bf16 where bf16 is set).
static void transpose(const void *x, long xs, int bf16, int L, int lp, float *xt) {
    for (int j = 0; j < lp; j++)
        for (int d = 0; d < HEAD_DIM; d++) {
            long at = (long)j * xs + d;
            xt[(long)d * lp + j] = j >= L ? 0.0f : bf16 ? h2f(((const uint16_t *)x)[at]) : ((const float *)x)[at];
        }
}

// A block's keys (or values) as the scores' product reads them: as bf16 pairs (rows_by_key_pairs), or transposed.
static void arrange(const void *x, long xs, int bf16, int by_pairs, int L, int lp, float *buffer) {
    if (by_pairs)
        pairs(x, xs, L, lp, (uint32_t *)buffer);
    else
        transpose(x, xs, bf16, L, lp, buffer);
}

// L rows of HEAD_DIM bf16 values (stride xs) as fp32 rows one after the other, and fp32 rows (stride ws) back.
static void widen(const uint16_t *x, long xs, int L, float *wide) {
    for (int j = 0; j < L; j++)
        for (int d = 0; d < HEAD_DIM; d += VL) st(wide + (long)j * HEAD_DIM + d, ldh(x + (long)j * xs + d));
}

static void narrow(const float *wide, long ws, int L, uint16_t *x, long xs) {
    for (int j = 0; j < L; j++)
        for (int d = 0; d < HEAD_DIM; d += VL) sth(x + (long)j * xs + d, ld(wide + (long)j * ws + d));
}

// Where the kernel reads rows of a tensor: the tensor itself (fp32), or its rows widened into `buffer`, HEAD_DIM apart.
static const float *rows_of(const void *x, long xs, int bf16, int L, float *buffer, long *stride) {
    if (!bf16) {
        *stride = xs;
        return (const float *)x;
    }
    widen(x, xs, L, buffer);
    *stride = HEAD_DIM;
    return buffer;
}

// The element at `index` of an fp32 or bf16 array.
static inline const void *at(const void *x, int bf16, long index) {
    return (const char *)x + index * (bf16 ? 2 : 4);
}

// Softmax of the causal part of one probability row (keys 0..i), zero from i + 1 to the next multiple of VL: no
// product reads past that (a 4-row block starts at a multiple of 4, so its rows' multiples of VL reach its last key).
static void causal_softmax(float *row, int i) {
    int n = i + 1, nv = (n + VL - 1) & ~(VL - 1);
    for (int j = n; j < nv; j++) row[j] = -INFINITY;
    vf m = bc(-INFINITY);
    for (int j = 0; j < nv; j += VL) {
        vf x = ld(row + j);
        m = sel(x > m, x, m);
    }
    float top = m[0];
    for (int c = 1; c < VL; c++) top = m[c] > top ? m[c] : top;
    vf s = {};
    for (int j = 0; j < nv; j += VL) {
        vf e = vexp(ld(row + j) - top);
        st(row + j, e);
        s += e;
    }
    float inverse = 1.0f / hsum(s);
    for (int j = 0; j < nv; j += VL) st(row + j, ld(row + j) * inverse);
}

void packed_attention_forward(const void *q, long qts, long qhs, const void *k, long kts, long khs, const void *v,
                              long vts, long vhs, void *out, float *out32, float *p, const int *starts,
                              const int *lens, const long *poff, int examples, int H, int KV, float scale, int bf16) {
    int group = H / KV;
    long hs = (long)H * HEAD_DIM;
    int by_pairs = BF16_PAIRS && bf16;  // Q K^T on bf16 pairs: the keys as pairs, the queries read as they are
#pragma omp parallel
    {
        // kt: the keys transposed (or as pairs); wide (bf16 only): the value rows and a head's query rows
        float *kt = NULL, *wide = NULL;
        int capacity = 0;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < examples * KV; t++) {
            int e = t / KV, g = t % KV, s = starts[e], L = lens[e], lp = padded(L);
            if (HEAD_DIM * lp > capacity) {
                free(kt); free(wide);
                capacity = HEAD_DIM * lp;
                kt = malloc(sizeof(float) * capacity);
                wide = bf16 ? malloc(sizeof(float) * 2 * capacity) : NULL;
            }
            arrange(at(k, bf16, (long)s * kts + (long)g * khs), kts, bf16, by_pairs, L, lp, kt);
            long vs, qs = 0;
            const float *vb = rows_of(at(v, bf16, (long)s * vts + (long)g * vhs), vts, bf16, L, wide, &vs);
            long per_head = head_size(L);
            for (int h = g * group; h < (g + 1) * group; h++) {
                const void *queries = at(q, bf16, (long)s * qts + (long)h * qhs);
                const float *qh = by_pairs ? NULL : rows_of(queries, qts, bf16, L, wide + capacity, &qs);
                long head_at = ((long)s * H + h) * HEAD_DIM;
                // in bf16 the output in fp32 too, in out32: the backward's dO . O reads it unrounded
                float *block = p + poff[e] + h * per_head, *oh = (bf16 ? out32 : (float *)out) + head_at;
                for (int i0 = 0; i0 < L; i0 += 4) {
                    int rows = block_rows(L, i0), jmax = i0 + rows, width = padded(jmax);
                    if (by_pairs)
                        rows_by_key_pairs((const uint16_t *)queries + (long)i0 * qts, qts, rows, (uint32_t *)kt, lp,
                                          jmax, block, width, scale);
                    else
                        rows_by_keys(qh + (long)i0 * qs, qs, rows, kt, lp, jmax, block, width, scale);
                    for (int r = 0; r < rows; r++) causal_softmax(block + (long)r * width, i0 + r);
                    weights_by_rows(block, width, rows, jmax, vb, vs, oh + (long)i0 * hs, hs);
                    block += (long)rows * width;
                }
                if (bf16) narrow(oh, hs, L, (uint16_t *)out + head_at, hs);
            }
        }
        free(kt); free(wide);
    }
}

void packed_attention_backward(const void *q, long qts, long qhs, const void *k, long kts, long khs,
                               const void *v, long vts, long vhs, const float *out, const void *dout, const float *p,
                               void *dq, void *dk, void *dv, const int *starts, const int *lens, const long *poff,
                               int examples, int H, int KV, float scale, long T, int bf16) {
    int group = H / KV;
    long hs = (long)H * HEAD_DIM;
    int by_pairs = BF16_PAIRS && bf16;  // dO V^T on bf16 pairs: the values as pairs, dO read as it is
#pragma omp parallel
    {
        // vt: the values transposed (or as pairs); ds: a block's dS rows; wide (bf16 only): the key rows, dK, dV,
        // and a head's query, dO and dQ rows (out is the forward's fp32 output in bf16 too: see out32)
        float *vt = NULL, *ds = NULL, *wide = NULL;
        int capacity = 0;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < examples * KV; t++) {
            int e = t / KV, g = t % KV, s = starts[e], L = lens[e], lp = padded(L);
            if (HEAD_DIM * lp > capacity) {
                free(vt); free(ds); free(wide);
                capacity = HEAD_DIM * lp;
                vt = malloc(sizeof(float) * capacity);
                ds = malloc(sizeof(float) * 4 * lp);
                wide = bf16 ? malloc(sizeof(float) * 6 * capacity) : NULL;
            }
            long ks, qs, dos, dqs = bf16 ? HEAD_DIM : hs;
            const float *kb = rows_of(at(k, bf16, (long)s * kts + (long)g * khs), kts, bf16, L, wide, &ks);
            arrange(at(v, bf16, (long)s * vts + (long)g * vhs), vts, bf16, by_pairs, L, lp, vt);
            // this task's rows of dK and dV (its example, its key/value head): no other task writes them
            long kv_at = ((long)g * T + s) * HEAD_DIM;
            float *dkb = bf16 ? wide + capacity : (float *)dk + kv_at;
            float *dvb = bf16 ? wide + 2 * capacity : (float *)dv + kv_at;
            memset(dkb, 0, sizeof(float) * L * HEAD_DIM);
            memset(dvb, 0, sizeof(float) * L * HEAD_DIM);
            long per_head = head_size(L);
            for (int h = g * group; h < (g + 1) * group; h++) {
                long head_at = ((long)s * H + h) * HEAD_DIM;
                const float *qh = rows_of(at(q, bf16, (long)s * qts + (long)h * qhs), qts, bf16, L,
                                          wide + 3 * capacity, &qs);
                const float *oh = out + head_at, *block = p + poff[e] + h * per_head;
                const void *grads = at(dout, bf16, head_at);
                const float *doh = rows_of(grads, hs, bf16, L, wide + 4 * capacity, &dos);
                float *dqh = bf16 ? wide + 5 * capacity : (float *)dq + head_at;
                for (int i0 = 0; i0 < L; i0 += 4) {
                    int rows = block_rows(L, i0), jmax = i0 + rows, width = padded(jmax);
                    const float *do0 = doh + (long)i0 * dos;
                    rows_into_keys(block, width, rows, jmax, do0, dos, dvb);    // dV[j] += P[i, j] dO[i]
                    if (by_pairs)  // dP = dO V^T
                        rows_by_key_pairs((const uint16_t *)grads + (long)i0 * hs, hs, rows, (uint32_t *)vt, lp, jmax,
                                          ds, lp, 1.0f);
                    else
                        rows_by_keys(do0, dos, rows, vt, lp, jmax, ds, lp, 1.0f);
                    for (int r = 0; r < rows; r++) {
                        // dS = P (dP - dO . O) * scale: zero past the diagonal up to the block's last key, where P is
                        // zero (what lies beyond is never read)
                        const float *orow = oh + (long)(i0 + r) * hs, *drow = do0 + (long)r * dos;
                        vf dot = {};
                        for (int d = 0; d < HEAD_DIM; d += VL) dot += ld(orow + d) * ld(drow + d);
                        float delta = hsum(dot);
                        const float *prow = block + (long)r * width;
                        float *srow = ds + (long)r * lp;
                        for (int j = 0; j < width; j += VL)
                            st(srow + j, ld(prow + j) * (ld(srow + j) - delta) * scale);
                    }
                    weights_by_rows(ds, lp, rows, jmax, kb, ks, dqh + (long)i0 * dqs, dqs);  // dQ = dS K
                    rows_into_keys(ds, lp, rows, jmax, qh + (long)i0 * qs, qs, dkb);       // dK[j] += dS[i, j] Q[i]
                    block += (long)rows * width;
                }
                if (bf16) narrow(dqh, HEAD_DIM, L, (uint16_t *)dq + head_at, hs);
            }
            if (bf16) {
                narrow(dkb, HEAD_DIM, L, (uint16_t *)dk + kv_at, HEAD_DIM);
                narrow(dvb, HEAD_DIM, L, (uint16_t *)dv + kv_at, HEAD_DIM);
            }
        }
        free(vt); free(ds); free(wide);
    }
}
