"""Helpers shared by the subcommands: the backends and devices the command
line reports on, and plain-text tables."""

from __future__ import annotations

import sys

import torch

# The kernel backends `check` and `info` report on ("reference" is the ground truth, not checked).
KERNEL_BACKENDS = ("cpu", "triton", "cuda")

# The device types each backend's kernels are meant for: the Triton kernels also
# run CPU tensors under TRITON_INTERPRET=1 (when the backend says it can).
TARGET_DEVICES = {"cpu": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",)}

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False)"


def cuda_present() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken driver installs
        return False


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """fastelbo._backend.available, plus "is there such a device here"; never raises."""
    from .._backend import available

    try:
        ok, why = available(backend, device_type)
    except Exception as exc:  # an availability query must not take the report down
        return False, f"availability check raised {type(exc).__name__}: {exc}"
    if ok and device_type == "cuda" and not cuda_present():
        return False, NO_CUDA
    return ok, why


def one_line(text: str, limit: int = 160) -> str:
    """First non-empty line of a message, shortened for a table cell."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns separated by ' | '."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    # the last column is free text: do not pad it
    def fmt(cells):
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1])] + [cells[-1]]
        return " | ".join(padded).rstrip()

    rule = "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * max(widths[-1], len(headers[-1]))
    return "\n".join([fmt(headers), rule] + [fmt(r) for r in rows])


def error(command: str, message: str) -> int:
    """One clear line on stderr, exit status 2 (a usage error, like argparse's)."""
    print(f"fastelbo {command}: error: {message}", file=sys.stderr)
    return 2
