"""``fastelbo info``: versions, compilers, the build cache, and which backend
can run on which device here (and why not), in the spirit of DeepSpeed's
ds_report. Paste its output into bug reports."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

import torch

from .. import __version__, _build, _toolchain
from ._common import KERNEL_BACKENDS, availability, cuda_present, one_line, table

ENV_VARS = ("FASTELBO_BACKEND", "FASTELBO_STRICT", "FASTELBO_CACHE_DIR", "FASTELBO_VERBOSE_BUILD", "FASTELBO_QUIET_BUILD",
            "FASTELBO_NINJA", "FASTELBO_LOGITS_CHECK", "TRITON_INTERPRET", "CXX", "CUDA_HOME")


def add_arguments(parser) -> None:
    pass


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _first_line(cmd: list[str], pick: str | None = None) -> str:
    """First line of a tool's output (or the first containing `pick`), or why there is none."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not run {cmd[0]}: {exc}"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if pick:
        lines = [ln for ln in lines if pick in ln] or lines
    return lines[0] if lines else f"{cmd[0]} printed nothing (exit {proc.returncode})"


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        try:
            from torch.utils.cpp_extension import CUDA_HOME
        except Exception:  # pragma: no cover
            CUDA_HOME = None
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        path = candidate if candidate and os.path.isfile(candidate) else None
    if path is None:
        return "not found (not on PATH, no CUDA_HOME)"
    return f"{path}: {_first_line([path, '--version'], pick='release')}"


def _cuda_toolkit() -> str:
    """Where fastelbo would build its CUDA kernels from, and whether it can."""
    home = getattr(_build, "cuda_home", lambda: None)()
    check = getattr(_build, "cuda_compatibility", None)
    where = str(home) if home else "none found"
    if check is None:
        return where
    ok, why = check()
    return f"{where}; CUDA kernels can be built" if ok else f"{where}; CUDA kernels cannot be built: {why}"


def _tool(pick) -> str:
    """The ninja / compiler that builds the kernels (fastelbo/_toolchain.py), not merely the first on PATH."""
    try:
        tool = pick()
    except _toolchain.ToolchainError as exc:
        return str(exc)
    return f"{tool.path}: {tool.version} ({tool.why})"


def _other_ninjas(chosen: str) -> str:
    others = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "ninja")
        if d and os.path.isfile(p) and os.access(p, os.X_OK) and os.path.realpath(p) != chosen:
            real = os.path.realpath(p)
            if real not in others:
                others.append(real)
    return f"; also on PATH, not used: {', '.join(others)}" if others else ""


def _ninja_path() -> str:
    try:
        return str(_toolchain.ninja().path)
    except _toolchain.ToolchainError:
        return ""


def _cuda() -> str:
    build = torch.version.cuda
    parts = [f"torch built with CUDA {build}" if build else "torch is a CPU-only build (torch.version.cuda is None)"]
    if cuda_present():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(f"devices: {', '.join(names)}")
    else:
        parts.append("no CUDA device (torch.cuda.is_available() is False)")
    return "; ".join(parts)


def run(args) -> int:
    cap = _build.cpu_capability()
    try:
        torch_cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        torch_cap = "unknown"
    facts = [
        ("fastelbo", f"{__version__} ({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("platform", f"{platform.system()} {platform.machine()} ({platform.platform()})"),
        ("torch", torch.__version__),
        ("triton", _dist_version("triton")),
        ("numpy", _dist_version("numpy")),
        ("ninja", _tool(_toolchain.ninja) + _other_ninjas(_ninja_path())),
        ("CUDA", _cuda()),
        ("nvcc", _nvcc()),
        ("CUDA toolkit", _cuda_toolkit()),
        ("compiler", _tool(_toolchain.compiler)),
        ("CPU", f"capability {cap} (torch dispatches {torch_cap}), {torch.get_num_threads()} torch threads, "
                f"{os.cpu_count()} cores"),
        ("build cache", f"{_build.cache_root()}"
                        + ("" if os.environ.get("FASTELBO_CACHE_DIR") else " (set FASTELBO_CACHE_DIR to move it)")),
    ]
    ok, why = _build.compatibility()
    facts.append(("C++ toolchain", "ok" if ok else f"cannot build the C++ kernels: {why}"))
    env = [f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ]
    facts.append(("environment", ", ".join(env) if env else "no FASTELBO_* / TRITON_INTERPRET / CXX / CUDA_HOME set"))
    width = max(len(k) for k, _ in facts)
    for key, value in facts:
        print(f"{key.ljust(width)}  {value}")
    sys.stdout.flush()

    # available() builds/loads the C++ kernels; a first build says so on stderr (fastelbo/_build_notice.py).
    rows = []
    for backend in KERNEL_BACKENDS + ("reference",):
        for device in ("cpu", "cuda"):
            ok, why = availability(backend, device)
            if ok and backend == "cpu":
                why = f"kernels loaded from {why}"
            rows.append([backend, device, "yes" if ok else "no", one_line(why) if why else "-"])
    print()
    print(table(["backend", "device", "available", "why not / where"], rows))
    return 0
