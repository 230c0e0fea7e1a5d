"""The public functional API. Each function validates its arguments, picks a
backend (see fastelbo._backend) and calls one fused op; every backend gives
the numbers of fastelbo.reference.

Shapes: mu, logvar [B, Dz]; x, recon [B, Dx]; K samples lead: z [K, B, Dz],
recon [K, B, Dx]. Results are per row, [B], in the inputs' dtype (accumulated
in float32, float64 for float64 inputs).

Any trailing shape: every [B, Dz] / [B, Dx] above may be [B, *] (e.g. images
[B, C, H, W] and latents [B, C, h, w]), K samples [K, B, *]; each row sums
over all of *. Priors and observation log-variances then broadcast to mu's
(x's) shape, e.g. [C, 1, 1] per channel. Contiguous and channels_last tensors
are read without a copy, other layouts (a slice, an expanded tensor) through
a copy; rsample returns z in mu's shape and layout, its noise indexed in
mu's memory order. See fastelbo._validate and fastelbo._rows.Trailing.

Argument order: the model's output first, the data second, as in torch.nn.functional
and ELBOLoss: elbo(recon, x, mu, logvar), bernoulli_log_prob(logits, x). fastelbo 0.1's
elbo(x, recon, ...) is recognised for one release where the shapes tell (fastelbo/_argorder.py).
"""

from __future__ import annotations

import math

import torch

from . import _validate as v
from ._argorder import ArgumentOrderWarning, bind
from ._logits_check import checked as _logits_checked
from ._backend import impl
from ._seed import seed_tensor
from .reference import ELBOTerms

__all__ = ["rsample", "gaussian_kl", "free_bits_kl", "bernoulli_log_prob", "gaussian_log_prob", "elbo",
           "iwae_bound", "ELBOTerms", "ArgumentOrderWarning"]


def rsample(mu, logvar, *, num_samples=None, generator=None, seed=None, eps=None, backend="auto") -> torch.Tensor:
    """Reparameterized sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I).

    num_samples=K draws K samples per row: z of shape [K, B, Dz] (None: [B, Dz]).
    eps comes from Philox keyed by `seed` (an int), else by a seed drawn from
    `generator` (the default generator when None), or is the given `eps`
    tensor ([B, Dz], or [K, B, Dz] for K samples). The backward regenerates eps from the seed:
    nothing of z's size is kept for it.

    A num_samples whose z could not be a tensor (K or z's byte size beyond int64) is a ValueError.
    One that could, but does not fit in memory, is the allocator's error (torch.OutOfMemoryError, or
    the CPU allocator's RuntimeError), re-raised as the same type naming num_samples and z's bytes:
    what fits depends on the machine and on what else holds memory, so there is no fixed bound.
    """
    mu, logvar, eps, k, rows = v.rsample_args(mu, logvar, num_samples, generator, seed, eps)
    if generator is not None and _recomputing():
        raise RuntimeError(_RECOMPUTE_WITH_GENERATOR)
    ops = impl(backend, mu.device)
    # The seed tensor is an op input even when eps is given (schema is fixed): 0-dim, never read then.
    s = torch.zeros((), dtype=torch.int64, device=mu.device) if eps is not None else seed_tensor(
        mu.device, generator, seed)
    if k is None:
        return _shaped(ops.rsample(mu, logvar, s, eps, 0), rows)
    try:
        return _shaped(ops.rsample(mu, logvar, s, eps, k), rows)
    except RuntimeError as e:
        if not _allocation_failed(e):
            raise
        shape = [k, *mu.shape]
        raise type(e)(f"rsample: num_samples={k} asks for z of shape {shape}, {math.prod(shape) * mu.element_size()} "
                      f"bytes of {mu.dtype}, which could not be allocated (use fewer samples, or draw them in "
                      f"chunks)") from e


def _shaped(z: torch.Tensor, rows) -> torch.Tensor:
    """z [B, Dz] / [K, B, Dz] in the [B, *] / [K, B, *] shape (and layout) of an N-d mu; rows None: as is."""
    return z if rows is None else rows.back(z, z.dim() - 1)


def _allocation_failed(e: RuntimeError) -> bool:
    # The CPU allocator's failure is a plain RuntimeError; its text is the only mark it has.
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


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
    args = v.kl_args(mu, logvar, prior_mu, prior_logvar)  # checked before mu.device is read
    return impl(backend, mu.device).gaussian_kl(*args)


def free_bits_kl(mu, logvar, free_bits, prior_mu=None, prior_logvar=None, *, backend="auto") -> torch.Tensor:
    """KL per row with free bits (Kingma et al. 2016), [B].

    A latent dimension whose batch-mean KL is below `free_bits` nats counts as
    exactly `free_bits` and gets no gradient, so the batch mean of the result is
    sum_j max(free_bits, mean_b KL[b, j]) (the free-bits objective, as
    torch.clamp forms it). A dimension whose batch-mean KL is NaN is NaN in
    every row, and so is the gradient of each of its elements (max(free_bits,
    NaN) is NaN). free_bits=0 is gaussian_kl. Priors as gaussian_kl.
    """
    args = v.free_bits_args(mu, logvar, free_bits, prior_mu, prior_logvar)
    return impl(backend, mu.device).free_bits_kl(*args)[0]


def bernoulli_log_prob(logits, x, *, backend="auto", validate_args=None) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) per row; x may be continuous in [0, 1]."""
    # The range check of x runs inside the kernel, in the pass that reads x anyway.
    args = v.bernoulli_args(logits, x, validate_args)
    return _logits_checked("bernoulli_log_prob", logits, x, "logits", lambda: impl(backend, logits.device)
                           .bernoulli_log_prob(*args))


def gaussian_log_prob(mean, x, logvar=0.0, *, backend="auto") -> torch.Tensor:
    """log N(x | mean, e^logvar) per row; logvar: number or tensor of shape [], [Dx], [1, Dx] or [B, Dx]
    (a per-feature logvar's gradient is reduced over the batch inside the kernel)."""
    args = v.gaussian_args(mean, x, logvar)
    return impl(backend, mean.device).gaussian_log_prob(*args)


def elbo(*args, recon=None, x=None, mu=None, logvar=None, likelihood="bernoulli", obs_logvar=None, prior_mu=None,
         prior_logvar=None, beta=1.0, backend="auto", validate_args=None) -> ELBOTerms:
    """elbo(recon, x, mu, logvar, *, ...): ELBO per row, log p(x | recon) - beta * KL(N(mu, e^logvar) || p(z)),
    in one fused op. recon (the decoder's output) first, x (the data) second, like ELBOLoss; recon=
    and x= may be passed by keyword (fastelbo/_argorder.py: the 0.1 order x, recon).

    likelihood "bernoulli": recon are logits, x in [0, 1]. "gaussian": recon is
    the mean and obs_logvar (number or [], [Dx], [1, Dx], [B, Dx]; default 0)
    the log-variance; a per-feature obs_logvar (e.g. a learned [Dx]
    nn.Parameter) gets its gradient reduced over the batch inside the kernel.
    recon may be [K, B, Dx], decoded from K samples of z (rsample(...,
    num_samples=K)): the log-likelihood is then the K-sample average per row.
    Returns ELBOTerms(elbo, log_likelihood, kl), each [B].
    """
    recon, x, mu, logvar = bind("elbo", args, dict(recon=recon, x=x, mu=mu, logvar=logvar),
                                ("recon", "x", "mu", "logvar"))
    args = v.elbo_args(x, recon, mu, logvar, likelihood, obs_logvar, prior_mu, prior_logvar, beta, validate_args)
    return ELBOTerms(*_logits_checked("elbo", recon, x, "recon", lambda: impl(backend, recon.device).elbo(*args),
                                      likelihood))


def iwae_bound(*args, recon=None, x=None, z=None, mu=None, logvar=None, likelihood="bernoulli", obs_logvar=None,
               prior_mu=None, prior_logvar=None, backend="auto", validate_args=None) -> torch.Tensor:
    """iwae_bound(recon, x, z, mu, logvar, *, ...): the importance-weighted bound (Burda et al. 2016)
    per row, [B], in one fused op (recon first, like elbo; recon= / x= by keyword work too):

        log (1/K) sum_k exp(log p(x | z_k) + log p(z_k) - log q(z_k | x))

    z [K, B, Dz] ~ q(z | x) = N(mu, e^logvar) (e.g. rsample(mu, logvar, num_samples=K)) and recon
    [K, B, Dx] decoded from it; x [B, Dx]. The log-sum-exp over K is stabilized by its maximum; the
    backward weights each sample by its softmax weight. K = 1 is the single-sample ELBO with the
    Monte Carlo KL. likelihood, obs_logvar and the prior as in elbo().
    """
    recon, x, z, mu, logvar = bind("iwae_bound", args, dict(recon=recon, x=x, z=z, mu=mu, logvar=logvar),
                                   ("recon", "x", "z", "mu", "logvar"))
    args = v.iwae_args(x, recon, z, mu, logvar, likelihood, obs_logvar, prior_mu, prior_logvar, validate_args)
    return _logits_checked("iwae_bound", recon, x, "recon", lambda: impl(backend, recon.device).iwae_bound(*args),
                           likelihood)[0]
