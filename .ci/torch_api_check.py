"""Every torch name fastelbo's Python code uses exists in the running torch.

Run with the python of the oldest supported torch (.ci/compat-oldest runs it
under torch 2.11): the tests there execute most code paths, this covers the
rest (the bench, the command line, error branches). It reads every .py file
of fastelbo/ and kernels/ with the ast module and collects
  * `torch.a.b.c` attribute chains (up to the first call or subscript),
  * `from torch.x import y` and `import torch.x`,
and resolves each in the running torch: a submodule is imported, an attribute
looked up. A name the code only uses behind a hasattr/getattr guard is listed
in GUARDED with where the guard is. Exit status 1 when a name is missing.

    python .ci/torch_api_check.py [-v]
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "fastelbo", ROOT / "kernels")
# Our own op namespace, registered at import.
OWN = ("torch.ops.fastelbo",)
# name -> where the code checks for it before using it (so an older torch without it is fine).
GUARDED: dict[str, str] = {}


def _chain(node) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def used_names(path: Path) -> dict[str, int]:
    """{dotted torch name: first line} used in one file."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> dotted torch name
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
                    found.setdefault(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "torch"
                                                                    or node.module.startswith("torch.")):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                found.setdefault(full, node.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = _chain(node)
            if parts and parts[0] in aliases:
                found.setdefault(".".join([aliases[parts[0]]] + parts[1:]), node.lineno)
    # keep the longest chains only (torch.a.b.c implies torch.a.b)
    names = sorted(found)
    return {n: found[n] for n in names if not any(m.startswith(n + ".") for m in names)}


def resolve(name: str) -> bool:
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def main(argv: list[str]) -> int:
    import torch

    verbose = "-v" in argv
    uses: dict[str, list[str]] = {}
    for src in SOURCES:
        for path in sorted(src.rglob("*.py")):
            for name, line in used_names(path).items():
                uses.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line}")
    missing = []
    for name in sorted(uses):
        if name.startswith(OWN):
            continue
        ok = resolve(name)
        if verbose:
            print(f"{'ok     ' if ok else 'MISSING'} {name}  ({uses[name][0]})")
        if not ok and name not in GUARDED:
            missing.append(name)
    print(f"torch {torch.__version__}: {len(uses)} torch names used by fastelbo/ and kernels/; "
          f"{len(missing)} missing" + (":" if missing else ""))
    for name in missing:
        print(f"  {name}: used at {', '.join(uses[name][:3])}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
