"""The ``fastelbo::`` custom ops: schemas, fake kernels and autograd.

The schemas live here, in Python, rather than in a C++ TORCH_LIBRARY block:
the ops must exist (for fake tensors, torch.compile, autograd and the
reference fallback) whether or not the C++ kernels could be built on this
machine. The kernels register against these names per dispatch key:
csrc/cpu (TORCH_LIBRARY_IMPL(fastelbo, CPU)) and, later, csrc/cuda.

Each forward op has a backward op; autograd calls the backward op, never the
kernels' internals. Backward ops take a ``bool[n] output_mask`` (as ATen's
native backward functions do) and return an empty tensor for a gradient
that was not asked for. ``validate_x`` asks the Bernoulli forward to check
x in [0, 1] in the pass that reads x anyway (ValueError naming x).

The op-level shape contract (the Python API normalizes to it; kernels check it):

  rsample           mu, logvar [B, Dz]; num_samples = 0: z [B, Dz]; K >= 1: z [K, B, Dz],
                    z[k, b, j] = mu[b, j] + e^(lv[b, j] / 2) * eps[k, b, j], eps of logical
                    element n = (k * B + b) * Dz + j (docs/design.md §3); eps, when given, has z's shape.
  rsample_backward  grad_z [B, Dz] or [K, B, Dz] (K from its rank); dlogvar [B, Dz] summed
                    over k; deps of grad_z's shape (dmu = grad_z summed over k, in the glue).
  obs_logvar / gaussian_log_prob's logvar
                    [1, Dx] (one per feature, e.g. a learned parameter: its gradient is
                    reduced over rows and samples INSIDE the backward, no [B, Dx] temporary)
                    or [B, Dx] (per row; reduced over samples); any strides.
  elbo              recon [B, Dx] or [K, B, Dx] (x [B, Dx] shared by the K samples): the
                    log-likelihood is the average over k per row; KL is analytic.
  iwae_bound        x [B, Dx], recon [K, B, Dx], z [K, B, Dz], mu, logvar [B, Dz]. Returns
                    bound [B] (input dtype) and log_weights [K, B] in the accumulation dtype
                    (float32, float64 for float64: a bfloat16 sum over Dx is 2-4 nats coarse),
                    log w[k, b] = log p(x_b | recon_kb) + log N(z_kb | prior) - log N(z_kb | mu_b, e^lv_b),
                    bound[b] = logsumexp_k log w[k, b] - log K. Its backward takes
                    grad_log_weights [K, B] (accumulation dtype) = dL/dlog w, which the glue
                    forms from the saved log_weights: softmax_k(log w) * grad_bound (+ the
                    upstream gradient of log_weights itself).
  free_bits_kl      mu, logvar [B, Dz] (priors as gaussian_kl). Returns kl [B] (input dtype) and
                    kl_dims [Dz] (accumulation dtype) = batch-mean KL per latent dimension;
                    kl[b] = sum_j (kl_dims[j] < free_bits ? free_bits : KL[b, j]), so that
                    mean_b kl[b] = sum_j max(free_bits, kl_dims[j]) (Kingma et al. 2016), the max
                    of torch.clamp: a dimension of NaN kl_dims[j] is NaN in every row.
                    Backward: dX[b, j] = (kl_dims[j] < free_bits ? 0 : grad[b] * dKL[b, j]/dX),
                    NaN for every element of a dimension of NaN kl_dims[j].
"""

from __future__ import annotations

import functools

import torch

from ._dtypes import acc_dtype

LIB = torch.library.Library("fastelbo", "DEF")

