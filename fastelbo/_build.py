"""The one place that knows how to build the C++ kernels in csrc/.

The CPU kernels compile with torch.utils.cpp_extension + ninja on first use
and are cached per torch version and source hash in a user cache directory
(``FASTELBO_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastelbo``, else
``~/.cache/fastelbo``). A file lock makes concurrent first uses build once.
``fastelbo build`` prebuilds.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._config import strict_mode, verbose_build


class BuildError(RuntimeError):
    """The C++ extension could not be built or loaded."""


def csrc_dir() -> Path:
    """The C++ sources: inside the package in a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "fastelbo_math.h").is_file():
            return candidate
    raise BuildError(f"fastelbo's C++ sources (csrc/) are missing next to {here}; reinstall fastelbo")


def cache_root() -> Path:
    env = os.environ.get("FASTELBO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastelbo"


# at::vec is only SIMD when the translation unit is told which ISA it targets,
# as ATen's own kernels are (see PERF-NOTES); pick what this CPU runs.
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}


def cpu_capability() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def cpu_cflags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-fopenmp", "-DFASTELBO_CPU"]
    return flags + _CAPABILITY_FLAGS.get(cpu_capability(), [])


def cpu_sources() -> list[Path]:
    return sorted((csrc_dir() / "cpu").glob("*.cpp"))


def _fingerprint(sources: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc_dir().rglob("*")):
        if path.suffix in {".h", ".cpp", ".cu"}:
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_dir(name: str) -> Path:
    return cache_root() / f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}" / name


def compatibility() -> tuple[bool, str]:
    """Whether this machine can build the CPU extension, and why not."""
    if platform.system() != "Linux" and platform.system() != "Darwin":
        return False, f"the C++ backend is built and tested on Linux; this is {platform.system()}"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except Exception:
        return False, "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not on PATH; install g++, e.g. apt-get install g++)"
    return True, ""


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False
    error: str | None = None
    path: Path | None = None


_CPU = _State()


def _locked_load(name: str, sources: list[Path], cflags: list[str], directory: Path) -> None:
    import fcntl

    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    # flock dies with its process, unlike cpp_extension's own baton file.
    with open(directory / ".fastelbo-build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(csrc_dir())],
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose_build(),
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def load_cpu_extension() -> None:
    """Builds (first time) and loads the CPU kernels; raises BuildError with what to do."""
    with _CPU.lock:
        if _CPU.loaded:
            return
        if _CPU.error is not None:
            raise BuildError(_CPU.error)
        ok, why = compatibility()
        if not ok:
            _CPU.error = f"fastelbo's C++ CPU kernels cannot be built here: {why}"
            raise BuildError(_CPU.error)
        flags = cpu_cflags()
        sources = cpu_sources()
        name = f"fastelbo_cpu_{_fingerprint(sources, flags)}"
        directory = build_dir(name)
        try:
            _locked_load(name, sources, flags, directory)
        except Exception as exc:  # the compiler's output is in the message
            tail = "\n".join(str(exc).strip().splitlines()[-25:])
            _CPU.error = (
                f"building fastelbo's C++ CPU kernels failed in {directory}:\n{tail}\n"
                "Needed: a C++17 compiler with OpenMP (g++), ninja (pip install ninja) and the Python headers; "
                "FASTELBO_VERBOSE_BUILD=1 shows the full compiler output."
            )
            raise BuildError(_CPU.error) from exc
        _CPU.loaded = True
        _CPU.path = directory


def cpu_extension_status() -> tuple[bool, str]:
    """(loaded, reason) after trying to load once; never raises."""
    try:
        load_cpu_extension()
        return True, str(_CPU.path)
    except BuildError as exc:
        return False, str(exc)


__all__ = ["BuildError", "load_cpu_extension", "cpu_extension_status", "compatibility", "cache_root", "csrc_dir",
           "strict_mode"]
