// rows.h: the two loops every CPU kernel is made of, over one row of [B, D]
// operands of any dtype and any strides (stride 0 is how broadcast priors and
// observation variances arrive):
//   reduce_row: sum_j f(in...[i, j])                 (forward: one value per row)
//   map_row:    out...[i, j] = f(g[i], in...[i, j])  (backward: gradients)
// Rows are walked in chunks of kChunk columns: unit-stride operands of the
// accumulation type are read in place, anything else (float16/bfloat16,
// strided) is converted once into an L1-resident scratch chunk.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../fastelbo_math.h"
#include "vec_math.h"

namespace fastelbo {
namespace cpu {

constexpr int64_t kChunk = 512;

// Rows per parallel task: enough columns that a task outweighs its dispatch.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// n contiguous values of T as accumulation-typed values: whole SIMD registers
// for float16/bfloat16 (a scalar c10::Half conversion does not vectorize).
template <class T>
inline void to_acc(const T* p, int64_t n, acc_t<T>* out) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    using VT = at::vec::Vectorized<T>;
    using VF = at::vec::Vectorized<float>;
    for (; k + VT::size() <= n; k += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(p + k));
      lo.store(out + k);
      hi.store(out + k + VF::size());
    }
  }
  for (; k < n; ++k) out[k] = static_cast<acc_t<T>>(p[k]);
}

// A read-only [B, D] operand, dtype T, arbitrary strides. A [1, D] operand
// (one value per feature, broadcast over rows) has s0 = 0.
template <class T>
struct Operand {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0;

  // n accumulation-typed values of row i from column j: in place when possible.
  const acc_t<T>* chunk(int64_t i, int64_t j, int64_t n, acc_t<T>* scratch) const {
    const T* p = data + i * s0 + j * s1;
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      if (s1 == 1) return p;
    }
    if (s1 == 1) {
      to_acc(p, n, scratch);
    } else {
      for (int64_t k = 0; k < n; ++k) scratch[k] = static_cast<acc_t<T>>(p[k * s1]);
    }
    return scratch;
  }
};

// The stride of a size-1 dimension is meaningless: 0 makes it broadcast.
inline int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

template <class T>
Operand<T> operand(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2);
  return Operand<T>{t.const_data_ptr<T>(), stride_of(t, 0), t.stride(1)};
}

// [K, B, D] samples (sk the stride of the sample dimension), sample(k) the [B, D]
// operand of sample k; a [B, D] tensor is one sample shared by all k (sk = 0),
// as x beside recon [K, B, D].
template <class T>
struct Samples {
  Operand<T> base;
  int64_t sk = 0;
  Operand<T> sample(int64_t k) const { return Operand<T>{base.data + k * sk, base.s0, base.s1}; }
};

template <class T>
Samples<T> samples(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 || t.dim() == 3);
  if (t.dim() == 2) return Samples<T>{operand<T>(t), 0};
  return Samples<T>{Operand<T>{t.const_data_ptr<T>(), stride_of(t, 1), t.stride(2)}, stride_of(t, 0)};
}

// A [B] vector (upstream gradients arrive expanded, stride 0, as often as not).
template <class T>
struct RowScalar {
  const T* data = nullptr;
  int64_t s0 = 0;
  acc_t<T> operator[](int64_t i) const { return data ? static_cast<acc_t<T>>(data[i * s0]) : acc_t<T>(0); }
};

template <class T>
RowScalar<T> row_scalar(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 1);
  return RowScalar<T>{t.const_data_ptr<T>(), t.stride(0)};
}

// Writes n accumulation-typed values into row i (contiguous output we allocated).
template <class T>
inline void store_chunk(T* out_row, int64_t j, int64_t n, const acc_t<T>* src) {
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    at::vec::convert(src, out_row + j, n);  // vectorized float -> half/bfloat16, round to nearest even
  } else {
    for (int64_t k = 0; k < n; ++k) out_row[j + k] = static_cast<T>(src[k]);
  }
}

// Half precision <-> float32 registers one register at a time (AVX-512): no
// scratch copy through L1 on the way in or out. Round to nearest even (NaN stays
// NaN), the conversions of at::vec::convert.
template <class T>
inline constexpr bool kHalfInRegisters =
#if defined(FASTELBO_VEC_AVX512)
    std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
#else
    false;
#endif

#if defined(FASTELBO_VEC_AVX512)
inline __mmask16 first_lanes(int64_t w) { return static_cast<__mmask16>((1u << w) - 1); }

template <class T>
inline at::vec::Vectorized<float> load_half(const T* p, int64_t w) {
  const __m256i bits = w == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                               : _mm256_maskz_loadu_epi16(first_lanes(w), p);
  __m512 v;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    at::vec::cvtbf16_fp32(bits, v);
  else
    at::vec::cvtfp16_fp32(bits, v);
  return v;
}

// stream: a whole vector to a 32-byte aligned p, non-temporal (map_row's stream).
template <class T>
inline void store_half(T* p, const at::vec::Vectorized<float>& v, int64_t w, bool stream = false) {
  __m256i bits;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    bits = at::vec::cvtfp32_bf16(v);
  else
    bits = at::vec::cvtfp32_fp16(v);
  if (w == 16 && stream)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
  else if (w == 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  else
    _mm256_mask_storeu_epi16(p, first_lanes(w), bits);
}

// bfloat16 two registers at a time, for elementwise loops (map_row): one 64-byte
// load holds 32 values, and each 32-bit lane's low half (the even value) and high
// half (the odd value) are already float32 bit patterns once shifted or masked:
// 2 instructions per 32 values instead of 4. The store rounds both registers to
// nearest even as at::vec::cvtfp32_bf16 does (NaN -> 0xFFFF, the same bits) and
// interleaves them back with one ternary-logic op. Element order changes inside
// the pair, so sums (reduce_row) never use this: their lanes must add the values
// in the float32 kernel's order.
inline void load_bf16_pair(const at::BFloat16* p, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// v rounded to bfloat16 (nearest even) in the upper half of each lane; NaN -> all ones.
inline __m512i bf16_rne_upper(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(-1), r);
}

// stream: p 64-byte aligned, non-temporal.
inline void store_bf16_pair(at::BFloat16* p, __m512 even, __m512 odd, bool stream) {
  const __m512i lo = _mm512_srli_epi32(bf16_rne_upper(even), 16);
  // lo | (odd's rounded bits & 0xFFFF0000): truth table A | (B & C) = 0xF8
  const __m512i bits = _mm512_ternarylogic_epi32(lo, bf16_rne_upper(odd),
                                                 _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), 0xF8);
  if (stream)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), bits);
  else
    _mm512_storeu_si512(p, bits);
}
#endif

// The N operands of columns [j, j + n) of row i as Vectorized<A>: read in place
// (unit-stride A), converted register by register (unit-stride half precision on
// AVX-512) or from a converted scratch chunk (anything else).
template <class T, size_t N>
struct ChunkIn {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const A* p[N];
  const T* raw[N];

  ChunkIn(const std::array<Operand<T>, N>& in, int64_t i, int64_t j, int64_t n, A (*scratch)[kChunk]) {
    for (size_t q = 0; q < N; ++q) {
      raw[q] = nullptr;
      p[q] = nullptr;
      if (kHalfInRegisters<T> && in[q].s1 == 1)
        raw[q] = in[q].data + i * in[q].s0 + j;
      else
        p[q] = in[q].chunk(i, j, n, scratch[q]);
    }
  }

  // Every operand read in place from 16-bit memory (the bfloat16 pair loop's condition).
  bool all_raw() const {
    for (size_t q = 0; q < N; ++q)
      if (!raw[q]) return false;
    return true;
  }

  // Values k .. k + w - 1 of operand q (w <= Vec::size(); lanes past w are zero).
  Vec load(size_t q, int64_t k, int64_t w) const {
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (kHalfInRegisters<T>) {
      if (raw[q]) return load_half(raw[q] + k, w);
    }
#endif
    return w == Vec::size() ? Vec::loadu(p[q] + k) : Vec::loadu(p[q] + k, w);
  }
};

// Software prefetch for the unit-stride operands of a chunk: pointers kPrefetchBytes
// ahead of column j of row i (rows are contiguous, so past a row's end this is the
// next row, which the same task reads next), nullptr otherwise. The hardware
// prefetcher alone leaves these compute-heavy loops waiting on memory (Bernoulli
// forward over 4096 x 784 on one thread: 1.26 -> 0.94 ms with it).
constexpr int64_t kPrefetchBytes = 2048;

template <class T, size_t N>
inline std::array<const T*, N> prefetch_rows(const std::array<Operand<T>, N>& in, int64_t i, int64_t j) {
  std::array<const T*, N> pf;
  for (size_t q = 0; q < N; ++q)
    pf[q] = in[q].s1 == 1 ? in[q].data + i * in[q].s0 + j + kPrefetchBytes / static_cast<int64_t>(sizeof(T)) : nullptr;
  return pf;
}

template <class T, size_t N>
inline void prefetch_at(const std::array<const T*, N>& pf, int64_t k) {
  for (size_t q = 0; q < N; ++q)
    if (pf[q]) __builtin_prefetch(pf[q] + k);
}

// Running [lo, hi] of one operand's values with NaN skipped (a NaN compares
// false and leaves the bounds as they were): reduce_row keeps it in registers
// beside the sum, so a range check costs two instructions per vector.
template <class A>
struct Bounds {
  A lo = std::numeric_limits<A>::infinity();
  A hi = -std::numeric_limits<A>::infinity();
};

// sum_j f(v_0[i, j], ..., v_{N-1}[i, j]) with f taking std::array<Vectorized, N>.
// Each lane sums one chunk in A; the chunk sums are added per lane in double (one
// horizontal sum per row), so long rows keep float32-rounding accuracy.
// kWatch >= 0: also the bounds of operand kWatch's values, into *watch.
template <class T, size_t N, int kWatch = -1, class F>
double reduce_row(const std::array<Operand<T>, N>& in, int64_t i, int64_t cols, F f,
                  Bounds<acc_t<T>>* watch = nullptr) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  static_assert(kWatch < static_cast<int>(N), "kWatch names an operand");
  alignas(64) A scratch[N][kChunk];
  alignas(64) double totals[W] = {};
  const Vec inf(std::numeric_limits<A>::infinity()), minus_inf(-std::numeric_limits<A>::infinity());
  Vec lo = inf, hi = minus_inf;
  for (int64_t j = 0; j < cols; j += kChunk) {
    const int64_t n = std::min(kChunk, cols - j);
    const ChunkIn<T, N> c(in, i, j, n, scratch);
    const auto pf = prefetch_rows(in, i, j);
    Vec acc(A(0));
    std::array<Vec, N> v;
    int64_t k = 0;
    for (; k + W <= n; k += W) {
      prefetch_at(pf, k);
      for (size_t q = 0; q < N; ++q) v[q] = c.load(q, k, W);
      if constexpr (kWatch >= 0) {
        lo = Math<Vec>::running_min(lo, v[kWatch]);
        hi = Math<Vec>::running_max(hi, v[kWatch]);
      }
      acc += f(v);
    }
    if (k < n) {
      for (size_t q = 0; q < N; ++q) v[q] = c.load(q, k, n - k);
      acc += Vec::set(Vec(A(0)), f(v), n - k);
      if constexpr (kWatch >= 0) {  // lanes past the row's end stay out of the bounds
        lo = Math<Vec>::running_min(lo, Vec::set(inf, v[kWatch], n - k));
        hi = Math<Vec>::running_max(hi, Vec::set(minus_inf, v[kWatch], n - k));
      }
    }
    alignas(64) A lanes[W];
    acc.store(lanes);
    for (int64_t l = 0; l < W; ++l) totals[l] += static_cast<double>(lanes[l]);
  }
  if constexpr (kWatch >= 0) {
    alignas(64) A los[W], his[W];
    lo.store(los);
    hi.store(his);
    for (int64_t l = 0; l < W; ++l) {
      watch->lo = std::min(watch->lo, los[l]);
      watch->hi = std::max(watch->hi, his[l]);
    }
  }
  double total = 0.0;
  for (int64_t l = 0; l < W; ++l) total += totals[l];
  return total;
}

