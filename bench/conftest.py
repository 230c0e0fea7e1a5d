"""pytest-benchmark suite of fastelbo: every op family and the training step,
under every available fastelbo backend and the two baselines (eager
fastelbo.reference, torch.compile of it), on the shapes of
fastelbo.bench.cases.

    python -m pytest bench                        quick subset (float32, 3 shapes; about 2 minutes)
    python -m pytest bench --full                 every shape, float32 and bfloat16 (also FASTELBO_BENCH_FULL=1)
    python -m pytest bench -k "step and 4096x784x64"
    python -m pytest bench --benchmark-json out.json --benchmark-group-by=group

Each case is one benchmark group (its key, e.g. step/fwd+bwd/4096x784x64/float32);
the end of the run prints the speedups of every fastelbo backend vs eager and
vs torch.compile per case. extra_info of every benchmark holds the
minimum-bytes model, effective GB/s, % of the copy bandwidth, the bytes kept
for backward and the peak allocated during one call. The same cases and
measurements back ``fastelbo bench`` (with interleaved rounds and the
regression compare); see fastelbo/bench/.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastelbo.bench import cases as C
from fastelbo.bench import measure as M

ROUNDS = int(os.environ.get("FASTELBO_BENCH_ROUNDS", "7"))
MIN_ROUND_S = float(os.environ.get("FASTELBO_BENCH_MIN_ROUND_MS", "4")) / 1e3

_MEDIANS: dict = {}   # case key -> {impl: median seconds}
_COPY: dict = {}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="fastelbo bench: run the full sweep (every shape, float32 and bfloat16)")


def full_sweep(config) -> bool:
    env = os.environ.get("FASTELBO_BENCH_FULL", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(config.getoption("--full")) or env


def bench_device() -> str:
    env = os.environ.get("FASTELBO_BENCH_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        only = getattr(metafunc.module, "OPS", None)
        selected = C.sweep_cases(full=full_sweep(metafunc.config), ops=only)
        metafunc.parametrize("case", selected, ids=[c.key.replace("/", "-") for c in selected])
    if "impl" in metafunc.fixturenames:
        C.raise_compile_limits()
        names, _ = C.impl_names(torch.device(bench_device()).type)
        metafunc.parametrize("impl", names)


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def copy_curve(device):
    if "curve" not in _COPY:
        _COPY["curve"] = M.copy_bandwidth(device)
    return _COPY["curve"]


@pytest.fixture
def run_benchmark(benchmark, device, copy_curve):
    """run_benchmark(case, impl): builds, warms up and times one (case, impl) and
    records the bytes and memory figures in extra_info; returns the median per call."""
    return lambda case, impl: _run_benchmark(benchmark, case, impl, device, copy_curve)


def _run_benchmark(benchmark, case, impl, device, copy_curve):
    if impl == "compile":
        torch._dynamo.reset()
    t = C.make_inputs(case, device)
    forward, timed = C.build(case, impl, t)
    first = M.warm_up(timed, 3, device)
    iters = M.calibrate(timed, MIN_ROUND_S, device)
    benchmark.group = case.key
    if torch.device(device).type == "cuda":  # each timed call must include its kernels
        def call():
            timed()
            M.sync(device)
    else:
        call = timed
    # per-call statistics: pytest-benchmark divides each round by `iterations`
    benchmark.pedantic(call, rounds=ROUNDS, iterations=iters, warmup_rounds=1)
    med = benchmark.stats.stats.median
    bm = C.bytes_model(case.op, case.shape, case.pass_, case.itemsize)
    ref = M.copy_ref(copy_curve, bm["bytes"])
    inputs = [v for k, v in t.items() if not k.startswith("grad:")]
    benchmark.extra_info.update({
        "case": case.key, "impl": impl, "calls_per_round": iters, "median_per_call_s": med,
        "min_bytes": bm["bytes"], "bytes_model": {"reads": bm["reads"], "writes": bm["writes"]},
        "GBps": bm["bytes"] / med / 1e9, "copy_GBps": ref["GBps"], "pct_copy": 100 * bm["bytes"] / med / 1e9 / ref["GBps"],
        "saved_bytes": M.saved_for_backward(forward, inputs) if case.pass_ == "fwd+bwd" else None,
        "peak_bytes": M.peak_bytes(timed, device),
    })
    if impl == "compile":
        benchmark.extra_info["compile_s"] = first
        torch._dynamo.reset()
    _MEDIANS.setdefault(case.key, {})[impl] = med
    return med


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _MEDIANS:
        return
    from fastelbo.bench.report import fmt_time

    tr = terminalreporter
    tr.section("fastelbo speedups (median per call; ratio = baseline time / fastelbo time)")
    if "curve" in _COPY:
        c = _COPY["curve"][-1]
        tr.write_line(f"copy bandwidth {c['GBps']:.1f} GB/s ({c['bytes_per_tensor'] >> 20} MiB per tensor), "
                      f"device {bench_device()}, {torch.get_num_threads()} threads")
    for key, meds in _MEDIANS.items():
        for impl, t in meds.items():
            if not impl.startswith(C.FASTELBO_PREFIX):
                continue
            parts = [f"{key:<40} {impl:<14} {fmt_time(t):>10}"]
            for base in C.BASELINES:
                if base in meds:
                    parts.append(f"vs {base} {meds[base] / t:6.2f}x")
            tr.write_line("  ".join(parts))
