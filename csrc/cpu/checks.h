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

// Result of a gradient the caller did not ask for.
inline at::Tensor grad_or_empty(bool wanted, const at::Tensor& like) {
  const auto opts = like.options().memory_format(at::MemoryFormat::Contiguous);
  return wanted ? at::empty(like.sizes(), opts) : at::empty({0}, opts);
}

}  // namespace cpu
}  // namespace fastelbo
