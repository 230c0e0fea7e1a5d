"""The ground truth: the public API written with torch.distributions.

Every kernel of every backend is tested against these functions, and the
benchmarks time them (eager and under torch.compile) as the baseline. They
take the same arguments as the public API (priors and observation
log-variance broadcast by torch's own rules) and do no argument checking of
their own: fastelbo's API validates before it calls them.

Noise: ``rsample`` follows DESIGN §2 (Philox4x32-10 as tl.randn4x, see
fastelbo._philox), so one seed gives the same z here as in every kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from . import _philox
from ._seed import seed_tensor
from ._validate import unit_interval

__all__ = ["ELBOTerms", "rsample", "standard_normal", "gaussian_kl", "bernoulli_log_prob", "gaussian_log_prob", "elbo"]


class ELBOTerms(NamedTuple):
    """Per-row terms of the bound, each of shape [B]."""

    elbo: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor


def standard_normal(seed, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """eps ~ N(0, I) of the given shape from the Philox stream of `seed`."""
    n = 1
    for s in shape:
        n *= int(s)
    return _philox.normals(seed, n, dtype=dtype, device=device).reshape(shape)


def _std(logvar: torch.Tensor) -> torch.Tensor:
    return torch.exp(0.5 * logvar)


def rsample(mu, logvar, *, generator=None, seed=None, eps=None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps: Normal(mu, exp(logvar / 2)).rsample() with eps given."""
    q = Normal(mu, _std(logvar), validate_args=False)
    if eps is None:
        s = seed_tensor(mu.device, generator, seed)
        eps = standard_normal(s, mu.shape, dtype=mu.dtype, device=mu.device)
    # Normal.rsample is loc + eps * scale with eps drawn inside; the noise here is fastelbo's.
    return q.loc + eps * q.scale


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL(N(mu, e^logvar) || prior) summed over the last dimension; prior N(0, I) when none."""
    q = Normal(mu, _std(logvar), validate_args=False)
    pmu = torch.zeros_like(mu) if prior_mu is None else torch.as_tensor(prior_mu, dtype=mu.dtype, device=mu.device)
    plv = (torch.zeros_like(mu) if prior_logvar is None
           else torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device))
    p = Normal(pmu.expand_as(mu), _std(plv).expand_as(mu), validate_args=False)
    return kl_divergence(q, p).sum(-1)


def bernoulli_log_prob(logits, x) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed over the last dimension; x may be continuous in [0, 1]."""
    return Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)


def gaussian_log_prob(mean, x, logvar=0.0) -> torch.Tensor:
    """log N(x | mean, e^logvar) summed over the last dimension; logvar: number, [Dx] or [B, Dx]."""
    s = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    return Normal(mean, _std(s).expand_as(mean), validate_args=False).log_prob(x).sum(-1)


def elbo(x, recon, mu, logvar, *, likelihood="bernoulli", obs_logvar=None, prior_mu=None, prior_logvar=None,
         beta=1.0) -> ELBOTerms:
    """elbo = log p(x | recon) - beta * KL(q(z|x) || p(z)), per row."""
    if likelihood == "bernoulli":
        ll = bernoulli_log_prob(recon, x)
    else:
        ll = gaussian_log_prob(recon, x, 0.0 if obs_logvar is None else obs_logvar)
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    return ELBOTerms(ll - beta * kl, ll, kl)


class _ReferenceOps:
    """The reference behind the op-level signatures (fastelbo._ops schemas), so
    the API can treat it as one more backend."""

    @staticmethod
    def rsample(mu, logvar, seed, eps):
        if eps is None:
            eps = standard_normal(seed, mu.shape, dtype=mu.dtype, device=mu.device)
        return rsample(mu, logvar, eps=eps)

    gaussian_kl = staticmethod(gaussian_kl)
    gaussian_log_prob = staticmethod(gaussian_log_prob)

    @staticmethod
    def bernoulli_log_prob(logits, x, validate_x=False):
        if validate_x:
            unit_interval(x)
        return bernoulli_log_prob(logits, x)

    @staticmethod
    def elbo(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x=False):
        if validate_x:
            unit_interval(x)
        return tuple(elbo(x, recon, mu, logvar, likelihood=likelihood, obs_logvar=obs_logvar, prior_mu=prior_mu,
                          prior_logvar=prior_logvar, beta=beta))


OPS = _ReferenceOps()
