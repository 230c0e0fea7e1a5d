// The CUDA implementations of the fastelbo:: ops (schemas in fastelbo/_ops.py):
// argument checks and output masks exactly as the CPU kernels (csrc/cpu, the
// same checks.h), then the raw-pointer launchers of csrc/cuda/*.cu on the
// current stream of the inputs' device. Only this file sees torch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string_view>
#include <vector>

#include "../cpu/checks.h"
#include "launchers.h"

namespace fastelbo {
namespace cuda {
namespace {

using cpu::check_2d;
using cpu::check_elbo_shapes;
using cpu::check_kl_args;
using cpu::check_like;
using cpu::check_row_grad;
using cpu::grad_or_empty;

// ---------------------------------------------------------------------------
// Device plumbing
// ---------------------------------------------------------------------------
// All tensor arguments on the first one's CUDA device (the dispatcher only
// guarantees that one of them is a CUDA tensor).
void check_device(const at::Tensor& first, const char* first_name,
                  std::initializer_list<std::pair<const std::optional<at::Tensor>*, const char*>> others) {
  TORCH_CHECK(first.is_cuda(), "fastelbo: ", first_name, " must be a CUDA tensor for the CUDA kernels, got ",
              first.device());
  for (const auto& [t, name] : others) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->device() == first.device(), "fastelbo: ", name, " must be on ", first.device(), " like ",
                  first_name, ", got ", (*t)->device());
    }
  }
}

int num_sms(const at::Device& device) {
  static std::array<int, 64> cache{};  // 0: not asked yet
  const int index = device.index();
  if (index >= 0 && index < static_cast<int>(cache.size()) && cache[index] > 0) return cache[index];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, index));
  if (index >= 0 && index < static_cast<int>(cache.size())) cache[index] = n;
  return n;
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, "fastelbo: the CUDA kernels support float16, bfloat16, float32 and float64, got ", t);
  }
}

MatArg mat(const at::Tensor& t) { return MatArg{t.const_data_ptr(), t.stride(0), t.stride(1)}; }

MatArg mat(const std::optional<at::Tensor>& t) { return t.has_value() ? mat(*t) : MatArg{}; }

VecArg vec(const std::optional<at::Tensor>& t) {
  return t.has_value() ? VecArg{t->const_data_ptr(), t->stride(0)} : VecArg{};
}

void* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

at::Tensor row_result(const at::Tensor& like) {
  return at::empty({like.size(0)}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// The reductions' workspace for split rows (usually none).
at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t cols_a, int64_t cols_b, int sms) {
  const size_t bytes = row_reduce_workspace_bytes(dtype_of(like.scalar_type()), rows, cols_a, cols_b, sms);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The seed of the noise: one int64 on the device, read by the kernels.
const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& like, at::Tensor& holder) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fastelbo: seed must be a one-element int64 tensor");
  holder = seed.device() == like.device() ? seed : seed.to(like.device());
  return holder.const_data_ptr<int64_t>();
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// validate_x: a device flag the Bernoulli forward sets for x outside [0, 1],
// read back (a sync, as torch.distributions' own validation) after the launch.
at::Tensor x_range_flag(bool validate_x, const at::Tensor& like) {
  return validate_x ? at::zeros({1}, like.options().dtype(at::kInt)) : at::Tensor();
}

int* flag_ptr(const at::Tensor& flag) { return flag.defined() ? flag.data_ptr<int>() : nullptr; }

void check_x_in_unit_interval(const at::Tensor& flag) {
  if (!flag.defined()) return;
  TORCH_CHECK_VALUE(flag.item<int>() == 0,
                    "fastelbo: x must lie in [0, 1] for the Bernoulli likelihood "
                    "(pass validate_args=False to skip this check)");
}

enum class Likelihood { kBernoulli, kGaussian };

Likelihood parse_likelihood(std::string_view name) {
  if (name == "bernoulli") return Likelihood::kBernoulli;
  if (name == "gaussian") return Likelihood::kGaussian;
  TORCH_CHECK(false, "fastelbo: likelihood must be 'bernoulli' or 'gaussian', got '", std::string(name), "'");
}

}  // namespace

