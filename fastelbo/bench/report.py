"""The result document as a table, a baseline, and the regression compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

BASELINE_SCHEMA = "fastelbo-bench-baseline/1"
METRICS = ("vs_eager", "vs_compile")
DEFAULT_TOLERANCE = 0.15


def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_num(v, spec) -> str:
    return "-" if v is None else format(v, spec)


def header(doc: dict) -> list[str]:
    m = doc["machine"]
    dev = m["device"]
    cpu = f"{m['cpu_model']}, {m['cpu_count']} logical cores, {m['torch_threads']} torch threads, {m['cpu_capability']}"
    if m.get("cpu_id"):
        cpu += f"; {m['cpu_id']}"
    if m.get("cpu_caches"):
        cpu += "; " + " ".join(f"{level} {size}" for level, size in m["cpu_caches"].items())
    lines = [f"fastelbo bench ({doc.get('mode', 'custom')} sweep, {doc.get('created', '')})"]
    if dev == "cuda":
        lines.append(f"device: cuda ({m['device_name']}); host CPU: {cpu}")
    else:
        lines.append(f"device: cpu ({cpu}) -- CPU numbers only, nothing here says anything about GPUs")
    lines.append(f"torch {m['torch']}, python {m['python']}, triton {m.get('triton')}, fastelbo {m['fastelbo']}, "
                 f"{m['platform']}")
    tables = m.get("half_tables")
    if tables is not None:
        lines.append("16-bit Bernoulli tables (looked up where faster than computing, timed at first use): "
                     + "; ".join(f"{dt} {', '.join(fns) or 'none'}" for dt, fns in tables.items()))
    cb = doc.get("copy_bandwidth")
    if cb:
        curve = ", ".join(f"{fmt_bytes(c['bytes_per_tensor'])} {c['GBps']:.1f}" for c in cb["curve"])
        lines.append(f"copy bandwidth: {cb['GBps']:.1f} GB/s at {fmt_bytes(cb['bytes_per_tensor'])} per tensor "
                     f"(dst.copy_(src), read+write; by size: {curve} GB/s)")
    others = doc.get("others_cpu_fraction")
    load = m.get("load_avg")
    if others is not None or load:
        busy = others is not None and others > 0.10
        lines.append(("WARNING, machine busy: " if busy else "")
                     + (f"other processes used {100 * others:.0f}% of the CPUs during the run" if others is not None
                        else "")
                     + (f"; load average before it {load[0]:.2f}" if load else "")
                     + (" -- times are unreliable, ratios less so (interleaved rounds)" if busy else ""))
    skipped = doc.get("unavailable_backends") or {}
    if skipped:
        lines.append("not run: " + "; ".join(f"backend {b}: {why}" for b, why in skipped.items()))
    t = doc.get("timing", {})
    lines.append(f"timing: median of up to {t.get('rounds')} interleaved rounds of >= {t.get('min_round_s')} s after "
                 "warm-up; speedup = median of per-round ratios; GB/s from the minimum-bytes model "
                 "(fastelbo.bench.cases.bytes_model); %copy vs the copy of the nearest size; saved = kept for "
                 "backward beyond the inputs; peak = allocated during one call; busy = share of the CPUs other "
                 f"processes used while the case was timed, shown above {100 * BUSY:.0f}% (row not trustworthy)")
    return lines


COLUMNS = ("op", "pass", "shape", "dtype", "impl", "median", "vs eager", "vs compile", "GB/s", "%copy", "saved",
           "peak", "busy")
BUSY = 0.10  # other processes' share of the CPUs above which a row is flagged


def fmt_busy(v) -> str:
    return f"{100 * v:.0f}%!" if v is not None and v > BUSY else ""


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["op"], r["pass"], r["shape"], r["dtype"], r["impl"], "failed", "", "", "", "", "", "", ""))
            continue
        rows.append((r["op"], r["pass"], r["shape"], r["dtype"], r["impl"], fmt_time(r["median_s"]),
                     fmt_x(r.get("speedup_vs_eager")), fmt_x(r.get("speedup_vs_compile")),
                     fmt_num(r.get("GBps"), ".1f"), fmt_num(r.get("pct_copy"), ".0f"),
                     fmt_bytes(r.get("saved_bytes")), fmt_bytes(r.get("peak_bytes")),
                     fmt_busy(r.get("others_cpu_fraction"))))
    return rows


def _align(rows: list[tuple[str, ...]], right_from: int) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def format_table(doc: dict) -> str:
    lines = header(doc) + [""]
    body = table_rows(doc["results"])
    if body:
        aligned = _align([COLUMNS] + body, right_from=5)
        lines += [aligned[0], "-" * len(aligned[0])]
        prev = None
        for row, text in zip(body, aligned[1:]):
            if prev is not None and row[:4] != prev:
                lines.append("")
            prev = row[:4]
            lines.append(text)
    failed = [r for r in doc["results"] if "error" in r]
    for r in failed:
        first = r["error"].strip().splitlines()[0] if r["error"].strip() else ""
        lines.append(f"failed: {r['key']} {r['impl']}: {first[:160]}")
    if doc.get("overhead"):
        lines += ["", format_overhead(doc["overhead"])]
    return "\n".join(lines)


def format_overhead(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"per-call overhead, forward without grad, {r0['shape']} {r0['dtype']}, backend {r0['backend']} "
             f"(one ATen op, torch.neg(x), from Python: {fmt_time(r0['aten_s'])})",
             "  api = fastelbo.<fn>(...); op = torch.ops.fastelbo.<op>(...); raw = "
             "op.default.redispatch(<device key>) (boxed call + kernel)"]
    table = [("op", "api", "torch.ops", "raw kernel", "python layer", "autograd+dispatch")]
    for r in rows:
        table.append((r["op"], fmt_time(r["api_s"]), fmt_time(r["op_s"]), fmt_time(r["raw_s"]),
                      fmt_time(r["python_layer_s"]), fmt_time(r["dispatch_autograd_s"])))
    lines += _align(table, right_from=1)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# JSON, baseline, compare
# ---------------------------------------------------------------------------
def write_json(doc: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def merge_runs(docs: list[dict], how: str = "median") -> dict:
    """The first run's document with each of its ratios replaced by the median (how="median") or the lowest
    (how="min") over the runs that measured it (cases only the other runs measured are left out).

    A baseline takes the lowest: the floor that every quiet run reached. Against eager a ratio can swing
    3x between quiet runs on CPU (the baseline's own temporaries land on fresh pages or not, with glibc's
    heap state), and a median baseline then fails healthy runs."""
    import statistics

    if how not in ("median", "min"):
        raise ValueError(f"how must be 'median' or 'min', got {how!r}")
    reduce = statistics.median if how == "median" else min

    merged = dict(docs[0])
    ratios: dict = {}
    for d in docs:
        for key, metrics in d.get("ratios", {}).items():
            if key not in docs[0].get("ratios", {}):
                continue
            for metric, value in metrics.items():
                ratios.setdefault(key, {}).setdefault(metric, []).append(value)
    merged["ratios"] = {k: {m: float(reduce(v)) for m, v in ms.items()} for k, ms in ratios.items()}
    merged["merged_from"] = [d.get("created") for d in docs]
    merged["others_cpu_fraction"] = max((d.get("others_cpu_fraction") or 0.0) for d in docs)
    return merged


def baseline_doc(doc: dict, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The compact committed baseline: speedup ratios per case plus the machine they were measured on."""
    medians = {}
    for r in doc["results"]:
        if "median_s" in r:
            medians.setdefault(r["key"], {})[r["impl"]] = r["median_s"]
    return {"schema": BASELINE_SCHEMA, "created": doc.get("created"), "mode": doc.get("mode"),
            "machine": doc["machine"], "copy_GBps": doc.get("copy_bandwidth", {}).get("GBps"),
            "others_cpu_fraction": doc.get("others_cpu_fraction"),
            "tolerance": tolerance,
            "note": "ratios = fastelbo time vs eager / torch.compile time of the reference, measured in one run; "
                    "medians_s are informational only (compare uses the ratios)",
            "merged_from": doc.get("merged_from"), "ratios": doc["ratios"], "medians_s": medians}


