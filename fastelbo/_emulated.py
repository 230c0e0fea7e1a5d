"""TEST-ONLY backend "cuda-emulated": the CUDA kernels of csrc/cuda on CPU tensors.

The very same .cu sources, compiled by the host compiler against the CUDA
emulation of csrc/emu (fibers for the threads of a block, real block barriers
and warp shuffles, seeded random scheduling; see csrc/cuda/SUBSET.md), and
registered as ``fastelbo::emu_<op>`` / ``fastelbo::emu_<op>_backward`` with the
schemas, fake kernels, autograd and autocast rule of their ``fastelbo::<op>``
twins. The shared test suite runs it like any fused backend, so every
accuracy, gradient, layout, RNG and bad-input test exercises the CUDA kernels'
indexing, tails, vector-load fallbacks, reductions and barriers on a machine
without a GPU.

Exists only when FASTELBO_TEST_CUDA_EMULATED=1 (tests/conftest.py sets it):
never chosen by backend="auto", not in fastelbo._config.BACKENDS. It proves
logic, not speed (it is slow) nor the GPU's memory model or warp scheduler.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from . import _autocast, _build, _onepass, _ops, _vmap

PREFIX = "emu_"
FAMILIES = _ops.FAMILIES
OP_NAMES = tuple(_ops._SCHEMAS)  # every fastelbo:: op, philox_noise included

_lock = threading.Lock()
_defined = False
_lib = None
OPS = None  # the op namespace of the backend (names and signatures of torch.ops.fastelbo), once loaded


def _fake(name):
    # The twin's fake kernel: called on fake tensors, fastelbo::<name> returns fake results of the right shapes.
    twin = getattr(torch.ops.fastelbo, name)

    def fake(*args, **kwargs):
        return twin(*args, **kwargs)

    return fake


def _define() -> None:
    """The fastelbo::emu_<op> ops: schema, fake kernel, autograd, autocast (once per process)."""
    global _defined, _lib
    if _defined:
        return
    _lib = torch.library.Library("fastelbo", "FRAGMENT")
    for name, schema in _ops._SCHEMAS.items():
        _lib.define(PREFIX + name + schema, tags=(torch.Tag.pt2_compliant_tag,))
        torch.library.register_fake(f"fastelbo::{PREFIX}{name}", _fake(name), lib=_lib)
    emu = torch.ops.fastelbo
    for family in FAMILIES:
        _ops.register_autograd(f"fastelbo::{PREFIX}{family}", family, getattr(emu, f"{PREFIX}{family}_backward"))
        _ops.refuse_double_backward(f"fastelbo::{PREFIX}{family}_backward", lib=_lib)
        _autocast.register(f"fastelbo::{PREFIX}{family}")
    _vmap.register(PREFIX, lib=_lib)
    _defined = True


def load():
    """Defines the ops, builds (first time) and loads their kernels; returns the op namespace.

    Raises fastelbo.BuildError when the emulated kernels cannot be built.
    """
    global OPS
    with _lock:
        if OPS is not None:
            return OPS
        _define()
        _build.load_emulated_extension()
        ops = SimpleNamespace(**{name: getattr(torch.ops.fastelbo, PREFIX + name) for name in OP_NAMES})
        _onepass.define_twin(PREFIX, ops, _lib)  # fastelbo::emu_elbo_loss, ELBOLoss's one-pass op
        OPS = ops
        return OPS
