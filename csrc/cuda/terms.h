// terms.h: the per-row terms of the ELBO on the GPU, forward and backward side
// by side: reduction terms for reduce_kernel.h (one chunk of a row -> its sum)
// and gradient jobs for map_kernel.h (one chunk of a row -> its gradients),
// each a loop over the formulas of fastelbo_math.h. Used alone by kl.cu and
// loglik.cu, together by elbo.cu. Also the host-side glue: dtype dispatch and
// the conversion of launcher arguments to device views.
#pragma once

#include "launchers.h"
#include "map_kernel.h"
#include "reduce_kernel.h"

namespace fastelbo {
namespace cuda {

// ---------------------------------------------------------------------------
// Host glue
// ---------------------------------------------------------------------------
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kHalf:
      f(Half{});
      break;
    case DType::kBFloat16:
      f(BFloat16{});
      break;
    case DType::kFloat:
      f(float{});
      break;
    case DType::kDouble:
      f(double{});
      break;
  }
}

template <class T>
Mat<T> mat(const MatArg& a) {
  return Mat<T>{static_cast<const T*>(a.data), a.s0, a.s1, vectorizable<T>(a.data, a.s0, a.s1)};
}

template <class T>
RowVec<T> row_vec(const VecArg& a) {
  return RowVec<T>{static_cast<const T*>(a.data), a.s0};
}

// A contiguous [rows, cols] output (null: not wanted).
template <class T>
struct Out {
  T* p;
  bool vec;
  FASTELBO_DEVICE T* at(int64_t i, int64_t j, int64_t cols) const { return p + i * cols + j; }
};

template <class T>
Out<T> out(void* p, int64_t cols) {
  return Out<T>{static_cast<T*>(p), vectorizable<T>(p, cols, 1)};
}

// The upstream gradient of a row: a[i] + b[i], or a[i] - scale * b[i] (the ELBO's
// folded g_kl); absent vectors read 0.
template <class T>
struct RowGrad {
  RowVec<T> a, b;
  acc_t<T> scale;
  bool subtract;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i) const { return subtract ? a[i] - scale * b[i] : a[i] + b[i]; }
};

template <class T>
RowGrad<T> row_grad(const VecArg& g) {
  return RowGrad<T>{row_vec<T>(g), RowVec<T>{nullptr, 0}, acc_t<T>(0), false};
}

// ---------------------------------------------------------------------------
// KL(N(mu, e^lv) || N(0, I)) and || N(pmu, e^plv)
// ---------------------------------------------------------------------------
template <class T>
struct KLStdTerm {
  int64_t cols;
  Mat<T> mu, lv;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], l[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    A s = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) s += kl_std(m[k], l[k]);
    return s;
  }
};

template <class T>
struct KLNormalTerm {
  int64_t cols;
  Mat<T> mu, lv, pmu, plv;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], l[N], pm[N], pl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    load_chunk(pmu, i, j, n, pm);
    load_chunk(plv, i, j, n, pl);
    A s = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) s += kl_normal(m[k], l[k], pm[k], pl[k]);
    return s;
  }
};

template <class T>
struct KLStdGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Mat<T> mu, lv;
  Out<T> dmu, dlv;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A m[N], l[N], o0[N], o1[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
#pragma unroll
    for (int k = 0; k < N; ++k) kl_std_grad(gi, m[k], l[k], o0[k], o1[k]);
    if (dmu.p) store_chunk(dmu.at(i, j, cols), n, dmu.vec, o0);
    if (dlv.p) store_chunk(dlv.at(i, j, cols), n, dlv.vec, o1);
  }
};

