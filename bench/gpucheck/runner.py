"""Runs the plan of stages.py: each stage in its own process group, its output
in OUT/logs/<stage>.log, stopped at its cap (SIGTERM, then SIGKILL), and the
report rewritten after every stage, so whatever finished is on disk when a
later stage hangs or the machine is taken away.

Standard library only: it starts before fastelbo is installed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import report as R
from . import stages as S

GRACE_S = 3.0  # between SIGTERM and SIGKILL, inside the cap
LOG_LIMIT = 4 << 20  # bytes of a stage log kept (its head and tail)


def _kill_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _trim_log(path: Path) -> None:
    """Keeps the first MiB and the last 3 MiB of a huge log."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size <= LOG_LIMIT:
        return
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(size - (3 << 20))
        tail = f.read()
    with open(path, "wb") as f:
        f.write(head + f"\n\n[... {size - len(head) - len(tail)} bytes cut by the GPU check ...]\n\n".encode() + tail)


class Runner:
    def __init__(self, paths: S.Paths, groups: list[S.Group], budget_s: float = S.BUDGET_S, cores: int | None = None,
                 only: set[str] | None = None, skip: set[str] | None = None, python: str = sys.executable,
                 echo=print):
        self.paths, self.groups, self.budget_s = paths, groups, budget_s
        self.cores = cores or os.cpu_count() or 1
        self.only, self.skip = only, skip or set()
        self.python = python
        self.echo = echo
        self.extra_env: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.start = time.monotonic()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -- bookkeeping -----------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _selected(self, stage: S.Stage, group: S.Group) -> bool:
        names = {stage.name, group.name}
        if self.only is not None and not names & self.only:
            return False
        return not names & self.skip

    def _needs_met(self, stage: S.Stage) -> str:
        """'' when every stage this one needs succeeded (or was left out on request), else why not."""
        for need in stage.needs:
            status = self.results.get(need, {}).get("status")
            if status not in ("ok", "not-selected"):
                return f"needs stage {need!r}, which is {status or 'not run'}"
        return ""

    def _record(self, stage: S.Stage, group: S.Group, **fields) -> None:
        self.results[stage.name] = {"group": group.name, "doc": stage.doc, **fields}
        self.write_report()

    def write_report(self, final: bool = False) -> None:
        meta = {"started": self.started_at, "elapsed_s": round(self.elapsed(), 1), "budget_s": self.budget_s,
                "cores": self.cores, "final": final, "extra_env": dict(self.extra_env)}
        try:
            R.write(self.paths.out, self.groups, self.results, meta)
        except Exception as exc:  # the report must never take the check down; the stage logs stay
            self.echo(f"[gpu-check] writing the report failed: {type(exc).__name__}: {exc}")

    # -- one stage -------------------------------------------------------------
    def _env(self, stage: S.Stage) -> dict[str, str]:
        env = dict(os.environ)
        env.update(S.common_env(self.paths, self.cores))
        env.update(self.extra_env)
        env.update(stage.env)
        for key in S.UNSET_ENV:
            env.pop(key, None)
        return env

    def _argv(self, stage: S.Stage, cap: float) -> list[str]:
        return [a.replace(S.PYTHON, self.python).replace(S.CAP, str(int(cap))) for a in stage.argv]

    def run_group(self, group: S.Group, cap: float) -> None:
        logs = self.paths.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        running: dict[str, tuple[S.Stage, subprocess.Popen, float, object]] = {}
        for stage in group.stages:
            if not self._selected(stage, group):
                self._record(stage, group, status="not-selected", reason="left out (--only / --skip)")
                continue
            why = stage.skip_reason or self._needs_met(stage)
            if why:
                self._record(stage, group, status="skipped", reason=why)
                self.echo(f"[gpu-check {self.elapsed():5.0f}s] {stage.name}: skipped ({why})")
                continue
            argv = self._argv(stage, cap)
            log_path = logs / f"{stage.name}.log"
            log = open(log_path, "wb")
            log.write(f"$ {shlex.join(argv)}\n# cap {cap:.0f} s\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(argv, cwd=self.paths.root, env=self._env(stage), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                log.close()
                self._record(stage, group, status="failed", reason=f"could not start: {exc}", log=str(log_path),
                             command=argv, cap_s=round(cap))
                continue
            running[stage.name] = (stage, proc, time.monotonic(), log)
            self.results[stage.name] = {"group": group.name, "doc": stage.doc, "status": "running",
                                        "command": argv, "cap_s": round(cap), "log": str(log_path)}
        self.write_report()
        group_start = time.monotonic()
        terminated: set[str] = set()
        while running:
            time.sleep(0.2)
            now = time.monotonic()
            for name, (stage, proc, t0, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    if now - group_start > cap - GRACE_S and name not in terminated:
                        _kill_group(proc, signal.SIGTERM)
                        terminated.add(name)
                    if now - group_start > cap:
                        _kill_group(proc, signal.SIGKILL)
                        try:
                            rc = proc.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            rc = None
                    else:
                        continue
                _kill_group(proc, signal.SIGKILL)  # what the stage left running (its children) goes too
                log.close()
                _trim_log(Path(self.results[name]["log"]))
                status = "timeout" if name in terminated else ("ok" if rc == 0 else "failed")
                seconds = time.monotonic() - t0
                self._record(stage, group, status=status, rc=rc, seconds=round(seconds, 1), cap_s=round(cap),
                             command=self.results[name]["command"], log=self.results[name]["log"])
                self.echo(f"[gpu-check {self.elapsed():5.0f}s] {name}: {status} in {seconds:.0f} s (cap {cap:.0f} s)"
                          + (f", exit status {rc}" if status == "failed" else ""))
                del running[name]

    # -- after a group ---------------------------------------------------------
    def _after(self, group: S.Group) -> None:
        if group.name == "install":  # left out (--only): the environment of an earlier run, where there is one
            venv_python = self.paths.venv / "bin" / "python"
            if self.results.get("install", {}).get("status") in ("ok", "not-selected") and venv_python.exists():
                self.python = str(venv_python)
        if group.name == "build" and self.results.get("build", {}).get("status") != "not-selected":
            self._mark_build_failures()

    def _mark_build_failures(self) -> None:
        """A backend whose build failed is marked so for the later stages (select_tests.py, bench_gpu.py read
        it): without the mark every test shard would retry the build, one after another, under the build lock."""
        status = self.results.get("build", {}).get("status")
        try:
            build = json.loads((self.paths.out / "build.json").read_text())
        except (OSError, ValueError):
            build = {}
        for kind in ("cpu", "cuda"):
            entry = build.get(kind) or {}
            if entry.get("ok") is True:
                continue
            if entry.get("ok") is None and entry:  # cannot be built here at all: the backend says so itself
                continue
            why = entry.get("error") or f"the GPU check's build stage was {status or 'not run'}"
            self.extra_env[f"GPUCHECK_{kind.upper()}_BUILD_FAILED"] = R.first_line(why, 300)

    # -- the whole plan --------------------------------------------------------
    def run(self) -> int:
        for sub in ("logs", "tests", "sanitizer", "bench"):  # compute-sanitizer does not make its log's directory
            (self.paths.out / sub).mkdir(parents=True, exist_ok=True)
        deadline = self.budget_s - S.REPORT_RESERVE_S
        self.echo(f"[gpu-check] out: {self.paths.out}; work: {self.paths.work}; budget {self.budget_s:.0f} s; "
                  f"{self.cores} cores")
        for i, group in enumerate(self.groups):
            reserved = sum(g.cap_s for g in self.groups[i + 1:])
            cap = deadline - self.elapsed() - reserved  # its own cap plus what earlier groups left unused
            if cap < min(5.0, 0.5 * group.cap_s):  # too little left to start it usefully
                for stage in group.stages:
                    self._record(stage, group, status="not-run", reason="the check's time budget was spent")
                continue
            self.run_group(group, cap)
            self._after(group)
        self._late_plot()
        self.write_report(final=True)
        md = self.paths.out / "report.md"
        if md.exists():
            self.echo(md.read_text())
        return 0 if all(r.get("status") in ("ok", "not-selected") for r in self.results.values()) else 1

    def _late_plot(self) -> None:
        """The bench stage draws its plot at its end; if it was stopped, draw it from the saved results."""
        js, png = self.paths.out / "bench" / R.BENCH_JSON, self.paths.out / "bench" / R.BENCH_PNG
        left = self.budget_s - self.elapsed() - 2
        if not js.exists() or png.exists() or left < 5:
            return
        argv = [self.python, "-m", "fastelbo.cli", "bench", "--from-json", str(js), "--png", str(png)]
        env = self._env(S.Stage("plot", argv, ""))
        with open(self.paths.out / "logs" / "plot.log", "wb") as log:
            try:
                subprocess.run(argv, cwd=self.paths.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                               timeout=min(left, 30))
            except (OSError, subprocess.TimeoutExpired):
                pass


def dry_run(paths: S.Paths, groups: list[S.Group], budget_s: float, cores: int, echo=print) -> int:
    """Prints the stages, their commands and caps; runs nothing. Checks that the files the plan runs exist."""
    echo(f"GPU check plan: budget {budget_s:.0f} s, {cores} cores, out {paths.out}, work {paths.work}")
    echo("Groups run one after another, the stages of a group at the same time; a group's cap grows by what "
         "earlier groups left unused, never past the budget.")
    env = S.common_env(paths, cores)
    echo("every stage: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
         + " (unset: " + ", ".join(S.UNSET_ENV) + ")")
    echo(f"{S.PYTHON}: {paths.venv / 'bin' / 'python'} once the install stage made it ({sys.executable} before); "
         f"{S.CAP}: the stage's cap in seconds")
    problems = []
    for g in groups:
        echo(f"\n== group {g.name}: cap {g.cap_s:.0f} s")
        for st in g.stages:
            echo(f"-- {st.name}: {st.doc}")
            extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in st.env.items())
            echo(f"   $ {(extra + ' ') if extra else ''}{shlex.join(st.argv)}")
            if st.skip_reason:
                echo(f"   (would be skipped here: {st.skip_reason})")
            for a in st.argv:
                if a.endswith(".py") and "/" in a and not (paths.root / a).exists():
                    problems.append(f"{st.name}: {a} does not exist")
                if a.startswith("gpucheck.") and not (paths.root / "bench" / (a.replace(".", "/") + ".py")).exists():
                    problems.append(f"{st.name}: module {a} does not exist")
            if st.needs:
                echo(f"   needs: {', '.join(st.needs)}")
    total = S.planned_total(groups)
    echo(f"\ncaps: {' + '.join(f'{g.cap_s:.0f}' for g in groups)} + {S.REPORT_RESERVE_S:.0f} (report) = "
         f"{total:.0f} s of a {budget_s:.0f} s budget")
    if total > budget_s + 1e-6:
        problems.append(f"the caps sum to {total:.0f} s, more than the budget {budget_s:.0f} s")
    for p in problems:
        echo(f"PROBLEM: {p}")
    return 1 if problems else 0
