"""ELBOLoss: the negative ELBO (or IWAE bound) as an nn.Module, used like nn.BCEWithLogitsLoss."""

from __future__ import annotations

import torch
from torch import nn

from . import _validate as v
from ._backend import _check_name
from .functional import elbo, free_bits_kl, iwae_bound

BOUNDS = ("elbo", "iwae")


class ELBOLoss(nn.Module):
    """Negative evidence lower bound, -(log p(x | recon) - beta * KL(q(z|x) || p(z))).

    >>> loss_fn = ELBOLoss(likelihood="bernoulli", beta=1.0)
    >>> loss = loss_fn(recon_logits, x, mu, logvar)   # like BCEWithLogitsLoss()(input, target)

    reduction: "mean" (over the batch, of per-row sums over features), "sum",
    or "none" (shape [B]). For likelihood="gaussian", obs_logvar (number,
    [Dx] or [B, Dx] tensor, e.g. a learned nn.Parameter) sets the observation
    log-variance; it may also be passed per call.

    recon may be [K, B, Dx] (decoded from rsample(mu, logvar, num_samples=K)):
    the log-likelihood is the K-sample average.

    bound="iwae": the negative importance-weighted bound (Burda et al. 2016)
    over the K samples; forward then needs the samples, forward(recon, x, mu,
    logvar, z=z) with z [K, B, Dz] and recon [K, B, Dx]. beta and free bits
    are ELBO controls and must stay at their defaults.

    free_bits=λ > 0 (Kingma et al. 2016): the KL of each latent dimension,
    averaged over the batch, is floored at λ nats (a dimension under the floor
    gets no KL gradient). KL annealing is the caller's beta (see
    docs/training.md for a schedule).
    """

    def __init__(self, likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean", *,
                 bound: str = "elbo", free_bits: float = 0.0, obs_logvar=None, backend: str = "auto",
                 validate_args: bool | None = None):
        super().__init__()
        self.likelihood = v.choice(likelihood, "likelihood", v.LIKELIHOODS)
        self.reduction = v.choice(reduction, "reduction", v.REDUCTIONS)
        self.bound = v.choice(bound, "bound", BOUNDS)
        self.beta = v.beta_value(beta)
        self.free_bits = v.free_bits_value(free_bits)
        if self.bound == "iwae" and self.beta != 1.0:
            raise ValueError(f"beta applies to bound='elbo'; the IWAE bound has no KL weight (got beta={beta})")
        if self.bound == "iwae" and self.free_bits != 0.0:
            raise ValueError(f"free_bits applies to bound='elbo'; the IWAE bound has no KL term to floor "
                             f"(got free_bits={free_bits})")
        self.obs_logvar = obs_logvar
        self.backend = _check_name(backend)
        v.validate_args_enabled(validate_args)  # None or a bool, checked now rather than at the first call
        self.validate_args = validate_args

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
                z: torch.Tensor | None = None, obs_logvar=None, prior_mu=None, prior_logvar=None) -> torch.Tensor:
        kw = dict(likelihood=self.likelihood, obs_logvar=self.obs_logvar if obs_logvar is None else obs_logvar,
                  prior_mu=prior_mu, prior_logvar=prior_logvar, backend=self.backend,
                  validate_args=self.validate_args)
        # The bounds are reduced first and negated after: the same bits as reducing their negation
        # (in every dtype), one [B] kernel fewer in the forward and the backward.
        negate = True
        if self.bound == "iwae":
            if z is None:
                raise ValueError("bound='iwae' needs the samples: forward(recon, x, mu, logvar, z=z) with z "
                                 "[K, B, Dz] from rsample(mu, logvar, num_samples=K) and recon [K, B, Dx] decoded "
                                 "from it")
            loss = iwae_bound(x, recon, z, mu, logvar, **kw)
        elif z is not None:
            raise ValueError("z is used by bound='iwae' only (the ELBO's KL is analytic)")
        elif self.free_bits > 0.0:
            # The log-likelihood from the fused op (beta=0: its KL output is left out of the loss), the
            # floored KL from the free-bits op: two passes, one over [K?, B, Dx], one over [B, Dz].
            ll = elbo(x, recon, mu, logvar, beta=0.0, **kw).log_likelihood
            kl = free_bits_kl(mu, logvar, self.free_bits, prior_mu, prior_logvar, backend=self.backend)
            loss, negate = self.beta * kl - ll, False
        else:
            loss = elbo(x, recon, mu, logvar, beta=self.beta, **kw).elbo
        if self.reduction == "mean":
            loss = loss.mean()
        elif self.reduction == "sum":
            loss = loss.sum()
        return -loss if negate else loss

    def extra_repr(self) -> str:
        extra = f", bound={self.bound!r}" if self.bound != "elbo" else ""
        extra += f", free_bits={self.free_bits}" if self.free_bits else ""
        return f"likelihood={self.likelihood!r}, beta={self.beta}, reduction={self.reduction!r}{extra}"
