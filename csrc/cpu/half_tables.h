// The Bernoulli terms of float16/bfloat16 logits by table lookup.
//
// A 16-bit logit has one of 65536 bit patterns, and DESIGN §1 computes a
// half-precision call in float32 on the exact value of each input. So the parts
// of the Bernoulli term that depend on the logit alone, log1p(e^-|l|) forward
// and sigmoid(l) backward, are tabulated once per dtype by the float32 vector
// code itself (fastelbo_math.h through Math<Vectorized<float>>): a lookup gives
// the same bits as the float32 kernel on the upcast logit, and one gather
// replaces the exp, log1p and reciprocal that make the float32 loop
// compute-bound. The rest of the term is the float32 formula, unchanged.
// AVX-512 and AVX2 builds; elsewhere nothing is tabulated.
#pragma once

#include <cstdint>
#include <type_traits>

#include "rows.h"

namespace fastelbo {
namespace cpu {

// 16-bit inputs on AVX-512 (one vgatherdps per 16 values) and AVX2 (per 8).
template <class T>
inline constexpr bool kHalfTables =
#if defined(FASTELBO_VEC_AVX512) || defined(FASTELBO_VEC_AVX2)
    std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
#else
    false;
#endif

struct BernoulliTables {
  alignas(64) float log1p_exp_neg_abs[65536];  // indexed by the logit's bit pattern
  alignas(64) float sigmoid[65536];
};

#if defined(FASTELBO_VEC_AVX512) || defined(FASTELBO_VEC_AVX2)
template <class T>
BernoulliTables* make_bernoulli_tables() {
  using Vec = at::vec::Vectorized<float>;
  auto* t = new BernoulliTables;  // 512 KiB: on the heap, never on a worker's stack
  alignas(64) float l[Vec::size()];
  for (int32_t b = 0; b < 65536; b += Vec::size()) {
    for (int32_t q = 0; q < Vec::size(); ++q)
      l[q] = static_cast<float>(T(static_cast<uint16_t>(b + q), T::from_bits()));
    const Vec v = Vec::loadu(l);
    log1p_exp_neg_abs(v).store(t->log1p_exp_neg_abs + b);
    sigmoid(v).store(t->sigmoid + b);
  }
  return t;
}

// Built on first use (about 0.4 ms, measured through the first float16 call), then shared.
template <class T>
const BernoulliTables* bernoulli_tables() {
  if constexpr (kHalfTables<T>) {
    static const BernoulliTables* tables = make_bernoulli_tables<T>();
    return tables;
  } else {
    return nullptr;
  }
}

// table[bits of v], v holding exact T values (as load_half and to_acc give them).
template <class T>
inline at::vec::Vectorized<float> lookup(const float* table, const at::vec::Vectorized<float>& v) {
#if defined(FASTELBO_VEC_AVX512)
  __m512i bits;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    bits = _mm512_srli_epi32(_mm512_castps_si512(v), 16);  // a bfloat16 is the top half of its float32
  else
    bits = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));  // exact
  return _mm512_i32gather_ps(bits, table, 4);
#else
  __m256i bits;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    bits = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  else
    bits = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm256_i32gather_ps(table, bits, 4);
#endif
}
#else
template <class T>
const BernoulliTables* bernoulli_tables() {
  return nullptr;
}

template <class T, class V>
V lookup(const float*, const V& v);  // never called: kHalfTables<T> is false
#endif

}  // namespace cpu
}  // namespace fastelbo
