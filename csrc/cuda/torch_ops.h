// torch_ops.h: the torch side of the CUDA kernels' ops, written once for the two
// builds of csrc/cuda: the real one (binding.cpp: CUDA tensors, the current CUDA
// stream, fastelbo::<op> for the CUDA dispatch key) and the test-only emulated one
// (../emu/binding.cpp: CPU tensors, synchronous launches on the emulation,
// fastelbo::emu_<op> for the CPU key). The shape rules of ../checks.h (the same
// checks, messages and result shapes as the CPU ops), then the raw-pointer
// launchers of launchers.h.
//
// Everything device-specific comes from the Device policy:
//   static void check(const at::Tensor& first, const char* name, Others others)  all on the right device
//   struct Guard { explicit Guard(const at::Tensor&); }                         the device guard
//   static int num_sms(const at::Tensor& like)                                  multiprocessors
//   static cudaStream_t stream()                                                the launches' stream
//   static const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& like, at::Tensor& holder)
//   static void launched()                                                      after each launcher call
// The one header of csrc/cuda that sees torch, included by the two binding.cpp
// files only, after the torch headers; the kernels and their headers stay free
// of torch (SUBSET.md).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../checks.h"
#include "launchers.h"

namespace fastelbo {
namespace cuda_ops {

using cuda::DType;
using cuda::ElboArgs;
using cuda::IwaeArgs;
using cuda::LikelihoodKind;
using cuda::MatArg;
using cuda::VecArg;

using Others = std::initializer_list<std::pair<const std::optional<at::Tensor>*, const char*>>;
using Opt = std::optional<at::Tensor>;

inline DType dtype_of(at::ScalarType t) {
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

// The stride of a size-1 dimension is meaningless: 0 makes it broadcast.
inline int64_t stride_of(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// [B, D] or [K, B, D] (sk = the sample stride).
inline MatArg mat(const at::Tensor& t) {
  const int64_t o = t.dim() - 2;
  return MatArg{t.const_data_ptr(), stride_of(t, o), t.stride(o + 1), o ? stride_of(t, 0) : 0};
}

inline MatArg mat(const Opt& t) { return t.has_value() ? mat(*t) : MatArg{}; }

inline VecArg vec(const Opt& t) { return t.has_value() ? VecArg{t->const_data_ptr(), t->stride(0)} : VecArg{}; }

inline void* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

inline at::Tensor bytes_like(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The reductions' workspace for split rows (usually none).
inline at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t cols_a, int64_t cols_b, int sms) {
  return bytes_like(like, cuda::row_reduce_workspace_bytes(dtype_of(like.scalar_type()), rows, cols_a, cols_b, sms));
}

// The column sums' workspace (a [1, D] log-variance's gradient).
inline at::Tensor column_workspace(bool needed, const at::Tensor& like, int64_t rows, int64_t cols, int sms) {
  return bytes_like(like, needed ? cuda::column_sum_workspace_bytes(dtype_of(like.scalar_type()), rows, cols, sms) : 0);
}

// A [1, D] log-variance of a batch of B != 1 rows: its gradient is summed over the rows.
inline bool shared_rows(const Opt& s, int64_t rows) { return s.has_value() && s->size(0) == 1 && rows != 1; }

// validate_x: a device flag the Bernoulli forward sets for x outside [0, 1],
// then checked by Device::check_x_flag: on CUDA a device-side assert queued
// after the kernel (no host read: no sync, capturable in a CUDA graph), in the
// emulation a read of the host flag (a ValueError at once).
inline at::Tensor x_range_flag(bool validate_x, const at::Tensor& like) {
  return validate_x ? at::zeros({1}, like.options().dtype(at::kInt)) : at::Tensor();
}

inline int* flag_ptr(const at::Tensor& flag) { return flag.defined() ? flag.data_ptr<int>() : nullptr; }


// The likelihood and latent arguments of the fused ops as the launchers take them.
inline ElboArgs fused_args(int64_t samples, const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                           const at::Tensor& logvar, const Opt& obs_logvar, const Opt& prior_mu,
                           const Opt& prior_logvar, LikelihoodKind kind, double beta) {
  ElboArgs a;
  a.samples = samples;
  a.rows = x.size(0);
  a.cols_x = x.size(1);
  a.cols_z = mu.size(1);
  a.likelihood = kind;
  a.beta = beta;
  a.x = mat(x);
  a.recon = mat(recon);
  if (kind == LikelihoodKind::kGaussian) {
    a.obs_logvar = mat(obs_logvar);
    a.obs_logvar_shared = shared_rows(obs_logvar, a.rows);
  }
  a.mu = mat(mu);
  a.logvar = mat(logvar);
  a.prior_mu = mat(prior_mu);
  a.prior_logvar = mat(prior_logvar);
  return a;
}

template <class Device>
struct Ops {
  using Guard = typename Device::Guard;

  // The forward of a per-row op over `like` [rows, cols]: under like's device, a [rows] result, and
  // launch(rows, cols, result, workspace, sms) unless the batch is empty.
  template <class Launch>
  static at::Tensor row_forward(const at::Tensor& like, Launch launch) {
    const Guard guard(like);
    auto out = row_result(like);
    const int64_t rows = like.size(0), cols = like.size(1);
    if (rows == 0) return out;
    const int sms = Device::num_sms(like);
    auto ws = workspace(like, rows, cols, 0, sms);
    launch(rows, cols, ptr(out), ptr(ws), sms);
    Device::launched();
    return out;
  }

  // ---------------------------------------------------------------------------
  // rsample, philox_noise
  // ---------------------------------------------------------------------------
  static at::Tensor rsample(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed, const Opt& eps,
                            int64_t num_samples) {
    const int64_t K = check_rsample_args(mu, logvar, seed, eps, num_samples);
    const Opt lv(logvar);
    Device::check(mu, "mu", {{&lv, "logvar"}, {&eps, "eps"}});
    const Guard guard(mu);
    std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
    if (num_samples > 0) shape.insert(shape.begin(), num_samples);
    auto z = at::empty(shape, mu.options().memory_format(at::MemoryFormat::Contiguous));
    if (z.numel() == 0) return z;
    at::Tensor holder;
    const int64_t* s = eps.has_value() ? nullptr : Device::seed_ptr(seed, mu, holder);
    cuda::rsample_forward(dtype_of(mu.scalar_type()), K, mu.size(0), mu.size(1), mat(mu), mat(logvar), mat(eps), s,
                          ptr(z), Device::num_sms(mu), Device::stream());
    Device::launched();
    return z;
  }

  static std::tuple<at::Tensor, at::Tensor> rsample_backward(const at::Tensor& grad_z, const at::Tensor& logvar,
                                                             const at::Tensor& seed, const Opt& eps,
                                                             std::array<bool, 2> output_mask) {
    const int64_t K = check_rsample_backward_args(grad_z, logvar, seed, eps);
    const Opt g(grad_z);
    Device::check(logvar, "logvar", {{&g, "grad_z"}, {&eps, "eps"}});
    const Guard guard(logvar);
    auto dlv = grad_or_empty(output_mask[0], logvar, empty_contiguous);
    auto deps = grad_or_empty(output_mask[1], grad_z, empty_contiguous);
    const int64_t rows = logvar.size(0), cols = logvar.size(1);
    if (rows * cols == 0 || !(output_mask[0] || output_mask[1])) return {dlv, deps};
    if (K == 0) {  // no sample: dlogvar sums nothing
      if (output_mask[0]) dlv.zero_();
      return {dlv, deps};
    }
    at::Tensor holder;
    const int64_t* s = eps.has_value() ? nullptr : Device::seed_ptr(seed, logvar, holder);
    cuda::rsample_backward(dtype_of(logvar.scalar_type()), K, rows, cols, mat(grad_z), mat(logvar), mat(eps), s,
                           ptr(dlv), ptr(deps), Device::num_sms(logvar), Device::stream());
    Device::launched();
    return {dlv, deps};
  }

  static at::Tensor philox_noise(const at::Tensor& seed, int64_t n, bool normal, at::ScalarType dtype) {
    TORCH_CHECK(n >= 0, "fastelbo: n must be >= 0, got ", n);
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                "fastelbo: seed must be a one-element int64 tensor");
    Device::check(seed, "seed", {});
    const Guard guard(seed);
    auto out = at::empty({n}, seed.options().dtype(dtype));
    // The CPU op's dtypes (float32, float64), with the same error otherwise.
    AT_DISPATCH_FLOATING_TYPES(dtype, "fastelbo_philox_noise_cuda", [&] {
      if (n == 0) return;
      at::Tensor holder;
      cuda::philox_noise(dtype_of(dtype), Device::seed_ptr(seed, seed, holder), n, normal, out.data_ptr(),
                         Device::num_sms(seed), Device::stream());
      Device::launched();
    });
    return out;
  }

  // ---------------------------------------------------------------------------
  // gaussian_kl
  // ---------------------------------------------------------------------------
  static at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar, const Opt& prior_mu,
                                const Opt& prior_logvar) {
    check_kl_args(mu, logvar, prior_mu, prior_logvar);
    const Opt lv(logvar);
    Device::check(mu, "mu", {{&lv, "logvar"}, {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
    return row_forward(mu, [&](int64_t rows, int64_t cols, void* kl, void* ws, int sms) {
      cuda::gaussian_kl_forward(dtype_of(mu.scalar_type()), rows, cols, mat(mu), mat(logvar), mat(prior_mu),
                                mat(prior_logvar), kl, ws, sms, Device::stream());
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward(
      const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar, const Opt& prior_mu,
      const Opt& prior_logvar, std::array<bool, 4> output_mask) {
    check_kl_args(mu, logvar, prior_mu, prior_logvar);
    check_row_grad(grad, "grad", mu);
    const Opt lv(logvar), g(grad);
    Device::check(mu, "mu",
                  {{&lv, "logvar"}, {&g, "grad"}, {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
    const Guard guard(mu);
    const bool has_prior = prior_mu.has_value();
    std::array<at::Tensor, 4> d = kl_grads(output_mask, mu, has_prior, empty_contiguous);
    if (mu.numel() > 0) {
      cuda::gaussian_kl_backward(dtype_of(mu.scalar_type()), mu.size(0), mu.size(1), vec(g), mat(mu), mat(logvar),
                                 mat(prior_mu), mat(prior_logvar), ptr(d[0]), ptr(d[1]), ptr(d[2]), ptr(d[3]),
                                 Device::num_sms(mu), Device::stream());
      Device::launched();
    }
    return {d[0], d[1], d[2], d[3]};
  }

  // ---------------------------------------------------------------------------
  // free_bits_kl
  // ---------------------------------------------------------------------------
  static std::tuple<at::Tensor, at::Tensor> free_bits_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                         const Opt& prior_mu, const Opt& prior_logvar,
                                                         double free_bits) {
    check_kl_args(mu, logvar, prior_mu, prior_logvar);
    check_free_bits(free_bits);
    const Opt lv(logvar);
    Device::check(mu, "mu", {{&lv, "logvar"}, {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
    const Guard guard(mu);
    const int64_t rows = mu.size(0), cols = mu.size(1);
    auto kl = row_result(mu);
    auto kl_dims = at::empty({cols}, mu.options().dtype(acc_dtype(mu.scalar_type())));
    if (cols == 0) {
      kl.zero_();
      return {kl, kl_dims};
    }
    const int sms = Device::num_sms(mu);
    const DType dt = dtype_of(mu.scalar_type());
    auto ws = bytes_like(mu, cuda::free_bits_kl_workspace_bytes(dt, rows, cols, sms));
    cuda::free_bits_kl_forward(dt, rows, cols, mat(mu), mat(logvar), mat(prior_mu), mat(prior_logvar), free_bits,
                               ptr(kl), ptr(kl_dims), ptr(ws), sms, Device::stream());
    Device::launched();
    return {kl, kl_dims};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> free_bits_kl_backward(
      const at::Tensor& grad, const at::Tensor& kl_dims, const at::Tensor& mu, const at::Tensor& logvar,
      const Opt& prior_mu, const Opt& prior_logvar, double free_bits, std::array<bool, 4> output_mask) {
    check_kl_args(mu, logvar, prior_mu, prior_logvar);
    check_row_grad(grad, "grad", mu);
    check_free_bits_backward(kl_dims, mu, free_bits);
    const Opt lv(logvar), g(grad), kd(kl_dims);
    Device::check(mu, "mu",
                  {{&lv, "logvar"}, {&g, "grad"}, {&kd, "kl_dims"}, {&prior_mu, "prior_mu"},
                   {&prior_logvar, "prior_logvar"}});
    const Guard guard(mu);
    const bool has_prior = prior_mu.has_value();
    std::array<at::Tensor, 4> d = kl_grads(output_mask, mu, has_prior, empty_contiguous);
    if (mu.numel() > 0) {
      cuda::free_bits_kl_backward(dtype_of(mu.scalar_type()), mu.size(0), mu.size(1), vec(g),
                                  kl_dims.const_data_ptr(), kl_dims.stride(0), mat(mu), mat(logvar), mat(prior_mu),
                                  mat(prior_logvar), free_bits, ptr(d[0]), ptr(d[1]), ptr(d[2]), ptr(d[3]),
                                  Device::num_sms(mu), Device::stream());
      Device::launched();
    }
    return {d[0], d[1], d[2], d[3]};
  }

  // ---------------------------------------------------------------------------
  // bernoulli_log_prob, gaussian_log_prob
  // ---------------------------------------------------------------------------
  static at::Tensor bernoulli_log_prob(const at::Tensor& logits, const at::Tensor& x, bool validate_x) {
    check_like(logits, "logits", x, "x");
    const Opt xx(x);
    Device::check(logits, "logits", {{&xx, "x"}});
    at::Tensor flag;
    auto ll = row_forward(logits, [&](int64_t rows, int64_t cols, void* out, void* ws, int sms) {
      flag = x_range_flag(validate_x, logits);
      cuda::bernoulli_log_prob_forward(dtype_of(logits.scalar_type()), rows, cols, mat(logits), mat(x), out,
                                       flag_ptr(flag), ws, sms, Device::stream());
    });
    Device::check_x_flag(flag);
    return ll;
  }

  static std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad,
                                                                        const at::Tensor& logits, const at::Tensor& x,
                                                                        std::array<bool, 2> output_mask) {
    check_like(logits, "logits", x, "x");
    check_row_grad(grad, "grad", logits);
    const Opt xx(x), g(grad);
    Device::check(logits, "logits", {{&xx, "x"}, {&g, "grad"}});
    const Guard guard(logits);
    auto dl = grad_or_empty(output_mask[0], logits, empty_contiguous);
    auto dx = grad_or_empty(output_mask[1], logits, empty_contiguous);
    if (logits.numel() > 0) {
      cuda::bernoulli_log_prob_backward(dtype_of(logits.scalar_type()), logits.size(0), logits.size(1), vec(g),
                                        mat(logits), mat(x), ptr(dl), ptr(dx), Device::num_sms(logits),
                                        Device::stream());
      Device::launched();
    }
    return {dl, dx};
  }

  static at::Tensor gaussian_log_prob(const at::Tensor& mean, const at::Tensor& x, const at::Tensor& logvar) {
    check_gaussian_args(mean, x, logvar);
    const Opt xx(x), lv(logvar);
    Device::check(mean, "mean", {{&xx, "x"}, {&lv, "logvar"}});
    return row_forward(mean, [&](int64_t rows, int64_t cols, void* ll, void* ws, int sms) {
      cuda::gaussian_log_prob_forward(dtype_of(mean.scalar_type()), rows, cols, mat(mean), mat(x), mat(logvar), ll,
                                      ws, sms, Device::stream());
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(const at::Tensor& grad,
                                                                                   const at::Tensor& mean,
                                                                                   const at::Tensor& x,
                                                                                   const at::Tensor& logvar,
                                                                                   std::array<bool, 3> output_mask) {
    check_gaussian_args(mean, x, logvar);
    check_row_grad(grad, "grad", mean);
    const Opt xx(x), lv(logvar), g(grad);
    Device::check(mean, "mean", {{&xx, "x"}, {&lv, "logvar"}, {&g, "grad"}});
    const Guard guard(mean);
    std::array<at::Tensor, 3> d = {grad_or_empty(output_mask[0], mean, empty_contiguous),
                                   grad_or_empty(output_mask[1], mean, empty_contiguous),
                                   grad_or_empty(output_mask[2], logvar, empty_contiguous)};
    const int64_t rows = mean.size(0), cols = mean.size(1);
    if (rows * cols == 0) {
      if (output_mask[2]) d[2].zero_();  // a [1, D] logvar of an empty batch: nothing summed
      return {d[0], d[1], d[2]};
    }
    const int sms = Device::num_sms(mean);
    const bool shared = shared_rows(lv, rows);
    auto ws = column_workspace(shared && output_mask[2], mean, rows, cols, sms);
    cuda::gaussian_log_prob_backward(dtype_of(mean.scalar_type()), rows, cols, vec(g), mat(mean), mat(x),
                                     mat(logvar), shared, ptr(d[0]), ptr(d[1]), ptr(d[2]), ptr(ws), sms,
                                     Device::stream());
    Device::launched();
    return {d[0], d[1], d[2]};
  }

  // ---------------------------------------------------------------------------
  // elbo
  // ---------------------------------------------------------------------------
  static void check_fused_devices(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                                  const at::Tensor& logvar, const Opt& obs_logvar, const Opt& prior_mu,
                                  const Opt& prior_logvar, const Opt& z = std::nullopt) {
    const Opt xx(x), m(mu), lv(logvar);
    Device::check(recon, "recon",
                  {{&xx, "x"}, {&z, "z"}, {&m, "mu"}, {&lv, "logvar"}, {&obs_logvar, "obs_logvar"},
                   {&prior_mu, "prior_mu"}, {&prior_logvar, "prior_logvar"}});
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> elbo(const at::Tensor& x, const at::Tensor& recon,
                                                             const at::Tensor& mu, const at::Tensor& logvar,
                                                             const Opt& obs_logvar, const Opt& prior_mu,
                                                             const Opt& prior_logvar, c10::string_view likelihood,
                                                             double beta, bool validate_x) {
    const LikelihoodKind kind = parse_likelihood<LikelihoodKind>(likelihood);
    const bool gaussian = kind == LikelihoodKind::kGaussian;
    const int64_t K = check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
    check_fused_devices(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar);
    const Guard guard(recon);
    auto e = row_result(x), ll = row_result(x), kl = row_result(x);
    ElboArgs a = fused_args(K, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, beta);
    if (a.rows == 0) return {e, ll, kl};
    const int sms = Device::num_sms(recon);
    auto ws = workspace(recon, a.rows, a.cols_x, a.cols_z, sms);
    const auto flag = x_range_flag(validate_x && !gaussian, recon);
    a.x_out_of_range = flag_ptr(flag);
    cuda::elbo_forward(dtype_of(recon.scalar_type()), a, ptr(e), ptr(ll), ptr(kl), ptr(ws), sms, Device::stream());
    Device::launched();
    Device::check_x_flag(flag);
    return {e, ll, kl};
  }

  // Gradients in input order: x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_backward(
      const Opt& grad_elbo, const Opt& grad_loglik, const Opt& grad_kl, const at::Tensor& x, const at::Tensor& recon,
      const at::Tensor& mu, const at::Tensor& logvar, const Opt& obs_logvar, const Opt& prior_mu,
      const Opt& prior_logvar, c10::string_view likelihood, double beta, std::array<bool, 7> output_mask) {
    const LikelihoodKind kind = parse_likelihood<LikelihoodKind>(likelihood);
    const bool gaussian = kind == LikelihoodKind::kGaussian, has_prior = prior_mu.has_value();
    const int64_t K = check_elbo_shapes(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
    check_elbo_upstream(grad_elbo, grad_loglik, grad_kl, x);
    check_fused_devices(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar);
    Device::check(recon, "recon", {{&grad_elbo, "grad_elbo"}, {&grad_loglik, "grad_loglik"}, {&grad_kl, "grad_kl"}});
    const Guard guard(recon);
    std::array<at::Tensor, 7> d =
        elbo_grads(output_mask, x, recon, mu, obs_logvar, gaussian, has_prior, empty_contiguous);
    const ElboArgs a = fused_args(K, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, beta);
    if (a.rows == 0 || (a.cols_x == 0 && a.cols_z == 0)) {
      if (d[4].numel()) d[4].zero_();  // a [1, Dx] obs_logvar of an empty batch: nothing summed
      return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
    }
    const int sms = Device::num_sms(recon);
    auto ws = column_workspace(a.obs_logvar_shared && output_mask[4], recon, a.rows, a.cols_x, sms);
    cuda::elbo_backward(dtype_of(recon.scalar_type()), a, vec(grad_elbo), vec(grad_loglik), vec(grad_kl), ptr(d[0]),
                        ptr(d[1]), ptr(d[2]), ptr(d[3]), ptr(d[4]), ptr(d[5]), ptr(d[6]), ptr(ws), sms,
                        Device::stream());
    Device::launched();
    return {d[0], d[1], d[2], d[3], d[4], d[5], d[6]};
  }

  // ---------------------------------------------------------------------------
  // iwae_bound
  // ---------------------------------------------------------------------------
  static std::tuple<at::Tensor, at::Tensor> iwae_bound(const at::Tensor& x, const at::Tensor& recon,
                                                       const at::Tensor& z, const at::Tensor& mu,
                                                       const at::Tensor& logvar, const Opt& obs_logvar,
                                                       const Opt& prior_mu, const Opt& prior_logvar,
                                                       c10::string_view likelihood, bool validate_x) {
    const LikelihoodKind kind = parse_likelihood<LikelihoodKind>(likelihood);
    const bool gaussian = kind == LikelihoodKind::kGaussian;
    const int64_t K = check_iwae_shapes(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
    check_fused_devices(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, Opt(z));
    const Guard guard(recon);
    const int64_t B = x.size(0);
    auto bound = row_result(x);
    auto lw = at::empty({K, B}, x.options().dtype(acc_dtype(x.scalar_type())));
    IwaeArgs a = fused_args(K, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, 1.0);
    if (B == 0) return {bound, lw};
    const int sms = Device::num_sms(recon);
    auto ws = workspace(recon, K * B, a.cols_x, a.cols_z, sms);
    const auto flag = x_range_flag(validate_x && !gaussian, recon);
    a.x_out_of_range = flag_ptr(flag);
    cuda::iwae_forward(dtype_of(recon.scalar_type()), a, mat(z), ptr(bound), ptr(lw), ptr(ws), sms,
                       Device::stream());
    Device::launched();
    Device::check_x_flag(flag);
    return {bound, lw};
  }

  // Gradients in input order: x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  iwae_bound_backward(const at::Tensor& grad_log_weights, const at::Tensor& x, const at::Tensor& recon,
                      const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar, const Opt& obs_logvar,
                      const Opt& prior_mu, const Opt& prior_logvar, c10::string_view likelihood,
                      std::array<bool, 8> output_mask) {
    const LikelihoodKind kind = parse_likelihood<LikelihoodKind>(likelihood);
    const bool gaussian = kind == LikelihoodKind::kGaussian, has_prior = prior_mu.has_value();
    const int64_t K = check_iwae_shapes(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, gaussian);
    const int64_t B = x.size(0);
    check_log_weights_grad(grad_log_weights, K, x);
    check_fused_devices(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, Opt(z));
    const Opt glw(grad_log_weights);
    Device::check(recon, "recon", {{&glw, "grad_log_weights"}});
    const Guard guard(recon);
    std::array<at::Tensor, 8> d =
        iwae_grads(output_mask, x, recon, z, mu, obs_logvar, gaussian, has_prior, empty_contiguous);
    const IwaeArgs a = fused_args(K, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, kind, 1.0);
    if (B == 0 || (a.cols_x == 0 && a.cols_z == 0)) {
      if (d[5].numel()) d[5].zero_();  // a [1, Dx] obs_logvar of an empty batch: nothing summed
      return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]};
    }
    const int sms = Device::num_sms(recon);
    auto ws = column_workspace(a.obs_logvar_shared && output_mask[5], recon, B, a.cols_x, sms);
    // [K, B]: s0 the sample stride, s1 the row stride.
    const MatArg g{grad_log_weights.const_data_ptr(), grad_log_weights.stride(0), grad_log_weights.stride(1), 0};
    cuda::iwae_backward(dtype_of(recon.scalar_type()), a, mat(z), g, ptr(d[0]), ptr(d[1]), ptr(d[2]), ptr(d[3]),
                        ptr(d[4]), ptr(d[5]), ptr(d[6]), ptr(d[7]), ptr(ws), sms, Device::stream());
    Device::launched();
    return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]};
  }
};

// Registers every op of fastelbo/_ops.py's _SCHEMAS as `prefix + name`.
template <class Device>
void register_ops(torch::Library& m, const std::string& prefix) {
  using O = Ops<Device>;
  m.impl((prefix + "rsample").c_str(), &O::rsample);
  m.impl((prefix + "rsample_backward").c_str(), &O::rsample_backward);
  m.impl((prefix + "philox_noise").c_str(), &O::philox_noise);
  m.impl((prefix + "gaussian_kl").c_str(), &O::gaussian_kl);
  m.impl((prefix + "gaussian_kl_backward").c_str(), &O::gaussian_kl_backward);
  m.impl((prefix + "bernoulli_log_prob").c_str(), &O::bernoulli_log_prob);
  m.impl((prefix + "bernoulli_log_prob_backward").c_str(), &O::bernoulli_log_prob_backward);
  m.impl((prefix + "gaussian_log_prob").c_str(), &O::gaussian_log_prob);
  m.impl((prefix + "gaussian_log_prob_backward").c_str(), &O::gaussian_log_prob_backward);
  m.impl((prefix + "elbo").c_str(), &O::elbo);
  m.impl((prefix + "elbo_backward").c_str(), &O::elbo_backward);
  m.impl((prefix + "iwae_bound").c_str(), &O::iwae_bound);
  m.impl((prefix + "iwae_bound_backward").c_str(), &O::iwae_bound_backward);
  m.impl((prefix + "free_bits_kl").c_str(), &O::free_bits_kl);
  m.impl((prefix + "free_bits_kl_backward").c_str(), &O::free_bits_kl_backward);
}

}  // namespace cuda_ops
}  // namespace fastelbo
