"""What the benchmarks run: shapes, op families, the implementations compared
and the minimum-bytes model of every case. Shared by the pytest-benchmark
suite (bench/) and the ``fastelbo bench`` command.

A *case* is (op family, pass, shape, dtype); each case runs under several
*implementations*:

  eager          fastelbo.reference as users write it: torch.distributions,
                 eps drawn with torch.randn where noise is needed
  compile        torch.compile(the same reference function), compiled once per
                 case (shape, dtype, pass) and warmed up before timing; eps is
                 drawn eagerly with torch.randn outside the graph (Inductor's
                 CPU randn is scalar: keeping it out is the faster, so the
                 stronger, baseline)
  fastelbo-<b>   the public fastelbo API with backend=<b>, for every backend
                 fastelbo._backend.available(b, device) reports usable, called
                 with its defaults (argument validation on), as users call it

Passes: "fwd" runs the forward with inputs that do not require grad (no
autograd graph); "fwd+bwd" runs forward and backward with
torch.autograd.grad (no accumulation into .grad, like a step after
zero_grad(set_to_none=True)).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import reference as R

PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
BASELINES = ("eager", "compile")
FASTELBO_PREFIX = "fastelbo-"


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """mu, logvar: [B, Dz]; x, recon: [B, Dx]."""

    family: str
    B: int
    Dx: int
    Dz: int

    @property
    def id(self) -> str:
        return f"{self.B}x{self.Dx}x{self.Dz}"

    def __str__(self) -> str:
        return self.id


TINY = Shape("tiny", 32, 64, 8)
TARGET = Shape("mnist", 4096, 784, 64)  # the target shape

FULL_SHAPES = (
    TINY,
    Shape("mnist", 256, 784, 32), Shape("mnist", 256, 784, 64),
    Shape("mnist", 4096, 784, 32), TARGET,
    Shape("cifar", 128, 3072, 128), Shape("cifar", 128, 3072, 256),
    Shape("celeba", 128, 12288, 128), Shape("celeba", 128, 12288, 256),
    Shape("large-rows", 64, 196608, 512),
)
QUICK_SHAPES = (TINY, Shape("mnist", 256, 784, 32), TARGET)
FULL_DTYPES = ("float32", "bfloat16")
QUICK_DTYPES = ("float32",)


def parse_shape(text: str) -> Shape:
    """'BxDxxDz' (e.g. 4096x784x64), or a family name of the full sweep."""
    for s in FULL_SHAPES:
        if text == s.id:
            return s
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must be BxDxxDz with positive integers (e.g. 4096x784x64); got {text!r}")
    return Shape("custom", *(int(p) for p in parts))


# ---------------------------------------------------------------------------
# Op families: inputs, reference, fastelbo call, gradients, minimum bytes
# ---------------------------------------------------------------------------
class Op:
    """One op family. Subclasses define the tensors, the two calls and the model.

    reference(t, eps) and fastelbo(t, backend) return a tuple of outputs;
    in the fwd+bwd pass autograd.grad(outputs, [t[n] for n in wrt],
    grad_outputs(t)) runs the backward.
    """

    name: str = ""
    needs_noise = False   # the eager/compile baselines draw eps = torch.randn_like(mu)
    passes = PASSES
    wrt: tuple[str, ...] = ()        # inputs that get gradients in fwd+bwd
    description = ""

    # -- tensors -------------------------------------------------------------
    def tensor_specs(self, s: Shape) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, kind); kind: 'normal', 'unit' (uniform [0, 1]), 'small' (0.1 * normal)."""
        raise NotImplementedError

    def grad_specs(self, s: Shape) -> tuple[tuple[int, ...] | None, ...]:
        """Shapes of the upstream gradients, one per output; None: scalar output, gradient 1."""
        raise NotImplementedError

    # -- calls ---------------------------------------------------------------
    def reference(self, t: dict, eps):
        raise NotImplementedError

    def fastelbo(self, t: dict, backend: str):
        raise NotImplementedError

    # -- minimum bytes -------------------------------------------------------
    def model(self, s: Shape, pass_: str) -> dict[str, dict[str, int]]:
        """{'reads': {tensor: elements}, 'writes': {tensor: elements}}: the least
        any implementation must move (see bytes_model)."""
        raise NotImplementedError


