"""Backend choice: which implementation of the ops runs a call.

  "cpu"       C++ kernels of csrc/cpu (CPU tensors), built on first use
  "cuda"      C++/CUDA kernels of csrc/cuda (CUDA tensors), built on first use
              (needs torch with CUDA, nvcc and a GPU)
  "triton"    Triton kernels of kernels/ (CUDA tensors; CPU tensors under
              TRITON_INTERPRET=1, slow, for testing)
  "reference" fastelbo.reference (torch.distributions), any device
  "auto"      FASTELBO_BACKEND if set, else the fastest backend available for
              the tensors' device, else the reference with a warning

Test-only, not in fastelbo._config.BACKENDS, never picked by "auto": with
FASTELBO_TEST_CUDA_EMULATED=1 (tests/conftest.py sets it)
  "cuda-emulated"  the CUDA kernels of csrc/cuda on CPU tensors, compiled as
              host C++ against the CUDA emulation of csrc/emu (fastelbo._emulated);
              unavailable is an error, never a fallback to the reference

A backend whose kernels cannot be built falls back to the reference with a
warning saying why and what to install; FASTELBO_STRICT=1 makes that an error.
Asking for a backend on a device it does not run on is always an error, and so
is asking for "triton" where it cannot run (no triton, no GPU, no interpreter).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _build, _functorch, reference
from ._config import BACKENDS, CUDA_EMULATED, CUDA_EMULATED_ENV, cuda_emulated_enabled, env_backend, strict_mode
from ._ops import ops as _torch_ops


class FallbackWarning(UserWarning):
    """A fastelbo backend was unavailable and the reference ran instead."""


# Which backends can run tensors of a device type, fastest first.
# CUDA tensors: "triton" first for now; which of triton/cuda is faster is for
# bench/'s CUDA-vs-Triton results to decide (issue 4), then reorder here.
_BY_DEVICE = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
_UNRELEASED: dict[str, str] = {}
_warned: set[str] = set()


def _check_name(backend) -> str:
    if backend == CUDA_EMULATED:
        if not cuda_emulated_enabled():
            raise ValueError(f"backend {CUDA_EMULATED!r} is a test-only backend (the CUDA kernels on a CPU emulation "
                             f"of the GPU); set {CUDA_EMULATED_ENV}=1 to use it")
        return backend
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
    if name == "triton":
        return _triton_status(device_type)
    if name == "cuda":
        return _cuda_status(device_type)
    if name == CUDA_EMULATED:
        return _emulated_status(device_type)
    raise ValueError(f"unknown backend {name!r}")


def _emulated_status(device_type: str) -> tuple[bool, str]:
    """The test-only emulated CUDA kernels run on CPU tensors when switched on and built."""
    if not cuda_emulated_enabled():
        return False, f"test-only backend: set {CUDA_EMULATED_ENV}=1"
    if device_type != "cpu":
        return False, f"backend {CUDA_EMULATED!r} runs on CPU tensors, not {device_type}"
    from . import _emulated

    try:
        _emulated.load()
    except _build.BuildError as e:
        return False, str(e)
    return True, ""


def _cuda_status(device_type: str) -> tuple[bool, str]:
    """The CUDA kernels run on CUDA tensors of a CUDA build of torch, once built with nvcc."""
    if device_type != "cuda":
        return False, f"backend 'cuda' runs on CUDA tensors, not {device_type}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return False, "no CUDA device: torch.cuda.is_available() is False"
    ok, why = _build.cuda_compatibility()
    if not ok:
        return False, why
    return _build.cuda_extension_status()


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}


def _triton_status(device_type: str) -> tuple[bool, str]:
    """The Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed (pip install triton): {e}"
    if device_type == "cpu":
        if not _interpreter_on():
            return False, ("Triton kernels need a CUDA GPU; on CPU tensors set TRITON_INTERPRET=1 (slow, for "
                           "testing) or use backend='cpu'")
    elif device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "Triton kernels need a CUDA GPU and torch.cuda.is_available() is False"
    else:
        return False, f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device_type}"
    try:
        kernels = _triton_kernels()
    except Exception as e:  # a broken triton install, an incompatible version
        return False, f"the Triton kernels failed to load: {type(e).__name__}: {e}"
    if device_type == "cpu" and not kernels.INTERPRET:
        return False, ("TRITON_INTERPRET=1 was set after fastelbo's Triton kernels were loaded for the GPU; set it "
                       "before importing fastelbo, or use backend='cpu'")
    return True, ""


_triton_ops = None  # fastelbo.kernels.OPS once loaded (by available(), itself run by resolve())


def _triton_kernels():
    """fastelbo.kernels, imported on first use (importing it defines the kernels, as the interpreter says)."""
    global _triton_ops
    kernels = importlib.import_module("fastelbo.kernels")
    _triton_ops = kernels.OPS
    return kernels


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
    elif name == "triton":
        ok, why = available(name, device_type)
        if not ok:
            instead = "backend='cpu' (or 'reference')" if device_type == "cpu" else "backend='reference'"
            raise RuntimeError(f"fastelbo backend 'triton' cannot run {device_type} tensors here: {why}. "
                               f"Use {instead} instead.")
        return name
    elif name == CUDA_EMULATED:
        if device_type != "cpu":
            raise ValueError(f"backend={CUDA_EMULATED!r} runs on CPU tensors; got {device_type} tensors")
        ok, why = available(name, device_type)
        if not ok:  # a test-only backend never falls back: the tests would pass on the reference
            raise RuntimeError(f"fastelbo backend {CUDA_EMULATED!r} is unavailable: {why}")
        return name
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; got {device_type} tensors "
                         "(use backend='auto' or 'reference')")
    if name == "cuda" and device_type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; got {device_type} tensors "
                         "(use backend='auto', 'cpu' or 'reference')")
    ok, why = available(name, device_type)
    return name if ok else _fallback(name, why)


def impl(backend: str, device: torch.device):
    """The op namespace of the chosen backend: torch.ops.fastelbo, fastelbo.kernels.OPS, reference.OPS or (tests)
    fastelbo._emulated.OPS; under a torch.func transform (grad, vmap, ...) a fused backend's ops run through
    autograd.Functions that functorch accepts (fastelbo._functorch; the reference is plain PyTorch)."""
    name = resolve(backend, device.type)
    if name == "reference":
        return reference.OPS
    if name == "triton":
        ops = _triton_ops  # loaded by resolve(), outside any traced graph
    elif name == CUDA_EMULATED:
        from . import _emulated

        ops = _emulated.OPS  # loaded by resolve()
    else:
        ops = _torch_ops
    return _functorch.transformable(ops) if _functorch.transforms_active() else ops
