// Reparameterized sample on the CPU (docs/design.md §1, §3):
//   forward   z = mu + e^(lv/2) * eps
//   backward  dlv = (g * eps) * e^(lv/2) / 2, deps = g * e^(lv/2)  (dmu = g needs no kernel)
// num_samples = K >= 1: z [K, B, Dz], eps of logical element (k * B + b) * Dz + j;
// the backward sums g * eps over k inside each chunk's task, then scales once
// (fastelbo_math.h reparam_lv_grad: the reference's order, right where e^(lv/2) is inf).
// eps is regenerated from the seed in the backward: nothing [B, Dz] is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops.h"
#include "philox_vec.h"
#include "rows.h"

namespace fastelbo {
namespace cpu {
namespace {

// eps for logical elements [n0, n0 + count) into out: Philox per group of four,
// sixteen groups per AVX-512 register where the CPU has it (philox_vec.h), and
// Box-Muller on whole vectors of groups.
template <class A>
void fill_normals(uint64_t seed, uint64_t n0, int64_t count, A* out) {
  constexpr int64_t kGroups = kChunk / 4 + 2;
  constexpr int64_t kBlocks = (kGroups + 15) / 16;  // of 16 groups
  const uint64_t g0 = n0 >> 2;
  const int64_t groups = static_cast<int64_t>(((n0 + count + 3) >> 2) - g0);
  TORCH_INTERNAL_ASSERT(groups <= kGroups);
#if defined(FASTELBO_PHILOX_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    alignas(64) float z[kBlocks * 64];
    philox_normals_interleaved(seed, g0, (groups + 15) / 16, z);
    std::memcpy(out, z + (n0 & 3), static_cast<size_t>(count) * sizeof(float));
    return;
  }
#endif
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  alignas(64) float uf[4][kBlocks * 16];
  alignas(64) A u[4][kGroups];
  alignas(64) A z[4][kGroups];
  philox_uniforms(seed, g0, groups, &uf[0][0], kBlocks * 16);
  for (int l = 0; l < 4; ++l)
    for (int64_t g = 0; g < groups; ++g) u[l][g] = static_cast<A>(uf[l][g]);
  for (int64_t g = 0; g < groups; g += W) {
    const int64_t w = std::min(W, groups - g);
    Vec n[4];
    box_muller(Vec::loadu(&u[0][g], w), Vec::loadu(&u[1][g], w), n[0], n[1]);
    box_muller(Vec::loadu(&u[2][g], w), Vec::loadu(&u[3][g], w), n[2], n[3]);
    for (int l = 0; l < 4; ++l) n[l].store(&z[l][g], w);
  }
  for (int64_t k = 0; k < count; ++k) {
    const uint64_t n = n0 + k;
    out[k] = z[n & 3][(n >> 2) - g0];
  }
}

// The eps operand: the caller's tensor ([B, D] or [K, B, D]), or Philox noise of
// logical element (k * rows + i) * cols + j of the span (docs/design.md §3:
// the flat index of z [K, B, Dz] either way).
template <class T>
struct Noise {
  bool given;
  Samples<T> eps;
  uint64_t seed;
  int64_t rows, cols;

