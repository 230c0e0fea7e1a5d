"""The ground truth: the public API written with torch.distributions.

Every kernel of every backend is tested against these functions, and the
benchmarks time them (eager and under torch.compile) as the baseline. They
take the same arguments as the public API (priors and observation
log-variance broadcast by torch's own rules) and do no argument checking of
their own: fastelbo's API validates before it calls them.

Noise: ``rsample`` follows docs/design.md §3 (Philox4x32-10 as tl.randn4x,
see fastelbo._philox), so one seed gives the same z here as in every kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributions import Bernoulli, Normal

from . import _philox
from ._dtypes import acc_dtype
from ._seed import seed_tensor
from ._argorder import bind
from ._validate import num_samples_value, unit_interval

__all__ = ["ELBOTerms", "rsample", "standard_normal", "gaussian_kl", "bernoulli_log_prob", "gaussian_log_prob", "elbo",
           "iwae_log_weights", "iwae_bound", "free_bits_kl"]


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


def rsample(mu, logvar, *, num_samples=None, generator=None, seed=None, eps=None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps: Normal(mu, exp(logvar / 2)).rsample() with eps given.

    num_samples=K: z of shape [K, B, Dz], eps over the logical [K, B, Dz] index (docs/design.md §3).
    """
    num_samples = num_samples_value(num_samples, mu)  # the API's own check: K >= 1, z within int64 bytes
    q = Normal(mu, _std(logvar), validate_args=False)
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    if eps is None:
        s = seed_tensor(mu.device, generator, seed)
        eps = standard_normal(s, shape, dtype=mu.dtype, device=mu.device)
    # Normal.rsample is loc + eps * scale with eps drawn inside; the noise here is fastelbo's.
    return q.loc + eps * q.scale


def _prior_params(prior_mu, prior_logvar, like) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of p(z) = N(prior_mu, e^prior_logvar) as tensors of like's shape and dtype,
    a missing half standard (mean 0, log-variance 0)."""
    def param(value):
        return torch.zeros_like(like) if value is None else torch.as_tensor(value, dtype=like.dtype, device=like.device)

    return param(prior_mu).expand_as(like), param(prior_logvar).expand_as(like)


def _prior_normal(prior_mu, prior_logvar, like) -> Normal:
    """p(z): N(prior_mu, e^prior_logvar), a missing half standard (mean 0, log-variance 0)."""
    pmu, plv = _prior_params(prior_mu, prior_logvar, like)
    return Normal(pmu, _std(plv), validate_args=False)


def _kl_elements(mu, logvar, prior_mu, prior_logvar) -> torch.Tensor:
    """KL(q || p) per latent element, [B, Dz]: torch.distributions' kl_divergence(Normal, Normal),
    0.5 * (var_ratio + t1 - 1 - log var_ratio), with the variance ratio taken from the log-variances.

    kl_divergence forms var_ratio = (e^(lv/2) / e^(plv/2))^2 and then its log: the square underflows
    to 0 (KL inf) for a float32 logvar below about -104 and overflows to inf (KL inf - inf = NaN)
    above about 88, where the KL is finite, resp. +inf. Here var_ratio = e^(lv - plv) and
    log var_ratio = lv - plv exactly: the KL is right to rounding for very negative log-variances
    and +inf for very positive ones, in every dtype, as in the kernels (which also say inf where
    e^(lv - plv) overflows but half of it would not). t1 is kl_divergence's own.
    tests/test_reference.py holds this form to kl_divergence on ordinary values.
    """
    pmu, plv = _prior_params(prior_mu, prior_logvar, mu)
    log_ratio = logvar - plv
    t1 = ((mu - pmu) / _std(plv)).pow(2)
    return 0.5 * (torch.exp(log_ratio) + t1 - 1 - log_ratio)


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL(N(mu, e^logvar) || prior) summed over the last dimension; prior N(0, I) when none."""
    return _kl_elements(mu, logvar, prior_mu, prior_logvar).sum(-1)


def free_bits_kl(mu, logvar, free_bits, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """KL per row with free bits (Kingma et al. 2016): dimensions whose batch-mean KL is below
    `free_bits` nats count as exactly `free_bits` (no gradient), so that the batch mean of the
    result is sum_j torch.clamp(mean_b KL[b, j], min=free_bits).

    A dimension whose batch-mean KL is NaN is NaN under the clamp (max(free_bits, NaN) is NaN):
    it is NaN in every row, and so is the gradient of each of its elements (mu, logvar and the
    priors), whichever row the NaN came from. (torch.clamp's own autograd would pass 0 there, a
    silent zero gradient under a NaN loss; free bits keep the NaN visible instead.)"""
    kl = _kl_elements(mu, logvar, prior_mu, prior_logvar)
    return _floored(kl, kl.mean(0).detach(), free_bits).sum(-1)


def _floored(kl, kl_dims, free_bits) -> torch.Tensor:
    """KL[b, j] under free bits: free_bits where kl_dims[j] < free_bits (torch.clamp's test: False for
    NaN), KL[b, j] times 1 where kl_dims[j] >= free_bits, times NaN where kl_dims[j] is NaN."""
    nan_dims = torch.where(torch.isnan(kl_dims), math.nan, 1.0).to(kl.dtype)
    return torch.where(kl_dims < free_bits, free_bits, kl * nan_dims)


def bernoulli_log_prob(logits, x) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed over the last dimension; x may be continuous in [0, 1]."""
    return Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)


def gaussian_log_prob(mean, x, logvar=0.0) -> torch.Tensor:
    """log N(x | mean, e^logvar) summed over the last dimension; logvar: number, [Dx] or [B, Dx]."""
    s = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    return Normal(mean, _std(s).expand_as(mean), validate_args=False).log_prob(x).sum(-1)


def elbo(*args, recon=None, x=None, mu=None, logvar=None, likelihood="bernoulli", obs_logvar=None, prior_mu=None,
         prior_logvar=None, beta=1.0) -> ELBOTerms:
    """elbo(recon, x, mu, logvar, *, ...) = log p(x | recon) - beta * KL(q(z|x) || p(z)), per row
    (argument order as fastelbo.elbo).

    recon may be [K, B, Dx] (K decoded samples of z): the log-likelihood is then their average.
    """
    recon, x, mu, logvar = bind("elbo", args, dict(recon=recon, x=x, mu=mu, logvar=logvar),
                                ("recon", "x", "mu", "logvar"))
    ll = _log_likelihood(x, recon, likelihood, obs_logvar)
    if recon.dim() == 3:
        ll = ll.mean(0)
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar)
    return ELBOTerms(ll - beta * kl, ll, kl)


def _log_likelihood(x, recon, likelihood, obs_logvar):
    """log p(x | recon) per row of recon ([B] or [K, B]; x broadcasts over the samples)."""
    if likelihood == "bernoulli":
        return bernoulli_log_prob(recon, x)
    return gaussian_log_prob(recon, x, 0.0 if obs_logvar is None else obs_logvar)


def iwae_log_weights(*args, recon=None, x=None, z=None, mu=None, logvar=None, likelihood="bernoulli",
                     obs_logvar=None, prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """iwae_log_weights(recon, x, z, mu, logvar, *, ...):
    log w[k, b] = log p(x_b | z_kb) + log p(z_kb) - log q(z_kb | x_b), shape [K, B]."""
    recon, x, z, mu, logvar = bind("iwae_log_weights", args, dict(recon=recon, x=x, z=z, mu=mu, logvar=logvar),
                                   ("recon", "x", "z", "mu", "logvar"))
    q = Normal(mu, _std(logvar), validate_args=False)
    log_q = q.log_prob(z).sum(-1)
    log_p = _prior_normal(prior_mu, prior_logvar, mu).log_prob(z).sum(-1)
    return _log_likelihood(x, recon, likelihood, obs_logvar) + log_p - log_q


def iwae_bound(*args, recon=None, x=None, z=None, mu=None, logvar=None, likelihood="bernoulli", obs_logvar=None,
               prior_mu=None, prior_logvar=None) -> torch.Tensor:
    """iwae_bound(recon, x, z, mu, logvar, *, ...): the importance-weighted bound (Burda et al. 2016)
    per row: log (1/K) sum_k w[k, b], [B] (argument order as fastelbo.iwae_bound).

    recon [K, B, Dx] is decoded from z [K, B, Dz] ~ q(z | x); K = 1 is the single-sample ELBO
    with the Monte Carlo KL, log p(x | z) + log p(z) - log q(z | x).
    """
    recon, x, z, mu, logvar = bind("iwae_bound", args, dict(recon=recon, x=x, z=z, mu=mu, logvar=logvar),
                                   ("recon", "x", "z", "mu", "logvar"))
    lw = iwae_log_weights(recon=recon, x=x, z=z, mu=mu, logvar=logvar, likelihood=likelihood, obs_logvar=obs_logvar,
                          prior_mu=prior_mu, prior_logvar=prior_logvar)
    return _log_mean_exp(lw)


def _log_mean_exp(lw: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k e^(lw[k]) over the samples (dim 0): torch.logsumexp, stable for large log-weights."""
    return torch.logsumexp(lw, dim=0) - math.log(lw.shape[0])


class _ReferenceOps:
    """The reference behind the op-level signatures (fastelbo._ops schemas), so
    the API can treat it as one more backend."""

    @staticmethod
    def rsample(mu, logvar, seed, eps, num_samples=0):
        shape = ((num_samples,) if num_samples > 0 else ()) + tuple(mu.shape)
        if eps is None:
            eps = standard_normal(seed, shape, dtype=mu.dtype, device=mu.device)
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
        return tuple(elbo(recon=recon, x=x, mu=mu, logvar=logvar, likelihood=likelihood, obs_logvar=obs_logvar, prior_mu=prior_mu,
                          prior_logvar=prior_logvar, beta=beta))

    @staticmethod
    def iwae_bound(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x=False):
        if validate_x and likelihood == "bernoulli":
            unit_interval(x)
        lw = iwae_log_weights(recon=recon, x=x, z=z, mu=mu, logvar=logvar, likelihood=likelihood,
                              obs_logvar=obs_logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
        return _log_mean_exp(lw), lw.to(acc_dtype(lw.dtype))

    @staticmethod
    def free_bits_kl(mu, logvar, prior_mu, prior_logvar, free_bits):
        kl_dims = _kl_elements(mu, logvar, prior_mu, prior_logvar).mean(0)
        return free_bits_kl(mu, logvar, free_bits, prior_mu, prior_logvar), kl_dims.detach().to(acc_dtype(mu.dtype))


OPS = _ReferenceOps()
