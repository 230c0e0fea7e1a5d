// The fused ELBO on the CPU (docs/design.md §1): per row, one pass over
// [recon, x] for log p(x|z) and one over [mu, logvar] for KL, in one launch;
// elbo = loglik - beta * KL. With recon [K, B, Dx] (K decoded samples, x shared)
// the log-likelihood is the sample average, loglik[b] = (1/K) sum_k ll(recon[k, b], x[b]),
// the k loop inside the row's task. The backward is one launch too: the upstream
// gradients of (elbo, loglik, kl) fold into one scale per term,
//   g_ll = g_elbo + g_loglik,   g_kl = g_kl - beta * g_elbo,
// drecon[k, b] = (g_ll / K) dll/drecon; dx and a per-row obs_logvar's gradient are
// summed over k in row buffers; a [1, Dx] obs_logvar's gradient over k and rows in
// one partial per row block (RowBlocks), added in block order at the end.
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
  const Likelihood kind = parse_likelihood<Likelihood>(likelihood);
  const int64_t K =
      check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind == Likelihood::kGaussian);
  check_cpu(x, "x");
  auto elbo = row_result(x), ll = row_result(x), kl = row_result(x);
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastelbo_elbo_cpu", [&] {
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    scalar_t *pe = elbo.data_ptr<scalar_t>(), *pl = ll.data_ptr<scalar_t>(), *pk = kl.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), row_grain(K * lik.cols + div.cols), [&](int64_t r0, int64_t r1) {
      bool bad = false;
      for (int64_t i = r0; i < r1; ++i) {
        double l = lik.forward(i, validate_x, bad);
        for (int64_t k = 1; k < K; ++k) l += lik.forward(i, false, bad, k);  // x checked once, with k = 0
        if (K != 1) l /= static_cast<double>(K);
        const double d = div.forward(i);
        pe[i] = static_cast<scalar_t>(l - beta * d);
        pl[i] = static_cast<scalar_t>(l);
        pk[i] = static_cast<scalar_t>(d);
      }
      if (bad) out_of_range = true;
    });
  });
  check_x_in_unit_interval(out_of_range);
  return {elbo, ll, kl};
}

// The gradient rows of the ELBO, shared by the two-pass backward and the one-pass loss: for row i,
// `scales(i)` gives (g_ll, g_kl), the upstream gradient of the log-likelihood and of KL, and
// `before(i)` runs first on the row (the one-pass loss computes the row's forward there, so the
// row's recon and x are read from memory once and swept twice from cache).
template <class scalar_t, class Scales, class Before>
void elbo_grad_rows(const LogLikTerm<scalar_t>& lik, const KLTerm<scalar_t>& div, int64_t B, int64_t K,
                    bool per_feature, std::array<at::Tensor, 7>& d, Scales scales, Before before) {
  using A = acc_t<scalar_t>;
  const int64_t Dx = lik.cols;
  const RowBlocks blocks = row_blocks(B, row_grain(K * lik.cols + div.cols));
  RowBuffers<A> ds_parts(per_feature && d[4].numel(), blocks.parts, Dx);
  scalar_t* drecon = d[1].numel() ? d[1].data_ptr<scalar_t>() : nullptr;  // [K, B, Dx] or [B, Dx], contiguous
  parallel_blocks(blocks, [&](int64_t p, int64_t r0, int64_t r1) {
    // K > 1: dx[i] and a per-row ds[i] sum over the samples in row buffers (accumulation type).
    RowBuffers<A> sums(K > 1, 2, Dx);
    A* ds_part = ds_parts.row(p);
    for (int64_t i = r0; i < r1; ++i) {
      before(i);
      const std::pair<A, A> s = scales(i);
      const A g_ll = s.first, g_kl = s.second;
      scalar_t* dx = row_ptr<scalar_t>(d[0], i);
      scalar_t* ds = per_feature ? nullptr : row_ptr<scalar_t>(d[4], i);
      A* dx_sum = dx ? sums.row(0) : nullptr;
      A* ds_sum = per_feature ? ds_part : (ds ? sums.row(1) : nullptr);
      sums.zero(0);
      sums.zero(1);
      const A g = K == 1 ? g_ll : g_ll / static_cast<A>(K);
      for (int64_t k = 0; k < K; ++k)
        lik.backward(i, g, {drecon ? drecon + (k * B + i) * Dx : nullptr, dx, ds}, {nullptr, dx_sum, ds_sum}, k);
      if (K > 1) {
        if (dx) store_chunk(dx, 0, Dx, dx_sum);
        if (ds && !per_feature) store_chunk(ds, 0, Dx, ds_sum);
      }
      div.backward(i, g_kl,
                   {row_ptr<scalar_t>(d[2], i), row_ptr<scalar_t>(d[3], i), row_ptr<scalar_t>(d[5], i),
                    row_ptr<scalar_t>(d[6], i)});
    }
  });
  if (ds_parts.row(0)) sum_blocks<scalar_t>(ds_parts, blocks.parts, d[4].data_ptr<scalar_t>());
}