  const acc_t<T>* chunk(int64_t k, int64_t i, int64_t j, int64_t n, acc_t<T>* scratch) const {
    if (given) return eps.sample(k).chunk(i, j, n, scratch);
    fill_normals<acc_t<T>>(seed, static_cast<uint64_t>(k * rows + i) * cols + j, n, scratch);
    return scratch;
  }
};

uint64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "fastelbo: seed must be a one-element int64 tensor");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// The logical [rows, cols] of one sample. When every operand is contiguous the
// sample is one row of rows * cols elements (the noise index is the flat index
// either way), so narrow rows (Dz = 8) still fill whole vectors and chunks.
struct Span {
  int64_t rows, cols;
  bool flat;
};

inline Span span_of(std::initializer_list<const at::Tensor*> operands) {
  const at::Tensor& first = **operands.begin();
  bool flat = true;
  for (const at::Tensor* t : operands) flat = flat && t->is_contiguous();
  if (flat) return Span{1, first.size(-2) * first.size(-1), true};
  return Span{first.size(-2), first.size(-1), false};
}

// [B, D] or [K, B, D] t as an operand over the span (sample(k) its k-th [B, D]).
template <class T>
Samples<T> operand_in(const at::Tensor& t, const Span& span) {
  if (!span.flat) return samples<T>(t);
  return Samples<T>{Operand<T>{t.const_data_ptr<T>(), 0, 1}, t.dim() == 3 ? span.rows * span.cols : 0};
}

template <class T>
Noise<T> noise(const std::optional<at::Tensor>& eps, const at::Tensor& seed, const Span& span) {
  if (eps.has_value()) return Noise<T>{true, operand_in<T>(*eps, span), 0, span.rows, span.cols};
  return Noise<T>{false, {}, seed_value(seed), span.rows, span.cols};
}

// The span of both passes' operands: `first` (mu, or grad_z), logvar and eps when given.
inline Span span_of(const at::Tensor& first, const at::Tensor& logvar, const std::optional<at::Tensor>& eps) {
  return eps.has_value() ? span_of({&first, &logvar, &*eps}) : span_of({&first, &logvar});
}

// The inputs of both passes as operands over the span: first (mu, or grad_z), logvar, the noise.
template <class T>
struct Inputs {
  Samples<T> first, lv;
  Noise<T> eps;
};

template <class T>
Inputs<T> inputs(const at::Tensor& first, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                  const at::Tensor& seed, const Span& span) {
  return Inputs<T>{operand_in<T>(first, span), operand_in<T>(logvar, span), noise<T>(eps, seed, span)};
}

// f(q, w) over the vectors of a chunk of n values: w = Vec::size() lanes from q, fewer in the last.
template <class Vec, class F>
inline void for_vectors(int64_t n, F f) {
  for (int64_t q = 0; q < n; q += Vec::size()) f(q, std::min<int64_t>(Vec::size(), n - q));
}

// f(row, first column, count) over every chunk of `samples` spans (row =
// k * span.rows + i for sample k), chunks in parallel.
template <class F>
void parallel_chunks(const Span& span, int64_t samples, F f) {
  const int64_t per_row = (span.cols + kChunk - 1) / kChunk;
  at::parallel_for(0, samples * span.rows * per_row, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / per_row, j = (t % per_row) * kChunk;
      f(r, j, std::min(kChunk, span.cols - j));
    }
  });
}

}  // namespace

// num_samples = 0: z [B, Dz]; K = num_samples >= 1: z [K, B, Dz], z[k] = mu + e^(lv/2) * eps[k].
at::Tensor rsample_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                       const std::optional<at::Tensor>& eps, int64_t num_samples) {
  const int64_t K = check_rsample_args(mu, logvar, seed, eps, num_samples);
  check_cpu(mu, "mu");  // and so the seed (mu's device or the CPU)
  std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
  if (num_samples > 0) shape.insert(shape.begin(), num_samples);
  auto z = empty_result(shape, mu.options());
  if (z.numel() == 0) return z;
  const Span span = span_of(mu, logvar, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastelbo_rsample_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<A>;
    const Inputs<scalar_t> in = inputs<scalar_t>(mu, logvar, eps, seed, span);
    scalar_t* out = z.data_ptr<scalar_t>();
    parallel_chunks(span, K, [&](int64_t r, int64_t j, int64_t n) {
      const int64_t k = r / span.rows, i = r % span.rows;
      alignas(64) A s_mu[kChunk], s_lv[kChunk], s_eps[kChunk], s_z[kChunk];
      const A* pm = in.first.base.chunk(i, j, n, s_mu);
      const A* pl = in.lv.base.chunk(i, j, n, s_lv);
      const A* pe = in.eps.chunk(k, i, j, n, s_eps);
      for_vectors<Vec>(n, [&](int64_t q, int64_t w) {
        reparam(Vec::loadu(pm + q, w), Vec::loadu(pl + q, w), Vec::loadu(pe + q, w)).store(s_z + q, w);
      });
      store_chunk(out + r * span.cols, j, n, s_z);
    });
  });
  return z;
}

