// The Bernoulli terms of float16/bfloat16 logits by table lookup.
//
// A 16-bit logit has one of 65536 bit patterns, and docs/design.md §2 computes a
// half-precision call in float32 on the exact value of each input. So the parts
// of the Bernoulli term that depend on the logit alone, log1p(e^-|l|) forward
// and sigmoid(l) backward, are tabulated once per dtype by the float32 vector
// code itself (fastelbo_math.h through Math<Vectorized<float>>): a lookup gives
// the same bits as the float32 kernel on the upcast logit, and one gather
// replaces the exp, log1p and reciprocal that make the float32 loop
// compute-bound. The rest of the term is the float32 formula, unchanged.
// AVX-512 and AVX2 builds; elsewhere nothing is tabulated.
//
// A lookup is one vgatherdps, and what that costs depends on the CPU and its
// microcode: about 24 cycles per 16 values on the Ice Lake Xeon of 2026-12-06,
// where the row loops ran faster computing both functions. So each table is used
// only where, timed at first use, the loop with it is faster
// (FASTELBO_HALF_TABLES=1 or 0 forces the choice). Either way the bits are the same.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

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

// The tables one term uses: nullptr where the function is computed instead.
struct BernoulliLookups {
  const float* log1p_exp_neg_abs = nullptr;  // forward
  const float* sigmoid = nullptr;            // backward
};

// The Bernoulli element functions of reduce_row (log p) and map_row (its
// gradients): computed, or with the logit-only part looked up in a table.
template <class A>
auto bernoulli_ll_computed() {
  using Vec = at::vec::Vectorized<A>;
  return [](const std::array<Vec, 2>& v) { return bernoulli_ll(v[0], v[1]); };
}

template <class A>
auto bernoulli_grad_computed() {
  using Vec = at::vec::Vectorized<A>;
  return [](const Vec& gv, const std::array<Vec, 2>& v, std::array<Vec, 2>& o) {
    bernoulli_ll_grad(gv, v[0], v[1], o[0], o[1]);
  };
}

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

template <class T>
inline at::vec::Vectorized<float> lookup(const float* table, const at::vec::Vectorized<float>& v);

// With the logit-only part looked up in a table instead.
template <class T>
auto bernoulli_ll_lookup(const float* table) {
  using Vec = at::vec::Vectorized<float>;
  return [table](const std::array<Vec, 2>& v) { return bernoulli_ll_from(v[0], v[1], lookup<T>(table, v[0])); };
}

template <class T>
auto bernoulli_grad_lookup(const float* table) {
  using Vec = at::vec::Vectorized<float>;
  return [table](const Vec& gv, const std::array<Vec, 2>& v, std::array<Vec, 2>& o) {
    bernoulli_ll_grad_from(gv, v[0], v[1], lookup<T>(table, v[0]), o[0], o[1]);
  };
}

// FASTELBO_HALF_TABLES: 1 (use the tables), 0 (compute), unset: time both.
inline int half_tables_forced() {
  const char* text = std::getenv("FASTELBO_HALF_TABLES");
  if (!text || !*text) return -1;
  if (!std::strcmp(text, "1") || !std::strcmp(text, "0")) return text[0] - '0';
  TORCH_WARN("fastelbo: FASTELBO_HALF_TABLES must be 1 (use the tables) or 0 (compute), got '", text,
             "'; timing both");
  return -1;
}

// Whether the row loops run faster with a table than computing its function.
// Timed on the loops themselves (reduce_row forward, map_row backward writing the
// logits' gradient only, as a training step asks; best of 5 interleaved rounds over
// 64 rows of 784 logits, about a millisecond in all): a gather that beats the
// arithmetic alone can lose among a row's loads and stores.
struct LookupWins {
  bool forward, backward;
};

template <class T>
LookupWins lookups_win(const BernoulliTables& t) {
  constexpr int64_t kRows = 64, kCols = 784;
  std::vector<T> l(kRows * kCols), x(kRows * kCols), dl(kRows * kCols);
  uint32_t state = 12345;
  for (size_t k = 0; k < l.size(); ++k) {  // logits spread over [-8, 8), binary targets
    state = state * 1664525u + 1013904223u;
    l[k] = T(16.f * static_cast<float>(state >> 8) / 16777216.f - 8.f);
    x[k] = T((state >> 7) & 1 ? 1.f : 0.f);
  }
  const Operand<T> r{l.data(), kCols, 1}, xs{x.data(), kCols, 1};
  auto elapsed = [](auto body) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    return std::chrono::steady_clock::now() - t0;
  };
  auto forward = [&](auto f) {
    return elapsed([&] {
      volatile double sink = 0;  // the sums are used: the loops cannot be dropped
      for (int64_t i = 0; i < kRows; ++i) sink = sink + reduce_row<T, 2>({r, xs}, i, kCols, f);
    });
  };
  auto backward = [&](auto f) {
    return elapsed([&] {
      for (int64_t i = 0; i < kRows; ++i)
        map_row<T, 2, 2>({r, xs}, i, kCols, 1.f, {dl.data() + i * kCols, nullptr}, f);  // a step's drecon only
    });
  };
  using D = std::chrono::steady_clock::duration;
  D fwd_table = D::max(), fwd_math = D::max(), bwd_table = D::max(), bwd_math = D::max();
  for (int round = 0; round < 5; ++round) {
    fwd_table = std::min(fwd_table, forward(bernoulli_ll_lookup<T>(t.log1p_exp_neg_abs)));
    fwd_math = std::min(fwd_math, forward(bernoulli_ll_computed<float>()));
    bwd_table = std::min(bwd_table, backward(bernoulli_grad_lookup<T>(t.sigmoid)));
    bwd_math = std::min(bwd_math, backward(bernoulli_grad_computed<float>()));
  }
  return {fwd_table < fwd_math, bwd_table < bwd_math};
}

// Built and timed on first use (about 2 ms: 0.4 the tables, the rest the timing;
// measured through the first bfloat16 call), then shared by every call of this dtype.
template <class T>
BernoulliLookups bernoulli_lookups() {
  if constexpr (kHalfTables<T>) {
    static const BernoulliLookups chosen = [] {
      const int forced = half_tables_forced();
      if (forced == 0) return BernoulliLookups{};
      const BernoulliTables* t = make_bernoulli_tables<T>();
      const LookupWins wins = forced >= 0 ? LookupWins{forced == 1, forced == 1} : lookups_win<T>(*t);
      if (!wins.forward && !wins.backward) {
        delete t;  // 512 KiB this process will not look at
        return BernoulliLookups{};
      }
      return BernoulliLookups{wins.forward ? t->log1p_exp_neg_abs : nullptr, wins.backward ? t->sigmoid : nullptr};
    }();
    return chosen;
  } else {
    return {};
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
BernoulliLookups bernoulli_lookups() {
  return {};
}

template <class T>
auto bernoulli_ll_lookup(const float*);  // never called: kHalfTables<T> is false

template <class T>
auto bernoulli_grad_lookup(const float*);
#endif

}  // namespace cpu
}  // namespace fastelbo
