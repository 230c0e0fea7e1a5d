// philox_vec.h: the noise of docs/design.md §3 (fastelbo_math.h philox4x32_10,
// philox_uniform, box_muller) sixteen counter groups at a time with AVX-512.
// The uniforms are bit-exact with the scalar philox4x32_10 + philox_uniform
// (tests/test_rng.py checks them against an independent numpy Philox); the
// float32 normals use a Box-Muller of their own (log via getexp/getmant, sin and
// cos sharing one range reduction), within a few float32 ulp of box_muller. Without AVX-512 the callers keep the scalar
// code (FASTELBO_PHILOX_AVX512 undefined).
#pragma once

#include <cstdint>

#include "../fastelbo_math.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define FASTELBO_PHILOX_AVX512 1
#endif

namespace fastelbo {
namespace cpu {

// Scalar uniforms of groups [g0 + g, g0 + groups) into u[l * stride + g].
inline void philox_uniforms_scalar(uint64_t seed, uint64_t g0, int64_t g, int64_t groups, float* u,
                                   int64_t stride) {
  for (; g < groups; ++g) {
    const Philox4 bits = philox4x32_10(g0 + g, seed);
    for (int l = 0; l < 4; ++l) u[l * stride + g] = philox_uniform(bits.v[l]);
  }
}

#if defined(FASTELBO_PHILOX_AVX512)

namespace philox_avx512 {

// 32 x 32 -> 64-bit products of every lane of a with the constant k (in every lane).
inline void mulhilo(__m512i a, __m512i k, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, k);                                    // lanes 0, 2, ...: 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), k);  // lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(even, _MM_PERM_CDAB), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_shuffle_epi32(odd, _MM_PERM_CDAB));
}

// The four words of Philox4x32-10 for the 16 counter groups g, g + 1, ..., g + 15.
inline void philox16(uint64_t g, uint64_t seed, __m512i c[4]) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
  __m512i c0 = _mm512_add_epi32(lo, iota);
  // carry into the high word where the low word wrapped
  const __mmask16 wrap = _mm512_cmplt_epu32_mask(c0, lo);
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), wrap,
                                     _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))),
                                     _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i ka = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i kb = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    __m512i hia, loa, hib, lob;
    mulhilo(c0, ka, hia, loa);
    mulhilo(c2, kb, hib, lob);
    c0 = _mm512_ternarylogic_epi32(hib, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
    c2 = _mm512_ternarylogic_epi32(hia, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lob;
    c3 = loa;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

// philox_uniform on 16 words: x < 0 ? ~x : x, to float, times 2^-31 (rounded as the scalar code).
inline __m512 uniform16(__m512i bits) {
  const __m512i x = _mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}

// ln(u) for normal positive u: u = m 2^e, m in [sqrt(1/2), sqrt(2)), ln m by the
// Cephes logf polynomial in f = m - 1 (about 1 ulp).
inline __m512 log16(__m512 u) {
  __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  __m512 e = _mm512_getexp_ps(u);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(f, z), p);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fmadd_ps(z, _mm512_set1_ps(-0.5f), y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

// cos(th) and sin(th) for th in [0, 2 pi + 1e-6] (th = 2 pi u rounded to float, as
// box_muller rounds it on every backend): q = round(th 2/pi), x = th - q pi/2 in
// three parts with fma (the first is exact), Cephes minimax polynomials on
// |x| <= pi/4, then the quadrant q mod 4. Within 2 ulp of cos/sin of that th.
inline void sincos16(__m512 th, __m512& c, __m512& s) {
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(th, _mm512_set1_ps(0.636619746685028076171875f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 x = _mm512_fnmadd_ps(q, _mm512_set1_ps(1.57079637050628662109375f), th);
  x = _mm512_fnmadd_ps(q, _mm512_set1_ps(-4.371138828673793e-08f), x);
  x = _mm512_fnmadd_ps(q, _mm512_set1_ps(-1.7151245100058819e-15f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 ps = _mm512_set1_ps(-1.9515295891e-4f);
  ps = _mm512_fmadd_ps(ps, z, _mm512_set1_ps(8.3321608736e-3f));
  ps = _mm512_fmadd_ps(ps, z, _mm512_set1_ps(-1.6666654611e-1f));
  const __m512 sx = _mm512_fmadd_ps(_mm512_mul_ps(ps, z), x, x);
  __m512 pc = _mm512_set1_ps(2.443315711809948e-5f);
  pc = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(-1.388731625493765e-3f));
  pc = _mm512_fmadd_ps(pc, z, _mm512_set1_ps(4.166664568298827e-2f));
  const __m512 cx =
      _mm512_fmadd_ps(_mm512_mul_ps(pc, z), z, _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
  const __m512i qi = _mm512_cvtps_epi32(q);
  const __mmask16 odd = _mm512_test_epi32_mask(qi, _mm512_set1_epi32(1));
  // quadrant 1: (cos, sin) = (-sin x, cos x); 2: (-cos x, -sin x); 3: (sin x, -cos x)
  const __m512 c0 = _mm512_mask_blend_ps(odd, cx, sx);
  const __m512 s0 = _mm512_mask_blend_ps(odd, sx, cx);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i csign = _mm512_and_si512(_mm512_slli_epi32(_mm512_add_epi32(qi, _mm512_set1_epi32(1)), 30), sign);
  const __m512i ssign = _mm512_and_si512(_mm512_slli_epi32(qi, 30), sign);
  c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c0), csign));
  s = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s0), ssign));
}

// box_muller of fastelbo_math.h: r = sqrt(-2 ln max(1e-7, u0)), (r cos, r sin)(2 pi u1).
inline void box_muller16(__m512 u0, __m512 u1, __m512& n0, __m512& n1) {
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(_mm512_max_ps(u0, _mm512_set1_ps(1.0e-7f)))));
  __m512 c, s;
  sincos16(_mm512_mul_ps(_mm512_set1_ps(6.283185307179586f), u1), c, s);
  n0 = _mm512_mul_ps(r, c);
  n1 = _mm512_mul_ps(r, s);
}

