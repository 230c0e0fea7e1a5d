// Host build of the per-element math the CUDA kernels use: csrc/fastelbo_math.h
// (formulas, Philox, Box-Muller) and csrc/cuda/device.h (noise chunks, the
// float16/bfloat16 conversions), compiled by the plain host compiler with the
// emulation's macro definitions (no CUDA). tests/test_cuda_host_math.py feeds it
// one request per line on stdin and compares every answer with the CPU backend
// (torch.ops.fastelbo on CPU tensors) and with torch's own conversions.
//
// Requests (floats as C hex floats or decimals, seeds/indices as unsigned decimals):
//   philox SEED GROUP         -> four uint32 words
//   uniform SEED N            -> philox_uniform of element N
//   normal f|d SEED N         -> normal_at<float|double>(SEED, N)
//   chunk f8|f4|d4 SEED N0    -> noise_chunk<N, A>(SEED, N0): N normals
//   <formula> f|d ARGS...     -> the formula's value(s), see below
//   h2f|b2f BITS              -> float16/bfloat16 bits to float
//   f2h|f2b X                 -> float to float16/bfloat16 bits
// Every float answer is printed as a C hex float (exact).
#define FASTELBO_LAUNCH(kernel, grid, block, smem, stream, ...) ((void)0)
#define FASTELBO_GLOBAL
#define FASTELBO_BOUNDS(threads)
#define FASTELBO_DEVICE inline
#define FASTELBO_SHFL_XOR(v, lane_mask) (v)
#define FASTELBO_SYNC() ((void)0)

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/device.h"

using namespace fastelbo;
using namespace fastelbo::cuda;

namespace {

void put(double v) { std::printf(" %a", v); }

template <class V>
void formula(const std::string& name, const std::vector<V>& a) {
  if (name == "reparam") {
    put(reparam(a[0], a[1], a[2]));
  } else if (name == "reparam_grad") {
    const V scale = reparam_scale(a[1]);  // one sample: g * eps is the sum over k
    put(reparam_lv_grad(a[0] * a[2], scale));
    put(reparam_eps_grad(a[0], scale));
  } else if (name == "kl_std") {
    put(kl_std(a[0], a[1]));
  } else if (name == "kl_std_grad") {
    V dmu, dlv;
    kl_std_grad(a[0], a[1], a[2], dmu, dlv);
    put(dmu);
    put(dlv);
  } else if (name == "kl_normal") {
    put(kl_normal(a[0], a[1], a[2], a[3]));
  } else if (name == "kl_normal_grad") {
    V d[4];
    kl_normal_grad(a[0], a[1], a[2], a[3], a[4], d[0], d[1], d[2], d[3]);
    for (V v : d) put(v);
  } else if (name == "bernoulli_ll") {
    put(bernoulli_ll(a[0], a[1]));
  } else if (name == "bernoulli_ll_grad") {
    V dl, dx;
    bernoulli_ll_grad(a[0], a[1], a[2], dl, dx);
    put(dl);
    put(dx);
  } else if (name == "gaussian_ll") {
    put(gaussian_ll(a[0], a[1], a[2]));
  } else if (name == "gaussian_ll_grad") {
    V dm, dx, ds;
    gaussian_ll_grad(a[0], a[1], a[2], a[3], dm, dx, ds);
    put(dm);
    put(dx);
    put(ds);
  } else {
    std::fprintf(stderr, "unknown formula %s\n", name.c_str());
    std::exit(2);
  }
}

template <int N, class A>
void chunk(uint64_t seed, uint64_t n0) {
  A e[N];
  noise_chunk<N, A>(seed, n0, e);
  for (A v : e) put(v);
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string op;
    in >> op;
    if (op.empty()) continue;
    if (op == "philox") {
      uint64_t seed, group;
      in >> seed >> group;
      const Philox4 b = philox4x32_10(group, seed);
      std::printf("%u %u %u %u", b.v[0], b.v[1], b.v[2], b.v[3]);
    } else if (op == "uniform") {
      uint64_t seed, n;
      in >> seed >> n;
      put(philox_uniform(philox4x32_10(n >> 2, seed).v[n & 3]));
    } else if (op == "normal") {
      std::string t;
      uint64_t seed, n;
      in >> t >> seed >> n;
      put(t == "f" ? static_cast<double>(normal_at<float>(seed, n)) : normal_at<double>(seed, n));
    } else if (op == "chunk") {
      std::string t;
      uint64_t seed, n0;
      in >> t >> seed >> n0;
      if (t == "f8") chunk<8, float>(seed, n0);
      else if (t == "f4") chunk<4, float>(seed, n0);
      else chunk<4, double>(seed, n0);
    } else if (op == "h2f" || op == "b2f") {
      unsigned bits;
      in >> bits;
      put(op == "h2f" ? half_to_float(static_cast<uint16_t>(bits)) : bfloat16_to_float(static_cast<uint16_t>(bits)));
    } else if (op == "f2h" || op == "f2b") {
      std::string s;
      in >> s;
      const float x = std::strtof(s.c_str(), nullptr);
      std::printf("%u", static_cast<unsigned>(op == "f2h" ? float_to_half(x) : float_to_bfloat16(x)));
    } else {
      std::string t, s;
      in >> t;
      std::vector<double> args;
      while (in >> s) args.push_back(std::strtod(s.c_str(), nullptr));
      if (t == "f") {
        formula<float>(op, std::vector<float>(args.begin(), args.end()));
      } else {
        formula<double>(op, args);
      }
    }
    std::printf("\n");
  }
  return 0;
}