def _rows(s: Shape) -> int:
    return s.B


class RSample(Op):
    name = "rsample"
    needs_noise = True
    wrt = ("mu", "logvar")
    description = "z = mu + exp(logvar/2) * eps"

    def tensor_specs(self, s):
        return {"mu": ((s.B, s.Dz), "normal"), "logvar": ((s.B, s.Dz), "small")}

    def grad_specs(self, s):
        return ((s.B, s.Dz),)

    def reference(self, t, eps):
        return (R.rsample(t["mu"], t["logvar"], eps=eps),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.rsample(t["mu"], t["logvar"], backend=backend),)

    def model(self, s, pass_):
        n = s.B * s.Dz
        # eps comes from a counter-based generator in registers: 0 bytes.
        if pass_ == "fwd":
            return {"reads": {"mu": n, "logvar": n}, "writes": {"z": n}}
        # dmu = grad_z itself (no copy needed); dlogvar recomputes eps from the seed.
        return {"reads": {"mu": n, "logvar": n, "grad_z": n}, "writes": {"z": n, "dlogvar": n}}


class GaussianKL(Op):
    name = "kl"
    wrt = ("mu", "logvar")
    description = "KL(N(mu, e^logvar) || N(0, I)) per row"

    def tensor_specs(self, s):
        return {"mu": ((s.B, s.Dz), "normal"), "logvar": ((s.B, s.Dz), "small")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.gaussian_kl(t["mu"], t["logvar"]),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.gaussian_kl(t["mu"], t["logvar"], backend=backend),)

    def model(self, s, pass_):
        n = s.B * s.Dz
        if pass_ == "fwd":
            return {"reads": {"mu": n, "logvar": n}, "writes": {"kl": s.B}}
        return {"reads": {"mu": n, "logvar": n, "grad_kl": s.B},
                "writes": {"kl": s.B, "dmu": n, "dlogvar": n}}


class GaussianKLLearned(Op):
    """One layer of a hierarchical VAE (Ladder VAE, NVAE, VDVAE): the KL between the posterior and a prior
    that are both learned, gradients to both sides."""

    name = "kl-learned"
    wrt = ("mu", "logvar", "prior_mu", "prior_logvar")
    description = "KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per row, both [B, Dz] and learned"

    def tensor_specs(self, s):
        return {"mu": ((s.B, s.Dz), "normal"), "logvar": ((s.B, s.Dz), "small"),
                "prior_mu": ((s.B, s.Dz), "normal"), "prior_logvar": ((s.B, s.Dz), "small")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.gaussian_kl(t["mu"], t["logvar"], t["prior_mu"], t["prior_logvar"]),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.gaussian_kl(t["mu"], t["logvar"], t["prior_mu"], t["prior_logvar"], backend=backend),)

    def model(self, s, pass_):
        n = s.B * s.Dz
        reads = {"mu": n, "logvar": n, "prior_mu": n, "prior_logvar": n}
        if pass_ == "fwd":
            return {"reads": reads, "writes": {"kl": s.B}}
        return {"reads": {**reads, "grad_kl": s.B},
                "writes": {"kl": s.B, "dmu": n, "dlogvar": n, "dprior_mu": n, "dprior_logvar": n}}


class Bernoulli(Op):
    name = "bernoulli"
    wrt = ("logits",)
    description = "log Bernoulli(x | sigmoid(logits)) per row"

    def tensor_specs(self, s):
        return {"logits": ((s.B, s.Dx), "normal"), "x": ((s.B, s.Dx), "unit")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.bernoulli_log_prob(t["logits"], t["x"]),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.bernoulli_log_prob(t["logits"], t["x"], backend=backend),)

    def model(self, s, pass_):
        n = s.B * s.Dx
        if pass_ == "fwd":
            return {"reads": {"logits": n, "x": n}, "writes": {"loglik": s.B}}
        return {"reads": {"logits": n, "x": n, "grad": s.B}, "writes": {"loglik": s.B, "dlogits": n}}


