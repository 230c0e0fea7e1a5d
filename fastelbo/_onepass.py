"""The one-pass reduced ELBO loss (docs/design.md §5): ELBOLoss's forward when it reduces and a gradient is wanted.

``fastelbo::elbo_loss`` (schema in fastelbo/_ops.py) returns the reduced loss -reduce_b elbo[b] AND the
gradients of that number with respect to the inputs of its output_mask, computed in the forward. Its
backward hands them back:

- upstream gradient exactly 1 (``loss.backward()``, ``torch.autograd.grad(loss, ...)``) and the graph not
  retained: the stored tensors themselves; autograd frees the node's saved tensors right after, so nothing
  can read them again (autograd may keep one as a leaf's .grad and accumulate into it later: it owns it);
- otherwise (another scale, ``retain_graph=True``, traced by torch.compile / torch.export): a fresh
  ``stored * upstream``, so the stored gradients are never modified and a second backward reads them as
  the forward wrote them;
- on CUDA tensors the upstream value is never read on the host (no sync, capturable): always the fresh
  scaled copy (a device-side "is it 1" early exit is future work, docs/design.md §5).

Kernels: the C++ CPU op (csrc/cpu/elbo.cpp, elbo_loss_cpu: each row's forward and backward back to back,
recon and x read from memory once). The CUDA and Triton backends and the emulated CUDA backend run the
composite below: their elbo forward and elbo_backward ops with the reduction's constant upstream gradient
(two launches inside one op; correct, but still 5 [B, Dx] transfers).
"""

from __future__ import annotations

import threading

import torch

from . import _autocast, _ops

_REDUCTIONS = ("mean", "sum")


def composite(ops):
    """The one-pass op's numbers from a backend's elbo and elbo_backward ops (namespace `ops`)."""

    def elbo_loss(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, reduction, output_mask,
                  validate_x=False):
        if reduction not in _REDUCTIONS:
            raise RuntimeError(f"fastelbo: elbo_loss reduction must be 'mean' or 'sum', got {reduction!r}")
        rows = ops.elbo(x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar, likelihood, beta, validate_x)[0]
        mean = reduction == "mean"
        loss = -(rows.mean() if mean else rows.sum())
        if any(output_mask):
            b = rows.shape[0]
            # d loss / d elbo[b], the upstream gradient mean's / sum's backward would give the two-pass op.
            g = torch.full((b,), -1.0 / max(b, 1) if mean else -1.0, dtype=rows.dtype, device=rows.device)
            grads = ops.elbo_backward(g, None, None, x, recon, mu, logvar, obs_logvar, prior_mu, prior_logvar,
                                      likelihood, beta, list(output_mask))
        else:
            grads = _ops._fake_elbo_grads(x, recon, mu, obs_logvar, prior_mu, likelihood, [False] * 7)
        return (loss,) + tuple(grads)

    return elbo_loss


def _traced(g: torch.Tensor) -> bool:
    # FakeTensor, FunctionalTensor (torch.compile, torch.export, make_fx) are subclasses of Tensor.
    return type(g) is not torch.Tensor or torch.compiler.is_compiling()


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    # Saved like any saved tensor: counted by saved-tensor hooks, freed by autograd after a backward that does
    # not retain the graph. Unpacked, a saved output is a new tensor on the same storage (AccumulateGrad may
    # adopt it as a leaf's .grad and add into it later), hence the rule of _backward.
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad, *_unused):
    nones = (None,) * 5
    if grad is None:
        return (None,) * 7 + nones
    if torch.is_grad_enabled() and grad.requires_grad:
        raise RuntimeError(_ops.double_backward_message("elbo_loss"))
    stored = ctx.saved_tensors
    mask = ctx.needs_input_grad[:7]
    # As they are only when nothing can read them again (graph not retained) and the scale is exactly 1,
    # read on the host where that is free (CPU tensors; never on CUDA, which would sync the stream).
    hand_over = (not _traced(grad) and grad.device.type == "cpu"
                 and not torch._C._autograd._get_current_graph_task_keep_graph() and grad.item() == 1.0)
    if hand_over:
        return tuple(d if wanted else None for d, wanted in zip(stored, mask)) + nones
    return tuple(d * grad.to(d.dtype) if wanted else None for d, wanted in zip(stored, mask)) + nones


def register(op: str) -> None:
    """Autograd and autocast of a backend's one-pass op ("fastelbo::<prefix>elbo_loss")."""
    torch.library.register_autograd(op, _backward, setup_context=_setup)
    _autocast.register(op)


register("fastelbo::elbo_loss")
# CUDA tensors on the "cuda" backend: the composite of its ops (a fused CUDA kernel is future work).
torch.library.impl("fastelbo::elbo_loss", "CUDA")(composite(_ops.ops))

_lock = threading.Lock()
_twins: dict[str, object] = {}


def define_twin(prefix: str, ops, lib) -> None:
    """fastelbo::<prefix>elbo_loss for a backend whose ops are fastelbo::<prefix><op> (Triton, emulated CUDA):
    the composite of its ops, with this module's autograd, the shared fake kernel and autocast rule."""
    with _lock:
        if prefix in _twins:
            return
        name = f"{prefix}elbo_loss"
        lib.define(name + _ops.ELBO_LOSS_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))
        _ops._register_fake(name, lib=lib)(_ops.elbo_loss_fake)
        run = composite(ops)
        for key in ("CPU", "CUDA"):
            lib.impl(name, run, key)
        register(f"fastelbo::{name}")
        _twins[prefix] = getattr(torch.ops.fastelbo, name)


def op_for(prefix: str):
    """The one-pass op of the backend whose ops carry `prefix` ("" for torch.ops.fastelbo)."""
    return torch.ops.fastelbo.elbo_loss if prefix == "" else _twins[prefix]


def wanted(tensors) -> bool:
    """Whether a reduced ELBOLoss call should compute its gradients in the forward: grad mode on and some
    input requiring grad (so never under no_grad / inference_mode, nothing allocated for nobody)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
