"""pytest plugin of the GPU check's test stage (`-p gpucheck.select_tests`).

Selection. The shared test files are parametrized over the fused backends,
each a `Backend(name, device)` (tests/helpers.py); on a machine with a GPU
the `triton` and `cuda` backends run CUDA tensors. Kept:
  * a case with a backend parameter whose device is "cuda" (triton and cuda;
    never cpu, nor the emulator, whose device is "cpu");
  * else a case whose parameter id names "cuda" (e.g. autocast's cuda-f16, the
    cross-device bad-input cases), never one that names only "cpu";
  * else every case of the files about the Triton GPU path and the launch
    geometry (GPU_FILES).
The rest (CPU, interpreter and emulator cases, device-agnostic checks that
the CPU suite runs anyway) is deselected.

Shards (GPUCHECK_SHARD=k/N). The selected cases are grouped per (backend,
test function, dtype) and the groups dealt out to N shards, largest first to
the least loaded (Triton cases weigh 3: they compile kernels); a group stays
on one shard, so its Triton kernels compile and autotune once. Each shard
keeps the order of collection: the core suite first.

Results (GPUCHECK_RESULTS=path.jsonl). One JSON line per test phase outcome
as it happens, plus what was selected, so a shard stopped by its cap still
tells what ran.

Two settings of the test processes, both for time and neither changing a
result: a backend whose build the build stage saw fail is marked failed
(GPUCHECK_CPU_BUILD_FAILED / GPUCHECK_CUDA_BUILD_FAILED; its cases then skip
with that reason instead of every shard retrying the build), and the Triton
autotuner of each fastelbo kernel times its candidate configs with 1 ms of
warm-up and 5 ms of repetitions instead of 25 and 100 (every config the
prune keeps still compiles and runs; which one wins does not change what the
kernels compute, and the bench stage keeps Triton's own timing).
"""

from __future__ import annotations

import json
import os
import re
import time

from gpucheck.build_marks import mark_failed_builds

GPU_FILES = {"test_triton.py", "test_triton_autotune_path.py", "test_launch_geometry.py"}
DTYPE_TOKENS = {"f32", "f64", "f16", "bf16", "float32", "float64", "float16", "bfloat16"}
TRITON_WEIGHT = 3


def backend_param(item) -> tuple[str, str] | None:
    """(name, device) of the item's Backend parameter, if it has one."""
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, tuple) and hasattr(value, "name") and hasattr(value, "device"):
            return str(value.name), str(value.device)
    return None


def _id_tokens(item) -> set[str]:
    callspec = getattr(item, "callspec", None)
    return set(re.split(r"[-\[\],]", callspec.id)) if callspec else set()


def keep(item) -> bool:
    backend = backend_param(item)
    if backend is not None:
        return backend[1] == "cuda"
    tokens = _id_tokens(item)
    if "cuda" in tokens:
        return True
    if "cpu" in tokens:
        return False
    return os.path.basename(str(item.fspath)) in GPU_FILES


def group_key(item) -> tuple:
    backend = backend_param(item)
    dtype = next((t for t in _id_tokens(item) if t in DTYPE_TOKENS), "")
    name = getattr(item, "originalname", None) or item.name
    return (backend[0] if backend else "", os.path.basename(str(item.fspath)), name, dtype)


def shard(items: list, k: int, n: int) -> list:
    """The items of shard k (1-based) of n, in their original order."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(group_key(item), []).append(i)
    loads = [0.0] * n
    mine: list[int] = []
    weight = {key: len(ix) * (TRITON_WEIGHT if key[0] == "triton" or "triton" in key[1] else 1)
              for key, ix in groups.items()}
    for key in sorted(groups, key=lambda g: (-weight[g], groups[g][0])):
        target = min(range(n), key=lambda s: (loads[s], s))
        loads[target] += weight[key]
        if target == k - 1:
            mine.extend(groups[key])
    return [items[i] for i in sorted(mine)]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 1, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"GPUCHECK_SHARD must be k/N with 1 <= k <= N; got {text!r}")
    return int(m.group(1)), int(m.group(2))


class _Results:
    def __init__(self, path: str | None):
        self.path = path
        self.backend: dict[str, str] = {}
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            open(path, "w").close()

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


_RESULTS = _Results(os.environ.get("GPUCHECK_RESULTS"))


def short_autotune_benchmarks() -> int:
    """Points the benchmark of every autotuned fastelbo Triton kernel at a short triton.testing.do_bench;
    returns how many were changed."""
    import triton
    from triton.runtime.autotuner import Autotuner

    from fastelbo import kernels

    def quick(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=1, rep=5, quantiles=quantiles)

    changed = 0
    for module in (getattr(kernels, n, None) for n in ("rsample", "kl", "loglik", "elbo", "iwae", "free_bits")):
        for obj in vars(module).values() if module else ():
            if isinstance(obj, Autotuner):
                obj._do_bench = quick  # read by do_bench where it is a plain attribute or property
                obj.__dict__["do_bench"] = quick  # over a cached_property (Autotuner._bench calls self.do_bench)
                changed += 1
    return changed


def pytest_configure(config):
    mark_failed_builds()


def pytest_collection_modifyitems(session, config, items):
    k, n = parse_shard(os.environ.get("GPUCHECK_SHARD"))
    selected = [it for it in items if keep(it)]
    mine = shard(selected, k, n)
    chosen = {id(it) for it in mine}
    dropped = [it for it in items if id(it) not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = mine
    for it in mine:
        b = backend_param(it)
        _RESULTS.backend[it.nodeid] = b[0] if b else ("triton" if "triton" in it.nodeid else "other")
    _RESULTS.write({"event": "selected", "shard": f"{k}/{n}", "selected": len(mine), "of_gpu_cases": len(selected),
                    "collected": len(items) + len(dropped), "time": time.time()})


def pytest_collection_finish(session):
    if not session.items:
        return
    try:
        import torch

        if torch.cuda.is_available():
            changed = short_autotune_benchmarks()
            _RESULTS.write({"event": "autotune", "kernels_with_short_benchmark": changed})
    except Exception as exc:  # triton missing or changed: the tests then say so themselves
        _RESULTS.write({"event": "autotune", "error": f"{type(exc).__name__}: {exc}"})


def pytest_runtest_logreport(report):
    if report.when != "call" and report.outcome == "passed":
        return
    message = ""
    if report.failed:
        message = report.longreprtext[-1500:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:300]
    _RESULTS.write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                    "seconds": round(report.duration, 3), "backend": _RESULTS.backend.get(report.nodeid, "other"),
                    "message": message})


def pytest_sessionfinish(session, exitstatus):
    _RESULTS.write({"event": "finished", "exitstatus": int(exitstatus), "time": time.time()})
