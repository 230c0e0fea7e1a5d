"""The one place that knows how to build the C++ kernels in csrc/.

The CPU kernels compile with torch.utils.cpp_extension + ninja on first use
and are cached per torch version, source hash, ninja and compiler (fastelbo/_toolchain.py decides which
ninja builds, not PATH order) in a user cache directory
(``FASTELBO_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastelbo``, else
``~/.cache/fastelbo``). A file lock makes concurrent first uses build once.
``fastelbo build`` prebuilds. A build says so on stderr (fastelbo/_build_notice.py).
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
from typing import Callable

import torch

from . import _build_notice, _toolchain
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
# as ATen's own kernels are (without these flags the same code compiles to the
# scalar fallback, several times slower); pick what this CPU runs.
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def cpu_capability() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def cpu_cflags() -> list[str]:
    # No -std: torch's cpp_extension picks the standard its headers need (C++20 from 2.13 on).
    flags = ["-O3", "-fopenmp", "-DFASTELBO_CPU"]
    return flags + _CAPABILITY_FLAGS.get(cpu_capability(), [])


def cpu_sources() -> list[Path]:
    return sorted((csrc_dir() / "cpu").glob("*.cpp"))


def _fingerprint(sources: list[Path], flags: list[str], backends: tuple[str, ...]) -> str:
    """Hash of one extension's own sources, its headers (those at the root of csrc/, shared by the
    backends, and those of the csrc/ subfolders `backends` it compiles), the flags and the
    torch/python versions. A backend never includes another backend's files (docs/design.md §4), so
    an edit of csrc/cuda does not invalidate the CPU build and vice versa."""
    h = hashlib.sha256()
    root = csrc_dir()
    files = set(sources) | {p for p in root.rglob("*.h")
                            if len(p.relative_to(root).parts) == 1 or p.relative_to(root).parts[0] in backends}
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    # ninja and the compiler: another ninja cannot read this one's build log and would rebuild every
    # object; with them in the key each toolchain builds once, in its own directory.
    h.update(_toolchain.cache_key().encode())
    return h.hexdigest()[:16]


def build_dir(name: str) -> Path:
    return cache_root() / f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}" / name


def compatibility() -> tuple[bool, str]:
    """Whether this machine can build the CPU extension, and why not."""
    if platform.system() != "Linux":
        return False, f"the C++ backend is built (with OpenMP) and tested on Linux only; this is {platform.system()}"
    try:
        _toolchain.ninja()
        _toolchain.compiler()
    except _toolchain.ToolchainError as exc:
        return False, str(exc)
    return True, ""


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False
    error: str | None = None
    path: Path | None = None
    library: Path | None = None


_CPU = _State()


def _locked_load(name: str, sources: list[Path], cflags: list[str], directory: Path,
                 extra_ldflags: tuple[str, ...] = ("-fopenmp",), *, what: str | None = None,
                 **load_kwargs) -> None:
    import fcntl

    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    # flock dies with its process, unlike cpp_extension's own baton file.
    with open(directory / ".fastelbo-build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # cpp_extension's baton `lock` is created by the process that builds and removed when it
            # is done; one killed mid-build leaves it behind and every later load() waits on it forever.
            # Under the flock no other fastelbo process is building here, so a baton is stale.
            (directory / "lock").unlink(missing_ok=True)
            with _toolchain.chosen_ninja_first(cache_root() / "tools"), \
                    _build_notice.announce(what or name, directory, directory / f"{name}.so", len(sources)):
                load(
                    name=name,
                    sources=[str(s) for s in sources],
                    extra_cflags=cflags,
                    extra_ldflags=list(extra_ldflags),
                    extra_include_paths=[str(csrc_dir())] + list(load_kwargs.pop("extra_include_paths", [])),
                    build_directory=str(directory),
                    is_python_module=False,
                    verbose=verbose_build(),
                    **load_kwargs,
                )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@dataclass
class _Plan:
    """One extension's build: its name and build directory, `build()` (builds and loads it under the
    lock), and what the failure message says is needed."""
    name: str
    directory: Path
    build: Callable[[], None]
    needed: str


def _load_once(state: _State, what: str, compatible: Callable[[], tuple[bool, str]],
               plan: Callable[[], _Plan]) -> None:
    """The routine of every extension: build (the first time) and load it once per process; a failure
    is remembered and raised again as BuildError, with the compiler's last lines and what is needed."""
    with state.lock:
        if state.loaded:
            return
        if state.error is not None:
            raise BuildError(state.error)
        ok, why = compatible()
        if not ok:
            state.error = f"{what} cannot be built here: {why}"
            raise BuildError(state.error)
        p = plan()
        try:
            p.build()
        except Exception as exc:  # the compiler's output is in the message
            tail = "\n".join(str(exc).strip().splitlines()[-25:])
            state.error = f"building {what} failed in {p.directory}:\n{tail}\n{p.needed}"
            raise BuildError(state.error) from exc
        state.loaded = True
        state.path = p.directory
        state.library = p.directory / f"{p.name}.so"


