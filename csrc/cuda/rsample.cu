// Reparameterized sample on the GPU (docs/design.md §1, §3), K >= 1 samples:
//   forward   z[k] = mu + e^(lv/2) * eps[k]
//   backward  dlv = (sum_k g[k] * eps[k]) * e^(lv/2) / 2, deps[k] = g[k] * e^(lv/2)
//             (dmu = sum_k g[k] needs no kernel; the sum before the scale: fastelbo_math.h)
// Both are map_kernel jobs over the [B, Dz] chunks of mu, each looping over the
// samples (mu and lv read once; g * eps summed in registers). eps is the caller's
// tensor or the Philox normals of logical elements (k * B + i) * Dz + j,
// regenerated in the backward (nothing [K, B, Dz] is saved). The seed is read
// from device memory by every thread (cached).
#include "terms.h"

namespace fastelbo {
namespace cuda {
namespace {

template <class T>
FASTELBO_DEVICE void eps_chunk(const Mat<T>& eps, const int64_t* seed, int64_t rows, int64_t cols, int64_t k,
                               int64_t i, int64_t j, int n, acc_t<T> (&e)[kChunkElems<T>]) {
  if (eps.p) {
    load_chunk(eps.sample(k), i, j, n, e);
  } else {
    noise_chunk(static_cast<uint64_t>(*seed), static_cast<uint64_t>((k * rows + i) * cols + j), e);
  }
}

template <class T>
struct RsampleJob {
  int64_t rows, cols, samples;
  Mat<T> mu, lv, eps;
  const int64_t* seed;
  Out<T> z;  // [samples, rows, cols]
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A m[N], l[N], e[N];
    load_chunk(mu, i, j, n, m);
    load_chunk(lv, i, j, n, l);
    for (int64_t k = 0; k < samples; ++k) {
      eps_chunk(eps, seed, rows, cols, k, i, j, n, e);
#pragma unroll
      for (int q = 0; q < N; ++q) e[q] = reparam(m[q], l[q], e[q]);
      store_chunk(z.at(k * rows + i, j, cols), n, z.vec, e);
    }
  }
};

template <class T>
struct RsampleGradJob {
  int64_t rows, cols, samples;
  Mat<T> grad_z, lv, eps;
  const int64_t* seed;
  Out<T> dlv, deps;  // dlv [rows, cols], deps [samples, rows, cols]
  FASTELBO_DEVICE void operator()(int64_t i, int64_t j, int n) const {
    using A = acc_t<T>;
    constexpr int N = kChunkElems<T>;
    A g[N], s[N], e[N], ge[N];
    load_chunk(lv, i, j, n, s);
#pragma unroll
    for (int q = 0; q < N; ++q) {
      s[q] = reparam_scale(s[q]);
      ge[q] = A(0);
    }
    for (int64_t k = 0; k < samples; ++k) {
      load_chunk(grad_z.sample(k), i, j, n, g);
      eps_chunk(eps, seed, rows, cols, k, i, j, n, e);
#pragma unroll
      for (int q = 0; q < N; ++q) {
        ge[q] += g[q] * e[q];
        e[q] = reparam_eps_grad(g[q], s[q]);
      }
      if (deps.p) store_chunk(deps.at(k * rows + i, j, cols), n, deps.vec, e);
    }
#pragma unroll
    for (int q = 0; q < N; ++q) ge[q] = reparam_lv_grad(ge[q], s[q]);
    if (dlv.p) store_chunk(dlv.at(i, j, cols), n, dlv.vec, ge);
  }
};

// Uniforms or normals of elements [0, n): one thread per counter group of four.
template <class T>
FASTELBO_GLOBAL void FASTELBO_BOUNDS(256) philox_noise_kernel(const int64_t* seed, int64_t n, bool normal, T* out,
                                                               bool vec) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    T v[4];
    if (normal) {
      normals4(s, static_cast<uint64_t>(g), v);
    } else {
      const Philox4 b = philox4x32_10(static_cast<uint64_t>(g), s);
#pragma unroll
      for (int l = 0; l < 4; ++l) v[l] = static_cast<T>(philox_uniform(b.v[l]));
    }
    const int64_t left = n - 4 * g;
    store_chunk(out + 4 * g, static_cast<int>(left < 4 ? left : 4), vec, v);
  }
}

}  // namespace

void rsample_forward(DType dtype, int64_t samples, int64_t rows, int64_t cols, MatArg mu, MatArg logvar, MatArg eps,
                     const int64_t* seed, void* z, int num_sms, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RsampleJob<T> job{rows,        cols, samples, mat<T>(mu), mat<T>(logvar), mat<T>(eps),
                            seed,        out<T>(z, cols)};
    launch_map(job, kChunkElems<T>, num_sms, stream);
  });
}

void rsample_backward(DType dtype, int64_t samples, int64_t rows, int64_t cols, MatArg grad_z, MatArg logvar,
                      MatArg eps, const int64_t* seed, void* dlogvar, void* deps, int num_sms, cudaStream_t stream) {
  if (!dlogvar && !deps) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const RsampleGradJob<T> job{rows, cols, samples, mat<T>(grad_z), mat<T>(logvar), mat<T>(eps),
                                seed, out<T>(dlogvar, cols), out<T>(deps, cols)};
    launch_map(job, kChunkElems<T>, num_sms, stream);
  });
}

void philox_noise(DType dtype, const int64_t* seed, int64_t n, bool normal, void* out_, int num_sms,
                  cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t groups = (n + 3) / 4;
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 16;
  const int64_t blocks = ceil_div(groups, 256);
  const unsigned grid = static_cast<unsigned>(blocks < cap ? blocks : cap);
  if (dtype == DType::kDouble) {
    const auto kernel = &philox_noise_kernel<double>;
    FASTELBO_LAUNCH(kernel, grid, 256, 0, stream, seed, n, normal, static_cast<double*>(out_),
                    vectorizable<double>(out_, 0, 1));
  } else {
    const auto kernel = &philox_noise_kernel<float>;
    FASTELBO_LAUNCH(kernel, grid, 256, 0, stream, seed, n, normal, static_cast<float*>(out_),
                    vectorizable<float>(out_, 0, 1));
  }
}

}  // namespace cuda
}  // namespace fastelbo
