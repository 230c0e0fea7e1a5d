"""report.json and report.md of the GPU check, from what the stages left in OUT.

Rewritten after every stage (runner.py), so it always says what finished:
the stages' status and time, the versions, the build, the test results per
backend (with the failures and the most frequent skip reasons), the
compute-sanitizer verdicts and the kernel coverage, the benchmark's headline
rows and which backend won where (winners.py). Every part is read
defensively: a missing or half-written file makes that part say so, never
the report fail. Standard library only.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

from . import sanitizer_log, winners

SCHEMA = "fastelbo-gpu-check/1"
BENCH_JSON = "fastelbo-bench-gpu.json"
BENCH_PNG = "fastelbo-bench-gpu.png"
TOOLS = ("memcheck", "racecheck", "synccheck")


def first_line(text, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(text or "").strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def _failure_line(message: str) -> str:
    """The assertion line of a pytest failure ('E   ...'), else its last line."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    line = errors[0] if errors else (lines[-1] if lines else "")
    return line[:240]


def tests_summary(out: Path) -> dict | None:
    files = sorted(glob.glob(str(out / "tests" / "shard-*.jsonl")))
    if not files:
        return None
    selected, shards, finished, autotune = 0, 0, 0, []
    outcome: dict[str, str] = {}
    backend: dict[str, str] = {}
    message: dict[str, str] = {}
    for f in files:
        shards += 1
        try:
            lines = Path(f).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the cap
            event = rec.get("event")
            if event == "selected":
                selected += rec.get("selected", 0)
            elif event == "finished":
                finished += 1
            elif event == "autotune":
                autotune.append(rec)
            elif "nodeid" in rec:
                node, res = rec["nodeid"], rec["outcome"]
                backend[node] = rec.get("backend", "other")
                if res == "failed":
                    outcome[node] = "error" if rec["when"] != "call" else "failed"
                    message[node] = rec.get("message", "")
                elif outcome.get(node) not in ("failed", "error"):
                    outcome[node] = res
                    if res == "skipped":
                        message[node] = rec.get("message", "")
    per_backend: dict[str, Counter] = {}
    for node, res in outcome.items():
        per_backend.setdefault(backend[node], Counter())[res] += 1
    bad = [n for n, r in outcome.items() if r in ("failed", "error")]
    skips = Counter(first_line(message[n], 160) for n, r in outcome.items() if r == "skipped")
    return {
        "shards": shards, "shards_finished": finished, "selected": selected, "reported": len(outcome),
        "not_reached": max(0, selected - len(outcome)),
        "per_backend": {b: dict(c) for b, c in sorted(per_backend.items())},
        "failures": [{"nodeid": n, "outcome": outcome[n], "line": _failure_line(message.get(n, ""))}
                     for n in sorted(bad)],
        "top_skip_reasons": skips.most_common(5),
        "autotune": autotune[:1],
    }


# ---------------------------------------------------------------------------
# Sanitizer, kernels, build, bench
# ---------------------------------------------------------------------------
def sanitizer_summary(out: Path, results: dict) -> dict:
    summary = {}
    for tool in TOOLS:
        res = results.get(tool) or {}
        log = out / "sanitizer" / f"{tool}.log"
        if log.exists():
            try:
                text = log.read_text(errors="replace")
            except OSError:
                text = ""
            s = sanitizer_log.summarize(text, res.get("rc"))
            if res.get("status") == "timeout":
                s["verdict"] = "incomplete (stopped by the cap)" if not s["finished"] else s["verdict"]
            summary[tool] = s
        elif res and res.get("status") != "not-selected":
            summary[tool] = {"verdict": res.get("status"), "reason": res.get("reason", "")}
    return summary


