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
  return Mat<T>{static_cast<const T*>(a.data), a.s0, a.s1, vectorizable<T>(a.data, a.s0, a.s1, a.sk), a.sk};
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

// The tail the latent gradient jobs share (KLNormalGrad, FreeBitsGrad,
// LogPQGrad): store the chunks of row i, columns [j, j + n) into dmu, dlv and,
// with a prior, dpmu, dplv; a null output is not wanted. Without a prior
// (kPrior false) dpmu, dplv, pm and pl are never read.
template <bool kPrior, int N, class T>
FASTELBO_DEVICE void store_latent_chunks(const Out<T>& dmu, const Out<T>& dlv, const Out<T>& dpmu,
                                         const Out<T>& dplv, int64_t i, int64_t j, int64_t cols, int n,
                                         const acc_t<T> (&m)[N], const acc_t<T> (&l)[N], const acc_t<T> (&pm)[N],
                                         const acc_t<T> (&pl)[N]) {
  if (dmu.p) store_chunk(dmu.at(i, j, cols), n, dmu.vec, m);
  if (dlv.p) store_chunk(dlv.at(i, j, cols), n, dlv.vec, l);
  if (kPrior && dpmu.p) store_chunk(dpmu.at(i, j, cols), n, dpmu.vec, pm);
  if (kPrior && dplv.p) store_chunk(dplv.at(i, j, cols), n, dplv.vec, pl);
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
    store_latent_chunks<true>(dmu, dlv, dpmu, dplv, i, j, cols, n, m, l, pm, pl);
  }
};

// ---------------------------------------------------------------------------
// Free bits (Kingma et al. 2016): KL[b, j] of dimensions whose batch mean
// kl_dims[j] is below the floor counts as the floor, with no gradient; a
// dimension of NaN kl_dims is NaN in every row, value and gradient
// (fastelbo_math.h free_bits_weight / free_bits_select, w[j] its weight).
//   pass 1  kl_dims[j] = (1/B) sum_b KL[b, j]       KLColumnJob (col_map_kernel)
//   pass 2  kl[b] = sum_j free_bits_select(w[j], KL[b, j], fb)   FreeBitsTerm (reduce_kernel)
//   backward  dX[b, j] = free_bits_select(w[j], g[b] * dKL[b, j]/dX, 0)   FreeBitsGrad (map_kernel)
// ---------------------------------------------------------------------------
template <class T, bool kPrior>
struct KLElems {
  Mat<T> mu, lv, pmu, plv;
  template <int N>
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&out)[N]) const {
    using A = acc_t<T>;
    A m[N], l[N], pm[N], pl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    if (kPrior) {
      load_chunk(pmu, i, j, n, pm);
      load_chunk(plv, i, j, n, pl);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = kPrior ? kl_normal(m[e], l[e], pm[e], pl[e]) : kl_std(m[e], l[e]);
  }
};

// The per-dimension weights of the floor: kl_dims [cols] (accumulation type, any stride).
template <class T>
struct DimWeights {
  const acc_t<T>* kl_dims;
  int64_t stride;
  acc_t<T> free_bits;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t j) const { return free_bits_weight(kl_dims[j * stride], free_bits); }
};

template <class T, bool kPrior>
struct KLColumnJob {
  int64_t rows, cols;
  KLElems<T, kPrior> kl;
  template <int N>
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&acc)[N]) const {
    acc_t<T> v[N];
    kl(i, j, n, v);
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) acc[e] += v[e];
  }
};

template <class T, bool kPrior>
struct FreeBitsTerm {
  int64_t cols;
  KLElems<T, kPrior> kl;
  DimWeights<T> weight;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A v[N];
    kl(i, j, n, v);
    A s = A(0);
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) s += free_bits_select(weight(j + e), v[e], weight.free_bits);
    return s;
  }
};