def load_cpu_extension() -> None:
    """Builds (first time) and loads the CPU kernels; raises BuildError with what to do."""
    def plan() -> _Plan:
        flags = cpu_cflags()
        sources = cpu_sources()
        name = "fastelbo_cpu_" + _fingerprint(sources, flags, ("cpu",))
        directory = build_dir(name)
        return _Plan(name, directory, lambda: _locked_load(name, sources, flags, directory,
                                                          what="fastelbo's C++ CPU kernels"),
                     "Needed: a C++20 compiler with OpenMP (g++), ninja (pip install ninja) and the Python headers; "
                     "FASTELBO_VERBOSE_BUILD=1 shows the full compiler output.")

    _load_once(_CPU, "fastelbo's C++ CPU kernels", compatibility, plan)


def cpu_half_tables() -> dict[str, list[str]] | None:
    """The 16-bit Bernoulli tables this process looks up, per dtype (csrc/cpu/half_tables.h:
    each used where, timed at first use, a lookup beats computing the function, or as
    FASTELBO_HALF_TABLES=1/0 forces); None where this build has no tables. Loads the kernels."""
    import ctypes

    load_cpu_extension()
    query = ctypes.CDLL(str(_CPU.library)).fastelbo_cpu_half_tables
    query.restype, query.argtypes = ctypes.c_int, [ctypes.c_int]
    used = {}
    for code, dtype in ((0, "bfloat16"), (1, "float16")):
        bits = query(code)
        if bits < 0:
            return None
        used[dtype] = [fn for bit, fn in ((1, "log1p_exp_neg_abs"), (2, "sigmoid")) if bits & bit]
    return used


def cpu_extension_status() -> tuple[bool, str]:
    """(loaded, reason) after trying to load once; never raises."""
    try:
        load_cpu_extension()
        return True, str(_CPU.path)
    except BuildError as exc:
        return False, str(exc)


# ---------------------------------------------------------------------------
# The CUDA kernels (csrc/cuda): a second extension, built only where torch has
# CUDA and nvcc is found. The .cu files see no torch header (they compile in
# seconds); binding.cpp registers them for the CUDA dispatch key.
# ---------------------------------------------------------------------------
# Built for these when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible to
# pick the native one (build checks on GPU-less machines).
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")


def _is_cuda_toolkit(path) -> bool:
    return bool(path) and (Path(path) / "bin" / "nvcc").is_file() and (Path(path) / "include" / "cuda_runtime.h").is_file()


def cuda_home() -> Path | None:
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH, torch's guess, then nvcc's real location and
    /usr/local/cuda; the first that holds bin/nvcc and include/cuda_runtime.h.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a wrapper script
    (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc).
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils import cpp_extension

        candidates.append(cpp_extension.CUDA_HOME)
    except Exception:  # pragma: no cover - torch without cpp_extension
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if _is_cuda_toolkit(candidate):
            return Path(candidate).resolve()
    return None


def cuda_compatibility() -> tuple[bool, str]:
    """Whether this machine can build the CUDA extension (a GPU is not needed to build), and why not."""
    if platform.system() != "Linux":
        return False, f"the CUDA backend is built and tested on Linux; this is {platform.system()}"
    if torch.version.cuda is None:
        return False, (f"torch {torch.__version__} was built without CUDA "
                       "(install a CUDA build of torch, e.g. from the pytorch.org CUDA wheels)")
    if cuda_home() is None:
        return False, ("nvcc not found: install the CUDA toolkit matching torch's CUDA "
                       f"{torch.version.cuda} and set CUDA_HOME (or put nvcc on PATH)")
    return compatibility()


