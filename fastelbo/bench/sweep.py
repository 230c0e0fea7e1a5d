"""The sweep behind ``fastelbo bench``: every case under every implementation,
timed (interleaved rounds), with bytes model, copy bandwidth and memory; the
result is one JSON-able dict (see report.py for its table, plot and compare)."""

from __future__ import annotations

import datetime as _dt
import sys
import time

import torch

from . import cases as C
from . import measure as M

from .._progress import Progress  # noqa: F401  (re-exported: fastelbo bench draws it)

SCHEMA = "fastelbo-bench/1"

# (rounds, min seconds per round, max seconds of timing per case)
QUICK_TIMING = (11, 0.004, 2.0)
FULL_TIMING = (15, 0.01, 6.0)


def run_case(case: C.Case, impls: list[str], device="cpu", rounds=QUICK_TIMING[0], min_round_s=QUICK_TIMING[1],
             budget_s=QUICK_TIMING[2], memory: bool = True, copy_curve=None) -> list[dict]:
    """All implementations of one case; one result dict per implementation."""
    t = C.make_inputs(case, device)
    bm = C.bytes_model(case.op, case.shape, case.pass_, case.itemsize)
    ref = M.copy_ref(copy_curve, bm["bytes"]) if copy_curve else None
    built, compile_s, errors = {}, {}, {}
    for impl in impls:
        for attempt in range(2 if impl == "compile" else 1):  # one retry: Inductor's cache can race other processes
            try:
                if impl == "compile":
                    torch._dynamo.reset()  # a fresh compile per case, nothing accumulates
                forward, timed = C.build(case, impl, t)
                first = M.warm_up(timed, 3, device)
                built[impl] = (forward, timed)
                errors.pop(impl, None)
                if impl == "compile":
                    compile_s[impl] = first
                break
            except Exception as exc:  # an implementation that fails here is reported, not fatal
                errors[impl] = f"{type(exc).__name__}: {str(exc).strip()[:2000]}"
    watch = M.Interference()
    times = M.time_interleaved({k: v[1] for k, v in built.items()}, rounds, min_round_s, device, budget_s)
    others = watch.others_fraction()
    inputs = [v for k, v in t.items() if not k.startswith("grad:")]
    rows = []
    for impl in impls:
        row = {"key": case.key, "op": case.op, "pass": case.pass_, "shape": case.shape.id,
               "shape_family": case.shape.family, "B": case.shape.B, "Dx": case.shape.Dx, "Dz": case.shape.Dz,
               "dtype": case.dtype, "impl": impl, "min_bytes": bm["bytes"], "bytes_model": bm,
               "others_cpu_fraction": others}
        if impl in errors:
            row["error"] = errors[impl]
            rows.append(row)
            continue
        r = times[impl]["rounds_s"]
        med = M.median(r)
        row.update({"median_s": med, "min_s": min(r), "rounds_s": r, "iters": times[impl]["iters"], "GBps": bm["bytes"] / med / 1e9})
        if ref:
            row["copy_GBps"] = ref["GBps"]
            row["copy_bytes_per_tensor"] = ref["bytes_per_tensor"]
            row["pct_copy"] = 100.0 * row["GBps"] / ref["GBps"]
            row["bound_s"] = bm["bytes"] / (ref["GBps"] * 1e9)
        for base in C.BASELINES:
            if base in times and base != impl:
                row[f"speedup_vs_{base}"] = M.paired_speedup(times[base]["rounds_s"], r)
            elif base == impl:
                row[f"speedup_vs_{base}"] = 1.0
        if impl in compile_s:
            row["compile_s"] = compile_s[impl]
        if memory:
            forward, timed = built[impl]
            row["saved_bytes"] = M.saved_for_backward(forward, inputs) if case.pass_ == "fwd+bwd" else None
            row["peak_bytes"] = M.peak_bytes(timed, device)
        rows.append(row)
    built.clear()
    if "compile" in impls:
        torch._dynamo.reset()
    return rows


def ratios_of(results: list[dict]) -> dict:
    """{case key/backend: {'vs_eager': x, 'vs_compile': y}} for the fastelbo implementations."""
    out = {}
    for row in results:
        if not row["impl"].startswith(C.FASTELBO_PREFIX) or "median_s" not in row:
            continue
        key = f"{row['key']}/{row['impl'][len(C.FASTELBO_PREFIX):]}"
        out[key] = {m: row[f"speedup_{m}"] for m in ("vs_eager", "vs_compile") if f"speedup_{m}" in row}
        if row.get("others_cpu_fraction") is not None:
            out[key]["busy"] = row["others_cpu_fraction"]  # other processes' CPU share while it was timed
    return out


def run_sweep(case_list: list[C.Case], device="cpu", impls: list[str] | None = None, timing=QUICK_TIMING,
              memory: bool = True, overhead: bool = True, mode: str = "custom", progress: bool = True,
              stream=None) -> dict:
    """Runs the cases; returns the result document (schema fastelbo-bench/1)."""
    device = torch.device(device)
    C.raise_compile_limits()
    available, skipped = C.impl_names(device.type)
    if impls is not None:
        unknown = [i for i in impls if i not in available and i[len(C.FASTELBO_PREFIX):] not in skipped]
        if unknown:
            raise ValueError(f"unknown implementation(s) {unknown}; this device has {available}")
        impls = [i for i in available if i in impls]
    else:
        impls = available
    rounds, min_round_s, budget_s = timing
    do_overhead = overhead and any(c.shape == C.TINY for c in case_list)
    fastelbo_backends = [i[len(C.FASTELBO_PREFIX):] for i in impls if i.startswith(C.FASTELBO_PREFIX)]
    bar = Progress(len(case_list) + 1 + (len(fastelbo_backends) if do_overhead else 0), stream) if progress else None

    machine = M.machine_info(device)  # load average before this run adds its own
    watch = M.Interference()
    if bar:
        bar.step("copy bandwidth")
    curve = M.copy_bandwidth(device)
    results = []
    for case in case_list:
        if bar:
            bar.step(f"{case.op} {case.pass_} {case.shape.id} {case.dtype}")
        results.extend(run_case(case, impls, device, rounds, min_round_s, budget_s, memory, curve))
    overhead_rows = []
    if do_overhead:
        for b in fastelbo_backends:
            if bar:
                bar.step(f"per-call overhead, backend {b}")
            dtype = next(c.dtype for c in case_list if c.shape == C.TINY)
            overhead_rows.extend(M.overhead_layers(C.TINY, dtype, device, b))
    if bar:
        bar.close()
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "machine": machine,
        "others_cpu_fraction": watch.others_fraction(),
        "implementations": impls,
        "unavailable_backends": skipped,
        "timing": {"rounds": rounds, "min_round_s": min_round_s, "budget_s_per_case": budget_s,
                   "method": "median of interleaved rounds; speedup = median of paired per-round ratios"},
        "copy_bandwidth": {"GBps": curve[-1]["GBps"], "bytes_per_tensor": curve[-1]["bytes_per_tensor"],
                           "curve": curve, "method": "dst.copy_(src), float32, bytes = 2 x size"},
        "results": results,
        "ratios": ratios_of(results),
        "overhead": overhead_rows,
    }


__all__ = ["run_sweep", "run_case", "ratios_of", "Progress", "QUICK_TIMING", "FULL_TIMING", "SCHEMA"]
