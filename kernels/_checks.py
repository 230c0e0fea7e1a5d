"""The argument checks of the Triton ops (fastelbo::triton_<op>), the Triton twin of csrc/checks.h:
the same rules and the same messages, in torch._check (so torch.compile's fake tensors are checked
too). The Python API validates first with friendlier messages (fastelbo/_validate.py); these guard
direct op calls. One function per op's arguments, named as in csrc/checks.h.
"""

from __future__ import annotations

import torch

from fastelbo._dtypes import FLOAT_DTYPES, acc_dtype
from fastelbo._validate import raise_if_flagged

LIKELIHOODS = ("bernoulli", "gaussian")


# ---------------------------------------------------------------------------
# Operands
# ---------------------------------------------------------------------------
def check_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    """b is on a's device (the kernels take raw pointers: another device's memory is no operand)."""
    torch._check(b.device == a.device, lambda: f"fastelbo: {bn} must be on {a.device} like {an}, got {b.device}")


def check_like(a: torch.Tensor, an: str, b: torch.Tensor | None, bn: str) -> None:
    """b (when given) has a's shape and dtype; a is a 2-D floating tensor (as csrc/checks.h)."""
    torch._check(a.dim() == 2, lambda: f"fastelbo: {an} must be 2-D [B, D], got shape {tuple(a.shape)}")
    torch._check(a.dtype in FLOAT_DTYPES, lambda: f"fastelbo: {an} must be float16, bfloat16, float32 or float64, "
                 f"got {a.dtype}")
    if b is None:
        return
    torch._check(b.shape == a.shape, lambda: f"fastelbo: {bn} must have the shape of {an} {tuple(a.shape)}, "
                 f"got {tuple(b.shape)}")
    torch._check(b.dtype == a.dtype, lambda: f"fastelbo: {bn} must have dtype {a.dtype}, got {b.dtype}")
    check_device(a, an, b, bn)


def check_samples(t: torch.Tensor | None, name: str, like: torch.Tensor, like_name: str) -> None:
    """t (when given) is [K, B, D] over a [B, D] operand `like`: same (B, D), dtype and device."""
    if t is None:
        return
    torch._check(t.dim() == 3 and tuple(t.shape[1:]) == tuple(like.shape), lambda: (
        f"fastelbo: {name} must be [K, B, D] with [B, D] = {like_name}'s {tuple(like.shape)}, got {tuple(t.shape)}"))
    torch._check(t.dtype == like.dtype, lambda: f"fastelbo: {name} must have dtype {like.dtype}, got {t.dtype}")
    check_device(like, like_name, t, name)


def check_obs_logvar(s: torch.Tensor | None, name: str, x: torch.Tensor, x_name: str = "x") -> None:
    """An observation log-variance: [1, D] (one per feature, broadcast over rows) or [B, D] (per row)
    for x [B, D]; x's dtype and device."""
    if s is None:
        return
    B, D = x.shape
    torch._check(s.dim() == 2 and s.shape[1] == D and s.shape[0] in (1, B), lambda: (
        f"fastelbo: {name} must be [1, {D}] (per feature) or [{B}, {D}] (per row), got {tuple(s.shape)}"))
    torch._check(s.dtype == x.dtype, lambda: f"fastelbo: {name} must have dtype {x.dtype}, got {s.dtype}")
    check_device(x, x_name, s, name)


def check_row_grad(g: torch.Tensor | None, name: str, like: torch.Tensor) -> None:
    """An upstream gradient of a per-row result: [B], the rows' dtype."""
    if g is None:
        return
    torch._check(g.dim() == 1 and g.shape[0] == like.shape[0],
                 lambda: f"fastelbo: {name} must have shape [{like.shape[0]}], got {tuple(g.shape)}")
    torch._check(g.dtype == like.dtype, lambda: f"fastelbo: {name} must have dtype {like.dtype}, got {g.dtype}")
    check_device(like, "the other operands", g, name)


X_RANGE_MESSAGE = ("fastelbo: x must lie in [0, 1] for the Bernoulli likelihood "
                   "(pass validate_args=False to skip this check)")