def compare(current: dict, baseline: dict, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """Each speedup ratio of the baseline against this run's.

    A ratio regresses when current < baseline * (1 - tolerance). Cases of the
    baseline not measured in this run are listed as missing (not a failure);
    new cases are ignored. Returns {'ok', 'rows', 'notes'}."""
    cur, base = current.get("ratios", {}), baseline.get("ratios", {})
    rows, notes = [], []
    for key in sorted(base):
        for metric in METRICS:  # ("busy" entries are context, not ratios)
            b = base[key].get(metric)
            if b is None:
                continue
            c = cur.get(key, {}).get(metric)
            if c is None:
                rows.append({"key": key, "metric": metric, "baseline": b, "current": None, "change": None,
                             "status": "missing"})
                continue
            change = c / b - 1.0
            status = "REGRESSION" if c < b * (1.0 - tolerance) else ("improved" if change > tolerance else "ok")
            entry = cur[key]
            busy = entry.get(f"busy_{metric}", entry.get("busy"))
            rows.append({"key": key, "metric": metric, "baseline": b, "current": c, "change": change,
                         "status": status, "busy": busy})
    mb, mc = baseline.get("machine", {}), current.get("machine", {})
    for field in ("device", "device_name", "cpu_count", "torch_threads", "cpu_capability", "torch"):
        if mb.get(field) != mc.get(field):
            notes.append(f"machine differs from the baseline's: {field} {mb.get(field)!r} -> {mc.get(field)!r} "
                         "(ratios are still compared)")
    # Ratios survive load and clock speed, not a change of CPU generation: say so where the run cannot
    # tell whether the CPU is the baseline's.
    if mb.get("device") == "cpu" and mc.get("cpu_id"):
        if not mb.get("cpu_id"):
            notes.append("the baseline does not record its CPU model (cpu_id); ratios hold for one CPU model, so "
                         "a failure may mean a different CPU: record the baseline on this runner")
        elif mb["cpu_id"] != mc["cpu_id"]:
            notes.append(f"CPU model differs from the baseline's: {mb['cpu_id']!r} -> {mc['cpu_id']!r}; ratios hold "
                         "for one CPU model, so a failure may mean the CPU, not fastelbo: record the baseline on "
                         "this runner")
    others = current.get("others_cpu_fraction")
    if others is not None and others > 0.10:
        notes.append(f"WARNING: other processes used {100 * others:.0f}% of the CPUs during this run; ratios measured "
                     "on a busy machine drift (eager, with more kernels and thread barriers, suffers most)")
    compared = [r for r in rows if r["status"] != "missing"]
    if not compared:
        notes.append("no ratio of the baseline was measured in this run")
    ok = all(r["status"] != "REGRESSION" for r in rows)
    remeasured = max((r["attempt"] for r in current.get("retries", [])), default=0)
    return {"ok": ok, "remeasured": remeasured, "tolerance": tolerance, "rows": rows, "notes": notes,
            "regressions": sum(r["status"] == "REGRESSION" for r in rows), "compared": len(compared)}


def format_compare(result: dict) -> str:
    table = [("case/backend", "ratio", "baseline", "current", "change", "status", "busy")]
    missing = [r for r in result["rows"] if r["status"] == "missing"]
    within = [r for r in result["rows"] if r["status"] == "ok"]
    for r in result["rows"]:
        if r["status"] in ("missing", "ok"):
            continue
        table.append((r["key"], r["metric"], f"{r['baseline']:.2f}x",
                      "-" if r["current"] is None else f"{r['current']:.2f}x",
                      "-" if r["change"] is None else f"{100 * r['change']:+.0f}%", r["status"],
                      fmt_busy(r.get("busy"))))
    lines = [f"compare against baseline (fail when a ratio falls more than {100 * result['tolerance']:.0f}% below it)"]
    lines += _align(table, right_from=2) if len(table) > 1 else []
    lines.append(f"{len(within)} ratio(s) within {100 * result['tolerance']:.0f}% of the baseline (not listed)")
    if missing:
        lines.append(f"{len(missing)} baseline ratio(s) of {len({r['key'] for r in missing})} case(s) were not "
                     "measured in this run (not a failure)")
    lines += result["notes"]
    busy = [r for r in result["rows"] if r["status"] == "REGRESSION" and r.get("busy") is not None
            and r["busy"] > BUSY]
    if busy:
        lines.append(f"{len(busy)} of the regressions were measured while other processes used more than "
                     f"{100 * BUSY:.0f}% of the CPUs (busy column): re-run on a quiet machine to confirm them")
    if result.get("remeasured"):
        lines.append(f"ratios that regressed were re-measured {result['remeasured']} time(s); each keeps its best")
    verdict = "PASS" if result["ok"] else "FAIL"
    lines.append(f"{verdict}: {result['regressions']} regression(s) among {result['compared']} ratios compared")
    return "\n".join(lines)


__all__ = ["format_table", "format_overhead", "format_compare", "compare", "baseline_doc", "merge_runs", "write_json",
           "load_json", "fmt_time", "fmt_bytes", "BASELINE_SCHEMA", "DEFAULT_TOLERANCE"]
