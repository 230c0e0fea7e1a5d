// checks.h: the shape rules of the fastelbo:: ops, written once for every C++
// backend (the CPU ops of csrc/cpu, the CUDA ops of csrc/cuda/torch_ops.h and
// their emulated twins): the argument checks (shapes, dtypes, devices, scalar
// arguments, with the messages users see) and the shapes of the results. The
// Python API validates first with friendlier messages; these guard direct
// torch.ops.fastelbo.* calls. kernels/_checks.py is the Triton twin (same rules,
// same messages). Each backend allocates with its own allocator (the CPU ops
// from cpu/output_cache.h); nothing here includes a backend's files.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>

namespace fastelbo {

// "bernoulli" / "gaussian" as either backend's enum (cpu::Likelihood, cuda::LikelihoodKind).
template <class Kind>
Kind parse_likelihood(std::string_view name) {
  if (name == "bernoulli") return Kind::kBernoulli;
  if (name == "gaussian") return Kind::kGaussian;
  TORCH_CHECK(false, "fastelbo: likelihood must be 'bernoulli' or 'gaussian', got '", std::string(name), "'");
}

inline void check_x_in_unit_interval(bool out_of_range) {
  TORCH_CHECK_VALUE(!out_of_range,
                    "fastelbo: x must lie in [0, 1] for the Bernoulli likelihood "
                    "(pass validate_args=False to skip this check)");
}

// b must be on a's device. The dispatcher runs the kernel of the highest-priority backend
// among the inputs (Meta, CUDA, ... above CPU), so the CUDA kernels meet CPU tensors mixed
// into a direct call, and any kernel meets foreign ones when called with an explicit
// dispatch key (a meta tensor mixed in goes to the fake kernel, which checks the same).
inline void check_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(b.device() == a.device(), "fastelbo: ", bn, " must be on ", a.device(), " like ", an, ", got ",
              b.device());
}

inline void check_2d(const at::Tensor& a, const char* name) {
  TORCH_CHECK(a.dim() == 2, "fastelbo: ", name, " must be 2-D [B, D], got shape ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "fastelbo: ", name, " must be floating point, got ", a.scalar_type());
}

// b must match a in shape, dtype and device (broadcast operands arrive already expanded).
inline void check_like(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  check_2d(a, an);
  TORCH_CHECK(a.sizes() == b.sizes(), "fastelbo: ", bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastelbo: ", bn, " must have dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  check_device(a, an, b, bn);
}

inline void check_like(const at::Tensor& a, const char* an, const std::optional<at::Tensor>& b, const char* bn) {
  if (b.has_value()) check_like(a, an, *b, bn);
}

// An upstream gradient of a per-row result: [B], the rows' dtype.
inline void check_row_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& like) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->dim() == 1 && g->size(0) == like.size(0), "fastelbo: ", name, " must have shape [", like.size(0),
              "], got ", g->sizes());
  TORCH_CHECK(g->scalar_type() == like.scalar_type(), "fastelbo: ", name, " must have dtype ", like.scalar_type(),
              ", got ", g->scalar_type());
  check_device(like, "the other operands", *g, name);
}

inline void check_prior(const std::optional<at::Tensor>& pmu, const std::optional<at::Tensor>& plv) {
  TORCH_CHECK(pmu.has_value() == plv.has_value(),
              "fastelbo: prior_mu and prior_logvar must be given together (the Python API fills a missing one)");
}

// The arguments of the KL ops (broadcast priors arrive expanded to mu's shape).
inline void check_kl_args(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                          const std::optional<at::Tensor>& prior_logvar) {
  check_like(mu, "mu", logvar, "logvar");
  check_like(mu, "mu", prior_mu, "prior_mu");
  check_like(mu, "mu", prior_logvar, "prior_logvar");
  check_prior(prior_mu, prior_logvar);
}

// b must have a's dtype and device (any shape).
inline void check_kind(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastelbo: ", bn, " must have dtype ", a.scalar_type(), " (that of ",
              an, "), got ", b.scalar_type());
  check_device(a, an, b, bn);
}

