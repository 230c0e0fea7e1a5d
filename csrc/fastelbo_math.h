// fastelbo_math.h: the per-element math and the noise of docs/design.md (§1
// the math, §2 numerics, §3 noise), written once for every C++ backend.
// kernels/_math.py is its Triton twin.
//
// Every formula is a template over the value type V. V is `float` or `double`
// on the host and on the device (nvcc), and at::vec::Vectorized<float|double>
// in the CPU kernels: the formulas only use + - * on V and the transcendental
// functions of Math<V>, which each backend specializes. No torch headers here.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTELBO_HD __host__ __device__ __forceinline__
#else
#define FASTELBO_HD inline
#endif

namespace fastelbo {

// The accumulation type of a storage type T: float64 math for float64, float32
// for float32, float16 and bfloat16 (csrc/checks.h acc_dtype, as a dtype).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// log1p(t) for t in (0, 1], the only range softplus needs (t = e^-|l|):
//   log1p(t) = 2 atanh(s), s = t / (2 + t) <= 1/3, atanh(s) = s * sum_k s^2k / (2k + 1)
// Seven terms leave a truncation below 2e-8 relative: float32 rounding. About
// four times cheaper than a general log1p on the CPU (Sleef's log1p is the
// slowest function of the Bernoulli term there; docs/design.md §2). Math<V>
// picks it for single precision; double keeps the library log1p.
template <class V>
FASTELBO_HD V log1p_unit_series(V t) {
  const V s = t / (V(2) + t);
  const V w = s * s;
  V p = V(1.0 / 13);
  p = p * w + V(1.0 / 11);
  p = p * w + V(1.0 / 9);
  p = p * w + V(1.0 / 7);
  p = p * w + V(1.0 / 5);
  p = p * w + V(1.0 / 3);
  p = p * w + V(1);
  return V(2) * s * p;
}

// ---------------------------------------------------------------------------
// Math<V>: exp, exp_neg_abs (e^-|x|), log, log1p, log1p_unit (t in (0, 1]), inv1p_unit
// (1 / (1 + t), t in [0, 1]), sqrt, sin, cos, abs, max0 (max(x, 0)),
// select_nonneg(x, a, b) = (x >= 0 ? a : b) and select_zero(x, a, b) = (x == 0 ? a : b).
// Scalars here; vectors in csrc/cpu/vec_math.h.
// ---------------------------------------------------------------------------
template <class V>
struct Math;

template <>
struct Math<float> {
  static FASTELBO_HD float exp(float x) { return ::expf(x); }
  static FASTELBO_HD float exp_neg_abs(float x) { return ::expf(-::fabsf(x)); }
  static FASTELBO_HD float log(float x) { return ::logf(x); }
  static FASTELBO_HD float log1p(float x) { return ::log1pf(x); }
  static FASTELBO_HD float log1p_unit(float t) { return log1p_unit_series(t); }
  static FASTELBO_HD float inv1p_unit(float t) { return 1.0f / (1.0f + t); }
  static FASTELBO_HD float sqrt(float x) { return ::sqrtf(x); }
  static FASTELBO_HD float sin(float x) { return ::sinf(x); }
  static FASTELBO_HD float cos(float x) { return ::cosf(x); }
  static FASTELBO_HD float abs(float x) { return ::fabsf(x); }
  // NaN-propagating, unlike fmaxf.
  static FASTELBO_HD float max0(float x) { return x < 0.0f ? 0.0f : x; }
  static FASTELBO_HD float maximum(float a, float b) { return a < b ? b : a; }
  static FASTELBO_HD float select_nonneg(float x, float a, float b) { return x >= 0.0f ? a : b; }
  static FASTELBO_HD float select_zero(float x, float a, float b) { return x == 0.0f ? a : b; }
};

template <>
struct Math<double> {
  static FASTELBO_HD double exp(double x) { return ::exp(x); }
  static FASTELBO_HD double exp_neg_abs(double x) { return ::exp(-::fabs(x)); }
  static FASTELBO_HD double log(double x) { return ::log(x); }
  static FASTELBO_HD double log1p(double x) { return ::log1p(x); }
  static FASTELBO_HD double log1p_unit(double t) { return ::log1p(t); }
  static FASTELBO_HD double inv1p_unit(double t) { return 1.0 / (1.0 + t); }
  static FASTELBO_HD double sqrt(double x) { return ::sqrt(x); }
  static FASTELBO_HD double sin(double x) { return ::sin(x); }
  static FASTELBO_HD double cos(double x) { return ::cos(x); }
  static FASTELBO_HD double abs(double x) { return ::fabs(x); }
  static FASTELBO_HD double max0(double x) { return x < 0.0 ? 0.0 : x; }
  static FASTELBO_HD double maximum(double a, double b) { return a < b ? b : a; }
  static FASTELBO_HD double select_nonneg(double x, double a, double b) { return x >= 0.0 ? a : b; }
  static FASTELBO_HD double select_zero(double x, double a, double b) { return x == 0.0 ? a : b; }
};

// log(2*pi), as a double; converted to V where used.
constexpr double kLog2Pi = 1.8378770664093453;

// ---------------------------------------------------------------------------
// Reparameterized sample, one element:  z = mu + s * eps,  s = e^(lv/2)
//   d/dmu = 1,  d/deps = g * s,  d/dlv = (g * eps) * s / 2
// K samples share lv: d/dlv = (sum_k g[k] * eps[k]) * s / 2, the sum over k taken
// BEFORE the scale, as autograd of the reference forms it. Where s overflows to inf
// the per-sample terms would be +inf and -inf (NaN once summed); the sum keeps the
// sign that picks the right infinity.
// ---------------------------------------------------------------------------
template <class V>
FASTELBO_HD V reparam_scale(V lv) {
  return Math<V>::exp(V(0.5) * lv);
}

template <class V>
FASTELBO_HD V reparam(V mu, V lv, V eps) {
  return mu + reparam_scale(lv) * eps;
}

template <class V>
FASTELBO_HD V reparam_eps_grad(V g, V scale) {
  return g * scale;
}

// g_eps = sum_k g[k] * eps[k] (g * eps for one sample), scale = reparam_scale(lv).
template <class V>
FASTELBO_HD V reparam_lv_grad(V g_eps, V scale) {
  return g_eps * scale * V(0.5);
}

// ---------------------------------------------------------------------------
// KL(N(mu, e^lv) || N(0, 1)), one element:  0.5 * (e^lv + mu^2 - 1 - lv)
//   d/dmu = mu,  d/dlv = (e^lv - 1) / 2
// ---------------------------------------------------------------------------
template <class V>
FASTELBO_HD V kl_std(V mu, V lv) {
  return V(0.5) * (Math<V>::exp(lv) + mu * mu - V(1) - lv);
}

template <class V>
FASTELBO_HD void kl_std_grad(V g, V mu, V lv, V& dmu, V& dlv) {
  dmu = g * mu;
  dlv = g * V(0.5) * (Math<V>::exp(lv) - V(1));
}

// ---------------------------------------------------------------------------
// KL(N(mu, e^lv) || N(pmu, e^plv)), one element:
//   0.5 * (plv - lv + (e^lv + (mu - pmu)^2) * e^-plv - 1)
// e^(lv - plv) instead of e^lv * e^-plv keeps equal large variances finite.
//   d/dmu  = (mu - pmu) e^-plv          d/dpmu = -d/dmu
//   d/dlv  = (e^(lv - plv) - 1) / 2     d/dplv = (1 - (e^lv + (mu - pmu)^2) e^-plv) / 2
// ---------------------------------------------------------------------------
template <class V>
FASTELBO_HD V kl_normal(V mu, V lv, V pmu, V plv) {
  const V d = mu - pmu;
  const V ratio = Math<V>::exp(lv - plv) + d * d * Math<V>::exp(-plv);
  return V(0.5) * (plv - lv + ratio - V(1));
}

template <class V>
FASTELBO_HD void kl_normal_grad(V g, V mu, V lv, V pmu, V plv, V& dmu, V& dlv, V& dpmu, V& dplv) {
  const V d = mu - pmu;
  const V inv_pvar = Math<V>::exp(-plv);
  const V var_ratio = Math<V>::exp(lv - plv);
  dmu = g * d * inv_pvar;
  dpmu = V(0) - dmu;
  dlv = g * V(0.5) * (var_ratio - V(1));
  dplv = g * V(0.5) * (V(1) - var_ratio - d * d * inv_pvar);
}

// ---------------------------------------------------------------------------
// Free bits (Kingma et al. 2016), per latent dimension j of batch-mean KL m_j:
// every row takes KL[b, j] where m_j >= free_bits and the floor free_bits where
// m_j < free_bits (no gradient), so that mean_b kl[b] = sum_j max(free_bits, m_j)
// as torch.clamp(m, min=free_bits) forms it -- NaN where m_j is NaN: such a
// dimension is NaN in every row, value and gradient (fastelbo.reference.free_bits_kl).
// The dimension's weight carries the three cases, 1 (kept), 0 (floored) or NaN
// (scalar: computed once per dimension), and free_bits_select applies it to an
// element's KL or gradient v: `floored` where the weight is 0 (a select, never
// 0 * v: an infinite KL of a floored row must not turn into NaN), v * weight else.
// ---------------------------------------------------------------------------
template <class A>
FASTELBO_HD A free_bits_weight(A mean_kl, A free_bits) {
  return mean_kl < free_bits ? A(0) : (mean_kl >= free_bits ? A(1) : mean_kl);
}

template <class V>
FASTELBO_HD V free_bits_select(V weight, V v, V floored) {
  return Math<V>::select_zero(weight, floored, v * weight);
}

// ---------------------------------------------------------------------------
// log p(z) - log q(z | x) of one element (the IWAE log-weight's latent part),
// q = N(mu, e^lv), p = N(pmu, e^plv) (or N(0, 1): pmu = plv = 0); the
// -0.5 log 2pi of the two densities cancel exactly:
//   0.5 * (lv - plv) + 0.5 * (z - mu)^2 e^-lv - 0.5 * (z - pmu)^2 e^-plv
//   d/dz   = (z - mu) e^-lv - (z - pmu) e^-plv
//   d/dmu  = -(z - mu) e^-lv               d/dpmu = (z - pmu) e^-plv
//   d/dlv  = (1 - (z - mu)^2 e^-lv) / 2    d/dplv = ((z - pmu)^2 e^-plv - 1) / 2
// ---------------------------------------------------------------------------
template <class V>
FASTELBO_HD V log_pq_std(V z, V mu, V lv) {
  const V d = z - mu;
  return V(0.5) * (lv + d * d * Math<V>::exp(V(0) - lv) - z * z);
}

template <class V>
FASTELBO_HD void log_pq_std_grad(V g, V z, V mu, V lv, V& dz, V& dmu, V& dlv) {
  const V d = z - mu;
  const V wq = d * Math<V>::exp(V(0) - lv);
  dmu = V(0) - g * wq;
  dz = g * (wq - z);
  dlv = g * V(0.5) * (V(1) - d * wq);
}

template <class V>
FASTELBO_HD V log_pq_normal(V z, V mu, V lv, V pmu, V plv) {
  const V d = z - mu, dp = z - pmu;
  return V(0.5) * (lv - plv + d * d * Math<V>::exp(V(0) - lv) - dp * dp * Math<V>::exp(V(0) - plv));
}

template <class V>
FASTELBO_HD void log_pq_normal_grad(V g, V z, V mu, V lv, V pmu, V plv, V& dz, V& dmu, V& dlv, V& dpmu,
                                    V& dplv) {
  const V d = z - mu, dp = z - pmu;
  const V wq = d * Math<V>::exp(V(0) - lv), wp = dp * Math<V>::exp(V(0) - plv);
  dmu = V(0) - g * wq;
  dpmu = g * wp;
  dz = g * (wq - wp);
  dlv = g * V(0.5) * (V(1) - d * wq);
  dplv = g * V(0.5) * (dp * wp - V(1));
}

// ---------------------------------------------------------------------------
// The IWAE bound of a row from its K log-weights w_k = lw[k * stride], in C:
//   log (1/K) sum_k e^(w_k) = m + log sum_k e^(w_k - m) - log K,  m = max_k w_k
// as torch.logsumexp(w) - log K: every exponent is <= 0 (stable for log-weights
// of +-1e4), NaN propagates, an infinite m is the result (no inf - inf). K >= 1.
// ---------------------------------------------------------------------------
template <class C, class A>
FASTELBO_HD C log_mean_exp(const A* lw, int64_t samples, int64_t stride) {
  C m = C(0);
  for (int64_t k = 0; k < samples; ++k) {
    const C v = static_cast<C>(lw[k * stride]);
    if (v != v) return v;
    if (k == 0 || v > m) m = v;
  }
  if (!(m - m == C(0))) return m;  // +-inf
  C s = C(0);
  for (int64_t k = 0; k < samples; ++k) s += Math<C>::exp(static_cast<C>(lw[k * stride]) - m);
  return m + Math<C>::log(s) - Math<C>::log(static_cast<C>(samples));
}

// ---------------------------------------------------------------------------
// Bernoulli log-likelihood with logits l and target x in [0, 1], one element:
//   x*l - softplus(l) = -((1 - x)*l + max(-l, 0) + log1p(e^-|l|))
//   d/dl = x - sigmoid(l),  d/dx = l
// Evaluated in the second form (that of torch's binary_cross_entropy_with_logits):
// exact for confident binary targets, x = 1, l >> 0 (no x*l - l cancellation) and
// x = 0, l << 0 (l + max(-l, 0) = 0 exactly), and NaN/inf for infinite logits as
// in the reference (l = +inf, x = 0: -inf; l = -inf, x = 1: NaN).
// One t = e^-|l| serves softplus and sigmoid: sigmoid(l) = 1/(1+t) for l >= 0,
// t/(1+t) otherwise, both free of overflow.
// ---------------------------------------------------------------------------
// The parts that depend on l alone, log1p(e^-|l|) and sigmoid(l), are split out
// so the CPU kernels can look them up for 16-bit inputs (cpu/half_tables.h).
template <class V>
FASTELBO_HD V log1p_exp_neg_abs(V l) {
  return Math<V>::log1p_unit(Math<V>::exp_neg_abs(l));
}

template <class V>
FASTELBO_HD V bernoulli_ll_from(V l, V x, V log1p_e) {  // log1p_e = log1p_exp_neg_abs(l)
  return V(0) - ((V(1) - x) * l + Math<V>::max0(V(0) - l) + log1p_e);
}

template <class V>
FASTELBO_HD V bernoulli_ll(V l, V x) {
  return bernoulli_ll_from(l, x, log1p_exp_neg_abs(l));
}

template <class V>
FASTELBO_HD V sigmoid(V l) {
  const V t = Math<V>::exp_neg_abs(l);
  const V r = Math<V>::inv1p_unit(t);
  return Math<V>::select_nonneg(l, r, t * r);
}

template <class V>
FASTELBO_HD void bernoulli_ll_grad_from(V g, V l, V x, V sig, V& dl, V& dx) {  // sig = sigmoid(l)
  dl = g * (x - sig);
  dx = g * l;
}

template <class V>
FASTELBO_HD void bernoulli_ll_grad(V g, V l, V x, V& dl, V& dx) {
  bernoulli_ll_grad_from(g, l, x, sigmoid(l), dl, dx);
}

// ---------------------------------------------------------------------------
// Gaussian log-likelihood with mean m and log-variance s, one element:
//   -0.5 * (log 2pi + s + (x - m)^2 e^-s)
//   d/dm = (x - m) e^-s,  d/dx = -d/dm,  d/ds = -(1 - (x - m)^2 e^-s) / 2
// ---------------------------------------------------------------------------
template <class V>
FASTELBO_HD V gaussian_ll(V m, V x, V s) {
  const V d = x - m;
  return V(-0.5) * (V(kLog2Pi) + s + d * d * Math<V>::exp(V(0) - s));
}

template <class V>
FASTELBO_HD void gaussian_ll_grad(V g, V m, V x, V s, V& dm, V& dx, V& ds) {
  const V d = x - m;
  const V w = d * Math<V>::exp(V(0) - s);
  dm = g * w;
  dx = V(0) - dm;
  ds = g * V(-0.5) * (V(1) - d * w);
}

// ---------------------------------------------------------------------------
// Noise (docs/design.md §3): Philox4x32-10 keyed by a 64-bit seed, as Triton's
// tl.randint4x / tl.randn4x define it. Element n of the sampled tensor
// (row-major) is lane n % 4 of the four normals of counter group n / 4:
//   counter = (lo32(n/4), hi32(n/4), 0, 0),  key = (lo32(seed), hi32(seed))
//   uniform(u) = float(u as int32, negatives mapped by ~) * 4.6566127342e-10f
//   (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3)
// The uniforms are exact float32 values on every backend; Box-Muller runs in
// the accumulation type (float64 for float64 inputs, float32 otherwise).
// ---------------------------------------------------------------------------
struct Philox4 {
  uint32_t v[4];
};

FASTELBO_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FASTELBO_HD Philox4 philox4x32_10(uint64_t group, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = umulhi32(kRoundB, p2) ^ c1 ^ k0;
    c2 = umulhi32(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

FASTELBO_HD float philox_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Box-Muller on one pair of uniforms, as tl.pair_uniform_to_normal.
template <class V>
FASTELBO_HD void box_muller(V u0, V u1, V& n0, V& n1) {
  const V r = Math<V>::sqrt(V(-2.0) * Math<V>::log(Math<V>::maximum(V(1.0e-7), u0)));
  const V th = V(6.283185307179586) * u1;
  n0 = r * Math<V>::cos(th);
  n1 = r * Math<V>::sin(th);
}

// eps for logical element n: the scalar path (CUDA threads, tails).
template <class T>
FASTELBO_HD T normal_at(uint64_t seed, uint64_t n) {
  const Philox4 b = philox4x32_10(n >> 2, seed);
  const int lane = static_cast<int>(n & 3);
  const T u0 = static_cast<T>(philox_uniform(b.v[lane < 2 ? 0 : 2]));
  const T u1 = static_cast<T>(philox_uniform(b.v[lane < 2 ? 1 : 3]));
  T n0, n1;
  box_muller(u0, u1, n0, n1);
  return (lane & 1) ? n1 : n0;
}

}  // namespace fastelbo
