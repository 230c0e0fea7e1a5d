"""Which ninja and which C++ compiler build the kernels, decided once and part of the cache key.

torch.utils.cpp_extension runs whichever `ninja` comes first on PATH. Two different ninja programs
(say pip's 1.13 and the system's 1.11) do not read each other's build log (.ninja_log): each one
that finds the other's log rebuilds every object, so a user whose PATH order differs between two
ways of starting Python (the `fastelbo` command, `python script.py`) rebuilt everything each time.

Here the ninja is chosen independently of PATH order where possible: FASTELBO_NINJA (a path) if set,
else the one the `ninja` pip package installs (fastelbo depends on it), else the first on PATH. The
build runs with that ninja first on PATH, and its path and version (and the compiler's) are part of
the build directory's name, so a different ninja or compiler builds in its own directory once and
never invalidates another's build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class ToolchainError(RuntimeError):
    """No usable ninja or C++ compiler."""


@dataclass(frozen=True)
class Tool:
    path: Path      # resolved (symlinks and pyenv-style shims followed where they are plain links)
    version: str    # first line of `<tool> --version`
    why: str        # how it was chosen, for `fastelbo info` and messages


@functools.lru_cache(maxsize=None)
def _version(path: str, mtime_ns: int) -> str:
    # mtime in the cache key: a tool upgraded in place is asked again.
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(f"could not run {path} --version: {exc}") from exc
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise ToolchainError(f"{path} --version failed (exit {proc.returncode})")
    return lines[0]


def _tool(path: str, why: str) -> Tool:
    real = Path(path).resolve()
    return Tool(real, _version(str(real), real.stat().st_mtime_ns), why)


def _pip_ninja() -> str | None:
    """The program the `ninja` pip package installed, found through its file list: its BIN_DIR names
    the running interpreter's scripts folder, which is not where it lives when the package comes from
    another installation (a venv with --system-site-packages)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("ninja")
    except metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == "ninja" and "bin" in entry.parts:
            path = Path(dist.locate_file(entry)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def ninja() -> Tool:
    """The ninja that builds fastelbo's kernels; raises ToolchainError naming what to install."""
    explicit = os.environ.get("FASTELBO_NINJA", "").strip()
    if explicit:
        path = shutil.which(explicit)
        if path is None:
            raise ToolchainError(f"FASTELBO_NINJA={explicit!r} is not an executable ninja")
        return _tool(path, "FASTELBO_NINJA")
    pip = _pip_ninja()
    if pip is not None:
        return _tool(pip, "the ninja pip package")
    path = shutil.which("ninja")
    if path is None:
        raise ToolchainError("ninja is not installed (pip install ninja)")
    return _tool(path, "first on PATH (no ninja pip package)")


def compiler() -> Tool:
    """The C++ compiler torch's build uses: $CXX, else c++ (as torch.utils.cpp_extension does)."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise ToolchainError(f"no C++ compiler ({cxx!r} not on PATH; install g++, e.g. apt-get install g++)")
    return _tool(path, "$CXX" if "CXX" in os.environ else "c++ on PATH")


def cache_key() -> str:
    """What of the toolchain decides the build (and the build log's format): into the cache key."""
    n, c = ninja(), compiler()
    return f"ninja={n.path}:{n.version};cxx={c.path}:{c.version}"


@contextmanager
def chosen_ninja_first(tools_dir: Path):
    """PATH with the chosen ninja first while torch builds (torch runs plain `ninja`): a directory
    holding only a `ninja` link to it, so nothing else on PATH changes precedence."""
    tool = ninja()
    link_dir = tools_dir / f"ninja-{hashlib.sha256(f'{tool.path}:{tool.version}'.encode()).hexdigest()[:12]}"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "ninja"
    if not (link.is_symlink() and Path(os.readlink(link)) == tool.path):
        tmp = link_dir / f"ninja.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(tool.path)
        os.replace(tmp, link)  # atomic: a concurrent build never sees a missing link
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(link_dir) + (os.pathsep + old if old else "")
    try:
        yield tool
    finally:
        os.environ["PATH"] = old