// Gradients in input order: x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_backward_cpu(
    const std::optional<at::Tensor>& grad_elbo, const std::optional<at::Tensor>& grad_loglik,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, c10::string_view likelihood, double beta,
    std::array<bool, 7> output_mask) {
  const Likelihood kind = parse_likelihood<Likelihood>(likelihood);
  const bool gaussian = kind == Likelihood::kGaussian, has_prior = prior_mu.has_value();
  const int64_t K = check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
  check_elbo_upstream(grad_elbo, grad_loglik, grad_kl, x);
  check_cpu(x, "x");
  std::array<at::Tensor, 7> d = elbo_grads(output_mask, x, recon, mu, obs_logvar, gaussian, has_prior, empty_result);
  // A [1, Dx] obs_logvar (one per feature): its gradient sums over rows too.
  const bool per_feature = gaussian && obs_logvar->size(0) == 1 && x.size(0) != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastelbo_elbo_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    const RowScalar<scalar_t> ge = grad_elbo ? row_scalar<scalar_t>(*grad_elbo) : RowScalar<scalar_t>{};
    const RowScalar<scalar_t> gl = grad_loglik ? row_scalar<scalar_t>(*grad_loglik) : RowScalar<scalar_t>{};
    const RowScalar<scalar_t> gk = grad_kl ? row_scalar<scalar_t>(*grad_kl) : RowScalar<scalar_t>{};
    elbo_grad_rows<scalar_t>(lik, div, x.size(0), K, per_feature, d, [&](int64_t i) {
      const A g_elbo = ge[i];
      return std::pair<A, A>(g_elbo + gl[i], gk[i] - static_cast<A>(beta) * g_elbo);
    }, [](int64_t) {});
  });
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

// The one-pass reduced loss (docs/design.md §5): loss = -reduce_b elbo[b] ("mean": the batch mean,
// "sum": the sum) and, in the same sweep over each row, the gradients of that number with respect to
// the inputs of output_mask. Returns (loss, dx, drecon, dmu, dlogvar, dobs_logvar, dprior_mu,
// dprior_logvar). The row's forward and backward run back to back on the row, so recon and x come
// from memory once (3 [B, Dx] transfers with drecon instead of 5). The loss is reduced from the
// rounded rows exactly as the two-pass path reduces them (mean or sum of the [B] rows, negated).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
elbo_loss_cpu(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
              const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
              const std::optional<at::Tensor>& prior_logvar, c10::string_view likelihood, double beta,
              c10::string_view reduction, std::array<bool, 7> output_mask, bool validate_x) {
  const Likelihood kind = parse_likelihood<Likelihood>(likelihood);
  const bool gaussian = kind == Likelihood::kGaussian, has_prior = prior_mu.has_value();
  const bool mean = reduction == "mean";
  TORCH_CHECK(mean || reduction == "sum", "fastelbo: elbo_loss reduction must be 'mean' or 'sum', got '",
              std::string(reduction), "'");
  const int64_t K = check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
  check_cpu(x, "x");
  std::array<at::Tensor, 7> d = elbo_grads(output_mask, x, recon, mu, obs_logvar, gaussian, has_prior, empty_result);
  const int64_t B = x.size(0);
  const bool per_feature = gaussian && obs_logvar->size(0) == 1 && B != 1;
  auto elbo = row_result(x);
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastelbo_elbo_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const LogLikTerm<scalar_t> lik(kind, recon, x, obs_logvar);
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    scalar_t* pe = elbo.data_ptr<scalar_t>();
    // d loss / d elbo[b]: -1/B for the mean (the scale the two-pass path gets from mean's backward), -1 for the sum.
    const A g_elbo = mean ? static_cast<A>(-1.0 / static_cast<double>(B)) : static_cast<A>(-1);
    const std::pair<A, A> s(g_elbo, -static_cast<A>(beta) * g_elbo);
    elbo_grad_rows<scalar_t>(lik, div, x.size(0), K, per_feature, d, [&](int64_t) { return s; }, [&](int64_t i) {
      bool bad = false;
      double l = lik.forward(i, validate_x, bad);
      for (int64_t k = 1; k < K; ++k) l += lik.forward(i, false, bad, k);
      if (K != 1) l /= static_cast<double>(K);
      pe[i] = static_cast<scalar_t>(l - beta * div.forward(i));
      if (bad) out_of_range = true;
    });
  });
  check_x_in_unit_interval(out_of_range);
  at::Tensor loss = (mean ? elbo.mean() : elbo.sum()).neg_();
  return {loss, d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("elbo", &elbo_cpu);
  m.impl("elbo_backward", &elbo_backward_cpu);
  m.impl("elbo_loss", &elbo_loss_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
