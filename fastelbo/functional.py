"""The public functional API. Each function validates its arguments, picks a
backend (see fastelbo._backend) and calls one fused op; every backend gives
the numbers of fastelbo.reference.

Shapes: mu, logvar [B, Dz]; x, recon [B, Dx]. Results are per row, [B], in
the inputs' dtype (accumulated in float32, float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from . import _validate as v
from ._backend import impl
from ._seed import seed_tensor
from .reference import ELBOTerms

__all__ = ["rsample", "gaussian_kl", "bernoulli_log_prob", "gaussian_log_prob", "elbo", "ELBOTerms"]


def rsample(mu, logvar, *, generator=None, seed=None, eps=None, backend="auto") -> torch.Tensor:
    """Reparameterized sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I).

    eps comes from Philox keyed by `seed` (an int), else by a seed drawn from
    `generator` (the default generator when None), or is the given `eps`
    tensor. The backward regenerates eps from the seed: nothing [B, Dz] is
    kept for it.
    """
    v.pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    if eps is not None:
        if seed is not None or generator is not None:
            raise ValueError("rsample: pass eps= or seed=/generator=, not both")
        v.pair(mu, "mu", eps, "eps", "[B, Dz]")
    if generator is not None and _recomputing():
        raise RuntimeError(_RECOMPUTE_WITH_GENERATOR)
    ops = impl(backend, mu.device)
    # The seed tensor is an op input even when eps is given (schema is fixed): 0-dim, never read then.
    s = torch.zeros((), dtype=torch.int64, device=mu.device) if eps is not None else seed_tensor(
        mu.device, generator, seed)
    return ops.rsample(mu, logvar, s, eps)


# CHECKPOINT GUARD (docs/training.md, "Activation checkpointing"). torch.utils.checkpoint
# replays the default generators (CPU, and CUDA where used) when it recomputes a
# forward, so a seed drawn from them, an explicit seed= or eps= give the recomputed
# forward the eps of the first one. A user's own torch.Generator is not replayed: the
# recomputation would draw a new seed and silently change the gradients. A forward that
# runs inside a backward pass (graph task id != -1, the test torch.utils.checkpoint uses
# itself) is such a recomputation; rsample(generator=...) refuses it.
_RECOMPUTE_WITH_GENERATOR = (
    "rsample(generator=...) is being recomputed inside a backward pass (activation checkpointing): "
    "torch.utils.checkpoint does not replay a user's torch.Generator, so the recomputed eps would differ "
    "from the forward's. Draw the seed outside the checkpointed region and pass it in, e.g. "
    "seed = torch.randint(0, 2**62, (), generator=g) then rsample(mu, logvar, seed=seed), "
    "or use the default generator (generator=None), which checkpoint replays."
)


def _recomputing() -> bool:
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, backend="auto") -> torch.Tensor:
    """KL(N(mu, e^logvar) || p) per row, p = N(0, I) or N(prior_mu, e^prior_logvar).

    prior_mu / prior_logvar: number or tensor of shape [], [Dz], [1, Dz] or
    [B, Dz] (broadcast over the batch); a missing one is 0.
    """
    v.pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    pmu, plv = v.prior(prior_mu, prior_logvar, mu)
    return impl(backend, mu.device).gaussian_kl(mu, logvar, pmu, plv)


def bernoulli_log_prob(logits, x, *, backend="auto", validate_args=None) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) per row; x may be continuous in [0, 1]."""
    v.pair(logits, "logits", x, "x", "[B, Dx]")
    # The range check of x runs inside the kernel, in the pass that reads x anyway.
    return impl(backend, logits.device).bernoulli_log_prob(logits, x, v.validate_args_enabled(validate_args))


def gaussian_log_prob(mean, x, logvar=0.0, *, backend="auto") -> torch.Tensor:
    """log N(x | mean, e^logvar) per row; logvar: number or tensor of shape [], [Dx], [1, Dx] or [B, Dx]."""
    v.pair(mean, "mean", x, "x", "[B, Dx]")
    s = v.per_feature(logvar, "logvar", mean, "mean")
    return impl(backend, mean.device).gaussian_log_prob(mean, x, s)


def elbo(x, recon, mu, logvar, *, likelihood="bernoulli", obs_logvar=None, prior_mu=None, prior_logvar=None,
         beta=1.0, backend="auto", validate_args=None) -> ELBOTerms:
    """ELBO per row: log p(x | recon) - beta * KL(N(mu, e^logvar) || p(z)), in one fused op.

    likelihood "bernoulli": recon are logits, x in [0, 1]. "gaussian": recon is
    the mean and obs_logvar (number or [], [Dx], [1, Dx], [B, Dx]; default 0)
    the log-variance. Returns ELBOTerms(elbo, log_likelihood, kl), each [B].
    """
    v.choice(likelihood, "likelihood", v.LIKELIHOODS)
    v.pair(recon, "recon", x, "x", "[B, Dx]")
    v.pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    v.same_kind(recon, "recon", mu, "mu")
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu must have the batch size of recon ({recon.shape[0]}); got {mu.shape[0]}")
    beta = v.beta_value(beta)
    if likelihood == "gaussian":
        s = v.per_feature(0.0 if obs_logvar is None else obs_logvar, "obs_logvar", recon, "recon")
    else:
        if obs_logvar is not None:
            raise ValueError("obs_logvar is only used by likelihood='gaussian'")
        s = None
    validate_x = likelihood == "bernoulli" and v.validate_args_enabled(validate_args)
    pmu, plv = v.prior(prior_mu, prior_logvar, mu)
    out = impl(backend, recon.device).elbo(x, recon, mu, logvar, s, pmu, plv, likelihood, beta, validate_x)
    return ELBOTerms(*out)
