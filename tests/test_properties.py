"""Hypothesis property tests over random shapes and values (bounded, deadline
off, few examples: the run stays fast, also through the Triton interpreter).

1. fastelbo == reference (values and gradients) for drawn shapes, value scales,
   dtypes and argument variants, with the harness and tolerances of test_accuracy;
2. mathematical invariants no reference is needed for: KL >= 0 and KL(q || q) = 0,
   Bernoulli symmetry ll(l, x) = ll(-l, 1 - x) and ll <= 0, additivity over
   columns, rows independent of each other, the fused ELBO equal to its parts,
   z = mu + e^(lv/2) eps with eps independent of mu and logvar, ELBOLoss reductions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastelbo
import cases as ta
from fastelbo import functional as F
from helpers import DTYPES, FUSED_BACKENDS, TOL, assert_close, generator_for, rand, randn

backends = pytest.mark.parametrize("backend", FUSED_BACKENDS)

rows = st.integers(0, 6)
cols = st.integers(1, 40)
seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
scales = st.sampled_from([0.1, 1.0, 3.0, 10.0])


# ---------------------------------------------------------------------------
# 1. Against the reference.
# ---------------------------------------------------------------------------
@backends
@settings(max_examples=30)
@given(B=rows, D=cols, seed=seeds, dtype=dtypes, prior=st.sampled_from(ta.PRIORS), lv_hi=st.sampled_from([1.0, 4.0]))
def test_kl_matches_reference(backend, B, D, seed, dtype, prior, lv_hi):
    ta.run(ta.kl_case(B, D, prior, generator_for(seed), lv_range=(-lv_hi, lv_hi)), backend, dtype)


@backends
@settings(max_examples=30)
@given(B=rows, D=cols, seed=seeds, dtype=dtypes, xkind=st.sampled_from(["binary", "continuous"]), scale=scales)
def test_bernoulli_matches_reference(backend, B, D, seed, dtype, xkind, scale):
    ta.run(ta.bernoulli_case(B, D, xkind, generator_for(seed), logit_scale=scale), backend, dtype)


@backends
@settings(max_examples=30)
@given(B=rows, D=cols, seed=seeds, dtype=dtypes, obs=st.sampled_from(ta.OBS))
def test_gaussian_matches_reference(backend, B, D, seed, dtype, obs):
    ta.run(ta.gaussian_case(B, D, obs, generator_for(seed)), backend, dtype)


@backends
@settings(max_examples=30)
@given(B=rows, Dx=cols, Dz=st.integers(1, 12), seed=seeds, dtype=dtypes, variant=st.sampled_from(ta.ELBO_VARIANTS),
       beta=st.floats(0.0, 4.0))
def test_elbo_matches_reference(backend, B, Dx, Dz, seed, dtype, variant, beta):
    likelihood, obs, prior, _ = variant
    ta.run(ta.elbo_case(B, Dx, Dz, likelihood, obs, prior, beta, generator_for(seed)), backend, dtype)


@backends
@settings(max_examples=30)
@given(B=rows, D=cols, seed=seeds, dtype=dtypes, mode=st.sampled_from(["seed", "eps"]))
def test_rsample_matches_reference(backend, B, D, seed, dtype, mode):
    ta.run(ta.rsample_case(B, D, mode, generator_for(seed)), backend, dtype)


# ---------------------------------------------------------------------------
# 2. Invariants (float64: exact up to rounding).
# ---------------------------------------------------------------------------
F64 = torch.float64


def _close(a, b, n, name):
    assert_close(a.cpu(), b.cpu().to(a.dtype), n=n, name=name)


@backends
@given(B=st.integers(1, 6), D=cols, seed=seeds)
def test_kl_nonnegative_and_zero_at_prior(backend, B, D, seed):
    g = generator_for(seed)
    mu, lv = randn((B, D), g, 2.0, dtype=F64).to(backend.device), rand((B, D), g, -3, 3, dtype=F64).to(backend.device)
    kl = F.gaussian_kl(mu, lv, randn((D,), g, dtype=F64).to(backend.device), rand((D,), g, -2, 2, dtype=F64).to(
        backend.device), backend=backend.name)
    assert (kl >= -TOL[F64].atol * math.sqrt(D)).all(), kl
    same = F.gaussian_kl(mu, lv, mu, lv, backend=backend.name)  # KL(q || q) = 0
    assert (same.abs() <= 1e-12 * D).all(), same
    std = F.gaussian_kl(torch.zeros_like(mu), torch.zeros_like(lv), backend=backend.name)  # q = N(0, I)
    assert (std == 0).all(), std


@backends
@given(B=st.integers(1, 6), D=cols, seed=seeds, scale=scales, binary=st.booleans())
def test_bernoulli_symmetry_and_sign(backend, B, D, seed, scale, binary):
    g = generator_for(seed)
    logits = randn((B, D), g, scale, dtype=F64).to(backend.device)
    x = rand((B, D), g, 0, 1, dtype=F64).to(backend.device)
    if binary:
        x = (x < 0.5).to(F64)
    ll = F.bernoulli_log_prob(logits, x, backend=backend.name)
    _close(F.bernoulli_log_prob(-logits, 1 - x, backend=backend.name), ll, D, "ll(-l, 1 - x) vs ll(l, x)")
    assert (ll <= 1e-12 * D).all(), ll  # a log-probability (x binary) or minus a cross-entropy (x in [0, 1])


@backends
@given(B=rows, D1=cols, D2=cols, seed=seeds)
def test_additive_over_columns(backend, B, D1, D2, seed):
    g = generator_for(seed)
    dev, be = backend.device, backend.name

    def pair(lo=-2.0, hi=2.0):
        return rand((B, D1 + D2), g, lo, hi, dtype=F64).to(dev), rand((B, D1 + D2), g, lo, hi, dtype=F64).to(dev)

    for fn, (a, b) in ((lambda a, b: F.gaussian_kl(a, b, backend=be), pair()),
                       (lambda a, b: F.bernoulli_log_prob(a, b.abs() / 2, backend=be), pair()),
                       (lambda a, b: F.gaussian_log_prob(a, b, b.flip(0).abs(), backend=be), pair())):
        whole = fn(a, b)
        parts = fn(a[:, :D1], b[:, :D1]) + fn(a[:, D1:], b[:, D1:])
        _close(whole, parts, D1 + D2, "f(A | B) vs f(A) + f(B)")


@backends
@given(B=st.integers(2, 8), D=cols, seed=seeds)
def test_rows_are_independent(backend, B, D, seed):
    """Permuting the batch permutes the results; a row's result does not depend on its neighbours."""
    g = generator_for(seed)
    dev, be = backend.device, backend.name
    x, recon = rand((B, D), g, 0, 1, dtype=F64).to(dev), randn((B, D), g, 2.0, dtype=F64).to(dev)
    mu, lv = randn((B, 3), g, dtype=F64).to(dev), rand((B, 3), g, -1, 1, dtype=F64).to(dev)
    perm = torch.randperm(B, generator=g).to(dev)
    terms = F.elbo(recon, x, mu, lv, beta=0.6, backend=be)
    permuted = F.elbo(recon[perm], x[perm], mu[perm], lv[perm], beta=0.6, backend=be)
    for a, b in zip(permuted, terms):
        _close(a, b[perm], D + 3, "permuted rows")
    single = F.elbo(recon[:1], x[:1], mu[:1], lv[:1], beta=0.6, backend=be)
    _close(single.elbo, terms.elbo[:1], D + 3, "row 0 alone")


