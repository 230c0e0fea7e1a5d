// The fused ELBO on the GPU (docs/design.md §1), recon [B, Dx] or K samples [K, B, Dx].
// Forward: one reduce_kernel launch; the group of threads that owns a row sums
// its [recon, x] rows (log p(x|z), the K samples of a chunk against one read of
// x) and its [mu, logvar] row (KL) and writes
//   loglik = (1/K) sum_k ll_k,  elbo = loglik - beta * KL,  KL.
// Backward: one map_kernel launch running both gradient jobs, the likelihood's
// over [B, Dx] (looping over the samples: drecon per sample, dx and d obs_logvar
// summed) and the KL's over [B, Dz], with the upstream gradients of
// (elbo, loglik, kl) folded per row as on the CPU:
//   g_ll = (g_elbo + g_loglik) / K,   g_kl = g_kl - beta * g_elbo.
// A [1, Dx] obs_logvar (one per feature) has its gradient summed over the rows
// too: the likelihood job then runs in col_map_kernel (per-block partials and a
// finalize pass), the KL job in its own map_kernel launch.
#include "terms.h"

namespace fastelbo {
namespace cuda {
namespace {

template <class T>
struct ElboEpilogue {
  T *elbo, *loglik, *kl;
  double beta;
  acc_t<T> samples;
  // In double, as the CPU kernel (then rounded once to T's accumulation type).
  FASTELBO_DEVICE void operator()(int64_t i, acc_t<T> ll_sum, acc_t<T> k) const {
    const acc_t<T> ll = ll_sum / samples;
    const double e = static_cast<double>(ll) - beta * static_cast<double>(k);
    elbo[i] = from_acc<T>(static_cast<acc_t<T>>(e));
    loglik[i] = from_acc<T>(ll);
    kl[i] = from_acc<T>(k);
  }
};

template <class T, class LikTerm, class KLTermT>
void forward(const LikTerm& lik, const KLTermT& kl, const ElboArgs& a, void* elbo, void* loglik, void* kl_out,
             void* workspace, int num_sms, cudaStream_t stream) {
  const ReduceShape sh = reduce_shape(a.rows, a.cols_x, a.cols_z, kChunkElems<T>, num_sms);
  const ElboEpilogue<T> epi{static_cast<T*>(elbo), static_cast<T*>(loglik), static_cast<T*>(kl_out), a.beta,
                            static_cast<acc_t<T>>(a.samples)};
  launch_reduce<T>(lik, kl, epi, sh, workspace, stream);
}

template <class T, class LikTerm>
void forward_kl(const LikTerm& lik, const ElboArgs& a, void* elbo, void* loglik, void* kl, void* workspace,
                int num_sms, cudaStream_t stream) {
  with_prior<T>(a.mu, a.logvar, a.prior_mu, a.prior_logvar, [&](const auto& lat) {
    const KLTerm<T, kPriorOf<decltype(lat)>> term{a.cols_z, lat};
    forward<T>(lik, term, a, elbo, loglik, kl, workspace, num_sms, stream);
  });
}

// The likelihood job (lik) and the KL job in one map_kernel launch.
template <class T, class LikJob>
void backward_kl(const LikJob& lik, const ElboArgs& a, const RowGrad<T>& g_kl, void* dmu, void* dlogvar,
                 void* dprior_mu, void* dprior_logvar, int num_sms, cudaStream_t stream) {
  const int64_t c = a.cols_z;
  with_prior<T>(a.mu, a.logvar, a.prior_mu, a.prior_logvar, [&](const auto& lat) {
    const KLGrad<T, kPriorOf<decltype(lat)>> job{
        a.rows, c, g_kl, lat, out<T>(dmu, c), out<T>(dlogvar, c), out<T>(dprior_mu, c), out<T>(dprior_logvar, c)};
    launch_map(lik, kChunkElems<T>, num_sms, stream, job);
  });
}

// A Gaussian likelihood job whose [1, Dx] obs_logvar gradient is summed over the rows:
// col_map_kernel for it, then the KL job alone.
template <class T, class LikJob>
void backward_kl_shared(const LikJob& lik, const ElboArgs& a, const RowGrad<T>& g_kl, void* dmu, void* dlogvar,
                        void* dprior_mu, void* dprior_logvar, void* dobs_logvar, void* workspace, int num_sms,
                        cudaStream_t stream) {
  launch_col_map<T>(lik, col_shape(a.rows, a.cols_x, kChunkElems<T>, num_sms), workspace,
                    static_cast<T*>(dobs_logvar), 1, acc_t<T>(1), stream);
  backward_kl<T>(NoJob{}, a, g_kl, dmu, dlogvar, dprior_mu, dprior_logvar, num_sms, stream);
}

}  // namespace

void elbo_forward(DType dtype, const ElboArgs& a, void* elbo, void* loglik, void* kl, void* workspace, int num_sms,
                  cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_likelihood<T>(a, [&](const auto& lik) { forward_kl<T>(lik, a, elbo, loglik, kl, workspace, num_sms, stream); });
  });
}

void elbo_backward(DType dtype, const ElboArgs& a, VecArg grad_elbo, VecArg grad_loglik, VecArg grad_kl, void* dx,
                   void* drecon, void* dmu, void* dlogvar, void* dobs_logvar, void* dprior_mu, void* dprior_logvar,
                   void* workspace, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const MeanGrad<T> g_ll{RowGrad<T>{row_vec<T>(grad_elbo), row_vec<T>(grad_loglik), A(0), false},
                           static_cast<A>(1.0 / static_cast<double>(a.samples))};
    const RowGrad<T> g_kl{row_vec<T>(grad_kl), row_vec<T>(grad_elbo), static_cast<A>(a.beta), true};
    with_likelihood_grad<T>(a, g_ll, dx, drecon, dobs_logvar, [&](const auto& lik, bool sum_rows) {
      if constexpr (kHasObsLogvar<std::decay_t<decltype(lik)>>) {
        if (sum_rows) {
          backward_kl_shared<T>(lik, a, g_kl, dmu, dlogvar, dprior_mu, dprior_logvar, dobs_logvar, workspace,
                                num_sms, stream);
          return;
        }
      }
      backward_kl<T>(lik, a, g_kl, dmu, dlogvar, dprior_mu, dprior_logvar, num_sms, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fastelbo
