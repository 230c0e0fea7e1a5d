"""Any trailing shape: every op and ELBOLoss on [B, *] inputs ([K, B, *] for K samples), 3-D, 4-D and 5-D,
contiguous and channels-last (the channel dim innermost in memory), forward values and gradients against
the reference on the same values flattened to [B, D] (a per-row sum does not depend on the order of its
terms), every fused backend and dtype."""

from __future__ import annotations

import math

import pytest
import torch

import fastelbo
from fastelbo import reference as R
from cases import Case, run
from helpers import dtype_params, generator_for, rand, randn

DTYPES = dtype_params()
# [B, C, *spatial]: odd sizes; the latent and the data of one model share B.
Z_SHAPES = {3: (3, 4, 5), 4: (3, 2, 3, 5), 5: (2, 3, 2, 3, 2)}
X_SHAPES = {3: (3, 3, 7), 4: (3, 1, 5, 6), 5: (2, 2, 3, 2, 5)}
NDIMS = [3, 4, 5]
LAYOUTS = ["contiguous", "channels_last"]


def in_layout(t, layout, channel_dim=1):
    """t (logical shape kept) stored with `channel_dim` innermost (channels_last / channels_last_3d for 4-D /
    5-D images, and the same order for any ndim), or contiguous."""
    if layout == "contiguous" or t.dim() <= channel_dim + 1:
        return t.contiguous()
    order = [d for d in range(t.dim()) if d != channel_dim] + [channel_dim]
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


def _flat(t, lead=1):
    """The reference's view: [B, D] (lead=1) or [K, B, D] (lead=2)."""
    return t if t is None or not isinstance(t, torch.Tensor) else t.flatten(lead)


def _prior_for_reference(p, like):
    """A prior broadcastable to like [B, *] as the reference takes it: expanded, then flattened."""
    if not isinstance(p, torch.Tensor):
        return p
    return p.expand(like.shape).flatten(1)


# Priors / observation log-variances broadcastable to a [B, C, *spatial] shape.
def _broadcast_shapes(shape):
    B, C, *sp = shape
    return {"channel": (C, *[1] * len(sp)), "element": tuple(shape[1:]), "full": tuple(shape),
            "batch_channel": (B, C, *[1] * len(sp)), "scalar_tensor": ()}


PRIOR_KINDS = ["none", "float", "channel", "element", "full", "batch_channel", "scalar_tensor"]


def _broadcast_tensor(kind, shape, gen, lo, hi):
    """(tensor or number or None, number of values its gradient sums)."""
    if kind == "none":
        return None, 1
    if kind == "float":
        return lo / 2 + hi / 2, 1
    s = _broadcast_shapes(shape)[kind]
    return rand(s, gen, lo, hi, dtype=torch.float64), math.prod(shape) // max(1, math.prod(s))


def _layouted(api, t, layout, names, samples=()):
    """The backend's inputs `names` in `layout` (a differentiable copy of the leaf; the channel dim is 2 for
    the K-sample tensors `samples`); the reference's, and the small broadcast tensors, as they are."""
    if api.backend is None:
        return t
    return {n: in_layout(v, layout, 2 if n in samples else 1) if n in names else v for n, v in t.items()}


# ---------------------------------------------------------------------------
# Case builders.
# ---------------------------------------------------------------------------
def kl_nd_case(ndim, prior, layout, gen, free_bits=None):
    shape = Z_SHAPES[ndim]
    T = {"mu": randn(shape, gen).double(), "logvar": rand(shape, gen, -3, 2, dtype=torch.float64)}
    pmu, n_pmu = _broadcast_tensor(prior, shape, gen, -0.5, 0.5)
    plv, n_plv = _broadcast_tensor(prior, shape, gen, -1.0, 1.0)
    n_grad = {}
    for name, v, n in (("prior_mu", pmu, n_pmu), ("prior_logvar", plv, n_plv)):
        if isinstance(v, torch.Tensor):
            T[name], n_grad[name] = v, n

    def call(api, t):
        t = _layouted(api, t, layout, ("mu", "logvar"))
        pm, pl = t.get("prior_mu", pmu), t.get("prior_logvar", plv)
        if api.backend is None:
            mu, lv = _flat(t["mu"]), _flat(t["logvar"])
            pm, pl = _prior_for_reference(pm, t["mu"]), _prior_for_reference(pl, t["mu"])
        else:
            mu, lv = t["mu"], t["logvar"]
        if free_bits is None:
            return api.gaussian_kl(mu, lv, pm, pl)
        return api.free_bits_kl(mu, lv, free_bits, pm, pl)

    D = math.prod(shape[1:])
    return Case(T, tuple(T), call, n_out=(D,), n_grad=n_grad)


def bernoulli_nd_case(ndim, layout, gen):
    shape = X_SHAPES[ndim]
    T = {"logits": randn(shape, gen, 3.0).double(), "x": rand(shape, gen, 0, 1, dtype=torch.float64)}

    def call(api, t):
        t = _layouted(api, t, layout, ("logits", "x"))
        if api.backend is None:
            return api.bernoulli_log_prob(_flat(t["logits"]), _flat(t["x"]))
        return api.bernoulli_log_prob(t["logits"], t["x"])

    return Case(T, ("logits", "x"), call, n_out=(math.prod(shape[1:]),))