template <class T, bool kPrior>
struct FreeBitsGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Mat<T> mu, lv, pmu, plv;
  DimWeights<T> weight;
  Out<T> dmu, dlv, dpmu, dplv;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A m[N], l[N], pm[N], pl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    if (kPrior) {
      load_chunk(pmu, i, j, n, pm);
      load_chunk(plv, i, j, n, pl);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A w = e < n ? weight(j + e) : A(0);
      A a, b, c = A(0), d = A(0);
      if (kPrior) {
        kl_normal_grad(gi, m[e], l[e], pm[e], pl[e], a, b, c, d);
      } else {
        kl_std_grad(gi, m[e], l[e], a, b);
      }
      // A select, not a product: a floored dimension's gradient is exactly 0 (torch.where).
      m[e] = free_bits_select(w, a, A(0));
      l[e] = free_bits_select(w, b, A(0));
      pm[e] = free_bits_select(w, c, A(0));
      pl[e] = free_bits_select(w, d, A(0));
    }
    store_latent_chunks<kPrior>(dmu, dlv, dpmu, dplv, i, j, cols, n, m, l, pm, pl);
  }
};

// ---------------------------------------------------------------------------
// The upstream gradient of sample k of row i, for the K-sample gradient jobs:
//   MeanGrad    g(i) * scale (the ELBO's average over samples: scale = 1/K; 1 for
//               the single-sample ops)
//   WeightGrad  c[k, i], a [K, rows] accumulation-typed input (the IWAE weights)
// ---------------------------------------------------------------------------
template <class T>
struct MeanGrad {
  RowGrad<T> g;
  acc_t<T> scale;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t, int64_t i) const { return g(i) * scale; }
};

template <class T>
MeanGrad<T> mean_grad(const VecArg& g) {
  return MeanGrad<T>{row_grad<T>(g), acc_t<T>(1)};
}

template <class T>
struct WeightGrad {
  const acc_t<T>* p;
  int64_t sk, s0;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t k, int64_t i) const { return p[k * sk + i * s0]; }
};

// ---------------------------------------------------------------------------
// Bernoulli log-likelihood with logits l, target x; Gaussian with mean m,
// log-variance s ([1, cols]: one per feature, s0 = 0; or [rows, cols]; any
// strides). The logits / mean may hold K samples ([K, rows, cols], Mat::sk)
// sharing x and s: the terms sum samples [k0, k1) of a row chunk (x read once),
// the gradient jobs loop over the samples and sum dx (and ds) in registers.
// ---------------------------------------------------------------------------
// x_out_of_range (validate_x): set to 1 when a target lies outside [0, 1] (NaN
// passes), in the pass that reads x anyway; null: no check.
template <class T>
struct BernoulliTerm {
  int64_t cols, samples;
  Mat<T> logits, x;
  int* x_out_of_range;
  FASTELBO_DEVICE acc_t<T> sum(int64_t i, int64_t j, int n, int64_t k0, int64_t k1) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A l[N], t[N];
    load_chunk(x, i, j, n, t);
    A s = A(0);
    for (int64_t k = k0; k < k1; ++k) {
      load_chunk(logits.sample(k), i, j, n, l);
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) s += bernoulli_ll(l[e], t[e]);
    }
    if (x_out_of_range) {
      bool bad = false;
#pragma unroll
      for (int e = 0; e < N; ++e) bad = bad || t[e] < A(0) || t[e] > A(1);  // padding lanes read 0
      if (bad) *x_out_of_range = 1;  // every writer writes 1: no atomic needed
    }
    return s;
  }
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const { return sum(i, j, n, 0, samples); }
};

template <class T>
struct GaussianTerm {
  int64_t cols, samples;
  Mat<T> mean, x, logvar;
  FASTELBO_DEVICE acc_t<T> sum(int64_t i, int64_t j, int n, int64_t k0, int64_t k1) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], t[N], v[N];
    load_chunk(x, i, j, n, t);
    load_chunk(logvar, i, j, n, v);
    A s = A(0);
    for (int64_t k = k0; k < k1; ++k) {
      load_chunk(mean.sample(k), i, j, n, m);
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) s += gaussian_ll(m[e], t[e], v[e]);
    }
    return s;
  }
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const { return sum(i, j, n, 0, samples); }
};

