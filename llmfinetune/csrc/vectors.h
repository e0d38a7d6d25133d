// GCC vector types and helpers shared by the package's C kernels: one vector is VL floats, 16 with AVX-512, 8 with
// AVX2 (native.py builds for the instruction set torch runs).
#ifndef LLMFINETUNE_VECTORS_H
#define LLMFINETUNE_VECTORS_H
#include <math.h>
#include <stdint.h>

#if defined(__clang__) || !defined(__GNUC__)
#error "built by GCC only: its OpenMP runtime is the one torch's threads run on (native._gnu_compiler)"
#elif !defined(__AVX2__)
#error "the package's C kernels are written for AVX2 or AVX-512 (native.py builds them only there)"
#elif defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint16_t vhu __attribute__((vector_size(VL * 2), aligned(2)));

static inline vf ld(const float *p) { return *(const vfu *)p; }
static inline void st(float *p, vf v) { *(vfu *)p = v; }
static inline vf bc(float s) { return (vf){} + s; }
static inline vf sel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline float hsum(vf v) {
    float s = 0;
    for (int c = 0; c < VL; c++) s += v[c];
    return s;
}

// exp(x) for x <= 0: 0 below -87 (-inf included), NaN kept.
static inline vf vexp(vf x0) {
    vf x = sel(x0 < -87.0f, bc(-87.0f), x0);
    vf t = x * 1.44269504088896341f;
    vf n = __builtin_convertvector(__builtin_convertvector(t + sel(t < 0, bc(-0.5f), bc(0.5f)), vi), vf);
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = bc(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return sel(x0 < -87.0f, bc(0.0f), p * (vf)e);
}

// bf16 <-> fp32: a bf16 is the fp32's upper half. To bf16 rounded to nearest, ties to even, as torch's c10::BFloat16
// rounds, so a kernel that rounds where torch's op does gives its values. A NaN stays a NaN: arithmetic makes quiet
// ones (bit 22 set), which the rounding cannot carry into the exponent (torch writes every NaN as 0x7fc0).
static inline vf ldh(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vhu *)p, vu) << 16); }
static inline vu bf16_bits(vf v) {
    vu u = (vu)v;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static inline void sth(uint16_t *p, vf v) { *(vhu *)p = __builtin_convertvector(bf16_bits(v), vh); }
static inline vf rnd(vf v) { return (vf)(bf16_bits(v) << 16); }  // v rounded to bf16, kept in fp32
static inline float h2f(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}
static inline uint16_t f2h(float f) { return (uint16_t)bf16_bits(bc(f))[0]; }
static inline float rnd1(float f) { return rnd(bc(f))[0]; }
#endif
