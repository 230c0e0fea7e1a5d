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
// The latent operands of a row: q = N(mu, e^lv) and the prior p = N(pmu, e^plv)
// (kPrior) or N(0, I) (pmu, plv never read). load() brings a chunk of them into
// accumulation-typed registers; the formulas of fastelbo_math.h take element e
// of the loaded chunk (the prior's registers only with kPrior): the KL, log p(z)
// - log q(z | x), and their gradients (the prior's 0 without a prior).
// ---------------------------------------------------------------------------
// The operands: the prior's only with kPrior (no kernel parameter bytes without).
template <class T, bool kPrior>
struct LatentOperands {
  Mat<T> mu, lv, pmu, plv;
};

template <class T>
struct LatentOperands<T, false> {
  Mat<T> mu, lv;
};

template <class T, bool kPrior>
struct Latents : LatentOperands<T, kPrior> {
  static constexpr bool kHasPrior = kPrior;
  using A = acc_t<T>;
  template <int N>
  using Chunk = A[N];

  template <int N>
  FASTELBO_DEVICE void load(int64_t i, int64_t j, int n, Chunk<N>& m, Chunk<N>& l, Chunk<N>& pm, Chunk<N>& pl) const {
    load_chunk(this->mu, i, j, n, m);
    load_chunk(this->lv, i, j, n, l);
    if constexpr (kPrior) {
      load_chunk(this->pmu, i, j, n, pm);
      load_chunk(this->plv, i, j, n, pl);
    }
  }

  // The KL of every element of the chunk of row i, columns [j, j + n) (the lanes past n: of the padding).
  template <int N>
  FASTELBO_DEVICE void kl(int64_t i, int64_t j, int n, Chunk<N>& out) const {
    A m[N], l[N], pm[N], pl[N];
    load(i, j, n, m, l, pm, pl);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = kl(m, l, pm, pl, e);
  }

  template <int N>
  static FASTELBO_DEVICE A kl(const Chunk<N>& m, const Chunk<N>& l, const Chunk<N>& pm, const Chunk<N>& pl, int e) {
    return kPrior ? kl_normal(m[e], l[e], pm[e], pl[e]) : kl_std(m[e], l[e]);
  }

  template <int N>
  static FASTELBO_DEVICE void kl_grad(A g, const Chunk<N>& m, const Chunk<N>& l, const Chunk<N>& pm,
                                      const Chunk<N>& pl, int e, A& dmu, A& dlv, A& dpmu, A& dplv) {
    if (kPrior) {
      kl_normal_grad(g, m[e], l[e], pm[e], pl[e], dmu, dlv, dpmu, dplv);
    } else {
      kl_std_grad(g, m[e], l[e], dmu, dlv);
      dpmu = dplv = A(0);
    }
  }

  template <int N>
  static FASTELBO_DEVICE A log_pq(A z, const Chunk<N>& m, const Chunk<N>& l, const Chunk<N>& pm, const Chunk<N>& pl,
                                  int e) {
    return kPrior ? log_pq_normal(z, m[e], l[e], pm[e], pl[e]) : log_pq_std(z, m[e], l[e]);
  }

  template <int N>
  static FASTELBO_DEVICE void log_pq_grad(A g, A z, const Chunk<N>& m, const Chunk<N>& l, const Chunk<N>& pm,
                                          const Chunk<N>& pl, int e, A& dz, A& dmu, A& dlv, A& dpmu, A& dplv) {
    if (kPrior) {
      log_pq_normal_grad(g, z, m[e], l[e], pm[e], pl[e], dz, dmu, dlv, dpmu, dplv);
    } else {
      log_pq_std_grad(g, z, m[e], l[e], dz, dmu, dlv);
      dpmu = dplv = A(0);
    }
  }
};

// kPrior of a Latents (or a reference to one): f's argument below.
template <class L>
inline constexpr bool kPriorOf = std::decay_t<L>::kHasPrior;

// f(Latents<T, true>) with a prior (prior_mu given), else f(Latents<T, false>).
template <class T, class F>
void with_prior(MatArg mu, MatArg logvar, MatArg prior_mu, MatArg prior_logvar, F f) {
  if (prior_mu.data)
    f(Latents<T, true>{{mat<T>(mu), mat<T>(logvar), mat<T>(prior_mu), mat<T>(prior_logvar)}});
  else
    f(Latents<T, false>{{mat<T>(mu), mat<T>(logvar)}});
}

// The tail the latent gradient jobs share (KLGrad, FreeBitsGrad,
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

// ---------------------------------------------------------------------------
// KL(N(mu, e^lv) || N(0, I) or N(pmu, e^plv)): the term of a row chunk, and
// the gradient job.
// ---------------------------------------------------------------------------
template <class T, bool kPrior>
struct KLTerm {
  int64_t cols;
  Latents<T, kPrior> lat;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], l[N], pm[N], pl[N];
    lat.load(i, j, n, m, l, pm, pl);
    A s = A(0);
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) s += lat.kl(m, l, pm, pl, e);
    return s;
  }
};