def gaussian_nd_case(ndim, obs, layout, gen):
    shape = X_SHAPES[ndim]
    T = {"mean": randn(shape, gen).double(), "x": randn(shape, gen).double()}
    s, n = _broadcast_tensor(obs, shape, gen, -2.0, 2.0)
    n_grad = {}
    if isinstance(s, torch.Tensor):
        T["s"], n_grad["s"] = s, n

    def call(api, t):
        t = _layouted(api, t, layout, ("mean", "x"))
        lv = t.get("s", 0.0 if s is None else s)
        if api.backend is None:
            return api.gaussian_log_prob(_flat(t["mean"]), _flat(t["x"]), _prior_for_reference(lv, t["mean"]))
        return api.gaussian_log_prob(t["mean"], t["x"], lv)

    return Case(T, tuple(T), call, n_out=(math.prod(shape[1:]),), n_grad=n_grad)


def elbo_nd_case(ndim, likelihood, layout, gen, K=None, loss=None):
    """elbo (or ELBOLoss with reduction `loss`) on [B, *x] data and [B, *z] latents; recon [K, B, *x] for K."""
    xs, zs = X_SHAPES[ndim], Z_SHAPES[ndim]
    rs = xs if K is None else (K, *xs)
    if likelihood == "bernoulli":
        T = {"x": rand(xs, gen, 0, 1, dtype=torch.float64), "recon": randn(rs, gen, 3.0).double()}
    else:
        T = {"x": randn(xs, gen).double(), "recon": randn(rs, gen).double(),
             "s": rand(_broadcast_shapes(xs)["channel"], gen, -1, 1, dtype=torch.float64)}
    T.update({"mu": randn(zs, gen).double(), "logvar": rand(zs, gen, -3, 2, dtype=torch.float64),
              "prior_mu": randn(_broadcast_shapes(zs)["channel"], gen, 0.5).double()})
    lead = 1 if K is None else 2

    def call(api, t):
        t = _layouted(api, t, layout, ("x", "recon", "mu", "logvar"), ("recon",) if K else ())
        kw = {"likelihood": likelihood, "obs_logvar": t.get("s")}
        if api.backend is None:
            x, recon, mu, lv = _flat(t["x"]), _flat(t["recon"], lead), _flat(t["mu"]), _flat(t["logvar"])
            kw["prior_mu"] = _prior_for_reference(t["prior_mu"], t["mu"])
            if "s" in t:
                kw["obs_logvar"] = _prior_for_reference(t["s"], t["x"])
        else:
            x, recon, mu, lv = t["x"], t["recon"], t["mu"], t["logvar"]
            kw["prior_mu"] = t["prior_mu"]
        if loss is not None:
            return api.loss(recon, x, mu, lv, beta=0.7, reduction=loss, **kw)
        return api.elbo(recon, x, mu, lv, beta=0.7, **kw)

    Dx, Dz = math.prod(xs[1:]), math.prod(zs[1:])
    n_grad = {"prior_mu": xs[0] * math.prod(zs[2:]), "s": (K or 1) * xs[0] * math.prod(xs[2:])}
    n_out = (Dx + Dz, Dx, Dz) if loss is None else ((Dx + Dz) * (xs[0] if loss != "none" else 1),)
    return Case(T, tuple(T), call, n_out=n_out, n_grad={k: v for k, v in n_grad.items() if k in T})


def iwae_nd_case(ndim, likelihood, layout, gen, K=3):
    xs, zs = X_SHAPES[ndim], Z_SHAPES[ndim]
    if likelihood == "bernoulli":
        T = {"x": rand(xs, gen, 0, 1, dtype=torch.float64), "recon": randn((K, *xs), gen, 2.0).double()}
    else:
        T = {"x": randn(xs, gen).double(), "recon": randn((K, *xs), gen).double()}
    T.update({"mu": randn(zs, gen, 0.5).double(), "logvar": rand(zs, gen, -1, 0.5, dtype=torch.float64)})
    T["z"] = (T["mu"] + randn((K, *zs), gen, 0.7)).double()

    def call(api, t):
        if api.backend is None:
            return api.iwae_bound(_flat(t["recon"], 2), _flat(t["x"]), _flat(t["z"], 2), _flat(t["mu"]),
                                  _flat(t["logvar"]), likelihood=likelihood)
        lay = _layouted(api, t, layout, tuple(t), ("recon", "z"))
        return api.iwae_bound(lay["recon"], lay["x"], lay["z"], lay["mu"], lay["logvar"], likelihood=likelihood)

    Dx, Dz = math.prod(xs[1:]), math.prod(zs[1:])
    return Case(T, tuple(T), call, n_out=(Dx + 2 * Dz,), grads_baseline_rule=True)


