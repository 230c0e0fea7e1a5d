// The importance-weighted bound on the CPU (docs/design.md §1; Burda et al. 2016):
//   log w[k, b] = log p(x_b | recon_kb) + sum_j log p(z_kbj) - log q(z_kbj | x_b)
//   bound[b]    = log (1/K) sum_k e^(log w[k, b])       (fastelbo_math.h log_mean_exp, in double)
// One task per block of rows b, the K samples of a row inside it: LogLikTerm over
// [recon[k], x], LogPQTerm over [z[k], mu, logvar] (fastelbo_math.h log_pq_*).
// The backward takes c[k, b] = dL/dlog w[k, b] (the glue's softmax_k(log w) *
// grad_bound) and runs the same loops:
//   drecon[k, b] = c dll/drecon,  dz[k, b] = c dlogpq/dz        (stored per sample)
//   dx, dmu, dlogvar, dprior_*[b] = sum_k c d(...)/d(...)      (row buffers over k)
//   d obs_logvar: [B, Dx] summed over k; [1, Dx] over k and rows (block partials).
#include <ATen/Dispatch.h>

#include <atomic>
#include <torch/library.h>

#include "terms.h"

namespace fastelbo {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> iwae_bound_cpu(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                                                  const at::Tensor& mu, const at::Tensor& logvar,
                                                  const std::optional<at::Tensor>& obs_logvar,
                                                  const std::optional<at::Tensor>& prior_mu,
                                                  const std::optional<at::Tensor>& prior_logvar,
                                                  c10::string_view likelihood, bool validate_x) {
  const Likelihood kind = parse_likelihood<Likelihood>(likelihood);
  const int64_t K = check_iwae_shapes(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar,
                                      kind == Likelihood::kGaussian);
  check_cpu(x, "x");
  const int64_t B = x.size(0);
  auto bound = row_result(x);
  auto log_weights = at::empty({K, B}, x.options().dtype(acc_dtype(x.scalar_type()))
                                           .memory_format(at::MemoryFormat::Contiguous));
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastelbo_iwae_bound_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const LogPQTerm<scalar_t> pq(z, mu, logvar, prior_mu, prior_logvar);
    scalar_t* pb = bound.data_ptr<scalar_t>();
    A* plw = log_weights.data_ptr<A>();
    at::parallel_for(0, B, row_grain(K * (lik.cols + pq.cols)), [&](int64_t r0, int64_t r1) {
      bool bad = false;
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t k = 0; k < K; ++k)  // x checked once, with k = 0
          plw[k * B + i] = static_cast<A>(lik.forward(i, validate_x && k == 0, bad, k) + pq.forward(i, k));
        pb[i] = static_cast<scalar_t>(log_mean_exp<double>(plw + i, K, B));  // in double, then rounded once
      }
      if (bad) out_of_range = true;
    });
  });
  check_x_in_unit_interval(out_of_range);
  return {bound, log_weights};
}

// Gradients in input order: x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
iwae_bound_backward_cpu(const at::Tensor& grad_log_weights, const at::Tensor& x, const at::Tensor& recon,
                        const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
                        const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
                        const std::optional<at::Tensor>& prior_logvar, c10::string_view likelihood,
                        std::array<bool, 8> output_mask) {
  const Likelihood kind = parse_likelihood<Likelihood>(likelihood);
  const bool gaussian = kind == Likelihood::kGaussian, has_prior = prior_mu.has_value();
  const int64_t K = check_iwae_shapes(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
  const int64_t B = x.size(0), Dx = x.size(1), Dz = mu.size(1);
  check_log_weights_grad(grad_log_weights, K, x);
  check_cpu(x, "x");
  std::array<at::Tensor, 8> d =
      iwae_grads(output_mask, x, recon, z, mu, obs_logvar, gaussian, has_prior, empty_result);
  // A [1, Dx] obs_logvar (one per feature): its gradient sums over rows too.
  const bool per_feature = gaussian && obs_logvar->size(0) == 1 && B != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastelbo_iwae_bound_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const LogPQTerm<scalar_t> pq(z, mu, logvar, prior_mu, prior_logvar);
    const A* pc = grad_log_weights.const_data_ptr<A>();
    const int64_t cs0 = grad_log_weights.stride(0), cs1 = grad_log_weights.stride(1);
    const RowBlocks blocks = row_blocks(B, row_grain(K * (Dx + Dz)));
    RowBuffers<A> ds_parts(per_feature && d[5].numel(), blocks.parts, Dx);
    parallel_blocks(blocks, [&](int64_t p, int64_t r0, int64_t r1) {
      // Sums over the K samples of row i: dx, per-row ds (Dx each); dmu, dlv, dpmu, dplv (Dz each).
      RowBuffers<A> obs(true, 2, Dx), lat(true, 4, Dz);
      A* ds_part = ds_parts.row(p);
      for (int64_t i = r0; i < r1; ++i) {
        scalar_t* dx = row_ptr<scalar_t>(d[0], i);
        scalar_t* ds = per_feature ? nullptr : row_ptr<scalar_t>(d[5], i);
        std::array<scalar_t*, 4> dlat = {row_ptr<scalar_t>(d[3], i), row_ptr<scalar_t>(d[4], i),
                                         row_ptr<scalar_t>(d[6], i), row_ptr<scalar_t>(d[7], i)};
        const std::array<A*, 3> obs_add = {nullptr, dx ? obs.row(0) : nullptr,
                                           per_feature ? ds_part : (ds ? obs.row(1) : nullptr)};
        std::array<A*, 5> lat_add = {nullptr};
        for (int m = 0; m < 4; ++m) lat_add[m + 1] = dlat[m] ? lat.row(m) : nullptr;
        obs.zero(0);
        obs.zero(1);
        for (int m = 0; m < 4; ++m) lat.zero(m);
        for (int64_t k = 0; k < K; ++k) {
          const A c = pc[k * cs0 + i * cs1];
          lik.backward(i, c, {sample_row_ptr<scalar_t>(d[1], k, i), nullptr, nullptr}, obs_add, k);
          pq.backward(i, k, c, {sample_row_ptr<scalar_t>(d[2], k, i), nullptr, nullptr, nullptr, nullptr}, lat_add);
        }
        if (dx) store_chunk(dx, 0, Dx, obs_add[1]);
        if (ds) store_chunk(ds, 0, Dx, obs_add[2]);
        for (int m = 0; m < 4; ++m)
          if (dlat[m]) store_chunk(dlat[m], 0, Dz, lat_add[m + 1]);
      }
    });
    if (ds_parts.row(0)) sum_blocks<scalar_t>(ds_parts, blocks.parts, d[5].data_ptr<scalar_t>());
  });
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]};
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("iwae_bound", &iwae_bound_cpu);
  m.impl("iwae_bound_backward", &iwae_bound_backward_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