// dlogits[k, i] = g(k, i) * (x - sigmoid(l)),  dx[i] = sum_k g(k, i) * l.
template <class T, class G>
struct BernoulliGrad {
  int64_t rows, cols, samples;
  G g;
  Mat<T> logits, x;
  Out<T> dlogits, dx;  // dlogits [K, rows, cols]
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A l[N], t[N], sx[N];
    load_chunk(x, i, j, n, t);
#pragma unroll
    for (int e = 0; e < N; ++e) sx[e] = A(0);
    for (int64_t k = 0; k < samples; ++k) {
      const A gk = g(k, i);
      load_chunk(logits.sample(k), i, j, n, l);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        A a, b;
        bernoulli_ll_grad(gk, l[e], t[e], a, b);
        l[e] = a;
        sx[e] += b;
      }
      if (dlogits.p) store_chunk(dlogits.at(k * rows + i, j, cols), n, dlogits.vec, l);
    }
    if (dx.p) store_chunk(dx.at(i, j, cols), n, dx.vec, sx);
  }
  // col_map_kernel: no column terms.
  template <int N>
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&)[N]) const {
    (*this)(i, j, n);
  }
};

// dmean[k, i] = g(k, i) * (x - m) e^-s,  dx[i] = -sum_k of it,
// ds = sum_k g(k, i) * -(1 - (x - m)^2 e^-s) / 2: stored per row ([rows, cols]
// log-variance, map_kernel), or summed over the rows too ([1, cols], col_map_kernel).
template <class T, class G>
struct GaussianGrad {
  int64_t rows, cols, samples;
  G g;
  Mat<T> mean, x, logvar;
  Out<T> dmean, dx, dlogvar;  // dmean [K, rows, cols]; dlogvar [rows, cols] (map_kernel only)
  template <int N>
  FASTELBO_DEVICE void row(int64_t i, int64_t j, int n, acc_t<T> (&ds)[N]) const {
    using A = acc_t<T>;
    A m[N], t[N], v[N], sx[N];
    load_chunk(x, i, j, n, t);
    load_chunk(logvar, i, j, n, v);
#pragma unroll
    for (int e = 0; e < N; ++e) sx[e] = A(0);
    for (int64_t k = 0; k < samples; ++k) {
      const A gk = g(k, i);
      load_chunk(mean.sample(k), i, j, n, m);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        A a, b, c;
        gaussian_ll_grad(gk, m[e], t[e], v[e], a, b, c);
        m[e] = a;
        sx[e] += b;
        ds[e] += c;
      }
      if (dmean.p) store_chunk(dmean.at(k * rows + i, j, cols), n, dmean.vec, m);
    }
    if (dx.p) store_chunk(dx.at(i, j, cols), n, dx.vec, sx);
  }
  // map_kernel: one row, ds stored per row.
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A ds[N];
#pragma unroll
    for (int e = 0; e < N; ++e) ds[e] = A(0);
    row(i, j, n, ds);
    if (dlogvar.p) store_chunk(dlogvar.at(i, j, cols), n, dlogvar.vec, ds);
  }
  // col_map_kernel: ds summed over the rows into acc.
  template <int N>
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&acc)[N]) const {
    row(i, j, n, acc);
  }
};

// The likelihood term of a fused op (elbo.cu, iwae.cu) as its kind asks:
// f(term) forward; f(grad term, sum_rows) backward, G the upstream gradient's
// form and sum_rows whether a shared [1, cols] obs_logvar's gradient is summed
// over the rows (by the caller's column pass) instead of stored by the term.
template <class T, class F>
void with_likelihood(const ElboArgs& a, F f) {
  if (a.likelihood == LikelihoodKind::kGaussian)
    f(GaussianTerm<T>{a.cols_x, a.samples, mat<T>(a.recon), mat<T>(a.x), mat<T>(a.obs_logvar)});
  else
    f(BernoulliTerm<T>{a.cols_x, a.samples, mat<T>(a.recon), mat<T>(a.x), a.x_out_of_range});
}