def rsample_eps_nd_case(ndim, layout, gen, K=None):
    zs = Z_SHAPES[ndim]
    T = {"mu": randn(zs, gen).double(), "logvar": rand(zs, gen, -3, 2, dtype=torch.float64),
         "eps": randn(zs if K is None else (K, *zs), gen).double()}

    def call(api, t):
        if api.backend is None:
            return R.rsample(t["mu"], t["logvar"], eps=t["eps"])  # elementwise: any shape
        e = in_layout(t["eps"], layout, 1 if K is None else 2)
        return api.rsample(in_layout(t["mu"], layout), in_layout(t["logvar"], layout), eps=e)

    return Case(T, tuple(T), call)


# ---------------------------------------------------------------------------
# The suite.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("prior", PRIOR_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_kl_nd(fused, dtype, prior, ndim, layout):
    run(kl_nd_case(ndim, prior, layout, generator_for("kl nd", prior, ndim, layout)), fused, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("prior", ["none", "channel", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_free_bits_kl_nd(fused, dtype, prior, ndim, layout):
    run(kl_nd_case(ndim, prior, layout, generator_for("fb nd", prior, ndim, layout), free_bits=0.4), fused, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bernoulli_log_prob_nd(fused, dtype, ndim, layout):
    run(bernoulli_nd_case(ndim, layout, generator_for("bern nd", ndim, layout)), fused, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("obs", ["float", "channel", "element", "full", "batch_channel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_log_prob_nd(fused, dtype, obs, ndim, layout):
    run(gaussian_nd_case(ndim, obs, layout, generator_for("gauss nd", obs, ndim, layout)), fused, dtype)


@pytest.mark.parametrize("K", [None, 2], ids=["one", "K2"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_elbo_nd(fused, dtype, likelihood, ndim, layout, K):
    run(elbo_nd_case(ndim, likelihood, layout, generator_for("elbo nd", likelihood, ndim, layout, K), K=K), fused,
        dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_elbo_loss_nd(fused, dtype, ndim, layout, reduction):
    case = elbo_nd_case(ndim, "gaussian", layout, generator_for("loss nd", ndim, layout, reduction), loss=reduction)
    run(case, fused, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_iwae_bound_nd(fused, dtype, likelihood, ndim, layout):
    run(iwae_nd_case(ndim, likelihood, layout, generator_for("iwae nd", likelihood, ndim, layout)), fused, dtype)


@pytest.mark.parametrize("K", [None, 3], ids=["one", "K3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rsample_eps_nd(fused, dtype, ndim, layout, K):
    run(rsample_eps_nd_case(ndim, layout, generator_for("rsample nd", ndim, layout, K), K=K), fused, dtype)


@pytest.mark.parametrize("K", [None, 3], ids=["one", "K3"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ndim", NDIMS)
def test_rsample_seed_nd(fused, ndim, layout, K):
    """Drawn noise: the same numbers as rsample on the [B, D] rows read in memory order (the documented
    contract: a channels-last latent gets them at other logical positions, as torch.randn_like does); z
    in mu's shape and layout; gradients as the reference's on those rows."""
    gen = generator_for("rsample seed nd", ndim, layout, K)
    zs = Z_SHAPES[ndim]
    mu = in_layout(randn(zs, gen).to(fused.device), layout).requires_grad_(True)
    lv = in_layout(rand(zs, gen, -2, 1).to(fused.device), layout).requires_grad_(True)
    z = fastelbo.rsample(mu, lv, seed=123, num_samples=K, backend=fused.name)
    assert z.shape == ((K,) if K else ()) + zs
    mem = [0] + [d for d in range(2, ndim)] + [1] if layout == "channels_last" else list(range(ndim))
    inverse = sorted(range(ndim), key=mem.__getitem__)
    rows = lambda t: t.permute(mem).reshape(zs[0], -1)  # noqa: E731
    zr = R.rsample(rows(mu.detach().cpu()), rows(lv.detach().cpu()), seed=123, num_samples=K)
    zr = zr.reshape(((K,) if K else ()) + tuple(zs[d] for d in mem))
    zr = zr.permute([0] + [d + 1 for d in inverse] if K else inverse)
    torch.testing.assert_close(z.detach().cpu(), zr, rtol=1e-5, atol=1e-6)


def test_shape_errors_name_both_shapes():
    mu = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"logvar.*\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        fastelbo.gaussian_kl(mu, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"prior_mu of shape \(3, 2, 1\) must broadcast to mu's shape \(2, 3, 4, 4\)"):
        fastelbo.gaussian_kl(mu, mu, prior_mu=torch.zeros(3, 2, 1))
    with pytest.raises(ValueError, match=r"logits.*\(2, 1, 8, 8\).*\(2, 1, 8, 7\)"):
        fastelbo.bernoulli_log_prob(torch.zeros(2, 1, 8, 7), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"recon.*\[K, \*x.shape\].*\(2, 1, 8, 8\).*\(3, 2, 1, 8, 7\)"):
        fastelbo.elbo(recon=torch.zeros(3, 2, 1, 8, 7), x=torch.zeros(2, 1, 8, 8), mu=mu, logvar=mu)
    with pytest.raises(ValueError, match=r"batch size of x \(2\); got 3"):
        fastelbo.elbo(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(3, 4, 2, 2),
                      torch.zeros(3, 4, 2, 2))