class Gaussian(Op):
    name = "gaussian"
    wrt = ("mean", "logvar")
    description = "log N(x | mean, e^logvar) per row, logvar a learned [Dx] vector"

    def tensor_specs(self, s):
        return {"mean": ((s.B, s.Dx), "normal"), "x": ((s.B, s.Dx), "normal"), "logvar": ((s.Dx,), "small")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.gaussian_log_prob(t["mean"], t["x"], t["logvar"]),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.gaussian_log_prob(t["mean"], t["x"], t["logvar"], backend=backend),)

    def model(self, s, pass_):
        n = s.B * s.Dx
        if pass_ == "fwd":
            return {"reads": {"mean": n, "x": n, "logvar": s.Dx}, "writes": {"loglik": s.B}}
        return {"reads": {"mean": n, "x": n, "logvar": s.Dx, "grad": s.B},
                "writes": {"loglik": s.B, "dmean": n, "dlogvar": s.Dx}}


class ELBO(Op):
    name = "elbo"
    wrt = ("recon", "mu", "logvar")
    description = "fused ELBO (Bernoulli likelihood, N(0, I) prior) per row; backward from the elbo term"

    def tensor_specs(self, s):
        return {"recon": ((s.B, s.Dx), "normal"), "x": ((s.B, s.Dx), "unit"),
                "mu": ((s.B, s.Dz), "normal"), "logvar": ((s.B, s.Dz), "small")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.elbo(recon=t["recon"], x=t["x"], mu=t["mu"], logvar=t["logvar"]).elbo,)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.elbo(recon=t["recon"], x=t["x"], mu=t["mu"], logvar=t["logvar"], backend=backend).elbo,)

    def model(self, s, pass_):
        nx, nz = s.B * s.Dx, s.B * s.Dz
        reads = {"recon": nx, "x": nx, "mu": nz, "logvar": nz}
        writes = {"elbo": s.B, "loglik": s.B, "kl": s.B}
        if pass_ == "fwd":
            return {"reads": reads, "writes": writes}
        return {"reads": {**reads, "grad_elbo": s.B}, "writes": {**writes, "drecon": nx, "dmu": nz, "dlogvar": nz}}


class Step(Op):
    """The training step of the loss: z = rsample(mu, logvar) for the decoder and
    loss = ELBOLoss()(recon, x, mu, logvar) (Bernoulli, mean over the batch),
    then backward from the loss and from z (grad_z stands in for what the
    decoder sends back), as autograd.grad([loss, z], [recon, mu, logvar])."""

    name = "step"
    needs_noise = True
    passes = ("fwd+bwd",)
    wrt = ("recon", "mu", "logvar")
    description = "rsample + ELBOLoss(Bernoulli) forward and backward"

    def tensor_specs(self, s):
        return ELBO().tensor_specs(s)

    def grad_specs(self, s):
        return (None, (s.B, s.Dz))

    def reference(self, t, eps):
        z = R.rsample(t["mu"], t["logvar"], eps=eps)
        terms = R.elbo(recon=t["recon"], x=t["x"], mu=t["mu"], logvar=t["logvar"])
        return (-terms.elbo.mean(), z)

    def fastelbo(self, t, backend):
        import fastelbo

        loss_fn = _loss_module(backend)
        z = fastelbo.rsample(t["mu"], t["logvar"], backend=backend)
        return (loss_fn(t["recon"], t["x"], t["mu"], t["logvar"]), z)

    def model(self, s, pass_):
        nx, nz = s.B * s.Dx, s.B * s.Dz
        return {"reads": {"recon": nx, "x": nx, "mu": nz, "logvar": nz, "grad_z": nz},
                "writes": {"z": nz, "loss": 1, "drecon": nx, "dmu": nz, "dlogvar": nz}}