// A per-sample operand: [K, B, D] whose [B, D] matches `like` (allow_2d: or [B, D]
// itself, K = 1). Returns K.
inline int64_t check_samples(const at::Tensor& t, const char* tn, const at::Tensor& like, const char* ln,
                             bool allow_2d) {
  TORCH_CHECK(t.dim() == 3 || (allow_2d && t.dim() == 2), "fastelbo: ", tn, " must be ",
              allow_2d ? "[B, D] or " : "", "[K, B, D], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastelbo: ", tn, " must be floating point, got ", t.scalar_type());
  const int64_t o = t.dim() - 2;
  TORCH_CHECK(t.size(o) == like.size(0), "fastelbo: ", tn, " must have the batch size of ", ln, " (", like.size(0),
              "), got ", t.size(o), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.size(o + 1) == like.size(1), "fastelbo: ", tn, " must have the feature size of ", ln, " (",
              like.size(1), "), got ", t.size(o + 1), " (shape ", t.sizes(), ")");
  check_kind(like, ln, t, tn);
  return o ? t.size(0) : 1;
}

// The seed tensor: on the operands' device, or on the CPU (the CUDA kernels copy it over, as torch
// takes CPU scalars); its value is checked where it is read (eps given: never).
inline void check_seed_device(const at::Tensor& seed, const at::Tensor& like, const char* ln) {
  TORCH_CHECK(seed.device() == like.device() || seed.device().is_cpu(), "fastelbo: seed must be on ", like.device(),
              " like ", ln, " (or on cpu), got ", seed.device());
}

// rsample: mu, logvar [B, Dz]; eps (given) [B, Dz] for num_samples = 0, else [K, B, Dz]. Returns K >= 1.
inline int64_t check_rsample_args(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                                  const std::optional<at::Tensor>& eps, int64_t num_samples) {
  TORCH_CHECK(num_samples >= 0, "fastelbo: num_samples must be >= 0, got ", num_samples);
  check_like(mu, "mu", logvar, "logvar");
  check_seed_device(seed, mu, "mu");
  const int64_t K = num_samples > 0 ? num_samples : 1;
  if (num_samples == 0) {
    check_like(mu, "mu", eps, "eps");
  } else if (eps.has_value()) {
    check_samples(*eps, "eps", mu, "mu", false);
    TORCH_CHECK(eps->size(0) == K, "fastelbo: eps must have num_samples (", K, ") samples, got shape ", eps->sizes());
  }
  return K;
}

// rsample_backward: grad_z [B, Dz] or [K, B, Dz] against logvar [B, Dz]; eps (given) of grad_z's shape. Returns K.
inline int64_t check_rsample_backward_args(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed,
                                           const std::optional<at::Tensor>& eps) {
  check_2d(logvar, "logvar");
  const int64_t K = check_samples(grad_z, "grad_z", logvar, "logvar", true);
  check_seed_device(seed, logvar, "logvar");
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == grad_z.sizes(), "fastelbo: eps must have the shape of grad_z ", grad_z.sizes(),
                ", got ", eps->sizes());
    check_kind(grad_z, "grad_z", *eps, "eps");
  }
  return K;
}

// An observation / likelihood log-variance: [1, D] (one per feature) or [B, D] (per row), any strides.
inline void check_row_or_feature(const at::Tensor& like, const char* ln, const at::Tensor& s, const char* sn) {
  TORCH_CHECK(s.dim() == 2 && s.size(1) == like.size(1) && (s.size(0) == 1 || s.size(0) == like.size(0)),
              "fastelbo: ", sn, " must be [1, ", like.size(1), "] (per feature) or [", like.size(0), ", ",
              like.size(1), "] (per row), got shape ", s.sizes());
  check_kind(like, ln, s, sn);
}

// gaussian_log_prob(_backward): mean, x [B, Dx]; logvar [1, Dx] or [B, Dx].
inline void check_gaussian_args(const at::Tensor& mean, const at::Tensor& x, const at::Tensor& logvar) {
  check_like(mean, "mean", x, "x");
  check_row_or_feature(mean, "mean", logvar, "logvar");
}

