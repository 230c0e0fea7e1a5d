"""A backend whose build the build stage saw fail stays failed in the later stages.

The runner sets GPUCHECK_CPU_BUILD_FAILED / GPUCHECK_CUDA_BUILD_FAILED (the
reason) after the build stage; the stages' processes call
mark_failed_builds() before anything asks for a backend, so fastelbo reports
that backend unavailable with the build stage's reason instead of building it
again inside the stage's time cap (every test shard would, one after another,
under the build lock).
"""

from __future__ import annotations

import os

KINDS = (("CPU", "_CPU"), ("CUDA", "_CUDA"))


def mark_failed_builds() -> list[str]:
    """Marks the failed builds in fastelbo._build; returns the kinds marked."""
    marked = []
    for kind, state in KINDS:
        why = os.environ.get(f"GPUCHECK_{kind}_BUILD_FAILED")
        if why:
            from fastelbo import _build

            getattr(_build, state).error = f"the GPU check's build stage: {why}"
            marked.append(kind.lower())
    return marked
