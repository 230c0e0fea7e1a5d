"""Deterministic cost: instructions executed per call, counted by valgrind's
callgrind (``fastelbo bench --count``), instead of time.

The same build on the same inputs executes the same instructions on any
machine of the same ISA level, whatever its load or clock, so a check against
a committed baseline can use a tight tolerance (2%).

What is held fixed, because the count depends on it:
  * the ISA level: valgrind does not run AVX-512 code, so the count runs with
    ATEN_CPU_CAPABILITY=avx2: torch dispatches its AVX2 kernels and fastelbo
    builds and loads its AVX2 kernels (a build of its own on an AVX-512 host;
    the same build as usual on an AVX2 one). A CPU without AVX2 cannot count.
  * one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)): under valgrind
    threads are serialized, and OpenMP's spin-waits would count instructions
    that depend on the scheduling.
  * the 16-bit lookup tables off (FASTELBO_HALF_TABLES=0): they are otherwise
    chosen by timing at first use.
  * PYTHONHASHSEED=0, the garbage collector off while counting, and fastelbo's
    own settings (FASTELBO_CPU_CACHE_MB, FASTELBO_STRICT, ...) at their defaults.
The compiler, torch and Python versions change the count too: a baseline
records them, and a check on another build is skipped with that reason.

Per case the worker makes its inputs, warms up 3 calls uninstrumented (the
imports run at native speed: valgrind starts with instrumentation off), then
counts two dumps of 5 calls each; the figures are per call over the 10 (the two
halves are reported too: equal where the count is deterministic).
Two figures per call: Ir, every instruction of the call (Python, the
dispatcher, autograd, ATen, the kernels), and kernel_Ir, those in fastelbo's
own C++ library.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .ab_sides import Side, SideError, WorkerProcess

SCHEMA = "fastelbo-counts/1"
DEFAULT_TOLERANCE = 0.02
METRICS = ("Ir", "kernel_Ir")
# Python 3.11+ specializes its bytecode after a few dozen runs and the allocators settle: a
# call counted before that costs a few percent more than the next.
WARMUP_CALLS = 30
# Even then Python re-tries its specializations now and then (with backoff) and the allocator's
# state moves: one call's Ir wobbles by up to ~2%, exact in fastelbo's kernels. So each case is
# counted as two dumps of COUNT_CALLS calls; the figures are per call over both.
COUNT_CALLS = 5
KERNEL_LIBRARY = re.compile(r"fastelbo_cpu_[0-9a-f]+\.so$")

COUNT_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "FASTELBO_HALF_TABLES": "0", "PYTHONHASHSEED": "0",
             # settings of the caller's environment that change what a call executes: the defaults count
             "FASTELBO_CPU_CACHE_MB": None, "FASTELBO_STRICT": None, "FASTELBO_BACKEND": None,
             "FASTELBO_TEST_CUDA_EMULATED": None, "TRITON_INTERPRET": None}

_HELPER_SOURCE = """// Callgrind client requests for fastelbo's count mode (fastelbo/bench/counts.py).
#include <valgrind/callgrind.h>
void fastelbo_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void fastelbo_cg_zero(void) { CALLGRIND_ZERO_STATS; }
void fastelbo_cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void fastelbo_cg_dump(const char* label) { CALLGRIND_DUMP_STATS_AT(label); }
void fastelbo_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


class Unavailable(RuntimeError):
    """Counting is not possible here; the message says why."""


def _first_line(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0].strip() if proc.returncode == 0 and out else None


def valgrind_version() -> str | None:
    return _first_line(["valgrind", "--version"]) if shutil.which("valgrind") else None


def compiler_version() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return _first_line([cxx, "--version"]) if shutil.which(cxx) else None


def check_available() -> None:
    """Raises Unavailable with the reason when this machine cannot count instructions."""
    import platform

    import torch

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise Unavailable(f"instruction counts are taken for x86-64 Linux (AVX2 build); this is "
                          f"{platform.system()} {platform.machine()}")
    if valgrind_version() is None:
        raise Unavailable("valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)")
    if not Path("/usr/include/valgrind/callgrind.h").is_file():
        raise Unavailable("valgrind's headers (valgrind/callgrind.h) are missing; they come with Debian's valgrind "
                          "package")
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        raise Unavailable(f"this CPU runs torch's {cap} kernels: the counts are of the AVX2 build, which needs AVX2")


def helper_library() -> Path:
    """The callgrind client-request library, compiled once into the fastelbo cache."""
    from .._build import cache_root

    digest = hashlib.sha256(_HELPER_SOURCE.encode()).hexdigest()[:12]
    lib = cache_root() / "callgrind" / f"fastelbo_cg_{digest}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise Unavailable(f"no C compiler ({cc!r}) for the callgrind helper")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src = Path(tmp) / "helper.c"
        src.write_text(_HELPER_SOURCE)
        out = Path(tmp) / lib.name
        proc = subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise Unavailable(f"the callgrind helper does not compile: {proc.stderr.strip()[-500:]}")
        os.replace(out, lib)
    return lib


