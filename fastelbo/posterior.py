"""DiagonalGaussian: the posterior of latent-diffusion autoencoders on fastelbo's kernels.

diffusers' AutoencoderKL (and CompVis' ldm) wrap the encoder's output
[B, 2C, H, W] in a DiagonalGaussianDistribution; this class has its
attributes and methods, with the same numbers (tests/test_posterior.py holds
them to diffusers' own class, values and gradients), so a training script
changes one import:

    from fastelbo import DiagonalGaussian as DiagonalGaussianDistribution

Differences, each documented where it happens:
  * sample() draws fastelbo's Philox noise (README, "Noise"), not torch.randn:
    the same distribution, a different stream. A generator still makes it
    reproducible: each call takes one 64-bit seed from it.
  * kl() and nll() of a deterministic posterior return a zero of the
    parameters' dtype and device (diffusers: a CPU float32 tensor([0.])).
  * nll() needs `sample` of the mean's shape (diffusers would broadcast).
"""

from __future__ import annotations

import torch

from . import functional as F
from ._rows import reduced_dims, rows_for

__all__ = ["DiagonalGaussian"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' clamp of the log-variance
KL_DIMS = (1, 2, 3)  # diffusers' kl() sums over these dims, always


class DiagonalGaussian:
    """N(mean, exp(logvar)) from `parameters` = [mean, logvar] stacked on dim 1.

    parameters: [B, 2C, *] floating-point (e.g. an encoder's [B, 2C, H, W] output, contiguous or
    channels_last). mean and logvar are its two halves on dim 1; logvar is clamped to [-30, 20]
    (torch.clamp: no gradient outside). deterministic=True makes std and var zero, sample() the
    mean, kl() and nll() zero. backend as in fastelbo.functional.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, *, backend: str = "auto"):
        if not isinstance(parameters, torch.Tensor):
            raise TypeError(f"parameters must be a torch.Tensor [B, 2C, ...]; got {type(parameters).__name__}")
        if not parameters.dtype.is_floating_point:
            raise TypeError(f"parameters must be a floating-point tensor; got {parameters.dtype}")
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError("parameters must be [B, 2C, ...]: mean and logvar stacked on dim 1, which must have "
                             f"an even size; got shape {tuple(parameters.shape)}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool; got {type(deterministic).__name__}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        self.backend = backend
        # diffusers forms std and var up front; the fused methods do not need them, so they are formed on
        # first use (same values, same gradients). Deterministic: one zero tensor, as diffusers has it.
        self._std = self._var = torch.zeros_like(self.mean) if deterministic else None

    @property
    def std(self) -> torch.Tensor:
        if self._std is None:
            self._std = torch.exp(0.5 * self.logvar)
        return self._std

    @property
    def var(self) -> torch.Tensor:
        if self._var is None:
            self._var = torch.exp(self.logvar)
        return self._var

    def _zero(self) -> torch.Tensor:
        return torch.zeros(1, dtype=self.parameters.dtype, device=self.parameters.device)

    def sample(self, generator: torch.Generator | list | None = None) -> torch.Tensor:
        """mean + std * eps, a reparameterized sample of the mean's shape and layout (fastelbo.rsample).

        eps is fastelbo's Philox noise keyed by one seed from `generator` (the default generator of the
        parameters' device when None; a CPU generator serves CUDA parameters too, as in diffusers), or,
        for a list of B generators, one seed per sample from its own generator. The noise is indexed
        in the parameters' memory order, so a channels_last tensor gets the same numbers at other
        logical positions than a contiguous one (as torch.randn_like does).
        """
        if self.deterministic:
            return self.mean.clone()  # diffusers: mean + 0 * noise
        rows = rows_for(self.mean, tuple(range(1, self.mean.dim())))
        mu, lv = rows.of(self.mean), rows.of(self.logvar)
        if isinstance(generator, (list, tuple)):
            if len(generator) != mu.shape[0] or not generator:
                raise ValueError(f"sample: got a list of {len(generator)} generators for a batch of {mu.shape[0]} "
                                 "(one per sample)")
            z = torch.cat([F.rsample(mu[i:i + 1], lv[i:i + 1], seed=self._seed(g), backend=self.backend)
                           for i, g in enumerate(generator)])
        else:
            z = F.rsample(mu, lv, seed=None if generator is None else self._seed(generator), backend=self.backend)
        return rows.back(z, self.mean.shape)

    def _seed(self, generator) -> torch.Tensor:
        # Drawn on the generator's own device (diffusers accepts a CPU generator for CUDA tensors).
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them or None; "
                            f"got {type(generator).__name__}")
        return torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=generator.device, generator=generator)

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) summed over dims [1, 2, 3] (diffusers' fixed dims), other N(0, I) when None.

        other: a DiagonalGaussian (or diffusers' class: anything with .mean and .logvar) of the same
        shape; gradients reach both sides. One fused gaussian_kl.
        """
        if self.deterministic:
            return self._zero()
        if self.mean.dim() < 4:
            raise ValueError(f"kl sums over dims [1, 2, 3] (as diffusers does): it needs a 4-D or larger mean; "
                             f"got shape {tuple(self.mean.shape)}")
        rows = rows_for(self.mean, KL_DIMS)
        if other is None:
            return rows.result(F.gaussian_kl(rows.of(self.mean), rows.of(self.logvar), backend=self.backend))
        if not (hasattr(other, "mean") and hasattr(other, "logvar")):
            raise TypeError(f"other must be a DiagonalGaussian (with .mean and .logvar) or None; "
                            f"got {type(other).__name__}")
        if getattr(other, "deterministic", False):
            raise ValueError("kl: other is deterministic (variance 0): the KL to a point mass is infinite")
        if tuple(other.mean.shape) != tuple(self.mean.shape) or tuple(other.logvar.shape) != tuple(self.mean.shape):
            raise ValueError(f"kl: other's mean {tuple(other.mean.shape)} and logvar {tuple(other.logvar.shape)} "
                             f"must have this mean's shape {tuple(self.mean.shape)}")
        return rows.result(F.gaussian_kl(rows.of(self.mean), rows.of(self.logvar), rows.of(other.mean),
                                         rows.of(other.logvar), backend=self.backend))

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """-log N(sample | mean, exp(logvar)) summed over `dims` (default [1, 2, 3]; an empty list sums all,
        as torch.sum does). sample has the mean's shape; gradients reach it, mean and logvar."""
        if self.deterministic:
            return self._zero()
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor of the mean's shape; got {type(sample).__name__}")
        if tuple(sample.shape) != tuple(self.mean.shape):
            raise ValueError(f"nll: sample has shape {tuple(sample.shape)}; expected the mean's "
                             f"{tuple(self.mean.shape)}")
        rows = rows_for(self.mean, reduced_dims(dims, self.mean.dim(), "dims"))
        ll = F.gaussian_log_prob(rows.of(self.mean), rows.of(sample), rows.of(self.logvar), backend=self.backend)
        return -rows.result(ll)

    def mode(self) -> torch.Tensor:
        return self.mean

    def __repr__(self) -> str:
        return (f"DiagonalGaussian(mean: {tuple(self.mean.shape)} {self.mean.dtype}, "
                f"deterministic={self.deterministic})")

