"""vmap rules of the fastelbo:: ops (torch.library.register_vmap), for every backend's op set.

The ops work per row of [B, D] operands, so N vmapped slices of [B, D] are one call on
[N*B, D] (samples [K, B, D] become [K, N*B, D]) and the per-row results come back as [N, B]
(log-weights [K, N*B] as [K, N, B], out_dim 1). That holds for every per-row result and per-
element gradient. It does not hold for
  * a [1, D] operand (a per-feature Gaussian log-variance) whose gradient the kernel reduces over
    the batch: it would be reduced over all N*B rows. It goes in as [N*B, D] (a stride-0 view
    when it is not vmapped), the kernel returns per-row gradients and each slice's B rows are summed.
  * rsample's noise, indexed by the element's place in [K, B, D] and keyed by one seed: every
    slice must see the same eps. It is drawn once, for one slice, by the op itself
    (rsample(0, 0) = eps) in the accumulation dtype, and the [N*B, D] call reads it as given eps
    (in float32 for 16-bit inputs, as the kernel computes z, rounded once). A seed per slice
    (vmap(randomness="different")) runs slice by slice.
  * free_bits_kl: its floor depends on each slice's batch mean over B rows (kl_dims), which the
    rows of other slices must not enter. It runs slice by slice.
Arguments that are not vmapped are expanded to N slices; unwanted gradients (the ops' empty
placeholders) stay unbatched.
"""

from __future__ import annotations

import torch

from . import _ops
from ._dtypes import acc_dtype


# ---------------------------------------------------------------------------
# Layouts: N slices (batch dimension `bdim`, None: not vmapped) <-> one call over N*B rows.
# ---------------------------------------------------------------------------
def _logical(t: torch.Tensor, bdim) -> tuple[int, ...]:
    """The shape one slice sees."""
    return tuple(s for i, s in enumerate(t.shape) if i != bdim)


def rows(t, bdim, n: int):
    """A [B, ...] operand of n slices as [n*B, ...]: slice i's rows are rows i*B .. i*B + B - 1."""
    if t is None:
        return None
    if bdim is None:
        if t.dim() and t.stride(0) == 0:  # every row the same (an expanded [D] prior, a scalar upstream gradient)
            return t[:1].expand(n * t.shape[0], *t.shape[1:])
        t = t.unsqueeze(0).expand(n, *t.shape)
    else:
        t = t.movedim(bdim, 0)
    return t.reshape(n * t.shape[1], *t.shape[2:])


def samples(t, bdim, n: int):
    """A [K, B, ...] operand of n slices as [K, n*B, ...]."""
    if t is None:
        return None
    t = t.unsqueeze(1).expand(t.shape[0], n, *t.shape[1:]) if bdim is None else t.movedim(bdim, 1)
    return t.reshape(t.shape[0], n * t.shape[2], *t.shape[3:])


def per_feature(t, bdim, n: int, b: int, *, for_grad: bool):
    """An observation log-variance, [1, D] (per feature) or [B, D] (per row). A per-row one is
    `rows`. A [1, D] one stays [1, D] in a forward when it is not vmapped (it is the same for every
    row of every slice); otherwise it goes per row, [n*B, D], so that the kernel returns its
    gradient per row and `sum_slices` reduces each slice's own rows."""
    if t is None:
        return None
    if _logical(t, bdim)[0] != 1 or b == 1:
        return rows(t, bdim, n)
    if bdim is None:
        return t if not for_grad else t.expand(n * b, t.shape[1])
    return t.movedim(bdim, 0).expand(n, b, t.shape[-1]).reshape(n * b, t.shape[-1])


def _feature_rows(t, bdim) -> bool:
    return t is not None and _logical(t, bdim)[0] == 1


def unrows(t: torch.Tensor, n: int, b: int):
    """A result over n*B rows as n slices: ([n, B, ...], out_dim 0); an empty placeholder (an
    unwanted gradient) stays as it is."""
    if t.dim() == 1 and t.numel() == 0 and b != 0:
        return t, None
    return t.view(n, b, *t.shape[1:]), 0


