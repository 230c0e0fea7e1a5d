// launchers.h: the host entry points of the CUDA kernels in csrc/cuda/*.cu,
// on raw pointers, sizes and strides (elements; 0 for broadcast operands),
// enqueued on the given stream. Plain C++: no torch, no CUDA headers, so the
// binding (binding.cpp) and a CPU emulation of the kernels can both include it.
//
// Conventions, as the CPU kernels (csrc/cpu) and the op schemas (fastelbo/_ops.py):
// inputs are [rows, cols] of one dtype, any strides, or [samples, rows, cols]
// (MatArg::sk the sample stride); per-row results [rows] and gradients of the
// inputs' shapes are contiguous outputs the caller allocated; a null
// output pointer is a gradient nobody asked for; a null optional input (eps,
// priors, upstream gradients) is absent; the Philox seed is a pointer to one
// int64 in device memory, read by the kernels (no host sync).
// Every launcher returns after enqueueing; errors surface through
// cudaGetLastError() as for any launch.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace fastelbo {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };
enum class LikelihoodKind : int { kBernoulli = 0, kGaussian = 1 };

// A [rows, cols] input, or [samples, rows, cols] with sk the stride between
// samples (0: one [rows, cols] shared by the samples); data == nullptr means
// absent. A [1, cols] operand broadcast over the rows has s0 = 0.
struct MatArg {
  const void* data = nullptr;
  int64_t s0 = 0, s1 = 0, sk = 0;
};

// A [rows] input (an upstream gradient): data == nullptr means absent (reads 0).
struct VecArg {
  const void* data = nullptr;
  int64_t s0 = 0;
};

// The per-row reductions may cut very long rows into slices and need a float
// workspace for them: ask for its size, allocate it on the stream's device, pass it.
// num_sms: the device's multiprocessor count (sizes the grid).
size_t row_reduce_workspace_bytes(DType dtype, int64_t rows, int64_t cols_a, int64_t cols_b, int num_sms);

// Sums over the rows of a [rows, cols] job's column terms (the gradient of a
// [1, cols] observation log-variance, free bits' kl_dims) go through per-block
// partials: a float (double for float64) workspace of a few rows x cols.
size_t column_sum_workspace_bytes(DType dtype, int64_t rows, int64_t cols, int num_sms);

// --- reparameterized sample (rsample.cu) -----------------------------------
// z[k] = mu + exp(lv / 2) * eps[k], k < samples (>= 1; z contiguous [samples,
// rows, cols]); eps from the given tensor (sk: its sample stride), else
// Philox(seed) of logical element (k * rows + i) * cols + j.
void rsample_forward(DType dtype, int64_t samples, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg eps,
                     const int64_t* seed, void* z, int num_sms, cudaStream_t stream);

// dlv = sum_k g[k] * exp(lv / 2) * eps[k] / 2 ([rows, cols]), deps[k] = g[k] * exp(lv / 2)
// ([samples, rows, cols]); null outputs skipped.
void rsample_backward(DType dtype, int64_t samples, int64_t rows, int64_t cols, MatArg grad_z, MatArg logvar,
                      MatArg eps, const int64_t* seed, void* dlogvar, void* deps, int num_sms, cudaStream_t stream);

// Elements [0, n) of the noise: uniforms (normal == false) or normals, float or double.
void philox_noise(DType dtype, const int64_t* seed, int64_t n, bool normal, void* out, int num_sms,
                  cudaStream_t stream);

// --- KL(N(mu, e^lv) || N(0, I) or N(pmu, e^plv)) (kl.cu) -------------------
void gaussian_kl_forward(DType dtype, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg prior_mu,
                         MatArg prior_logvar, void* kl, void* workspace, int num_sms, cudaStream_t stream);

void gaussian_kl_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mu, MatArg logvar,
                          MatArg prior_mu, MatArg prior_logvar, void* dmu, void* dlogvar, void* dprior_mu,
                          void* dprior_logvar, int num_sms, cudaStream_t stream);

// --- log-likelihoods (loglik.cu) --------------------------------------------
// x_out_of_range: null, or one device int32 (zeroed by the caller) set to 1 when
// some x lies outside [0, 1] (validate_x; NaN passes).
void bernoulli_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg logits, MatArg x, void* out,
                                int* x_out_of_range, void* workspace, int num_sms, cudaStream_t stream);

void bernoulli_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg logits, MatArg x,
                                 void* dlogits, void* dx, int num_sms, cudaStream_t stream);

// validate_x without a host read (CUDA only; the emulation reads its host flag):
// queues one thread after the forward on `stream` that fails a device-side
// assert naming FASTELBO_X_RANGE_MESSAGE when *x_out_of_range is set. The error surfaces
// at the next synchronizing call ("device-side assert triggered", the message
// on stderr) and leaves the CUDA context unusable, as any device assert does;
// the launch is capturable in a CUDA graph.
void assert_x_in_unit_interval(const int* x_out_of_range, cudaStream_t stream);

// The text of that error, the same as csrc/checks.h check_x_in_unit_interval
// (tests/test_x_range_async.py compares them).
// A macro: a string literal that device code can use.
#define FASTELBO_X_RANGE_MESSAGE \
  "fastelbo: x must lie in [0, 1] for the Bernoulli likelihood (pass validate_args=False to skip this check)"

void gaussian_log_prob_forward(DType dtype, int64_t rows, int64_t cols, MatArg mean, MatArg x, MatArg logvar,
                               void* out, void* workspace, int num_sms, cudaStream_t stream);

// logvar_shared: logvar is [1, cols] (s0 = 0) and dlogvar [cols] is summed over the
// rows, through workspace (column_sum_workspace_bytes(dtype, rows, cols, num_sms)).
void gaussian_log_prob_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, MatArg mean, MatArg x,
                                MatArg logvar, bool logvar_shared, void* dmean, void* dx, void* dlogvar,
                                void* workspace, int num_sms, cudaStream_t stream);

// --- fused ELBO (elbo.cu) ------------------------------------------------------
// x: [rows, cols_x]; recon: [samples, rows, cols_x] (samples = 1: [rows, cols_x]);
// obs_logvar: [rows, cols_x] or [1, cols_x] (obs_logvar_shared, s0 = 0);
// mu, logvar, priors: [rows, cols_z]. log p(x | z) is the mean over the samples.
// Forward workspace: row_reduce_workspace_bytes(dtype, rows, cols_x, cols_z, num_sms);
// backward workspace (obs_logvar_shared): column_sum_workspace_bytes(dtype, rows, cols_x, num_sms).
struct ElboArgs {
  int64_t samples = 1, rows = 0, cols_x = 0, cols_z = 0;
  LikelihoodKind likelihood = LikelihoodKind::kBernoulli;
  double beta = 1.0;
  MatArg x, recon, obs_logvar, mu, logvar, prior_mu, prior_logvar;
  bool obs_logvar_shared = false;
  int* x_out_of_range = nullptr;  // forward, Bernoulli: as bernoulli_log_prob_forward
};

void elbo_forward(DType dtype, const ElboArgs& args, void* elbo, void* loglik, void* kl, void* workspace,
                  int num_sms, cudaStream_t stream);

// Upstream gradients (absent = 0) fold into g_ll = g_elbo + g_loglik and
// g_kl = g_kl - beta * g_elbo; outputs in input order, null = not wanted.
void elbo_backward(DType dtype, const ElboArgs& args, VecArg grad_elbo, VecArg grad_loglik, VecArg grad_kl,
                   void* dx, void* drecon, void* dmu, void* dlogvar, void* dobs_logvar, void* dprior_mu,
                   void* dprior_logvar, void* workspace, int num_sms, cudaStream_t stream);

// --- importance-weighted bound (iwae.cu) -----------------------------------------
// x [rows, cols_x], recon [samples, rows, cols_x], z [samples, rows, cols_z],
// mu, logvar, priors [rows, cols_z], obs_logvar as ElboArgs (beta unused).
//   log w[k, i] = ll(recon[k, i], x[i]) + sum_j (log p(z[k, i, j]) - log q(z[k, i, j]))
//   bound[i] = logsumexp_k log w[k, i] - log K
// log_weights: contiguous [samples, rows] in the accumulation type; bound [rows] in dtype.
// Forward workspace: row_reduce_workspace_bytes(dtype, samples * rows, cols_x, cols_z, num_sms).
using IwaeArgs = ElboArgs;

void iwae_forward(DType dtype, const IwaeArgs& args, MatArg z, void* bound, void* log_weights, void* workspace,
                  int num_sms, cudaStream_t stream);

// grad_log_weights: [samples, rows] accumulation type (s0: sample stride, s1: row stride);
// outputs in input order (x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar),
// null = not wanted; workspace as elbo_backward.
void iwae_backward(DType dtype, const IwaeArgs& args, MatArg z, MatArg grad_log_weights, void* dx, void* drecon,
                   void* dz, void* dmu, void* dlogvar, void* dobs_logvar, void* dprior_mu, void* dprior_logvar,
                   void* workspace, int num_sms, cudaStream_t stream);

// --- free bits (free_bits.cu) ------------------------------------------------------
// kl_dims[j] = mean_i KL[i, j] (contiguous [cols], accumulation type; NaN for rows = 0),
// kl[i] = sum_j (kl_dims[j] < free_bits ? free_bits : KL[i, j]) ([rows], dtype; a NaN kl_dims[j]
// makes dimension j NaN in every row).
size_t free_bits_kl_workspace_bytes(DType dtype, int64_t rows, int64_t cols, int num_sms);

void free_bits_kl_forward(DType dtype, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg prior_mu,
                          MatArg prior_logvar, double free_bits, void* kl, void* kl_dims, void* workspace,
                          int num_sms, cudaStream_t stream);

// kl_dims: [cols] accumulation type, stride kl_dims_stride. dX = (kl_dims < free_bits ? 0 : grad * dKL/dX),
// NaN for a NaN kl_dims.
void free_bits_kl_backward(DType dtype, int64_t rows, int64_t cols, VecArg grad, const void* kl_dims,
                           int64_t kl_dims_stride, MatArg mu, MatArg logvar, MatArg prior_mu, MatArg prior_logvar,
                           double free_bits, void* dmu, void* dlogvar, void* dprior_mu, void* dprior_logvar,
                           int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastelbo
