"""Diagnostics of a trained VAE: how much each latent dimension is used, and how tight the bound is.

    kl = fastelbo.diagnostics.kl_per_dim(mu, logvar)            # [Dz]: the batch-mean KL free bits acts on
    au = fastelbo.diagnostics.active_units(mu_over_the_data)    # Burda et al. 2016
    gap = fastelbo.diagnostics.posterior_gap(x, recon, z, mu, logvar)   # IWAE_K - ELBO, with K and its error

The posterior gap rests on log p(x) = ELBO + KL(q(z|x) || p(z|x)): the IWAE
bound with K samples rises towards log p(x) as K grows, so IWAE_K - ELBO
estimates the KL between the approximate and the true posterior from below
(tighter with larger K).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import functional as F
from ._rows import Trailing

__all__ = ["kl_per_dim", "active_units", "ActiveUnits", "posterior_gap", "PosteriorGap", "ACTIVE_THRESHOLD"]

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2


def kl_per_dim(mu, logvar, prior_mu=None, prior_logvar=None, *, backend="auto") -> torch.Tensor:
    """The KL of each latent dimension averaged over the batch, [Dz]: mean_b KL(q(z_j | x_b) || p(z_j)).

    The number free bits floors (fastelbo.free_bits_kl); it sums to the batch mean of gaussian_kl.
    mu, logvar [B, Dz]; the prior as in gaussian_kl (numbers, [], [Dz], [1, Dz] or [B, Dz]). Differentiable.
    One fused gaussian_kl over the transposed [Dz, B] views: a row of those is one dimension.
    Image-shaped latents [B, *] give [*] (each element a dimension), priors broadcastable to mu's shape.
    """
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:
        if not isinstance(logvar, torch.Tensor) or logvar.shape != mu.shape:
            raise ValueError(f"logvar must have the shape of mu {tuple(mu.shape)}; got "
                             f"{tuple(logvar.shape) if isinstance(logvar, torch.Tensor) else type(logvar).__name__}")
        f = Trailing.of(mu, 1)
        per_dim = kl_per_dim(f(mu, 1), f(logvar, 1), f.broadcast(prior_mu, "prior_mu", mu, "mu"),
                             f.broadcast(prior_logvar, "prior_logvar", mu, "mu"), backend=backend)
        return f.back(per_dim.unsqueeze(0), 1).squeeze(0)
    _check_pair(mu, logvar)
    pmu, plv = (_transposed_prior(p, name, mu) for p, name in ((prior_mu, "prior_mu"), (prior_logvar, "prior_logvar")))
    return F.gaussian_kl(mu.t(), logvar.t(), pmu, plv, backend=backend) / mu.shape[0]


def _check_pair(mu, logvar):
    for t, name in ((mu, "mu"), (logvar, "logvar")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            what = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D [B, Dz] tensor; got {what}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")


def _transposed_prior(p, name, mu):
    """A prior half as the [Dz, B] view the transposed call reads (stride 0 where it broadcasts); numbers and
    0-dim tensors as they are. gaussian_kl checks the rest (dtype, device, values)."""
    if not isinstance(p, torch.Tensor) or p.dim() == 0:
        return p
    B, Dz = mu.shape
    if tuple(p.shape) not in ((Dz,), (1, Dz), (B, Dz)):
        raise ValueError(f"{name} must be a number or a tensor of shape [], [Dz], [1, Dz] or [B, Dz] with "
                         f"mu's [B, Dz] = {[B, Dz]}; got {list(p.shape)}")
    return p.expand(B, Dz).t()


class ActiveUnits(NamedTuple):
    count: int  # how many dimensions are active
    active: torch.Tensor  # [Dz] bool
    variance: torch.Tensor  # [Dz]: Cov_x(E_q[z_j]), the variance over the data of the posterior mean


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> ActiveUnits:
    """Active units (Burda et al. 2016): dimension j is active when Cov_x(E_{q(z|x)}[z_j]) > threshold (0.01).

    mu: [N, Dz], the posterior means of the data set (N >= 2; the whole test set, not one batch). The
    covariance is over the data as a distribution (divided by N, as Burda et al. define it), computed in
    float64 with the mean subtracted first. Not differentiable: a diagnostic.
    """
    if not isinstance(mu, torch.Tensor) or not mu.dtype.is_floating_point or mu.dim() != 2:
        raise ValueError(f"mu must be a floating-point [N, Dz] tensor of posterior means; got "
                         f"{tuple(mu.shape) if isinstance(mu, torch.Tensor) else type(mu).__name__}")
    if mu.shape[0] < 2:
        raise ValueError(f"active_units needs the posterior means of 2 or more data points; got {mu.shape[0]}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0; got {threshold!r}")
    m = mu.detach().double()
    var = (m - m.mean(0)).pow(2).mean(0)
    active = var > threshold
    return ActiveUnits(int(active.sum()), active, var.to(mu.dtype))


class PosteriorGap(NamedTuple):
    gap: float  # batch mean of IWAE_K - ELBO, nats
    stderr: float  # its standard error over the batch (NaN for one row)
    k: int  # the number of importance samples
    iwae: torch.Tensor  # [B] IWAE_K per row
    elbo: torch.Tensor  # [B] ELBO per row (analytic KL, the K samples' average log-likelihood)


def posterior_gap(x, recon, z, mu, logvar, *, likelihood="bernoulli", obs_logvar=None, prior_mu=None,
                  prior_logvar=None, backend="auto") -> PosteriorGap:
    """IWAE_K - ELBO, an estimate (from below) of KL(q(z|x) || p(z|x)), the gap between the ELBO and log p(x).

    z [K, B, Dz] ~ q(z|x) (rsample(mu, logvar, num_samples=K)), recon [K, B, Dx] decoded from it, x [B, Dx];
    likelihood, obs_logvar and the prior as in fastelbo.elbo. Both bounds come from the same samples
    (fused iwae_bound and elbo ops), which cancels most of their Monte Carlo noise in the difference.
    The standard error is over the B rows (their sample standard deviation / sqrt(B)). Runs under no_grad.
    """
    kw = dict(likelihood=likelihood, obs_logvar=obs_logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
              backend=backend)
    with torch.no_grad():
        iwae = F.iwae_bound(recon, x, z, mu, logvar, **kw)
        elbo = F.elbo(recon, x, mu, logvar, **kw).elbo
        d = (iwae - elbo).double()
    b = d.numel()
    stderr = d.std().item() / math.sqrt(b) if b > 1 else math.nan
    return PosteriorGap(d.mean().item(), stderr, int(z.shape[0]), iwae, elbo)