def cuda_arch_flags() -> list[str]:
    """Explicit -gencode flags only when torch would otherwise build for every arch it knows."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        return []  # torch's own choice: the list given, or the visible GPUs' archs
    flags = []
    for arch in DEFAULT_CUDA_ARCHS:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


# No -std: torch picks the C++ standard its headers need (C++20 from torch 2.14 on);
# the .cu files are C++17 and newer.
def cuda_nvcc_flags() -> list[str]:
    return ["-O3"] + cuda_arch_flags()


def cuda_cflags() -> list[str]:
    return ["-O3"]


def cuda_sources() -> list[Path]:
    cuda = csrc_dir() / "cuda"
    return sorted(cuda.glob("*.cu")) + [cuda / "binding.cpp"]


def cuda_include_paths() -> list[str]:
    """csrc/cuda, plus the CUDA library headers that pip's nvidia-* wheels ship (cublas, cusparse, ...)
    for torch headers that want them."""
    paths = [str(csrc_dir() / "cuda")]
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on

        for root in getattr(nvidia, "__path__", []):
            for inc in sorted(Path(root).glob("cu*/include")):
                paths.append(str(inc))
    except ImportError:
        pass
    return paths


_CUDA = _State()


def load_cuda_extension() -> None:
    """Builds (first time) and loads the CUDA kernels; raises BuildError with what to do.

    Needs torch with CUDA, nvcc and ninja, not a GPU: the build check on GPU-less machines uses it.
    """
    def plan() -> _Plan:
        from torch.utils import cpp_extension

        home = cuda_home()
        # torch's module-level guess is what load() compiles and links with; set it to the toolkit found
        # above (torch's guess may be no toolkit at all, see cuda_home) so every caller builds alike.
        cpp_extension.CUDA_HOME = str(home)
        nvcc_flags, cflags, sources = cuda_nvcc_flags(), cuda_cflags(), cuda_sources()
        key = nvcc_flags + cflags + [str(home), os.environ.get("TORCH_CUDA_ARCH_LIST", ""), str(torch.version.cuda)]
        name = "fastelbo_cuda_" + _fingerprint(sources, key, ("cuda",))
        directory = build_dir(name)
        return _Plan(name, directory,
                     lambda: _locked_load(name, sources, cflags, directory, extra_ldflags=(),
                                          extra_cuda_cflags=nvcc_flags, extra_include_paths=cuda_include_paths(),
                                          with_cuda=True, what="fastelbo's CUDA kernels"),
                     f"Needed: nvcc matching torch's CUDA {torch.version.cuda} (CUDA_HOME={home}), a C++17 compiler "
                     "and ninja; FASTELBO_VERBOSE_BUILD=1 shows the full compiler output.")

    _load_once(_CUDA, "fastelbo's CUDA kernels", cuda_compatibility, plan)


def cuda_extension_status() -> tuple[bool, str]:
    """(loaded, reason) after trying to build/load the CUDA kernels once; never raises."""
    try:
        load_cuda_extension()
        return True, str(_CUDA.path)
    except BuildError as exc:
        return False, str(exc)


# ---------------------------------------------------------------------------
# TEST-ONLY: the CUDA kernels of csrc/cuda compiled as host C++ against the CUDA
# emulation of csrc/emu (the "cuda-emulated" backend of the test suite, enabled by
# FASTELBO_TEST_CUDA_EMULATED=1; see fastelbo/_emulated.py). A third extension:
# each .cu is compiled by the host compiler through a generated wrapper that
# includes csrc/emu/cuda_emu.h first; no nvcc, no CUDA toolkit, no GPU.
# ---------------------------------------------------------------------------
def emulated_cflags() -> list[str]:
    return ["-O2"]


def emulated_sources() -> list[Path]:
    """The emulation's own sources; the .cu files enter through generated wrappers."""
    return [csrc_dir() / "emu" / name for name in ("binding.cpp", "cuda_emu.cpp", "geometry.cpp")]


def _emulated_wrappers(directory: Path, cu_files: list[Path]) -> list[Path]:
    """One <name>_cu_emulated.cpp per .cu: the emulation header, then the unchanged .cu source.
    Rewritten only when their text changes (ninja rebuilds on a newer mtime)."""
    wrappers = []
    src = directory / "emulated_sources"
    src.mkdir(parents=True, exist_ok=True)
    for cu in cu_files:
        path = src / f"{cu.stem}_cu_emulated.cpp"
        text = (f"// Generated by fastelbo/_build.py: csrc/cuda/{cu.name} as host C++ on the CUDA emulation.\n"
                f'#include "emu/cuda_emu.h"\n#include "cuda/{cu.name}"\n')
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        wrappers.append(path)
    return wrappers


_EMU = _State()


def load_emulated_extension() -> None:
    """Builds (first time) and loads the CUDA kernels on the CPU emulation; raises BuildError.

    Registers the CPU kernels of the fastelbo::emu_<op> ops, which fastelbo._emulated defines first.
    """
    def plan() -> _Plan:
        cu_files = sorted((csrc_dir() / "cuda").glob("*.cu"))
        flags = emulated_cflags()
        own = emulated_sources()
        name = "fastelbo_cuda_emulated_" + _fingerprint(own + cu_files, flags, ("cuda", "emu"))
        directory = build_dir(name)

        def build() -> None:
            sources = own + _emulated_wrappers(directory, cu_files)
            _locked_load(name, sources, flags, directory, extra_ldflags=("-lpthread", "-ldl"),
                         what="the emulated CUDA kernels (tests only)")

        return _Plan(name, directory, build, "FASTELBO_VERBOSE_BUILD=1 shows the full compiler output.")

    _load_once(_EMU, "the emulated CUDA kernels (csrc/cuda on csrc/emu)", compatibility, plan)


def emulated_library() -> Path:
    """The shared library of the emulated CUDA kernels (built and loaded first): its C functions
    (csrc/emu/geometry.cpp) tell the tests the launch plans."""
    load_emulated_extension()
    return _EMU.library


def load_kernels(cuda: bool | None = None) -> None:
    """Builds (first time) and loads fastelbo's C++ kernels now rather than at the
    first API call: what a process needs before it runs a torch.export'ed or
    AOTInductor-packaged program holding fastelbo:: ops. CUDA kernels too when
    `cuda` is True (default: when a CUDA device is present). Raises BuildError."""
    load_cpu_extension()
    if cuda or (cuda is None and torch.cuda.is_available()):
        load_cuda_extension()


__all__ = ["BuildError", "load_kernels", "load_cpu_extension", "cpu_extension_status", "compatibility", "cache_root", "csrc_dir",
           "strict_mode", "load_cuda_extension", "cuda_extension_status", "cuda_compatibility", "cuda_home"]
