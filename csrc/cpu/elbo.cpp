// The fused ELBO on the CPU (DESIGN §1 row 6): per row, one pass over
// [recon, x] for log p(x|z) and one over [mu, logvar] for KL, in one launch;
// elbo = loglik - beta * KL. The backward is one launch too: the upstream
// gradients of (elbo, loglik, kl) fold into one scale per term,
//   g_ll = g_elbo + g_loglik,   g_kl = g_kl - beta * g_elbo.
#include <ATen/Dispatch.h>

#include <atomic>
#include <torch/library.h>

#include "terms.h"

namespace fastelbo {
namespace cpu {
std::tuple<at::Tensor, at::Tensor, at::Tensor> elbo_cpu(const at::Tensor& x, const at::Tensor& recon,
                                                        const at::Tensor& mu, const at::Tensor& logvar,
                                                        const std::optional<at::Tensor>& obs_logvar,
                                                        const std::optional<at::Tensor>& prior_mu,
                                                        const std::optional<at::Tensor>& prior_logvar,
                                                        c10::string_view likelihood, double beta,
                                                        bool validate_x) {
  const Likelihood kind = parse_likelihood(likelihood);
  check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind == Likelihood::kGaussian);
  auto elbo = row_result(recon), ll = row_result(recon), kl = row_result(recon);
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "fastelbo_elbo_cpu", [&] {
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    scalar_t *pe = elbo.data_ptr<scalar_t>(), *pl = ll.data_ptr<scalar_t>(), *pk = kl.data_ptr<scalar_t>();
    at::parallel_for(0, recon.size(0), row_grain(lik.cols + div.cols), [&](int64_t r0, int64_t r1) {
      bool bad = false;
      for (int64_t i = r0; i < r1; ++i) {
        const double l = lik.forward(i, validate_x, bad), k = div.forward(i);
        pe[i] = static_cast<scalar_t>(l - beta * k);
        pl[i] = static_cast<scalar_t>(l);
        pk[i] = static_cast<scalar_t>(k);
      }
      if (bad) out_of_range = true;
    });
  });
  check_x_in_unit_interval(out_of_range);
  return {elbo, ll, kl};
}

// Gradients in input order: x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_backward_cpu(
    const std::optional<at::Tensor>& grad_elbo, const std::optional<at::Tensor>& grad_loglik,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, c10::string_view likelihood, double beta,
    std::array<bool, 7> output_mask) {
  const Likelihood kind = parse_likelihood(likelihood);
  check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind == Likelihood::kGaussian);
  check_row_grad(grad_elbo, "grad_elbo", recon);
  check_row_grad(grad_loglik, "grad_loglik", recon);
  check_row_grad(grad_kl, "grad_kl", recon);
  const bool gaussian = kind == Likelihood::kGaussian, has_prior = prior_mu.has_value();
  std::array<at::Tensor, 7> d = {
      grad_or_empty(output_mask[0], x),       grad_or_empty(output_mask[1], recon),
      grad_or_empty(output_mask[2], mu),      grad_or_empty(output_mask[3], mu),
      grad_or_empty(output_mask[4] && gaussian, recon), grad_or_empty(output_mask[5] && has_prior, mu),
      grad_or_empty(output_mask[6] && has_prior, mu)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "fastelbo_elbo_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    const RowScalar<scalar_t> ge = grad_elbo ? row_scalar<scalar_t>(*grad_elbo) : RowScalar<scalar_t>{};
    const RowScalar<scalar_t> gl = grad_loglik ? row_scalar<scalar_t>(*grad_loglik) : RowScalar<scalar_t>{};
    const RowScalar<scalar_t> gk = grad_kl ? row_scalar<scalar_t>(*grad_kl) : RowScalar<scalar_t>{};
    at::parallel_for(0, recon.size(0), row_grain(lik.cols + div.cols), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const A g_elbo = ge[i];
        const A g_ll = g_elbo + gl[i];
        const A g_kl = gk[i] - static_cast<A>(beta) * g_elbo;
        lik.backward(i, g_ll, {row_ptr<scalar_t>(d[1], i), row_ptr<scalar_t>(d[0], i), row_ptr<scalar_t>(d[4], i)});
        div.backward(i, g_kl,
                     {row_ptr<scalar_t>(d[2], i), row_ptr<scalar_t>(d[3], i), row_ptr<scalar_t>(d[5], i),
                      row_ptr<scalar_t>(d[6], i)});
      }
    });
  });
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("elbo", &elbo_cpu);
  m.impl("elbo_backward", &elbo_backward_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
