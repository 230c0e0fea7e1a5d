"""ELBOLoss: the negative ELBO (or IWAE bound) as an nn.Module, used like nn.BCEWithLogitsLoss."""

from __future__ import annotations

import torch
from torch import nn

from . import _functorch, _onepass
from . import _validate as v
from ._backend import _check_name, resolve
from ._config import CUDA_EMULATED
from ._dtypes import acc_dtype
from .functional import elbo, free_bits_kl, iwae_bound

BOUNDS = ("elbo", "iwae")

# The backends with a one-pass op (docs/design.md §5), by the prefix of their ops; the reference has none.
ONEPASS_OPS = {"cpu": "", "cuda": "", "triton": "triton_", CUDA_EMULATED: "emu_"}
# Where ELBOLoss takes the one-pass path: where the op is one fused kernel. On CUDA and Triton the
# op still runs the two-pass kernels back to back (5 [B, Dx] transfers) and CUDA's backward adds a
# scaled copy (2 more): more traffic than the two-pass path, so ELBOLoss keeps that path there until
# fused one-pass kernels exist. tests/test_onepass.py widens this to every backend to test the ops.
_ONEPASS_PREFIX = {"cpu": ONEPASS_OPS["cpu"]}


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
    gets no KL gradient; one whose batch-mean KL is NaN makes the loss and its
    gradient NaN, as max(λ, NaN) is NaN). The loss is formed in float32 for
    16-bit inputs and rounded once, like the fused path. KL annealing is the
    caller's beta (see docs/training.md for a schedule).
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
        self.obs_logvar = v.obs_logvar_value(obs_logvar)
        self.backend = _check_name(backend)
        v.validate_args_enabled(validate_args)  # None or a bool, checked now rather than at the first call
        self.validate_args = validate_args

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
                z: torch.Tensor | None = None, obs_logvar=None, prior_mu=None, prior_logvar=None) -> torch.Tensor:
        kw = dict(likelihood=self.likelihood, obs_logvar=self.obs_logvar if obs_logvar is None else obs_logvar,
                  prior_mu=prior_mu, prior_logvar=prior_logvar, backend=self.backend,
                  validate_args=self.validate_args)
        if self.bound == "iwae":
            if z is None:
                raise ValueError("bound='iwae' needs the samples: forward(recon, x, mu, logvar, z=z) with z "
                                 "[K, B, Dz] from rsample(mu, logvar, num_samples=K) and recon [K, B, Dx] decoded "
                                 "from it")
            bound = iwae_bound(recon=recon, x=x, z=z, mu=mu, logvar=logvar, **kw)
        elif z is not None:
            raise ValueError("z is used by bound='iwae' only (the ELBO's KL is analytic)")
        elif self.free_bits > 0.0:
            loss, out_dtype = self._free_bits_rows(recon, x, mu, logvar, kw)
            return self._reduce(loss).to(out_dtype)
        else:
            loss = self._one_pass(recon, x, mu, logvar, kw)
            if loss is not None:
                return loss
            bound = elbo(recon=recon, x=x, mu=mu, logvar=logvar, beta=self.beta, **kw).elbo
        # The bounds are reduced first and negated after: the same bits as reducing their negation
        # (in every dtype), one [B] kernel fewer in the forward and the backward.
        return -self._reduce(bound)

    def _one_pass(self, recon, x, mu, logvar, kw):
        """The reduced loss with its gradients computed in the forward (fastelbo/_onepass.py), or None where
        the two-pass path runs: reduction "none" (per-row upstream gradients), no gradient wanted (no_grad,
        inference_mode, nothing requiring grad), a torch.func transform, or the reference backend."""
        if self.reduction == "none" or _functorch.transforms_active():
            return None
        if not _onepass.wanted((recon, x, mu, logvar, kw["obs_logvar"], kw["prior_mu"], kw["prior_logvar"])):
            return None
        # The backend first: where it has no one-pass path, elbo() validates the arguments (once).
        prefix = _ONEPASS_PREFIX.get(resolve(self.backend, recon.device.type)) if torch.is_tensor(recon) else None
        if prefix is None:
            return None
        args = v.elbo_args(x, recon, mu, logvar, self.likelihood, kw["obs_logvar"], kw["prior_mu"],
                           kw["prior_logvar"], self.beta, self.validate_args)
        mask = [isinstance(t, torch.Tensor) and t.requires_grad for t in args[:7]]
        return _onepass.op_for(prefix)(*args[:9], self.reduction, mask, args[9])[0]

    def _free_bits_rows(self, recon, x, mu, logvar, kw):
        """(beta * floored KL - log-likelihood per row in the accumulation dtype, the output dtype).

        The log-likelihood from the fused op (beta=0: its KL output is left out of the loss), the
        floored KL from the free-bits op: two passes, one over [K?, B, Dx], one over [B, Dz]. They
        are combined in the accumulation dtype (float32 for 16-bit inputs, float64 for float64) and
        rounded once after the reduction, as the fused op rounds ll - beta * KL once: a float16 row
        KL may exceed 65504 where the loss does not (beta = 0 at the start of KL warm-up). beta * KL
        is a product even for beta = 0, as in the fused op and the reference (0 * inf is NaN).
        """
        # The elbo call validates every argument before anything is cast below.
        ll = elbo(recon=recon, x=x, mu=mu, logvar=logvar, beta=0.0, **kw).log_likelihood
        acc = acc_dtype(ll.dtype)
        # The free-bits kernels compute in the accumulation dtype anyway: on upcast inputs their
        # rows come back unrounded (and the gradients are rounded once, by the casts' backward).
        up = [t.to(acc) if isinstance(t, torch.Tensor) else t for t in (mu, logvar, kw["prior_mu"], kw["prior_logvar"])]
        kl = free_bits_kl(up[0], up[1], self.free_bits, up[2], up[3], backend=self.backend)
        return self.beta * kl - ll.to(acc), ll.dtype

    def _reduce(self, loss):
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        extra = f", bound={self.bound!r}" if self.bound != "elbo" else ""
        extra += f", free_bits={self.free_bits}" if self.free_bits else ""
        return f"likelihood={self.likelihood!r}, beta={self.beta}, reduction={self.reduction!r}{extra}"
