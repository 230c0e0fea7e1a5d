// Math<V> for at::vec::Vectorized, so the formulas of fastelbo_math.h run
// on whole SIMD registers in the CPU kernels (Sleef behind exp/log/log1p/sin/cos).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../fastelbo_math.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define FASTELBO_VEC_AVX512 1
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define FASTELBO_VEC_AVX2 1
#endif

namespace fastelbo {

#if defined(FASTELBO_VEC_AVX512)
// float32 kernels on whole AVX-512 registers, for the hot loops (about 1 ulp each;
// the library versions are kept for float64 and for CPUs without AVX-512).
namespace avx512 {

// e^x for x in [-104, 89] or NaN: x = (k / 16) ln2 + r, |r| <= ln2 / 32;
// e^x = 2^floor(k / 16) * 2^((k mod 16) / 16) * e^r with the middle factor from a
// 16-entry table (one vpermps) and e^r - 1 = r + r^2/2 + r^3/6 (truncation below
// 1e-8 relative). k / 16 comes from rounding against a magic constant, whose low
// mantissa bits are then k mod 16, the table index; scalef multiplies by
// 2^floor(k / 16), rounding underflow into subnormals and zero and overflow
// into inf as a correctly rounded exp would. About 1 ulp.
inline __m512 exp_clamped(__m512 x) {
  const __m512 table = _mm512_setr_ps(1.000000000e+00f, 1.044273734e+00f, 1.090507746e+00f, 1.138788581e+00f,
                                      1.189207077e+00f, 1.241857767e+00f, 1.296839595e+00f, 1.354255557e+00f,
                                      1.414213538e+00f, 1.476826191e+00f, 1.542210817e+00f, 1.610490322e+00f,
                                      1.681792855e+00f, 1.756252170e+00f, 1.834008098e+00f, 1.915206552e+00f);
  const __m512 magic = _mm512_set1_ps(786432.0f);  // 1.5 * 2^19: its ulp is 1/16
  const __m512 ym = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 y = _mm512_sub_ps(ym, magic);  // k / 16, exact
  __m512 r = _mm512_fnmadd_ps(y, _mm512_set1_ps(0.693147182464599609375f), x);
  r = _mm512_fnmadd_ps(y, _mm512_set1_ps(-1.904654323148236e-09f), r);
  __m512 q = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6), _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  q = _mm512_mul_ps(q, r);
  const __m512 t = _mm512_permutexvar_ps(_mm512_castps_si512(ym), table);
  return _mm512_scalef_ps(_mm512_fmadd_ps(t, q, t), y);
}

// e^x. The clamps keep k finite (e^89 is inf, e^-104 rounds to 0) and are
// ordered so that NaN passes through (max/min return their second operand when
// either is NaN).
inline __m512 exp(__m512 x) {
  return exp_clamped(_mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x)));
}

// e^-|x|: -|x| is x with the sign bit set.
inline __m512 exp_neg_abs(__m512 x) {
  const __m512 neg = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
  return exp_clamped(_mm512_max_ps(_mm512_set1_ps(-104.0f), neg));
}

// 1 / (1 + t) for t in [0, 1] (NaN passes): rcp14 and one Newton step.
inline __m512 inv1p_unit(__m512 t) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), t);
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
}

// log1p(t) for t in [0, 1] (NaN passes): t * P(t), P a degree-9 fit of
// log1p(t) / t (relative error 5e-9, about 3 ulp with the float32 rounding of
// the evaluation), relative accuracy down to the smallest t.
inline __m512 log1p_unit(__m512 t) {
  __m512 p = _mm512_set1_ps(-0.0032434205058962107f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.019848207011818886f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.05695228651165962f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.10602785646915436f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.15304981172084808f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.19675683975219727f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.24954071640968323f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.33329954743385315f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.4999990165233612f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.0f));
  // A rounded product the compiler may not fuse into the caller's next add
  // (_mm512_mul_ps is plain vector arithmetic to GCC, so -ffp-contract would):
  // the float32 kernels then add the same float32 value that half_tables.h stores.
  return _mm512_mul_round_ps(p, t, _MM_FROUND_CUR_DIRECTION);
}

}  // namespace avx512
#endif

template <class T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) {
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (std::is_same_v<T, float>) return V(avx512::exp(x));
#endif
    return x.exp();
  }
  static V exp_neg_abs(const V& x) {
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (std::is_same_v<T, float>) return V(avx512::exp_neg_abs(x));
#endif
    return (V(T(0)) - x.abs()).exp();
  }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V log1p_unit(const V& t) {
    if constexpr (std::is_same_v<T, float>) {
#if defined(FASTELBO_VEC_AVX512)
      return V(avx512::log1p_unit(t));
#endif
#if defined(FASTELBO_VEC_AVX2)
      // Opaque to the compiler, so the series' final product is rounded and not
      // fused into the caller's next add: the float32 kernels then add the same
      // float32 value that half_tables.h stores (as avx512::log1p_unit does).
      __m256 r = log1p_unit_series(t);
      asm("" : "+x"(r));
      return V(r);
#endif
      return log1p_unit_series(t);
    } else {
      return t.log1p();
    }
  }
  static V inv1p_unit(const V& t) {
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      return V(avx512::inv1p_unit(t));
    }
#endif
    return V(T(1)) / (V(T(1)) + t);
  }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V sin(const V& x) { return x.sin(); }
  static V cos(const V& x) { return x.cos(); }
  static V abs(const V& x) { return x.abs(); }
  // NaN-propagating: at::vec::maximum follows IEEE 754-2019 maximum.
  static V max0(const V& x) {
#if defined(FASTELBO_VEC_AVX512)
    // vmaxps returns its second operand when either is NaN
    if constexpr (std::is_same_v<T, float>) return V(_mm512_max_ps(_mm512_setzero_ps(), x));
#endif
    return at::vec::maximum(x, V(T(0)));
  }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // min(lo, x) / max(hi, x) that keep lo / hi where x is NaN (lo, hi never NaN).
  static V running_min(const V& lo, const V& x) {
#if defined(FASTELBO_VEC_AVX512)
    // vminps returns its second operand when either is NaN
    if constexpr (std::is_same_v<T, float>) return V(_mm512_min_ps(x, lo));
#endif
    return V::blendv(lo, x, x < lo);
  }
  static V running_max(const V& hi, const V& x) {
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (std::is_same_v<T, float>) return V(_mm512_max_ps(x, hi));
#endif
    return V::blendv(hi, x, x > hi);
  }
  static V select_nonneg(const V& x, const V& a, const V& b) { return V::blendv(b, a, x >= V(T(0))); }
  static V select_zero(const V& x, const V& a, const V& b) { return V::blendv(b, a, x == V(T(0))); }
};

// Non-temporal (streaming) stores of whole float32 vectors to vector-aligned
// addresses: large outputs written once skip the read-for-ownership of their
// destination. Only with AVX-512 (kCanStream false elsewhere: plain stores);
// the writer issues stream_fence() before its task ends.
template <class V>
inline constexpr bool kCanStream =
#if defined(FASTELBO_VEC_AVX512)
    std::is_same_v<typename V::value_type, float> && sizeof(V) == 64;
#else
    false;
#endif

template <class V>
inline void stream_store(typename V::value_type* p, const V& v) {
#if defined(FASTELBO_VEC_AVX512)
  if constexpr (kCanStream<V>) {
    _mm512_stream_ps(p, static_cast<__m512>(v));
    return;
  }
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(FASTELBO_VEC_AVX512)
  _mm_sfence();
#endif
}

}  // namespace fastelbo
