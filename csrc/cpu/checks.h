// Argument checks shared by the CPU ops. The Python API validates first with
// friendlier messages; these guard direct torch.ops.fastelbo.* calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastelbo {
namespace cpu {

inline void check_2d(const at::Tensor& a, const char* name) {
  TORCH_CHECK(a.dim() == 2, "fastelbo: ", name, " must be 2-D [B, D], got shape ", a.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "fastelbo: ", name, " must be floating point, got ", a.scalar_type());
}

// b must match a in shape and dtype (broadcast operands arrive already expanded).
inline void check_like(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  check_2d(a, an);
  TORCH_CHECK(a.sizes() == b.sizes(), "fastelbo: ", bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastelbo: ", bn, " must have dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
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

// The arguments of the fused ELBO ops, whatever the device.
inline void check_elbo_shapes(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                              const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                              const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                              bool gaussian) {
  check_like(recon, "recon", x, "x");
  check_like(recon, "recon", obs_logvar, "obs_logvar");
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  TORCH_CHECK(mu.size(0) == recon.size(0), "fastelbo: mu must have the batch size of recon (", recon.size(0),
              "), got ", mu.size(0));
  TORCH_CHECK(mu.scalar_type() == recon.scalar_type(), "fastelbo: mu must have dtype ", recon.scalar_type(), ", got ",
              mu.scalar_type());
  TORCH_CHECK(!gaussian || obs_logvar.has_value(),
              "fastelbo: the gaussian likelihood needs obs_logvar (the Python API fills 0)");
}

// Result of a gradient the caller did not ask for.
inline at::Tensor grad_or_empty(bool wanted, const at::Tensor& like) {
  const auto opts = like.options().memory_format(at::MemoryFormat::Contiguous);
  return wanted ? at::empty(like.sizes(), opts) : at::empty({0}, opts);
}

}  // namespace cpu
}  // namespace fastelbo
