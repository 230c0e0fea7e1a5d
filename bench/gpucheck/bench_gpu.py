"""Bench stage: fastelbo bench's cases on the GPU, most important first,
the results saved after every case.

The cases and the measurement are fastelbo.bench's (cases.Case, sweep.run_case:
eager fastelbo.reference and torch.compile of it against every available
fastelbo backend, interleaved rounds synchronized on the device, the
minimum-bytes model, peak memory from torch.cuda.max_memory_allocated, the
copy bandwidth of the same run); the document has fastelbo bench's schema,
so `fastelbo bench --from-json fastelbo-bench-gpu.json` prints its table and
plot. One process runs the cases in the order of PLAN and stops starting new
ones when the next would not fit its budget: a case that hangs costs the
cases after it, never the ones before.

The L2 cache. An H100 keeps 50 MB in L2; float32 x and recon at the target
shape (4096 x 784: 25.7 MB) fit, so timing rounds that call the op back to
back read its inputs from L2, not from DRAM. The bandwidth figures therefore
come from shapes whose minimum traffic is at least 5x L2 ("DRAM" class:
B = 65536; the latent-only ops at Dz = 512), and the target shape is timed
too, marked L2-resident (winners.shape_class), as are the launch-bound tiny
shape and long rows. Nothing is flushed between calls: no shape of the DRAM
class fits the cache, whatever the order of calls.

    python -m gpucheck.bench_gpu --out DIR --budget-s 130
    python -m gpucheck.bench_gpu --out DIR --device cpu     the stage's code on two tiny CPU cases (no GPU)
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import time
from pathlib import Path

import torch

from gpucheck.build_marks import mark_failed_builds

JSON_NAME = "fastelbo-bench-gpu.json"
PNG_NAME = "fastelbo-bench-gpu.png"
END_RESERVE_S = 8.0  # the table, the plot and the last write
FIRST_GUESS_S = 12.0  # a case's seconds before one was timed (torch.compile of it included)


class Stop(Exception):
    """SIGTERM from the runner: write what there is and leave."""


def shapes():
    from fastelbo.bench import cases as C

    return {
        "dram": C.Shape("dram", 65536, 784, 64),  # x + recon: 411 MB in float32
        "dram-latent": C.Shape("dram-latent", 65536, 784, 512),  # mu + logvar: 268 MB in float32
        "target": C.TARGET,  # 4096x784x64: L2-resident on an H100
        "tiny": C.TINY,  # launch-bound
        "long-rows": next(s for s in C.FULL_SHAPES if s.family == "large-rows"),  # 64 rows of 196608
    }


LATENT_OPS = ("rsample", "kl", "free_bits")
ROW_OPS = ("elbo", "bernoulli", "gaussian", "iwae")


def plan() -> list:
    """The cases, most important first."""
    from fastelbo.bench import cases as C

    s = shapes()
    fb = "fwd+bwd"
    out = [C.Case("step", fb, s["dram"], "float32"), C.Case("step", fb, s["target"], "float32")]
    out += [C.Case(op, fb, s["dram"], "float32") for op in ROW_OPS]
    out += [C.Case(op, fb, s["dram-latent"], "float32") for op in LATENT_OPS]
    # the image-shaped step and a hierarchical layer's KL between two learned Gaussians
    out += [C.Case("step-nd", fb, s["target"], "float32"), C.Case("kl-learned", fb, s["dram-latent"], "float32")]
    out += [C.Case("step", fb, s["tiny"], "float32"), C.Case("step", fb, s["long-rows"], "float32"),
            C.Case("elbo", fb, s["long-rows"], "float32")]
    out += [C.Case("step", fb, s["dram"], "bfloat16"), C.Case("step", fb, s["target"], "bfloat16")]
    out += [C.Case(op, fb, s["target"], "float32") for op in ROW_OPS + LATENT_OPS]
    out += [C.Case(op, fb, s["tiny"], "float32") for op in ROW_OPS + LATENT_OPS]
    out += [C.Case(op, "fwd", s["dram"], "float32") for op in ROW_OPS]
    out += [C.Case(op, "fwd", s["dram-latent"], "float32") for op in LATENT_OPS]
    return out


def self_test_plan() -> list:
    """Two launch-bound cases, for running this stage's code on the CPU (--device cpu): no GPU figure."""
    from fastelbo.bench import cases as C

    return [C.Case("step", "fwd+bwd", C.TINY, "float32"), C.Case("kl", "fwd", C.TINY, "float32")]


def machine(device) -> dict:
    from fastelbo.bench import measure as M

    info = M.machine_info(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "gpu_memory_bytes": p.total_memory, "l2_bytes": getattr(p, "L2_cache_size", None)})
    return info


def _auto() -> dict:
    from fastelbo import _backend

    chosen = None
    try:
        if torch.cuda.is_available():
            chosen = _backend.resolve("auto", "cuda")
    except Exception as exc:
        chosen = f"error: {exc}"
    return {"order": list(_backend._BY_DEVICE.get("cuda", ())), "chosen": chosen}


def run(out: Path, budget_s: float, device: str = "cuda") -> int:
    from fastelbo.bench import cases as C
    from fastelbo.bench import measure as M
    from fastelbo.bench import plot, report, sweep

    start = time.monotonic()
    deadline = start + budget_s - END_RESERVE_S

    def on_term(signum, frame):
        raise Stop()

    signal.signal(signal.SIGTERM, on_term)
    out.mkdir(parents=True, exist_ok=True)
    mark_failed_builds()
    device = torch.device(device)
    todo = plan() if device.type == "cuda" else self_test_plan()
    C.raise_compile_limits()
    impls, skipped = C.impl_names(device.type)
    rounds, min_round_s, case_budget_s = sweep.QUICK_TIMING
    watch = M.Interference()
    doc = {
        "schema": sweep.SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": "gpu-check",
        "machine": machine(device), "implementations": impls, "unavailable_backends": skipped,
        "timing": {"rounds": rounds, "min_round_s": min_round_s, "budget_s_per_case": case_budget_s,
                   "method": "median of interleaved rounds, each synchronized on the device; speedup = median of "
                             "paired per-round ratios"},
        "results": [], "ratios": {}, "overhead": [], "auto_cuda": _auto(),
        "l2_note": "bandwidth figures from the DRAM classes (traffic >= 5x L2); target shape L2-resident",
        "cases": [],
    }
    path = out / JSON_NAME
    print(f"implementations: {impls}; not run: {skipped}; auto on CUDA: {doc['auto_cuda']}", flush=True)
    try:
        curve = M.copy_bandwidth(device)
        doc["copy_bandwidth"] = {"GBps": curve[-1]["GBps"], "bytes_per_tensor": curve[-1]["bytes_per_tensor"],
                                 "curve": curve, "method": "dst.copy_(src), float32, bytes = 2 x size"}
        print(f"copy bandwidth: {curve[-1]['GBps']:.0f} GB/s at {curve[-1]['bytes_per_tensor'] >> 20} MiB per tensor",
              flush=True)
        report.write_json(doc, path)
        durations: list[float] = []
        for i, case in enumerate(todo):
            guess = max(durations[-3:]) if durations else FIRST_GUESS_S
            if time.monotonic() + guess > deadline:
                for rest in todo[i:]:
                    doc["cases"].append({"key": rest.key, "status": "not run: out of time"})
                print(f"out of time: {len(todo) - i} case(s) not run", flush=True)
                break
            t0 = time.monotonic()
            print(f"[{t0 - start:5.0f}s] {case.key}", flush=True)
            try:
                rows = sweep.run_case(case, impls, device, rounds, min_round_s, case_budget_s, memory=True,
                                      copy_curve=curve)
                status = "ok"
            except Stop:
                raise
            except Exception as exc:  # one case's failure is reported; a dead CUDA context ends the stage
                rows, status = [], f"failed: {type(exc).__name__}: {str(exc)[:500]}"
                print(status, flush=True)
            seconds = time.monotonic() - t0
            durations.append(seconds)
            doc["results"].extend(rows)
            doc["ratios"] = sweep.ratios_of(doc["results"])
            doc["cases"].append({"key": case.key, "status": status, "seconds": round(seconds, 1)})
            report.write_json(doc, path)
            gc.collect()
            torch.cuda.empty_cache()
            if status != "ok" and ("CUDA error" in status or "cudaError" in status):
                break
        _profiles(out, impls, deadline, todo[0], device)
    except Stop:
        doc["cases"].append({"key": "-", "status": "stopped by the stage's cap (SIGTERM)"})
    doc["others_cpu_fraction"] = watch.others_fraction()
    report.write_json(doc, path)
    if doc["results"]:
        table = report.format_table(doc)
        (out / "table.txt").write_text(table + "\n")
        print(table, flush=True)
        print(f"wrote {plot.write_png(doc, out / PNG_NAME)}", flush=True)
        _print_winners(doc)
    return 0 if all(c["status"] == "ok" or c["status"].startswith("not run") for c in doc["cases"]) else 1


def _profiles(out: Path, impls: list[str], deadline: float, case, device) -> None:
    """torch.profiler tables (sorted by device time) of the first case (the step in the DRAM class), one per
    fastelbo backend, if the time allows: where the step's device time goes."""
    from fastelbo.bench import cases as C
    from fastelbo.bench import measure as M

    texts = []
    for impl in impls:
        if not impl.startswith(C.FASTELBO_PREFIX) or time.monotonic() + 10 > deadline:
            continue
        try:
            t = C.make_inputs(case, device)
            _, timed = C.build(case, impl, t)
            texts.append(f"== {case.key} {impl}: 10 calls\n{M.profile_table(timed, 10, device, row_limit=20)}")
        except Exception as exc:
            texts.append(f"== {case.key} {impl}: profile failed: {type(exc).__name__}: {exc}")
    if texts:
        (out / "profile-step.txt").write_text("\n\n".join(texts) + "\n")


def _print_winners(doc: dict) -> None:
    from gpucheck import winners as W

    rows = W.case_winners(doc)
    for r in rows:
        ratio = r["triton_over_cuda"]
        print(f"{r['key']:45s} {r['class']:12s} triton/cuda {ratio:.2f} -> {r['winner']}" if ratio else
              f"{r['key']:45s} {r['class']:12s} -", flush=True)
    for f in W.family_rule(rows, doc["auto_cuda"].get("chosen")):
        print(f"{f['op']:10s} measured {f['measured']:7s} auto now {f['auto_now']}: {f['action']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=130.0)
    p.add_argument("--list", action="store_true", help="print the cases in order and exit")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: this stage's own check without a GPU (two tiny cases, no GPU figure)")
    args = p.parse_args(argv)
    if args.list:
        for case in plan():
            print(case.key)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    return run(args.out, args.budget_s, args.device)


if __name__ == "__main__":
    sys.exit(main())