def unsamples(t: torch.Tensor, n: int, b: int):
    """A [K, n*B, ...] result as ([K, n, B, ...], out_dim 1)."""
    if t.dim() == 1 and t.numel() == 0:
        return t, None
    return t.view(t.shape[0], n, b, *t.shape[2:]), 1


def sum_slices(t: torch.Tensor, n: int, b: int):
    """Per-row gradients of a [1, D] operand, [n*B, D], as each slice's sum: ([n, 1, D], 0)."""
    if t.dim() == 1 and t.numel() == 0:
        return t, None
    return t.view(n, b, t.shape[-1]).sum(1, keepdim=True), 0


def _pack(pairs):
    outs, dims = zip(*pairs)
    return tuple(outs), tuple(dims)


def per_slice(op, n: int, in_dims, args):
    """op on each slice alone, results stacked (out_dim 0); placeholders stay unbatched."""
    results = []
    for i in range(n):
        sliced = [a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)]
        out = op(*sliced)
        results.append(out if isinstance(out, tuple) else (out,))
    pairs = []
    for j, first in enumerate(results[0]):
        placeholder = first.dim() == 1 and first.numel() == 0
        pairs.append((first, None) if placeholder else (torch.stack([r[j] for r in results]), 0))
    outs, dims = _pack(pairs)
    return (outs, dims) if len(outs) > 1 else (outs[0], dims[0])


# ---------------------------------------------------------------------------
# The rules, per op family; `ops(name)` is the backend's op of that name (prefix applied).
# ---------------------------------------------------------------------------
def _kl_rules(fwd, bwd):
    def forward(info, in_dims, mu, logvar, prior_mu, prior_logvar):
        n, b = info.batch_size, _logical(mu, in_dims[0])[0]
        args = [rows(t, d, n) for t, d in zip((mu, logvar, prior_mu, prior_logvar), in_dims)]
        return unrows(fwd(*args), n, b)

    def backward(info, in_dims, grad, mu, logvar, prior_mu, prior_logvar, output_mask):
        n, b = info.batch_size, _logical(mu, in_dims[1])[0]
        args = [rows(t, d, n) for t, d in zip((grad, mu, logvar, prior_mu, prior_logvar), in_dims)]
        return _pack(unrows(g, n, b) for g in bwd(*args, output_mask))

    return forward, backward


def _bernoulli_rules(fwd, bwd):
    def forward(info, in_dims, logits, x, validate_x=False):
        n, b = info.batch_size, _logical(logits, in_dims[0])[0]
        return unrows(fwd(rows(logits, in_dims[0], n), rows(x, in_dims[1], n), validate_x), n, b)

    def backward(info, in_dims, grad, logits, x, output_mask):
        n, b = info.batch_size, _logical(logits, in_dims[1])[0]
        args = [rows(t, d, n) for t, d in zip((grad, logits, x), in_dims)]
        return _pack(unrows(g, n, b) for g in bwd(*args, output_mask))

    return forward, backward


def _gaussian_rules(fwd, bwd):
    def forward(info, in_dims, mean, x, logvar):
        n, b = info.batch_size, _logical(mean, in_dims[0])[0]
        s = per_feature(logvar, in_dims[2], n, b, for_grad=False)
        return unrows(fwd(rows(mean, in_dims[0], n), rows(x, in_dims[1], n), s), n, b)

    def backward(info, in_dims, grad, mean, x, logvar, output_mask):
        n, b = info.batch_size, _logical(mean, in_dims[1])[0]
        s = per_feature(logvar, in_dims[3], n, b, for_grad=True)
        dmean, dx, dlv = bwd(rows(grad, in_dims[0], n), rows(mean, in_dims[1], n), rows(x, in_dims[2], n), s,
                             output_mask)
        reduce = _feature_rows(logvar, in_dims[3]) and b != 1
        return _pack([unrows(dmean, n, b), unrows(dx, n, b), sum_slices(dlv, n, b) if reduce else unrows(dlv, n, b)])

    return forward, backward