@backends
@given(B=rows, Dx=cols, Dz=st.integers(1, 12), seed=seeds, beta=st.floats(0.0, 5.0), gaussian=st.booleans())
def test_fused_elbo_equals_its_parts(backend, B, Dx, Dz, seed, beta, gaussian):
    g = generator_for(seed)
    dev, be = backend.device, backend.name
    recon, mu = randn((B, Dx), g, dtype=F64).to(dev), randn((B, Dz), g, dtype=F64).to(dev)
    lv, pmu = rand((B, Dz), g, -2, 2, dtype=F64).to(dev), randn((Dz,), g, dtype=F64).to(dev)
    if gaussian:
        x, s = randn((B, Dx), g, dtype=F64).to(dev), rand((Dx,), g, -1, 1, dtype=F64).to(dev)
        terms = F.elbo(recon, x, mu, lv, likelihood="gaussian", obs_logvar=s, prior_mu=pmu, beta=beta, backend=be)
        ll = F.gaussian_log_prob(recon, x, s, backend=be)
    else:
        x = rand((B, Dx), g, 0, 1, dtype=F64).to(dev)
        terms = F.elbo(recon, x, mu, lv, prior_mu=pmu, beta=beta, backend=be)
        ll = F.bernoulli_log_prob(recon, x, backend=be)
    kl = F.gaussian_kl(mu, lv, pmu, backend=be)
    _close(terms.log_likelihood, ll, Dx, "elbo's log-likelihood vs the op alone")
    _close(terms.kl, kl, Dz, "elbo's KL vs the op alone")
    _close(terms.elbo, ll - beta * kl, Dx + Dz, "elbo vs loglik - beta * KL")
    losses = {r: fastelbo.ELBOLoss("gaussian" if gaussian else "bernoulli", beta=beta, reduction=r, backend=be)(
        recon, x, mu, lv, obs_logvar=s if gaussian else None, prior_mu=pmu) for r in ("none", "sum", "mean")}
    _close(losses["none"], -terms.elbo, Dx + Dz, "ELBOLoss none")
    _close(losses["sum"], -terms.elbo.sum(), B * (Dx + Dz), "ELBOLoss sum")
    if B:
        _close(losses["mean"], -terms.elbo.sum() / B, B * (Dx + Dz), "ELBOLoss mean")


@backends
@given(B=rows, D=cols, seed=seeds, noise_seed=st.integers(-(2**63), 2**63 - 1))
def test_rsample_is_location_scale_of_one_noise(backend, B, D, seed, noise_seed):
    """eps depends on (seed, element) only: z = mu + e^(lv/2) * rsample(0, 0) for the same seed."""
    g = generator_for(seed)
    dev, be = backend.device, backend.name
    mu, lv = randn((B, D), g, 3.0, dtype=F64).to(dev), rand((B, D), g, -4, 4, dtype=F64).to(dev)
    eps = F.rsample(torch.zeros_like(mu), torch.zeros_like(lv), seed=noise_seed, backend=be)
    z = F.rsample(mu, lv, seed=noise_seed, backend=be)
    _close(z, mu + torch.exp(lv / 2) * eps, 1, "z vs mu + std * eps")
    _close(F.rsample(mu, lv, eps=eps, backend=be), z, 1, "rsample(eps=) vs rsample(seed=)")
