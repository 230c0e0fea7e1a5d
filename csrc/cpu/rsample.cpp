// Reparameterized sample on the CPU (DESIGN §1 row 1, noise per §2):
//   forward   z = mu + e^(lv/2) * eps
//   backward  dlv = g * e^(lv/2) * eps / 2, deps = g * e^(lv/2)  (dmu = g needs no kernel)
// eps is regenerated from the seed in the backward: nothing [B, Dz] is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "rows.h"

namespace fastelbo {
namespace cpu {
namespace {

// eps for logical elements [n0, n0 + count) into out: Philox per group of four
// (scalar integer work), Box-Muller on whole vectors of groups.
template <class A>
void fill_normals(uint64_t seed, uint64_t n0, int64_t count, A* out) {
  using Vec = at::vec::Vectorized<A>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kGroups = kChunk / 4 + 2;
  alignas(64) A u[4][kGroups];
  alignas(64) A z[4][kGroups];
  const uint64_t g0 = n0 >> 2;
  const int64_t groups = static_cast<int64_t>(((n0 + count + 3) >> 2) - g0);
  TORCH_INTERNAL_ASSERT(groups <= kGroups);
  for (int64_t g = 0; g < groups; ++g) {
    const Philox4 bits = philox4x32_10(g0 + g, seed);
    for (int l = 0; l < 4; ++l) u[l][g] = static_cast<A>(philox_uniform(bits.v[l]));
  }
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

// The eps operand: the caller's tensor, or Philox noise of the row being processed.
template <class T>
struct Noise {
  bool given;
  Operand<T> eps;
  uint64_t seed;
  int64_t cols;

  const acc_t<T>* chunk(int64_t i, int64_t j, int64_t n, acc_t<T>* scratch) const {
    if (given) return eps.chunk(i, j, n, scratch);
    fill_normals<acc_t<T>>(seed, static_cast<uint64_t>(i) * cols + j, n, scratch);
    return scratch;
  }
};

uint64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fastelbo: seed must be a one-element int64 tensor");
  return static_cast<uint64_t>(seed.item<int64_t>());
}


// The logical [rows, cols] of a sample. When every operand is contiguous the
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
  if (flat) return Span{1, first.numel(), true};
  return Span{first.size(0), first.size(1), false};
}

template <class T>
Operand<T> operand_in(const at::Tensor& t, const Span& span) {
  return span.flat ? Operand<T>{t.const_data_ptr<T>(), 0, 1} : operand<T>(t);
}

template <class T>
Noise<T> noise(const std::optional<at::Tensor>& eps, const at::Tensor& seed, const Span& span) {
  if (eps.has_value()) return Noise<T>{true, operand_in<T>(*eps, span), 0, span.cols};
  return Noise<T>{false, {}, seed_value(seed), span.cols};
}

// f(row, first column, count) over every chunk of the span, chunks in parallel.
template <class F>
void parallel_chunks(const Span& span, F f) {
  const int64_t per_row = (span.cols + kChunk - 1) / kChunk;
  at::parallel_for(0, span.rows * per_row, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / per_row, j = (t % per_row) * kChunk;
      f(i, j, std::min(kChunk, span.cols - j));
    }
  });
}

}  // namespace

at::Tensor rsample_cpu(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                       const std::optional<at::Tensor>& eps) {
  check_like(mu, "mu", logvar, "logvar");
  check_like(mu, "mu", eps, "eps");
  auto z = at::empty(mu.sizes(), mu.options().memory_format(at::MemoryFormat::Contiguous));
  if (z.numel() == 0) return z;
  const Span span = eps.has_value() ? span_of({&mu, &logvar, &*eps}) : span_of({&mu, &logvar});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "fastelbo_rsample_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<A>;
    const auto m = operand_in<scalar_t>(mu, span), lv = operand_in<scalar_t>(logvar, span);
    const auto e = noise<scalar_t>(eps, seed, span);
    scalar_t* out = z.data_ptr<scalar_t>();
    parallel_chunks(span, [&](int64_t i, int64_t j, int64_t n) {
      alignas(64) A s_mu[kChunk], s_lv[kChunk], s_eps[kChunk], s_z[kChunk];
      const A* pm = m.chunk(i, j, n, s_mu);
      const A* pl = lv.chunk(i, j, n, s_lv);
      const A* pe = e.chunk(i, j, n, s_eps);
      for (int64_t k = 0; k < n; k += Vec::size()) {
        const int64_t w = std::min<int64_t>(Vec::size(), n - k);
        reparam(Vec::loadu(pm + k, w), Vec::loadu(pl + k, w), Vec::loadu(pe + k, w)).store(s_z + k, w);
      }
      store_chunk(out + i * span.cols, j, n, s_z);
    });
  });
  return z;
}

std::tuple<at::Tensor, at::Tensor> rsample_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar,
                                                        const at::Tensor& seed, const std::optional<at::Tensor>& eps,
                                                        std::array<bool, 2> output_mask) {
  check_like(logvar, "logvar", grad_z, "grad_z");
  check_like(logvar, "logvar", eps, "eps");
  auto dlv = grad_or_empty(output_mask[0], logvar);
  auto deps = grad_or_empty(output_mask[1], logvar);
  if (logvar.numel() == 0 || !(output_mask[0] || output_mask[1])) return {dlv, deps};
  const Span span = eps.has_value() ? span_of({&grad_z, &logvar, &*eps}) : span_of({&grad_z, &logvar});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "fastelbo_rsample_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<A>;
    const auto g = operand_in<scalar_t>(grad_z, span), lv = operand_in<scalar_t>(logvar, span);
    const auto e = noise<scalar_t>(eps, seed, span);
    parallel_chunks(span, [&](int64_t i, int64_t j, int64_t n) {
      alignas(64) A s_g[kChunk], s_lv[kChunk], s_eps[kChunk], s_dlv[kChunk], s_deps[kChunk];
      const A* pg = g.chunk(i, j, n, s_g);
      const A* pl = lv.chunk(i, j, n, s_lv);
      const A* pe = e.chunk(i, j, n, s_eps);
      for (int64_t k = 0; k < n; k += Vec::size()) {
        const int64_t w = std::min<int64_t>(Vec::size(), n - k);
        Vec vdlv, vdeps;
        reparam_grad(Vec::loadu(pg + k, w), Vec::loadu(pl + k, w), Vec::loadu(pe + k, w), vdlv, vdeps);
        vdlv.store(s_dlv + k, w);
        vdeps.store(s_deps + k, w);
      }
      if (output_mask[0]) store_chunk(dlv.data_ptr<scalar_t>() + i * span.cols, j, n, s_dlv);
      if (output_mask[1]) store_chunk(deps.data_ptr<scalar_t>() + i * span.cols, j, n, s_deps);
    });
  });
  return {dlv, deps};
}

// The noise itself, for the RNG tests: uniforms (bits exact) or normals of
// logical elements [0, n) in the given floating dtype.
at::Tensor philox_noise_cpu(const at::Tensor& seed, int64_t n, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0, "fastelbo: n must be >= 0, got ", n);
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
          for (int64_t k = 0; k < c; ++k) {
            const uint64_t m = j + k;
            buf[k] = philox_uniform(philox4x32_10(m >> 2, s).v[m & 3]);
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
