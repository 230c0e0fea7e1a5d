"""Argument checks of the public API: every error names the argument and what
was expected. Broadcasting is limited to what the API documents: priors and
the observation log-variance may be given per feature and are expanded over
the batch (a stride-0 view, no copy); nothing else is broadcast.

Any trailing shape: [B, *] tensors ([K, B, *] for K samples) are read as the
[B, D] rows the kernels take (fastelbo._rows.Trailing: the trailing dims
merged in memory order, a view for contiguous and channels_last tensors, a
copy otherwise), and priors / observation log-variances broadcastable to
them as [1, D] or [B, D]. That happens here, first, so that every check
below and every kernel sees [B, D].
"""

from __future__ import annotations

import math
import numbers

import torch

from ._dtypes import AUTOCAST_DTYPES
from ._rows import Trailing

_VALIDATE_ARGS = True

INT64_MAX = 2**63 - 1

LIKELIHOODS = ("bernoulli", "gaussian")
REDUCTIONS = ("mean", "sum", "none")


def set_default_validate_args(value: bool) -> None:
    """Turns the value checks (x in [0, 1] for Bernoulli) on or off, like
    torch.distributions.Distribution.set_default_validate_args."""
    global _VALIDATE_ARGS
    if not isinstance(value, bool):
        raise TypeError(f"validate_args must be a bool; got {_type_name(value)}")
    _VALIDATE_ARGS = value


def validate_args_enabled(validate_args: bool | None) -> bool:
    # Only None or a bool: a string ("false" is truthy) or 0/1 would be read by truthiness.
    if validate_args is not None and not isinstance(validate_args, bool):
        raise TypeError(f"validate_args must be a bool or None; got {_type_name(validate_args)}")
    return _VALIDATE_ARGS if validate_args is None else validate_args


def _type_name(value) -> str:
    """int, str, ...; numpy.bool rather than a bare "bool" for numpy's own booleans."""
    t = type(value)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def finite(value: numbers.Real) -> float | None:
    """value as a finite float, or None (NaN, an infinity, an int beyond float's range)."""
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if -math.inf < f < math.inf else None  # comparisons, not math.isfinite: torch.compile traces them


def float_tensor(t, name: str, dims: str, ndim: int) -> torch.Tensor:
    """A floating-point tensor of `ndim` dimensions (described as `dims` in errors)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}; got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); "
                        f"got {t.dtype}")
    if t.dim() != ndim:
        what = "K samples" if ndim == 3 else None
        raise ValueError(f"{name} must be {ndim}-D {dims}{f' ({what})' if what else ''}; got shape {tuple(t.shape)}")
    return t


def tensor2d(t, name: str, dims: str = "[B, D]") -> torch.Tensor:
    return float_tensor(t, name, dims, 2)


def _autocast_mix(a: torch.Tensor, b: torch.Tensor) -> bool:
    """AUTOCAST POLICY (fastelbo/_autocast.py): inside torch.autocast of the
    tensors' device type, float16/bfloat16/float32 may mix; the ops' autocast
    kernels cast them all to float32. Only asked when the dtypes differ."""
    device_type = a.device.type
    return (a.dtype in AUTOCAST_DTYPES and b.dtype in AUTOCAST_DTYPES and b.device.type == device_type
            and torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type))


def same_kind(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.dtype != ref.dtype and not _autocast_mix(ref, t):
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {t.dtype} "
                        "(mixed dtypes are not promoted outside torch.autocast: cast explicitly)")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}); got {t.device}")


def pair(a, a_name: str, b, b_name: str, dims: str = "[B, D]") -> tuple[torch.Tensor, torch.Tensor]:
    """Two [B, D] tensors of one shape, dtype and device."""
    tensor2d(a, a_name, dims)
    tensor2d(b, b_name, dims)
    same_kind(a, a_name, b, b_name)
    if a.shape != b.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}; got {tuple(b.shape)}")
    return a, b


def per_feature(value, name: str, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """A number, or a tensor of shape [], [D], [1, D] or [B, D], expanded to like's [B, D]."""
    rows, cols = like.shape
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # A number is checked; values inside a tensor are not (that would cost a device sync): they
        # propagate as NaN, as in the reference.
        if finite(value) is None:
            raise ValueError(f"{name} must be a finite number (or a tensor); got {value}")
        return torch.full((), float(value), dtype=like.dtype, device=like.device).expand(rows, cols)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor; got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got {value.dtype}")
    same_kind(like, like_name, value, name)
    allowed = {(), (cols,), (1, cols), (rows, cols)}
    if tuple(value.shape) not in allowed:
        raise ValueError(f"{name} must be a number or have shape [], [{cols}], [1, {cols}] or [{rows}, {cols}] "
                         f"(per feature, broadcast over the batch of {like_name}); got {tuple(value.shape)}")
    return value.expand(rows, cols)


