"""The two sides of an A/B run and the worker processes that host them.

A side is a source tree (a git revision exported with `git archive`, or a
directory such as the working tree), the import mapping of its packages
(read from its pyproject.toml, see ab_worker.TreeFinder) and, where the tree
holds fastelbo itself, a kernel cache of its own. Exports are cached by commit
hash under <fastelbo cache>/ab/<sha>/, so a repeat A/B against the same
revision neither exports nor rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

WORKER = Path(__file__).with_name("ab_worker.py")
CASES_FILE = Path(__file__).with_name("cases.py")

# setuptools' package-dir table of fastelbo, for a tree whose pyproject.toml cannot be read
_FASTELBO_LAYOUT = {"fastelbo": "fastelbo", "fastelbo.kernels": "kernels", "fastelbo.csrc": "csrc"}


class SideError(RuntimeError):
    """A side could not be set up (bad revision, no git, a worker that died)."""


def ab_root() -> Path:
    from .._build import cache_root

    return cache_root() / "ab"


def _git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise SideError("git is not installed; --against needs git") from exc
    if proc.returncode != 0:
        raise SideError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def repo_root(path: Path) -> Path:
    return Path(_git(path, "rev-parse", "--show-toplevel"))


def resolve(repo: Path, rev: str) -> str:
    """The commit hash of a revision."""
    return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")


def default_base(repo: Path) -> tuple[str, str]:
    """(commit, how it was chosen): the merge base of HEAD with main (or origin/main)."""
    for branch in ("main", "origin/main", "master", "origin/master"):
        try:
            resolve(repo, branch)
        except SideError:
            continue
        return _git(repo, "merge-base", "HEAD", branch), f"merge base of HEAD with {branch}"
    raise SideError(f"no main branch in {repo} to take the merge base with: name a revision (--against REV)")


def package_layout(root: Path) -> tuple[dict, list]:
    """({package: directory}, [sys.path entries]) of a source tree, from its pyproject.toml's
    [tool.setuptools] package-dir and packages; a tree without one is importable from its root."""
    pyproject = root / "pyproject.toml"
    data = {}
    if pyproject.is_file():
        try:
            import tomllib  # Python 3.11+
        except ImportError:  # pragma: no cover - 3.9/3.10
            try:
                import tomli as tomllib
            except ImportError:
                tomllib = None
        if tomllib is not None:
            data = tomllib.loads(pyproject.read_text())
        elif (root / "fastelbo").is_dir():
            return {k: str(root / v) for k, v in _FASTELBO_LAYOUT.items()}, []
    st = data.get("tool", {}).get("setuptools", {})
    dirs = st.get("package-dir", {}) if isinstance(st.get("package-dir"), dict) else {}
    if "" in dirs:
        paths = [str(root / dirs[""])]
    elif not dirs and not st.get("packages") and (root / "src").is_dir():
        paths = [str(root / "src"), str(root)]  # a src layout under another build backend
    else:
        paths = [str(root)]
    mapping = {name: str(root / d) for name, d in dirs.items() if name}
    for name in st.get("packages", []) if isinstance(st.get("packages"), list) else []:
        if name not in mapping and "." not in name:
            mapping[name] = str(Path(paths[0]) / name)
    return mapping, paths


@dataclass
class Side:
    """One side of an A/B run."""

    label: str                 # "A" (baseline) or "B" (candidate)
    description: str           # what it is, for the report
    root: Path | None          # the source tree; None: whatever the environment imports
    commit: str | None = None
    cache_dir: Path | None = None   # FASTELBO_CACHE_DIR of its workers; None: inherited
    env: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"label": self.label, "description": self.description, "root": str(self.root) if self.root else None,
                "commit": self.commit, "cache_dir": str(self.cache_dir) if self.cache_dir else None}


def _holds_fastelbo(root: Path) -> bool:
    return (root / "fastelbo" / "__init__.py").is_file() and (root / "csrc").is_dir()


def export_revision(repo: Path, commit: str) -> Path:
    """The tree of `commit`, exported once into <cache>/ab/<commit>/tree (git archive)."""
    dest = ab_root() / commit / "tree"
    if (dest / ".fastelbo-export-complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="export-", dir=dest.parent))
    archive = tmp / "tree.tar"
    with open(archive, "wb") as f:
        proc = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=f,
                              stderr=subprocess.PIPE, timeout=300)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SideError(f"git archive {commit} failed: {proc.stderr.decode().strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "tree")
    archive.unlink()
    (tmp / "tree" / ".fastelbo-export-complete").write_text(commit + "\n")
    try:
        os.replace(tmp / "tree", dest)
    except OSError:  # another process exported it meanwhile
        if not (dest / ".fastelbo-export-complete").is_file():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def side_from_revision(label: str, repo: Path, rev: str, how: str | None = None) -> Side:
    commit = resolve(repo, rev)
    root = export_revision(repo, commit)
    cache = ab_root() / commit / "cache" if _holds_fastelbo(root) else None
    what = f"{rev} = {commit[:12]}" + (f" ({how})" if how else "")
    return Side(label, what, root, commit, cache)


def side_from_path(label: str, path: Path, own_cache: bool = True) -> Side:
    """A directory as it is (uncommitted changes included). Its kernels get a cache keyed
    by the path unless own_cache is False (the working tree keeps the user's cache)."""
    path = path.resolve()
    if not path.is_dir():
        raise SideError(f"{path} is not a directory")
    desc = f"{path}"
    try:
        head = resolve(path, "HEAD")
        dirty = _git(path, "status", "--porcelain", "--untracked-files=no")
        desc += f" (HEAD {head[:12]}{', with uncommitted changes' if dirty else ''})"
    except SideError:
        head = None
    cache = None
    if own_cache and _holds_fastelbo(path):
        cache = ab_root() / ("path-" + hashlib.sha1(str(path).encode()).hexdigest()[:12]) / "cache"
    return Side(label, desc, path, head, cache)


def this_checkout() -> Path | None:
    """The source tree of the running fastelbo, when it runs from a checkout."""
    import fastelbo

    root = Path(fastelbo.__file__).resolve().parent.parent
    return root if _holds_fastelbo(root) and (root / "pyproject.toml").is_file() else None


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------
class WorkerProcess:
    """A worker (ab_worker.py) for one side, driven over pipes; its stderr goes to a log file."""

    def __init__(self, side: Side, *, threads=None, workload=None, helper=None, env=None, prefix=(), log_dir=None,
                 fastelbo_package: bool = True):
        mapping, paths = package_layout(side.root) if side.root else ({}, [])
        config = {"mapping": mapping, "paths": paths, "cases_file": str(CASES_FILE), "workload": workload,
                  "threads": threads, "helper": str(helper) if helper else None}
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None) if side.root else None
        if side.cache_dir:
            full_env["FASTELBO_CACHE_DIR"] = str(side.cache_dir)
        for key, value in {**side.env, **(env or {})}.items():  # None: unset
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self._own_log = log_dir is None  # removed after a clean exit; kept where the caller asked
        log_dir = Path(log_dir or ab_root() / "logs")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{side.label}-{os.getpid()}-{id(self)}.log"
        self.side = side
        self._log = open(self.log_path, "w")
        cmd = [*prefix, real_python(), str(WORKER), json.dumps(config)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=full_env, bufsize=1)

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise SideError(self._died()) from exc

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SideError(self._died())
        return json.loads(line)

    def call(self, msg: dict) -> dict:
        self.send(msg)
        return self.receive()

    def _died(self) -> str:
        self.proc.wait(timeout=30)
        return (f"the worker of side {self.side.label} ({self.side.description}) exited with status "
                f"{self.proc.returncode}; the end of its log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, timeout: float = 600) -> int:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.stdin.close()
            except (SideError, OSError):
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.returncode == 0 and self._own_log:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode


def call_both(workers: list, msg_for) -> list:
    """Sends each worker its message, then collects the replies: the workers work concurrently."""
    for i, w in enumerate(workers):
        w.send(msg_for(i))
    return [w.receive() for w in workers]


def real_python() -> str:
    """The interpreter to start workers with: sys.executable, which in a virtual environment is
    the environment's (its site-packages come with it) and is the binary itself, as valgrind needs
    (`python` on PATH may be a launcher script, e.g. a pyenv shim)."""
    return sys.executable


__all__ = ["Side", "SideError", "WorkerProcess", "call_both", "side_from_revision", "side_from_path", "default_base",
           "this_checkout", "export_revision", "package_layout", "resolve", "repo_root", "ab_root", "real_python"]