_SCHEMAS = {
    "rsample": "(Tensor mu, Tensor logvar, Tensor seed, Tensor? eps, int num_samples=0) -> Tensor",
    "rsample_backward": "(Tensor grad_z, Tensor logvar, Tensor seed, Tensor? eps, bool[2] output_mask)"
    " -> (Tensor, Tensor)",
    "philox_noise": "(Tensor seed, int n, bool normal, ScalarType dtype) -> Tensor",
    "gaussian_kl": "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar) -> Tensor",
    "gaussian_kl_backward": "(Tensor grad, Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar,"
    " bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    "bernoulli_log_prob": "(Tensor logits, Tensor x, bool validate_x=False) -> Tensor",
    "bernoulli_log_prob_backward": "(Tensor grad, Tensor logits, Tensor x, bool[2] output_mask) -> (Tensor, Tensor)",
    "gaussian_log_prob": "(Tensor mean, Tensor x, Tensor logvar) -> Tensor",
    "gaussian_log_prob_backward": "(Tensor grad, Tensor mean, Tensor x, Tensor logvar, bool[3] output_mask)"
    " -> (Tensor, Tensor, Tensor)",
    "elbo": "(Tensor x, Tensor recon, Tensor mu, Tensor logvar, Tensor? obs_logvar, Tensor? prior_mu,"
    " Tensor? prior_logvar, str likelihood, float beta, bool validate_x=False) -> (Tensor, Tensor, Tensor)",
    "elbo_backward": "(Tensor? grad_elbo, Tensor? grad_loglik, Tensor? grad_kl, Tensor x, Tensor recon, Tensor mu,"
    " Tensor logvar, Tensor? obs_logvar, Tensor? prior_mu, Tensor? prior_logvar, str likelihood, float beta,"
    " bool[7] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "iwae_bound": "(Tensor x, Tensor recon, Tensor z, Tensor mu, Tensor logvar, Tensor? obs_logvar, Tensor? prior_mu,"
    " Tensor? prior_logvar, str likelihood, bool validate_x=False) -> (Tensor, Tensor)",
    "iwae_bound_backward": "(Tensor grad_log_weights, Tensor x, Tensor recon, Tensor z, Tensor mu, Tensor logvar,"
    " Tensor? obs_logvar, Tensor? prior_mu, Tensor? prior_logvar, str likelihood, bool[8] output_mask)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "free_bits_kl": "(Tensor mu, Tensor logvar, Tensor? prior_mu, Tensor? prior_logvar, float free_bits)"
    " -> (Tensor, Tensor)",
    "free_bits_kl_backward": "(Tensor grad, Tensor kl_dims, Tensor mu, Tensor logvar, Tensor? prior_mu,"
    " Tensor? prior_logvar, float free_bits, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
}

for _name, _schema in _SCHEMAS.items():
    LIB.define(_name + _schema, tags=(torch.Tag.pt2_compliant_tag,))

# The one-pass reduced loss (docs/design.md §5; autograd and backend twins in fastelbo/_onepass.py): not an
# op family (no backward op; its gradients are outputs of the forward), so it is not in _SCHEMAS.
ELBO_LOSS_SCHEMA = ("(Tensor x, Tensor recon, Tensor mu, Tensor logvar, Tensor? obs_logvar, Tensor? prior_mu,"
                    " Tensor? prior_logvar, str likelihood, float beta, str reduction, bool[7] output_mask,"
                    " bool validate_x=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
LIB.define("elbo_loss" + ELBO_LOSS_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))

ops = torch.ops.fastelbo


# ---------------------------------------------------------------------------
# Fake kernels: shapes only. Every real kernel returns fresh contiguous tensors.
#
# They are the ops' Meta kernels too, and the dispatcher runs the kernel of the
# highest-priority backend among the inputs, Meta above CPU and CUDA: a direct
# call mixing a meta tensor into CPU ones lands here. The outputs are made
# "like" the first argument, so each fake first checks that the tensors share
# one device (else it would hand back uninitialized CPU memory). The seed alone
# may also be a CPU tensor, as the CUDA kernels take it (they copy it over).
# ---------------------------------------------------------------------------
def _check_one_device(names, args, kwargs) -> None:
    given = list(zip(names, args)) + [(n, kwargs[n]) for n in names[len(args):] if n in kwargs]
    tensors = [(n, t) for n, t in given if isinstance(t, torch.Tensor)]
    first = next(((n, t) for n, t in tensors if n != "seed"), None)
    if first is None:
        return
    first_name, first_t = first
    for name, t in tensors:
        ok = t.device == first_t.device or (name == "seed" and t.device.type == "cpu")
        torch._check(ok, lambda: f"fastelbo: {name} must be on {first_t.device} like {first_name}, got {t.device}")


def _register_fake(op: str, lib=None):
    """register_fake for fastelbo::<op> (in `lib`, a backend's own library, if given), the one-device check
    ahead of the shape function."""
    names = [a.name for a in getattr(ops, op).default._schema.arguments]

    def decorator(fn):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _check_one_device(names, args, kwargs)
            return fn(*args, **kwargs)

        return torch.library.register_fake(f"fastelbo::{op}", lib=lib)(fake)

    return decorator


def _grads(mask, like):
    return tuple(like.new_empty(like.shape) if wanted else like.new_empty(0) for wanted in mask)


def _rows(like):
    return like.new_empty(like.shape[0])


def _like_or_empty(wanted, like):
    return like.new_empty(like.shape) if wanted else like.new_empty(0)


@_register_fake("rsample")
def _(mu, logvar, seed, eps, num_samples=0):
    torch._check(num_samples >= 0, lambda: f"num_samples must be >= 0, got {num_samples}")
    return mu.new_empty(((num_samples,) if num_samples > 0 else ()) + tuple(mu.shape))


@_register_fake("rsample_backward")
def _(grad_z, logvar, seed, eps, output_mask):
    return _like_or_empty(output_mask[0], logvar), _like_or_empty(output_mask[1], grad_z)


@_register_fake("philox_noise")
def _(seed, n, normal, dtype):
    return seed.new_empty(n, dtype=dtype)


@_register_fake("gaussian_kl")
def _(mu, logvar, prior_mu, prior_logvar):
    return _rows(mu)


@_register_fake("gaussian_kl_backward")
def _(grad, mu, logvar, prior_mu, prior_logvar, output_mask):
    has_prior = prior_mu is not None
    mask = (output_mask[0], output_mask[1], output_mask[2] and has_prior, output_mask[3] and has_prior)
    return _grads(mask, mu)


@_register_fake("bernoulli_log_prob")
def _(logits, x, validate_x=False):
    return _rows(logits)


@_register_fake("bernoulli_log_prob_backward")
def _(grad, logits, x, output_mask):
    return _grads(output_mask, logits)


@_register_fake("gaussian_log_prob")
def _(mean, x, logvar):
    return _rows(mean)


@_register_fake("gaussian_log_prob_backward")
def _(grad, mean, x, logvar, output_mask):
    return tuple(_like_or_empty(w, like) for w, like in zip(output_mask, (mean, mean, logvar)))


@_register_fake("elbo")
def _(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x=False):
    torch._check(mu.shape[0] == x.shape[0], lambda: "mu and x must have the same batch size")
    return _rows(x), _rows(x), _rows(x)


@_register_fake("elbo_backward")
def _(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta,
      output_mask):
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    mask = [output_mask[0], output_mask[1], output_mask[2], output_mask[3], output_mask[4] and gaussian,
            output_mask[5] and has_prior, output_mask[6] and has_prior]
    likes = (x, recon, mu, mu, obs_logvar if gaussian else recon, mu, mu)
    return tuple(_like_or_empty(wanted, like) for wanted, like in zip(mask, likes))


def elbo_loss_fake(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, reduction,
                   output_mask, validate_x=False):
    """(loss [], the gradients of elbo_backward's mask): shapes of the one-pass loss of every backend."""
    torch._check(mu.shape[0] == x.shape[0], lambda: "mu and x must have the same batch size")
    grads = _fake_elbo_grads(x, recon, mu, obs_logvar, prior_mu, likelihood, output_mask)
    return (x.new_empty(()),) + grads


def _fake_elbo_grads(x, recon, mu, obs_logvar, prior_mu, likelihood, output_mask):
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    mask = [output_mask[0], output_mask[1], output_mask[2], output_mask[3], output_mask[4] and gaussian,
            output_mask[5] and has_prior, output_mask[6] and has_prior]
    likes = (x, recon, mu, mu, obs_logvar if gaussian else recon, mu, mu)
    return tuple(_like_or_empty(wanted, like) for wanted, like in zip(mask, likes))


_register_fake("elbo_loss")(elbo_loss_fake)


@_register_fake("iwae_bound")
def _(x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, validate_x=False):
    torch._check(recon.dim() == 3 and z.dim() == 3, lambda: "recon and z must be [K, B, D]")
    return x.new_empty(x.shape[0], dtype=recon.dtype), x.new_empty(recon.shape[:2], dtype=acc_dtype(recon.dtype))


@_register_fake("iwae_bound_backward")
def _(grad_log_weights, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, output_mask):
    gaussian, has_prior = likelihood == "gaussian", prior_mu is not None
    mask = list(output_mask[:5]) + [output_mask[5] and gaussian, output_mask[6] and has_prior,
                                    output_mask[7] and has_prior]
    likes = (x, recon, z, mu, mu, obs_logvar if gaussian else x, mu, mu)
    return tuple(_like_or_empty(wanted, like) for wanted, like in zip(mask, likes))


@_register_fake("free_bits_kl")
def _(mu, logvar, prior_mu, prior_logvar, free_bits):
    return _rows(mu), mu.new_empty(mu.shape[1], dtype=acc_dtype(mu.dtype))


@_register_fake("free_bits_kl_backward")
def _(grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, output_mask):
    has_prior = prior_mu is not None
    mask = (output_mask[0], output_mask[1], output_mask[2] and has_prior, output_mask[3] and has_prior)
    return _grads(mask, mu)


# ---------------------------------------------------------------------------
# Autograd: save inputs only (never eps, never a [B, D] intermediate), call the
# backward op with the mask of gradients autograd asked for. The backward
# functions are built per backward op, so every backend's forward op (the C++
# ops here, the Triton ops of fastelbo.kernels) shares one autograd logic.
# ---------------------------------------------------------------------------
def _or_none(grads, mask):
    return tuple(g if wanted else None for g, wanted in zip(grads, mask))


def _save_inputs(ctx, inputs, output=None):
    """Keeps the inputs when some gradient is needed (they are inputs: no new memory)."""
    tensors = [t if isinstance(t, torch.Tensor) else None for t in inputs]
    ctx.save_for_backward(*(tensors if any(ctx.needs_input_grad) else [None] * len(tensors)))
    ctx.scalars = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def _saved(ctx):
    return [t if s is None else s for t, s in zip(ctx.saved_tensors, ctx.scalars)]


def _rsample_setup(ctx, inputs, output):
    mu, logvar, seed, eps, _ = inputs
    # Backward needs logvar and the seed (or the caller's eps); never mu, never z.
    needed = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    ctx.save_for_backward(*((logvar, seed, eps) if needed else (None, None, None)))


def _rsample_backward(rsample_backward):
    def backward(ctx, grad_z):
        logvar, seed, eps = ctx.saved_tensors
        need_mu, need_lv, _, need_eps = ctx.needs_input_grad[:4]
        dlv = deps = None
        if need_lv or need_eps:
            dlv, deps = rsample_backward(grad_z, logvar, seed, eps, [need_lv, need_eps])
        dmu = None
        if need_mu:  # z[k] = mu + ...: the K samples' gradients add up
            dmu = grad_z if grad_z.dim() == 2 else grad_z.sum(0)
        return dmu, dlv if need_lv else None, None, deps if need_eps else None, None

    return backward


def _kl_backward(gaussian_kl_backward):
    def backward(ctx, grad):
        mu, logvar, prior_mu, prior_logvar = _saved(ctx)
        mask = list(ctx.needs_input_grad[:4])
        grads = gaussian_kl_backward(grad, mu, logvar, prior_mu, prior_logvar, mask)
        return _or_none(grads, mask)

    return backward


def _bernoulli_backward(bernoulli_log_prob_backward):
    def backward(ctx, grad):
        logits, x, _ = _saved(ctx)
        mask = list(ctx.needs_input_grad[:2])
        return _or_none(bernoulli_log_prob_backward(grad, logits, x, mask), mask) + (None,)

    return backward


def _gaussian_backward(gaussian_log_prob_backward):
    def backward(ctx, grad):
        mean, x, logvar = _saved(ctx)
        mask = list(ctx.needs_input_grad[:3])
        return _or_none(gaussian_log_prob_backward(grad, mean, x, logvar, mask), mask)

    return backward


def _elbo_setup(ctx, inputs, output):
    # A loss uses one of (elbo, loglik, kl): the op takes None for the others, so autograd
    # need not build [B] zeros for them.
    ctx.set_materialize_grads(False)
    _save_inputs(ctx, inputs)


def _elbo_backward(elbo_backward):
    def backward(ctx, grad_elbo, grad_loglik, grad_kl):
        x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, _ = _saved(ctx)
        mask = list(ctx.needs_input_grad[:7])
        grads = elbo_backward(grad_elbo, grad_loglik, grad_kl, x, recon, mu, logvar, obs_logvar, prior_mu,
                              prior_logvar, likelihood, beta, mask)
        return _or_none(grads, mask) + (None, None, None)

    return backward


def _iwae_setup(ctx, inputs, output):
    # The [K, B] log-weights (an output, accumulation dtype) give the softmax weights of the backward.
    _save_inputs(ctx, tuple(inputs) + (output[1],))


def _iwae_backward(iwae_bound_backward):
    def backward(ctx, grad_bound, grad_log_weights):
        *inputs, log_weights = _saved(ctx)
        x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, _ = inputs
        # d bound[b] / d log w[k, b] = softmax_k(log w)[k, b]: formed on [K, B] in the accumulation dtype.
        g = torch.zeros_like(log_weights)
        if grad_bound is not None:
            g = torch.softmax(log_weights, dim=0) * grad_bound.to(log_weights.dtype)
        if grad_log_weights is not None:
            g = g + grad_log_weights
        mask = list(ctx.needs_input_grad[:8])
        grads = iwae_bound_backward(g, x, recon, z, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, mask)
        return _or_none(grads, mask) + (None, None)

    return backward


def _free_bits_setup(ctx, inputs, output):
    # kl_dims (an output, [Dz]) decides which dimensions are above the floor; it is a statistic, not a loss term.
    ctx.mark_non_differentiable(output[1])
    _save_inputs(ctx, tuple(inputs) + (output[1],))


def _free_bits_backward(free_bits_kl_backward):
    def backward(ctx, grad, _grad_kl_dims):
        mu, logvar, prior_mu, prior_logvar, free_bits, kl_dims = _saved(ctx)
        mask = list(ctx.needs_input_grad[:4])
        grads = free_bits_kl_backward(grad, kl_dims, mu, logvar, prior_mu, prior_logvar, free_bits, mask)
        return _or_none(grads, mask) + (None,)

    return backward


# op family (the schema of fastelbo::<family>) -> (backward factory, setup_context).
# On CPU tensors every family takes the C++ twin of its entry, csrc/cpu/autograd.cpp
# (registered for AutogradCPU, ahead of this Python registration, which the Triton ops and
# CUDA tensors keep): torch.library's Python wrapper cost more than the kernels at B=256. A change here
# goes there too; every backend's gradients are checked against the reference. Under torch.func
# transforms the entries run in fastelbo._functorch's autograd.Functions, on every backend.
_AUTOGRAD = {
    "rsample": (_rsample_backward, _rsample_setup),
    "gaussian_kl": (_kl_backward, _save_inputs),
    "bernoulli_log_prob": (_bernoulli_backward, _save_inputs),
    "gaussian_log_prob": (_gaussian_backward, _save_inputs),
    "elbo": (_elbo_backward, _elbo_setup),
    "iwae_bound": (_iwae_backward, _iwae_setup),
    "free_bits_kl": (_free_bits_backward, _free_bits_setup),
}


def register_autograd(op: str, family: str, backward_op) -> None:
    """Autograd for forward op `op` (schema of fastelbo::<family>) whose gradients come from `backward_op`
    (schema of fastelbo::<family>_backward)."""
    make_backward, setup_context = _AUTOGRAD[family]
    torch.library.register_autograd(op, make_backward(backward_op), setup_context=setup_context)


#: The forward op families; every backend registers fastelbo::<prefix><family> and its _backward.
FAMILIES = tuple(_AUTOGRAD)

for _family in _AUTOGRAD:
    register_autograd(f"fastelbo::{_family}", _family, getattr(ops, _family + "_backward"))


# The backward ops are not differentiable: say so loudly instead of torch's
# fallback, which only warns and hands back a silent None second derivative.
def double_backward_message(op_name: str) -> str:
    return (f"fastelbo: {op_name} is not differentiable (double backward through fastelbo's ops "
            "is not supported; use fastelbo.reference for higher-order derivatives)")


def _no_double_backward(op_name):
    def backward(ctx, *grads):
        raise RuntimeError(double_backward_message(op_name))

    return backward


def refuse_double_backward(op: str, lib=None) -> None:
    """Registers the loud error above as the autograd of backward op `op` ("fastelbo::<name>")."""
    torch.library.register_autograd(op, _no_double_backward(op.split("::")[-1]),
                                    setup_context=lambda ctx, inputs, output: None, lib=lib)


for _family in _AUTOGRAD:
    refuse_double_backward(f"fastelbo::{_family}_backward")