template <class T>
struct KLNormalGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Mat<T> mu, lv, pmu, plv;
  Out<T> dmu, dlv, dpmu, dplv;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A m[N], l[N], pm[N], pl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    load_chunk(pmu, i, j, n, pm);
    load_chunk(plv, i, j, n, pl);
    // Reuse the inputs' registers for the outputs.
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A a, b, c, d;
      kl_normal_grad(gi, m[k], l[k], pm[k], pl[k], a, b, c, d);
      m[k] = a;
      l[k] = b;
      pm[k] = c;
      pl[k] = d;
    }
    if (dmu.p) store_chunk(dmu.at(i, j, cols), n, dmu.vec, m);
    if (dlv.p) store_chunk(dlv.at(i, j, cols), n, dlv.vec, l);
    if (dpmu.p) store_chunk(dpmu.at(i, j, cols), n, dpmu.vec, pm);
    if (dplv.p) store_chunk(dplv.at(i, j, cols), n, dplv.vec, pl);
  }
};

// ---------------------------------------------------------------------------
// Bernoulli log-likelihood with logits l, target x; Gaussian with mean m,
// log-variance s (any broadcast of it, as strides).
// ---------------------------------------------------------------------------
// x_out_of_range (validate_x): set to 1 when a target lies outside [0, 1] (NaN
// passes), in the pass that reads x anyway; null: no check.
template <class T>
struct BernoulliTerm {
  int64_t cols;
  Mat<T> logits, x;
  int* x_out_of_range;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A l[N], t[N];
    load_chunk(logits, i, j, n, l);
    load_chunk(x, i, j, n, t);
    A s = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) s += bernoulli_ll(l[k], t[k]);
    if (x_out_of_range) {
      bool bad = false;
#pragma unroll
      for (int k = 0; k < N; ++k) bad = bad || t[k] < A(0) || t[k] > A(1);  // padding lanes read 0
      if (bad) *x_out_of_range = 1;  // every writer writes 1: no atomic needed
    }
    return s;
  }
};

template <class T>
struct GaussianTerm {
  int64_t cols;
  Mat<T> mean, x, logvar;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], t[N], v[N];
    load_chunk(mean, i, j, n, m);
    load_chunk(x, i, j, n, t);
    load_chunk(logvar, i, j, n, v);
    A s = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) s += gaussian_ll(m[k], t[k], v[k]);
    return s;
  }
};

template <class T>
struct BernoulliGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Mat<T> logits, x;
  Out<T> dlogits, dx;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A l[N], t[N];
    load_chunk(logits, i, j, n, l);
    load_chunk(x, i, j, n, t);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A a, b;
      bernoulli_ll_grad(gi, l[k], t[k], a, b);
      l[k] = a;
      t[k] = b;
    }
    if (dlogits.p) store_chunk(dlogits.at(i, j, cols), n, dlogits.vec, l);
    if (dx.p) store_chunk(dx.at(i, j, cols), n, dx.vec, t);
  }
};

template <class T>
struct GaussianGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Mat<T> mean, x, logvar;
  Out<T> dmean, dx, dlogvar;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A m[N], t[N], v[N];
    load_chunk(mean, i, j, n, m);
    load_chunk(x, i, j, n, t);
    load_chunk(logvar, i, j, n, v);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A a, b, c;
      gaussian_ll_grad(gi, m[k], t[k], v[k], a, b, c);
      m[k] = a;
      t[k] = b;
      v[k] = c;
    }
    if (dmean.p) store_chunk(dmean.at(i, j, cols), n, dmean.vec, m);
    if (dx.p) store_chunk(dx.at(i, j, cols), n, dx.vec, t);
    if (dlogvar.p) store_chunk(dlogvar.at(i, j, cols), n, dlogvar.vec, v);
  }
};

// ---------------------------------------------------------------------------
// Epilogues of the reductions
// ---------------------------------------------------------------------------
// out[i] = a (single-term ops).
template <class T>
struct StoreSum {
  T* out;
  FASTELBO_DEVICE void operator()(int64_t i, acc_t<T> a, acc_t<T>) const { out[i] = from_acc<T>(a); }
};

}  // namespace cuda
}  // namespace fastelbo