def per_feature_rows(value, name: str, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Like per_feature, but as the ops take an observation log-variance: [1, D] (one value per feature,
    shared by every row, its gradient reduced over the batch inside the kernel) or [B, D] (per row)."""
    rows, cols = like.shape[-2:]
    full = per_feature(value, name, like[0] if like.dim() == 3 else like, like_name)  # the checks
    if not isinstance(value, torch.Tensor):
        return full.new_full((), float(value)).expand(1, cols)
    if value.dim() == 2 and value.shape[0] == rows and rows != 1:
        return value
    # [], [D], [1, D]: a [1, D] view; autograd sums its gradient back to the value's shape.
    return value.reshape(-1).expand(cols).unsqueeze(0) if value.dim() < 2 else value


def samples(t, name: str, dims: str) -> torch.Tensor:
    """A [K, B, D] tensor of K >= 1 samples."""
    float_tensor(t, name, dims, 3)
    if t.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample (K >= 1); got shape {tuple(t.shape)}")
    return t


def num_samples_value(value, like: torch.Tensor) -> int | None:
    """K >= 1 samples of `like` [B, Dz], or None. z [K, B, Dz] must be a tensor at all: K an int64 and
    the bytes of z within int64 (what torch can index); whether they can be allocated is the allocator's
    answer (fastelbo.functional.rsample names num_samples in it)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_samples must be an int or None; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"num_samples must be >= 1; got {value}")
    if value > INT64_MAX:
        raise ValueError(f"num_samples must fit in int64 (at most 2**63 - 1); got {value}")
    shape = [int(value), *like.shape]
    nbytes = math.prod(shape) * like.element_size()
    if nbytes > INT64_MAX:
        raise ValueError(f"num_samples is too large for mu of shape {list(like.shape)} ({like.dtype}): z "
                         f"[num_samples, B, Dz] must hold fewer than 2**63 bytes; got num_samples={value}, z of "
                         f"shape {shape} ({nbytes} bytes)")
    return int(value)