def bench_summary(out: Path) -> dict | None:
    doc = _load(out / "bench" / BENCH_JSON)
    if not doc:
        return None
    rows = winners.case_winners(doc)
    auto = (doc.get("auto_cuda") or {}).get("chosen")
    headline = []
    for r in doc.get("results", []):
        if r["op"] == "step" or (r["op"] == "elbo" and r["shape_family"] == "dram"):
            headline.append({k: r.get(k) for k in ("key", "op", "shape", "dtype", "impl", "median_s", "GBps",
                                                   "pct_copy", "speedup_vs_eager", "speedup_vs_compile",
                                                   "peak_bytes", "error")})
    cases = doc.get("cases", [])
    return {
        "path": str(out / "bench" / BENCH_JSON),
        "copy_GBps": (doc.get("copy_bandwidth") or {}).get("GBps"),
        "l2_bytes": (doc.get("machine") or {}).get("l2_bytes"),
        "implementations": doc.get("implementations"),
        "unavailable_backends": doc.get("unavailable_backends"),
        "cases_ok": sum(1 for c in cases if c.get("status") == "ok"),
        "cases_failed": [c for c in cases if c.get("status", "").startswith("failed")],
        "cases_not_run": sum(1 for c in cases if c.get("status", "").startswith("not run")),
        "headline": headline,
        "winners": rows,
        "auto": doc.get("auto_cuda"),
        "rule": winners.family_rule(rows, auto),
    }


# ---------------------------------------------------------------------------
# One line per stage, and the problems
# ---------------------------------------------------------------------------
def stage_line(name: str, res: dict, parts: dict) -> str:
    status = res.get("status")
    if status in ("skipped", "not-run", "not-selected"):
        return res.get("reason", "")
    if name == "install" and parts.get("install"):
        i = parts["install"]
        return f"{i.get('how')}: fastelbo at {i.get('fastelbo')}" if i.get("ok") else first_line(i.get("error"))
    if name == "build" and parts.get("build"):
        b = parts["build"]
        return "; ".join(f"{k} {'built' if (b.get(k) or {}).get('ok') else 'NOT built'} in "
                         f"{(b.get(k) or {}).get('seconds', '?')} s" for k in ("cpu", "cuda"))
    if name.startswith("tests-"):
        path = Path(res.get("log", "")).parent.parent / "tests" / f"shard-{name.split('-')[1]}.jsonl"
        counts: Counter = Counter()
        try:
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "nodeid" in rec and (rec["when"] == "call" or rec["outcome"] != "passed"):
                    counts[rec["outcome"]] += 1
        except OSError:
            return "no results file"
        return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test finished"
    if name in TOOLS and parts.get("sanitizer", {}).get(name):
        s = parts["sanitizer"][name]
        return f"{s['verdict']}: {s.get('errors')} errors, {s.get('fastelbo_reports', 0)} in fastelbo kernels"
    if name == "kernels" and parts.get("kernels"):
        k = parts["kernels"]
        return f"{len(k['expected']) - len(k['missing'])} of {len(k['expected'])} kernels launched" + (
            f"; missing {', '.join(k['missing'])}" if k["missing"] else "")
    if name == "bench" and parts.get("bench"):
        b = parts["bench"]
        return f"{b['cases_ok']} cases timed, {len(b['cases_failed'])} failed, {b['cases_not_run']} not run"
    if name == "versions" and parts.get("versions"):
        g = (parts["versions"].get("gpu") or {})
        return g.get("name") or "no GPU visible to torch"
    if status in ("failed", "timeout"):
        return "log ends: " + last_line(res.get("log"))
    return ""


def last_line(path, limit: int = 200) -> str:
    """The last non-empty line of a log (how a failed stage ended)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "(no log)"
    line = lines[-1] if lines else "(empty log)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def problems(results: dict, parts: dict) -> list[str]:
    out = []
    for name, res in results.items():
        if res.get("status") in ("failed", "timeout", "skipped", "not-run"):
            out.append(f"stage {name}: {res['status']}" + (f" ({res.get('reason')})" if res.get("reason") else ""))
    t = parts.get("tests")
    if t:
        for b, c in t["per_backend"].items():
            if b in ("triton", "cuda") and c.get("skipped", 0) > c.get("passed", 0):
                out.append(f"tests: backend {b} skipped more cases ({c.get('skipped')}) than it passed "
                           f"({c.get('passed', 0)})")
        if t["failures"]:
            out.append(f"tests: {len(t['failures'])} failed")
        if t["not_reached"]:
            out.append(f"tests: {t['not_reached']} of {t['selected']} selected cases not reached")
    for tool, s in (parts.get("sanitizer") or {}).items():
        if "finished" in s and s["verdict"] != "clean":  # from a log (a stage that did not run is listed above)
            out.append(f"{tool}: {s['verdict']} ({s.get('errors')} errors, {s.get('fastelbo_reports')} in fastelbo "
                       "kernels)")
    k = parts.get("kernels")
    if k and k.get("missing"):
        out.append(f"kernels never launched by the sanitizer script: {', '.join(k['missing'])}")
    return out


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def gather(out: Path, results: dict) -> dict:
    parts: dict = {}
    for key, loader in (("install", lambda: _load(out / "install.json")),
                        ("versions", lambda: _load(out / "versions.json")),
                        ("build", lambda: _load(out / "build.json")),
                        ("tests", lambda: tests_summary(out)),
                        ("sanitizer", lambda: sanitizer_summary(out, results)),
                        ("kernels", lambda: _load(out / "sanitizer" / "kernels.json")),
                        ("bench", lambda: bench_summary(out))):
        try:
            parts[key] = loader()
        except Exception as exc:  # a half-written file: say so, keep the rest
            parts[key] = {"error": f"could not read: {type(exc).__name__}: {exc}"}
    return parts


def write(out: Path, groups, results: dict, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = gather(out, results)
    order = [s.name for g in groups for s in g.stages]
    stages = [{"name": n, **results[n], "summary": _safe(stage_line, n, results[n], parts)}
              for n in order if n in results]
    doc = {"schema": SCHEMA, "meta": meta, "stages": stages, "problems": _safe(problems, results, parts) or [],
           **parts}
    _atomic(out / "report.json", json.dumps(doc, indent=1, default=str))
    _atomic(out / "report.md", markdown(doc))


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return f"(could not summarize: {type(exc).__name__}: {exc})"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt_s(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1e6:.1f} us" if v < 1e-3 else f"{v * 1e3:.3f} ms"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    v = doc.get("versions") or {}
    g = v.get("gpu") or {}
    t = v.get("torch") or {}
    pk = v.get("packages") or {}
    lines = ["# fastelbo GPU check", ""]
    if g.get("name"):
        lines.append(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g.get('sms')} SMs, L2 "
                     f"{(g.get('l2_bytes') or 0) >> 20} MiB); torch {t.get('version')} (CUDA {t.get('cuda')}), "
                     f"triton {pk.get('triton')}, Python {v.get('python')}, {meta.get('cores')} cores; "
                     f"commit {(v.get('checkout') or {}).get('commit')}")
    state = "finished" if meta.get("final") else "IN PROGRESS (this report is rewritten after every stage)"
    lines += [f"Started {meta.get('started')}; {meta.get('elapsed_s')} s of a {meta.get('budget_s'):.0f} s budget; "
              f"{state}.", "", "## Stages", "", "| stage | status | s | cap | result |", "|---|---|---|---|---|"]
    for s in doc["stages"]:
        lines.append(f"| {s['name']} | {s.get('status')} | {s.get('seconds', '')} | {s.get('cap_s', '')} | "
                     f"{str(s.get('summary', '')).replace('|', '/')} |")
    probs = doc.get("problems") or []
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in probs] or ["none"])

    tests = doc.get("tests")
    if tests and "error" not in tests:
        lines += ["", "## Tests on CUDA tensors", "",
                  f"{tests['reported']} of {tests['selected']} selected cases reported by {tests['shards']} shards "
                  f"({tests['shards_finished']} finished).", "",
                  "| backend | passed | failed | error | skipped |", "|---|---|---|---|---|"]
        for b, c in tests["per_backend"].items():
            lines.append(f"| {b} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('error', 0)} | "
                         f"{c.get('skipped', 0)} |")
        for f in tests["failures"][:15]:
            lines.append(f"- {f['outcome']}: `{f['nodeid']}`: {f['line']}")
        if len(tests["failures"]) > 15:
            lines.append(f"- ... {len(tests['failures']) - 15} more in report.json")
        if tests["top_skip_reasons"]:
            lines += ["", "Most frequent skip reasons:"] + [f"- {n} x {r}" for r, n in tests["top_skip_reasons"]]

    san = doc.get("sanitizer") or {}
    if san:
        lines += ["", "## compute-sanitizer", "", "| tool | verdict | errors | in fastelbo kernels | elsewhere |",
                  "|---|---|---|---|---|"]
        for tool, s in san.items():
            lines.append(f"| {tool} | {s.get('verdict')} | {s.get('errors', '-')} | {s.get('fastelbo_reports', '-')} "
                         f"| {s.get('other_reports', '-')} |")
        for tool, s in san.items():
            for r in (s.get("first_fastelbo") or [])[:1]:
                lines += ["", f"First {tool} report in a fastelbo kernel:", "```", r[:1500], "```"]
    k = doc.get("kernels")
    if k and "expected" in k:
        lines += ["", "Kernels launched by the sanitizer script (profiler, without the sanitizer): "
                  + ", ".join(f"{n} {c}" for n, c in k["launches_per_kernel"].items())
                  + (f"; NEVER LAUNCHED: {', '.join(k['missing'])}" if k["missing"] else "")]

    b = doc.get("bench")
    if b and "error" not in b:
        lines += ["", "## Benchmarks (fwd+bwd unless named)", "",
                  f"Copy bandwidth {b['copy_GBps'] or 0:.0f} GB/s; L2 {(b.get('l2_bytes') or 0) >> 20} MiB; "
                  f"{b['cases_ok']} cases timed, {len(b['cases_failed'])} failed, {b['cases_not_run']} not run. "
                  "Full table: bench/table.txt; all rows: bench/" + BENCH_JSON + ".", "",
                  "| case | impl | median | GB/s | %copy | vs eager | vs compile | peak |", "|---|---|---|---|---|---|---|---|"]
        for r in b["headline"]:
            if r.get("error"):
                lines.append(f"| {r['key']} | {r['impl']} | failed: {first_line(r['error'], 80)} | | | | | |")
                continue
            peak = r.get("peak_bytes")
            lines.append(f"| {r['key']} | {r['impl']} | {_fmt_s(r.get('median_s'))} | "
                         f"{'-' if r.get('GBps') is None else format(r['GBps'], '.0f')} | "
                         f"{'-' if r.get('pct_copy') is None else format(r['pct_copy'], '.0f')} | "
                         f"{_fmt_x(r.get('speedup_vs_eager'))} | {_fmt_x(r.get('speedup_vs_compile'))} | "
                         f"{'-' if peak is None else f'{peak / 2**20:.1f} MiB'} |")
        auto = b.get("auto") or {}
        lines += ["", "## auto on CUDA: which backend wins", "",
                  f"auto tries {' then '.join(auto.get('order') or [])} today (picked here: {auto.get('chosen')}). "
                  f"Per case: paired per-round time ratio triton/cuda, a tie within {winners.TIE:.0%}; per op family "
                  "the rule of bench/gpucheck/winners.py.", "",
                  "| op | launch-bound | L2-resident | L2-edge | DRAM | measured | action |", "|---|---|---|---|---|---|---|"]
        for f in b["rule"]:
            c = f["classes"]
            lines.append(f"| {f['op']} | {c.get('launch-bound', '-')} | {c.get('L2-resident', '-')} | "
                         f"{c.get('L2-edge', '-')} | {c.get('DRAM', '-')} | {f['measured']} | {f['action']} |")
    return "\n".join(lines) + "\n"
