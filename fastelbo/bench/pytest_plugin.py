"""pytest-benchmark fixture for projects that use fastelbo: time *your* VAE step.

    # conftest.py
    pytest_plugins = ["fastelbo.bench.pytest_plugin"]

    # tests/perf/test_step.py
    from perf_workloads import make_step     # the same builder the CI's A/B uses (below)

    def test_vae_step(time_step):
        time_step(make_step(), name="vae step")

    # run: python -m pytest tests/perf --benchmark-json perf.json

`time_step(step)` warms the step up (3 calls: torch.compile, fastelbo's first-use
kernel build and the allocator settle there), picks the calls per round so a
round lasts at least `min_round_s`, times `rounds` rounds with pytest-benchmark
(statistics per call) and records in extra_info what the number depends on:
fastelbo, torch, the CPU model (family/model/stepping), threads and the load.
It returns the median seconds per call.

A timing from one run is not a regression check: compare two revisions in
one run with `fastelbo bench --repo . --workload perf_workloads.py:workloads
--against origin/main` (README, "Regression checks").
"""

from __future__ import annotations

import os

import pytest


def step_info() -> dict:
    """What a step's timing depends on, for extra_info."""
    import torch

    import fastelbo

    from . import measure as M

    return {"fastelbo": fastelbo.__version__, "torch": torch.__version__, "cpu_model": M.cpu_model(),
            "cpu_id": M.cpu_id(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


@pytest.fixture
def time_step(benchmark):
    """time_step(step, rounds=10, min_round_s=0.01, name=None) -> median seconds per call of step()."""
    from . import measure as M

    def run(step, rounds: int = 10, min_round_s: float = 0.01, name: str | None = None, device="cpu"):
        M.warm_up(step, 3, device)
        iters = M.calibrate(step, min_round_s, device)
        if name:
            benchmark.name = name
        benchmark.extra_info.update({**step_info(), "calls_per_round": iters})
        timed = step
        if str(device).startswith("cuda"):  # each timed call must include its kernels
            def timed():
                step()
                M.sync(device)
        benchmark.pedantic(timed, rounds=rounds, iterations=iters, warmup_rounds=1)
        return benchmark.stats.stats.median

    return run