def _recon(t, bdim, n):
    """recon: [K, B, Dx] samples or [B, Dx] rows."""
    return samples(t, bdim, n) if len(_logical(t, bdim)) == 3 else rows(t, bdim, n)


def _elbo_rules(fwd, bwd):
    def forward(info, in_dims, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta,
                validate_x=False):
        n, b = info.batch_size, _logical(x, in_dims[0])[0]
        args = [rows(x, in_dims[0], n), _recon(recon, in_dims[1], n)]
        args += [rows(t, d, n) for t, d in zip((mu, logvar), in_dims[2:4])]
        args.append(per_feature(obs_logvar, in_dims[4], n, b, for_grad=False))
        args += [rows(t, d, n) for t, d in zip((prior_mu, prior_logvar), in_dims[5:7])]
        return _pack(unrows(t, n, b) for t in fwd(*args, likelihood, beta, validate_x))

    def backward(info, in_dims, grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu,
                 prior_logvar, likelihood, beta, output_mask):
        n, b = info.batch_size, _logical(x, in_dims[3])[0]
        args = [rows(t, d, n) for t, d in zip((grad_elbo, grad_loglik, grad_kl, x), in_dims[:4])]
        args.append(_recon(recon, in_dims[4], n))
        args += [rows(t, d, n) for t, d in zip((mu, logvar), in_dims[5:7])]
        args.append(per_feature(obs_logvar, in_dims[7], n, b, for_grad=True))
        args += [rows(t, d, n) for t, d in zip((prior_mu, prior_logvar), in_dims[8:10])]
        dx, drecon, dmu, dlv, dobs, dpm, dpl = bwd(*args, likelihood, beta, output_mask)
        reduce = _feature_rows(obs_logvar, in_dims[7]) and b != 1
        return _pack([unrows(dx, n, b), unsamples(drecon, n, b) if drecon.dim() == 3 else unrows(drecon, n, b),
                      unrows(dmu, n, b), unrows(dlv, n, b), sum_slices(dobs, n, b) if reduce else unrows(dobs, n, b),
                      unrows(dpm, n, b), unrows(dpl, n, b)])

    return forward, backward


def _iwae_rules(fwd, bwd):
    def forward(info, in_dims, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood,
                validate_x=False):
        n, b = info.batch_size, _logical(x, in_dims[0])[0]
        args = [rows(x, in_dims[0], n), samples(recon, in_dims[1], n), samples(z, in_dims[2], n)]
        args += [rows(t, d, n) for t, d in zip((mu, logvar), in_dims[3:5])]
        args.append(per_feature(obs_logvar, in_dims[5], n, b, for_grad=False))
        args += [rows(t, d, n) for t, d in zip((prior_mu, prior_logvar), in_dims[6:8])]
        bound, log_weights = fwd(*args, likelihood, validate_x)
        return _pack([unrows(bound, n, b), unsamples(log_weights, n, b)])

    def backward(info, in_dims, grad_log_weights, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar,
                 likelihood, output_mask):
        n, b = info.batch_size, _logical(x, in_dims[1])[0]
        args = [samples(grad_log_weights, in_dims[0], n), rows(x, in_dims[1], n), samples(recon, in_dims[2], n),
                samples(z, in_dims[3], n)]
        args += [rows(t, d, n) for t, d in zip((mu, logvar), in_dims[4:6])]
        args.append(per_feature(obs_logvar, in_dims[6], n, b, for_grad=True))
        args += [rows(t, d, n) for t, d in zip((prior_mu, prior_logvar), in_dims[7:9])]
        dx, drecon, dz, dmu, dlv, dobs, dpm, dpl = bwd(*args, likelihood, output_mask)
        reduce = _feature_rows(obs_logvar, in_dims[6]) and b != 1
        return _pack([unrows(dx, n, b), unsamples(drecon, n, b), unsamples(dz, n, b), unrows(dmu, n, b),
                      unrows(dlv, n, b), sum_slices(dobs, n, b) if reduce else unrows(dobs, n, b),
                      unrows(dpm, n, b), unrows(dpl, n, b)])

    return forward, backward


