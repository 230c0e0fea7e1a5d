// Bernoulli and Gaussian log-likelihood on the GPU (docs/design.md §1):
// forward = reduce_kernel over BernoulliTerm / GaussianTerm, backward =
// map_kernel over BernoulliGrad / GaussianGrad; a [1, Dx] log-variance (one per
// feature) gets its gradient summed over the rows by col_map_kernel instead
// (per-block partials, then the finalize pass: no [B, Dx] temporary).
#include "terms.h"

namespace fastelbo {
namespace cuda {

size_t column_sum_workspace_bytes(DType dtype, int64_t rows, int64_t cols, int num_sms) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    bytes = col_workspace_bytes<T>(col_shape(rows, cols, kChunkElems<T>, num_sms));
  });
  return bytes;
}

void bernoulli_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg logits, MatArg x, void* out_,
                                int* x_out_of_range, void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ReduceShape sh = reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms);
    const BernoulliTerm<T> term{cols, 1, mat<T>(logits), mat<T>(x), x_out_of_range};
    launch_reduce<T>(term, NoTerm<T>{}, StoreSum<T>{static_cast<T*>(out_)}, sh, workspace, stream);
  });
}

void bernoulli_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg logits, MatArg x,
                                 void* dlogits, void* dx, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BernoulliGrad<T, MeanGrad<T>> job{rows,       cols,      1, mean_grad<T>(grad), mat<T>(logits),
                                            mat<T>(x), out<T>(dlogits, cols), out<T>(dx, cols)};
    launch_map(job, kChunkElems<T>, num_sms, stream);
  });
}

// One thread: a device-side assert when the flag is set (device.h assert_fail).
FASTELBO_GLOBAL void x_range_assert_kernel(const int* x_out_of_range) {
  if (*x_out_of_range != 0) assert_fail(FASTELBO_X_RANGE_MESSAGE, __FILE__, __LINE__, "x_range_assert_kernel");
}

void assert_x_in_unit_interval(const int* x_out_of_range, cudaStream_t stream) {
  FASTELBO_LAUNCH(x_range_assert_kernel, 1, 1, 0, stream, x_out_of_range);
}

void gaussian_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg mean, MatArg x, MatArg logvar,
                               void* out_, void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ReduceShape sh = reduce_shape(rows, cols, 0, kChunkElems<T>, num_sms);
    const GaussianTerm<T> term{cols, 1, mat<T>(mean), mat<T>(x), mat<T>(logvar)};
    launch_reduce<T>(term, NoTerm<T>{}, StoreSum<T>{static_cast<T*>(out_)}, sh, workspace, stream);
  });
}

void gaussian_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mean, MatArg x,
                                MatArg logvar, bool logvar_shared, void* dmean, void* dx, void* dlogvar,
                                void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int N = kChunkElems<T>;
    const bool sum_rows = logvar_shared && dlogvar;
    const GaussianGrad<T, MeanGrad<T>> job{rows,         cols,
                                           1,            mean_grad<T>(grad),
                                           mat<T>(mean), mat<T>(x),
                                           mat<T>(logvar), out<T>(dmean, cols),
                                           out<T>(dx, cols), out<T>(sum_rows ? nullptr : dlogvar, cols)};
    if (sum_rows) {
      launch_col_map<T>(job, col_shape(rows, cols, N, num_sms), workspace, static_cast<T*>(dlogvar), 1,
                        acc_t<T>(1), stream);
    } else {
      launch_map(job, N, num_sms, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastelbo
