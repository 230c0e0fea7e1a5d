// KL with free bits on the GPU (Kingma et al. 2016), q = N(mu, e^lv), p = N(0, I)
// or N(pmu, e^plv), KL[b, j] the per-element KL of gaussian_kl:
//   kl_dims[j] = (1/B) sum_b KL[b, j]                         (NaN for B = 0, as torch.mean)
//   kl[b]      = sum_j (kl_dims[j] < free_bits ? free_bits : KL[b, j])
//   backward   dX[b, j] = (kl_dims[j] < free_bits ? 0 : g[b] * dKL[b, j]/dX)
// (a dimension of NaN kl_dims: NaN in every row, value and gradient; terms.h DimWeights)
// Forward: two passes over [B, Dz]: col_map_kernel over KLColumnJob (per-block
// column partials, then the finalize pass writes kl_dims), then reduce_kernel
// over FreeBitsTerm (the rows, reading kl_dims). Backward: map_kernel over
// FreeBitsGrad. The workspace serves both passes in turn (same stream).
#include "terms.h"

namespace fastelbo {
namespace cuda {
namespace {

template <class T, bool kPrior>
void forward(const Latents<T, kPrior>& lat, int64_t rows, int64_t cols, double free_bits, void* kl_out,
             void* kl_dims, void* workspace, int num_sms, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int N = kChunkElems<T>;
  const KLColumnJob<T, kPrior> col{rows, cols, lat};
  launch_col_map<T>(col, col_shape(rows, cols, N, num_sms), workspace, static_cast<A*>(kl_dims), 1,
                    static_cast<A>(rows), stream);
  if (rows == 0) return;
  const DimWeights<T> weight{static_cast<const A*>(kl_dims), 1, static_cast<A>(free_bits)};
  const FreeBitsTerm<T, kPrior> term{cols, lat, weight};
  launch_reduce<T>(term, NoTerm<T>{}, StoreSum<T>{static_cast<T*>(kl_out)}, reduce_shape(rows, cols, 0, N, num_sms),
                   workspace, stream);
}

}  // namespace

size_t free_bits_kl_workspace_bytes(DType dtype, int64_t rows, int64_t cols, int num_sms) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t a = col_workspace_bytes<T>(col_shape(rows, cols, kChunkElems<T>, num_sms));
    const size_t b = reduce_workspace_bytes<T>(reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms));
    bytes = a > b ? a : b;
  });
  return bytes;
}

void free_bits_kl_forward(DType dtype, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg prior_mu,
                          MatArg prior_logvar, double free_bits, void* kl, void* kl_dims, void* workspace,
                          int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_prior<T>(mu, logvar, prior_mu, prior_logvar, [&](const auto& lat) {
      forward(lat, rows, cols, free_bits, kl, kl_dims, workspace, num_sms, stream);
    });
  });
}

void free_bits_kl_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, const void* kl_dims,
                           int64_t kl_dims_stride, MatArg mu, MatArg logvar, MatArg prior_mu, MatArg prior_logvar,
                           double free_bits, void* dmu, void* dlogvar, void* dprior_mu, void* dprior_logvar,
                           int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const DimWeights<T> weight{static_cast<const A*>(kl_dims), kl_dims_stride, static_cast<A>(free_bits)};
    with_prior<T>(mu, logvar, prior_mu, prior_logvar, [&](const auto& lat) {
      const FreeBitsGrad<T, kPriorOf<decltype(lat)>> job{
          rows, cols, row_grad<T>(grad), lat, out<T>(dmu, cols), out<T>(dlogvar, cols), out<T>(dprior_mu, cols),
          out<T>(dprior_logvar, cols), weight};
      launch_map(job, kChunkElems<T>, num_sms, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastelbo
