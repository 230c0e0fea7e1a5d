// The importance-weighted bound on the GPU (docs/design.md §1; Burda et al. 2016),
// K samples z [K, B, Dz] and their decodings recon [K, B, Dx]:
//   log w[k, b] = log p(x_b | recon_kb) + sum_j (log p(z_kbj) - log q(z_kbj | x_b))
//   bound[b]    = m + log sum_k e^(log w[k, b] - m) - log K,  m = max_k log w[k, b]
// Forward: one reduce_kernel launch over the K * B logical rows (k, b) (both
// terms of a row: the likelihood's [recon, x] row and the latent [z, mu, logvar]
// row; x, mu, logvar of row b shared by the samples), whose epilogue writes
// log_weights [K, B] (accumulation type), then logmeanexp_kernel, one thread
// per b reading its K log-weights (fastelbo_math.h log_mean_exp: stable for
// log-weights of +-1e4, m = +-inf gives m, NaN propagates, as torch.logsumexp).
// Backward, with c[k, b] = dL/dlog w[k, b] (the autograd glue forms it from the
// saved log-weights: softmax_k * grad_bound):
//   drecon[k, b] = c * dll/drecon,  dx[b] = sum_k c * dll/dx,  d obs_logvar summed as the ELBO's
//   dz[k, b] = c * d(log p - log q)/dz,  dmu, dlogvar, dprior_* [b] = sum_k c * d(log p - log q)/d.
// one map_kernel launch: the likelihood job and the latent job (LogPQGrad), each
// over [B, D] chunks looping over the samples (sums over k in registers).
#include "terms.h"

namespace fastelbo {
namespace cuda {
namespace {

// Term of logical row r = k * B + b of a per-sample term (BernoulliTerm,
// GaussianTerm, LogPQTerm: sum(b, j, n, k, k + 1)).
template <class T, class Term>
struct SampleRow {
  int64_t cols;
  Term term;
  int64_t rows;  // B
  bool narrow;   // K * B < 2^32: a 32-bit division
  FASTELBO_DEVICE acc_t<T> operator()(int64_t r, int64_t j, int n) const {
    int64_t k, b;
    if (narrow) {
      const uint32_t q = static_cast<uint32_t>(r) / static_cast<uint32_t>(rows);
      k = q;
      b = r - static_cast<int64_t>(q) * rows;
    } else {
      k = r / rows;
      b = r - k * rows;
    }
    return term.sum(b, j, n, k, k + 1);
  }
};

template <class T>
struct LogWeightEpilogue {
  acc_t<T>* log_weights;
  FASTELBO_DEVICE void operator()(int64_t r, acc_t<T> ll, acc_t<T> lpq) const { log_weights[r] = ll + lpq; }
};

template <class T>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(256) logmeanexp_kernel(const acc_t<T>* lw, int64_t samples, int64_t rows,
                                                            T* bound) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < rows; b += stride)
    bound[b] = from_acc<T>(log_mean_exp<acc_t<T>>(lw + b, samples, rows));
}

template <class T, class LikTerm>
void forward_latent(const LikTerm& lik, const IwaeArgs& a, MatArg z, void* bound, void* log_weights,
                    void* workspace, int num_sms, cudaStream_t stream) {
  const int64_t rows = a.samples * a.rows;
  const bool narrow = rows < (int64_t(1) << 32);
  const ReduceShape sh = reduce_shape(rows, a.cols_x, a.cols_z, kChunkElems<T>, num_sms);
  const LogWeightEpilogue<T> epi{static_cast<acc_t<T>*>(log_weights)};
  const SampleRow<T, LikTerm> ta{a.cols_x, lik, a.rows, narrow};
  with_prior<T>(a.mu, a.logvar, a.prior_mu, a.prior_logvar, [&](const auto& lat) {
    using LogPQ = LogPQTerm<T, kPriorOf<decltype(lat)>>;
    launch_reduce<T>(ta, SampleRow<T, LogPQ>{a.cols_z, LogPQ{a.cols_z, mat<T>(z), lat}, a.rows, narrow}, epi, sh,
                     workspace, stream);
  });
  const int64_t blocks = ceil_div(a.rows, 256);
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  const auto kernel = &logmeanexp_kernel<T>;
  FASTELBO_LAUNCH(kernel, grid, 256, 0, stream, static_cast<const acc_t<T>*>(log_weights), a.samples, a.rows,
                  static_cast<T*>(bound));
}

// The likelihood job with the latent job: one map_kernel launch (or, for a summed
// [1, Dx] obs_logvar gradient, col_map_kernel for the likelihood job first).
template <class T, class LikJob>
void backward_latent(const LikJob& lik, bool sum_rows, const IwaeArgs& a, MatArg z, const WeightGrad<T>& g,
                     void* dz, void* dmu, void* dlogvar, void* dobs_logvar, void* dprior_mu, void* dprior_logvar,
                     void* workspace, int num_sms, cudaStream_t stream) {
  constexpr int N = kChunkElems<T>;
  const int64_t c = a.cols_z;
  auto run = [&](const auto& latent) {
    if (sum_rows) {
      launch_col_map<T>(lik, col_shape(a.rows, a.cols_x, N, num_sms), workspace, static_cast<T*>(dobs_logvar), 1,
                        acc_t<T>(1), stream);
      launch_map(NoJob{}, N, num_sms, stream, latent);
    } else {
      launch_map(lik, N, num_sms, stream, latent);
    }
  };
  with_prior<T>(a.mu, a.logvar, a.prior_mu, a.prior_logvar, [&](const auto& lat) {
    run(LogPQGrad<T, kPriorOf<decltype(lat)>>{a.rows, c, a.samples, g, mat<T>(z), lat, out<T>(dz, c), out<T>(dmu, c),
                                              out<T>(dlogvar, c), out<T>(dprior_mu, c), out<T>(dprior_logvar, c)});
  });
}

}  // namespace

void iwae_forward(DType dtype, const IwaeArgs& a, MatArg z, void* bound, void* log_weights, void* workspace,
                  int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_likelihood<T>(a, [&](const auto& lik) {
      forward_latent<T>(lik, a, z, bound, log_weights, workspace, num_sms, stream);
    });
  });
}

void iwae_backward(DType dtype, const IwaeArgs& a, MatArg z, MatArg grad_log_weights, void* dx, void* drecon,
                   void* dz, void* dmu, void* dlogvar, void* dobs_logvar, void* dprior_mu, void* dprior_logvar,
                   void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const WeightGrad<T> g{static_cast<const acc_t<T>*>(grad_log_weights.data), grad_log_weights.s0,
                          grad_log_weights.s1};
    with_likelihood_grad<T>(a, g, dx, drecon, dobs_logvar, [&](const auto& lik, bool sum_rows) {
      backward_latent<T>(lik, sum_rows, a, z, g, dz, dmu, dlogvar, dobs_logvar, dprior_mu, dprior_logvar, workspace,
                         num_sms, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastelbo
