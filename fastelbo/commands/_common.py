"""Helpers shared by the subcommands: the backends and devices the command
line reports on, and plain-text tables."""

from __future__ import annotations

import argparse
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


# The options `check` and `bench` share, with one name and one form each: comma-separated lists for
# --dtype and --shape (the plural spellings are aliases), fixed choices for --device.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")


def _checked(parse):
    """An argparse type: the text as given, once `parse` accepts it (a usage error, exit 2, otherwise)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check


def add_dtype_option(parser, default: str | None, help_default: str) -> None:
    parser.add_argument("--dtype", "--dtypes", dest="dtypes", default=default, metavar="DTYPE[,DTYPE...]",
                        type=_checked(lambda t: parse_dtypes(t)),
                        help=f"comma-separated dtypes from {', '.join(DTYPE_NAMES)} (default {help_default})")


def add_shape_option(parser, default: str | None, help_default: str, strict: bool = True) -> None:
    """strict: every entry is BxDXxDZ (bench also takes a family name of its sweep, checked there)."""
    parser.add_argument("--shape", "--shapes", dest="shapes", default=default, metavar="BxDXxDZ[,...]",
                        type=_checked(lambda t: [parse_shape(s) for s in csv(t)] if strict else None),
                        help=f"comma-separated shapes, batch x data features x latent features, e.g. 64x784x32 "
                             f"(default {help_default})")


def add_device_option(parser, help_auto: str) -> None:
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=f"{help_auto} (default auto)")


def csv(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_dtypes(text: str) -> list[str]:
    names = csv(text)
    bad = [d for d in names if d not in DTYPE_NAMES]
    if bad or not names:
        raise ValueError(f"--dtype: unknown dtype(s) {bad or [text]}; choose from {', '.join(DTYPE_NAMES)}")
    return names


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shape must be BxDXxDZ with positive integers (e.g. 64x784x32); got {text!r}")
    return tuple(int(p) for p in parts)


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
