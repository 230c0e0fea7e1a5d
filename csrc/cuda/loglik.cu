// Bernoulli and Gaussian log-likelihood on the GPU (DESIGN §1 rows 4-5):
// forward = reduce_kernel over BernoulliTerm / GaussianTerm, backward =
// map_kernel over BernoulliGrad / GaussianGrad.
#include "terms.h"

namespace fastelbo {
namespace cuda {

void bernoulli_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg logits, MatArg x, void* out_,
                                int* x_out_of_range, void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ReduceShape sh = reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms);
    const BernoulliTerm<T> term{cols, mat<T>(logits), mat<T>(x), x_out_of_range};
    launch_reduce<T>(term, NoTerm<T>{}, StoreSum<T>{static_cast<T*>(out_)}, sh, workspace, stream);
  });
}

void bernoulli_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg logits, MatArg x,
                                 void* dlogits, void* dx, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BernoulliGrad<T> job{rows, cols, row_grad<T>(grad), mat<T>(logits), mat<T>(x), out<T>(dlogits, cols),
                               out<T>(dx, cols)};
    launch_map(job, kChunkElems<T>, num_sms, stream);
  });
}

void gaussian_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg mean, MatArg x, MatArg logvar,
                               void* out_, void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ReduceShape sh = reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms);
    const GaussianTerm<T> term{cols, mat<T>(mean), mat<T>(x), mat<T>(logvar)};
    launch_reduce<T>(term, NoTerm<T>{}, StoreSum<T>{static_cast<T*>(out_)}, sh, workspace, stream);
  });
}

void gaussian_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mean, MatArg x,
                                MatArg logvar, void* dmean, void* dx, void* dlogvar, int num_sms,
                                cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const GaussianGrad<T> job{rows, cols, row_grad<T>(grad), mat<T>(mean), mat<T>(x), mat<T>(logvar),
                              out<T>(dmean, cols), out<T>(dx, cols), out<T>(dlogvar, cols)};
    launch_map(job, kChunkElems<T>, num_sms, stream);
  });
}

}  // namespace cuda
}  // namespace fastelbo