// out_m[i, j] = f(g, v_0[i, j], ...)_m for the outputs whose row pointer is set;
// add_m[j] += f(...)_m (accumulation type, unit stride) for those whose add row
// is set instead: sums over samples or rows stay in accumulation-typed row buffers.
// f(Vec g, std::array<Vec, N> v, std::array<Vec, M>& out).
// (kAdd = false: no add rows, the plain store loop of map_row.)
// stream: the outputs are large (far beyond L2): unit-stride float32 rows, and
// float16/bfloat16 rows converted in registers, whose chunk starts at a vector's
// output alignment (64 B, 32 B) are written with non-temporal stores (no
// read-for-ownership of the destination; bfloat16 backward 0.88 -> 0.81x the
// float32 time with the tables, 1.30 -> 1.26x computing, 4096 x 784 here). Only inside parallel_blocks, which
// fences each block's streaming stores before the block ends (a fence per row
// costs more than the stores save).
template <class T, size_t N, size_t M, class F, bool kAdd = true>
void map_row_add(const std::array<Operand<T>, N>& in, int64_t i, int64_t cols, acc_t<T> g,
                 const std::array<T*, M>& out_rows, const std::array<acc_t<T>*, M>& add_rows, F f,
                 bool stream = false) {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  if constexpr (!((std::is_same_v<T, A> || kHalfInRegisters<T>) && kCanStream<Vec>)) stream = false;
  constexpr size_t kOutVecBytes = sizeof(T) * W;  // one vector's output: 64 B float32, 32 B half
  alignas(64) A scratch[N][kChunk];
  alignas(64) A result[M][kChunk];
  const Vec gv(g);
  for (int64_t j = 0; j < cols; j += kChunk) {
    const int64_t n = std::min(kChunk, cols - j);
    const ChunkIn<T, N> c(in, i, j, n, scratch);
    const auto pf = prefetch_rows(in, i, j);
    std::array<Vec, N> v;
    std::array<Vec, M> o;
    std::array<bool, M> nt{};
    if (stream)
      for (size_t m = 0; m < M; ++m)
        nt[m] = out_rows[m] && reinterpret_cast<uintptr_t>(out_rows[m] + j) % kOutVecBytes == 0;
    auto one = [&](int64_t k) {  // values k .. k + w - 1, one register per operand
      const int64_t w = std::min(W, n - k);
      prefetch_at(pf, k);
      for (size_t q = 0; q < N; ++q) v[q] = c.load(q, k, w);
      f(gv, v, o);
      for (size_t m = 0; m < M; ++m) {
        if (kAdd && add_rows[m]) {
          A* a = add_rows[m] + j + k;
          (Vec::loadu(a, w) + o[m]).store(a, w);
          continue;
        }
        if (!out_rows[m]) continue;
        if constexpr (std::is_same_v<T, A>) {
          if (nt[m] && w == W)
            stream_store(out_rows[m] + j + k, o[m]);
          else
            o[m].store(out_rows[m] + j + k, w);
        } else if constexpr (kHalfInRegisters<T>) {
#if defined(FASTELBO_VEC_AVX512)
          store_half(out_rows[m] + j + k, o[m], w, nt[m]);
#endif
        } else {
          o[m].store(result[m] + k, w);
        }
      }
    };
    int64_t k = 0;
#if defined(FASTELBO_VEC_AVX512)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      bool pairs = c.all_raw();
      if constexpr (kAdd)
        for (size_t m = 0; m < M; ++m) pairs = pairs && !add_rows[m];
      if (pairs) {
        // A streamed pair needs 64-byte alignment: one register first where the
        // first output's chunk starts half-way (every other 784-value row).
        const T* first = nullptr;
        for (size_t m = 0; m < M && !first; ++m) first = out_rows[m];
        if (stream && first && reinterpret_cast<uintptr_t>(first + j) % 64 != 0 && n >= W) {
          one(0);
          k = W;
        }
        std::array<bool, M> nt2{};
        for (size_t m = 0; m < M; ++m)
          nt2[m] = stream && out_rows[m] && reinterpret_cast<uintptr_t>(out_rows[m] + j + k) % 64 == 0;
        std::array<Vec, N> ve, vo;
        std::array<Vec, M> oe, oo;
        for (; k + 2 * W <= n; k += 2 * W) {
          prefetch_at(pf, k);  // one 64-byte line per operand
          for (size_t q = 0; q < N; ++q) {
            __m512 e, od;
            load_bf16_pair(c.raw[q] + k, e, od);
            ve[q] = e;
            vo[q] = od;
          }
          f(gv, ve, oe);
          f(gv, vo, oo);
          for (size_t m = 0; m < M; ++m)
            if (out_rows[m]) store_bf16_pair(out_rows[m] + j + k, oe[m], oo[m], nt2[m]);
        }
      }
    }
#endif
    for (; k < n; k += W) one(k);
    if constexpr (!std::is_same_v<T, A> && !kHalfInRegisters<T>) {
      for (size_t m = 0; m < M; ++m)
        if (out_rows[m] && !(kAdd && add_rows[m])) store_chunk(out_rows[m], j, n, result[m]);
    }
  }
}