def _image(B: int, D: int) -> tuple[int, int, int, int]:
    """[B, D] as an image-shaped [B, 1, h, w] with h * w = D, h the largest divisor of D up to sqrt(D)."""
    h = max(d for d in range(1, math.isqrt(D) + 1) if D % d == 0)
    return (B, 1, h, D // h)


class StepND(Step):
    """The training step on image-shaped tensors: recon and x [B, 1, h, w], mu and logvar [B, 1, h', w']
    (contiguous, as many elements as step's [B, Dx] and [B, Dz]). Against step, what the N-d path costs:
    its trailing dims merge into one as a view, so it should cost what step does."""

    name = "step-nd"
    description = "step on [B, 1, H, W] tensors (the N-d path of rsample and ELBOLoss)"

    def tensor_specs(self, s):
        x, z = _image(s.B, s.Dx), _image(s.B, s.Dz)
        return {"recon": (x, "normal"), "x": (x, "unit"), "mu": (z, "normal"), "logvar": (z, "small")}

    def grad_specs(self, s):
        return (None, _image(s.B, s.Dz))

    def reference(self, t, eps):
        loss, z = super().reference({k: v.flatten(1) for k, v in t.items()}, eps.flatten(1))
        return (loss, z.view(t["mu"].shape))


class IWAE(Op):
    """The importance-weighted bound over K = 4 samples (Bernoulli, N(0, I) prior)."""

    name = "iwae"
    K = 4
    wrt = ("recon", "z", "mu", "logvar")
    description = "IWAE bound over K=4 samples (Bernoulli) per row; backward with softmax weights"

    def tensor_specs(self, s):
        return {"recon": ((self.K, s.B, s.Dx), "normal"), "x": ((s.B, s.Dx), "unit"),
                "z": ((self.K, s.B, s.Dz), "normal"), "mu": ((s.B, s.Dz), "normal"),
                "logvar": ((s.B, s.Dz), "small")}

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.iwae_bound(recon=t["recon"], x=t["x"], z=t["z"], mu=t["mu"], logvar=t["logvar"]),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.iwae_bound(recon=t["recon"], x=t["x"], z=t["z"], mu=t["mu"], logvar=t["logvar"], backend=backend),)

    def model(self, s, pass_):
        nx, nz, K = s.B * s.Dx, s.B * s.Dz, self.K
        reads = {"recon": K * nx, "x": nx, "z": K * nz, "mu": nz, "logvar": nz}
        writes = {"bound": s.B, "log_weights": K * s.B}
        if pass_ == "fwd":
            return {"reads": reads, "writes": writes}
        return {"reads": {**reads, "grad": s.B},
                "writes": {**writes, "drecon": K * nx, "dz": K * nz, "dmu": nz, "dlogvar": nz}}


class FreeBits(Op):
    name = "free_bits"
    wrt = ("mu", "logvar")
    description = "KL per row with free bits (lambda = 0.1 nats per dimension)"

    def tensor_specs(self, s):
        return GaussianKL().tensor_specs(s)

    def grad_specs(self, s):
        return ((s.B,),)

    def reference(self, t, eps):
        return (R.free_bits_kl(t["mu"], t["logvar"], 0.1),)

    def fastelbo(self, t, backend):
        import fastelbo

        return (fastelbo.free_bits_kl(t["mu"], t["logvar"], 0.1, backend=backend),)

    def model(self, s, pass_):
        return GaussianKL().model(s, pass_)


@functools.lru_cache(maxsize=None)
def _loss_module(backend: str):
    import fastelbo

    return fastelbo.ELBOLoss(likelihood="bernoulli", backend=backend)


OPS: dict[str, Op] = {op.name: op for op in (RSample(), GaussianKL(), GaussianKLLearned(), Bernoulli(), Gaussian(),
                                              ELBO(), IWAE(), FreeBits(), Step(), StepND())}


def bytes_model(op: str, shape: Shape, pass_: str, itemsize: int) -> dict:
    """The minimum-bytes model of a case: every input read once, every output
    (results and gradients) written once, nothing else (no eps, no [B, D]
    temporaries). For fwd+bwd it is the bound of a single fused pass; an
    implementation with separate forward and backward kernels reads its inputs
    twice and so cannot exceed min_bytes / (its own bytes) of it.

        bytes = itemsize * (sum of elements read + sum of elements written)
    """
    m = OPS[op].model(shape, pass_)
    elements = sum(m["reads"].values()) + sum(m["writes"].values())
    return {"reads": dict(m["reads"]), "writes": dict(m["writes"]), "itemsize": itemsize,
            "elements": elements, "bytes": elements * itemsize}


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    shape: Shape
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.op}/{self.pass_}/{self.shape.id}/{self.dtype}"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def min_bytes(self) -> int:
        return bytes_model(self.op, self.shape, self.pass_, self.itemsize)["bytes"]


def cases(ops=None, shapes=QUICK_SHAPES, dtypes=QUICK_DTYPES, passes=PASSES) -> list[Case]:
    out = []
    for dtype in dtypes:
        for shape in shapes:
            for name in (ops or OPS):
                for p in OPS[name].passes:
                    if p in passes:
                        out.append(Case(name, p, shape, dtype))
    return out


