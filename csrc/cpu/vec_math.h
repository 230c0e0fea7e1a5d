// Math<V> for at::vec::Vectorized, so the formulas of fastelbo_math.h run
// on whole SIMD registers in the CPU kernels (Sleef behind exp/log/log1p/sin/cos).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../fastelbo_math.h"

namespace fastelbo {

template <class T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V log1p_unit(const V& t) {
    if constexpr (std::is_same_v<T, float>) {
      return log1p_unit_series(t);
    } else {
      return t.log1p();
    }
  }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V sin(const V& x) { return x.sin(); }
  static V cos(const V& x) { return x.cos(); }
  static V abs(const V& x) { return x.abs(); }
  // NaN-propagating: at::vec::maximum follows IEEE 754-2019 maximum.
  static V max0(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static V maximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V select_nonneg(const V& x, const V& a, const V& b) { return V::blendv(b, a, x >= V(T(0))); }
};

}  // namespace fastelbo
