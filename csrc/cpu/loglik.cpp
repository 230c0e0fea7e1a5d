// Bernoulli and Gaussian log-likelihood on the CPU (docs/design.md §1):
// LogLikTerm in terms.h, one row per iteration.
#include <ATen/Dispatch.h>

#include <atomic>
#include <torch/library.h>

#include "terms.h"

namespace fastelbo {
namespace cpu {
namespace {

at::Tensor loglik_forward(Likelihood kind, const at::Tensor& recon, const at::Tensor& x,
                          const std::optional<at::Tensor>& s, bool validate_x) {
  auto ll = row_result(recon);
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "fastelbo_log_prob_cpu", [&] {
    const LogLikTerm<scalar_t> term(kind, recon, x, s);
    scalar_t* out = ll.data_ptr<scalar_t>();
    at::parallel_for(0, recon.size(0), row_grain(term.cols), [&](int64_t r0, int64_t r1) {
      bool bad = false;
      for (int64_t i = r0; i < r1; ++i) out[i] = static_cast<scalar_t>(term.forward(i, validate_x, bad));
      if (bad) out_of_range = true;
    });
  });
  check_x_in_unit_interval(out_of_range);
  return ll;
}

// A [1, Dx] log-variance (one per feature) gets its gradient summed over rows:
// one partial per row block (RowBlocks), added in block order at the end.
std::array<at::Tensor, 3> loglik_backward(Likelihood kind, const at::Tensor& grad, const at::Tensor& recon,
                                          const at::Tensor& x, const std::optional<at::Tensor>& s,
                                          std::array<bool, 3> mask) {
  check_row_grad(grad, "grad", recon);
  const bool gaussian = kind == Likelihood::kGaussian;
  std::array<at::Tensor, 3> d = {grad_or_empty(mask[0], recon, empty_result),
                                 grad_or_empty(mask[1], recon, empty_result),
                                 grad_or_empty(mask[2] && gaussian, gaussian ? *s : recon, empty_result)};
  const int64_t B = recon.size(0);
  const bool per_feature = gaussian && s->size(0) == 1 && B != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "fastelbo_log_prob_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> term(kind, recon, x, s);
    const auto g = row_scalar<scalar_t>(grad);
    const RowBlocks blocks = row_blocks(B, row_grain(term.cols));
    RowBuffers<A> ds_parts(per_feature && d[2].numel(), blocks.parts, term.cols);
    parallel_blocks(blocks, [&](int64_t p, int64_t r0, int64_t r1) {
      A* ds_part = ds_parts.row(p);
      for (int64_t i = r0; i < r1; ++i)
        term.backward(i, g[i],
                      {row_ptr<scalar_t>(d[0], i), row_ptr<scalar_t>(d[1], i),
                       per_feature ? nullptr : row_ptr<scalar_t>(d[2], i)},
                      {nullptr, nullptr, ds_part});
    });
    if (ds_parts.row(0)) sum_blocks<scalar_t>(ds_parts, blocks.parts, d[2].data_ptr<scalar_t>());
  });
  return d;
}

}  // namespace

at::Tensor bernoulli_log_prob_cpu(const at::Tensor& logits, const at::Tensor& x, bool validate_x) {
  check_like(logits, "logits", x, "x");
  check_cpu(logits, "logits");
  return loglik_forward(Likelihood::kBernoulli, logits, x, std::nullopt, validate_x);
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                                   const at::Tensor& x, std::array<bool, 2> output_mask) {
  check_like(logits, "logits", x, "x");
  check_cpu(logits, "logits");
  auto d = loglik_backward(Likelihood::kBernoulli, grad, logits, x, std::nullopt,
                           {output_mask[0], output_mask[1], false});
  return {d[0], d[1]};
}

at::Tensor gaussian_log_prob_cpu(const at::Tensor& mean, const at::Tensor& x, const at::Tensor& logvar) {
  check_gaussian_args(mean, x, logvar);
  check_cpu(mean, "mean");
  return loglik_forward(Likelihood::kGaussian, mean, x, logvar, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward_cpu(const at::Tensor& grad,
                                                                              const at::Tensor& mean,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& logvar,
                                                                              std::array<bool, 3> output_mask) {
  check_gaussian_args(mean, x, logvar);
  check_cpu(mean, "mean");
  auto d = loglik_backward(Likelihood::kGaussian, grad, mean, x, logvar, output_mask);
  return {d[0], d[1], d[2]};
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("bernoulli_log_prob", &bernoulli_log_prob_cpu);
  m.impl("bernoulli_log_prob_backward", &bernoulli_log_prob_backward_cpu);
  m.impl("gaussian_log_prob", &gaussian_log_prob_cpu);
  m.impl("gaussian_log_prob_backward", &gaussian_log_prob_backward_cpu);
}

}  // namespace cpu
}  // namespace fastelbo

// Which 16-bit Bernoulli tables this process looks up (fastelbo._build.cpu_half_tables
// reads it through ctypes): dtype 0 bfloat16, 1 float16; bit 0 log1p(e^-|l|), bit 1
// sigmoid(l); -1 where this build has no tables. Times them on the first call, as a kernel would.
extern "C" int fastelbo_cpu_half_tables(int dtype) {
  using namespace fastelbo::cpu;
  if constexpr (!kHalfTables<at::BFloat16>) {
    return -1;
  } else {
    const BernoulliLookups l = dtype == 0 ? bernoulli_lookups<at::BFloat16>() : bernoulli_lookups<at::Half>();
    return (l.log1p_exp_neg_abs ? 1 : 0) | (l.sigmoid ? 2 : 0);
  }
}
