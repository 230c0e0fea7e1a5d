"""Environment switches, read at call time so tests and users can flip them."""

from __future__ import annotations

import os

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


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
