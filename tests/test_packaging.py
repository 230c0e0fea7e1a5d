"""Packaging: every module of fastelbo imports, and a wheel built from the
checkout ships the Triton kernels, the C++ sources the JIT build needs and the
command line, and imports from its installed layout."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastelbo

REPO = Path(__file__).resolve().parent.parent


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(fastelbo.__path__, prefix="fastelbo.")]
    # kernels/ and csrc/ are mapped into the package (package-dir): not under fastelbo/ in a checkout
    names += ["fastelbo.kernels", "fastelbo.csrc", "fastelbo.commands"]
    assert "fastelbo.functional" in names and "fastelbo.reference" in names
    failed = {}
    for name in sorted(set(names)):
        try:
            importlib.import_module(name)
        except Exception as e:  # report them all at once
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, f"modules that fail to import: {failed}"


def _checkout_files() -> list[str]:
    """The files of the working tree that git would ship: tracked plus untracked-but-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


@pytest.mark.slow
def test_wheel_contents_and_installed_import(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy the sources from")
    src = tmp_path / "src"
    for rel in _checkout_files():  # build from a copy: no build/ or egg-info written into the checkout
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
                           str(wheels), "-q"], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (wheel,) = wheels.glob("fastelbo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    required = ["fastelbo/__init__.py", "fastelbo/kernels/__init__.py", "fastelbo/csrc/fastelbo_math.h",
                "fastelbo/commands/__init__.py", "fastelbo/reference.py", "fastelbo/functional.py"]
    missing = [n for n in required if n not in names]
    assert not missing, f"wheel lacks {missing}"
    # every C++/CUDA source of the checkout ships (the JIT build compiles them on the user's machine)
    sources = [p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*")
               if p.suffix in {".h", ".cpp", ".cu", ".cuh"} and p.is_file()]
    cpu = [s for s in sources if s.startswith("cpu/")]
    assert any(s.endswith(".cpp") for s in cpu) and any(s.endswith(".h") for s in cpu)
    missing = [s for s in sources if f"fastelbo/csrc/{s}" not in names]
    assert not missing, f"C++ sources missing from the wheel: {missing}"
    # every Python module of kernels/ ships as fastelbo.kernels
    kernels = [p.name for p in (REPO / "kernels").glob("*.py")]
    missing = [k for k in kernels if f"fastelbo/kernels/{k}" not in names]
    assert not missing, f"Triton kernel modules missing from the wheel: {missing}"
    assert any(n.endswith("entry_points.txt") for n in names), "the fastelbo command's entry point is missing"

    # the installed layout imports (kernels and csrc found inside the package), away from the checkout
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import fastelbo, fastelbo.kernels, fastelbo.cli, fastelbo._build as b, pathlib; "
            "print(pathlib.Path(fastelbo.__file__).resolve()); print(b.csrc_dir().resolve())")
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"the installed wheel does not import:\n{proc.stderr[-3000:]}"
    pkg_file, csrc = (Path(line) for line in proc.stdout.split())
    assert site.resolve() in pkg_file.parents, f"imported {pkg_file}, not the wheel's copy"
    assert csrc == (site / "fastelbo" / "csrc").resolve(), f"the JIT build would compile {csrc}"
