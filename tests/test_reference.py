"""fastelbo.reference on its own: it is the ground truth every backend is compared with, so where
it leaves torch.distributions (to stay exact where kl_divergence overflows) it is held to
torch.distributions on ordinary values, and its documented edge cases are pinned here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fastelbo import reference as R
from helpers import assert_close, dtype_params, generator_for, rand, randn

F64 = torch.float64


# ---------------------------------------------------------------------------
# KL: the closed form from the log-variances IS torch.distributions' KL on ordinary values.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("prior", ["none", "vec", "full", "float", "only_mu", "only_logvar"])
def test_kl_is_torch_distributions_kl_on_ordinary_values(prior):
    gen = generator_for("ref_kl", prior)
    B, Dz = 7, 11
    mu, lv = randn((B, Dz), gen, 1.5).double(), rand((B, Dz), gen, -6, 6, dtype=F64)
    pmu = {"vec": randn((Dz,), gen).double(), "full": randn((B, Dz), gen).double(), "float": 0.3,
           "only_mu": randn((Dz,), gen).double()}.get(prior)
    plv = {"vec": rand((Dz,), gen, -3, 3, dtype=F64), "full": rand((B, Dz), gen, -3, 3, dtype=F64), "float": -0.4,
           "only_logvar": rand((Dz,), gen, -3, 3, dtype=F64)}.get(prior)
    leaves = [t.requires_grad_() for t in (mu, lv, pmu, plv) if isinstance(t, torch.Tensor)]
    ours = R.gaussian_kl(mu, lv, pmu, plv)
    p_mu = torch.zeros(()).double() if pmu is None else torch.as_tensor(pmu, dtype=F64)
    p_lv = torch.zeros(()).double() if plv is None else torch.as_tensor(plv, dtype=F64)
    q, p = Normal(mu, torch.exp(0.5 * lv)), Normal(p_mu.expand(B, Dz), torch.exp(0.5 * p_lv).expand(B, Dz))
    theirs = kl_divergence(q, p).sum(-1)
    assert_close(ours, theirs.detach(), n=Dz, name="KL")
    g = randn((B,), gen).double()
    for leaf, a, b in zip(leaves, torch.autograd.grad(ours, leaves, g), torch.autograd.grad(theirs, leaves, g)):
        assert_close(a, b, n=B if a.dim() < 2 else 1, name="KL gradient")


# ---------------------------------------------------------------------------
# KL for log-variances beyond the range of the scale e^(lv/2) and its square.
# ---------------------------------------------------------------------------
# Per dtype: log-variances where kl_divergence's (e^(lv/2))^2 underflows (KL inf) or overflows
# (inf - inf = NaN), and ordinary ones. (Not within log 2 below the overflow of e^lv, where
# 0.5 * e^lv is finite but e^lv is not: there every backend, like the reference, says inf.)
EXTREME_LOGVARS = {
    torch.float32: [-300.0, -120.0, -104.5, -90.0, 0.5, 95.0, 120.0, 200.0],
    torch.float64: [-1500.0, -800.0, -746.0, -120.0, 0.5, 720.0, 800.0],
    torch.float16: [-60000.0, -120.0, -20.0, 0.5, 13.0, 20.0],
    torch.bfloat16: [-10000.0, -200.0, -120.0, 0.5, 100.0, 200.0],
}
# A few units in the last place of each dtype: the reference rounds a handful of times.
ULPS = {torch.float32: 2.0**-21, torch.float64: 2.0**-50, torch.float16: 2.0**-8, torch.bfloat16: 2.0**-5}


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("prior", ["none", "full"])
def test_kl_extreme_logvar_is_exact(dtype, prior):
    """0.5 * (e^(lv - plv) + (mu - pmu)^2 e^-plv - 1 - (lv - plv)) and its gradient, rounded once
    from float64 (exp(-1500) = 0 there is exact to far below float64's rounding of the sum)."""
    lv64 = torch.tensor(EXTREME_LOGVARS[dtype], dtype=F64)
    mu64 = torch.linspace(-1.0, 1.5, lv64.numel(), dtype=F64)
    pmu64, plv64 = (torch.zeros_like(mu64), torch.zeros_like(mu64)) if prior == "none" else (
        torch.full_like(mu64, 0.25), torch.full_like(mu64, 0.75))
    mu, lv = mu64.to(dtype)[None].requires_grad_(), lv64.to(dtype)[None].requires_grad_()
    pmu, plv = (None, None) if prior == "none" else (pmu64.to(dtype)[None], plv64.to(dtype)[None])
    kl = R._kl_elements(mu, lv, pmu, plv)
    dmu, dlv = torch.autograd.grad(kl.sum(), [mu, lv])
    # The truth from the (exact) low-dtype inputs, in float64 (where exp leaves its range: 0 / inf).
    m, v = mu.detach().double()[0], lv.detach().double()[0]
    ratio = torch.exp(v - plv64)
    truth = 0.5 * (ratio + (m - pmu64) ** 2 * torch.exp(-plv64) - 1 - (v - plv64))
    truth_dmu = (m - pmu64) * torch.exp(-plv64)
    truth_dlv = 0.5 * (ratio - 1)
    for name, got, want in (("KL", kl[0], truth), ("dKL/dmu", dmu[0], truth_dmu), ("dKL/dlogvar", dlv[0], truth_dlv)):
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=ULPS[dtype], atol=0.0,
                                   msg=lambda s, name=name: f"{name} ({dtype}) at logvar {lv64.tolist()}: {s}")
    below = lv64 < -50  # where kl_divergence said inf: finite now, and the gradient -1/2 (dKL/dlogvar)
    assert torch.isfinite(kl[0][below]).all() and (dlv[0][below] == -0.5).all(), (kl, dlv)


