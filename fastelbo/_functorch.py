"""torch.func support: grad, vjp, jacrev and vmap (per-sample gradients: vmap over grad) through
fastelbo's ops, on every backend.

The ops' own autograd cannot run under a torch.func transform: on CPU tensors it is a C++
torch::autograd::Function (csrc/cpu/autograd.cpp, registered for AutogradCPU because it costs a
few microseconds per call where the Python one costs tens), which functorch refuses, and the
autograd.Function torch.library.register_autograd generates for the other backends has no
setup_context staticmethod, which functorch requires. So while a transform is active the Python
API (fastelbo._backend.impl) calls each forward op through the autograd.Function built here
instead: the same setup and backward as fastelbo._ops (one autograd logic for every path), in
setup_context style, and generate_vmap_rule=True: under vmap it runs as the ops' own vmap rules
(fastelbo._vmap) say. Plain eager calls never come here; they pay one check per call.

The backward ops run under torch.no_grad() (torch.func's grad records what runs with grad
enabled, and their own autograd is not functorch-ready either); their results are passed through
_NoDoubleBackward, so that a second derivative (grad of grad) raises the error of fastelbo._ops
instead of silently treating the gradients as constants. Forward-mode transforms (jvp, jacfwd)
are not supported: the ops have no forward-mode formulas.
"""

from __future__ import annotations

import threading

import torch

from . import _ops


#: Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is running this call: one C call,
#: about 0.1 us (torch.compile reads it as a constant while tracing).
transforms_active = torch._C._are_functorch_transforms_active


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a backward op's results through (inputs: op name, count n, the n results, then the op's
    tensor arguments); differentiating them raises fastelbo._ops' double-backward error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op_name, n, *tensors):
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_ops.double_backward_message(ctx.op_name))


def _guarded(backward_op, op_name: str):
    def call(*args):
        with torch.no_grad():
            results = backward_op(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor)]
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
            return results
        return _NoDoubleBackward.apply(op_name, len(results), *results, *inputs)

    return call


def _function(forward_op, backward_op, family: str) -> type[torch.autograd.Function]:
    make_backward, setup_context = _ops._AUTOGRAD[family]

    def forward(*args):
        return forward_op(*args)

    return type(f"{family}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(make_backward(_guarded(backward_op, f"{family}_backward"))),
        "generate_vmap_rule": True,
    })


class _Transformable:
    """An op namespace (names and signatures of torch.ops.fastelbo) whose forward ops run through
    the functorch-ready autograd.Functions; every other name is the namespace's own op."""

    def __init__(self, ops):
        self._ops = ops
        for family in _ops.FAMILIES:
            fn = _function(getattr(ops, family), getattr(ops, family + "_backward"), family)
            setattr(self, family, fn.apply)

    def __getattr__(self, name):
        return getattr(self._ops, name)


_lock = threading.Lock()
_namespaces: dict[int, tuple[object, _Transformable]] = {}


def transformable(ops) -> _Transformable:
    """The functorch-ready twin of an op namespace (built once per namespace)."""
    entry = _namespaces.get(id(ops))
    if entry is None:
        with _lock:
            entry = _namespaces.get(id(ops))
            if entry is None:  # the namespace itself is kept: its id stays its own
                entry = _namespaces[id(ops)] = (ops, _Transformable(ops))
    return entry[1]