// grad_z [B, Dz] or [K, B, Dz]: dlv = (sum_k g[k] * eps[k]) * e^(lv/2) / 2 (k loop inside
// the chunk's task, summed in the accumulation type), deps[k] = g[k] * e^(lv/2).
std::tuple<at::Tensor, at::Tensor> rsample_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar,
                                                        const at::Tensor& seed, const std::optional<at::Tensor>& eps,
                                                        std::array<bool, 2> output_mask) {
  const int64_t K = check_rsample_backward_args(grad_z, logvar, seed, eps);
  check_cpu(logvar, "logvar");
  auto dlv = grad_or_empty(output_mask[0], logvar, empty_result);
  auto deps = grad_or_empty(output_mask[1], grad_z, empty_result);
  if (logvar.numel() == 0 || !(output_mask[0] || output_mask[1])) return {dlv, deps};
  if (K == 0) {
    if (output_mask[0]) dlv.zero_();
    return {dlv, deps};
  }
  const Span span = span_of(grad_z, logvar, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "fastelbo_rsample_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<A>;
    const Inputs<scalar_t> in = inputs<scalar_t>(grad_z, logvar, eps, seed, span);
    parallel_chunks(span, 1, [&](int64_t i, int64_t j, int64_t n) {
      alignas(64) A s_g[kChunk], s_lv[kChunk], s_eps[kChunk], s_scale[kChunk], s_geps[kChunk], s_deps[kChunk];
      const A* pl = in.lv.base.chunk(i, j, n, s_lv);
      for_vectors<Vec>(n, [&](int64_t q, int64_t w) { reparam_scale(Vec::loadu(pl + q, w)).store(s_scale + q, w); });
      for (int64_t k = 0; k < K; ++k) {
        const A* pg = in.first.sample(k).chunk(i, j, n, s_g);
        const A* pe = in.eps.chunk(k, i, j, n, s_eps);
        for_vectors<Vec>(n, [&](int64_t q, int64_t w) {
          const Vec vg = Vec::loadu(pg + q, w);
          const Vec geps = vg * Vec::loadu(pe + q, w);
          (k == 0 ? geps : Vec::loadu(s_geps + q, w) + geps).store(s_geps + q, w);
          reparam_eps_grad(vg, Vec::loadu(s_scale + q, w)).store(s_deps + q, w);
        });
        if (output_mask[1]) store_chunk(deps.data_ptr<scalar_t>() + (k * span.rows + i) * span.cols, j, n, s_deps);
      }
      if (output_mask[0]) {
        for_vectors<Vec>(n, [&](int64_t q, int64_t w) {
          reparam_lv_grad(Vec::loadu(s_geps + q, w), Vec::loadu(s_scale + q, w)).store(s_geps + q, w);
        });
        store_chunk(dlv.data_ptr<scalar_t>() + i * span.cols, j, n, s_geps);
      }
    });
  });
  return {dlv, deps};
}

// The noise itself, for the RNG tests: uniforms (bits exact) or normals of
// logical elements [0, n) in the given floating dtype.
at::Tensor philox_noise_cpu(const at::Tensor& seed, int64_t n, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0, "fastelbo: n must be >= 0, got ", n);
  check_cpu(seed, "seed");
  const uint64_t s = seed_value(seed);
  auto out = at::empty({n}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastelbo_philox_noise_cpu", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kChunk, [&](int64_t b, int64_t e) {
      alignas(64) scalar_t buf[kChunk];
      for (int64_t j = b; j < e; j += kChunk) {
        const int64_t c = std::min(kChunk, e - j);
        if (normal) {
          fill_normals<scalar_t>(s, j, c, buf);
        } else {
          constexpr int64_t kStride = (kChunk / 4 + 2 + 15) / 16 * 16;
          alignas(64) float u[4][kStride];
          const uint64_t g0 = static_cast<uint64_t>(j) >> 2;
          philox_uniforms(s, g0, static_cast<int64_t>(((j + c + 3) >> 2) - g0), &u[0][0], kStride);
          for (int64_t k = 0; k < c; ++k) {
            const uint64_t m = j + k;
            buf[k] = u[m & 3][(m >> 2) - g0];
          }
        }
        std::copy(buf, buf + c, p + j);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastelbo, CPU, m) {
  m.impl("rsample", &rsample_cpu);
  m.impl("rsample_backward", &rsample_backward_cpu);
  m.impl("philox_noise", &philox_noise_cpu);
}

}  // namespace cpu
}  // namespace fastelbo
