"""How the benchmarks measure: time, copy bandwidth, memory, per-call overhead.

Time
    Each implementation is warmed up (3 calls; the first compiles for
    torch.compile), then `iters` calls per round are timed with
    time.perf_counter (CUDA: synchronized before and after a round), with
    iters chosen so a round lasts at least `min_round_s`. Rounds of the
    implementations of one case are *interleaved* (round r times every
    implementation once, in rotating order), so a burst of load from a noisy
    neighbour hits all of them alike. Reported: the median time per call over
    the rounds; speedups are the median over rounds of the paired ratio
    t_baseline[r] / t_impl[r], which cancels slow drifts of the machine.

Copy bandwidth
    dst.copy_(src) of float32 tensors, bytes = 2 * size (read + write), median
    of interleaved rounds, for sizes from 1 MiB to 256 MiB per tensor. The
    largest is the headline "copy bandwidth" (DRAM); each case's "% of copy"
    uses the copy measured at the size closest to its own traffic, so a case
    whose working set fits a cache is held to the cache's speed, not DRAM's.

Memory kept for backward
    torch.autograd.graph.saved_tensors_hooks around one forward: the bytes of
    the distinct storages packed for backward that are not the inputs
    themselves (an input saved as-is costs no memory). Works for eager code,
    custom ops and torch.compile's compiled autograd functions alike.

Peak of temporaries
    CUDA: torch.cuda.max_memory_allocated() during one call minus the
    allocation before it. CPU: torch.profiler with profile_memory=True
    records every allocation and free of the CPU allocator (including the
    buffers Inductor's generated code allocates, which a TorchDispatchMode
    would miss); the peak of the running sum over one call, measured from the
    call's start. Includes the outputs the call returns (results, gradients).
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import cases as C

COPY_SIZES = tuple(1 << k for k in (20, 22, 24, 26, 28))  # bytes per tensor: 1 MiB .. 256 MiB


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def quiet_native_stderr():
    """Silences what native code writes to fd 2 (kineto prints a line at every
    profiler start and stop) for the duration; Python-level errors still raise."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. captured): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def warm_up(fn, calls: int = 3, device="cpu") -> float:
    """Runs fn `calls` times; returns the seconds of the first call (compile time for torch.compile)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(calls - 1):
        fn()
    sync(device)
    return first


def calibrate(fn, min_round_s: float, device="cpu", max_iters: int = 100_000) -> int:
    """Calls per round so that a round lasts at least min_round_s."""
    n = 1
    while True:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_round_s or n >= max_iters:
            return n
        n = min(max_iters, max(n * 2, int(n * min_round_s / max(dt, 1e-9) * 1.2) + 1))


def time_interleaved(fns: dict, rounds: int, min_round_s: float, device="cpu", budget_s: float | None = None):
    """{name: callable} -> {name: {'rounds_s': [...], 'iters': n}}: per-call seconds of each round.

    Rounds stop early (at least 3) once budget_s seconds are spent."""
    iters = {name: calibrate(fn, min_round_s, device) for name, fn in fns.items()}
    names = list(fns)
    out = {name: [] for name in names}
    start = time.perf_counter()
    with _no_gc():
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn, n = fns[name], iters[name]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                sync(device)
                out[name].append((time.perf_counter() - t0) / n)
            if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
                break
    return {name: {"rounds_s": out[name], "iters": iters[name]} for name in names}


def median(xs) -> float:
    return float(statistics.median(xs))


def paired_speedup(base_rounds, impl_rounds) -> float:
    """Median over rounds of base[r] / impl[r] (> 1: impl is faster)."""
    return median([b / i for b, i in zip(base_rounds, impl_rounds) if i > 0])


# ---------------------------------------------------------------------------
# Copy bandwidth
# ---------------------------------------------------------------------------
def copy_bandwidth(device="cpu", sizes=COPY_SIZES, rounds: int = 9, min_round_s: float = 0.02) -> list[dict]:
    """[{'bytes_per_tensor', 'traffic_bytes', 'GBps', 'median_s'}] for dst.copy_(src) of each size."""
    fns, tensors = {}, []
    for size in sizes:
        src = torch.ones(size // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch of dst's pages outside the timing
        tensors.append((src, dst))
        fns[size] = (lambda s, d: (lambda: d.copy_(s)))(src, dst)
    res = time_interleaved(fns, rounds, min_round_s, device)
    out = []
    for size in sizes:
        t = median(res[size]["rounds_s"])
        out.append({"bytes_per_tensor": size, "traffic_bytes": 2 * size, "median_s": t, "GBps": 2 * size / t / 1e9})
    del tensors
    return out


def copy_ref(curve: list[dict], traffic_bytes: int) -> dict:
    """The copy measurement whose traffic is closest (in log scale) to a case's bytes."""
    import math

    return min(curve, key=lambda c: abs(math.log(c["traffic_bytes"]) - math.log(max(traffic_bytes, 1))))


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (e.g. some wrappers): count by identity
        return id(t)


