"""Evaluation: the importance-sampled estimate of log p(x) (Burda et al. 2016, as in their Table 1)."""

from __future__ import annotations

import math
import numbers
import sys

import torch

from . import _validate as v
from ._progress import Progress
from ._seed import seed_tensor
from .functional import iwae_bound, rsample

__all__ = ["estimate_log_likelihood"]

# Default chunk: about this many decoded elements (K_chunk * B * Dx) at a time, 64 MiB of float32.
_CHUNK_ELEMENTS = 1 << 24


def estimate_log_likelihood(model_fn, x: torch.Tensor, K: int = 5000, *, chunk_size: int | None = None,
                            likelihood: str = "bernoulli", obs_logvar=None, prior_mu=None, prior_logvar=None,
                            seed: int | None = None, generator: torch.Generator | None = None,
                            progress: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """log p(x) per row, [B], estimated with K importance samples from q(z | x):

        log p(x) ~= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x)

    (the IWAE bound with large K; it rises towards log p(x) as K grows).

    model_fn: the VAE, either an object with ``encode(x) -> (mu, logvar)`` and
    ``decode(z) -> recon`` (an nn.Module laid out that way) or a pair
    ``(encode, decode)`` of callables. decode receives z as [k * B, Dz] and
    returns [k * B, Dx] (Bernoulli logits or Gaussian mean); likelihood,
    obs_logvar and the prior as in fastelbo.elbo.

    Memory stays bounded: the K samples are drawn, decoded and reduced in
    chunks of ``chunk_size`` samples (default: about 2^24 decoded elements per
    chunk), folded into a running log-sum-exp in float64. Chunk c draws its
    noise with Philox seed ``seed + c`` (seed drawn from `generator` when not
    given), so with chunk_size >= K the result is exactly the IWAE bound of
    ``rsample(mu, logvar, num_samples=K, seed=seed)``. Runs under
    torch.no_grad(); put the model in eval mode first. progress: draw a
    progress bar on stderr (None: when stderr is a terminal and there is more
    than one chunk).
    """
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or not 1 <= K <= v.INT64_MAX:
        raise ValueError(f"K must be an int >= 1 and < 2**63 (the number of importance samples); got {K!r}")
    encode, decode = _model_parts(model_fn)
    v.tensor2d(x, "x", "[B, Dx]")
    K = int(K)
    B = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(K, _CHUNK_ELEMENTS // max(1, x.numel())))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (samples per chunk); got {chunk_size!r}")
    chunk_size = min(int(chunk_size), K)
    base = int(seed_tensor(x.device, generator, seed))
    chunks = range(0, K, chunk_size)
    bar = None
    if progress or (progress is None and len(chunks) > 1 and sys.stderr.isatty()):
        bar = Progress(len(chunks))
    with torch.no_grad():
        mu, logvar = encode(x)
        total = torch.full((B,), -math.inf, dtype=torch.float64, device=x.device)
        for c, start in enumerate(chunks):
            k = min(chunk_size, K - start)
            if bar is not None:
                bar.step(f"samples {start + k}/{K}")
            z = _chunk_samples(mu, logvar, k, _wrap(base + c), backend, chunk_size)
            recon = decode(z.reshape(k * B, -1)).reshape(k, B, -1)
            # iwae_bound of this chunk = logsumexp_k(log w) - log k: undo the mean, fold the sum in.
            part = iwae_bound(recon, x, z, mu, logvar, likelihood=likelihood, obs_logvar=obs_logvar,
                              prior_mu=prior_mu, prior_logvar=prior_logvar, backend=backend)
            total = torch.logaddexp(total, part.double() + math.log(k))
    if bar is not None:
        bar.close()
    return (total - math.log(K)).to(mu.dtype)


def _chunk_samples(mu, logvar, k, seed, backend, chunk_size):
    """One chunk's z; a chunk too large for memory (or for a tensor) is the caller's chunk_size, not
    rsample's num_samples, in the error."""
    try:
        return rsample(mu, logvar, num_samples=k, seed=seed, backend=backend)
    except (ValueError, RuntimeError) as e:
        if "num_samples" not in str(e):
            raise
        raise type(e)(f"estimate_log_likelihood: chunk_size={chunk_size} samples per chunk is too large for mu of "
                      f"shape {list(mu.shape)} ({mu.dtype}): z of shape {[k, *mu.shape]} "
                      f"({math.prod([k, *mu.shape]) * mu.element_size()} bytes) cannot be allocated; pass a smaller "
                      f"chunk_size (None picks about 2^24 decoded elements per chunk)") from e


def _model_parts(model_fn):
    if isinstance(model_fn, (tuple, list)) and len(model_fn) == 2 and all(callable(f) for f in model_fn):
        return model_fn[0], model_fn[1]
    encode, decode = getattr(model_fn, "encode", None), getattr(model_fn, "decode", None)
    if callable(encode) and callable(decode):
        return encode, decode
    raise TypeError("model_fn must have encode(x) -> (mu, logvar) and decode(z) -> recon methods, or be a pair "
                    f"(encode, decode) of callables; got {type(model_fn).__name__}")


def _wrap(seed: int) -> int:
    """A seed in int64's range (Philox takes the 64 bits as they are)."""
    return (seed + 2**63) % 2**64 - 2**63
