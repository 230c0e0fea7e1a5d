"""fastelbo.estimate_log_likelihood: the importance-sampled log p(x), checked on a linear Gaussian model
whose marginal likelihood is known in closed form, and against iwae_bound for its chunking and seeding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastelbo
from helpers import generator_for, randn

BACKENDS = ["reference", "cpu"]


class LinearGaussian(torch.nn.Module):
    """p(z) = N(0, I), p(x | z) = N(W z + b, sigma^2 I) with orthogonal columns of W, so the exact posterior
    is diagonal: q = N(mu, diag(var)), var = 1 / (1 + d^2 / sigma^2), mu = var * W^T (x - b) / sigma^2."""

    def __init__(self, Dx=6, Dz=3, sigma2=0.5, shift=0.0):
        super().__init__()
        gen = generator_for("linear_gaussian", Dx, Dz)
        q, _ = torch.linalg.qr(randn((Dx, Dz), gen).double())
        self.d = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)[:Dz]
        self.W, self.b = q * self.d, randn((Dx,), gen).double()
        self.sigma2, self.shift = sigma2, shift  # shift: moves q's mean off the exact posterior

    def encode(self, x):
        var = 1.0 / (1.0 + self.d**2 / self.sigma2)
        mu = var * ((x - self.b) @ self.W) / self.sigma2 + self.shift
        return mu, torch.log(var).expand_as(mu)

    def decode(self, z):
        return z @ self.W.T + self.b

    def log_px(self, x):
        cov = self.W @ self.W.T + self.sigma2 * torch.eye(self.W.shape[0], dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def _data(model, B=16):
    gen = generator_for("lg_data", B)
    return model.decode(randn((B, model.W.shape[1]), gen).double()) + math.sqrt(model.sigma2) * randn(
        (B, model.W.shape[0]), gen).double()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_posterior_gives_exact_log_likelihood(backend):
    """With q the exact posterior every importance weight is p(x): any K gives log p(x) exactly."""
    model = LinearGaussian()
    x = _data(model)
    for K in (1, 7):
        est = fastelbo.estimate_log_likelihood(model, x, K=K, likelihood="gaussian", obs_logvar=math.log(model.sigma2),
                                               seed=3, backend=backend)
        torch.testing.assert_close(est, model.log_px(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_approximate_posterior_converges(backend):
    model = LinearGaussian(shift=0.4)
    x = _data(model, B=64)
    truth = model.log_px(x)
    kw = dict(likelihood="gaussian", obs_logvar=math.log(model.sigma2), seed=11, backend=backend)
    gap_1 = (truth - fastelbo.estimate_log_likelihood(model, x, K=1, **kw)).mean()
    gap_k = (truth - fastelbo.estimate_log_likelihood(model, x, K=2000, chunk_size=300, **kw)).mean()
    assert gap_1 > 0.1  # the single-sample bound is visibly loose with a shifted q
    # K = 2000 closes 98% of the gap (p-hat is unbiased for p(x), so log p-hat may overshoot a little).
    assert abs(gap_k) < 0.02 * gap_1 + 1e-3, (float(gap_1), float(gap_k))


def test_one_chunk_is_the_iwae_bound_of_that_seed():
    model = LinearGaussian(shift=0.2)
    x = _data(model)
    K = 9
    est = fastelbo.estimate_log_likelihood(model, x, K=K, chunk_size=K, likelihood="gaussian", obs_logvar=-0.3,
                                           seed=42, backend="cpu")
    mu, lv = model.encode(x)
    z = fastelbo.rsample(mu, lv, num_samples=K, seed=42, backend="cpu")
    bound = fastelbo.iwae_bound(model.decode(z), x, z, mu, lv, likelihood="gaussian", obs_logvar=-0.3, backend="cpu")
    torch.testing.assert_close(est, bound, rtol=1e-12, atol=1e-12)


def test_chunks_fold_into_one_log_sum_exp():
    """K = 10 in chunks of 4, 4, 2 with seeds s, s+1, s+2: the log-sum-exp of all 10 log-weights."""
    model = LinearGaussian(shift=0.3)
    x = _data(model)
    est = fastelbo.estimate_log_likelihood(model, x, K=10, chunk_size=4, likelihood="gaussian", obs_logvar=0.1,
                                           seed=5, backend="cpu")
    mu, lv = model.encode(x)
    lw = []
    for c, k in enumerate((4, 4, 2)):
        z = fastelbo.rsample(mu, lv, num_samples=k, seed=5 + c, backend="cpu")
        lw.append(fastelbo.reference.iwae_log_weights(model.decode(z), x, z, mu, lv, likelihood="gaussian",
                                                      obs_logvar=0.1))
    torch.testing.assert_close(est, torch.logsumexp(torch.cat(lw), 0) - math.log(10), rtol=1e-12, atol=1e-12)


def test_pair_of_callables_and_progress_bar(capsys):
    model = LinearGaussian()
    x = _data(model, B=4)
    est = fastelbo.estimate_log_likelihood((model.encode, model.decode), x, K=6, chunk_size=2, likelihood="gaussian",
                                           obs_logvar=math.log(model.sigma2), progress=True)
    assert est.shape == (4,)
    err = capsys.readouterr().err
    assert "3/3" in err or "samples 6/6" in err, err


def test_bernoulli_model_runs_without_gradients():
    """A small MLP VAE: finite estimates, no autograd graph, bounded by the K = 1 bound on average."""
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(12, 4), torch.nn.Linear(2, 12)

    def encode(x):
        return enc(x).chunk(2, dim=-1)

    x = (torch.rand(32, 12) > 0.5).float()
    est = fastelbo.estimate_log_likelihood((encode, dec), x, K=50, seed=1)
    one = fastelbo.estimate_log_likelihood((encode, dec), x, K=1, seed=1)
    assert torch.isfinite(est).all() and not est.requires_grad
    assert est.mean() > one.mean()


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"K": 0}, ValueError, "K must be an int >= 1"),
    ({"K": 2.5}, ValueError, "K must be an int >= 1"),
    ({"K": 4, "chunk_size": 0}, ValueError, "chunk_size must be an int >= 1"),
    ({"K": 2**63, "chunk_size": 2**63}, ValueError, r"K must be an int >= 1 and < 2\*\*63"),
])
def test_bad_arguments(kwargs, exc, match):
    model = LinearGaussian()
    with pytest.raises(exc, match=match):
        fastelbo.estimate_log_likelihood(model, _data(model, B=2), likelihood="gaussian", **kwargs)


def test_numpy_integer_seed():
    """A numpy integer seed is the seed of its value (as K and num_samples take numpy integers)."""
    model = LinearGaussian(shift=0.3)
    x = _data(model, B=4)
    kw = dict(K=5, likelihood="gaussian", obs_logvar=math.log(model.sigma2), backend="reference")
    torch.testing.assert_close(fastelbo.estimate_log_likelihood(model, x, seed=np.int64(3), **kw),
                               fastelbo.estimate_log_likelihood(model, x, seed=3, **kw), rtol=0, atol=0)


def test_model_fn_must_encode_and_decode():
    with pytest.raises(TypeError, match=r"model_fn must have encode\(x\) -> \(mu, logvar\) and decode\(z\)"):
        fastelbo.estimate_log_likelihood(lambda x: x, torch.rand(2, 3), K=2)