template <class T, size_t N, size_t M, class F>
void map_row(const std::array<Operand<T>, N>& in, int64_t i, int64_t cols, acc_t<T> g,
             const std::array<T*, M>& out_rows, F f, bool stream = false) {
  map_row_add<T, N, M, F, false>(in, i, cols, g, out_rows, std::array<acc_t<T>*, M>{}, f, stream);
}

// Outputs at least this many elements are written with non-temporal stores
// (map_row's stream): far beyond L2, they would only evict the inputs.
constexpr int64_t kStreamElements = int64_t(1) << 20;

// Rows [0, rows) cut into `parts` fixed blocks, f(part, r0, r1) on them in
// parallel. A backward that sums over rows (a [1, D] parameter's gradient)
// keeps one partial per block and adds the blocks in order afterwards: the
// result depends on the thread count only, never on scheduling.
struct RowBlocks {
  int64_t rows, parts;
  int64_t begin(int64_t p) const { return rows * p / parts; }
};

inline RowBlocks row_blocks(int64_t rows, int64_t grain) {
  const int64_t by_grain = (rows + grain - 1) / std::max<int64_t>(grain, 1);
  return RowBlocks{rows, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_grain))};
}

template <class F>
void parallel_blocks(const RowBlocks& blocks, F f) {
  at::parallel_for(0, blocks.parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(p, blocks.begin(p), blocks.begin(p + 1));
    stream_fence();  // map_row's non-temporal stores, visible before the task ends
  });
}

// Zeroed accumulation-typed buffers of `cols` values, one per block (or per
// row), for map_row_add; empty when not wanted.
template <class A>
struct RowBuffers {
  std::vector<A> data;
  int64_t cols = 0;
  RowBuffers(bool wanted, int64_t count, int64_t cols_) : cols(cols_) {
    if (wanted) data.assign(static_cast<size_t>(count * cols), A(0));
  }
  A* row(int64_t p) { return data.empty() ? nullptr : data.data() + p * cols; }
  void zero(int64_t p) {
    if (!data.empty()) std::fill_n(data.data() + p * cols, cols, A(0));
  }
};

// out[j] = sum_p part[p][j], blocks in order, written as T (out contiguous).
template <class T>
void sum_blocks(RowBuffers<acc_t<T>>& parts, int64_t count, T* out) {
  using A = acc_t<T>;
  const int64_t cols = parts.cols;
  at::parallel_for(0, cols, kChunk, [&](int64_t j0, int64_t j1) {
    alignas(64) A buf[kChunk];
    for (int64_t j = j0; j < j1; j += kChunk) {
      const int64_t n = std::min(kChunk, j1 - j);
      std::fill_n(buf, n, A(0));
      for (int64_t p = 0; p < count; ++p) {
        const A* src = parts.row(p) + j;
        for (int64_t q = 0; q < n; ++q) buf[q] += src[q];
      }
      store_chunk(out, j, n, buf);
    }
  });
}

// Contiguous output row pointer, or nullptr for an output not asked for.
template <class T>
inline T* row_ptr(const at::Tensor& out, int64_t i) {
  return out.numel() ? out.data_ptr<T>() + i * out.stride(0) : nullptr;
}

// Row i of sample k of a contiguous [K, B, D] (or [B, D], k = 0) output, or nullptr.
template <class T>
inline T* sample_row_ptr(const at::Tensor& out, int64_t k, int64_t i) {
  if (!out.numel()) return nullptr;
  const int64_t rows = out.size(-2), cols = out.size(-1);
  return out.data_ptr<T>() + (k * rows + i) * cols;
}

}  // namespace cpu
}  // namespace fastelbo
