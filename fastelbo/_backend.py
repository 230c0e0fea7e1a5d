"""Backend choice: which implementation of the ops runs a call.

  "cpu"       C++ kernels of csrc/cpu (CPU tensors), built on first use
  "cuda"      C++/CUDA kernels of csrc/cuda (CUDA tensors)      (not in this release)
  "triton"    Triton kernels of kernels/ (CUDA tensors)          (not in this release)
  "reference" fastelbo.reference (torch.distributions), any device
  "auto"      FASTELBO_BACKEND if set, else the fastest backend available for
              the tensors' device, else the reference with a warning

A backend whose kernels cannot be built falls back to the reference with a
warning saying why and what to install; FASTELBO_STRICT=1 makes that an error.
Asking for a backend on a device it does not run on is always an error.
"""

from __future__ import annotations

import warnings

import torch

from . import _build, reference
from ._config import BACKENDS, env_backend, strict_mode
from ._ops import ops as _torch_ops


class FallbackWarning(UserWarning):
    """A fastelbo backend was unavailable and the reference ran instead."""


# Which backends can run tensors of a device type, fastest first.
_BY_DEVICE = {"cpu": ("cpu",), "cuda": ()}
_UNRELEASED = {
    "cuda": "the CUDA C++ kernels (csrc/cuda) are not part of this release",
    "triton": "the Triton kernels (kernels/) are not part of this release",
}
_warned: set[str] = set()


def _check_name(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    return backend


def _fallback(name: str, why: str) -> str:
    if strict_mode():
        raise RuntimeError(f"fastelbo backend {name!r} is unavailable (FASTELBO_STRICT=1): {why}")
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"fastelbo backend {name!r} is unavailable, using the reference implementation: {why}",
                      FallbackWarning, stacklevel=4)
    return "reference"


def available(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend `name` can run tensors of `device_type` here, and why not.

    Builds/loads kernels as needed; never raises for an unavailable backend.
    """
    if name == "reference":
        return True, ""
    if name in _UNRELEASED:
        return False, _UNRELEASED[name]
    if name == "cpu":
        if device_type != "cpu":
            return False, f"backend 'cpu' runs on CPU tensors, not {device_type}"
        return _build.cpu_extension_status()
    raise ValueError(f"unknown backend {name!r}")


@torch.compiler.assume_constant_result
def resolve(backend: str, device_type: str) -> str:
    """The backend that runs a call on tensors of `device_type`.

    Traced by torch.compile as a constant: the choice (and the one-time build
    of the C++ kernels it may trigger) happens outside the graph.
    """
    name = _check_name(backend)
    if name == "auto":
        name = env_backend()
    if name == "reference":
        return name
    if name == "auto":
        candidates = _BY_DEVICE.get(device_type, ())
        for candidate in candidates:
            if available(candidate, device_type)[0]:
                return candidate
        if not candidates:
            return _fallback(f"auto ({device_type})", f"no fastelbo kernels run on {device_type} tensors yet")
        name = candidates[0]
    elif name in _UNRELEASED:
        raise RuntimeError(f"fastelbo backend {name!r} is not available: {_UNRELEASED[name]}; "
                           f"use backend='cpu' (CPU tensors) or 'reference'")
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; got {device_type} tensors "
                         "(use backend='auto' or 'reference')")
    ok, why = available(name, device_type)
    return name if ok else _fallback(name, why)


def impl(backend: str, device: torch.device):
    """The op namespace of the chosen backend: torch.ops.fastelbo or reference.OPS."""
    name = resolve(backend, device.type)
    return reference.OPS if name == "reference" else _torch_ops
