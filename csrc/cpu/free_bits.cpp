// KL with free bits on the CPU (Kingma et al. 2016), over KLTerm's operands and
// the per-element KL of fastelbo_math.h (kl_std / kl_normal):
//   kl_dims[j] = (1/B) sum_b KL[b, j]                                  pass 1: column sums
//   kl[b]      = sum_j (kl_dims[j] < free_bits ? free_bits : KL[b, j])  pass 2: rows
// (a dimension of NaN kl_dims is NaN in every row, value and gradient: fastelbo_math.h
// free_bits_weight). Pass 1 sums in one accumulation-typed partial per row block
// (RowBlocks, added in block order: deterministic for a thread count). Pass 2 reads
// the weights of the dimensions (1 kept, 0 floored, NaN) as one more [1, Dz]
// operand; floored dimensions select 0 (free_bits_select: never 0 * KL, an infinite
// KL there must not turn into NaN) and add (#floored) * free_bits once per row.
// Backward (the reference's torch.where):
//   dX[b, j] = free_bits_select(weight[j], grad[b] * dKL[b, j]/dX, 0)
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "terms.h"

namespace fastelbo {
namespace cpu {
namespace {

// The [1, Dz] weights of the dimensions, free_bits_weight: 1 kept, 0 floored, NaN
// (exact in every dtype); `floored` counts the zeros.
template <class T, class A>
at::Tensor dim_weights(const A* kl_dims, int64_t stride, int64_t dz, double free_bits, const at::Tensor& like,
                       int64_t& floored) {
  auto weights = at::empty({1, dz}, like.options().memory_format(at::MemoryFormat::Contiguous));
  T* pw = weights.data_ptr<T>();
  floored = 0;
  for (int64_t j = 0; j < dz; ++j) {
    const double w = free_bits_weight(static_cast<double>(kl_dims[j * stride]), free_bits);
    pw[j] = static_cast<T>(w);
    floored += w == 0.0 ? 1 : 0;
  }
  return weights;
}

template <class Vec>
inline Vec kept(const Vec& weight, const Vec& v) {
  return free_bits_select(weight, v, Vec(typename Vec::value_type(0)));
}

// The KL of one row weighted per dimension (floored ones 0), and its gradient.
template <class T>
struct FreeBitsTerm {
  using A = acc_t<T>;
  using Vec = at::vec::Vectorized<A>;
  const KLTerm<T>& kl;
  Operand<T> weights;

  // Per-element KL of row i added into sum[0, Dz) (pass 1).
  void add_elements(int64_t i, A* sum) const {
    if (!kl.has_prior) {
      map_row_add<T, 2, 1>({kl.mu, kl.lv}, i, kl.cols, A(1), {nullptr}, {sum},
                           [](const Vec&, const std::array<Vec, 2>& v, std::array<Vec, 1>& o) {
                             o[0] = kl_std(v[0], v[1]);
                           });
      return;
    }
    map_row_add<T, 4, 1>({kl.mu, kl.lv, kl.pmu, kl.plv}, i, kl.cols, A(1), {nullptr}, {sum},
                         [](const Vec&, const std::array<Vec, 4>& v, std::array<Vec, 1>& o) {
                           o[0] = kl_normal(v[0], v[1], v[2], v[3]);
                         });
  }

  // sum_j kept(weight_j, KL[i, j]) (pass 2; the floor of floored dimensions added by the caller).
  double forward(int64_t i) const {
    if (!kl.has_prior)
      return reduce_row<T, 3>({kl.mu, kl.lv, weights}, i, kl.cols,
                              [](const std::array<Vec, 3>& v) { return kept(v[2], kl_std(v[0], v[1])); });
    return reduce_row<T, 5>({kl.mu, kl.lv, kl.pmu, kl.plv, weights}, i, kl.cols, [](const std::array<Vec, 5>& v) {
      return kept(v[4], kl_normal(v[0], v[1], v[2], v[3]));
    });
  }

  // out = {dmu, dlv, dpmu, dplv} rows (nullptr: not wanted).
  void backward(int64_t i, A g, const std::array<T*, 4>& out) const {
    if (!kl.has_prior) {
      map_row<T, 3, 2>({kl.mu, kl.lv, weights}, i, kl.cols, g, {out[0], out[1]},
                       [](const Vec& gv, const std::array<Vec, 3>& v, std::array<Vec, 2>& o) {
                         kl_std_grad(gv, v[0], v[1], o[0], o[1]);
                         for (auto& t : o) t = kept(v[2], t);
                       });
      return;
    }
    map_row<T, 5, 4>({kl.mu, kl.lv, kl.pmu, kl.plv, weights}, i, kl.cols, g, out,
                     [](const Vec& gv, const std::array<Vec, 5>& v, std::array<Vec, 4>& o) {
                       kl_normal_grad(gv, v[0], v[1], v[2], v[3], o[0], o[1], o[2], o[3]);
                       for (auto& t : o) t = kept(v[4], t);
                     });
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> free_bits_kl_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                    const std::optional<at::Tensor>& prior_mu,
                                                    const std::optional<at::Tensor>& prior_logvar, double free_bits) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  check_free_bits(free_bits);
  check_cpu(mu, "mu");
  const int64_t B = mu.size(0), Dz = mu.size(1);
  auto kl = row_result(mu);
  auto kl_dims = at::empty({Dz}, mu.options().dtype(acc_dtype(mu.scalar_type()))
                                     .memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastelbo_free_bits_kl_cpu", [&] {
    using A = acc_t<scalar_t>;
    const KLTerm<scalar_t> div(mu, logvar, prior_mu, prior_logvar);
    // Pass 1: kl_dims = column means of KL[b, j] (NaN for B = 0, as torch.mean).
    const RowBlocks blocks = row_blocks(B, row_grain(Dz));
    RowBuffers<A> parts(true, blocks.parts, Dz);
    FreeBitsTerm<scalar_t> term{div, {}};
    parallel_blocks(blocks, [&](int64_t p, int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) term.add_elements(i, parts.row(p));
    });
    A* pd = kl_dims.data_ptr<A>();
    sum_blocks<A>(parts, blocks.parts, pd);
    for (int64_t j = 0; j < Dz; ++j) pd[j] = pd[j] / static_cast<A>(B);
    // Pass 2: the rows.
    int64_t floored = 0;
    const at::Tensor weights = dim_weights<scalar_t>(pd, 1, Dz, free_bits, mu, floored);
    term.weights = operand<scalar_t>(weights);
    const double floor = static_cast<double>(floored) * free_bits;
    scalar_t* out = kl.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(Dz), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) out[i] = static_cast<scalar_t>(term.forward(i) + floor);
    });
  });
  return {kl, kl_dims};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> free_bits_kl_backward_cpu(
    const at::Tensor& grad, const at::Tensor& kl_dims, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar, double free_bits,
    std::array<bool, 4> output_mask) {
  check_kl_args(mu, logvar, prior_mu, prior_logvar);
  check_row_grad(grad, "grad", mu);
  check_free_bits_backward(kl_dims, mu, free_bits);
  check_cpu(mu, "mu");
  return latent_backward(grad, mu, prior_mu.has_value(), output_mask, [&](auto tag, auto run) {
    using T = decltype(tag);
    const KLTerm<T> div(mu, logvar, prior_mu, prior_logvar);
    int64_t floored = 0;
    const at::Tensor weights =
        dim_weights<T>(kl_dims.const_data_ptr<acc_t<T>>(), kl_dims.stride(0), mu.size(1), free_bits, mu, floored);
    run(FreeBitsTerm<T>{div, operand<T>(weights)});
  });
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("free_bits_kl", &free_bits_kl_cpu);
  m.impl("free_bits_kl_backward", &free_bits_kl_backward_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