// Element order: a[i] of 16 groups per lane word -> out[4 g + l] = a_l[g], 64 floats.
inline void interleave4x16(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* out) {
  const __m512 t01lo = _mm512_unpacklo_ps(a0, a1), t01hi = _mm512_unpackhi_ps(a0, a1);
  const __m512 t23lo = _mm512_unpacklo_ps(a2, a3), t23hi = _mm512_unpackhi_ps(a2, a3);
  // per 128-bit chunk c: groups 4c, 4c + 1, 4c + 2, 4c + 3 as (a0, a1, a2, a3)
  const __m512 e = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01lo), _mm512_castps_pd(t23lo)));
  const __m512 f = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01lo), _mm512_castps_pd(t23lo)));
  const __m512 g = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01hi), _mm512_castps_pd(t23hi)));
  const __m512 h = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01hi), _mm512_castps_pd(t23hi)));
  const __m512 ef01 = _mm512_shuffle_f32x4(e, f, 0x44), gh01 = _mm512_shuffle_f32x4(g, h, 0x44);
  const __m512 ef23 = _mm512_shuffle_f32x4(e, f, 0xEE), gh23 = _mm512_shuffle_f32x4(g, h, 0xEE);
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(ef01, gh01, 0x88));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(ef01, gh01, 0xDD));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(ef23, gh23, 0x88));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(ef23, gh23, 0xDD));
}

}  // namespace philox_avx512

// Uniforms of groups [g0, g0 + groups) into u[l * stride + g], l = 0..3.
inline void philox_uniforms(uint64_t seed, uint64_t g0, int64_t groups, float* u, int64_t stride) {
  using namespace philox_avx512;
  for (int64_t g = 0; g < groups; g += 16) {
    __m512i c[4];
    philox16(g0 + g, seed, c);
    const __mmask16 m = groups - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (groups - g)) - 1);
    for (int l = 0; l < 4; ++l) _mm512_mask_storeu_ps(u + l * stride + g, m, uniform16(c[l]));
  }
}

// float32 normals of groups [g0, g0 + groups16 * 16), interleaved: out[4 g + l].
inline void philox_normals_interleaved(uint64_t seed, uint64_t g0, int64_t blocks16, float* out) {
  using namespace philox_avx512;
  for (int64_t b = 0; b < blocks16; ++b) {
    __m512i c[4];
    philox16(g0 + 16 * b, seed, c);
    __m512 n0, n1, n2, n3;
    box_muller16(uniform16(c[0]), uniform16(c[1]), n0, n1);
    box_muller16(uniform16(c[2]), uniform16(c[3]), n2, n3);
    interleave4x16(n0, n1, n2, n3, out + 64 * b);
  }
}

#else

inline void philox_uniforms(uint64_t seed, uint64_t g0, int64_t groups, float* u, int64_t stride) {
  philox_uniforms_scalar(seed, g0, 0, groups, u, stride);
}

#endif

}  // namespace cpu
}  // namespace fastelbo