// Whether a likelihood gradient has an obs_logvar to sum over rows (col_map_kernel).
template <class Grad>
inline constexpr bool kHasObsLogvar = false;
template <class T, class G>
inline constexpr bool kHasObsLogvar<GaussianGrad<T, G>> = true;

template <class T, class G, class F>
void with_likelihood_grad(const ElboArgs& a, const G& g, void* dx, void* drecon, void* dobs_logvar, F f) {
  const int64_t c = a.cols_x;
  if (a.likelihood == LikelihoodKind::kGaussian) {
    const bool sum_rows = a.obs_logvar_shared && dobs_logvar;
    f(GaussianGrad<T, G>{a.rows, c, a.samples, g, mat<T>(a.recon), mat<T>(a.x), mat<T>(a.obs_logvar),
                         out<T>(drecon, c), out<T>(dx, c), out<T>(sum_rows ? nullptr : dobs_logvar, c)},
      sum_rows);
  } else {
    f(BernoulliGrad<T, G>{a.rows, c, a.samples, g, mat<T>(a.recon), mat<T>(a.x), out<T>(drecon, c), out<T>(dx, c)},
      false);
  }
}

// ---------------------------------------------------------------------------
// log p(z) - log q(z | x) (the latent part of the IWAE log-weight), z [K, rows,
// cols] (Mat::sk), q = N(mu, e^lv), p = N(0, I) or N(pmu, e^plv) (kPrior):
// the term of sample k's row, and the gradient job looping over the samples
// (dz per sample; dmu, dlv, dpmu, dplv summed over them in registers).
// ---------------------------------------------------------------------------
template <class T, bool kPrior>
struct LogPQTerm {
  int64_t cols;
  Mat<T> z, mu, lv, pmu, plv;
  FASTELBO_DEVICE acc_t<T> sum(int64_t i, int64_t j, int n, int64_t k0, int64_t k1) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A zz[N], m[N], l[N], pm[N], pl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    if (kPrior) {
      load_chunk(pmu, i, j, n, pm);
      load_chunk(plv, i, j, n, pl);
    }
    A s = A(0);
    for (int64_t k = k0; k < k1; ++k) {
      load_chunk(z.sample(k), i, j, n, zz);
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) s += kPrior ? log_pq_normal(zz[e], m[e], l[e], pm[e], pl[e]) : log_pq_std(zz[e], m[e], l[e]);
    }
    return s;
  }
};

template <class T, bool kPrior>
struct LogPQGrad {
  int64_t rows, cols, samples;
  WeightGrad<T> g;
  Mat<T> z, mu, lv, pmu, plv;
  Out<T> dz, dmu, dlv, dpmu, dplv;  // dz [K, rows, cols]
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A zz[N], m[N], l[N], pm[N], pl[N], sm[N], sl[N], spm[N], spl[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    if (kPrior) {
      load_chunk(pmu, i, j, n, pm);
      load_chunk(plv, i, j, n, pl);
    }
#pragma unroll
    for (int e = 0; e < N; ++e) sm[e] = sl[e] = spm[e] = spl[e] = A(0);
    for (int64_t k = 0; k < samples; ++k) {
      const A gk = g(k, i);
      load_chunk(z.sample(k), i, j, n, zz);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        A a, b, c, d = A(0), f = A(0);
        if (kPrior) {
          log_pq_normal_grad(gk, zz[e], m[e], l[e], pm[e], pl[e], a, b, c, d, f);
        } else {
          log_pq_std_grad(gk, zz[e], m[e], l[e], a, b, c);
        }
        zz[e] = a;
        sm[e] += b;
        sl[e] += c;
        spm[e] += d;
        spl[e] += f;
      }
      if (dz.p) store_chunk(dz.at(k * rows + i, j, cols), n, dz.vec, zz);
    }
    store_latent_chunks<kPrior>(dmu, dlv, dpmu, dplv, i, j, cols, n, sm, sl, spm, spl);
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