def test_kl_reproducer_logvar_minus_120():
    """The fuzzing reproducer: float32 logvar -120, mu 0 has KL 0.5 * (120 - 1) = 59.5 (was inf)."""
    assert R.gaussian_kl(torch.zeros(1, 1), torch.tensor([[-120.0]])).item() == 59.5


# ---------------------------------------------------------------------------
# Free bits: a dimension whose batch-mean KL is NaN is NaN in every row, value and gradient.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("target", ["mu", "logvar", "prior_logvar"])
def test_free_bits_nan_dimension(dtype, target):
    gen = generator_for("ref_free_bits_nan", target)
    B, Dz, j, lam = 4, 3, 2, 0.25
    T = {"mu": randn((B, Dz), gen), "logvar": randn((B, Dz), gen, 0.1), "prior_mu": randn((B, Dz), gen, 0.1),
         "prior_logvar": randn((B, Dz), gen, 0.1)}
    T = {k: v.to(dtype).requires_grad_() for k, v in T.items()}
    with torch.no_grad():
        T[target][1, j] = math.nan
    kl = R.free_bits_kl(T["mu"], T["logvar"], lam, T["prior_mu"], T["prior_logvar"])
    assert torch.isnan(kl).all(), f"every row carries the NaN dimension: {kl}"
    assert torch.isnan(R._ReferenceOps.free_bits_kl(T["mu"], T["logvar"], T["prior_mu"], T["prior_logvar"], lam)[1][j])
    grads = torch.autograd.grad(kl, list(T.values()), torch.ones(B, dtype=dtype))
    for (name, t), g in zip(T.items(), grads):
        assert torch.isnan(g[:, j]).all(), f"d/d{name}[:, {j}] must be NaN in every row: {g[:, j]}"
        # The other dimensions are those of the inputs without dimension j.
        others = [i for i in range(Dz) if i != j]
        rest = {k: v.detach()[:, others].requires_grad_() for k, v in T.items()}
        want = torch.autograd.grad(R.free_bits_kl(rest["mu"], rest["logvar"], lam, rest["prior_mu"],
                                                  rest["prior_logvar"]).sum(), [rest[name]])[0]
        torch.testing.assert_close(g[:, others], want, msg=f"d/d{name} off the NaN dimension")


def test_free_bits_floored_and_kept_dimensions():
    """Below the floor: the floor and no gradient; at or above: the dimension's own KL and gradient."""
    mu = torch.tensor([[0.1, 2.0], [-0.1, 1.0]], dtype=F64, requires_grad=True)
    lv = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    kl_el = 0.5 * mu.detach() ** 2
    lam = float(kl_el[:, 1].mean())  # dimension 1 exactly at the floor: kept (torch.clamp's max)
    kl = R.free_bits_kl(mu, lv, lam)
    torch.testing.assert_close(kl, lam + kl_el[:, 1])
    (dmu,) = torch.autograd.grad(kl.sum(), [mu])
    torch.testing.assert_close(dmu, torch.stack([torch.zeros(2, dtype=F64), mu.detach()[:, 1]], 1))