def sweep_cases(full: bool = False, **kw) -> list[Case]:
    if full:
        kw.setdefault("shapes", FULL_SHAPES)
        kw.setdefault("dtypes", FULL_DTYPES)
    return cases(**kw)


# ---------------------------------------------------------------------------
# Inputs and callables
# ---------------------------------------------------------------------------
def make_inputs(case: Case, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of a case (float32 draws cast to the dtype); wrt tensors require
    grad in the fwd+bwd pass. Also holds the upstream gradients under 'grad:<i>'."""
    op = OPS[case.op]
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in op.tensor_specs(case.shape).items():
        if kind == "unit":
            v = torch.rand(shape, generator=g)
        else:
            v = torch.randn(shape, generator=g) * (0.1 if kind == "small" else 1.0)
        v = v.to(device=device, dtype=dtype).contiguous()
        if case.pass_ == "fwd+bwd" and name in op.wrt:
            v.requires_grad_(True)
        t[name] = v
    for i, gs in enumerate(op.grad_specs(case.shape)):
        if gs is not None:
            t[f"grad:{i}"] = torch.randn(gs, generator=g).to(device=device, dtype=dtype)
    return t


def _grad_outputs(case: Case, t: dict) -> list:
    return [t.get(f"grad:{i}") for i in range(len(OPS[case.op].grad_specs(case.shape)))]


def _with_backward(case: Case, t: dict, forward):
    """forward() -> outputs; returns the callable the pass times."""
    if case.pass_ == "fwd":
        return forward
    wrt = [t[n] for n in OPS[case.op].wrt]
    gouts = _grad_outputs(case, t)

    def fwd_bwd():
        return torch.autograd.grad(forward(), wrt, gouts)

    return fwd_bwd


def reference_forward(case: Case, t: dict, compiled=None):
    """eager (compiled=None) or compiled reference: forward() -> outputs."""
    op = OPS[case.op]
    core = compiled or op.reference
    if op.needs_noise:
        mu = t["mu"]
        return lambda: core(t, torch.randn_like(mu))
    return lambda: core(t, None)


def compile_reference(case: Case):
    """torch.compile of the reference function of the case's op (fresh per case)."""
    op = OPS[case.op]

    def ref(t, eps):
        return op.reference(t, eps)

    return torch.compile(ref, dynamic=False)


def raise_compile_limits() -> None:
    """Every case compiles the same reference function for a new shape/dtype:
    lift dynamo's per-function recompile limit so none silently falls back to eager."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


def impl_names(device_type: str) -> tuple[list[str], dict[str, str]]:
    """(implementations to run, {backend: why unavailable}) for a device type."""
    from .._backend import available
    from .._config import BACKENDS

    names, skipped = list(BASELINES), {}
    for b in BACKENDS:
        if b in ("auto", "reference"):
            continue
        ok, why = available(b, device_type)
        if ok and b == "triton" and device_type == "cpu":
            ok, why = False, "Triton on CPU tensors is the interpreter (TRITON_INTERPRET=1): a correctness tool, not timed"
        if ok:
            names.append(FASTELBO_PREFIX + b)
        else:
            skipped[b] = why
    return names, skipped


def build(case: Case, impl: str, t: dict):
    """(forward, timed): the forward alone and the callable one timed call of
    (case, impl) runs (forward, plus the backward in the fwd+bwd pass).
    Compiles (without warming up) for impl == 'compile'."""
    op = OPS[case.op]
    if impl == "eager":
        forward = reference_forward(case, t)
    elif impl == "compile":
        forward = reference_forward(case, t, compile_reference(case))
    elif impl.startswith(FASTELBO_PREFIX):
        backend = impl[len(FASTELBO_PREFIX):]
        forward = functools.partial(op.fastelbo, t, backend)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return forward, _with_backward(case, t, forward)


__all__ = ["Shape", "Case", "Op", "OPS", "PASSES", "DTYPES", "TINY", "TARGET", "FULL_SHAPES", "QUICK_SHAPES",
           "FULL_DTYPES", "QUICK_DTYPES", "bytes_model", "cases", "sweep_cases", "make_inputs", "build",
           "impl_names", "parse_shape", "raise_compile_limits", "compile_reference", "reference_forward"]