// The dimensions of a gradient job (KLGrad's Dims): EveryDim keeps every gradient (the plain KL);
// free bits' DimWeights (below) zero those of the floored dimensions.
template <class T>
struct EveryDim {
  FASTELBO_DEVICE acc_t<T> at(int64_t, int, int) const { return acc_t<T>(0); }
  FASTELBO_DEVICE static acc_t<T> keep(acc_t<T>, acc_t<T> v) { return v; }
};

// The gradient job of the KL, and of free bits with Dims = DimWeights (FreeBitsGrad).
template <class T, bool kPrior, class Dims = EveryDim<T>>
struct KLGrad {
  int64_t rows, cols;
  RowGrad<T> g;
  Latents<T, kPrior> lat;
  Out<T> dmu, dlv, dpmu, dplv;
  Dims dims;
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    const A gi = g(i);
    A m[N], l[N], pm[N], pl[N];
    lat.load(i, j, n, m, l, pm, pl);
    // Reuse the inputs' registers for the outputs.
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A w = dims.at(j, e, n);
      A a, b, c, d;
      lat.kl_grad(gi, m, l, pm, pl, e, a, b, c, d);
      m[e] = dims.keep(w, a);
      l[e] = dims.keep(w, b);
      pm[e] = dims.keep(w, c);
      pl[e] = dims.keep(w, d);
    }
    store_latent_chunks<kPrior>(dmu, dlv, dpmu, dplv, i, j, cols, n, m, l, pm, pl);
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
// The per-dimension weights of the floor: kl_dims [cols] (accumulation type, any stride).
template <class T>
struct DimWeights {
  const acc_t<T>* kl_dims;
  int64_t stride;
  acc_t<T> free_bits;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t j) const { return free_bits_weight(kl_dims[j * stride], free_bits); }
  // As KLGrad's Dims: the weight of element e of a chunk from column j (n valid), and the gradient v
  // under it, a select, not a product: a floored dimension's gradient is exactly 0 (torch.where).
  FASTELBO_DEVICE acc_t<T> at(int64_t j, int e, int n) const { return e < n ? (*this)(j + e) : acc_t<T>(0); }
  FASTELBO_DEVICE static acc_t<T> keep(acc_t<T> w, acc_t<T> v) { return free_bits_select(w, v, acc_t<T>(0)); }
};

template <class T, bool kPrior>
struct KLColumnJob {
  int64_t rows, cols;
  Latents<T, kPrior> lat;
  template <int N>
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n, acc_t<T> (&acc)[N]) const {
    acc_t<T> v[N];
    lat.kl(i, j, n, v);
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) acc[e] += v[e];
  }
};

template <class T, bool kPrior>
struct FreeBitsTerm {
  int64_t cols;
  Latents<T, kPrior> lat;
  DimWeights<T> weight;
  FASTELBO_DEVICE acc_t<T> operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A v[N];
    lat.kl(i, j, n, v);
    A s = A(0);
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) s += free_bits_select(weight(j + e), v[e], weight.free_bits);
    return s;
  }
};

template <class T, bool kPrior>
using FreeBitsGrad = KLGrad<T, kPrior, DimWeights<T>>;

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
// cols] (Mat::sk), q and p the Latents:
// the term of sample k's row, and the gradient job looping over the samples
// (dz per sample; dmu, dlv, dpmu, dplv summed over them in registers).
// ---------------------------------------------------------------------------
template <class T, bool kPrior>
struct LogPQTerm {
  int64_t cols;
  Mat<T> z;
  Latents<T, kPrior> lat;
  FASTELBO_DEVICE acc_t<T> sum(int64_t i, int64_t j, int n, int64_t k0, int64_t k1) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A zz[N], m[N], l[N], pm[N], pl[N];
    lat.load(i, j, n, m, l, pm, pl);
    A s = A(0);
    for (int64_t k = k0; k < k1; ++k) {
      load_chunk(z.sample(k), i, j, n, zz);
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) s += lat.log_pq(zz[e], m, l, pm, pl, e);
    }
    return s;
  }
};

template <class T, bool kPrior>
struct LogPQGrad {
  int64_t rows, cols, samples;
  WeightGrad<T> g;
  Mat<T> z;
  Latents<T, kPrior> lat;
  Out<T> dz, dmu, dlv, dpmu, dplv;  // dz [K, rows, cols]
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A zz[N], m[N], l[N], pm[N], pl[N], sm[N], sl[N], spm[N], spl[N];
    lat.load(i, j, n, m, l, pm, pl);
#pragma unroll
    for (int e = 0; e < N; ++e) sm[e] = sl[e] = spm[e] = spl[e] = A(0);
    for (int64_t k = 0; k < samples; ++k) {
      const A gk = g(k, i);
      load_chunk(z.sample(k), i, j, n, zz);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        A a, b, c, d, f;
        lat.log_pq_grad(gk, zz[e], m, l, pm, pl, e, a, b, c, d, f);
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