def free_bits_value(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"free_bits must be a real number (nats per latent dimension); got {type(value).__name__}")
    if finite(value) is None:  # NaN, an infinity, or an int beyond float's range (float() would overflow)
        shown = f"an int of {len(str(abs(value)))} digits" if isinstance(value, numbers.Integral) else value
        raise ValueError(f"free_bits must be a finite number >= 0 (nats per latent dimension); got {shown}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"free_bits must be a finite number >= 0 (nats per latent dimension); got {value}")
    return value


def prior(prior_mu, prior_logvar, mu: torch.Tensor):
    """(prior_mu, prior_logvar) expanded to mu's shape, or (None, None) for N(0, I).
    A missing half of a given prior is its standard value (mean 0, log-variance 0)."""
    if prior_mu is None and prior_logvar is None:
        return None, None
    pmu = per_feature(0.0 if prior_mu is None else prior_mu, "prior_mu", mu, "mu")
    plv = per_feature(0.0 if prior_logvar is None else prior_logvar, "prior_logvar", mu, "mu")
    return pmu, plv


def choice(value, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def unit_interval(x: torch.Tensor, name: str = "x") -> None:
    """Bernoulli targets must lie in [0, 1] (NaN passes and propagates)."""
    # fastelbo.functional re-raises a ValueError with the values and the likely cause (fastelbo/_logits_check.py).
    msg = f"{name} must lie in [0, 1] for the Bernoulli likelihood"
    raise_if_flagged((x < 0) | (x > 1), msg)


def raise_if_flagged(bad: torch.Tensor, msg: str) -> None:
    """The value checks' one way to fail, given flags set where a value is out of range.

    CPU tensors: a ValueError now (reading the flag costs nothing). Tensors on an accelerator, and
    any call being traced (torch.compile, fake tensors): torch._assert_async, a device-side assert
    with no host read, so a CUDA training step stays sync-free and capturable in a CUDA graph; the
    error surfaces at the next synchronizing call as "device-side assert triggered" and leaves the
    CUDA context unusable, as any device assert does."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(bad):
        torch._assert_async(~bad.any(), msg)
        return
    flag = _every_slice(bad)
    if flag.device.type != "cpu":
        torch._assert_async(~flag, msg)
    elif bool(flag):
        raise ValueError(msg)


def _every_slice(flag: torch.Tensor) -> torch.Tensor:
    """A flag under torch.func transforms, all slices at once: vmap cannot branch on one slice's
    value, so the call raises when any slice would."""
    while torch._C._functorch.is_functorch_wrapped_tensor(flag):
        flag = torch._C._functorch.get_unwrapped(flag)
    return flag.any()


def obs_logvar_value(value):
    """A number given for obs_logvar is checked when given (ELBOLoss's constructor), not at the first
    forward; a tensor's values are not read (a device sync), as per_feature says."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and finite(value) is None:
        raise ValueError(f"obs_logvar must be a finite number (the observation log-variance) or a tensor; got {value}")
    if isinstance(value, bool):
        raise TypeError("obs_logvar must be a number or a tensor; got bool")
    return value


def beta_value(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number; got {type(beta).__name__}")
    if finite(beta) is None:
        raise ValueError(f"beta must be a finite number (the KL weight); got {beta}")
    return float(beta)


# ---------------------------------------------------------------------------
# [B, *] inputs as [B, D]: shapes checked against each other first (errors name both N-d shapes), then
# merged. [B, D] inputs pass through untouched (no Trailing, no view: their path costs what it did).
# ---------------------------------------------------------------------------
def _is_nd(t, leading: int = 1) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > leading + 1


def _same_shape(a, a_name: str, b, b_name: str) -> None:
    if isinstance(b, torch.Tensor) and b.shape != a.shape:
        raise ValueError(f"{b_name} must have the shape of {a_name} {tuple(a.shape)}; got {tuple(b.shape)}")


def _latent_rows(mu, logvar, prior_mu, prior_logvar):
    """(mu, logvar, prior_mu, prior_logvar, rows): [B, *] latents as [B, D]; rows None for [B, D] ones."""
    if not _is_nd(mu):
        return mu, logvar, prior_mu, prior_logvar, None
    _same_shape(mu, "mu", logvar, "logvar")
    f = Trailing.of(mu, 1)
    return (f(mu, 1), f(logvar, 1) if isinstance(logvar, torch.Tensor) else logvar,
            f.broadcast(prior_mu, "prior_mu", mu, "mu"), f.broadcast(prior_logvar, "prior_logvar", mu, "mu"), f)


def _data_rows(x, recon, recon_name: str, obs_logvar=None, obs_name: str = "obs_logvar"):
    """(x, recon, obs_logvar): [B, *] data and [B, *] or [K, B, *] decoder outputs as [B, D] / [K, B, D],
    read in recon's memory order; [B, D] ones as they are."""
    if not _is_nd(x):
        return x, recon, obs_logvar
    if isinstance(recon, torch.Tensor) and recon.dim() == x.dim() + 1:
        if recon.shape[1:] != x.shape:
            raise ValueError(f"{recon_name} must have shape [K, *x.shape] with x's shape {tuple(x.shape)}; "
                             f"got {tuple(recon.shape)}")
        f = Trailing.of(recon, 2)
        recon = f(recon, 2)
    else:
        _same_shape(x, "x", recon, recon_name)
        f = Trailing.of(recon if isinstance(recon, torch.Tensor) else x, 1)
        recon = f(recon, 1) if isinstance(recon, torch.Tensor) else recon
    return f(x, 1), recon, f.broadcast(obs_logvar, obs_name, x, "x")


def _sample_rows(z, name: str, mu, rows):
    """z [K, B, *] of N-d latents mu [B, *] as [K, B, D], in mu's rows."""
    if rows is None or not isinstance(z, torch.Tensor):
        return z
    if z.dim() != mu.dim() + 1 or z.shape[1:] != mu.shape:
        raise ValueError(f"{name} must have shape [K, *mu.shape] with mu's shape {tuple(mu.shape)}; "
                         f"got {tuple(z.shape)}")
    return rows(z, 2)


# ---------------------------------------------------------------------------
# The arguments of each public function (fastelbo.functional), checked in one call and returned as
# the op takes them (priors and observation log-variances expanded, validate_args resolved): a call
# goes down, functional -> here -> the backend's op, and back up with the result.
# ---------------------------------------------------------------------------
def rsample_args(mu, logvar, num_samples, generator, seed, eps) -> tuple:
    """(mu, logvar, eps as [B, Dz] / [K, B, Dz], K (None: one sample; given eps [K, B, *] sets it), rows).

    rows: how [B, *] latents were read as [B, Dz] (None for [B, Dz] ones); rows.back() shapes z like mu.
    """
    mu_nd, rows = mu, None
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:  # inline: the [B, D] path pays one test, no call
        mu, logvar, _, _, rows = _latent_rows(mu, logvar, None, None)
    if rows is not None and isinstance(eps, torch.Tensor):
        if eps.shape == mu_nd.shape:
            eps = rows(eps, 1)
        else:
            eps = _sample_rows(eps, "eps", mu_nd, rows)
    pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    k = num_samples_value(num_samples, mu)
    if eps is not None:
        if seed is not None or generator is not None:
            raise ValueError("rsample: pass eps= or seed=/generator=, not both")
        if k is None and isinstance(eps, torch.Tensor) and eps.dim() == 3:
            k = eps.shape[0]  # K samples' noise given: K samples
        if k is None:
            pair(mu, "mu", eps, "eps", "[B, Dz]")
        else:
            samples(eps, "eps", "[K, B, Dz]")
            same_kind(mu, "mu", eps, "eps")
            if tuple(eps.shape) != (k, *mu.shape):
                raise ValueError(f"eps must have shape [num_samples, B, Dz] = {[k, *mu.shape]}; "
                                 f"got {list(eps.shape)}")
    return mu, logvar, eps, k, rows


def kl_args(mu, logvar, prior_mu, prior_logvar) -> tuple:
    """(mu, logvar, prior_mu, prior_logvar) of gaussian_kl."""
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:
        mu, logvar, prior_mu, prior_logvar, _ = _latent_rows(mu, logvar, prior_mu, prior_logvar)
    pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    return (mu, logvar, *prior(prior_mu, prior_logvar, mu))


def free_bits_args(mu, logvar, free_bits, prior_mu, prior_logvar) -> tuple:
    """(mu, logvar, prior_mu, prior_logvar, free_bits) of free_bits_kl."""
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:
        mu, logvar, prior_mu, prior_logvar, _ = _latent_rows(mu, logvar, prior_mu, prior_logvar)
    pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    lam = free_bits_value(free_bits)
    return (mu, logvar, *prior(prior_mu, prior_logvar, mu), lam)


def bernoulli_args(logits, x, validate_args) -> tuple:
    """(logits, x, validate_x) of bernoulli_log_prob."""
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x, logits, _ = _data_rows(x, logits, "logits")
    pair(logits, "logits", x, "x", "[B, Dx]")
    return logits, x, validate_args_enabled(validate_args)


def gaussian_args(mean, x, logvar) -> tuple:
    """(mean, x, logvar as [1, Dx] or [B, Dx]) of gaussian_log_prob."""
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x, mean, logvar = _data_rows(x, mean, "mean", logvar, "logvar")
    pair(mean, "mean", x, "x", "[B, Dx]")
    return mean, x, per_feature_rows(logvar, "logvar", mean, "mean")


def elbo_args(x, recon, mu, logvar, likelihood, obs_logvar, prior_mu, prior_logvar, beta, validate_args) -> tuple:
    """(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x) of elbo."""
    choice(likelihood, "likelihood", LIKELIHOODS)
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x, recon, obs_logvar = _data_rows(x, recon, "recon", obs_logvar)
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:
        mu, logvar, prior_mu, prior_logvar, _ = _latent_rows(mu, logvar, prior_mu, prior_logvar)
    _likelihood_args(x, recon, "[B, Dx] or [K, B, Dx]")
    _posterior_args(mu, logvar, x, recon)
    beta = beta_value(beta)
    s = _obs_logvar(likelihood, obs_logvar, recon)
    validate_x = validate_args_enabled(validate_args) and likelihood == "bernoulli"
    return (x, recon, mu, logvar, s, *prior(prior_mu, prior_logvar, mu), likelihood, beta, validate_x)


def iwae_args(x, recon, z, mu, logvar, likelihood, obs_logvar, prior_mu, prior_logvar, validate_args) -> tuple:
    """(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x) of iwae_bound."""
    choice(likelihood, "likelihood", LIKELIHOODS)
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        x, recon, obs_logvar = _data_rows(x, recon, "recon", obs_logvar)
    if isinstance(mu, torch.Tensor) and mu.dim() > 2:
        mu_nd = mu
        mu, logvar, prior_mu, prior_logvar, rows = _latent_rows(mu, logvar, prior_mu, prior_logvar)
        z = _sample_rows(z, "z", mu_nd, rows)
    samples(recon, "recon", "[K, B, Dx]")
    _likelihood_args(x, recon, "[K, B, Dx]")
    _posterior_args(mu, logvar, x, recon)
    samples(z, "z", "[K, B, Dz]")
    same_kind(mu, "mu", z, "z")
    if z.shape[0] != recon.shape[0]:
        raise ValueError(f"K mismatch between z and recon: z has {z.shape[0]} samples (shape {list(z.shape)}), "
                         f"recon has {recon.shape[0]} (shape {list(recon.shape)})")
    if tuple(z.shape[1:]) != tuple(mu.shape):
        raise ValueError(f"z must have shape [K, B, Dz] = [{z.shape[0]}, {mu.shape[0]}, {mu.shape[1]}] "
                         f"(K samples of mu's [B, Dz]); got {list(z.shape)}")
    s = _obs_logvar(likelihood, obs_logvar, recon)
    validate_x = validate_args_enabled(validate_args) and likelihood == "bernoulli"
    return (x, recon, z, mu, logvar, s, *prior(prior_mu, prior_logvar, mu), likelihood, validate_x)


def _likelihood_args(x, recon, recon_dims):
    """recon [B, Dx] or [K, B, Dx] against x [B, Dx]: one dtype, device and [B, Dx]."""
    tensor2d(x, "x", "[B, Dx]")
    if isinstance(recon, torch.Tensor) and recon.dim() == 3:
        samples(recon, "recon", recon_dims)
        same_kind(recon, "recon", x, "x")
        if recon.shape[1:] != x.shape:
            raise ValueError(f"recon must have shape [K, B, Dx] with [B, Dx] = x's {list(x.shape)}; "
                             f"got {list(recon.shape)}")
    else:
        pair(recon, "recon", x, "x", recon_dims)


def _posterior_args(mu, logvar, x, recon):
    pair(mu, "mu", logvar, "logvar", "[B, Dz]")
    same_kind(recon, "recon", mu, "mu")
    if mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu must have the batch size of x ({x.shape[0]}); got {mu.shape[0]}")


def _obs_logvar(likelihood, obs_logvar, recon):
    if likelihood == "gaussian":
        return per_feature_rows(0.0 if obs_logvar is None else obs_logvar, "obs_logvar", recon, "recon")
    if obs_logvar is not None:
        raise ValueError("obs_logvar is only used by likelihood='gaussian'")
    return None