def _noise(fwd, like: torch.Tensor, shape, seed, k: int) -> torch.Tensor:
    """eps of one slice ([B, D], or [K, B, D] for k samples) in the accumulation dtype, drawn by the
    backend's rsample itself: z = 0 + e^0 * eps."""
    zeros = like.new_zeros(shape, dtype=acc_dtype(like.dtype))
    return fwd(zeros, zeros, seed, None, k)


def _rsample_rules(fwd, bwd):
    def forward(info, in_dims, mu, logvar, seed, eps, num_samples=0):
        n = info.batch_size
        if in_dims[2] is not None:  # a seed per slice: each slice its own noise
            return per_slice(fwd, n, in_dims, (mu, logvar, seed, eps, num_samples))
        b, d = _logical(mu, in_dims[0])
        spread = samples if num_samples else rows
        if eps is None:
            acc = acc_dtype(mu.dtype)
            eps = spread(_noise(fwd, mu, (b, d), seed, num_samples), None, n)
            z = fwd(rows(mu, in_dims[0], n).to(acc), rows(logvar, in_dims[1], n).to(acc), seed, eps, num_samples)
            z = z.to(mu.dtype)
        else:
            z = fwd(rows(mu, in_dims[0], n), rows(logvar, in_dims[1], n), seed, spread(eps, in_dims[3], n),
                    num_samples)
        return unsamples(z, n, b) if num_samples else unrows(z, n, b)

    def backward(info, in_dims, grad_z, logvar, seed, eps, output_mask):
        n = info.batch_size
        if in_dims[2] is not None:
            return per_slice(bwd, n, in_dims, (grad_z, logvar, seed, eps, output_mask))
        b, d = _logical(logvar, in_dims[1])
        k = _logical(grad_z, in_dims[0])[0] if len(_logical(grad_z, in_dims[0])) == 3 else 0
        spread = samples if k else rows
        if eps is None:
            acc = acc_dtype(logvar.dtype)
            eps = spread(_noise(fwd, logvar, (b, d), seed, k), None, n)
            dlv, deps = bwd(spread(grad_z, in_dims[0], n).to(acc), rows(logvar, in_dims[1], n).to(acc), seed, eps,
                            output_mask)
            dlv, deps = dlv.to(logvar.dtype), deps.to(logvar.dtype)
        else:
            dlv, deps = bwd(spread(grad_z, in_dims[0], n), rows(logvar, in_dims[1], n), seed,
                            spread(eps, in_dims[3], n), output_mask)
        return _pack([unrows(dlv, n, b), unsamples(deps, n, b) if k else unrows(deps, n, b)])

    return forward, backward


def _free_bits_rules(fwd, bwd):
    def forward(info, in_dims, mu, logvar, prior_mu, prior_logvar, free_bits):
        return per_slice(fwd, info.batch_size, in_dims, (mu, logvar, prior_mu, prior_logvar, free_bits))

    def backward(info, in_dims, grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, output_mask):
        args = (grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, output_mask)
        return per_slice(bwd, info.batch_size, in_dims, args)

    return forward, backward


_RULES = {
    "rsample": _rsample_rules,
    "gaussian_kl": _kl_rules,
    "bernoulli_log_prob": _bernoulli_rules,
    "gaussian_log_prob": _gaussian_rules,
    "elbo": _elbo_rules,
    "iwae_bound": _iwae_rules,
    "free_bits_kl": _free_bits_rules,
}
assert set(_RULES) == set(_ops.FAMILIES)


def register(prefix: str = "", lib=None) -> None:
    """vmap rules for fastelbo::<prefix><family> and its _backward, every family."""
    ns = torch.ops.fastelbo
    for family, make in _RULES.items():
        fwd, bwd = getattr(ns, prefix + family), getattr(ns, prefix + family + "_backward")
        forward_rule, backward_rule = make(fwd, bwd)
        torch.library.register_vmap(f"fastelbo::{prefix}{family}", forward_rule, lib=lib)
        torch.library.register_vmap(f"fastelbo::{prefix}{family}_backward", backward_rule, lib=lib)


register()  # the C++ ops (and the fake kernels of torch.compile: the rules only reshape and call the op)
