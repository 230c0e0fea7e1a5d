"""fastelbo.diagnostics against direct computations with fastelbo.reference (every fused backend), and the
posterior gap against the KL to the true posterior of a linear-Gaussian model, where both are known."""

from __future__ import annotations

import math

import pytest
import torch

import fastelbo
from fastelbo import diagnostics as D
from fastelbo import reference as R
from cases import Case, _prior, run
from helpers import assert_close, dtype_params, generator_for, rand, randn


# ---------------------------------------------------------------------------
# kl_per_dim
# ---------------------------------------------------------------------------
def _column(p, j):
    return p[..., j:j + 1] if isinstance(p, torch.Tensor) and p.dim() > 0 else p


def kl_per_dim_case(B, Dz, prior, gen, layout):
    T = {"mu": randn((B, Dz), gen).double(), "logvar": rand((B, Dz), gen, -3, 2, dtype=torch.float64)}
    PT, kw, n_grad = _prior(prior, B, Dz, gen)
    T.update(PT)

    def call(api, t):
        if api.backend is not None:
            return D.kl_per_dim(t["mu"], t["logvar"], **kw(t), backend=api.backend)
        # The reference, written out: dimension j alone is a [B, 1] latent; its KL averaged over the batch.
        k = kw(t)
        return torch.cat([R.gaussian_kl(t["mu"][:, j:j + 1], t["logvar"][:, j:j + 1], _column(k.get("prior_mu"), j),
                                        _column(k.get("prior_logvar"), j)).mean(0, keepdim=True) for j in range(Dz)])

    return Case(T, tuple(T), call, n_out=(B,), n_grad=n_grad, layout={"mu": layout, "logvar": layout})


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "colslice"])
@pytest.mark.parametrize("prior", ["none", "vec", "row", "full", "float", "scalar_tensor"])
@pytest.mark.parametrize("shape", [(5, 3), (17, 1), (4, 33), (0, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", dtype_params())
def test_kl_per_dim(fused, dtype, shape, prior, layout):
    run(kl_per_dim_case(*shape, prior, generator_for("kl_per_dim", shape, prior, layout), layout), fused, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kl_per_dim_image_shaped(fused, layout):
    """[B, C, h, w] latents: one KL per latent element, [C, h, w], the [B, D] result in place."""
    gen = generator_for("kl_per_dim nd", layout)
    mu, logvar = randn((5, 3, 2, 4), gen, dtype=torch.float64), rand((5, 3, 2, 4), gen, dtype=torch.float64)
    pmu = randn((3, 1, 1), gen, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    got = D.kl_per_dim(mu.contiguous(memory_format=fmt).to(fused.device),
                       logvar.contiguous(memory_format=fmt).to(fused.device), pmu.to(fused.device),
                       backend=fused.name)
    want = D.kl_per_dim(mu.flatten(1), logvar.flatten(1), pmu.expand(mu.shape[1:]).reshape(-1),
                        backend="reference").reshape(3, 2, 4)
    assert got.shape == (3, 2, 4)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


def test_kl_per_dim_sums_to_the_batch_mean_kl():
    gen = generator_for("kl_sum")
    mu, logvar = randn((8, 5), gen), rand((8, 5), gen)
    assert torch.allclose(D.kl_per_dim(mu, logvar).sum(), fastelbo.gaussian_kl(mu, logvar).mean(), rtol=1e-6)


def test_kl_per_dim_bad_input():
    mu = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"logvar must be a 2-D \[B, Dz\] tensor; got shape \(4, 3, 1\)"):
        D.kl_per_dim(mu, mu[..., None])
    with pytest.raises(ValueError, match=r"mu \(4, 3\) and logvar \(4, 2\) must have the same shape"):
        D.kl_per_dim(mu, mu[:, :2])
    with pytest.raises(ValueError, match=r"prior_mu must be .* mu's \[B, Dz\] = \[4, 3\]; got \[2\]"):
        D.kl_per_dim(mu, mu, prior_mu=torch.zeros(2))


# ---------------------------------------------------------------------------
# active_units
# ---------------------------------------------------------------------------
def test_active_units():
    """Per dimension, the variance over the data of the posterior mean against the threshold 0.01."""
    gen = generator_for("au")
    n = 500
    scales = torch.tensor([1.0, 0.3, 0.05, 0.0, 2.0], dtype=torch.float64)  # variances ~1, 0.09, 0.0025, 0, 4
    mu = (randn((n, 5), gen) * scales + 3.0).float()  # an offset: the mean is subtracted before squaring
    au = D.active_units(mu)
    direct = mu.double().var(0, correction=0)  # Burda et al.: Cov over the data, divided by N
    assert torch.allclose(au.variance.double(), direct.to(torch.float32).double(), rtol=1e-6, atol=0)
    assert au.active.tolist() == (direct > 0.01).tolist() == [True, True, False, False, True]
    assert au.count == 3 and au.variance.dtype == torch.float32
    assert D.active_units(mu, threshold=0.0).count == 4  # strictly greater: the constant dimension is never active


def test_active_units_bad_input():
    with pytest.raises(ValueError, match="2 or more data points"):
        D.active_units(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[N, Dz\] tensor of posterior means; got \(3,\)"):
        D.active_units(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        D.active_units(torch.zeros(3, 2), threshold=float("nan"))


# ---------------------------------------------------------------------------
# posterior_gap
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_posterior_gap_matches_reference(fused, dtype, likelihood):
    gen = generator_for("gap", likelihood)
    K, B, Dx, Dz = 6, 9, 13, 4
    x = rand((B, Dx), gen, 0, 1, dtype=dtype) if likelihood == "bernoulli" else randn((B, Dx), gen, dtype=dtype)
    mu, logvar = randn((B, Dz), gen, dtype=dtype), rand((B, Dz), gen, -2, 1, dtype=dtype)
    z = R.rsample(mu, logvar, num_samples=K, seed=5)
    recon = randn((K, B, Dx), gen, 2.0, dtype=dtype)
    kw = dict(likelihood=likelihood, prior_mu=0.2, obs_logvar=-0.3 if likelihood == "gaussian" else None)
    dev = fused.device
    out = D.posterior_gap(x.to(dev), recon.to(dev), z.to(dev), mu.to(dev), logvar.to(dev), backend=fused.name, **kw)
    iwae = R.iwae_bound(recon, x, z, mu, logvar, **kw)
    elbo = R.elbo(recon, x, mu, logvar, **kw).elbo
    assert_close(out.iwae, iwae, n=Dx + 2 * Dz, name="iwae")
    assert_close(out.elbo, elbo, n=Dx + Dz, name="elbo")
    d = (iwae - elbo).double()
    scale = max(1.0, iwae.abs().max().item())  # the difference of two bounds: its error is the bounds' own
    tol = 1e-4 * scale if dtype == torch.float32 else 1e-10 * scale
    assert out.k == K
    assert abs(out.gap - d.mean().item()) < tol
    assert abs(out.stderr - d.std().item() / math.sqrt(B)) < tol


def _linear_gaussian(gen, B=64, Dx=5, Dz=3, obs_var=0.5):
    """p(z) = N(0, I), p(x | z) = N(W z + b, obs_var I) with W's columns orthogonal: the true posterior is the
    diagonal Gaussian N(S W^T (x - b) / obs_var, S), S = (I + W^T W / obs_var)^-1, and log p(x) is
    log N(x; b, W W^T + obs_var I)."""
    q, _ = torch.linalg.qr(randn((Dx, Dz), gen, dtype=torch.float64))
    W = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    b = randn((Dx,), gen, dtype=torch.float64)
    x = randn((B, Dx), gen, 2.0, dtype=torch.float64) + b
    s = 1.0 / (1.0 + (W * W).sum(0) / obs_var)  # diagonal of S
    post_mu = (x - b) @ W * s / obs_var
    post_lv = torch.log(s).expand(B, Dz)
    cov = W @ W.T + obs_var * torch.eye(Dx, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    return W, b, x, post_mu, post_lv, log_px


def test_posterior_gap_is_the_kl_to_the_true_posterior(fused):
    """log p(x) = ELBO + KL(q || p(z|x)): with q the exact posterior the IWAE bound is log p(x) for every
    sample and the gap is 0 in expectation; with q off by a known amount the gap is that KL (K = 512: the
    IWAE bias, about Var(w) / 2K, is under 1e-3 nats here), both within 5 standard errors of the estimate."""
    gen = generator_for("linear gaussian")
    W, b, x, post_mu, post_lv, log_px = _linear_gaussian(gen)
    obs_lv = math.log(0.5)
    for shift_mu, shift_lv in ((0.0, 0.0), (0.2, 0.3)):
        mu, logvar = post_mu + shift_mu, post_lv + shift_lv
        z = R.rsample(mu, logvar, num_samples=512, seed=17)
        recon = z @ W.T + b
        dev = fused.device
        gap = D.posterior_gap(x.to(dev), recon.to(dev), z.to(dev), mu.to(dev), logvar.to(dev),
                              likelihood="gaussian", obs_logvar=obs_lv, backend=fused.name)
        true_kl = R.gaussian_kl(mu, logvar, post_mu, post_lv).mean().item()
        if shift_mu == 0.0:
            assert true_kl == 0.0
            assert torch.allclose(gap.iwae.cpu(), log_px, rtol=0, atol=1e-9)  # every weight is p(x)
        assert abs(gap.gap - true_kl) < 5 * gap.stderr + 1e-3, (gap, true_kl)
        if shift_mu:
            assert gap.gap > 10 * gap.stderr  # and the estimate resolves a KL of this size
