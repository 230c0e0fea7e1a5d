"""ELBOLoss: the negative ELBO as an nn.Module, used like nn.BCEWithLogitsLoss."""

from __future__ import annotations

import torch
from torch import nn

from . import _validate as v
from .functional import elbo


class ELBOLoss(nn.Module):
    """Negative evidence lower bound, -(log p(x | recon) - beta * KL(q(z|x) || p(z))).

    >>> loss_fn = ELBOLoss(likelihood="bernoulli", beta=1.0)
    >>> loss = loss_fn(recon_logits, x, mu, logvar)   # like BCEWithLogitsLoss()(input, target)

    reduction: "mean" (over the batch, of per-row sums over features), "sum",
    or "none" (shape [B]). For likelihood="gaussian", obs_logvar (number,
    [Dx] or [B, Dx] tensor, e.g. a learned nn.Parameter) sets the observation
    log-variance; it may also be passed per call.
    """

    def __init__(self, likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean", *,
                 obs_logvar=None, backend: str = "auto", validate_args: bool | None = None):
        super().__init__()
        self.likelihood = v.choice(likelihood, "likelihood", v.LIKELIHOODS)
        self.reduction = v.choice(reduction, "reduction", v.REDUCTIONS)
        self.beta = v.beta_value(beta)
        self.obs_logvar = obs_logvar
        self.backend = backend
        self.validate_args = validate_args

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
                obs_logvar=None, prior_mu=None, prior_logvar=None) -> torch.Tensor:
        terms = elbo(x, recon, mu, logvar, likelihood=self.likelihood,
                     obs_logvar=self.obs_logvar if obs_logvar is None else obs_logvar,
                     prior_mu=prior_mu, prior_logvar=prior_logvar, beta=self.beta, backend=self.backend,
                     validate_args=self.validate_args)
        loss = -terms.elbo
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, beta={self.beta}, reduction={self.reduction!r}"
