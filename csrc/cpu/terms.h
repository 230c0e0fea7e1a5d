// terms.h: the two per-row terms of the ELBO on the CPU, forward and backward
// side by side, each a reduce_row / map_row over the formulas of fastelbo_math.h.
// Used alone by kl.cpp and loglik.cpp and together by elbo.cpp.
#pragma once

#include "ops.h"
#include "half_tables.h"
#include "rows.h"

namespace fastelbo {
namespace cpu {

// KL(q || p) of one row, q = N(mu, e^lv), p = N(0, I) or N(pmu, e^plv).
template <class T>
struct KLTerm {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  Operand<T> mu, lv, pmu, plv;
  bool has_prior;
  int64_t cols;

  KLTerm(const at::Tensor& mu_, const at::Tensor& lv_, const std::optional<at::Tensor>& pmu_,
         const std::optional<at::Tensor>& plv_)
      : mu(operand<T>(mu_)), lv(operand<T>(lv_)), has_prior(pmu_.has_value()), cols(mu_.size(1)) {
    if (has_prior) {
      pmu = operand<T>(*pmu_);
      plv = operand<T>(*plv_);
    }
  }

  double forward(int64_t i) const {
    if (!has_prior)
      return reduce_row<T, 2>({mu, lv}, i, cols, [](const std::array<Vec, 2>& v) { return kl_std(v[0], v[1]); });
    return reduce_row<T, 4>({mu, lv, pmu, plv}, i, cols,
                            [](const std::array<Vec, 4>& v) { return kl_normal(v[0], v[1], v[2], v[3]); });
  }

  // out = {dmu, dlv, dpmu, dplv} rows (nullptr: not wanted).
  void backward(int64_t i, A g, const std::array<T*, 4>& out) const {
    if (!has_prior) {
      map_row<T, 2, 2>({mu, lv}, i, cols, g, {out[0], out[1]},
                       [](const Vec& gv, const std::array<Vec, 2>& v, std::array<Vec, 2>& o) {
                         kl_std_grad(gv, v[0], v[1], o[0], o[1]);
                       });
      return;
    }
    map_row<T, 4, 4>({mu, lv, pmu, plv}, i, cols, g, out,
                     [](const Vec& gv, const std::array<Vec, 4>& v, std::array<Vec, 4>& o) {
                       kl_normal_grad(gv, v[0], v[1], v[2], v[3], o[0], o[1], o[2], o[3]);
                     });
  }
};

// The backward op of a per-row latent term (KLTerm, free_bits.cpp's FreeBitsTerm) over all rows, every
// dtype: with_term(T{}, run) builds the term for dtype T and calls run(term). The gradients (mu, logvar,
// prior_mu, prior_logvar) are contiguous [B, Dz] (empty: not asked for), grad the upstream gradient per row.
template <class WithTerm>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_backward(const at::Tensor& grad, const at::Tensor& mu,
                                                                           bool has_prior, std::array<bool, 4> mask,
                                                                           WithTerm with_term) {
  std::array<at::Tensor, 4> d = kl_grads(mask, mu, has_prior, empty_result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastelbo_latent_backward_cpu", [&] {
    const RowScalar<scalar_t> g = row_scalar<scalar_t>(grad);
    with_term(scalar_t{}, [&](const auto& term) {
      at::parallel_for(0, mu.size(0), row_grain(mu.size(1)), [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i)
          term.backward(i, g[i], {row_ptr<scalar_t>(d[0], i), row_ptr<scalar_t>(d[1], i), row_ptr<scalar_t>(d[2], i),
                                  row_ptr<scalar_t>(d[3], i)});
      });
    });
  });
  return {d[0], d[1], d[2], d[3]};
}

enum class Likelihood { kBernoulli, kGaussian };


// log p(x | recon) of one row: Bernoulli with logits recon, or Gaussian with
// mean recon and log-variance s ([1, Dx]: one per feature, or [B, Dx]; any
// strides). recon may be [K, B, Dx]: row i of sample k, x (and s) shared by the samples.
template <class T>
struct LogLikTerm {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  Likelihood kind;
  Samples<T> recon;
  Operand<T> x, s;
  int64_t cols;
  bool stream;  // outputs the size of recon / x: non-temporal stores in backward (inside parallel_blocks only)
  BernoulliLookups lookups;  // 16-bit logits where a lookup is faster (half_tables.h), else none

  LogLikTerm(Likelihood kind_, const at::Tensor& recon_, const at::Tensor& x_, const std::optional<at::Tensor>& s_)
      : kind(kind_), recon(samples<T>(recon_)), x(operand<T>(x_)), cols(x_.size(1)),
        stream(x_.numel() >= kStreamElements),
        lookups(kind_ == Likelihood::kBernoulli ? bernoulli_lookups<T>() : BernoulliLookups{}) {
    if (kind == Likelihood::kGaussian) s = operand<T>(*s_);
  }

  // validate_x: also flag Bernoulli targets outside [0, 1] (NaN passes), in the same pass.
  double forward(int64_t i, bool validate_x, bool& x_out_of_range, int64_t k = 0) const {
    const Operand<T> r = recon.sample(k);
    if (kind == Likelihood::kBernoulli) {
      return with_bernoulli_ll([&](auto ll) {
        if (!validate_x) return reduce_row<T, 2>({r, x}, i, cols, ll);
        Bounds<A> seen;
        const double sum = reduce_row<T, 2, 1>({r, x}, i, cols, ll, &seen);
        x_out_of_range |= seen.lo < A(0) || seen.hi > A(1);
        return sum;
      });
    }
    return reduce_row<T, 3>({r, x, s}, i, cols,
                            [](const std::array<Vec, 3>& v) { return gaussian_ll(v[0], v[1], v[2]); });
  }

