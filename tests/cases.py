"""The harness of the accuracy suite, shared with the property tests.

A Case holds float64 "master" inputs, the names of the differentiable ones and
a call through an Api (the public API bound to a backend, or the reference).
run() builds the backend's inputs (dtype, memory layout, device), the
reference's (same dtype) and, for float16/bfloat16, the float64 reference's
(the low-dtype values upcast), then compares every output and the gradient of
every differentiable input, with upstream gradients that are not 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import fastelbo
from fastelbo import functional as F
from fastelbo import reference as R
from helpers import LOW_PRECISION, Backend, assert_close, rand, randn, row_grad, tree_tensors, with_layout

# ---------------------------------------------------------------------------
# The harness: a Case holds float64 "master" inputs; run() builds the backend's
# inputs (dtype, layout, device), the reference's (same dtype) and, for the low
# dtypes, the float64 reference's (the low-dtype values upcast), then compares
# outputs and the gradients of every differentiable input.
# ---------------------------------------------------------------------------
@dataclass
class Case:
    tensors: dict  # name -> float64 master tensor
    diff: tuple  # names of differentiable tensors
    call: Callable  # call(api, T) -> tensor or tuple; api: Api
    n_out: tuple = ()  # per output: how many terms it sums (sqrt(n) tolerance scaling)
    n_grad: dict = field(default_factory=dict)  # per input: how many values its gradient sums (broadcasts)
    layout: dict = field(default_factory=dict)  # per input: memory layout on the backend side
    unused_ok: bool = False  # an input may not reach an output: its gradient is then zero
    grads_baseline_rule: bool = False  # float32 gradients judged by the 2x-PyTorch rule (helpers: ill-conditioned)


class Api:
    """The public API bound to a backend, or the reference, behind one set of names."""

    def __init__(self, backend: str | None):
        self.backend = backend

    def _kw(self):
        return {} if self.backend is None else {"backend": self.backend}

    def rsample(self, mu, logvar, **kw):
        return R.rsample(mu, logvar, **kw) if self.backend is None else F.rsample(mu, logvar, **kw, **self._kw())

    def gaussian_kl(self, *a, **kw):
        return R.gaussian_kl(*a, **kw) if self.backend is None else F.gaussian_kl(*a, **kw, **self._kw())

    def bernoulli_log_prob(self, logits, x):
        return R.bernoulli_log_prob(logits, x) if self.backend is None else F.bernoulli_log_prob(
            logits, x, **self._kw())

    def gaussian_log_prob(self, *a, **kw):
        return R.gaussian_log_prob(*a, **kw) if self.backend is None else F.gaussian_log_prob(*a, **kw, **self._kw())

    def elbo(self, *a, **kw):
        return tuple(R.elbo(*a, **kw) if self.backend is None else F.elbo(*a, **kw, **self._kw()))

    def iwae_bound(self, *a, **kw):
        return R.iwae_bound(*a, **kw) if self.backend is None else F.iwae_bound(*a, **kw, **self._kw())

    def free_bits_kl(self, *a, **kw):
        return R.free_bits_kl(*a, **kw) if self.backend is None else F.free_bits_kl(*a, **kw, **self._kw())

    def loss(self, recon, x, mu, logvar, *, likelihood, beta, reduction, obs_logvar=None, bound="elbo",
             free_bits=0.0, z=None, **kw):
        if self.backend is None:
            if bound == "iwae":
                loss = -R.iwae_bound(recon, x, z, mu, logvar, likelihood=likelihood, obs_logvar=obs_logvar, **kw)
            elif free_bits:
                ll = R.elbo(recon, x, mu, logvar, likelihood=likelihood, obs_logvar=obs_logvar, **kw).log_likelihood
                loss = beta * R.free_bits_kl(mu, logvar, free_bits, kw.get("prior_mu"), kw.get("prior_logvar")) - ll
            else:
                loss = -R.elbo(recon, x, mu, logvar, likelihood=likelihood, beta=beta, obs_logvar=obs_logvar,
                               **kw).elbo
            return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()
        mod = fastelbo.ELBOLoss(likelihood=likelihood, beta=beta, reduction=reduction, obs_logvar=obs_logvar,
                                bound=bound, free_bits=free_bits, backend=self.backend)
        return mod(recon, x, mu, logvar, **({} if z is None else {"z": z}), **kw)


def _leaves(case: Case, dtype, device, layouts: bool, upcast: bool):
    out = {}
    for name, master in case.tensors.items():
        t = master.to(dtype)
        if upcast:
            t = t.double()
        if layouts and t.dim() == 2:
            t = with_layout(t, case.layout.get(name, "contiguous"))
        elif layouts and t.dim() == 3 and case.layout.get(name) == "sample_minor":
            t = t.transpose(0, 1).contiguous().transpose(0, 1)  # [K, B, D] stored as [B, K, D]
        t = t.to(device).detach()  # detach keeps the strides: a non-contiguous leaf
        if name in case.diff:
            t.requires_grad_(True)
        out[name] = t
    return out


def _upstream(outputs, gen):
    """float64 upstream gradients, one per output: random per row (or per element), never all ones."""
    grads = []
    for o in outputs:
        if o.dim() == 0:
            grads.append(torch.tensor(1.7 if len(grads) % 2 == 0 else -0.6, dtype=torch.float64))
        elif o.dim() == 1:
            grads.append(row_grad(o.shape[0], gen, torch.float64, "cpu"))
        else:
            grads.append(randn(o.shape, gen))
            grads[-1] = grads[-1].double()
    return grads


def _forward_backward(case: Case, api: Api, dtype, device, layouts, upcast, gen_seed):
    T = _leaves(case, dtype, device, layouts, upcast)
    outs = tree_tensors(case.call(api, T))
    gen = torch.Generator().manual_seed(gen_seed)
    ups = _upstream(outs, gen)
    diff = [T[n] for n in case.diff]
    grads = ()
    if diff:
        g_in = [u.to(dtype).to(o.dtype).to(o.device) for u, o in zip(ups, outs)]
        grads = torch.autograd.grad(outs, diff, g_in, allow_unused=case.unused_ok,
                                    materialize_grads=case.unused_ok)
    return T, outs, grads


def run(case: Case, backend: Backend, dtype, *, gen_seed=0, overflow_ok=False, ignore=None):
    """Forward and gradients of `case` on `backend` vs the reference. Returns the backend's (inputs, outputs, grads).

    overflow_ok: see helpers.assert_close (extreme inputs). ignore: name -> bool mask of gradient positions
    not compared (applied to the gradients of inputs of that mask's shape).
    """
    T, outs, grads = _forward_backward(case, Api(backend.name), dtype, backend.device, True, False, gen_seed)
    _, r_outs, r_grads = _forward_backward(case, Api(None), dtype, "cpu", False, False, gen_seed)
    r64_outs, r64_grads = [None] * len(outs), [None] * len(grads)
    if dtype in LOW_PRECISION or overflow_ok or case.grads_baseline_rule:
        _, r64_outs, r64_grads = _forward_backward(case, Api(None), dtype, "cpu", False, True, gen_seed)
    assert len(outs) == len(r_outs) == len(r64_outs)
    assert len(grads) == len(r_grads) == len(r64_grads) == len(case.diff)
    for k, (o, r, r64) in enumerate(zip(outs, r_outs, r64_outs)):
        n = case.n_out[k] if k < len(case.n_out) else 1
        assert o.device.type == torch.device(backend.device).type
        assert_close(o, r.detach(), ref64=r64, n=n, name=f"output {k}", overflow_ok=overflow_ok)
    for name, g, r, r64 in zip(case.diff, grads, r_grads, r64_grads):
        assert g.shape == T[name].shape, f"grad of {name}: shape {tuple(g.shape)} != {tuple(T[name].shape)}"
        mask = None
        if ignore is not None:
            masks = [m for m in ignore.values() if m.shape == g.shape]
            mask = masks[0] if masks else None
        assert_close(g, r, ref64=r64, n=case.n_grad.get(name, 1), name=f"grad of {name}", overflow_ok=overflow_ok,
                     ignore=mask, baseline_rule=case.grads_baseline_rule)
    return T, outs, grads


# ---------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------
Z_SHAPES = [(3, 1), (5, 5), (16, 17), (2, 1030), (0, 5)]  # odd Dz, a row over two 512-chunks, empty batch
X_SHAPES = [(3, 1), (5, 7), (4, 785), (2, 3000), (0, 7)]  # odd Dx, a long row (6 chunks), empty batch
ELBO_SHAPES = [(3, 1, 1), (5, 7, 5), (4, 785, 17), (2, 3000, 5), (0, 7, 5)]  # (B, Dx, Dz)


def _sid(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------
# Case builders (float64 masters).
# ---------------------------------------------------------------------------
def rsample_case(B, Dz, mode, gen, lv_range=(-3.0, 2.0)):
    T = {"mu": randn((B, Dz), gen), "logvar": rand((B, Dz), gen, *lv_range, dtype=torch.float64)}
    if mode == "eps":
        T["eps"] = randn((B, Dz), gen).double()
        return Case(T, ("mu", "logvar", "eps"), lambda api, t: api.rsample(t["mu"], t["logvar"], eps=t["eps"]))
    seed = int(torch.randint(-2**63, 2**63 - 1, (), generator=gen))
    return Case(T, ("mu", "logvar"), lambda api, t: api.rsample(t["mu"], t["logvar"], seed=seed))


PRIORS = ["none", "vec", "row", "full", "float", "scalar_tensor", "only_mu", "only_logvar"]


def _prior(kind, B, Dz, gen):
    """(tensors, kwargs builder, n_grad) for a prior kind."""
    shapes = {"vec": (Dz,), "row": (1, Dz), "full": (B, Dz), "scalar_tensor": ()}
    if kind == "none":
        return {}, (lambda t: {}), {}
    if kind == "float":
        return {}, (lambda t: {"prior_mu": 0.3, "prior_logvar": -0.4}), {}
    if kind == "only_mu":
        return {"prior_mu": randn((Dz,), gen, 0.5).double()}, (lambda t: {"prior_mu": t["prior_mu"]}), {"prior_mu": B}
    if kind == "only_logvar":
        return ({"prior_logvar": rand((Dz,), gen, -1, 1, dtype=torch.float64)},
                (lambda t: {"prior_logvar": t["prior_logvar"]}), {"prior_logvar": B})
    shape = shapes[kind]
    T = {"prior_mu": randn(shape, gen, 0.5).double(), "prior_logvar": rand(shape, gen, -1, 1, dtype=torch.float64)}
    n = 1 if kind == "full" else B * (Dz if kind == "scalar_tensor" else 1)
    return T, (lambda t: {"prior_mu": t["prior_mu"], "prior_logvar": t["prior_logvar"]}), {
        "prior_mu": n, "prior_logvar": n}


def kl_case(B, Dz, prior, gen, lv_range=(-3.0, 2.0)):
    T = {"mu": randn((B, Dz), gen).double(), "logvar": rand((B, Dz), gen, *lv_range, dtype=torch.float64)}
    PT, kw, n_grad = _prior(prior, B, Dz, gen)
    T.update(PT)
    return Case(T, tuple(T), lambda api, t: api.gaussian_kl(t["mu"], t["logvar"], **kw(t)), n_out=(Dz,),
                n_grad=n_grad)


def bernoulli_case(B, Dx, xkind, gen, logit_scale=3.0):
    x = rand((B, Dx), gen, 0, 1, dtype=torch.float64)
    if xkind == "binary":
        x = (x < 0.5).double()
    T = {"logits": randn((B, Dx), gen, logit_scale).double(), "x": x}
    return Case(T, ("logits", "x"), lambda api, t: api.bernoulli_log_prob(t["logits"], t["x"]), n_out=(Dx,))


OBS = ["float", "vec", "row", "full", "scalar_tensor", "default"]


def _obs(kind, B, Dx, gen):
    """(tensors, logvar value builder, n_grad) for an observation log-variance kind."""
    shapes = {"vec": (Dx,), "row": (1, Dx), "full": (B, Dx), "scalar_tensor": ()}
    if kind == "default":
        return {}, (lambda t: None), {}
    if kind == "float":
        return {}, (lambda t: -0.5), {}
    n = {"vec": B, "row": B, "full": 1, "scalar_tensor": B * Dx}[kind]
    return ({"s": rand(shapes[kind], gen, -2, 2, dtype=torch.float64)}, (lambda t: t["s"]), {"s": n})


def gaussian_case(B, Dx, obs, gen):
    T = {"mean": randn((B, Dx), gen).double(), "x": randn((B, Dx), gen).double()}
    ST, s, n_grad = _obs(obs, B, Dx, gen)
    T.update(ST)

    def call(api, t):
        v = s(t)
        return api.gaussian_log_prob(t["mean"], t["x"]) if v is None else api.gaussian_log_prob(t["mean"], t["x"], v)

    return Case(T, tuple(T), call, n_out=(Dx,), n_grad=n_grad)


ELBO_VARIANTS = [
    # (likelihood, obs kind, prior kind, beta)
    ("bernoulli", None, "none", 1.0),
    ("bernoulli", None, "vec", 0.37),
    ("bernoulli", None, "full", 2.5),
    ("gaussian", "default", "none", 1.0),
    ("gaussian", "float", "vec", 0.37),
    ("gaussian", "vec", "none", 2.5),
    ("gaussian", "full", "float", 0.37),
]


def _elbo_tensors(B, Dx, Dz, likelihood, obs, prior, gen, logit_scale=3.0, lv_range=(-3.0, 2.0)):
    if likelihood == "bernoulli":
        T = {"x": rand((B, Dx), gen, 0, 1, dtype=torch.float64), "recon": randn((B, Dx), gen, logit_scale).double()}
        ST, s, n_obs = {}, (lambda t: None), {}
    else:
        T = {"x": randn((B, Dx), gen).double(), "recon": randn((B, Dx), gen).double()}
        ST, s, n_obs = _obs(obs, B, Dx, gen)
    T.update({"mu": randn((B, Dz), gen).double(), "logvar": rand((B, Dz), gen, *lv_range, dtype=torch.float64)})
    T.update(ST)
    PT, pkw, n_prior = _prior(prior, B, Dz, gen)
    T.update(PT)
    return T, s, pkw, {**n_obs, **n_prior}


def elbo_case(B, Dx, Dz, likelihood, obs, prior, beta, gen, **ranges):
    T, s, pkw, n_grad = _elbo_tensors(B, Dx, Dz, likelihood, obs, prior, gen, **ranges)

    def call(api, t):
        return api.elbo(t["recon"], t["x"], t["mu"], t["logvar"], likelihood=likelihood, obs_logvar=s(t),
                        beta=beta, **pkw(t))

    # elbo sums Dx + Dz terms, log-likelihood Dx, KL Dz.
    return Case(T, tuple(T), call, n_out=(Dx + Dz, Dx, Dz), n_grad=n_grad)


def loss_case(B, Dx, Dz, likelihood, reduction, gen):
    obs, prior, beta = ("vec", "none", 0.37) if likelihood == "gaussian" else (None, "vec", 1.6)
    T, s, pkw, n_grad = _elbo_tensors(B, Dx, Dz, likelihood, obs, prior, gen)

    def call(api, t):
        return api.loss(t["recon"], t["x"], t["mu"], t["logvar"], likelihood=likelihood, beta=beta,
                        reduction=reduction, obs_logvar=s(t), **pkw(t))

    n = (Dx + Dz) * (B if reduction != "none" else 1)
    return Case(T, tuple(T), call, n_out=(n,), n_grad=n_grad)