# ---------------------------------------------------------------------------
# callgrind's output
# ---------------------------------------------------------------------------
def parse_dump(path: Path) -> dict:
    """{'label', 'Ir', 'by_object': {object: self Ir}} of one callgrind dump (Ir events only).

    Self cost per object: every cost line, except the one after a calls= line
    (that one is the inclusive cost of the call, which the callee counts as its own)."""
    label, total, npos = None, None, 1
    names: dict = {}
    obj, after_call = None, False
    by_object: dict = {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) > npos:
                    by_object[obj] = by_object.get(obj, 0) + int(parts[npos])
            elif line.startswith("calls="):
                after_call = True
            elif line.startswith("ob="):
                obj = _name(line[3:], names.setdefault("ob", {}))
            elif line.startswith(("cob=", "cfi=", "cfl=", "cfn=", "fl=", "fi=", "fe=", "fn=")):
                key, _, value = line.partition("=")
                if value.startswith("("):  # defines a compressed name a later line may refer to
                    _name(value, names.setdefault(_NAMESPACE[key], {}))
            elif line.startswith("positions:"):
                npos = len(line.split()[1:])
            elif line.startswith("desc: Trigger:"):
                label = line.split("Client Request:", 1)[1].strip() if "Client Request:" in line else None
            elif line.startswith("totals:") or (line.startswith("summary:") and total is None):
                total = int(line.split()[1])
    return {"label": label, "Ir": total, "by_object": by_object}


# callgrind compresses names per kind: objects, files, functions
_NAMESPACE = {"cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl", "fn": "fn", "cfn": "fn"}


def _name(text: str, names: dict) -> str:
    """callgrind's name compression: "(id) name" defines, "(id)" refers."""
    text = text.strip()
    if text.startswith("("):
        ident, _, rest = text.partition(")")
        rest = rest.strip()
        if rest:
            names[ident] = rest
        return names.get(ident, rest)
    return text


def kernel_ir(by_object: dict) -> int:
    return sum(v for k, v in by_object.items() if k and KERNEL_LIBRARY.search(os.path.basename(k)))


# ---------------------------------------------------------------------------
# Counting one side
# ---------------------------------------------------------------------------
def count_side(side: Side, items: list[dict], *, log_dir=None, out_dir=None, progress=None) -> dict:
    """{'side', 'build', 'counts': {key: {'Ir', 'kernel_Ir', 'halves_Ir', ...} or {'error'}}} of one side."""
    check_available()
    helper = helper_library()
    own_dir = out_dir is None
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fastelbo-callgrind-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _count_side(side, items, helper, out_dir, log_dir, progress)  # on an error the dumps stay for a look
    if own_dir and not any("error" in v for v in result["counts"].values()):
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _count_side(side, items, helper, out_dir, log_dir, progress) -> dict:
    # Build (or find) the AVX2 kernels at native speed first; the run under valgrind then only loads them.
    builder = WorkerProcess(side, env=COUNT_ENV, threads=1, log_dir=log_dir)
    try:
        hello = builder.call({"cmd": "hello", "build": True})
    finally:
        builder.close()
    if not hello["ok"]:
        raise SideError(f"side {side.label}: building the AVX2 kernels failed: {hello['error']}\n{builder.log_tail()}")
    if hello["cpu_capability"] != "AVX2":
        raise Unavailable(f"torch runs its {hello['cpu_capability']} kernels under ATEN_CPU_CAPABILITY=avx2")
    out_file = out_dir / f"callgrind.{side.label}.out"
    prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
              "--compress-strings=no", "--compress-pos=no", f"--callgrind-out-file={out_file}"]
    worker = WorkerProcess(side, env=COUNT_ENV, threads=1, helper=helper, prefix=prefix, log_dir=log_dir)
    labels = {}
    try:
        h = worker.call({"cmd": "hello"})
        if not h["ok"]:
            raise SideError(f"side {side.label} under valgrind: {h['error']}\n{worker.log_tail()}")
        errors = {}
        for n, item in enumerate(items):
            if progress:
                progress(f"{side.label}: {item['key']}")
            prep = worker.call({"cmd": "prepare", "id": n, **item["prepare"], "warmup": WARMUP_CALLS})
            if not prep["ok"]:
                errors[item["key"]] = prep["error"]
                continue
            pair = [f"{n}#1", f"{n}#2"]
            r = worker.call({"cmd": "count", "id": n, "calls": COUNT_CALLS, "labels": pair})
            if not r["ok"]:
                errors[item["key"]] = r["error"]
            else:
                labels.update({label: item["key"] for label in pair})
            worker.call({"cmd": "drop", "id": n})
    finally:
        status = worker.close()
    if status != 0:
        raise SideError(f"valgrind exited with status {status} on side {side.label}; its log {worker.log_path}:\n"
                        f"{worker.log_tail()}")
    dumps = {}
    for path in sorted(out_dir.glob(f"callgrind.{side.label}.out*")):
        d = parse_dump(path)
        if d["label"] in labels:
            dumps[d["label"]] = d
    counts = {}
    for n, item in enumerate(items):
        key = item["key"]
        if key in errors:
            counts[key] = {"error": errors[key]}
            continue
        first, second = dumps.get(f"{n}#1"), dumps.get(f"{n}#2")
        if first is None or second is None:
            counts[key] = {"error": f"no callgrind dump for {key} in {out_dir}"}
            continue
        calls = 2 * COUNT_CALLS
        k1, k2 = kernel_ir(first["by_object"]), kernel_ir(second["by_object"])
        counts[key] = {"Ir": round((first["Ir"] + second["Ir"]) / calls), "kernel_Ir": round((k1 + k2) / calls),
                       "halves_Ir": [first["Ir"], second["Ir"]], "halves_kernel_Ir": [k1, k2],
                       "calls": calls}
    build = {"isa": hello["cpu_capability"], "compiler": compiler_version(), "torch": hello["torch"],
             "python": hello["python"], "valgrind": valgrind_version(), "threads": 1, "half_tables": "off",
             "kernel_library": os.path.basename(hello.get("cpu_library") or "")}
    return {"side": side.info(), "build": build, "counts": counts}


# ---------------------------------------------------------------------------
# Baseline and comparisons
# ---------------------------------------------------------------------------
COMPARABLE = ("isa", "compiler", "torch", "python")


def baseline_doc(result: dict, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    from . import measure as M

    return {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build": result["build"], "recorded_on": {"cpu_model": M.cpu_model(), "cpu_id": M.cpu_id()},
            "tolerance": tolerance,
            "note": "instructions per call under callgrind (AVX2 build, 1 thread, 16-bit tables off); Ir: the "
                    "whole call, kernel_Ir: inside fastelbo's C++ library. Holds for the build fields: another "
                    "compiler, torch or Python version is a different program, not a regression.",
            "counts": {k: {m: v[m] for m in METRICS} for k, v in result["counts"].items() if "error" not in v}}


def not_comparable(build: dict, baseline_build: dict) -> list[str]:
    return [f"{f}: baseline {baseline_build.get(f)!r}, here {build.get(f)!r}" for f in COMPARABLE
            if baseline_build.get(f) != build.get(f)]


def compare_counts(base: dict, cur: dict, tolerance: float, keys=None) -> list[dict]:
    """Rows {key, metric, base, current, change, status}: REGRESSION above +tolerance, improved below -tolerance."""
    rows = []
    for key in keys if keys is not None else sorted(base):
        for metric in METRICS:
            b = base.get(key, {}).get(metric)
            c = cur.get(key, {}).get(metric)
            if b is None:
                continue
            if c is None:
                rows.append({"key": key, "metric": metric, "base": b, "current": None, "change": None,
                             "status": "missing" if key not in cur else "error"})
                continue
            change = (c / b - 1.0) if b else (0.0 if c == b else float("inf"))
            status = "REGRESSION" if change > tolerance else ("improved" if change < -tolerance else "ok")
            rows.append({"key": key, "metric": metric, "base": b, "current": c, "change": change, "status": status})
    return rows


def format_counts(result: dict) -> str:
    from .report import _align

    b = result["build"]
    lines = [f"instructions per call (callgrind), {b['isa']} build, {b['threads']} thread, 16-bit tables "
             f"{b['half_tables']}; {b['compiler']}; torch {b['torch']}; Python {b['python']}; {b['valgrind']}"]
    table = [("case", "Ir", "kernel_Ir", "Ir halves", "kernel halves")]
    for key, v in result["counts"].items():
        if "error" in v:
            table.append((key, "ERROR", "", "", v["error"][:80]))
            continue
        h, k = v["halves_Ir"], v["halves_kernel_Ir"]
        table.append((key, f"{v['Ir']:,}", f"{v['kernel_Ir']:,}", _spread(h), _spread(k)))
    return "\n".join(lines + _align(table, right_from=1))


def _spread(halves) -> str:
    """How far the two halves of a count differ (0 where the count is deterministic)."""
    a, b = halves
    return "same" if a == b else f"{200 * abs(a - b) / (a + b):.2f}%"


def format_rows(rows: list[dict], title: str, tolerance: float, base_label="baseline", cur_label="current") -> str:
    from .report import _align

    table = [("case", "metric", base_label, cur_label, "change", "status")]
    for r in rows:
        table.append((r["key"], r["metric"], f"{r['base']:,}", "-" if r["current"] is None else f"{r['current']:,}",
                      "-" if r["change"] is None else f"{100 * r['change']:+.2f}%", r["status"]))
    regressions = sum(r["status"] == "REGRESSION" for r in rows)
    bad = sum(r["status"] == "error" for r in rows)
    verdict = "FAIL" if regressions else ("ERROR" if bad else "PASS")
    return "\n".join([title] + _align(table, right_from=2) + [
        f"{verdict}: {regressions} count(s) more than {100 * tolerance:g}% above the {base_label}"
        + (f", {bad} not counted (error)" if bad else "")])


__all__ = ["count_side", "parse_dump", "kernel_ir", "check_available", "helper_library", "baseline_doc",
           "compare_counts", "not_comparable", "format_counts", "format_rows", "Unavailable", "COUNT_ENV",
           "SCHEMA", "DEFAULT_TOLERANCE", "METRICS"]