// The likelihood arguments of the fused ops: x [B, Dx], recon [B, Dx] (allow_2d) or
// [K, B, Dx], obs_logvar [1, Dx] or [B, Dx] (gaussian only). Returns K.
inline int64_t check_likelihood_args(const at::Tensor& x, const at::Tensor& recon,
                                     const std::optional<at::Tensor>& obs_logvar, bool gaussian, bool allow_2d) {
  check_2d(x, "x");
  const int64_t K = check_samples(recon, "recon", x, "x", allow_2d);
  TORCH_CHECK(!gaussian || obs_logvar.has_value(),
              "fastelbo: the gaussian likelihood needs obs_logvar (the Python API fills 0)");
  if (gaussian) check_row_or_feature(x, "x", *obs_logvar, "obs_logvar");
  return K;
}

// The arguments of the fused ELBO ops, whatever the device. Returns K (1 for a [B, Dx] recon).
inline int64_t check_elbo_shapes(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                                 const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                                 const std::optional<at::Tensor>& prior_mu,
                                 const std::optional<at::Tensor>& prior_logvar, bool gaussian) {
  const int64_t K = check_likelihood_args(x, recon, obs_logvar, gaussian, true);
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  TORCH_CHECK(mu.size(0) == x.size(0), "fastelbo: mu must have the batch size of x (", x.size(0), "), got ",
              mu.size(0));
  check_kind(x, "x", mu, "mu");
  return K;
}

// The upstream gradients of elbo's three per-row results (None: that result is unused).
inline void check_elbo_upstream(const std::optional<at::Tensor>& grad_elbo, const std::optional<at::Tensor>& grad_loglik,
                                const std::optional<at::Tensor>& grad_kl, const at::Tensor& x) {
  check_row_grad(grad_elbo, "grad_elbo", x);
  check_row_grad(grad_loglik, "grad_loglik", x);
  check_row_grad(grad_kl, "grad_kl", x);
}

// The arguments of iwae_bound: x [B, Dx], recon [K, B, Dx], z [K, B, Dz], mu, logvar [B, Dz]. Returns K.
inline int64_t check_iwae_shapes(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                                 const at::Tensor& mu, const at::Tensor& logvar,
                                 const std::optional<at::Tensor>& obs_logvar, const std::optional<at::Tensor>& prior_mu,
                                 const std::optional<at::Tensor>& prior_logvar, bool gaussian) {
  const int64_t K = check_likelihood_args(x, recon, obs_logvar, gaussian, false);
  TORCH_CHECK(K >= 1, "fastelbo: iwae_bound needs at least one sample, got recon of shape ", recon.sizes());
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  TORCH_CHECK(mu.size(0) == x.size(0), "fastelbo: mu must have the batch size of x (", x.size(0), "), got ",
              mu.size(0));
  check_kind(x, "x", mu, "mu");
  TORCH_CHECK(z.dim() == 3, "fastelbo: z must be [K, B, Dz], got shape ", z.sizes());
  TORCH_CHECK(z.size(0) == K, "fastelbo: K mismatch between z and recon: z has ", z.size(0), " samples, recon ", K);
  TORCH_CHECK(z.size(2) == mu.size(1), "fastelbo: z must have the Dz of mu (", mu.size(1), "), got ", z.size(2));
  check_samples(z, "z", mu, "mu", false);
  return K;
}

// The accumulation dtype of a floating dtype (docs/design.md §2): float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_free_bits(double free_bits) {
  TORCH_CHECK(!std::isnan(free_bits) && free_bits >= 0.0, "fastelbo: free_bits must be >= 0 (nats), got ",
              free_bits);
}

// The arguments of free_bits_kl_backward beyond the KL ones: the floor and kl_dims [Dz] (accumulation dtype).
inline void check_free_bits_backward(const at::Tensor& kl_dims, const at::Tensor& mu, double free_bits) {
  check_free_bits(free_bits);
  const auto acc = acc_dtype(mu.scalar_type());
  TORCH_CHECK(kl_dims.dim() == 1 && kl_dims.size(0) == mu.size(1), "fastelbo: kl_dims must have shape [",
              mu.size(1), "], got ", kl_dims.sizes());
  TORCH_CHECK(kl_dims.scalar_type() == acc, "fastelbo: kl_dims must have dtype ", acc, ", got ",
              kl_dims.scalar_type());
  check_device(mu, "mu", kl_dims, "kl_dims");
}