// ---------------------------------------------------------------------------
// rsample, philox_noise
// ---------------------------------------------------------------------------
at::Tensor rsample_cuda(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                        const std::optional<at::Tensor>& eps) {
  check_like(mu, "mu", logvar, "logvar");
  check_like(mu, "mu", eps, "eps");
  const std::optional<at::Tensor> lv(logvar);
  check_device(mu, "mu", {{&lv, "logvar"}, {&eps, "eps"}});
  const c10::cuda::CUDAGuard guard(mu.device());
  auto z = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  if (z.numel() == 0) return z;
  at::Tensor seed_holder;
  const int64_t* s = eps.has_value() ? nullptr : seed_ptr(seed, mu, seed_holder);
  rsample_forward(dtype_of(mu.scalar_type()), mu.size(0), mu.size(1), mat(mu), mat(logvar), mat(eps), s, ptr(z),
                  num_sms(mu.device()), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

std::tuple<at::Tensor, at::Tensor> rsample_backward_cuda(const at::Tensor& grad_z, const at::Tensor& logvar,
                                                         const at::Tensor& seed, const std::optional<at::Tensor>& eps,
                                                         std::array<bool, 2> output_mask) {
  check_like(logvar, "logvar", grad_z, "grad_z");
  check_like(logvar, "logvar", eps, "eps");
  const std::optional<at::Tensor> g(grad_z);
  check_device(logvar, "logvar", {{&g, "grad_z"}, {&eps, "eps"}});
  const c10::cuda::CUDAGuard guard(logvar.device());
  auto dlv = grad_or_empty(output_mask[0], logvar);
  auto deps = grad_or_empty(output_mask[1], logvar);
  const int64_t rows = logvar.size(0), cols = logvar.size(1);
  if (rows * cols == 0 || !(output_mask[0] || output_mask[1])) return {dlv, deps};
  at::Tensor seed_holder;
  const int64_t* s = eps.has_value() ? nullptr : seed_ptr(seed, logvar, seed_holder);
  rsample_backward(dtype_of(logvar.scalar_type()), rows, cols, mat(grad_z), mat(logvar), mat(eps), s, ptr(dlv),
                   ptr(deps), num_sms(logvar.device()), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dlv, deps};
}

at::Tensor philox_noise_cuda(const at::Tensor& seed, int64_t n, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0, "fastelbo: n must be >= 0, got ", n);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fastelbo: seed must be a one-element int64 tensor");
  TORCH_CHECK(seed.is_cuda(), "fastelbo: seed must be a CUDA tensor for the CUDA kernels, got ", seed.device());
  const c10::cuda::CUDAGuard guard(seed.device());
  auto out = at::empty({n}, seed.options().dtype(dtype));
  // The CPU op's dtypes (float32, float64), with the same error otherwise.
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastelbo_philox_noise_cuda", [&] {
    if (n == 0) return;
    philox_noise(dtype_of(dtype), seed.const_data_ptr<int64_t>(), n, normal, out.data_ptr(), num_sms(seed.device()),
                 stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------
// gaussian_kl
// ---------------------------------------------------------------------------
at::Tensor gaussian_kl_cuda(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                            const std::optional<at::Tensor>& prior_logvar) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  const std::optional<at::Tensor> lv(logvar);
  check_device(mu, "mu", {{&lv, "logvar"}, {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
  const c10::cuda::CUDAGuard guard(mu.device());
  auto kl = row_result(mu);
  const int64_t rows = mu.size(0), cols = mu.size(1);
  if (rows == 0) return kl;
  const int sms = num_sms(mu.device());
  auto ws = workspace(mu, rows, cols, 0, sms);
  gaussian_kl_forward(dtype_of(mu.scalar_type()), rows, cols, mat(mu), mat(logvar), mat(prior_mu), mat(prior_logvar),
                      ptr(kl), ptr(ws), sms, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, std::array<bool, 4> output_mask) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  check_row_grad(grad, "grad", mu);
  const std::optional<at::Tensor> lv(logvar), g(grad);
  check_device(mu, "mu", {{&lv, "logvar"}, {&g, "grad"}, {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
  const c10::cuda::CUDAGuard guard(mu.device());
  const bool has_prior = prior_mu.has_value();
  std::array<at::Tensor, 4> d = {grad_or_empty(output_mask[0], mu), grad_or_empty(output_mask[1], mu),
                                 grad_or_empty(output_mask[2] && has_prior, mu),
                                 grad_or_empty(output_mask[3] && has_prior, mu)};
  if (mu.numel() > 0) {
    gaussian_kl_backward(dtype_of(mu.scalar_type()), mu.size(0), mu.size(1), vec(g), mat(mu), mat(logvar),
                         mat(prior_mu), mat(prior_logvar), ptr(d[0]), ptr(d[1]), ptr(d[2]), ptr(d[3]),
                         num_sms(mu.device()), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {d[0], d[1], d[2], d[3]};
}

// ---------------------------------------------------------------------------
// bernoulli_log_prob, gaussian_log_prob
// ---------------------------------------------------------------------------
at::Tensor bernoulli_log_prob_cuda(const at::Tensor& logits, const at::Tensor& x, bool validate_x) {
  check_like(logits, "logits", x, "x");
  const std::optional<at::Tensor> xx(x);
  check_device(logits, "logits", {{&xx, "x"}});
  const c10::cuda::CUDAGuard guard(logits.device());
  auto ll = row_result(logits);
  const int64_t rows = logits.size(0), cols = logits.size(1);
  if (rows == 0) return ll;
  const int sms = num_sms(logits.device());
  auto ws = workspace(logits, rows, cols, 0, sms);
  const auto flag = x_range_flag(validate_x, logits);
  bernoulli_log_prob_forward(dtype_of(logits.scalar_type()), rows, cols, mat(logits), mat(x), ptr(ll), flag_ptr(flag),
                             ptr(ws), sms, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  check_x_in_unit_interval(flag);
  return ll;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                                    const at::Tensor& x,
                                                                    std::array<bool, 2> output_mask) {
  check_like(logits, "logits", x, "x");
  check_row_grad(grad, "grad", logits);
  const std::optional<at::Tensor> xx(x), g(grad);
  check_device(logits, "logits", {{&xx, "x"}, {&g, "grad"}});
  const c10::cuda::CUDAGuard guard(logits.device());
  auto dl = grad_or_empty(output_mask[0], logits);
  auto dx = grad_or_empty(output_mask[1], logits);
  if (logits.numel() > 0) {
    bernoulli_log_prob_backward(dtype_of(logits.scalar_type()), logits.size(0), logits.size(1), vec(g), mat(logits),
                                mat(x), ptr(dl), ptr(dx), num_sms(logits.device()), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dl, dx};
}

at::Tensor gaussian_log_prob_cuda(const at::Tensor& mean, const at::Tensor& x, const at::Tensor& logvar) {
  check_like(mean, "mean", x, "x");
  check_like(mean, "mean", logvar, "logvar");
  const std::optional<at::Tensor> xx(x), lv(logvar);
  check_device(mean, "mean", {{&xx, "x"}, {&lv, "logvar"}});
  const c10::cuda::CUDAGuard guard(mean.device());
  auto ll = row_result(mean);
  const int64_t rows = mean.size(0), cols = mean.size(1);
  if (rows == 0) return ll;
  const int sms = num_sms(mean.device());
  auto ws = workspace(mean, rows, cols, 0, sms);
  gaussian_log_prob_forward(dtype_of(mean.scalar_type()), rows, cols, mat(mean), mat(x), mat(logvar), ptr(ll),
                            ptr(ws), sms, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ll;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward_cuda(const at::Tensor& grad,
                                                                               const at::Tensor& mean,
                                                                               const at::Tensor& x,
                                                                               const at::Tensor& logvar,
                                                                               std::array<bool, 3> output_mask) {
  check_like(mean, "mean", x, "x");
  check_like(mean, "mean", logvar, "logvar");
  check_row_grad(grad, "grad", mean);
  const std::optional<at::Tensor> xx(x), lv(logvar), g(grad);
  check_device(mean, "mean", {{&xx, "x"}, {&lv, "logvar"}, {&g, "grad"}});
  const c10::cuda::CUDAGuard guard(mean.device());
  std::array<at::Tensor, 3> d = {grad_or_empty(output_mask[0], mean), grad_or_empty(output_mask[1], mean),
                                 grad_or_empty(output_mask[2], mean)};
  if (mean.numel() > 0) {
    gaussian_log_prob_backward(dtype_of(mean.scalar_type()), mean.size(0), mean.size(1), vec(g), mat(mean), mat(x),
                               mat(logvar), ptr(d[0]), ptr(d[1]), ptr(d[2]), num_sms(mean.device()), stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {d[0], d[1], d[2]};
}

// ---------------------------------------------------------------------------
// elbo
// ---------------------------------------------------------------------------
namespace {

void check_elbo_args(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
                     const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
                     const std::optional<at::Tensor>& prior_logvar, Likelihood kind) {
  check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind == Likelihood::kGaussian);
  const std::optional<at::Tensor> xx(x), m(mu), lv(logvar);
  check_device(recon, "recon",
               {{&xx, "x"}, {&m, "mu"}, {&lv, "logvar"}, {&obs_logvar, "obs_logvar"}, {&prior_mu, "prior_mu"},
                {&prior_logvar, "prior_logvar"}});
}

ElboArgs elbo_args(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
                   const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
                   const std::optional<at::Tensor>& prior_logvar, Likelihood kind, double beta) {
  ElboArgs a;
  a.rows = recon.size(0);
  a.cols_x = recon.size(1);
  a.cols_z = mu.size(1);
  a.likelihood = kind == Likelihood::kGaussian ? LikelihoodKind::kGaussian : LikelihoodKind::kBernoulli;
  a.beta = beta;
  a.x = mat(x);
  a.recon = mat(recon);
  a.obs_logvar = kind == Likelihood::kGaussian ? mat(obs_logvar) : MatArg{};
  a.mu = mat(mu);
  a.logvar = mat(logvar);
  a.prior_mu = mat(prior_mu);
  a.prior_logvar = mat(prior_logvar);
  return a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> elbo_cuda(const at::Tensor& x, const at::Tensor& recon,
                                                         const at::Tensor& mu, const at::Tensor& logvar,
                                                         const std::optional<at::Tensor>& obs_logvar,
                                                         const std::optional<at::Tensor>& prior_mu,
                                                         const std::optional<at::Tensor>& prior_logvar,
                                                         c10::string_view likelihood, double beta,
                                                         bool validate_x) {
  const Likelihood kind = parse_likelihood(likelihood);
  check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind);
  const c10::cuda::CUDAGuard guard(recon.device());
  auto elbo = row_result(recon), ll = row_result(recon), kl = row_result(recon);
  ElboArgs a = elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, beta);
  if (a.rows == 0) return {elbo, ll, kl};
  const int sms = num_sms(recon.device());
  auto ws = workspace(recon, a.rows, a.cols_x, a.cols_z, sms);
  const auto flag = x_range_flag(validate_x && kind == Likelihood::kBernoulli, recon);
  a.x_out_of_range = flag_ptr(flag);
  elbo_forward(dtype_of(recon.scalar_type()), a, ptr(elbo), ptr(ll), ptr(kl), ptr(ws), sms, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  check_x_in_unit_interval(flag);
  return {elbo, ll, kl};
}

// Gradients in input order: x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_backward_cuda(
    const std::optional<at::Tensor>& grad_elbo, const std::optional<at::Tensor>& grad_loglik,
    const std::optional<at::Tensor>& grad_kl, const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
    const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar, c10::string_view likelihood, double beta,
    std::array<bool, 7> output_mask) {
  const Likelihood kind = parse_likelihood(likelihood);
  check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind);
  check_row_grad(grad_elbo, "grad_elbo", recon);
  check_row_grad(grad_loglik, "grad_loglik", recon);
  check_row_grad(grad_kl, "grad_kl", recon);
  check_device(recon, "recon", {{&grad_elbo, "grad_elbo"}, {&grad_loglik, "grad_loglik"}, {&grad_kl, "grad_kl"}});
  const c10::cuda::CUDAGuard guard(recon.device());
  const bool gaussian = kind == Likelihood::kGaussian, has_prior = prior_mu.has_value();
  std::array<at::Tensor, 7> d = {
      grad_or_empty(output_mask[0], x),       grad_or_empty(output_mask[1], recon),
      grad_or_empty(output_mask[2], mu),      grad_or_empty(output_mask[3], mu),
      grad_or_empty(output_mask[4] && gaussian, recon), grad_or_empty(output_mask[5] && has_prior, mu),
      grad_or_empty(output_mask[6] && has_prior, mu)};
  const ElboArgs a = elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, beta);
  if (a.rows > 0 && a.cols_x + a.cols_z > 0) {
    elbo_backward(dtype_of(recon.scalar_type()), a, vec(grad_elbo), vec(grad_loglik), vec(grad_kl), ptr(d[0]),
                  ptr(d[1]), ptr(d[2]), ptr(d[3]), ptr(d[4]), ptr(d[5]), ptr(d[6]), num_sms(recon.device()),
                  stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
}

TORCH_LIBRARY_IMPL(fastelbo, CUDA, m) {
  m.impl("rsample", &rsample_cuda);
  m.impl("rsample_backward", &rsample_backward_cuda);
  m.impl("philox_noise", &philox_noise_cuda);
  m.impl("gaussian_kl", &gaussian_kl_cuda);
  m.impl("gaussian_kl_backward", &gaussian_kl_backward_cuda);
  m.impl("bernoulli_log_prob", &bernoulli_log_prob_cuda);
  m.impl("bernoulli_log_prob_backward", &bernoulli_log_prob_backward_cuda);
  m.impl("gaussian_log_prob", &gaussian_log_prob_cuda);
  m.impl("gaussian_log_prob_backward", &gaussian_log_prob_backward_cuda);
  m.impl("elbo", &elbo_cuda);
  m.impl("elbo_backward", &elbo_backward_cuda);
}

}  // namespace cuda
}  // namespace fastelbo