  // run(f) with the Bernoulli element function of reduce_row / map_row: the
  // logit-only part looked up where this dtype's table is in use, else computed.
  // A row loop per choice, so the hot loop itself never branches on it.
  template <class Run>
  auto with_bernoulli_ll(Run run) const {
    if constexpr (kHalfTables<T>) {
      if (const float* t = lookups.log1p_exp_neg_abs) return run(bernoulli_ll_lookup<T>(t));
    }
    return run(bernoulli_ll_computed<A>());
  }

  template <class Run>
  void with_bernoulli_grad(Run run) const {
    if constexpr (kHalfTables<T>) {
      if (const float* t = lookups.sigmoid) return run(bernoulli_grad_lookup<T>(t));
    }
    run(bernoulli_grad_computed<A>());
  }

  // Called inside parallel_blocks (it fences the non-temporal stores of large outputs).
  // out = {drecon, dx, ds} rows (nullptr: not wanted; ds unused for Bernoulli);
  // add = accumulation-typed rows that sum an output instead (over samples or rows).
  void backward(int64_t i, A g, const std::array<T*, 3>& out, const std::array<A*, 3>& add = {},
                int64_t k = 0) const {
    const Operand<T> r = recon.sample(k);
    if (!add[0] && !add[1] && !add[2]) {  // nothing summed: the plain store loop
      if (kind == Likelihood::kBernoulli) {
        with_bernoulli_grad([&](auto grad) { map_row<T, 2, 2>({r, x}, i, cols, g, {out[0], out[1]}, grad, stream); });
      } else {
        map_row<T, 3, 3>({r, x, s}, i, cols, g, out,
                         [](const Vec& gv, const std::array<Vec, 3>& v, std::array<Vec, 3>& o) {
                           gaussian_ll_grad(gv, v[0], v[1], v[2], o[0], o[1], o[2]);
                         }, stream);
      }
      return;
    }
    if (kind == Likelihood::kBernoulli) {
      with_bernoulli_grad([&](auto grad) {
        map_row_add<T, 2, 2>({r, x}, i, cols, g, {out[0], out[1]}, {add[0], add[1]}, grad);
      });
      return;
    }
    map_row_add<T, 3, 3>({r, x, s}, i, cols, g, out, add,
                         [](const Vec& gv, const std::array<Vec, 3>& v, std::array<Vec, 3>& o) {
                           gaussian_ll_grad(gv, v[0], v[1], v[2], o[0], o[1], o[2]);
                         });
  }
};

// log p(z) - log q(z | x) of one row of sample k (the latent part of the IWAE
// log-weight), z [K, B, Dz], q = N(mu, e^lv), p = N(0, I) or N(pmu, e^plv).
template <class T>
struct LogPQTerm {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  Samples<T> z;
  Operand<T> mu, lv, pmu, plv;
  bool has_prior;
  int64_t cols;

  LogPQTerm(const at::Tensor& z_, const at::Tensor& mu_, const at::Tensor& lv_, const std::optional<at::Tensor>& pmu_,
            const std::optional<at::Tensor>& plv_)
      : z(samples<T>(z_)), mu(operand<T>(mu_)), lv(operand<T>(lv_)), has_prior(pmu_.has_value()),
        cols(mu_.size(1)) {
    if (has_prior) {
      pmu = operand<T>(*pmu_);
      plv = operand<T>(*plv_);
    }
  }

  double forward(int64_t i, int64_t k) const {
    const Operand<T> zk = z.sample(k);
    if (!has_prior)
      return reduce_row<T, 3>({zk, mu, lv}, i, cols,
                              [](const std::array<Vec, 3>& v) { return log_pq_std(v[0], v[1], v[2]); });
    return reduce_row<T, 5>({zk, mu, lv, pmu, plv}, i, cols, [](const std::array<Vec, 5>& v) {
      return log_pq_normal(v[0], v[1], v[2], v[3], v[4]);
    });
  }

  // out = {dz, dmu, dlv, dpmu, dplv} rows, add = accumulation-typed rows summing an output instead.
  void backward(int64_t i, int64_t k, A g, const std::array<T*, 5>& out, const std::array<A*, 5>& add) const {
    const Operand<T> zk = z.sample(k);
    if (!has_prior) {
      map_row_add<T, 3, 3>({zk, mu, lv}, i, cols, g, {out[0], out[1], out[2]}, {add[0], add[1], add[2]},
                           [](const Vec& gv, const std::array<Vec, 3>& v, std::array<Vec, 3>& o) {
                             log_pq_std_grad(gv, v[0], v[1], v[2], o[0], o[1], o[2]);
                           });
      return;
    }
    map_row_add<T, 5, 5>({zk, mu, lv, pmu, plv}, i, cols, g, out, add,
                         [](const Vec& gv, const std::array<Vec, 5>& v, std::array<Vec, 5>& o) {
                           log_pq_normal_grad(gv, v[0], v[1], v[2], v[3], v[4], o[0], o[1], o[2], o[3], o[4]);
                         });
  }
};

}  // namespace cpu
}  // namespace fastelbo
