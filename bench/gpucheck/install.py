"""Install stage: fastelbo from the checkout into a virtual environment over the machine's Python.

The environment sees the machine's packages (--system-site-packages: its
torch, triton, pytest, numpy) and gets only fastelbo, editable, with
`pip install --no-deps --no-build-isolation --no-index -e .`: nothing comes
from the network, nothing of the machine's Python changes, and a distribution
Python that refuses pip installs (PEP 668) is no obstacle. Where pip cannot
build the editable install without the network (e.g. a setuptools older than
70.1 without the `wheel` package: "invalid command 'bdist_wheel'"), the
environment gets what that install would have put there, written here: a
.pth file and an import finder that map fastelbo, fastelbo.kernels and
fastelbo.csrc to the checkout (pyproject.toml's package-dir). Where no
virtual environment can be made, pip installs into the machine's Python.
Writes what it did, with each command's output tail, to --out (JSON).

    python3 -m gpucheck.install --root . --venv /tmp/venv --out install.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PIP_INSTALL = ("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-e")
# From a neutral directory, so that the checkout is not imported through the working directory.
VERIFY = ("import importlib.util, fastelbo; "
          "spec = importlib.util.find_spec('fastelbo.kernels'); "
          "print(fastelbo.__file__); print(spec.origin if spec else 'fastelbo.kernels: not found')")


def _run(argv: list[str], steps: list, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess | None:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        steps.append({"command": argv, "rc": None, "seconds": round(time.monotonic() - t0, 1), "output": str(exc)})
        print(f"$ {' '.join(argv)}\n{exc}", flush=True)
        return None
    output = (proc.stdout + proc.stderr).strip()
    steps.append({"command": argv, "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1),
                  "output": output[-3000:]})
    print(f"$ {' '.join(argv)}\n{output[-3000:]}\n(exit {proc.returncode})", flush=True)
    return proc


FINDER = "_gpucheck_fastelbo_finder"
FINDER_CODE = """\
# Written by the fastelbo GPU check (bench/gpucheck/install.py): the packages of the checkout, as an
# editable install maps them, for an environment where pip could not build that install offline.
import sys
from importlib.util import spec_from_file_location

MAPPING = {mapping!r}


class Finder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in MAPPING:
            return None
        where = MAPPING[fullname]
        return spec_from_file_location(fullname, where + "/__init__.py", submodule_search_locations=[where])


def install():
    if Finder not in sys.meta_path:
        sys.meta_path.insert(0, Finder)
"""


def package_dirs(root: Path) -> dict[str, str]:
    """{package: directory} of the checkout, as pyproject.toml's [tool.setuptools] lays them out."""
    mapping = {"fastelbo": str(root / "fastelbo")}
    try:
        import tomllib

        setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
        mapping.update({pkg: str(root / d) for pkg, d in setup.get("package-dir", {}).items()})
    except (ImportError, OSError, KeyError, ValueError):  # Python < 3.11: the layout as it is today
        mapping.update({"fastelbo.kernels": str(root / "kernels"), "fastelbo.csrc": str(root / "csrc")})
    return mapping


def write_finder(python: Path, root: Path, steps: list) -> bool:
    """The .pth + finder fallback into the environment of `python`."""
    proc = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], steps)
    if proc is None or proc.returncode != 0:
        return False
    site = Path(proc.stdout.strip())
    (site / f"{FINDER}.py").write_text(FINDER_CODE.format(mapping=package_dirs(root)))
    (site / f"{FINDER}.pth").write_text(f"import {FINDER}; {FINDER}.install()\n")
    steps.append({"command": ["write", str(site / f"{FINDER}.pth"), str(site / f"{FINDER}.py")], "rc": 0,
                  "seconds": 0.0, "output": json.dumps(package_dirs(root))})
    return True


def install(root: Path, venv: Path, pip_install: tuple[str, ...] = PIP_INSTALL) -> dict:
    steps: list = []
    python = venv / "bin" / "python"
    how = None
    if not python.exists():
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], steps)
    if python.exists():
        proc = _run([str(python), *pip_install, str(root)], steps)
        if proc is not None and proc.returncode == 0:
            how = "venv"
        elif write_finder(python, root, steps):
            how = "venv, import finder (pip could not install offline)"
    if how is None:  # no virtual environment: the machine's Python itself
        python = Path(sys.executable)
        proc = _run([str(python), *pip_install, str(root)], steps)
        if proc is not None and proc.returncode != 0 and "externally-managed" in (proc.stdout + proc.stderr):
            proc = _run([str(python), *pip_install, str(root), "--break-system-packages"], steps)
        if proc is not None and proc.returncode == 0:
            how = "system"
    result = {"ok": False, "how": how, "python": str(python), "steps": steps}
    if how is None:
        result["error"] = "pip could not install fastelbo from the checkout (see the steps)"
        return result
    proc = _run([str(python), "-c", VERIFY], steps, cwd="/")
    lines = (proc.stdout.strip().splitlines() if proc is not None and proc.returncode == 0 else [])
    result["fastelbo"] = lines[0] if lines else None
    result["fastelbo_kernels"] = lines[1] if len(lines) > 1 else None
    inside = [p for p in lines[:2] if Path(p).resolve().is_relative_to(root.resolve())] if len(lines) == 2 else []
    result["ok"] = len(inside) == 2
    if not result["ok"]:
        result["error"] = (f"installed, but `import fastelbo` outside the checkout does not find the checkout's "
                           f"fastelbo and fastelbo.kernels: {lines or 'the import failed'}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--venv", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = install(args.root, args.venv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"install: {'ok' if result['ok'] else 'FAILED'} ({result['how']}): fastelbo at {result.get('fastelbo')}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