def saved_for_backward(forward, inputs) -> int:
    """Bytes of the distinct storages autograd saves during forward() that are not inputs' storages."""
    input_keys = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    seen: dict = {}

    def pack(t):
        k = _storage_key(t)
        if k not in input_keys:
            try:
                seen[k] = t.untyped_storage().nbytes()
            except Exception:
                seen[k] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return int(sum(seen.values()))


def _cpu_allocations(prof) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            if f.device.type == "cpu":
                events.append((node.start_time_ns, int(f.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def peak_bytes(fn, device="cpu") -> int | None:
    """Peak bytes allocated during one fn() above what was allocated before it (see module doc)."""
    fn()  # warm: lazy init, compiled graphs
    gc.collect()
    if torch.device(device).type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return int(peak)
    try:
        from torch.profiler import ProfilerActivity, profile

        with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        events = _cpu_allocations(prof)
    except Exception:  # profiler internals moved: no number rather than a wrong one
        return None
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return int(peak)


# ---------------------------------------------------------------------------
# Per-call overhead of the layers (tiny shapes)
# ---------------------------------------------------------------------------
OVERHEAD_DOC = """Forward (no grad) of each op through three layers, per call:

  api   fastelbo.<fn>(..., backend=b): argument checks, backend choice, then the op
  op    torch.ops.fastelbo.<op>(...): the dispatcher, including the Autograd
        key (on CPU tensors a C++ autograd kernel for rsample and elbo,
        csrc/cpu/autograd.cpp; register_autograd's Python wrapper otherwise, which
        runs even when no input needs grad), then the kernel
  raw   OpOverload.redispatch(DispatchKeySet(<device key>), ...): straight to
        the kernel registered for the device (boxed call + kernel)

plus `aten`: one ATen op (torch.neg on x) from Python, the floor of any call.
"""

OVERHEAD_OPS = ("rsample", "kl", "bernoulli", "gaussian", "elbo", "ELBOLoss")


def overhead_callables(shape=C.TINY, dtype="float32", device="cpu", backends=("cpu",)) -> dict:
    """{(op, layer, backend): callable} for the layers of OVERHEAD_DOC, plus ('aten', 'aten', None)."""
    import fastelbo
    from .._seed import seed_tensor

    ops = torch.ops.fastelbo
    key = torch._C.DispatchKey.CUDA if torch.device(device).type == "cuda" else torch._C.DispatchKey.CPU
    ks = torch._C.DispatchKeySet(key)
    t = C.make_inputs(C.Case("elbo", "fwd", shape, dtype), device)
    recon, x, mu, lv = t["recon"], t["x"], t["mu"], t["logvar"]
    seed = seed_tensor(torch.device(device), seed=1234)
    s_vec = torch.zeros(shape.Dx, dtype=C.DTYPES[dtype], device=device)
    s_exp = s_vec.expand(shape.B, shape.Dx)
    elbo_args = (x, recon, mu, lv, None, None, None, "bernoulli", 1.0)
    out = {("aten", "aten", None): lambda: torch.neg(x)}
    for b in backends:
        loss_fn = fastelbo.ELBOLoss(backend=b)
        layers = {
            "rsample": (lambda b=b: fastelbo.rsample(mu, lv, seed=1234, backend=b),
                        lambda: ops.rsample(mu, lv, seed, None),
                        lambda: ops.rsample.default.redispatch(ks, mu, lv, seed, None)),
            "kl": (lambda b=b: fastelbo.gaussian_kl(mu, lv, backend=b),
                   lambda: ops.gaussian_kl(mu, lv, None, None),
                   lambda: ops.gaussian_kl.default.redispatch(ks, mu, lv, None, None)),
            "bernoulli": (lambda b=b: fastelbo.bernoulli_log_prob(recon, x, backend=b),
                          lambda: ops.bernoulli_log_prob(recon, x),
                          lambda: ops.bernoulli_log_prob.default.redispatch(ks, recon, x)),
            "gaussian": (lambda b=b: fastelbo.gaussian_log_prob(recon, x, s_vec, backend=b),
                         lambda: ops.gaussian_log_prob(recon, x, s_exp),
                         lambda: ops.gaussian_log_prob.default.redispatch(ks, recon, x, s_exp)),
            "elbo": (lambda b=b: fastelbo.elbo(recon=recon, x=x, mu=mu, logvar=lv, backend=b),
                     lambda: ops.elbo(*elbo_args),
                     lambda: ops.elbo.default.redispatch(ks, *elbo_args)),
            # the module: fastelbo.elbo plus -elbo.mean()
            "ELBOLoss": (lambda f=loss_fn: f(recon, x, mu, lv),
                         lambda: ops.elbo(*elbo_args)[0].neg().mean(),
                         lambda: ops.elbo.default.redispatch(ks, *elbo_args)[0].neg().mean()),
        }
        for name, fns in layers.items():
            for layer, fn in zip(("api", "op", "raw"), fns):
                out[(name, layer, b)] = fn
    return out


def overhead_layers(shape=C.TINY, dtype="float32", device="cpu", backend="cpu", rounds: int = 15,
                    min_round_s: float = 0.01) -> list[dict]:
    """Per-call time of each op at each layer (OVERHEAD_DOC), interleaved rounds; one row per op."""
    calls = overhead_callables(shape, dtype, device, (backend,))
    for fn in calls.values():
        warm_up(fn, 5, device)
    res = time_interleaved(calls, rounds, min_round_s, device)
    aten = median(res[("aten", "aten", None)]["rounds_s"])
    out = []
    for name in OVERHEAD_OPS:
        api, op, raw = (median(res[(name, k, backend)]["rounds_s"]) for k in ("api", "op", "raw"))
        out.append({"op": name, "shape": shape.id, "dtype": dtype, "backend": backend, "api_s": api, "op_s": op,
                    "raw_s": raw, "aten_s": aten, "python_layer_s": api - op, "dispatch_autograd_s": op - raw})
    return out


# ---------------------------------------------------------------------------
# Profiles and machine
# ---------------------------------------------------------------------------
def profile_table(fn, calls: int = 10, device="cpu", row_limit: int = 15) -> str:
    """torch.profiler summary of `calls` calls, sorted by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    warm_up(fn, 2, device)
    with quiet_native_stderr(), profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    # self_device_time_total: torch >= 2.4 (self_cuda_time_total is deprecated there)
    key = "self_device_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (lower-case keys); {} where there is none."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str:
    """Vendor, family, model and stepping from /proc/cpuinfo: under a hypervisor the
    model name is often a generic "Intel(R) Xeon(R) Processor" shared by CPU
    generations whose speed ratios differ (a baseline holds for one of them)."""
    fields = _cpuinfo()
    if "cpu family" in fields and "model" in fields:
        return (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields['model']} "
                f"stepping {fields.get('stepping', '?')}")
    return platform.processor() or platform.machine()


def cpu_caches() -> dict:
    """Cache sizes of CPU 0 as Linux reports them ({"L1d": "48K", "L2": "2048K", ...}); {} elsewhere."""
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")] = size
    return caches


def _own_cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children, and its live descendants
    (Inductor's compile workers and what they ran) from /proc."""
    own = os.times()
    total = own.user + own.system + own.children_user + own.children_system
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry)
            parent[pid] = int(fields[1])
            cpu[pid] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        me = os.getpid()
        for pid in cpu:
            p, seen = parent.get(pid), 0
            while p and p != me and seen < 64:
                p, seen = parent.get(p), seen + 1
            if p == me and pid != me:
                total += cpu[pid]
    except OSError:
        pass
    return total


class Interference:
    """How much CPU other processes used while we measured: machine-wide busy
    time from /proc/stat minus the CPU time of this process and its
    descendants, as a fraction of wall time x logical cores. Linux only (None
    elsewhere). A 2-thread kernel on a 2-core machine shares its cores with
    whatever else runs, and its barriers wait for the descheduled thread:
    rows measured at more than ~10% are not to be trusted."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy_s = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        return time.perf_counter(), busy_s, _own_cpu_seconds()

    def others_fraction(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else None


def machine_info(device="cpu") -> dict:
    import fastelbo

    dev = torch.device(device)
    info = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_caches": cpu_caches(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastelbo": fastelbo.__version__,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    try:  # chosen per host by timing (csrc/cpu/half_tables.h): part of what the 16-bit rows measured
        from fastelbo import _build

        info["half_tables"] = _build.cpu_half_tables()
    except Exception:
        info["half_tables"] = None
    return info


__all__ = ["sync", "warm_up", "calibrate", "time_interleaved", "median", "paired_speedup", "copy_bandwidth",
           "copy_ref", "saved_for_backward", "peak_bytes", "overhead_layers", "overhead_callables", "OVERHEAD_DOC", "profile_table", "machine_info",
           "Interference", "cpu_model", "cpu_id", "cpu_caches", "COPY_SIZES"]
