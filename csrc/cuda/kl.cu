// Gaussian KL to N(0, I) or to a diagonal Gaussian prior on the GPU
// (DESIGN §1 rows 2-3): forward = reduce_kernel over KLStdTerm / KLNormalTerm,
// backward = map_kernel over KLStdGrad / KLNormalGrad.
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
    if (prior_mu.data) {
      const KLNormalTerm<T> term{cols, mat<T>(mu), mat<T>(logvar), mat<T>(prior_mu), mat<T>(prior_logvar)};
      launch_reduce<T>(term, NoTerm<T>{}, epi, sh, workspace, stream);
    } else {
      const KLStdTerm<T> term{cols, mat<T>(mu), mat<T>(logvar)};
      launch_reduce<T>(term, NoTerm<T>{}, epi, sh, workspace, stream);
    }
  });
}

void gaussian_kl_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mu, MatArg logvar,
                          MatArg prior_mu, MatArg prior_logvar, void* dmu, void* dlogvar, void* dprior_mu,
                          void* dprior_logvar, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (prior_mu.data) {
      const KLNormalGrad<T> job{rows,          cols,          row_grad<T>(grad),       mat<T>(mu),
                                mat<T>(logvar), mat<T>(prior_mu), mat<T>(prior_logvar), out<T>(dmu, cols),
                                out<T>(dlogvar, cols), out<T>(dprior_mu, cols), out<T>(dprior_logvar, cols)};
      launch_map(job, kChunkElems<T>, num_sms, stream);
    } else {
      const KLStdGrad<T> job{rows, cols, row_grad<T>(grad), mat<T>(mu), mat<T>(logvar), out<T>(dmu, cols),
                             out<T>(dlogvar, cols)};
      launch_map(job, kChunkElems<T>, num_sms, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastelbo
