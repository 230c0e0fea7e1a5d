"""Environment switches, read at call time so tests and users can flip them."""

from __future__ import annotations

import os

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# Test-only backends: accepted as backend= only when their switch is on, never
# chosen by "auto", not in BACKENDS (the documented list).
CUDA_EMULATED = "cuda-emulated"
CUDA_EMULATED_ENV = "FASTELBO_TEST_CUDA_EMULATED"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def cuda_emulated_enabled() -> bool:
    """FASTELBO_TEST_CUDA_EMULATED=1 (the test suite sets it): the "cuda-emulated" backend exists, i.e. the
    CUDA kernels of csrc/cuda run on CPU tensors through the CPU emulation of csrc/emu. For tests only:
    slow, and it proves the kernels' logic, not their speed or behaviour on a GPU."""
    return _flag(CUDA_EMULATED_ENV)


def strict_mode() -> bool:
    """FASTELBO_STRICT=1: a kernel that cannot be built is an error, not a fallback."""
    return _flag("FASTELBO_STRICT")


def verbose_build() -> bool:
    """FASTELBO_VERBOSE_BUILD=1: show the compiler's output while building."""
    return _flag("FASTELBO_VERBOSE_BUILD")


def env_backend() -> str:
    """FASTELBO_BACKEND: what backend="auto" means for this process."""
    name = os.environ.get("FASTELBO_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTELBO_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name