def check_unit_interval(bad_rows: torch.Tensor) -> None:
    """Fails when a forward kernel flagged a row with x outside [0, 1]: a ValueError on CPU tensors
    (as the C++ kernels raise), a device-side assert without a host read on a GPU and while tracing
    (fastelbo/_validate.py raise_if_flagged)."""
    raise_if_flagged(bad_rows.bool(), X_RANGE_MESSAGE)


# ---------------------------------------------------------------------------
# The arguments of each op
# ---------------------------------------------------------------------------
def check_rsample_args(mu, logvar, seed, eps, num_samples):
    """mu, logvar [B, D]; eps (given) [B, D] for num_samples = 0, else [K, B, D]; the seed on mu's device."""
    torch._check(num_samples >= 0, lambda: f"fastelbo: num_samples must be >= 0 (0: one [B, D] sample), "
                 f"got {num_samples}")
    check_like(mu, "mu", logvar, "logvar")
    check_device(mu, "mu", seed, "seed")  # read by the kernels (the CUDA kernels of csrc copy a CPU one over)
    if num_samples == 0:
        check_like(mu, "mu", eps, "eps")
    else:
        check_samples(eps, "eps", mu, "mu")
        torch._check(eps is None or eps.shape[0] == num_samples, lambda: (
            f"fastelbo: eps must have num_samples = {num_samples} samples, got {eps.shape[0]}"))


def check_rsample_backward_args(grad_z, logvar, seed, eps):
    """grad_z [B, D] or [K, B, D] against logvar [B, D]; eps (given) of grad_z's shape."""
    torch._check(grad_z.dim() in (2, 3), lambda: f"fastelbo: grad_z must be [B, D] or [K, B, D], got shape "
                 f"{tuple(grad_z.shape)}")
    check_like(logvar, "logvar", None, "")
    check_device(logvar, "logvar", seed, "seed")
    if grad_z.dim() == 2:
        check_like(logvar, "logvar", grad_z, "grad_z")
        check_like(logvar, "logvar", eps, "eps")
    else:
        check_samples(grad_z, "grad_z", logvar, "logvar")
        torch._check(eps is None or tuple(eps.shape) == tuple(grad_z.shape), lambda: (
            f"fastelbo: eps must have grad_z's shape {tuple(grad_z.shape)}, got {tuple(eps.shape)}"))
        check_samples(eps, "eps", logvar, "logvar")


def check_kl_args(mu, logvar, prior_mu, prior_logvar):
    check_like(mu, "mu", logvar, "logvar")
    check_like(mu, "mu", prior_mu, "prior_mu")
    check_like(mu, "mu", prior_logvar, "prior_logvar")
    torch._check((prior_mu is None) == (prior_logvar is None), lambda: (
        "fastelbo: prior_mu and prior_logvar must be given together (the Python API fills a missing one)"))


def check_free_bits(free_bits):
    free_bits = float(free_bits)
    torch._check(free_bits >= 0.0, lambda: f"fastelbo: free_bits must be >= 0 (nats per latent dimension), "
                 f"got {free_bits}")  # NaN fails too


def check_free_bits_backward(kl_dims, mu, free_bits):
    """The arguments of free_bits_kl_backward beyond the KL ones: the floor and kl_dims [Dz] (accumulation dtype)."""
    check_free_bits(free_bits)
    torch._check(tuple(kl_dims.shape) == (mu.shape[1],) and kl_dims.dtype == acc_dtype(mu.dtype), lambda: (
        f"fastelbo: kl_dims must be [{mu.shape[1]}] {acc_dtype(mu.dtype)} (free_bits_kl's), got "
        f"{tuple(kl_dims.shape)} {kl_dims.dtype}"))
    check_device(mu, "mu", kl_dims, "kl_dims")


def check_gaussian_args(mean, x, logvar):
    """gaussian_log_prob(_backward): mean, x [B, Dx]; logvar [1, Dx] or [B, Dx]."""
    check_like(mean, "mean", x, "x")
    check_obs_logvar(logvar, "logvar", mean, "mean")


