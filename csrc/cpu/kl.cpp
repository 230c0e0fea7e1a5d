// Gaussian KL to N(0, I) or to a diagonal Gaussian prior on the CPU
// (docs/design.md §1): KLTerm in terms.h, one row per iteration.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "terms.h"

namespace fastelbo {
namespace cpu {

at::Tensor gaussian_kl_cpu(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                           const std::optional<at::Tensor>& prior_logvar) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  check_cpu(mu, "mu");
  auto kl = row_result(mu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastelbo_gaussian_kl_cpu", [&] {
    const KLTerm<scalar_t> term(mu, logvar, prior_mu, prior_logvar);
    scalar_t* out = kl.data_ptr<scalar_t>();
    at::parallel_for(0, mu.size(0), row_grain(term.cols), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) out[i] = static_cast<scalar_t>(term.forward(i));
    });
  });
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, std::array<bool, 4> output_mask) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  check_row_grad(grad, "grad", mu);
  check_cpu(mu, "mu");
  return latent_backward(grad, mu, prior_mu.has_value(), output_mask, [&](auto tag, auto run) {
    run(KLTerm<decltype(tag)>(mu, logvar, prior_mu, prior_logvar));
  });
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("gaussian_kl", &gaussian_kl_cpu);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
