"""A/B timing of two builds on the same machine in the same run (``fastelbo
bench --against REV``): no baseline file, no CPU-model match.

Each side runs in its own worker process (ab_sides, ab_worker), with OpenMP's
threads pinned alike in both (pinning_env). Per case the parent prepares both
(inputs, warm-up) and calibrates both (the same history of calls), fixes the
calls per round from side A's fastest call (a round lasts at least
min_round_s), then runs ABBA blocks. Each block after the
first starts with fresh inputs on both sides (their placement in memory moves
a tiny case by up to 10%); a round is one untimed call, then `iters` calls
timed one by one in one worker while the other waits, and the round's figure
is its fastest call (statistic="min") or its mean per call ("mean"). The
verdict per case comes from ab_stats (Wilcoxon signed-rank test on the paired
log-ratios, family-wise confidence over the cases); a slower or faster verdict
is measured again in B A A B order and stands only if that agrees. The run
fails only for a case that is significantly slower *and* whose ratio exceeds
1 + threshold, in both measurements.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import sys

from . import ab_stats as S
from .ab_sides import Side, SideError, WorkerProcess, call_both

SCHEMA = "fastelbo-ab/1"
DEFAULT_THRESHOLD = 0.10
DEFAULT_PAIRS = 30
DEFAULT_MIN_ROUND_S = 0.01
DEFAULT_ALPHA = 0.05
# What a round contributes: its fastest call ("min") or its mean per call ("mean"). Interference only
# adds time, and on a shared 2-core machine it comes in scheduler slices: a 2-thread kernel whose
# thread is descheduled waits a slice (4-8 ms) at its barrier. Measured: a self-A/B of the quick
# subset with "mean" failed one run of two (a case at 1.99x, p = 0.0001) while one process kept
# landing on a busy core; the fastest call of a 10 ms round usually ran between two slices.
STATISTICS = ("min", "mean")
DEFAULT_STATISTIC = "min"


def case_items(case_list, backend: str, device: str = "cpu") -> list[dict]:
    """fastelbo's bench cases as A/B items (one fastelbo backend per item)."""
    return [{"key": f"{c.key}/{backend}", "prepare": {"case": c.key, "backend": backend, "device": device}}
            for c in case_list]


def workload_items(names: list[str]) -> list[dict]:
    return [{"key": n, "prepare": {"name": n}} for n in names]


def run_ab(a: Side, b: Side, items: list[dict], *, pairs: int = DEFAULT_PAIRS, min_round_s: float = DEFAULT_MIN_ROUND_S,
           threshold: float = DEFAULT_THRESHOLD, alpha: float = DEFAULT_ALPHA,
           resolution: float = S.DEFAULT_RESOLUTION,
           statistic: str = DEFAULT_STATISTIC, threads=None, workload=None,
           progress: bool = True, stream=None, log_dir=None) -> dict:
    """Times every item under both sides in alternating rounds; returns the result document."""
    from . import measure as M
    from .._progress import Progress

    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    pairs = max(2, pairs + (pairs % 2))  # whole ABBA blocks
    alpha_case = alpha / max(len(items), 1)
    machine = {"cpu_model": M.cpu_model(), "cpu_id": M.cpu_id(), "cpu_count": os.cpu_count(),
               "load_avg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    env = {**pinning_env(), "PYTHONHASHSEED": "0"}  # one seed: the same dict layouts and allocations in both
    workers = [WorkerProcess(s, threads=threads, workload=workload, log_dir=log_dir, env=env) for s in (a, b)]
    rng = random.Random(20261207)  # the spacers before each block's fresh inputs
    rows, sides = [], []
    bar = Progress(len(items), stream) if progress else None
    try:
        if progress:
            print("starting both sides (imports; the kernel build of a revision not seen before: minutes)",
                  file=stream or sys.stderr, flush=True)
        hello = call_both(workers, lambda i: {"cmd": "hello"})
        for side, h, w in zip((a, b), hello, workers):
            if not h["ok"]:
                raise SideError(f"side {side.label} ({side.description}) cannot import fastelbo: {h['error']}\n"
                                f"{w.log_tail()}")
            sides.append({**side.info(), **{k: h[k] for k in ("fastelbo_file", "kernels_file", "torch", "python",
                                                               "threads", "cpu_capability", "version")}})
        watch = M.Interference()
        for n, item in enumerate(items):
            if bar:
                bar.step(item["key"])
            rows.append(_run_item(workers, n, item, pairs, min_round_s, alpha_case, threshold, resolution,
                                  statistic, rng))
        others = watch.others_fraction()
        if bar:
            bar.close()
    finally:
        for w in workers:
            w.close()
    machine["load_avg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["others_cpu_fraction"] = others
    compared = [r for r in rows if "verdict" in r]
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "sides": sides,
        "method": {"test": S.TEST_NAME, "pairs": pairs, "min_round_s": min_round_s, "alpha": alpha,
                   "statistic": statistic, "fresh_inputs_per_block": True, "thread_pinning": env,
                   "replication": "a slower or faster verdict is measured again in B A A B order and stands only "
                                  "if the replicate agrees",
                   "confidence_per_case": 1.0 - alpha_case, "threshold": threshold, "resolution": resolution,
                   "fail_when": f"verdict slower (CI above 1) and ratio B/A > {1 + threshold:.2f}"},
        "rows": rows,
        "summary": {v: sum(r.get("verdict") == v for r in rows) for v in ("slower", "faster", "no difference")},
        "errors": sum("error" in r for r in rows),
        "failures": sum(bool(r.get("fail")) for r in compared),
        "ok": not any(r.get("fail") for r in compared),
    }


def pinning_env() -> dict:
    """OpenMP thread i of both workers on the same CPU (OMP_PLACES={c0},{c1},...): a busy core then
    slows the same thread of A and B. Unpinned, the scheduler kept one worker's thread on a core
    another process was using for seconds, and a self-A/B read that as a 2-10x difference. Left
    alone where the caller set OpenMP's placement."""
    if any(k in os.environ for k in ("OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY")):
        return {}
    if not hasattr(os, "sched_getaffinity"):
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    return {"OMP_PLACES": ",".join(f"{{{c}}}" for c in cpus), "OMP_PROC_BIND": "close"}


class _Failed(Exception):
    """A worker reported an error for the case; the message names the side."""


def _both(workers, msg_for) -> list:
    replies = call_both(workers, msg_for)
    bad = [f"{'AB'[i]}: {r['error']}" for i, r in enumerate(replies) if not r["ok"]]
    if bad:
        raise _Failed("; ".join(bad))
    return replies


def _run_item(workers, n, item, pairs, min_round_s, alpha_case, threshold, resolution, statistic, rng) -> dict:
    row = {"key": item["key"]}
    try:
        _both(workers, lambda i: {"cmd": "prepare", "id": n, **item["prepare"]})
        # Both sides calibrate, so both run the same calls before timing (an allocator's state follows its
        # history: a self-A/B where A alone calibrated read free_bits at 4096x784x64 as 22% apart).
        iters = _both(workers, lambda i: {"cmd": "calibrate", "id": n, "min_round_s": min_round_s})[0]["iters"]
        times = _measure(workers, n, iters, pairs, rng, (0, 1, 1, 0))
        result = S.compare_pairs(times[0][f"{statistic}_s"], times[1][f"{statistic}_s"], alpha_case, threshold, resolution)
        if result["verdict"] != "no difference":
            # A verdict must replicate, measured again with the order reversed (B A A B): one worker
            # stuck for seconds behind other programs (its fastest call 18 ms for a 0.4 ms kernel,
            # the other's 0.5 ms) is a state of the machine, a slower build stays slower.
            again = _measure(workers, n, iters, pairs, rng, (1, 0, 0, 1))
            rep = S.compare_pairs(again[0][f"{statistic}_s"], again[1][f"{statistic}_s"], alpha_case, threshold, resolution)
            result["replicate"] = {k: rep[k] for k in ("ratio", "ci", "p", "verdict", "fail")}
            if rep["verdict"] != result["verdict"]:
                result.update(verdict="no difference", fail=False, not_replicated=True)
            else:
                result["fail"] = result["fail"] and rep["fail"]
    except _Failed as exc:
        row["error"] = str(exc)
        call_both(workers, lambda i: {"cmd": "drop", "id": n})
        return row
    call_both(workers, lambda i: {"cmd": "drop", "id": n})
    row.update(result)
    row.update({"iters": iters, "a_rounds_s": times[0][f"{statistic}_s"], "b_rounds_s": times[1][f"{statistic}_s"],
                "a_round_means_s": times[0]["mean_s"], "b_round_means_s": times[1]["mean_s"],
                "a_round_mins_s": times[0]["min_s"], "b_round_mins_s": times[1]["min_s"]})
    return row


def _measure(workers, n, iters, pairs, rng, order) -> tuple:
    """Per side {'min_s': [...], 'mean_s': [...]} of pairs // 2 blocks of rounds in `order`, each block
    after the first on fresh inputs."""
    times = ({"min_s": [], "mean_s": []}, {"min_s": [], "mean_s": []})
    for block in range(pairs // 2):
        if block:
            spacer = 64 * rng.randrange(64)
            _both(workers, lambda i: {"cmd": "reinput", "id": n, "spacer": spacer})
        for side in order:
            r = workers[side].call({"cmd": "time", "id": n, "iters": iters})
            if not r["ok"]:
                raise _Failed(f"{'AB'[side]}: {r['error']}")
            for k in ("min_s", "mean_s"):
                times[side][k].append(r[k])
    return times


def _fmt_t(s) -> str:
    from .report import fmt_time

    return "-" if s is None else fmt_time(s)


def format_ab(doc: dict) -> str:
    from .report import _align

    m, meth = doc["machine"], doc["method"]
    lines = []
    for s in doc["sides"]:
        lines.append(f"side {s['label']} ({'baseline' if s['label'] == 'A' else 'candidate'}): {s['description']}")
    load = m.get("load_avg_before")
    lines.append(f"machine: {m['cpu_model']} ({m['cpu_id']}), {m['cpu_count']} cores, torch threads "
                 f"{doc['sides'][0]['threads'] if doc['sides'] else '?'}, load average before "
                 + (" ".join(f"{x:.2f}" for x in load) if load else "?")
                 + (f", other processes {100 * m['others_cpu_fraction']:.0f}% of the CPUs while timing"
                    if m.get("others_cpu_fraction") is not None else ""))
    lines.append(f"test: {meth['test']}; {meth['pairs']} pairs per case, rounds >= {1e3 * meth['min_round_s']:.0f} ms, "
                 f"each round's {'fastest call' if meth['statistic'] == 'min' else 'mean per call'}; "
                 f"{100 * (1 - meth['alpha']):.0f}% family-wise confidence ({100 * meth['confidence_per_case']:.2f}% "
                 f"per case, Bonferroni over {len(doc['rows'])} cases); a significant change under "
                 f"{100 * meth['resolution']:.0f}% counts as no difference")
    table = [("case", "A", "B", "B/A", "CI", "p", "verdict")]
    for r in doc["rows"]:
        if "error" in r:
            table.append((r["key"], "-", "-", "-", "-", "-", "ERROR"))
            continue
        lo, hi = r["ci"]
        verdict = r["verdict"] + (f" > {100 * meth['threshold']:.0f}%: FAIL" if r["fail"] else "")
        if r.get("not_replicated"):
            verdict += f" (first {r['ratio']:.3f} significant, not replicated: {r['replicate']['ratio']:.3f})"
        elif r["verdict"] == "no difference" and r.get("significant"):
            verdict += f" (significant, within {100 * meth['resolution']:.0f}%)"
        table.append((r["key"], _fmt_t(r["a_median_s"]), _fmt_t(r["b_median_s"]), f"{r['ratio']:.3f}",
                      f"[{lo:.3f}, {hi:.3f}]", f"{r['p']:.1g}", verdict))
    lines += _align(table, right_from=1)
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"ERROR {r['key']}: {r['error'][:500]}")
    s = doc["summary"]
    verdict = "FAIL" if not doc["ok"] else "PASS"
    lines.append(f"{verdict}: {doc['failures']} case(s) significantly slower by more than "
                 f"{100 * meth['threshold']:.0f}%; {s['slower']} slower, {s['faster']} faster, "
                 f"{s['no difference']} no difference" + (f", {doc['errors']} not compared (error)"
                                                           if doc["errors"] else ""))
    return "\n".join(lines)


def exit_status(doc: dict) -> int:
    """1: a significant slowdown above the threshold; 2: a case could not be compared; else 0."""
    if not doc["ok"]:
        return 1
    return 2 if doc["errors"] else 0


__all__ = ["run_ab", "format_ab", "exit_status", "case_items", "workload_items", "SCHEMA", "DEFAULT_THRESHOLD",
           "DEFAULT_PAIRS", "DEFAULT_MIN_ROUND_S", "DEFAULT_ALPHA", "DEFAULT_STATISTIC", "STATISTICS"]
