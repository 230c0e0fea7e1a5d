// Gaussian KL to N(0, I) or to a diagonal Gaussian prior on the GPU
// (docs/design.md §1): forward = reduce_kernel over KLTerm,
// backward = map_kernel over KLGrad (terms.h).
#include "terms.h"

namespace fastelbo {
namespace cuda {

size_t row_reduce_workspace_bytes(DType dtype, int64_t rows, int64_t cols_a, int64_t cols_b, int num_sms) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bytes = reduce_workspace_bytes<T>(reduce_shape(rows, cols_a, cols_b, kChunkElems<T>, num_sms));
  });
  return bytes;
}

void gaussian_kl_forward(DType dtype, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg prior_mu,
                         MatArg prior_logvar, void* kl, void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ReduceShape sh = reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms);
    const StoreSum<T> epi{static_cast<T*>(kl)};
    with_prior<T>(mu, logvar, prior_mu, prior_logvar, [&](const auto& lat) {
      const KLTerm<T, kPriorOf<decltype(lat)>> term{cols, lat};
      launch_reduce<T>(term, NoTerm<T>{}, epi, sh, workspace, stream);
    });
  });
}

void gaussian_kl_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mu, MatArg logvar,
                          MatArg prior_mu, MatArg prior_logvar, void* dmu, void* dlogvar, void* dprior_mu,
                          void* dprior_logvar, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_prior<T>(mu, logvar, prior_mu, prior_logvar, [&](const auto& lat) {
      const KLGrad<T, kPriorOf<decltype(lat)>> job{
          rows, cols, row_grad<T>(grad), lat, out<T>(dmu, cols), out<T>(dlogvar, cols), out<T>(dprior_mu, cols),
          out<T>(dprior_logvar, cols)};
      launch_map(job, kChunkElems<T>, num_sms, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastelbo
