"""The per-element math and the noise of the Triton kernels, @triton.jit: the Triton twin of
csrc/fastelbo_math.h, formula for formula under the same names where the C++ has one, and the
contract of docs/design.md (§1 the math, §3 noise). Every value is in the accumulation type
(acc: float64 for float64 kernels, FP64 constexpr; float32 otherwise). Nothing here touches memory:
the loads and stores are _tiles.py's.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG_2PI = tl.constexpr(1.8378770664093453)  # log(2 pi)


# ---------------------------------------------------------------------------
# Accumulation type
# ---------------------------------------------------------------------------
@triton.jit
def acc(x, FP64: tl.constexpr):
    """x in the accumulation type: float64 for float64 kernels, float32 otherwise."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


# ---------------------------------------------------------------------------
# Noise: Philox4x32-10 as tl.rand4x, Box-Muller in the accumulation type (fastelbo_math.h philox4x32_10,
# box_muller, normal_at; docs/design.md §3)
# ---------------------------------------------------------------------------
@triton.jit
def box_muller(u0, u1):
    """tl.pair_uniform_to_normal in the uniforms' type (fastelbo_math.h box_muller)."""
    u0 = tl.maximum(1.0e-7, u0)
    th = 6.283185307179586 * u1
    r = tl.sqrt(-2.0 * tl.log(u0))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normal_lanes(seed, groups, FP64: tl.constexpr):
    """The four normals (lanes 0-3) of counter groups `groups`: Box-Muller on lanes (0, 1) and (2, 3)."""
    u0, u1, u2, u3 = tl.rand4x(seed, groups)
    n0, n1 = box_muller(acc(u0, FP64), acc(u1, FP64))
    n2, n3 = box_muller(acc(u2, FP64), acc(u3, FP64))
    return n0, n1, n2, n3


@triton.jit
def _flat_lanes(n0, n1, n2, n3):
    """[G] x 4 lanes -> [4G] in element order (lane l of group g is element 4g + l)."""
    # join appends the last dim: [G, 2, 2] with [g, i, k] = lane 2i + k, flattened row-major.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (4 * n0.shape[0], ))


@triton.jit
def normals(seed, groups, FP64: tl.constexpr):
    """eps of the 4 * G logical elements of counter groups `groups` ([G], int64, consecutive),
    flat and in element order: lane l of group g is element 4g + l (docs/design.md §3). Uniforms are
    exact float32 (tl.rand4x); Box-Muller runs in the accumulation type, so for float32 this
    is tl.randn4x."""
    n0, n1, n2, n3 = _normal_lanes(seed, groups, FP64)
    return _flat_lanes(n0, n1, n2, n3)


@triton.jit
def normals_at(seed, n0, G: tl.constexpr, FP64: tl.constexpr):
    """eps of the 4 * G consecutive logical elements n0, n0 + 1, ... (n0 an int64 scalar, any
    alignment), flat. Aligned (n0 % 4 == 0): normals(). Otherwise element 4g + l is lane (l + o) % 4
    of group g0 + g + (l + o) // 4 (o = n0 % 4): the groups g0 + g and g0 + g + 1 are both drawn
    and each lane picks its word -- twice the Philox work, only for unaligned starts (rsample's
    backward over K samples of a [B, D] with B * D % 4 != 0)."""
    g0 = n0 // 4
    o = n0 - g0 * 4
    groups = g0 + tl.arange(0, G).to(tl.int64)
    a0, a1, a2, a3 = _normal_lanes(seed, groups, FP64)
    if o == 0:
        eps = _flat_lanes(a0, a1, a2, a3)
    else:
        b0, b1, b2, b3 = _normal_lanes(seed, groups + 1, FP64)
        # element lanes l = 0..3 take word l + o of (a0, a1, a2, a3, b0, b1, b2, b3), o in {1, 2, 3}
        e0 = tl.where(o == 1, a1, tl.where(o == 2, a2, a3))
        e1 = tl.where(o == 1, a2, tl.where(o == 2, a3, b0))
        e2 = tl.where(o == 1, a3, tl.where(o == 2, b0, b1))
        e3 = tl.where(o == 1, b0, tl.where(o == 2, b1, b2))
        eps = _flat_lanes(e0, e1, e2, e3)
    return eps


# ---------------------------------------------------------------------------
# Reparameterized sample (fastelbo_math.h reparam_*): z = mu + s eps, s = e^(lv / 2)
# ---------------------------------------------------------------------------
@triton.jit
def reparam_scale(lv):
    """s = e^(lv / 2), the standard deviation."""
    return tl.exp(0.5 * lv)


@triton.jit
def reparam(mu, lv, eps):
    """z = mu + e^(lv / 2) eps."""
    return mu + reparam_scale(lv) * eps


@triton.jit
def reparam_eps_grad(g, scale):
    """d/deps = g s."""
    return g * scale


@triton.jit
def reparam_lv_grad(g_eps, scale):
    """d/dlv = (sum_k g[k] eps[k]) s / 2: the sum over the samples taken before the scale, right where s is inf."""
    return g_eps * scale * 0.5


# ---------------------------------------------------------------------------
# Per-element latent math (fastelbo_math.h kl_std, kl_normal, log_pq_std, log_pq_normal and their _grad):
# q = N(mu, e^lv), p = N(pmu, e^plv) or N(0, 1) without a prior (pmu, plv then unread: pass any tile).
# ---------------------------------------------------------------------------
@triton.jit
def kl_element(mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """KL(q || p) of one latent element:
        0.5 (e^lv + mu^2 - 1 - lv)                              (kl_std)
        0.5 (plv - lv + e^(lv - plv) + (mu - pmu)^2 e^-plv - 1)  (kl_normal)"""
    if HAS_PRIOR:
        d = mu - pmu
        return 0.5 * (plv - lv + (tl.exp(lv - plv) + d * d * tl.exp(-plv)) - 1.0)
    else:
        return 0.5 * (tl.exp(lv) + mu * mu - 1.0 - lv)


@triton.jit
def kl_element_grad(mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """(dmu, dlv, dpmu, dplv) of kl_element (kl_std_grad / kl_normal_grad):
        dmu = mu, dlv = (e^lv - 1) / 2                                       (no prior; dpmu, dplv = 0)
        dmu = (mu - pmu) e^-plv = -dpmu, dlv = (e^(lv - plv) - 1) / 2,
        dplv = (1 - e^(lv - plv) - (mu - pmu)^2 e^-plv) / 2
    Unused results cost nothing (the compiler drops them and their loads)."""
    if HAS_PRIOR:
        var_ratio = tl.exp(lv - plv)
        d = mu - pmu
        inv_pvar = tl.exp(-plv)
        dmu = d * inv_pvar
        return dmu, 0.5 * (var_ratio - 1.0), 0.0 - dmu, 0.5 * (1.0 - var_ratio - d * d * inv_pvar)
    else:
        return mu, 0.5 * (tl.exp(lv) - 1.0), 0.0 * mu, 0.0 * mu


# ---------------------------------------------------------------------------
# Free bits (fastelbo_math.h free_bits_weight, free_bits_select)
# ---------------------------------------------------------------------------
@triton.jit
def free_bits_weight(kl_dims, free_bits):
    """The weight of a latent dimension of batch-mean KL kl_dims under the floor free_bits: 1 where
    kl_dims >= free_bits (kept), 0 where kl_dims < free_bits (floored), NaN where kl_dims is NaN."""
    return tl.where(kl_dims < free_bits, 0.0, tl.where(kl_dims >= free_bits, 1.0, kl_dims))


@triton.jit
def free_bits_select(weight, v, floored):
    """`floored` where the weight is 0 (a select, never 0 * v: an infinite KL of a floored row must not
    turn into NaN), v * weight else."""
    return tl.where(weight == 0.0, floored, v * weight)


# ---------------------------------------------------------------------------
# log p(z) - log q(z | x) of one latent element (fastelbo_math.h log_pq_std, log_pq_normal and their _grad)
# ---------------------------------------------------------------------------
@triton.jit
def log_pq_element(z, mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """log p(z) - log q(z | x) of one latent element (the -0.5 log 2pi terms cancel exactly):
        0.5 (lv - plv) + 0.5 (z - mu)^2 e^-lv - 0.5 (z - pmu)^2 e^-plv    (pmu = plv = 0 without a prior)"""
    a = z - mu
    q = a * a * tl.exp(-lv)
    if HAS_PRIOR:
        c = z - pmu
        return 0.5 * (lv - plv) + 0.5 * q - 0.5 * (c * c * tl.exp(-plv))
    else:
        return 0.5 * lv + 0.5 * q - 0.5 * (z * z)


@triton.jit
def log_pq_element_grad(z, mu, lv, pmu, plv, HAS_PRIOR: tl.constexpr):
    """(dz, dmu, dlv, dpmu, dplv) of log_pq_element, with wq = (z - mu) e^-lv, wp = (z - pmu) e^-plv:
        dz = wq - wp, dmu = -wq, dlv = (1 - (z - mu) wq) / 2, dpmu = wp, dplv = ((z - pmu) wp - 1) / 2"""
    a = z - mu
    wq = a * tl.exp(-lv)
    if HAS_PRIOR:
        c = z - pmu
        wp = c * tl.exp(-plv)
        dplv = 0.5 * (c * wp - 1.0)
    else:
        wp = z
        dplv = 0.0 * z
    return wq - wp, 0.0 - wq, 0.5 * (1.0 - a * wq), wp, dplv


# ---------------------------------------------------------------------------
# Bernoulli log-likelihood with logits l, target x in [0, 1] (fastelbo_math.h bernoulli_ll, sigmoid,
# bernoulli_ll_grad): x l - softplus(l), in torch's binary_cross_entropy_with_logits form; t = e^-|l|
# serves softplus and sigmoid
# ---------------------------------------------------------------------------
@triton.jit
def log1p_unit(t, FP64: tl.constexpr):
    """log1p(t) for t = e^-|l| in (0, 1] (fastelbo_math.h log1p_unit): the 7-term atanh series of
    log1p_unit_series in single precision; in double, log(1 + t) * t / ((1 + t) - 1), accurate to
    an ulp or two (C++: ::log1p; Triton has no portable log1p)."""
    if FP64:
        u = 1.0 + t
        d = u - 1.0
        return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))
    else:
        s = t / (2.0 + t)
        w = s * s
        p = 1.0 / 13
        p = p * w + 1.0 / 11
        p = p * w + 1.0 / 9
        p = p * w + 1.0 / 7
        p = p * w + 1.0 / 5
        p = p * w + 1.0 / 3
        p = p * w + 1.0
        return 2.0 * s * p


@triton.jit
def bernoulli_element(l, x, FP64: tl.constexpr):
    """-((1 - x) l + max(-l, 0) + log1p(e^-|l|)): exact for confident binary targets (no x l - l
    cancellation), the reference's NaN/inf for infinite logits."""
    t = tl.exp(0.0 - tl.abs(l))
    neg = 0.0 - l
    return 0.0 - ((1.0 - x) * l + tl.where(neg < 0.0, 0.0, neg) + log1p_unit(t, FP64))


@triton.jit
def sigmoid(l):
    """1 / (1 + t) for l >= 0, t / (1 + t) otherwise, t = e^-|l|: free of overflow."""
    t = tl.exp(0.0 - tl.abs(l))
    q = 1.0 / (1.0 + t)
    return tl.where(l >= 0.0, q, t * q)


@triton.jit
def bernoulli_element_grad(g, l, x):
    """d/dl = g (x - sigmoid(l)) (d/dx = g l)."""
    return g * (x - sigmoid(l))


# ---------------------------------------------------------------------------
# Gaussian log-likelihood with mean m, log-variance s (fastelbo_math.h gaussian_ll, gaussian_ll_grad);
# inv_var = e^-s, computed once per tile of s and shared by the samples
# ---------------------------------------------------------------------------
@triton.jit
def gaussian_element(m, x, s, inv_var):
    """-0.5 (log 2pi + s + (x - m)^2 e^-s)."""
    d = x - m
    return -0.5 * (LOG_2PI + s + d * d * inv_var)


@triton.jit
def gaussian_element_grad(g, m, x, inv_var):
    """(d/dm, d/ds) = (g w, -g (1 - (x - m) w) / 2), w = (x - m) e^-s (d/dx = -d/dm)."""
    d = x - m
    w = d * inv_var
    return g * w, g * -0.5 * (1.0 - d * w)