def check_recon(x, recon, likelihood, obs_logvar):
    """x [B, Dx]; recon [B, Dx] or [K, B, Dx] (K samples); obs_logvar [1, Dx] or [B, Dx]."""
    torch._check(likelihood in LIKELIHOODS,
                 lambda: f"fastelbo: likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    check_like(x, "x", None, "")
    torch._check(recon.dim() in (2, 3), lambda: f"fastelbo: recon must be [B, Dx] or [K, B, Dx], got shape "
                 f"{tuple(recon.shape)}")
    if recon.dim() == 2:
        check_like(recon, "recon", x, "x")
    else:
        check_samples(recon, "recon", x, "x")
    check_obs_logvar(obs_logvar, "obs_logvar", x)
    torch._check(likelihood != "gaussian" or obs_logvar is not None,
                 lambda: "fastelbo: the gaussian likelihood needs obs_logvar (the Python API fills 0)")


def check_latents(x, mu, logvar, prior_mu, prior_logvar):
    check_kl_args(mu, logvar, prior_mu, prior_logvar)
    torch._check(mu.shape[0] == x.shape[0],
                 lambda: f"fastelbo: mu must have the batch size of x ({x.shape[0]}), got {mu.shape[0]}")
    torch._check(mu.dtype == x.dtype, lambda: f"fastelbo: mu must have dtype {x.dtype}, got {mu.dtype}")
    check_device(x, "x", mu, "mu")


def check_elbo_args(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood):
    check_recon(x, recon, likelihood, obs_logvar)
    check_latents(x, mu, logvar, prior_mu, prior_logvar)


def check_elbo_upstream(grad_elbo, grad_loglik, grad_kl, x):
    """The upstream gradients of elbo's three per-row results (None: that result is unused)."""
    for g, name in ((grad_elbo, "grad_elbo"), (grad_loglik, "grad_loglik"), (grad_kl, "grad_kl")):
        check_row_grad(g, name, x)


def check_iwae_args(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood):
    check_like(x, "x", None, "")
    torch._check(recon.dim() == 3, lambda: f"fastelbo: recon must be [K, B, Dx], got shape {tuple(recon.shape)}")
    torch._check(z.dim() == 3, lambda: f"fastelbo: z must be [K, B, Dz], got shape {tuple(z.shape)}")
    torch._check(z.shape[0] == recon.shape[0], lambda: (
        f"fastelbo: K mismatch between z and recon: z has {z.shape[0]} samples, recon {recon.shape[0]}"))
    torch._check(recon.shape[1] == x.shape[0], lambda: (
        f"fastelbo: recon must have the batch size of x ({x.shape[0]}), got {recon.shape[1]}"))
    torch._check(recon.shape[2] == x.shape[1], lambda: (
        f"fastelbo: recon must have Dx = {x.shape[1]} (x's), got {recon.shape[2]}"))
    check_recon(x, recon, likelihood, obs_logvar)
    check_kl_args(mu, logvar, prior_mu, prior_logvar)
    torch._check(mu.shape[0] == x.shape[0],
                 lambda: f"fastelbo: mu must have the batch size of x ({x.shape[0]}), got {mu.shape[0]}")
    torch._check(z.shape[1] == mu.shape[0],
                 lambda: f"fastelbo: z must have the batch size of mu ({mu.shape[0]}), got {z.shape[1]}")
    torch._check(z.shape[2] == mu.shape[1],
                 lambda: f"fastelbo: z must have Dz = {mu.shape[1]} (mu's), got {z.shape[2]}")
    torch._check(mu.dtype == x.dtype, lambda: f"fastelbo: mu must have dtype {x.dtype}, got {mu.dtype}")
    torch._check(z.dtype == x.dtype, lambda: f"fastelbo: z must have dtype {x.dtype}, got {z.dtype}")
    check_device(x, "x", mu, "mu")
    check_device(x, "x", z, "z")



def check_log_weights_grad(c, recon, x):
    """grad_log_weights of iwae_bound_backward: [K, B] in the accumulation dtype of x (that of log_weights)."""
    torch._check(tuple(c.shape) == tuple(recon.shape[:2]), lambda: (
        f"fastelbo: grad_log_weights must have shape {tuple(recon.shape[:2])}, got {tuple(c.shape)}"))
    torch._check(c.dtype == acc_dtype(x.dtype), lambda: f"fastelbo: grad_log_weights must have dtype "
                 f"{acc_dtype(x.dtype)} (the log-weights'), got {c.dtype}")
    check_device(x, "x", c, "grad_log_weights")