// grad_log_weights of iwae_bound_backward: [K, B] in the accumulation dtype of x (that of log_weights).
inline void check_log_weights_grad(const at::Tensor& grad_log_weights, int64_t K, const at::Tensor& x) {
  const int64_t B = x.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(grad_log_weights.dim() == 2 && grad_log_weights.size(0) == K && grad_log_weights.size(1) == B,
              "fastelbo: grad_log_weights must have shape [", K, ", ", B, "] (that of log_weights), got ",
              grad_log_weights.sizes());
  TORCH_CHECK(grad_log_weights.scalar_type() == acc, "fastelbo: grad_log_weights must have dtype ", acc,
              " (the accumulation dtype of ", x.scalar_type(), "), got ", grad_log_weights.scalar_type());
  check_device(x, "x", grad_log_weights, "grad_log_weights");
}

// ---------------------------------------------------------------------------
// Results. Every op returns fresh contiguous tensors: per-row results [B] in the
// rows' dtype, gradients in their input's shape, an empty tensor for a gradient
// nobody asked for. `Alloc` is the backend's allocation of a contiguous tensor,
// at::Tensor(at::IntArrayRef sizes, const at::TensorOptions&): empty_contiguous
// below, or the CPU ops' output cache (cpu/output_cache.h empty_result).
// ---------------------------------------------------------------------------
inline at::Tensor empty_contiguous(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

inline at::Tensor row_result(const at::Tensor& like) { return empty_contiguous({like.size(0)}, like.options()); }

template <class Alloc>
at::Tensor grad_or_empty(bool wanted, const at::Tensor& like, Alloc alloc) {
  return wanted ? alloc(like.sizes(), like.options()) : at::empty({0}, like.options());
}

// The gradient results of the backward ops, in their input order; the prior's only with a prior, the
// observation log-variance's only for the Gaussian likelihood (then in obs_logvar's own shape).
// (mu, logvar, prior_mu, prior_logvar)
template <class Alloc>
std::array<at::Tensor, 4> kl_grads(std::array<bool, 4> mask, const at::Tensor& mu, bool has_prior, Alloc alloc) {
  return {grad_or_empty(mask[0], mu, alloc), grad_or_empty(mask[1], mu, alloc),
          grad_or_empty(mask[2] && has_prior, mu, alloc), grad_or_empty(mask[3] && has_prior, mu, alloc)};
}

// (x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar)
template <class Alloc>
std::array<at::Tensor, 7> elbo_grads(std::array<bool, 7> mask, const at::Tensor& x, const at::Tensor& recon,
                                     const at::Tensor& mu, const std::optional<at::Tensor>& obs_logvar, bool gaussian,
                                     bool has_prior, Alloc alloc) {
  return {grad_or_empty(mask[0], x, alloc),  grad_or_empty(mask[1], recon, alloc),
          grad_or_empty(mask[2], mu, alloc), grad_or_empty(mask[3], mu, alloc),
          grad_or_empty(mask[4] && gaussian, gaussian ? *obs_logvar : x, alloc),
          grad_or_empty(mask[5] && has_prior, mu, alloc), grad_or_empty(mask[6] && has_prior, mu, alloc)};
}

// (x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar)
template <class Alloc>
std::array<at::Tensor, 8> iwae_grads(std::array<bool, 8> mask, const at::Tensor& x, const at::Tensor& recon,
                                     const at::Tensor& z, const at::Tensor& mu,
                                     const std::optional<at::Tensor>& obs_logvar, bool gaussian, bool has_prior,
                                     Alloc alloc) {
  return {grad_or_empty(mask[0], x, alloc),  grad_or_empty(mask[1], recon, alloc),
          grad_or_empty(mask[2], z, alloc),  grad_or_empty(mask[3], mu, alloc),
          grad_or_empty(mask[4], mu, alloc), grad_or_empty(mask[5] && gaussian, gaussian ? *obs_logvar : x, alloc),
          grad_or_empty(mask[6] && has_prior, mu, alloc), grad_or_empty(mask[7] && has_prior, mu, alloc)};
}

}  // namespace fastelbo
